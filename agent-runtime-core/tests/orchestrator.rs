//! The agent engine end to end on the scripted model: routing, switching, tool checks, the
//! sandbox, approvals, client execution, cancellation, idempotency, restart — over real SQLite files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::approval::ApprovalStatus;
use agent_runtime_core::config::{RuntimeConfig, ToolExecution};
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_core::llm::wire::EMPTY_STREAM;
use agent_runtime_core::llm::{
    ModelContext, OpenAiBackend, OpenAiConfig, Script, ScriptedBackend, ToolChoice,
};
use agent_runtime_core::orchestrator::{CancelOutcome, CreateSession, Follow, Orchestrator, Submission};
use agent_runtime_core::protocol::{
    AssistantMessage, ClientMessage, Decision, EventPayload, HitlDecision, StopReason, ToolError,
};
use agent_runtime_core::session::{Role, SessionStatus, TurnStateJson};
use agent_runtime_core::storage::{self, Storage};
use agent_runtime_core::{Error, Event};
use futures::StreamExt;
use serde_json::{Value, json};

struct Harness {
    project: tempfile::TempDir,
    _db: tempfile::TempDir,
    db_url: String,
    llm: Arc<ScriptedBackend>,
    rt: Orchestrator,
}

async fn harness_with(scripts: Vec<Script>, config: RuntimeConfig) -> Harness {
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", db.path().join("rt.db").display());
    let store = storage::open(&db_url).await.unwrap();
    let llm = Arc::new(ScriptedBackend::new(scripts));
    let rt = Orchestrator::builder(store, llm.clone())
        .config(config)
        .build()
        .unwrap();
    Harness {
        project: tempfile::tempdir().unwrap(),
        _db: db,
        db_url,
        llm,
        rt,
    }
}

async fn harness(scripts: Vec<Script>) -> Harness {
    harness_with(scripts, RuntimeConfig::default()).await
}

impl Harness {
    async fn session(&self) -> String {
        self.session_with(json!({"project_path": self.project.path().to_str().unwrap()}))
            .await
    }

    async fn session_with(&self, metadata: Value) -> String {
        let s = self
            .rt
            .create_session(CreateSession {
                user_id: Some("u1".into()),
                metadata: Some(metadata),
                session_id: None,
                budget: None,
            })
            .await
            .unwrap();
        s.id
    }

    async fn send(&self, session: &str, message: ClientMessage) -> Vec<Event> {
        collect(self.rt.submit(session, Submission::new(message)).await.unwrap()).await
    }

    async fn say(&self, session: &str, content: &str) -> Vec<Event> {
        self.send(
            session,
            ClientMessage::UserMessage {
                content: content.into(),
                agent_type: None,
            },
        )
        .await
    }

    async fn say_to(&self, session: &str, agent: &str, content: &str) -> Vec<Event> {
        self.send(
            session,
            ClientMessage::UserMessage {
                content: content.into(),
                agent_type: Some(agent.into()),
            },
        )
        .await
    }

    async fn decide(
        &self,
        session: &str,
        call_id: &str,
        decision: &str,
        args: Option<Value>,
        feedback: Option<&str>,
    ) -> Vec<Event> {
        self.send(
            session,
            ClientMessage::HitlDecision(HitlDecision {
                call_id: call_id.into(),
                decision: Decision::parse(decision, args, feedback.map(String::from)).unwrap(),
            }),
        )
        .await
    }
}

async fn collect(stream: agent_runtime_core::orchestrator::EventStream) -> Vec<Event> {
    let events: Vec<Event> = tokio::time::timeout(Duration::from_secs(20), stream.collect())
        .await
        .expect("stream did not end in 20 s");
    for pair in events.windows(2) {
        assert_eq!(
            pair[1].seq,
            pair[0].seq + 1,
            "seqs are gap-free within a stream: {events:?}"
        );
    }
    assert!(
        matches!(events.last().map(|e| &e.payload), Some(EventPayload::Done { .. })),
        "done is last: {events:?}"
    );
    events
}

fn payloads(events: &[Event]) -> Vec<EventPayload> {
    events.iter().map(|e| e.payload.clone()).collect()
}

fn token(t: &str) -> EventPayload {
    EventPayload::AssistantMessage(AssistantMessage::Token { token: t.into() })
}

fn complete(t: &str) -> EventPayload {
    EventPayload::AssistantMessage(AssistantMessage::Complete { content: t.into() })
}

fn switched(from: &str, to: &str, reason: &str) -> EventPayload {
    EventPayload::AgentSwitched {
        from_agent: from.into(),
        to_agent: to.into(),
        reason: reason.into(),
    }
}

fn stop(events: &[Event]) -> StopReason {
    match events.last().map(|e| &e.payload) {
        Some(EventPayload::Done { stop_reason, .. }) => *stop_reason,
        other => panic!("not done: {other:?}"),
    }
}

fn route(agent: &str) -> Script {
    Script::tool_call(
        "route",
        json!({"agent": agent, "reason": format!("{agent} fits")}),
    )
}

fn call_ids(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            EventPayload::ToolCall { call_id, .. } => Some(call_id.clone()),
            _ => None,
        })
        .collect()
}

fn tool_results(events: &[Event]) -> Vec<(String, Option<Value>, Option<ToolError>)> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            EventPayload::ToolResult {
                tool_name,
                result,
                error,
                ..
            } => Some((tool_name.clone(), result.clone(), error.clone())),
            _ => None,
        })
        .collect()
}

/// Every tool call in the stored history has exactly one result, right after its assistant message.
async fn assert_history_valid(store: &Arc<dyn Storage>, session: &str) {
    let msgs = store.messages_after(session, 0, 1000).await.unwrap();
    let mut open: Vec<String> = vec![];
    for m in &msgs {
        match m.role {
            Role::Tool => {
                let id = m.tool_call_id.clone().unwrap();
                assert!(
                    open.contains(&id),
                    "result for a call that is not open: {id} in {msgs:#?}"
                );
                open.retain(|c| *c != id);
            }
            _ => {
                assert!(
                    open.is_empty(),
                    "calls without results before seq {}: {open:?}",
                    m.seq
                );
                open = m.tool_calls.iter().map(|c| c.id.clone()).collect();
            }
        }
    }
    assert!(open.is_empty(), "calls without results at the end: {open:?}");
}

#[tokio::test]
async fn orchestrator_routes_each_request_to_its_specialist() {
    for agent in ["coder", "architect", "debug", "ask"] {
        let h = harness(vec![route(agent), Script::text("Готово, сделано")]).await;
        let s = h.session().await;
        let events = h.say(&s, "do the thing").await;
        assert_eq!(
            payloads(&events),
            vec![
                switched("orchestrator", agent, &format!("{agent} fits")),
                token("Готово,"),
                token(" сделано"),
                complete("Готово, сделано"),
                EventPayload::Done {
                    stop_reason: StopReason::Completed,
                    usage: payload_usage(&events)
                },
            ]
        );
        let requests = h.llm.requests();
        assert_eq!(requests[0].tool_choice, ToolChoice::Function("route".into()));
        assert_eq!(
            requests[1].messages[0].content,
            h.rt.agent_registry().get(agent).unwrap().system_prompt
        );
        let current = h.rt.current_agent(&s).await.unwrap();
        assert_eq!(
            (current.current_agent.agent_type.as_str(), current.switch_count),
            (agent, 1)
        );
        assert_eq!(h.rt.get_session(&s).await.unwrap().status, SessionStatus::Idle);
    }
}

fn payload_usage(events: &[Event]) -> agent_runtime_core::protocol::TurnUsage {
    match events.last().map(|e| &e.payload) {
        Some(EventPayload::Done { usage, .. }) => *usage,
        _ => panic!("no done"),
    }
}

#[tokio::test]
async fn keyword_classifier_decides_when_the_route_call_fails() {
    let h = harness(vec![Script::error(Error::Llm("boom".into())), Script::text("ok")]).await;
    let s = h.session().await;
    let events = h.say(&s, "Найди причину ошибки").await;
    assert_eq!(
        events[0].payload,
        switched(
            "orchestrator",
            "debug",
            "Keyword routing (router failed: boom): the request is about an error"
        )
    );
    assert_eq!(stop(&events), StopReason::Completed);
}

