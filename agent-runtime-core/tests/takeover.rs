//! Takeover (API.md, "Guarantees"): a turn whose process stopped is resumed from its last stored
//! step on a live one, and a draining process hands its turns over — over real SQLite files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::config::{RuntimeConfig, TurnRecovery};
use agent_runtime_core::events::{BusEventKind, BusFilter};
use agent_runtime_core::llm::{Script, ScriptedBackend, ToolChoice};
use agent_runtime_core::orchestrator::{CreateSession, DrainReport, Follow, Orchestrator, Submission};
use agent_runtime_core::protocol::{AssistantMessage, ClientMessage, EventPayload, StopReason, ToolError};
use agent_runtime_core::session::{NewMessage, SessionStatus, ToolCall, TurnStateJson, Usage};
use agent_runtime_core::storage::{self, Commit, SessionUpdate, Storage};
use agent_runtime_core::{Error, Event};
use futures::StreamExt;
use serde_json::{Value, json};

const USAGE: Usage = Usage {
    prompt_tokens: 5,
    completion_tokens: 1,
    cached_prompt_tokens: 0,
};

/// A one-word answer with known usage: its events are exactly one token, the message, `done`.
fn answer(word: &str) -> Script {
    Script::text(word).usage(USAGE)
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        default_agent: "coder".into(),
        auto_agent_switching: false,
        hitl_enabled: false,
        ..RuntimeConfig::default()
    }
}

struct Setup {
    _db: tempfile::TempDir,
    project: tempfile::TempDir,
    db_url: String,
    /// On Postgres: the test's fresh schema (`db_url` is then unused).
    #[cfg(feature = "postgres")]
    pg: Option<Arc<agent_runtime_core::storage::pg_testing::SchemaGuard>>,
}

impl Setup {
    fn new() -> Setup {
        let db = tempfile::tempdir().unwrap();
        let db_url = format!("sqlite://{}", db.path().join("rt.db").display());
        Setup {
            _db: db,
            project: tempfile::tempdir().unwrap(),
            db_url,
            #[cfg(feature = "postgres")]
            pg: None,
        }
    }

    /// The same on a fresh Postgres schema.
    #[cfg(feature = "postgres")]
    async fn postgres() -> Setup {
        Setup {
            pg: Some(agent_runtime_core::storage::pg_testing::fresh_schema().await),
            ..Setup::new()
        }
    }

    /// A new handle on the shared database (each runtime its own, as each process has).
    async fn open(&self) -> Arc<dyn Storage> {
        #[cfg(feature = "postgres")]
        if let Some(guard) = &self.pg {
            return agent_runtime_core::storage::pg_testing::guarded(guard).await;
        }
        storage::open(&self.db_url).await.unwrap()
    }

    /// A runtime on the shared database answering with `scripts`.
    async fn runtime(
        &self,
        scripts: Vec<Script>,
        config: RuntimeConfig,
    ) -> (Orchestrator, Arc<ScriptedBackend>) {
        let store = self.open().await;
        let llm = Arc::new(ScriptedBackend::new(scripts));
        let rt = Orchestrator::builder(store, llm.clone())
            .config(config)
            .build()
            .unwrap();
        (rt, llm)
    }

    async fn session(&self, rt: &Orchestrator) -> String {
        rt.create_session(CreateSession {
            metadata: Some(json!({"project_path": self.project.path().to_str().unwrap()})),
            ..CreateSession::default()
        })
        .await
        .unwrap()
        .id
    }
}

/// What a process that died mid-turn leaves behind: the session `running` with this turn state
/// and nobody holding its lease, and `commits` stored (the user's message first).
async fn left_running(store: &Arc<dyn Storage>, session: &str, state: Value, commits: Vec<Commit>) {
    let first = Commit {
        messages: vec![NewMessage::user("go", Some("coder".into()))],
        session: SessionUpdate {
            status: Some(SessionStatus::Running),
            turn_state: Some(Some(TurnStateJson::from_value(&state))),
            ..SessionUpdate::default()
        },
        ..Commit::now()
    };
    for c in std::iter::once(first).chain(commits) {
        store.commit(session, c).await.unwrap();
    }
}

fn state(open_calls: Value, resumes: u32) -> Value {
    json!({"turn_id": "turn_1", "iterations": 1, "auto_switches": 0,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0},
        "open_calls": open_calls, "resumes": resumes})
}

fn events(payloads: Vec<EventPayload>) -> Commit {
    Commit {
        events: payloads,
        ..Commit::now()
    }
}

fn token(t: &str) -> EventPayload {
    EventPayload::AssistantMessage(AssistantMessage::Token { token: t.into() })
}

fn complete(t: &str) -> EventPayload {
    EventPayload::AssistantMessage(AssistantMessage::Complete { content: t.into() })
}

fn resumed(after_seq: u64, reason: &str) -> EventPayload {
    EventPayload::TurnResumed {
        after_seq,
        reason: reason.into(),
    }
}

fn done(stop_reason: StopReason, usage: Usage) -> EventPayload {
    EventPayload::Done {
        stop_reason,
        usage: usage.into(),
    }
}

/// The session's stored events, once its turn has ended (bounded wait).
async fn until_idle(rt: &Orchestrator, session: &str) -> Vec<Event> {
    let stream = rt.events(session, 0, Follow::UntilIdle).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), stream.collect::<Vec<_>>())
        .await
        .expect("the resumed turn ends within 20 s")
}

fn payloads(events: &[Event]) -> Vec<EventPayload> {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "gap-free seqs"
    );
    events.iter().map(|e| e.payload.clone()).collect()
}

#[tokio::test]
async fn a_turn_cut_mid_answer_is_asked_again_and_the_tokens_streamed_before_are_void() {
    let setup = Setup::new();
    let (rt, llm) = setup.runtime(vec![answer("again")], config()).await;
    let s = setup.session(&rt).await;
    left_running(
        rt.storage(),
        &s,
        state(json!([]), 0),
        vec![events(vec![token("Hel"), token("lo")])],
    )
    .await;

    let mut bus = rt.subscribe(BusFilter::default());
    assert_eq!(rt.recover_interrupted().await.unwrap(), 1);
    assert_eq!(
        payloads(&until_idle(&rt, &s).await),
        [
            token("Hel"),
            token("lo"),
            resumed(0, "owner_stopped"),
            token("again"),
            complete("again"),
            done(StopReason::Completed, USAGE),
        ]
    );
    let history: Vec<(String, String)> = (rt.messages(&s, 0, 100).await.unwrap())
        .into_iter()
        .map(|m| (format!("{:?}", m.role), m.content))
        .collect();
    assert_eq!(
        history,
        [
            ("User".to_string(), "go".to_string()),
            ("Assistant".to_string(), "again".to_string())
        ],
        "the void tokens are in no message"
    );
    assert_eq!(llm.requests().len(), 1);
    assert_eq!(rt.get_session(&s).await.unwrap().status, SessionStatus::Idle);
    // The bus tells embedders the turn runs in this process again, then how it ended.
    let mut told = vec![];
    while let Some(Ok(e)) = bus.try_recv() {
        assert_eq!(e.session_id, s);
        told.push((e.kind, e.data));
    }
    assert_eq!(
        told,
        [
            (
                BusEventKind::TurnStarted,
                json!({"turn_id": "turn_1", "agent": "coder", "resumed": "owner_stopped"})
            ),
            (
                BusEventKind::TurnCompleted,
                json!({"turn_id": "turn_1", "stop_reason": "completed", "cost": 0.0})
            ),
        ]
    );
}