#[tokio::test]
async fn route_call_answering_nonsense_falls_back_to_keywords() {
    let h = harness(vec![
        Script::tool_call("route", json!({"agent": "pirate"})),
        Script::text("ok"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say(&s, "Создай новый виджет профиля").await;
    assert_eq!(
        events[0].payload,
        switched(
            "orchestrator",
            "coder",
            "Keyword routing (the router's answer named no agent): the request asks for code"
        )
    );
}

#[tokio::test]
async fn an_agent_hands_over_mid_turn_and_the_new_agent_answers() {
    let h = harness(vec![
        Script::tool_call(
            "switch_agent",
            json!({"agent_type": "architect", "reason": "design question"}),
        ),
        Script::text("Design follows"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "design the auth system").await;
    let p = payloads(&events);
    assert_eq!(
        p[0],
        switched("orchestrator", "coder", "User requested agent switch")
    );
    assert!(
        matches!(&p[1], EventPayload::ToolCall { tool_name, requires_approval: false, .. } if tool_name == "switch_agent")
    );
    assert_eq!(p[2], switched("coder", "architect", "design question"));
    assert!(matches!(&p[3], EventPayload::ToolResult { error: None, .. }));
    assert_eq!(p[p.len() - 2], complete("Design follows"));
    assert_eq!(
        h.llm.requests()[1].messages[0].content,
        h.rt.agent_registry().get("architect").unwrap().system_prompt
    );
    assert_eq!(h.rt.current_agent(&s).await.unwrap().switch_count, 2);
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn switch_limit_ends_the_turn_with_agent_switch_limit() {
    let config = RuntimeConfig {
        max_agent_switches: 1,
        ..RuntimeConfig::default()
    };
    let h = harness_with(
        vec![
            route("coder"),
            Script::tool_call("switch_agent", json!({"agent_type": "ask"})),
        ],
        config,
    )
    .await;
    let s = h.session().await;
    let events = h.say(&s, "write code").await;
    let p = payloads(&events);
    assert!(
        matches!(&p[p.len() - 2], EventPayload::Error { code, .. } if code == "AGENT_SWITCH_LIMIT"),
        "{p:?}"
    );
    assert_eq!(stop(&events), StopReason::Error);
    // The refused switch is not recorded; the history stays valid.
    let current = h.rt.current_agent(&s).await.unwrap();
    assert_eq!(
        (current.current_agent.agent_type.as_str(), current.switch_count),
        ("coder", 1)
    );
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn several_tool_calls_in_one_response_each_get_their_result() {
    let config = RuntimeConfig {
        hitl_enabled: false,
        ..RuntimeConfig::default()
    };
    let h = harness_with(
        vec![
            Script::tool_call("read_file", json!({"path": "a.txt"})).and_tool_call("list_files", json!({})),
            Script::text("read both"),
        ],
        config,
    )
    .await;
    std::fs::write(h.project.path().join("a.txt"), "alpha\n").unwrap();
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "look around").await;
    let results = tool_results(&events);
    assert_eq!(results.len(), 2, "{events:?}");
    assert!(
        results[0].1.as_ref().unwrap().to_string().contains("alpha"),
        "{results:?}"
    );
    assert!(
        results[1].1.as_ref().unwrap().to_string().contains("a.txt"),
        "{results:?}"
    );
    assert_eq!(stop(&events), StopReason::Completed);
    // The second model call saw both results.
    let second = &h.llm.requests()[1];
    let tool_msgs = second
        .messages
        .iter()
        .filter(|m| m.tool_call_id.is_some())
        .count();
    assert_eq!(tool_msgs, 2);
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn tools_outside_an_agents_limits_are_refused_before_approval() {
    let cases = [
        (
            "architect",
            Script::tool_call("write_file", json!({"path": "src/main.rs", "content": "x"})),
        ),
        (
            "debug",
            Script::tool_call("write_file", json!({"path": "notes.md", "content": "x"})),
        ),
        (
            "ask",
            Script::tool_call("execute_command", json!({"command": "ls"})),
        ),
        (
            "coder",
            Script::tool_call("read_file", json!({"path": "../outside.txt"})),
        ),
        (
            "coder",
            Script::tool_call("read_file", json!({"path": "/etc/passwd"})),
        ),
        ("coder", Script::tool_call("no_such_tool", json!({}))),
        ("coder", Script::raw_tool_call("read_file", "{\"path\": ")),
        ("coder", Script::tool_call("read_file", json!({"path": 7}))),
    ];
    for (agent, script) in cases {
        let h = harness(vec![script, Script::text("understood")]).await;
        let s = h.session().await;
        let events = h.say_to(&s, agent, "try it").await;
        let results = tool_results(&events);
        assert_eq!(results.len(), 1, "{agent}: {events:?}");
        assert_eq!(
            results[0].2.as_ref().map(|e| e.code.as_str()),
            Some("INVALID_TOOL"),
            "{agent}: {results:?}"
        );
        assert!(h.rt.pending_approvals(&s).await.unwrap().is_empty());
        assert_eq!(stop(&events), StopReason::Completed, "{agent}");
        assert!(!h.project.path().join("src/main.rs").exists());
        assert_history_valid(h.rt.storage(), &s).await;
    }
}

#[tokio::test]
async fn malformed_arguments_are_stored_as_raw_text_and_sent_back_as_an_empty_object() {
    let h = harness(vec![
        Script::raw_tool_call("read_file", "{oops"),
        Script::text("retrying"),
    ])
    .await;
    let s = h.session().await;
    h.say_to(&s, "coder", "read").await;
    let msgs = h.rt.messages(&s, 0, 100).await.unwrap();
    let call = &msgs.iter().find(|m| !m.tool_calls.is_empty()).unwrap().tool_calls[0];
    assert_eq!(call.arguments, json!("{oops"));
    let second = &h.llm.requests()[1];
    let sent = second.messages.iter().find(|m| !m.tool_calls.is_empty()).unwrap();
    assert_eq!(sent.tool_calls[0].arguments, "{}");
    assert_eq!(sent.content, "");
}

#[tokio::test]
async fn a_model_stream_cut_midway_is_an_llm_error_event() {
    let h = harness(vec![
        Script::text("one two three four").fail_after(2, Error::Llm("connection reset".into())),
    ])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "ask", "hi").await;
    let p = payloads(&events);
    assert!(
        matches!(&p[p.len() - 2], EventPayload::Error { code, .. } if code == "LLM_ERROR"),
        "{p:?}"
    );
    assert_eq!(stop(&events), StopReason::Error);
    assert_eq!(h.rt.get_session(&s).await.unwrap().status, SessionStatus::Idle);
}

#[tokio::test]
async fn approve_executes_the_call_and_the_turn_continues() {
    let h = harness(vec![
        Script::tool_call(
            "write_file",
            json!({"path": "src/lib.rs", "content": "pub fn a() {}\n"}),
        ),
        Script::text("Written"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "write it").await;
    assert_eq!(stop(&events), StopReason::AwaitingApproval);
    let ids = call_ids(&events);
    let pending = h.rt.pending_approvals(&s).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].call_id.as_str(), pending[0].reason.as_str()),
        (ids[0].as_str(), "File modification requires approval")
    );
    assert_eq!(
        h.rt.get_session(&s).await.unwrap().status,
        SessionStatus::AwaitingApproval
    );
    assert!(!h.project.path().join("src/lib.rs").exists());

    let events = h.decide(&s, &ids[0], "approve", None, None).await;
    let p = payloads(&events);
    assert_eq!(
        p[0],
        EventPayload::ApprovalResolved {
            call_id: ids[0].clone(),
            decision: "approve".into()
        }
    );
    assert!(
        matches!(&p[1], EventPayload::ToolResult { error: None, .. }),
        "{p:?}"
    );
    assert_eq!(p[p.len() - 2], complete("Written"));
    assert_eq!(
        std::fs::read_to_string(h.project.path().join("src/lib.rs")).unwrap(),
        "pub fn a() {}\n"
    );
    let a = h.rt.storage().get_approval(&s, &ids[0]).await.unwrap();
    assert_eq!(a.status, ApprovalStatus::Approved);

    let again =
        h.rt.submit(&s, Submission::new(hitl(&ids[0], "approve")))
            .await
            .unwrap_err();
    assert_eq!(again.code(), "APPROVAL_ALREADY_DECIDED");
    let unknown =
        h.rt.submit(&s, Submission::new(hitl("call_nope", "approve")))
            .await
            .unwrap_err();
    assert_eq!(unknown.code(), "APPROVAL_NOT_FOUND");
    assert_history_valid(h.rt.storage(), &s).await;
}

/// Models reuse call ids (the scripted one answers `call_0` every time). A call that needs an
/// approval gets a fresh id when an earlier approval holds the model's one, even once that earlier
/// call has left the context window; both approvals stay listed and decidable.
#[tokio::test]
async fn a_reused_call_id_never_collides_with_an_earlier_approval() {
    let config = RuntimeConfig {
        max_context_messages: 2,
        ..RuntimeConfig::default()
    };
    let write = |path: &str| Script::tool_call("write_file", json!({"path": path, "content": "x"}));
    let h = harness_with(
        vec![
            write("a.txt"),
            Script::text("A done"),
            write("b.txt"),
            Script::text("B done"),
        ],
        config,
    )
    .await;
    let s = h.session().await;
    let first = call_ids(&h.say_to(&s, "coder", "write a").await);
    assert_eq!(first, ["call_0"]);
    h.decide(&s, "call_0", "approve", None, None).await;
    // The window (2 messages) no longer holds the first call: only the approvals table does.
    let second = call_ids(&h.say_to(&s, "coder", "write b").await);
    assert_eq!(second.len(), 1);
    assert_ne!(
        second[0], "call_0",
        "the second approval must not reuse the first one's id"
    );
    assert!(second[0].starts_with("call_"), "{second:?}");
    let pending = h.rt.pending_approvals(&s).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].call_id, second[0]);
    let events = h.decide(&s, &second[0], "approve", None, None).await;
    assert_eq!(stop(&events), StopReason::Completed);
    assert!(h.project.path().join("b.txt").exists());
    let first_approval = h.rt.storage().get_approval(&s, "call_0").await.unwrap();
    assert_eq!(first_approval.status, ApprovalStatus::Approved);
    assert_history_valid(h.rt.storage(), &s).await;
}

/// A model that names every call `call_0` in a session longer than the window (50 messages): the
/// first call keeps the id, every later one gets a fresh id, so ids stay unique in the session
/// after the first call has left the window (API.md: unique per session).
#[tokio::test]
async fn a_call_id_the_model_repeats_stays_unique_in_a_session_longer_than_the_window() {
    const TURNS: usize = 15; // four messages each: 60 in all
    let mut scripts = vec![];
    for _ in 0..TURNS {
        scripts.push(Script::tool_call("read_file", json!({"path": "a.txt"})));
        scripts.push(Script::text("read"));
    }
    let h = harness(scripts).await;
    assert_eq!(h.rt.config().max_context_messages, 50);
    std::fs::write(h.project.path().join("a.txt"), "alpha").unwrap();
    let s = h.session().await;
    let mut ids = vec![];
    for i in 0..TURNS {
        let events = h.say_to(&s, "coder", &format!("read it again ({i})")).await;
        assert_eq!(stop(&events), StopReason::Completed);
        ids.extend(call_ids(&events));
    }
    assert_eq!(h.rt.messages(&s, 0, 1000).await.unwrap().len(), 4 * TURNS);
    assert_eq!(ids.len(), TURNS);
    assert_eq!(ids[0], "call_0");
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), TURNS, "every call id once in the session: {ids:?}");
    assert!(
        ids[1..].iter().all(|id| id.len() == "call_".len() + 32),
        "{ids:?}"
    );
    assert_history_valid(h.rt.storage(), &s).await;
}

fn hitl(call_id: &str, decision: &str) -> ClientMessage {
    ClientMessage::HitlDecision(HitlDecision {
        call_id: call_id.into(),
        decision: Decision::parse(decision, None, None).unwrap(),
    })
}

#[tokio::test]
async fn edit_runs_the_modified_arguments_and_can_never_escalate() {
    let h = harness(vec![
        Script::tool_call("write_file", json!({"path": "docs/a.md", "content": "draft"})),
        Script::text("ok"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "architect", "write the design").await;
    let id = call_ids(&events)[0].clone();
    // An edit to a .rs path is outside the architect's rule: refused, approval stays pending.
    let err =
        h.rt.submit(
            &s,
            Submission::new(ClientMessage::HitlDecision(HitlDecision {
                call_id: id.clone(),
                decision: Decision::Edit {
                    arguments: json!({"path": "src/evil.rs", "content": "x"}),
                },
            })),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "INVALID_TOOL");
    let escape =
        h.rt.submit(
            &s,
            Submission::new(ClientMessage::HitlDecision(HitlDecision {
                call_id: id.clone(),
                decision: Decision::Edit {
                    arguments: json!({"path": "../../escape.md", "content": "x"}),
                },
            })),
        )
        .await
        .unwrap_err();
    assert_eq!(escape.code(), "INVALID_TOOL");
    assert_eq!(h.rt.pending_approvals(&s).await.unwrap().len(), 1);

    let events = h
        .decide(
            &s,
            &id,
            "edit",
            Some(json!({"path": "docs/a.md", "content": "final"})),
            Some("shorter"),
        )
        .await;
    assert_eq!(stop(&events), StopReason::Completed);
    assert_eq!(
        std::fs::read_to_string(h.project.path().join("docs/a.md")).unwrap(),
        "final"
    );
    let a = h.rt.storage().get_approval(&s, &id).await.unwrap();
    assert_eq!(
        (a.status, a.modified_arguments),
        (
            ApprovalStatus::Edited,
            Some(json!({"path": "docs/a.md", "content": "final"}))
        )
    );
}

#[tokio::test]
async fn reject_tells_the_model_with_the_feedback() {
    let h = harness(vec![
        Script::tool_call("execute_command", json!({"command": "rm -rf build"})),
        Script::text("Fine"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "clean").await;
    let id = call_ids(&events)[0].clone();
    let events = h
        .decide(&s, &id, "reject", None, Some("keep the build dir"))
        .await;
    let results = tool_results(&events);
    assert_eq!(
        results[0].2.as_ref().unwrap().message,
        "the user rejected this call: keep the build dir"
    );
    let second = &h.llm.requests()[1];
    let told = second
        .messages
        .iter()
        .find(|m| m.tool_call_id.as_deref() == Some(id.as_str()))
        .unwrap();
    assert!(told.content.contains("keep the build dir"), "{told:?}");
    assert_eq!(stop(&events), StopReason::Completed);
}

#[tokio::test]
async fn several_approvals_resume_the_turn_after_the_last_decision() {
    let h = harness(vec![
        Script::tool_call("write_file", json!({"path": "a.txt", "content": "A"}))
            .and_tool_call("write_file", json!({"path": "b.txt", "content": "B"})),
        Script::text("both handled"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "write two").await;
    let ids = call_ids(&events);
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    let first = h.decide(&s, &ids[0], "approve", None, None).await;
    assert_eq!(
        payloads(&first),
        vec![
            EventPayload::ApprovalResolved {
                call_id: ids[0].clone(),
                decision: "approve".into()
            },
            EventPayload::Done {
                stop_reason: StopReason::AwaitingApproval,
                usage: payload_usage(&first)
            },
        ]
    );
    assert!(!h.project.path().join("a.txt").exists());
    let last = h.decide(&s, &ids[1], "reject", None, None).await;
    assert_eq!(stop(&last), StopReason::Completed);
    assert_eq!(
        std::fs::read_to_string(h.project.path().join("a.txt")).unwrap(),
        "A"
    );
    assert!(!h.project.path().join("b.txt").exists());
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn a_pending_approval_survives_a_restart_on_the_same_sqlite_file() {
    let h = harness(vec![Script::tool_call(
        "write_file",
        json!({"path": "r.txt", "content": "after restart"}),
    )])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "write").await;
    let id = call_ids(&events)[0].clone();
    drop(h.rt);

    let store = storage::open(&h.db_url).await.unwrap();
    let llm = Arc::new(ScriptedBackend::new(vec![Script::text("done after restart")]));
    let rt = Orchestrator::builder(store, llm).build().unwrap();
    assert_eq!(rt.recover_interrupted().await.unwrap(), 0);
    let pending = rt.pending_approvals(&s).await.unwrap();
    assert_eq!(
        pending.iter().map(|a| a.call_id.clone()).collect::<Vec<_>>(),
        vec![id.clone()]
    );
    let events = collect(
        rt.submit(&s, Submission::new(hitl(&id, "approve")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(stop(&events), StopReason::Completed);
    assert_eq!(
        std::fs::read_to_string(h.project.path().join("r.txt")).unwrap(),
        "after restart"
    );
    assert_history_valid(rt.storage(), &s).await;
}

#[tokio::test]
async fn client_execution_pauses_for_the_clients_tool_result() {
    let h = harness(vec![
        Script::tool_call("read_file", json!({"path": "lib/main.dart"})),
        Script::text("I see it"),
    ])
    .await;
    let s = h.session_with(json!({"tool_execution": "client"})).await;
    let events = h.say_to(&s, "coder", "read main").await;
    assert_eq!(stop(&events), StopReason::AwaitingToolResult);
    let id = call_ids(&events)[0].clone();
    let missing =
        h.rt.submit(
            &s,
            Submission::new(ClientMessage::ToolResult {
                call_id: "nope".into(),
                result: None,
                error: None,
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(missing.code(), "TOOL_CALL_NOT_FOUND");
    let events = h
        .send(
            &s,
            ClientMessage::ToolResult {
                call_id: id.clone(),
                result: Some(json!("void main() {}")),
                error: None,
            },
        )
        .await;
    assert_eq!(stop(&events), StopReason::Completed);
    let second = &h.llm.requests()[1];
    assert_eq!(
        second
            .messages
            .iter()
            .find(|m| m.tool_call_id.as_deref() == Some(id.as_str()))
            .unwrap()
            .content,
        "void main() {}"
    );
}

#[tokio::test]
async fn client_mode_tool_result_for_a_pending_call_counts_as_its_approval() {
    let config = RuntimeConfig {
        tool_execution: ToolExecution::Client,
        ..RuntimeConfig::default()
    };
    let h = harness_with(
        vec![
            Script::tool_call("write_file", json!({"path": "x.md", "content": "x"})),
            Script::text("ok"),
        ],
        config,
    )
    .await;
    let s = h.session_with(json!({})).await;
    let events = h.say_to(&s, "coder", "write").await;
    assert_eq!(stop(&events), StopReason::AwaitingApproval);
    let id = call_ids(&events)[0].clone();
    let events = h
        .send(
            &s,
            ClientMessage::ToolResult {
                call_id: id.clone(),
                result: Some(json!("written")),
                error: None,
            },
        )
        .await;
    assert_eq!(
        events[0].payload,
        EventPayload::ApprovalResolved {
            call_id: id.clone(),
            decision: "approve".into()
        }
    );
    assert_eq!(
        h.rt.storage().get_approval(&s, &id).await.unwrap().status,
        ApprovalStatus::Approved
    );
}

#[tokio::test]
async fn a_new_message_cancels_pending_approvals() {
    let h = harness(vec![
        Script::tool_call("delete_file", json!({"path": "a.txt"})),
        Script::text("ok then"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "delete").await;
    let id = call_ids(&events)[0].clone();
    let events = h.say(&s, "never mind").await;
    assert_eq!(stop(&events), StopReason::Completed);
    let a = h.rt.storage().get_approval(&s, &id).await.unwrap();
    assert_eq!(a.status, ApprovalStatus::Cancelled);
    let msgs = h.rt.messages(&s, 0, 100).await.unwrap();
    let result = msgs
        .iter()
        .find(|m| m.tool_call_id.as_deref() == Some(id.as_str()))
        .unwrap();
    assert_eq!(
        result.content,
        "CANCELLED: cancelled: the user sent a new message"
    );
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn a_second_message_during_a_turn_is_session_busy() {
    let h = harness(vec![
        Script::text("slow answer with many words in it").delay_per_chunk(Duration::from_millis(100)),
    ])
    .await;
    let s = h.session().await;
    let stream =
        h.rt.submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "a".into(),
                agent_type: Some("ask".into()),
            }),
        )
        .await
        .unwrap();
    let err = h.rt.submit(&s, Submission::user("b")).await.unwrap_err();
    assert_eq!(err.code(), "SESSION_BUSY");
    assert_eq!(stop(&collect(stream).await), StopReason::Completed);
}

#[tokio::test]
async fn cancel_mid_stream_ends_with_done_cancelled() {
    let h = harness(vec![
        Script::text("a b c d e f g h i j k l m n o p").delay_per_chunk(Duration::from_millis(50)),
    ])
    .await;
    let s = h.session().await;
    let stream =
        h.rt.submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "go".into(),
                agent_type: Some("ask".into()),
            }),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(h.rt.cancel(&s).await.unwrap(), CancelOutcome::Cancelled);
    let events = collect(stream).await;
    assert_eq!(stop(&events), StopReason::Cancelled);
    assert_eq!(h.rt.cancel(&s).await.unwrap(), CancelOutcome::Idle);
    assert_eq!(h.rt.get_session(&s).await.unwrap().status, SessionStatus::Idle);
}

#[tokio::test]
async fn cancel_mid_command_kills_it_and_gives_the_call_a_result() {
    let config = RuntimeConfig {
        hitl_enabled: false,
        ..RuntimeConfig::default()
    };
    let h = harness_with(
        vec![Script::tool_call(
            "execute_command",
            json!({"command": "sleep 30"}),
        )],
        config,
    )
    .await;
    let s = h.session().await;
    let stream =
        h.rt.submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "run".into(),
                agent_type: Some("coder".into()),
            }),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    assert_eq!(h.rt.cancel(&s).await.unwrap(), CancelOutcome::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(10));
    let events = collect(stream).await;
    assert_eq!(stop(&events), StopReason::Cancelled);
    assert_eq!(tool_results(&events).len(), 1);
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn the_same_request_id_replays_the_turn_instead_of_running_another() {
    let h = harness(vec![Script::text("only once")]).await;
    let s = h.session().await;
    let sub = || Submission {
        request_id: Some("req-1".into()),
        message: ClientMessage::UserMessage {
            content: "hi".into(),
            agent_type: Some("ask".into()),
        },
    };
    let first = collect(h.rt.submit(&s, sub()).await.unwrap()).await;
    let second = collect(h.rt.submit(&s, sub()).await.unwrap()).await;
    assert_eq!(first, second);
    assert_eq!(h.llm.requests().len(), 1);
    let users =
        h.rt.messages(&s, 0, 100)
            .await
            .unwrap()
            .iter()
            .filter(|m| m.role == Role::User)
            .count();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn max_iterations_bounds_the_model_calls_of_a_turn() {
    let config = RuntimeConfig {
        max_turn_iterations: 2,
        hitl_enabled: false,
        ..RuntimeConfig::default()
    };
    let h = harness_with(
        vec![
            Script::tool_call("list_files", json!({})),
            Script::tool_call("list_files", json!({"path": "."})),
            Script::text("never"),
        ],
        config,
    )
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "loop").await;
    assert_eq!(stop(&events), StopReason::MaxIterations);
    assert_eq!(h.llm.requests().len(), 2);
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn a_message_too_large_for_the_window_is_refused_before_the_stream() {
    let config = RuntimeConfig {
        max_context_tokens: 300,
        ..RuntimeConfig::default()
    };
    let h = harness_with(vec![], config).await;
    let s = h.session().await;
    let err =
        h.rt.submit(&s, Submission::user("word ".repeat(2000)))
            .await
            .unwrap_err();
    assert_eq!(err.code(), "CONTEXT_TOO_LARGE");
    assert_eq!(h.rt.messages(&s, 0, 10).await.unwrap(), vec![]);
}

#[tokio::test]
async fn explicit_switch_without_content_streams_the_switch_and_done() {
    let h = harness(vec![]).await;
    let s = h.session().await;
    let events = h
        .send(
            &s,
            ClientMessage::SwitchAgent {
                agent_type: "debug".into(),
                content: None,
                reason: None,
            },
        )
        .await;
    assert_eq!(
        payloads(&events),
        vec![
            switched("orchestrator", "debug", "User requested agent switch"),
            EventPayload::Done {
                stop_reason: StopReason::Completed,
                usage: Default::default()
            },
        ]
    );
    let bad =
        h.rt.submit(
            &s,
            Submission::new(ClientMessage::SwitchAgent {
                agent_type: "pirate".into(),
                content: None,
                reason: None,
            }),
        )
        .await;
    assert_eq!(bad.unwrap_err().code(), "INVALID_REQUEST");
}

#[tokio::test]
async fn replay_after_a_seq_gives_exactly_the_missing_events() {
    let h = harness(vec![Script::text("one two three")]).await;
    let s = h.session().await;
    let all = h.say_to(&s, "ask", "count").await;
    let mid = all[2].seq;
    let replay: Vec<Event> =
        h.rt.events(&s, mid, Follow::UntilIdle)
            .await
            .unwrap()
            .collect()
            .await;
    assert_eq!(replay, all[3..].to_vec());
}

/// A session longer than one replay page (512 events), with a `done` in every page: a replay
/// from the start gives every event, not the first page up to the `done` it passes.
#[tokio::test]
async fn replay_of_a_long_session_passes_earlier_turns_done_and_gives_every_event() {
    let long = |turn: usize| {
        let words: Vec<String> = (0..300).map(|i| format!("t{turn}w{i}")).collect();
        Script::text(words.join(" "))
    };
    let h = harness((0..3).map(long).collect()).await;
    let s = h.session().await;
    let mut all = h.say_to(&s, "ask", "first").await;
    all.extend(h.say(&s, "second").await);
    all.extend(h.say(&s, "third").await);
    assert!(all.len() > 900, "{} events", all.len());
    let replay: Vec<Event> =
        h.rt.events(&s, 0, Follow::UntilIdle)
            .await
            .unwrap()
            .collect()
            .await;
    assert_eq!(replay, all);
}

#[tokio::test]
async fn with_turn_recovery_interrupt_recover_interrupted_closes_a_turn_left_running_by_a_crash() {
    let config = RuntimeConfig {
        turn_recovery: agent_runtime_core::config::TurnRecovery::Interrupt,
        ..RuntimeConfig::default()
    };
    let h = harness_with(
        vec![
            Script::tool_call("list_files", json!({})).delay_per_chunk(Duration::from_millis(20)),
            Script::text("x"),
        ],
        config,
    )
    .await;
    let s = h.session().await;
    // Simulate a crash: the store says running with an open call, and nobody holds the lease.
    use agent_runtime_core::session::{NewMessage, ToolCall};
    use agent_runtime_core::storage::{Commit, SessionUpdate};
    let call = ToolCall {
        id: "call_x".into(),
        name: "list_files".into(),
        arguments: json!({}),
    };
    h.rt.storage()
        .commit(
            &s,
            Commit {
                messages: vec![
                    NewMessage::user("hi", None),
                    NewMessage::assistant("", Some("coder".into()), vec![call]),
                ],
                session: SessionUpdate {
                    status: Some(SessionStatus::Running),
                    turn_state: Some(Some(TurnStateJson::from_value(&json!({"turn_id": "t",
                        "iterations": 1, "auto_switches": 0,
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0},
                        "open_calls": []})))),
                    ..SessionUpdate::default()
                },
                ..Commit::now()
            },
        )
        .await
        .unwrap();
    assert_eq!(h.rt.recover_interrupted().await.unwrap(), 1);
    let session = h.rt.get_session(&s).await.unwrap();
    assert_eq!((session.status, session.turn_state), (SessionStatus::Idle, None));
    assert_history_valid(h.rt.storage(), &s).await;
    let events = h.rt.storage().events_after(&s, 0, 100).await.unwrap();
    let p = payloads(&events);
    assert!(
        matches!(&p[0], EventPayload::ToolResult { call_id, error: Some(e), .. }
        if call_id == "call_x" && e.message == "interrupted: the runtime stopped while this call was open"),
        "{p:?}"
    );
    assert!(matches!(&p[1], EventPayload::Error { code, .. } if code == "INTERNAL"));
    assert_eq!(stop(&events), StopReason::Error);
    // The session takes a new message.
    assert_eq!(stop(&h.say_to(&s, "ask", "again").await), StopReason::Completed);
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_pending_approval_survives_a_restart_on_the_same_postgres_database() {
    use agent_runtime_core::storage::pg_testing;
    let guard = pg_testing::fresh_schema().await;
    let project = tempfile::tempdir().unwrap();
    let store = pg_testing::guarded(&guard).await;
    let llm = Arc::new(ScriptedBackend::new(vec![Script::tool_call(
        "write_file",
        json!({"path": "pg.txt", "content": "from postgres"}),
    )]));
    let rt = Orchestrator::builder(store, llm).build().unwrap();
    let s = rt
        .create_session(CreateSession {
            metadata: Some(json!({"project_path": project.path().to_str().unwrap()})),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let events = collect(
        rt.submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "write".into(),
                agent_type: Some("coder".into()),
            }),
        )
        .await
        .unwrap(),
    )
    .await;
    let id = call_ids(&events)[0].clone();
    drop(rt);

    // A new runtime (a new pool: as after a process restart) over the same database.
    let store = pg_testing::guarded(&guard).await;
    let llm = Arc::new(ScriptedBackend::new(vec![Script::text("continued")]));
    let rt = Orchestrator::builder(store, llm).build().unwrap();
    assert_eq!(rt.pending_approvals(&s).await.unwrap().len(), 1);
    let events = collect(
        rt.submit(&s, Submission::new(hitl(&id, "approve")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        payloads(&events)[payloads(&events).len() - 2],
        complete("continued")
    );
    assert_eq!(
        std::fs::read_to_string(project.path().join("pg.txt")).unwrap(),
        "from postgres"
    );
    assert_history_valid(rt.storage(), &s).await;
}

#[tokio::test]
async fn the_event_bus_tells_the_exact_story_of_a_turn_with_one_approval() {
    use agent_runtime_core::events::{BusEventKind, BusFilter};
    let h = harness(vec![
        route("coder"),
        Script::tool_call("write_file", json!({"path": "w.txt", "content": "w"})),
        Script::text("done"),
    ])
    .await;
    let mut sub = h.rt.subscribe(BusFilter::default());
    let s = h.session().await;
    let events = h.say(&s, "write w").await;
    let id = call_ids(&events)[0].clone();
    h.decide(&s, &id, "approve", None, None).await;
    let mut kinds = vec![];
    while let Some(Ok(e)) = sub.try_recv() {
        assert_eq!(e.session_id, s);
        kinds.push(e.kind);
    }
    use BusEventKind::*;
    assert_eq!(
        kinds,
        vec![
            SessionCreated,
            TurnStarted,
            AgentSwitched,
            ApprovalRequested,
            TurnCompleted,
            ApprovalApproved,
            TurnStarted,
            ToolExecuted,
            TurnCompleted
        ]
    );
}

#[tokio::test]
async fn the_window_sent_to_the_model_is_the_newest_messages_of_a_100k_history() {
    use agent_runtime_core::session::NewMessage;
    use agent_runtime_core::storage::Commit;
    let store: Arc<dyn Storage> = Arc::new(agent_runtime_core::storage::memory::MemoryStorage::new());
    let llm = Arc::new(ScriptedBackend::new(vec![Script::text("still here")]));
    let config = RuntimeConfig {
        max_context_messages: 20,
        ..RuntimeConfig::default()
    };
    let rt = Orchestrator::builder(store.clone(), llm.clone())
        .config(config)
        .build()
        .unwrap();
    let s = rt.create_session(CreateSession::default()).await.unwrap().id;
    for chunk in 0..100 {
        let messages = (0..1000)
            .map(|i| {
                let n = chunk * 1000 + i;
                if n % 2 == 0 {
                    NewMessage::user(format!("question {n}"), None)
                } else {
                    NewMessage::assistant(format!("answer {n}"), None, vec![])
                }
            })
            .collect();
        store
            .commit(
                &s,
                Commit {
                    messages,
                    ..Commit::now()
                },
            )
            .await
            .unwrap();
    }
    let events = collect(
        rt.submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "and now?".into(),
                agent_type: Some("ask".into()),
            }),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(stop(&events), StopReason::Completed);
    let sent = &llm.requests()[0].messages;
    assert_eq!(sent.len(), 21, "the system prompt and the 20 newest messages");
    assert_eq!(sent[1].content, "answer 99981");
    assert_eq!(sent[20].content, "and now?");
    assert_eq!(rt.get_session(&s).await.unwrap().message_count, 100_002);
}

fn plan_script() -> Script {
    Script::tool_call(
        "propose_plan",
        json!({"goal": "Auth module", "subtasks": [
            {"description": "Design the auth flow", "agent": "architect"},
            {"description": "Implement it", "agent": "coder"}]}),
    )
}

fn plan_events(events: &[Event]) -> Vec<(String, Vec<String>)> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            EventPayload::PlanProposed(p) => Some((
                "proposed".to_string(),
                p.subtasks.iter().map(|s| s.status.clone()).collect(),
            )),
            EventPayload::PlanUpdated(p) => Some((
                "updated".to_string(),
                p.subtasks.iter().map(|s| s.status.clone()).collect(),
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn an_approved_plan_runs_its_subtasks_in_order_on_their_agents() {
    let h = harness(vec![
        route("plan"),
        plan_script(),
        Script::text("Design done"),
        Script::text("Code done"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say(&s, "Build a whole auth module").await;
    assert_eq!(stop(&events), StopReason::AwaitingApproval);
    assert_eq!(
        plan_events(&events),
        vec![("proposed".into(), vec!["pending".into(), "pending".into()])]
    );
    let pending = h.rt.pending_approvals(&s).await.unwrap();
    assert_eq!(pending.len(), 1);
    let plan_id = pending[0].call_id.clone();
    assert_eq!(
        pending[0].request_type,
        agent_runtime_core::approval::RequestType::Plan
    );
    assert_eq!(
        h.llm.requests()[1].tool_choice,
        ToolChoice::Function("propose_plan".into())
    );

    let events = h.decide(&s, &plan_id, "approve", None, None).await;
    assert_eq!(stop(&events), StopReason::Completed);
    let st = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
    assert_eq!(
        plan_events(&events),
        vec![
            ("updated".into(), st("in_progress", "pending")),
            ("updated".into(), st("completed", "pending")),
            ("updated".into(), st("completed", "in_progress")),
            ("updated".into(), st("completed", "completed")),
        ]
    );
    let switches: Vec<EventPayload> = payloads(&events)
        .into_iter()
        .filter(|p| matches!(p, EventPayload::AgentSwitched { .. }))
        .collect();
    assert_eq!(
        switches,
        vec![
            switched("orchestrator", "architect", "Plan step 1 of 2"),
            switched("architect", "coder", "Plan step 2 of 2")
        ]
    );
    let requests = h.llm.requests();
    assert_eq!(
        requests[2].messages[0].content,
        h.rt.agent_registry().get("architect").unwrap().system_prompt
    );
    assert_eq!(
        requests[2].messages.last().unwrap().content,
        "Plan step 1 of 2 (goal: Auth module): Design the auth flow"
    );
    assert_eq!(
        requests[3].messages[0].content,
        h.rt.agent_registry().get("coder").unwrap().system_prompt
    );
    let stored = h.rt.storage().get_plan(&s, &plan_id).await.unwrap().unwrap();
    assert!(stored.subtasks.iter().all(|t| t.status == "completed"));
}

#[tokio::test]
async fn an_edited_plan_runs_as_edited_and_a_rejected_one_is_answered_without() {
    let h = harness(vec![route("plan"), plan_script(), Script::text("Only the docs")]).await;
    let s = h.session().await;
    h.say(&s, "Build a whole auth module").await;
    let plan_id = h.rt.pending_approvals(&s).await.unwrap()[0].call_id.clone();
    let bad =
        h.rt.submit(
            &s,
            Submission::new(ClientMessage::HitlDecision(HitlDecision {
                call_id: plan_id.clone(),
                decision: Decision::Edit {
                    arguments: json!({"goal": "x", "subtasks": [{"description": "d", "agent": "pirate"}]}),
                },
            })),
        )
        .await
        .unwrap_err();
    assert_eq!(bad.code(), "INVALID_TOOL");
    let events = h
        .decide(&s, &plan_id, "edit", Some(json!({"goal": "Docs only", "subtasks": [{"description": "Write docs", "agent": "architect"}]})), None)
        .await;
    assert_eq!(plan_events(&events).len(), 2);
    assert_eq!(stop(&events), StopReason::Completed);

    let h = harness(vec![
        route("plan"),
        plan_script(),
        Script::text("Here is a direct answer"),
    ])
    .await;
    let s = h.session().await;
    h.say(&s, "Build a whole auth module").await;
    let plan_id = h.rt.pending_approvals(&s).await.unwrap()[0].call_id.clone();
    let events = h.decide(&s, &plan_id, "reject", None, Some("too big")).await;
    assert_eq!(plan_events(&events), vec![]);
    assert_eq!(
        payloads(&events)[payloads(&events).len() - 2],
        complete("Here is a direct answer")
    );
    assert_eq!(
        h.rt.current_agent(&s).await.unwrap().current_agent.agent_type,
        "orchestrator"
    );
}

#[tokio::test]
async fn a_plan_awaiting_approval_resumes_after_a_restart_and_a_new_message_cancels_it() {
    let h = harness(vec![route("plan"), plan_script()]).await;
    let s = h.session().await;
    h.say(&s, "Build a whole auth module").await;
    let plan_id = h.rt.pending_approvals(&s).await.unwrap()[0].call_id.clone();
    drop(h.rt);
    let store = storage::open(&h.db_url).await.unwrap();
    let rt = Orchestrator::builder(
        store,
        Arc::new(ScriptedBackend::new(vec![Script::text("d1"), Script::text("d2")])),
    )
    .build()
    .unwrap();
    let events = collect(
        rt.submit(&s, Submission::new(hitl(&plan_id, "approve")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(stop(&events), StopReason::Completed);
    assert_eq!(plan_events(&events).len(), 4);

    let h = harness(vec![route("plan"), plan_script(), Script::text("ok")]).await;
    let s = h.session().await;
    h.say(&s, "Build a whole auth module").await;
    let plan_id = h.rt.pending_approvals(&s).await.unwrap()[0].call_id.clone();
    h.say_to(&s, "ask", "forget it").await;
    assert_eq!(
        h.rt.storage().get_approval(&s, &plan_id).await.unwrap().status,
        ApprovalStatus::Cancelled
    );
}

#[tokio::test]
async fn a_model_that_ignores_auto_tool_choice_is_led_by_forced_calls() {
    use agent_runtime_core::llm::Capabilities;
    let db = tempfile::tempdir().unwrap();
    let store = storage::open(&format!("sqlite://{}", db.path().join("w.db").display()))
        .await
        .unwrap();
    let llm = Arc::new(
        ScriptedBackend::new(vec![
            Script::tool_call("next_step", json!({"action": "read_file"})),
            Script::tool_call("read_file", json!({"path": "notes.txt"})),
            // LLM_FORCED_TOOL_STEPS (1) results gathered: the answer is asked for without tools.
            Script::text("The notes say hello"),
        ])
        .with_capabilities(Capabilities::llama_cpp_python()),
    );
    let config = RuntimeConfig {
        hitl_enabled: false,
        ..RuntimeConfig::default()
    };
    let rt = Orchestrator::builder(store, llm.clone())
        .config(config)
        .build()
        .unwrap();
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("notes.txt"), "hello\n").unwrap();
    let s = rt
        .create_session(CreateSession {
            metadata: Some(json!({"project_path": project.path().to_str().unwrap()})),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let events = collect(
        rt.submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "read notes".into(),
                agent_type: Some("ask".into()),
            }),
        )
        .await
        .unwrap(),
    )
    .await;
    let results = tool_results(&events);
    assert_eq!(results.len(), 1);
    assert!(
        results[0].1.as_ref().unwrap().as_str().unwrap().contains("hello"),
        "{results:?}"
    );
    let p = payloads(&events);
    assert_eq!(p[p.len() - 2], complete("The notes say hello"));
    let choices: Vec<ToolChoice> = llm.requests().iter().map(|r| r.tool_choice.clone()).collect();
    assert_eq!(
        choices,
        vec![
            ToolChoice::Function("next_step".into()),
            ToolChoice::Function("read_file".into()),
            ToolChoice::Auto,
        ]
    );
    assert!(
        llm.requests()[2].tools.is_empty(),
        "the answer is streamed without tools"
    );
}

#[tokio::test]
async fn with_more_forced_tool_steps_the_model_chooses_when_to_answer() {
    use agent_runtime_core::llm::Capabilities;
    let llm = Arc::new(
        ScriptedBackend::new(vec![
            Script::tool_call("next_step", json!({"action": "list_files"})),
            Script::tool_call("list_files", json!({})),
            Script::tool_call("next_step", json!({"action": "answer"})),
            Script::text("Listed"),
        ])
        .with_capabilities(Capabilities::llama_cpp_python()),
    );
    let mut config = RuntimeConfig {
        hitl_enabled: false,
        ..RuntimeConfig::default()
    };
    config.llm.forced_tool_steps = 3;
    let store = storage::open("memory://").await.unwrap();
    let rt = Orchestrator::builder(store, llm.clone())
        .config(config)
        .build()
        .unwrap();
    let project = tempfile::tempdir().unwrap();
    let s = rt
        .create_session(CreateSession {
            metadata: Some(json!({"project_path": project.path().to_str().unwrap()})),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let events = collect(
        rt.submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "list".into(),
                agent_type: Some("ask".into()),
            }),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(stop(&events), StopReason::Completed);
    let choices: Vec<ToolChoice> = llm.requests().iter().map(|r| r.tool_choice.clone()).collect();
    assert_eq!(
        choices,
        vec![
            ToolChoice::Function("next_step".into()),
            ToolChoice::Function("list_files".into()),
            ToolChoice::Function("next_step".into()),
            ToolChoice::Auto,
        ]
    );
}

#[tokio::test]
async fn a_tool_call_written_as_json_text_is_recognised() {
    let config = RuntimeConfig {
        hitl_enabled: false,
        ..RuntimeConfig::default()
    };
    let h = harness_with(
        vec![
            Script::text(r#"{"name": "list_files", "arguments": {"path": "."}}"#),
            Script::text("Listed"),
        ],
        config,
    )
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "ask", "what is here").await;
    let results = tool_results(&events);
    assert_eq!(results.len(), 1, "{events:?}");
    assert_eq!(results[0].0, "list_files");
    assert_eq!(stop(&events), StopReason::Completed);
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn the_same_call_a_third_time_stops_the_turn_as_a_loop() {
    let config = RuntimeConfig {
        hitl_enabled: false,
        ..RuntimeConfig::default()
    };
    let same = || Script::tool_call("list_files", json!({"path": "."}));
    let h = harness_with(vec![same(), same(), same(), Script::text("never")], config).await;
    let s = h.session().await;
    let events = h.say_to(&s, "ask", "list").await;
    let p = payloads(&events);
    assert!(
        matches!(&p[p.len() - 2], EventPayload::Error { code, message } if code == "INVALID_TOOL" && message.starts_with("loop detected")),
        "{p:?}"
    );
    assert_eq!(tool_results(&events).len(), 3);
    assert_eq!(h.llm.requests().len(), 3);
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn agents_handing_a_turn_back_and_forth_are_stopped() {
    let to = |a: &str| Script::tool_call("switch_agent", json!({"agent_type": a}));
    let h = harness(vec![
        to("ask"),
        to("coder"),
        to("ask"),
        to("coder"),
        Script::text("never"),
    ])
    .await;
    let s = h.session().await;
    let events = h.say_to(&s, "coder", "who answers?").await;
    let p = payloads(&events);
    assert!(
        matches!(&p[p.len() - 2], EventPayload::Error { code, message } if code == "AGENT_SWITCH_LIMIT" && message.starts_with("agent ping-pong")),
        "{p:?}"
    );
    assert_history_valid(h.rt.storage(), &s).await;
}

#[tokio::test]
async fn the_sessions_usage_includes_the_routing_call_and_matches_done() {
    use agent_runtime_core::session::Usage;
    let usage = |p, c| Usage {
        prompt_tokens: p,
        completion_tokens: c,
        ..Default::default()
    };
    let h = harness(vec![
        route("ask").usage(usage(100, 10)),
        Script::text("answer").usage(usage(200, 20)),
    ])
    .await;
    let s = h.session().await;
    let events = h.say(&s, "what is rust?").await;
    assert_eq!(payload_usage(&events), usage(300, 30).into());
    assert_eq!(h.rt.usage(&s).await.unwrap(), usage(300, 30));
}

/// Counts a token per byte and remembers every text it was asked to count.
#[derive(Debug, Default)]
struct RecordingTokenizer {
    texts: std::sync::Mutex<Vec<String>>,
}

impl agent_runtime_core::context::Tokenizer for RecordingTokenizer {
    fn count(&self, text: &str) -> usize {
        self.texts.lock().unwrap().push(text.to_string());
        text.len()
    }
}

#[tokio::test]
async fn an_answer_without_reported_usage_counts_the_offered_tools_as_the_offer_did() {
    let db = tempfile::tempdir().unwrap();
    let store = storage::open(&format!("sqlite://{}", db.path().join("rt.db").display()))
        .await
        .unwrap();
    let tokenizer = Arc::new(RecordingTokenizer::default());
    let llm = Arc::new(ScriptedBackend::new(vec![Script::text("four")]));
    let rt = Orchestrator::builder(store, llm)
        .tokenizer(tokenizer.clone())
        .build()
        .unwrap();
    let schemas_counted = || {
        let texts = tokenizer.texts.lock().unwrap();
        texts.iter().filter(|t| t.contains("\"properties\"")).count()
    };
    let at_build = schemas_counted();
    let s = rt
        .create_session(CreateSession {
            user_id: None,
            metadata: None,
            session_id: None,
            budget: None,
        })
        .await
        .unwrap()
        .id;
    let events = collect(
        rt.submit(
            &s,
            Submission::new(ClientMessage::UserMessage {
                content: "hi".into(),
                agent_type: Some("ask".into()),
            }),
        )
        .await
        .unwrap(),
    )
    .await;
    let usage = payload_usage(&events);
    assert!(
        at_build > 0,
        "the offers count the schemas when the runtime is built"
    );
    assert_eq!(
        (schemas_counted(), usage.tokens.completion_tokens),
        (at_build, 4),
        "the prompt and the answer were counted without writing a schema out again"
    );
    assert!(usage.tokens.prompt_tokens > 0);
}

/// A runtime over a real local HTTP model server (the OpenAI backend, short timeouts).
async fn over_http(llm: &MockLlmServer, first_byte: Duration, config: RuntimeConfig) -> Harness {
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", db.path().join("rt.db").display());
    let store = storage::open(&db_url).await.unwrap();
    let backend = OpenAiBackend::new(OpenAiConfig {
        base_url: llm.url(),
        model: "mock-model".into(),
        first_byte_timeout: first_byte,
        max_retries: 0,
        breaker_threshold: 0,
        ..OpenAiConfig::default()
    })
    .unwrap();
    let rt = Orchestrator::builder(store, Arc::new(backend))
        .config(config)
        .discover_model_context()
        .await
        .build()
        .unwrap();
    Harness {
        project: tempfile::tempdir().unwrap(),
        _db: db,
        db_url,
        llm: Arc::new(ScriptedBackend::new(vec![])),
        rt,
    }
}

/// `message` with the seconds before `unit` replaced by `N` (they depend on the machine's pace).
fn mask_seconds(message: &str, unit: &str) -> (String, f64) {
    let at = message.find(unit).unwrap();
    let start = message[..at].rfind(' ').unwrap() + 1;
    let seconds: f64 = message[start..at].parse().unwrap();
    (format!("{}N{}", &message[..start], &message[at..]), seconds)
}

#[tokio::test]
async fn a_router_that_never_answers_gives_way_to_keywords_at_the_routing_deadline_and_says_so() {
    let llm = MockLlmServer::start().await.unwrap();
    llm.push(MockResponse::hang());
    llm.push(MockResponse::script(&Script::text("Готово")));
    let h = over_http(
        &llm,
        Duration::from_secs(30),
        RuntimeConfig {
            routing_timeout: Duration::from_secs(1),
            ..RuntimeConfig::default()
        },
    )
    .await;
    let s = h.session().await;
    let started = std::time::Instant::now();
    let events = h.say(&s, "Создай новый виджет профиля").await;
    assert_eq!(
        payloads(&events),
        vec![
            switched(
                "orchestrator",
                "coder",
                "Keyword routing (router unreachable: no answer within 1 s): the request asks for code"
            ),
            token("Готово"),
            complete("Готово"),
            EventPayload::Done {
                stop_reason: StopReason::Completed,
                usage: payload_usage(&events)
            },
        ]
    );
    assert_eq!(llm.request_count(), 2, "the route call, then the coder's");
    // Generous: far below the 30 s first-byte limit the route call would otherwise have waited.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_model_server_that_never_answers_ends_the_turn_with_an_llm_error_stating_the_real_wait() {
    let llm = MockLlmServer::start().await.unwrap();
    llm.push(MockResponse::hang());
    llm.push(MockResponse::hang());
    let h = over_http(
        &llm,
        Duration::from_secs(2),
        RuntimeConfig {
            routing_timeout: Duration::from_secs(1),
            ..RuntimeConfig::default()
        },
    )
    .await;
    let s = h.session().await;
    let started = std::time::Instant::now();
    let events = h.say(&s, "Найди причину ошибки").await;
    let mut got = payloads(&events);
    let Some(EventPayload::Error { message, .. }) = got.get_mut(1) else {
        panic!("no error event second: {got:?}");
    };
    let (masked, seconds) = mask_seconds(message, " s in all");
    *message = masked;
    assert_eq!(
        got,
        vec![
            switched(
                "orchestrator",
                "debug",
                "Keyword routing (router unreachable: no answer within 1 s): the request is about an error"
            ),
            EventPayload::Error {
                code: "LLM_ERROR".into(),
                message: "the model server accepted the request but sent nothing within 2 s \
                          (LLM_FIRST_BYTE_TIMEOUT_SECS); the turn ran N s in all"
                    .into()
            },
            EventPayload::Done {
                stop_reason: StopReason::Error,
                usage: payload_usage(&events)
            },
        ]
    );
    // The wait it states is the routing deadline plus the first-byte limit, not more.
    assert!((3.0..15.0).contains(&seconds), "{seconds}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(h.rt.get_session(&s).await.unwrap().status, SessionStatus::Idle);
}

#[tokio::test]
async fn the_window_is_bounded_by_the_context_size_llama_cpp_states_at_start_up() {
    let llm = MockLlmServer::start().await.unwrap();
    llm.answer(
        "GET",
        "/props",
        MockResponse::status(
            200,
            r#"{"default_generation_settings":{"n_ctx":4096},"total_slots":1}"#,
        ),
    );
    let h = over_http(&llm, Duration::from_secs(5), RuntimeConfig::default()).await;
    assert_eq!(
        (h.rt.config().max_context_tokens, h.rt.model_context()),
        (
            3072,
            Some(&ModelContext::new(4096, "llama.cpp server's /props n_ctx"))
        )
    );
    // A smaller MAX_CONTEXT_TOKENS is kept; LLM_CONTEXT_TOKENS wins over what the server says.
    let small = over_http(
        &llm,
        Duration::from_secs(5),
        RuntimeConfig {
            max_context_tokens: 2000,
            ..RuntimeConfig::default()
        },
    )
    .await;
    assert_eq!(small.rt.config().max_context_tokens, 2000);
    let mut config = RuntimeConfig::default();
    config.llm.context_tokens = Some(2048);
    let set = over_http(&llm, Duration::from_secs(5), config).await;
    assert_eq!(
        (set.rt.config().max_context_tokens, set.rt.model_context()),
        (1536, Some(&ModelContext::new(2048, "LLM_CONTEXT_TOKENS")))
    );
}

/// llama-cpp-python's answer to a prompt longer than its context: 200, an empty event stream.
fn context_overflow() -> MockResponse {
    let captured = include_str!("fixtures/llm-wire/llama-cpp-python-context-overflow.response");
    let head = captured.replace("connection: keep-alive", "connection: close");
    MockResponse::raw(format!("{head}0\r\n\r\n"))
}

/// A session on the `ask` agent with three long exchanges already stored.
async fn long_session(h: &Harness, llm: &MockLlmServer) -> String {
    let s = h.session().await;
    for n in 0..3 {
        llm.push(MockResponse::script(&Script::text("noted")));
        let events = h
            .say_to(
                &s,
                "ask",
                &format!("{n}: {}", "an old paragraph about gardening. ".repeat(120)),
            )
            .await;
        assert_eq!(stop(&events), StopReason::Completed);
    }
    s
}

#[tokio::test]
async fn a_prompt_the_model_server_refuses_as_too_long_is_trimmed_and_sent_once_more() {
    let llm = MockLlmServer::start().await.unwrap();
    let h = over_http(&llm, Duration::from_secs(5), RuntimeConfig::default()).await;
    let s = long_session(&h, &llm).await;
    llm.push(context_overflow());
    llm.push(MockResponse::script(&Script::text("Короче")));
    let events = h.say(&s, "and now?").await;
    assert_eq!(
        payloads(&events),
        vec![
            token("Короче"),
            complete("Короче"),
            EventPayload::Done {
                stop_reason: StopReason::Completed,
                usage: payload_usage(&events)
            },
        ]
    );
    let requests = llm.requests();
    let refused = requests[3]["messages"].as_array().unwrap();
    // The refused prompt: the system prompt and all 7 messages. The retry fits half of that
    // window: the system prompt and the newest 4 (one long paragraph instead of three).
    assert_eq!(refused.len(), 8);
    let mut trimmed = vec![refused[0].clone()];
    trimmed.extend_from_slice(&refused[4..]);
    assert_eq!(requests[4]["messages"], json!(trimmed));
}

#[tokio::test]
async fn a_prompt_refused_twice_ends_the_turn_naming_the_models_context_size() {
    let llm = MockLlmServer::start().await.unwrap();
    let mut config = RuntimeConfig::default();
    config.llm.context_tokens = Some(4096);
    let h = over_http(&llm, Duration::from_secs(5), config).await;
    let s = long_session(&h, &llm).await;
    llm.push(context_overflow());
    llm.push(context_overflow());
    let events = h.say(&s, "and now?").await;
    let refused = llm.requests();
    let tokens_of_retry = {
        let tokenizer = agent_runtime_core::context::O200kTokenizer;
        use agent_runtime_core::context::Tokenizer;
        refused[4]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| tokenizer.count(m["content"].as_str().unwrap()) + 4)
            .sum::<usize>()
    };
    assert_eq!(
        payloads(&events),
        vec![
            EventPayload::Error {
                code: "CONTEXT_TOO_LARGE".into(),
                message: format!(
                    "the model server refused the prompt as longer than its context; it refused again \
                     with the window trimmed to {tokens_of_retry} tokens: {EMPTY_STREAM}. The model's \
                     context is 4096 tokens (LLM_CONTEXT_TOKENS); lower MAX_CONTEXT_TOKENS (now 3072) \
                     or serve the model with a larger context"
                )
            },
            EventPayload::Done {
                stop_reason: StopReason::Error,
                usage: payload_usage(&events)
            },
        ]
    );
    assert_eq!(
        llm.request_count(),
        5,
        "three answered, then one refusal and one retry"
    );
}