#[tokio::test]
async fn a_side_effecting_call_in_flight_is_never_run_again_and_a_read_only_one_is() {
    let setup = Setup::new();
    std::fs::write(setup.project.path().join("a.txt"), "alpha").unwrap();
    let (rt, _llm) = setup.runtime(vec![answer("checked")], config()).await;
    let s = setup.session(&rt).await;
    let command = json!({"command": "echo x >> f.txt"});
    let read = json!({"path": "a.txt"});
    let calls = vec![
        ToolCall {
            id: "c_cmd".into(),
            name: "execute_command".into(),
            arguments: command.clone(),
        },
        ToolCall {
            id: "c_read".into(),
            name: "read_file".into(),
            arguments: read.clone(),
        },
    ];
    let tool_call = |id: &str, name: &str, arguments: &Value| EventPayload::ToolCall {
        call_id: id.into(),
        tool_name: name.into(),
        arguments: arguments.clone(),
        requires_approval: false,
        reason: None,
    };
    let in_flight = json!([
        {"call_id": "c_cmd", "tool_name": "execute_command", "arguments": command, "state": "ready", "run_arguments": command},
        {"call_id": "c_read", "tool_name": "read_file", "arguments": read, "state": "ready", "run_arguments": read},
    ]);
    left_running(
        rt.storage(),
        &s,
        state(in_flight, 0),
        vec![Commit {
            messages: vec![NewMessage::assistant("", Some("coder".into()), calls)],
            events: vec![
                tool_call("c_cmd", "execute_command", &command),
                tool_call("c_read", "read_file", &read),
            ],
            ..Commit::now()
        }],
    )
    .await;

    assert_eq!(rt.recover_interrupted().await.unwrap(), 1);
    let all = payloads(&until_idle(&rt, &s).await);
    let read_result = match &all[4] {
        EventPayload::ToolResult { result: Some(r), .. } => r.clone(),
        other => panic!("the read-only call ran again: {other:?}"),
    };
    assert!(read_result.to_string().contains("alpha"), "{read_result}");
    assert_eq!(
        all,
        [
            tool_call("c_cmd", "execute_command", &command),
            tool_call("c_read", "read_file", &read),
            resumed(2, "owner_stopped"),
            EventPayload::ToolResult {
                call_id: "c_cmd".into(),
                tool_name: "execute_command".into(),
                result: None,
                error: Some(ToolError {
                    code: "TOOL_EXECUTION_FAILED".into(),
                    message: "interrupted: the process running it stopped".into(),
                }),
            },
            EventPayload::ToolResult {
                call_id: "c_read".into(),
                tool_name: "read_file".into(),
                result: Some(read_result),
                error: None,
            },
            token("checked"),
            complete("checked"),
            done(StopReason::Completed, USAGE),
        ]
    );
    assert!(
        !setup.project.path().join("f.txt").exists(),
        "the command was not run again"
    );
}

#[tokio::test]
async fn a_turn_taken_over_three_times_without_progress_is_interrupted_instead() {
    let setup = Setup::new();
    let (rt, llm) = setup.runtime(vec![answer("never")], config()).await;
    let s = setup.session(&rt).await;
    left_running(rt.storage(), &s, state(json!([]), 3), vec![]).await;

    assert_eq!(rt.recover_interrupted().await.unwrap(), 1);
    assert_eq!(
        payloads(&until_idle(&rt, &s).await),
        [
            EventPayload::Error {
                code: "INTERNAL".into(),
                message: "internal error".into()
            },
            done(StopReason::Error, Usage::default()),
        ]
    );
    assert_eq!(llm.requests().len(), 0, "the model was not asked again");
}

/// A client's tool result is progress, like a tool the runtime ran: a client-mode turn taken over
/// three times before it paused counts from zero again once the result is stored, so a takeover
/// while the model answers it resumes the turn instead of ending it.
#[tokio::test]
async fn a_clients_tool_result_resets_the_takeovers_without_progress() {
    let setup = Setup::new();
    let (rt, llm) = setup
        .runtime(
            vec![
                Script::tool_call("read_file", json!({"path": "a.txt"})),
                answer("read").first_byte_delay(Duration::from_secs(30)),
            ],
            config(),
        )
        .await;
    let s = rt
        .create_session(CreateSession {
            metadata: Some(json!({"tool_execution": "client"})),
            ..CreateSession::default()
        })
        .await
        .unwrap()
        .id;
    let paused: Vec<Event> = rt
        .submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "read a.txt".into(),
                agent_type: None,
            }),
        )
        .await
        .unwrap()
        .collect()
        .await;
    let call_id = paused
        .iter()
        .find_map(|e| match &e.payload {
            EventPayload::ToolCall { call_id, .. } => Some(call_id.clone()),
            _ => None,
        })
        .expect("a client tool call");
    // Taken over three times without progress before it paused (as a dying replica leaves it).
    let mut state = rt.get_session(&s).await.unwrap().turn_state.unwrap().to_value();
    state["resumes"] = json!(3);
    let update = Commit {
        session: SessionUpdate {
            turn_state: Some(Some(TurnStateJson::from_value(&state))),
            ..SessionUpdate::default()
        },
        ..Commit::now()
    };
    rt.storage().commit(&s, update).await.unwrap();

    let answered = rt
        .submit(
            &s,
            Submission::new(ClientMessage::ToolResult {
                call_id,
                result: Some(json!("alpha")),
                error: None,
            }),
        )
        .await
        .unwrap();
    let running = tokio::spawn(answered.collect::<Vec<_>>());
    tokio::time::timeout(Duration::from_secs(10), async {
        while llm.requests().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the model is asked with the result");
    let stored = rt.get_session(&s).await.unwrap();
    // Back at 0, which the stored state leaves out.
    assert_eq!(
        (
            stored.status,
            stored.turn_state.unwrap().to_value().get("resumes").cloned()
        ),
        (SessionStatus::Running, None)
    );
    running.abort();
}

#[tokio::test]
async fn with_turn_recovery_interrupt_a_stopped_turn_ends_with_an_error_at_once() {
    let setup = Setup::new();
    let interrupt = RuntimeConfig {
        turn_recovery: TurnRecovery::Interrupt,
        ..config()
    };
    let (rt, llm) = setup.runtime(vec![answer("never")], interrupt).await;
    let s = setup.session(&rt).await;
    left_running(
        rt.storage(),
        &s,
        state(json!([]), 0),
        vec![events(vec![token("Hel")])],
    )
    .await;

    assert_eq!(rt.recover_interrupted().await.unwrap(), 1);
    assert_eq!(
        payloads(&until_idle(&rt, &s).await),
        [
            token("Hel"),
            EventPayload::Error {
                code: "INTERNAL".into(),
                message: "internal error".into()
            },
            done(StopReason::Error, Usage::default()),
        ]
    );
    assert_eq!(llm.requests().len(), 0);
}

#[tokio::test]
async fn a_draining_runtime_hands_its_turn_over_and_another_resumes_it() {
    let setup = Setup::new();
    let long = Script::text("one two three four five six seven eight nine ten eleven twelve")
        .delay_per_chunk(Duration::from_millis(100));
    let (a, _la) = setup.runtime(vec![long], config()).await;
    let (b, _lb) = setup.runtime(vec![answer("resumed")], config()).await;
    let s = setup.session(&a).await;
    let mut stream = a.submit(&s, Submission::user("go")).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(stream.next().await.expect("tokens before the drain"));
    }

    let report = a.drain(Duration::from_secs(5)).await;
    assert_eq!(
        report,
        DrainReport {
            handed_over: 1,
            still_running: 0
        }
    );
    // The stream ends without `done`: its client reconnects elsewhere.
    seen.extend(stream.collect::<Vec<_>>().await);
    assert!(
        seen.iter().all(|e| matches!(
            e.payload,
            EventPayload::AssistantMessage(AssistantMessage::Token { .. })
        )),
        "{seen:?}"
    );
    assert_eq!(
        a.submit(&s, Submission::user("more")).await.unwrap_err(),
        Error::ShuttingDown(
            "this server is shutting down and takes no new turns: send the request to another \
             replica, or retry once it is back (its running turns are handed over, not lost)"
                .into()
        )
    );
    assert_eq!(
        a.recover_interrupted().await.unwrap(),
        0,
        "a draining runtime takes no turn over"
    );
    let session = b.get_session(&s).await.unwrap();
    assert_eq!(
        session.status,
        SessionStatus::Running,
        "handed over, not ended: {:?}",
        b.storage().events_after(&s, 0, 100).await
    );

    assert_eq!(b.recover_interrupted().await.unwrap(), 1);
    let all = until_idle(&b, &s).await;
    let cut = all
        .iter()
        .position(|e| matches!(e.payload, EventPayload::TurnResumed { .. }))
        .expect("turn_resumed stored");
    let mut expected: Vec<EventPayload> = vec![token("one"), token(" two"), token(" three")];
    expected.truncate(cut);
    expected.extend([
        resumed(0, "handed_over"),
        token("resumed"),
        complete("resumed"),
        done(StopReason::Completed, USAGE),
    ]);
    assert!(
        (2..=3).contains(&cut),
        "A streamed 2 or 3 tokens before it handed over: {all:?}"
    );
    assert_eq!(payloads(&all), expected);
    assert_eq!(
        all[..seen.len()].to_vec(),
        seen,
        "what the client saw is stored as it saw it"
    );
}

/// The orchestrator as the default agent, routing every new message.
fn routing_config() -> RuntimeConfig {
    RuntimeConfig {
        hitl_enabled: false,
        plans_enabled: false,
        ..RuntimeConfig::default()
    }
}

/// The router choosing `agent`, with known usage (7 prompt, 2 completion tokens).
fn route(agent: &str) -> Script {
    Script::tool_call("route", json!({"agent": agent, "reason": "design work"})).usage(Usage {
        prompt_tokens: 7,
        completion_tokens: 2,
        cached_prompt_tokens: 0,
    })
}

/// The model calls `llm` was asked, as (forced function, or none).
fn forced(llm: &ScriptedBackend) -> Vec<Option<String>> {
    (llm.requests().iter())
        .map(|r| match &r.tool_choice {
            ToolChoice::Function(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// A turn cut while the orchestrator routes it (its process drains, or dies, after the user's
/// message is stored and before the routing decision is) is routed where it resumes, as it would
/// have been: the router is asked again, the session switches, and the routed agent answers —
/// not the session's current agent (the orchestrator) with the message unrouted.
async fn a_turn_cut_while_routing_is_routed_where_it_resumes(setup: Setup) {
    let slow_route = route("architect").delay_per_chunk(Duration::from_secs(2));
    let (a, la) = setup.runtime(vec![slow_route], routing_config()).await;
    let (b, lb) = setup
        .runtime(vec![route("architect"), answer("designed")], routing_config())
        .await;
    let s = setup.session(&a).await;
    let stream = a.submit(&s, Submission::user("design a cache")).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while la.requests().is_empty() {
        assert!(std::time::Instant::now() < deadline, "A never asked its router");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = a.drain(Duration::from_secs(5)).await;
    assert_eq!(
        report,
        DrainReport {
            handed_over: 1,
            still_running: 0
        }
    );
    assert_eq!(
        stream.collect::<Vec<_>>().await,
        [],
        "nothing was streamed before the cut"
    );

    let mut bus = b.subscribe(BusFilter {
        kinds: Some(vec![BusEventKind::TurnStarted]),
        session_id: None,
    });
    assert_eq!(b.recover_interrupted().await.unwrap(), 1);
    let all = until_idle(&b, &s).await;
    assert_eq!(
        payloads(&all),
        [
            resumed(0, "handed_over"),
            EventPayload::AgentSwitched {
                from_agent: "orchestrator".into(),
                to_agent: "architect".into(),
                reason: "design work".into(),
            },
            token("designed"),
            complete("designed"),
            done(
                StopReason::Completed,
                Usage {
                    prompt_tokens: 7 + 5,
                    completion_tokens: 2 + 1,
                    cached_prompt_tokens: 0,
                }
            ),
        ]
    );
    assert_eq!(forced(&la), [Some("route".to_string())]);
    assert_eq!(
        forced(&lb),
        [Some("route".to_string()), None],
        "B asked the router again, then the routed agent"
    );
    assert_eq!(
        lb.requests()[0].messages.last().map(|m| m.content.clone()),
        Some("design a cache".to_string()),
        "the router was given the user's message"
    );
    let history: Vec<(String, Option<String>, String)> = (b.messages(&s, 0, 100).await.unwrap())
        .into_iter()
        .map(|m| (format!("{:?}", m.role), m.agent, m.content))
        .collect();
    assert_eq!(
        history,
        [
            (
                "User".into(),
                Some("orchestrator".into()),
                "design a cache".into()
            ),
            ("Assistant".into(), Some("architect".into()), "designed".into()),
        ]
    );
    let session = b.get_session(&s).await.unwrap();
    assert_eq!(
        (session.status, session.current_agent),
        (SessionStatus::Idle, "architect".to_string())
    );
    let started = bus.try_recv().unwrap().unwrap();
    assert_eq!(
        (
            started.session_id,
            started.data["agent"].clone(),
            started.data["resumed"].clone()
        ),
        (s.clone(), json!("orchestrator"), json!("handed_over"))
    );
}

#[tokio::test]
async fn on_sqlite_a_turn_cut_while_routing_is_routed_where_it_resumes() {
    a_turn_cut_while_routing_is_routed_where_it_resumes(Setup::new()).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_a_turn_cut_while_routing_is_routed_where_it_resumes() {
    a_turn_cut_while_routing_is_routed_where_it_resumes(Setup::postgres().await).await;
}
