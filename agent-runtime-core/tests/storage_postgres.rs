//! The Postgres backend against the real server (`TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), each test in its own fresh schema, dropped after.
//!
//! Under `CI=true` an unreachable server fails the tests; otherwise they are skipped with a notice.
#![cfg(feature = "postgres")]
// Test helpers outside #[test] fns: a failed expectation must panic here too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::approval::{Approval, ApprovalResolution, ApprovalStatus, RequestType};
use agent_runtime_core::protocol::{AssistantMessage, Event, EventPayload, Plan, Subtask};
use agent_runtime_core::session::{AgentSwitch, Message, NewMessage, NewSession, Role, ToolCall, Usage};
use agent_runtime_core::storage::pg_testing::{Guarded, database_url, fresh_schema, open_in};
use agent_runtime_core::storage::postgres::{PgOptions, PostgresStorage};
use agent_runtime_core::storage::{self, Commit, SessionQuery, SessionUpdate, Storage};
use agent_runtime_core::{Error, Session, SessionStatus, Timestamp};
use serde_json::json;

/// Two handles with separate pools (two "processes") on one fresh schema. The conformance cases
/// cannot be skipped, so an unreachable Postgres fails them, with the same clear message.
async fn open_pair() -> (Arc<dyn Storage>, Arc<dyn Storage>) {
    let Some(guard) = fresh_schema().await else {
        panic!(
            "Postgres at {} is unreachable; the conformance cases need it",
            storage::redact_url(&database_url())
        );
    };
    let a = open_in(&guard).await;
    let b = open_in(&guard).await;
    (
        Arc::new(Guarded {
            store: a,
            guard: guard.clone(),
        }),
        Arc::new(Guarded { store: b, guard }),
    )
}

agent_runtime_core::storage_conformance_suite!(open_pair);

/// One store in a fresh schema (or skip).
macro_rules! store_or_skip {
    () => {{
        let Some(guard) = fresh_schema().await else {
            return;
        };
        let store = open_in(&guard).await;
        (guard, store)
    }};
}

fn new_session(id: &str, user: Option<&str>, at: i64) -> NewSession {
    NewSession {
        id: id.to_string(),
        user_id: user.map(str::to_string),
        metadata: json!({"project_path": "/tmp/p", "nested": {"z": 1, "a": [1.5, null, "ü\u{0}"]}}),
        current_agent: "orchestrator".to_string(),
        created_at: Timestamp::from_millis(at),
    }
}

fn token(t: &str) -> EventPayload {
    EventPayload::AssistantMessage(AssistantMessage::Token { token: t.to_string() })
}

fn pending_approval(session_id: &str, call_id: &str, at: i64) -> Approval {
    Approval {
        call_id: call_id.to_string(),
        session_id: session_id.to_string(),
        tool_name: "write_file".to_string(),
        arguments: json!({"path": "a.md", "content": "x"}),
        reason: "File modification requires approval".to_string(),
        request_type: RequestType::Tool,
        status: ApprovalStatus::Pending,
        created_at: Timestamp::from_millis(at),
        decided_at: None,
        feedback: None,
        modified_arguments: None,
    }
}

fn at(ms: i64) -> Commit {
    Commit {
        at: Some(Timestamp::from_millis(ms)),
        ..Commit::default()
    }
}

#[tokio::test]
async fn created_session_comes_back_exactly_as_given() {
    let (_guard, store) = store_or_skip!();
    let new = new_session("s1", Some("u1"), 1_700_000_000_123);
    let created = store.create_session(new.clone()).await.unwrap();
    let expected = Session {
        id: "s1".into(),
        user_id: Some("u1".into()),
        metadata: new.metadata.clone(),
        created_at: new.created_at,
        last_activity: new.created_at,
        current_agent: "orchestrator".into(),
        status: SessionStatus::Idle,
        message_count: 0,
        last_message_seq: 0,
        last_event_seq: 0,
        usage: Usage::default(),
        turn_state: None,
    };
    assert_eq!(created, expected);
    assert_eq!(store.get_session("s1").await.unwrap(), expected);
    // Key order survives too (stored as text, not JSONB).
    assert_eq!(
        serde_json::to_string(&store.get_session("s1").await.unwrap().metadata).unwrap(),
        serde_json::to_string(&new.metadata).unwrap()
    );
    assert_eq!(store.backend(), "postgres");
    store.ping().await.unwrap();
}

#[tokio::test]
async fn creating_a_taken_id_is_session_exists_and_unknown_ids_are_not_found() {
    let (_guard, store) = store_or_skip!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    assert_eq!(
        store.create_session(new_session("s1", None, 2)).await,
        Err(Error::SessionExists("s1".into()))
    );
    assert_eq!(
        store.get_session("nope").await,
        Err(Error::SessionNotFound("nope".into()))
    );
    assert_eq!(
        store.delete_session("nope").await,
        Err(Error::SessionNotFound("nope".into()))
    );
    assert_eq!(
        store.commit("nope", Commit::now()).await.map(|_| ()),
        Err(Error::SessionNotFound("nope".into()))
    );
    assert_eq!(
        store.messages_after("nope", 0, 10).await,
        Err(Error::SessionNotFound("nope".into()))
    );
}

#[tokio::test]
async fn commits_get_gap_free_seqs_and_update_the_session() {
    let (_guard, store) = store_or_skip!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    let calls = vec![ToolCall {
        id: "c1".into(),
        name: "read_file".into(),
        arguments: json!({"path": "a"}),
    }];
    let first = store
        .commit(
            "s1",
            Commit {
                messages: vec![
                    NewMessage::user("hi", Some("orchestrator".into())),
                    NewMessage::assistant("", Some("coder".into()), calls.clone()),
                ],
                events: vec![token("a"), token("b")],
                usage: Some(Usage {
                    prompt_tokens: 10,
                    completion_tokens: 3,
                }),
                request_id: Some("req-1".into()),
                session: SessionUpdate {
                    status: Some(SessionStatus::Running),
                    current_agent: None,
                    turn_state: Some(Some(json!({"step": 1}))),
                },
                ..at(100)
            },
        )
        .await
        .unwrap();
    let hi = Message {
        seq: 1,
        role: Role::User,
        content: "hi".into(),
        agent: Some("orchestrator".into()),
        tool_calls: vec![],
        tool_call_id: None,
        created_at: Timestamp::from_millis(100),
    };
    let call = Message {
        seq: 2,
        role: Role::Assistant,
        content: String::new(),
        agent: Some("coder".into()),
        tool_calls: calls,
        tool_call_id: None,
        created_at: Timestamp::from_millis(100),
    };
    assert_eq!(first.messages, vec![hi.clone(), call.clone()]);
    assert_eq!(
        first.events,
        vec![
            Event {
                seq: 1,
                payload: token("a")
            },
            Event {
                seq: 2,
                payload: token("b")
            }
        ]
    );

    let second = store
        .commit(
            "s1",
            Commit {
                messages: vec![
                    NewMessage::tool("c1", "contents", Some("coder".into())),
                    NewMessage {
                        role: Role::System,
                        content: "note".into(),
                        agent: None,
                        tool_calls: vec![],
                        tool_call_id: None,
                    },
                ],
                events: vec![token("c")],
                usage: Some(Usage {
                    prompt_tokens: 1,
                    completion_tokens: 1,
                }),
                session: SessionUpdate {
                    status: Some(SessionStatus::Idle),
                    current_agent: Some("coder".into()),
                    turn_state: Some(None),
                },
                ..at(200)
            },
        )
        .await
        .unwrap();
    let expected = Session {
        id: "s1".into(),
        user_id: None,
        metadata: new_session("s1", None, 1).metadata,
        created_at: Timestamp::from_millis(1),
        last_activity: Timestamp::from_millis(200),
        current_agent: "coder".into(),
        status: SessionStatus::Idle,
        message_count: 3, // the system note is not counted
        last_message_seq: 4,
        last_event_seq: 3,
        usage: Usage {
            prompt_tokens: 11,
            completion_tokens: 4,
        },
        turn_state: None,
    };
    assert_eq!(second.session, expected);
    assert_eq!(store.get_session("s1").await.unwrap(), expected);
    assert_eq!(
        second.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 4]
    );

    let all = store.messages_after("s1", 0, 100).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[..2], [hi, call.clone()]);
    assert_eq!(store.messages_after("s1", 1, 1).await.unwrap(), vec![call]);
    assert_eq!(store.recent_messages("s1", 2).await.unwrap(), all[2..].to_vec());
    assert_eq!(
        store
            .events_after("s1", 1, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(store.find_request("s1", "req-1").await.unwrap(), Some(1));
    assert_eq!(store.find_request("s1", "req-2").await.unwrap(), None);
}

#[tokio::test]
async fn two_processes_appending_at_once_get_gap_free_strictly_increasing_seqs() {
    let Some(guard) = fresh_schema().await else {
        return;
    };
    let a: Arc<dyn Storage> = Arc::new(open_in(&guard).await);
    let b: Arc<dyn Storage> = Arc::new(open_in(&guard).await);
    a.create_session(new_session("s1", None, 1)).await.unwrap();
    let mut tasks = Vec::new();
    for (name, store) in [("a", a.clone()), ("b", b.clone())] {
        for i in 0..15 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let tag = format!("{name}{i}");
                store
                    .commit(
                        "s1",
                        Commit {
                            messages: vec![NewMessage::user(tag.clone(), None)],
                            events: vec![token(&format!("{tag}-1")), token(&format!("{tag}-2"))],
                            ..Commit::now()
                        },
                    )
                    .await
                    .unwrap()
            }));
        }
    }
    for t in tasks {
        let committed = t.await.unwrap();
        // A commit's own events are consecutive.
        assert_eq!(committed.events[1].seq, committed.events[0].seq + 1);
    }
    let events = b.events_after("s1", 0, 1000).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<u64>>()
    );
    let messages = a.messages_after("s1", 0, 1000).await.unwrap();
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<u64>>()
    );
    let session = a.get_session("s1").await.unwrap();
    assert_eq!(
        (
            session.message_count,
            session.last_message_seq,
            session.last_event_seq
        ),
        (30, 30, 60)
    );
}

#[tokio::test]
async fn a_resolution_is_compare_and_set_and_its_failure_rolls_back_the_commit() {
    let (_guard, store) = store_or_skip!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    store
        .commit(
            "s1",
            Commit {
                approvals: vec![pending_approval("s1", "c1", 10), pending_approval("s1", "c2", 11)],
                ..at(12)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.pending_approvals("s1").await.unwrap(),
        vec![pending_approval("s1", "c1", 10), pending_approval("s1", "c2", 11)]
    );
    let approve = |call: &str| ApprovalResolution {
        call_id: call.to_string(),
        status: ApprovalStatus::Edited,
        feedback: Some("ok".into()),
        modified_arguments: Some(json!({"path": "b.md"})),
        decided_at: Timestamp::from_millis(20),
    };
    store
        .commit(
            "s1",
            Commit {
                resolutions: vec![approve("c1")],
                events: vec![EventPayload::ApprovalResolved {
                    call_id: "c1".into(),
                    decision: "edit".into(),
                }],
                ..at(20)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_approval("s1", "c1").await.unwrap(),
        Approval {
            status: ApprovalStatus::Edited,
            decided_at: Some(Timestamp::from_millis(20)),
            feedback: Some("ok".into()),
            modified_arguments: Some(json!({"path": "b.md"})),
            ..pending_approval("s1", "c1", 10)
        }
    );
    let before = store.get_session("s1").await.unwrap();

    // Deciding c1 again fails, and the message and the c2 decision riding along are not stored.
    let twice = store
        .commit(
            "s1",
            Commit {
                resolutions: vec![approve("c2"), approve("c1")],
                messages: vec![NewMessage::user("again", None)],
                events: vec![token("x")],
                ..at(30)
            },
        )
        .await;
    assert_eq!(twice.map(|_| ()), Err(Error::ApprovalAlreadyDecided("c1".into())));
    let unknown = store
        .commit(
            "s1",
            Commit {
                resolutions: vec![approve("c9")],
                ..at(31)
            },
        )
        .await;
    assert_eq!(unknown.map(|_| ()), Err(Error::ApprovalNotFound("c9".into())));
    assert_eq!(store.get_session("s1").await.unwrap(), before);
    assert_eq!(store.messages_after("s1", 0, 10).await.unwrap(), vec![]);
    assert_eq!(store.events_after("s1", 1, 10).await.unwrap(), vec![]);
    assert_eq!(
        store.pending_approvals("s1").await.unwrap(),
        vec![pending_approval("s1", "c2", 11)]
    );
    assert_eq!(
        store.get_approval("s1", "c9").await,
        Err(Error::ApprovalNotFound("c9".into()))
    );
}

#[tokio::test]
async fn two_processes_deciding_one_approval_at_once_succeed_exactly_once() {
    let Some(guard) = fresh_schema().await else {
        return;
    };
    let a: Arc<dyn Storage> = Arc::new(open_in(&guard).await);
    let b: Arc<dyn Storage> = Arc::new(open_in(&guard).await);
    a.create_session(new_session("s1", None, 1)).await.unwrap();
    a.commit(
        "s1",
        Commit {
            approvals: vec![pending_approval("s1", "c1", 10)],
            ..at(10)
        },
    )
    .await
    .unwrap();
    let decide = |store: Arc<dyn Storage>, status: ApprovalStatus| {
        tokio::spawn(async move {
            store
                .commit(
                    "s1",
                    Commit {
                        resolutions: vec![ApprovalResolution {
                            call_id: "c1".into(),
                            status,
                            feedback: None,
                            modified_arguments: None,
                            decided_at: Timestamp::from_millis(20),
                        }],
                        ..at(20)
                    },
                )
                .await
                .map(|_| ())
        })
    };
    let ra = decide(a.clone(), ApprovalStatus::Approved);
    let rb = decide(b.clone(), ApprovalStatus::Rejected);
    let mut results = vec![ra.await.unwrap(), rb.await.unwrap()];
    results.sort_by_key(|r| r.is_err());
    assert_eq!(
        results,
        vec![Ok(()), Err(Error::ApprovalAlreadyDecided("c1".into()))]
    );
}

#[tokio::test]
async fn a_lease_fences_commits_and_is_judged_by_the_database_clock() {
    let Some(guard) = fresh_schema().await else {
        return;
    };
    let a = open_in(&guard).await;
    let b = open_in(&guard).await;
    let ttl = Duration::from_secs(60);
    a.create_session(new_session("s1", None, 1)).await.unwrap();
    assert_eq!(
        a.acquire_lease("nope", "p1", ttl).await,
        Err(Error::SessionNotFound("nope".into()))
    );

    assert_eq!(a.acquire_lease("s1", "p1", ttl).await, Ok(true));
    assert_eq!(
        a.acquire_lease("s1", "p1", ttl).await,
        Ok(true),
        "re-entrant for its owner"
    );
    assert_eq!(b.acquire_lease("s1", "p2", ttl).await, Ok(false));
    assert_eq!(b.renew_lease("s1", "p2", ttl).await, Ok(false));
    assert_eq!(a.renew_lease("s1", "p1", ttl).await, Ok(true));

    let before = a.get_session("s1").await.unwrap();
    let fenced = b
        .commit(
            "s1",
            Commit {
                lease_owner: Some("p2".into()),
                messages: vec![NewMessage::user("x", None)],
                ..Commit::now()
            },
        )
        .await;
    assert_eq!(fenced.map(|_| ()), Err(Error::SessionBusy("s1".into())));
    assert_eq!(a.get_session("s1").await.unwrap(), before);
    let held = a
        .commit(
            "s1",
            Commit {
                lease_owner: Some("p1".into()),
                messages: vec![NewMessage::user("x", None)],
                ..Commit::now()
            },
        )
        .await
        .unwrap();
    assert_eq!(held.session.last_message_seq, 1);

    // Releasing someone else's lease does nothing; releasing one's own frees it.
    b.release_lease("s1", "p2").await.unwrap();
    assert_eq!(b.acquire_lease("s1", "p2", ttl).await, Ok(false));
    a.release_lease("s1", "p1").await.unwrap();
    assert_eq!(b.acquire_lease("s1", "p2", ttl).await, Ok(true));

    // A lease whose ttl is zero has expired by the database's clock: anyone may take it, and its
    // former owner can neither renew it nor commit under it.
    assert_eq!(b.acquire_lease("s1", "p2", Duration::ZERO).await, Ok(true));
    assert_eq!(a.acquire_lease("s1", "p1", ttl).await, Ok(true));
    assert_eq!(b.renew_lease("s1", "p2", ttl).await, Ok(false));
    let stale = b
        .commit(
            "s1",
            Commit {
                lease_owner: Some("p2".into()),
                ..Commit::now()
            },
        )
        .await;
    assert_eq!(stale.map(|_| ()), Err(Error::SessionBusy("s1".into())));
}

#[tokio::test]
async fn sessions_are_listed_newest_activity_first_one_page_at_a_time() {
    let (_guard, store) = store_or_skip!();
    // Activity 100, 200, 200, 300 across two users: ties are broken by id, descending.
    for (id, user, t) in [
        ("a", "u1", 100),
        ("b", "u2", 200),
        ("c", "u1", 200),
        ("d", "u1", 300),
    ] {
        store
            .create_session(new_session(id, Some(user), t))
            .await
            .unwrap();
    }
    store
        .commit(
            "a",
            Commit {
                session: SessionUpdate {
                    status: Some(SessionStatus::AwaitingApproval),
                    ..SessionUpdate::default()
                },
                ..at(50)
            },
        )
        .await
        .unwrap();
    let ids = |page: &storage::SessionPage| page.sessions.iter().map(|s| s.id.clone()).collect::<Vec<_>>();

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_sessions(SessionQuery {
                limit: 2,
                cursor: cursor.clone(),
                ..SessionQuery::default()
            })
            .await
            .unwrap();
        seen.extend(ids(&page));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, vec!["d", "c", "b", "a"]);

    let u1 = store
        .list_sessions(SessionQuery {
            user_id: Some("u1".into()),
            limit: 10,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (ids(&u1), u1.next_cursor),
        (vec!["d".to_string(), "c".into(), "a".into()], None)
    );
    let awaiting = store
        .list_sessions(SessionQuery {
            status: Some(SessionStatus::AwaitingApproval),
            limit: 10,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&awaiting), vec!["a"]);

    for (limit, cursor) in [(0, None), (1001, None), (10, Some("garbage".to_string()))] {
        let r = store
            .list_sessions(SessionQuery {
                limit,
                cursor,
                ..SessionQuery::default()
            })
            .await;
        assert!(matches!(r, Err(Error::InvalidRequest(_))), "{r:?}");
    }
}

#[tokio::test]
async fn deleting_a_session_removes_every_row_of_it() {
    let (_guard, store) = store_or_skip!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    store.create_session(new_session("s2", None, 1)).await.unwrap();
    let everything = |id: &str| Commit {
        messages: vec![NewMessage::user("hi", None)],
        events: vec![token("a")],
        approvals: vec![pending_approval(id, "c1", 5)],
        switches: vec![AgentSwitch {
            from_agent: "orchestrator".into(),
            to_agent: "coder".into(),
            reason: "r".into(),
            timestamp: Timestamp::from_millis(5),
        }],
        plans: vec![Plan {
            plan_id: "p1".into(),
            goal: "g".into(),
            subtasks: vec![],
        }],
        request_id: Some("r1".into()),
        ..at(5)
    };
    store.commit("s1", everything("s1")).await.unwrap();
    store.commit("s2", everything("s2")).await.unwrap();
    store.delete_session("s1").await.unwrap();

    let mut counts = Vec::new();
    for table in [
        "sessions",
        "messages",
        "events",
        "approvals",
        "switches",
        "plans",
        "requests",
    ] {
        let col = if table == "sessions" { "id" } else { "session_id" };
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {col} = 's1'"
        )))
        .fetch_one(store.pool())
        .await
        .unwrap();
        counts.push((table, n));
    }
    assert!(counts.iter().all(|(_, n)| *n == 0), "{counts:?}");
    assert_eq!(
        store.get_session("s1").await,
        Err(Error::SessionNotFound("s1".into()))
    );
    assert_eq!(
        store.delete_session("s1").await,
        Err(Error::SessionNotFound("s1".into()))
    );
    // The other session is untouched.
    assert_eq!(store.messages_after("s2", 0, 10).await.unwrap().len(), 1);
    assert_eq!(store.pending_approvals("s2").await.unwrap().len(), 1);
}

#[tokio::test]
async fn switches_plans_and_replaced_approvals_round_trip() {
    let (_guard, store) = store_or_skip!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    let switches = vec![
        AgentSwitch {
            from_agent: "orchestrator".into(),
            to_agent: "architect".into(),
            reason: "design".into(),
            timestamp: Timestamp::from_millis(5),
        },
        AgentSwitch {
            from_agent: "architect".into(),
            to_agent: "coder".into(),
            reason: "build".into(),
            timestamp: Timestamp::from_millis(6),
        },
    ];
    let mut plan = Plan {
        plan_id: "p1".into(),
        goal: "ship it".into(),
        subtasks: vec![Subtask {
            id: "1".into(),
            description: "write".into(),
            agent: "coder".into(),
            status: "pending".into(),
        }],
    };
    let committed = store
        .commit(
            "s1",
            Commit {
                switches: switches[..1].to_vec(),
                plans: vec![plan.clone()],
                ..at(5)
            },
        )
        .await
        .unwrap();
    assert_eq!(committed.session.current_agent, "architect");
    plan.subtasks[0].status = "completed".into();
    let plan_approval = Approval {
        request_type: RequestType::Plan,
        tool_name: "propose_plan".into(),
        arguments: serde_json::to_value(&plan).unwrap(),
        ..pending_approval("s1", "p1", 6)
    };
    let committed = store
        .commit(
            "s1",
            Commit {
                switches: switches[1..].to_vec(),
                plans: vec![plan.clone()],
                approvals: vec![pending_approval("s1", "p1", 6)],
                ..at(6)
            },
        )
        .await
        .unwrap();
    assert_eq!(committed.session.current_agent, "coder");
    store
        .commit(
            "s1",
            Commit {
                approvals: vec![plan_approval.clone()],
                ..at(7)
            },
        )
        .await
        .unwrap();
    assert_eq!(store.switch_history("s1").await.unwrap(), switches);
    assert_eq!(store.get_plan("s1", "p1").await.unwrap(), Some(plan));
    assert_eq!(store.get_plan("s1", "p2").await.unwrap(), None);
    assert_eq!(store.get_approval("s1", "p1").await.unwrap(), plan_approval);
}

#[tokio::test]
async fn processes_starting_together_migrate_once() {
    let Some(guard) = fresh_schema().await else {
        return;
    };
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = guard.tagged_url();
        let schema = guard.schema().to_string();
        tasks.push(tokio::spawn(async move {
            PostgresStorage::connect_with(
                &url,
                PgOptions {
                    max_connections: 1,
                    schema: Some(schema),
                    ..PgOptions::default()
                },
            )
            .await
        }));
    }
    let mut stores = Vec::new();
    for t in tasks {
        stores.push(t.await.unwrap().unwrap());
    }
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version ORDER BY version")
        .fetch_all(stores[0].pool())
        .await
        .unwrap();
    assert_eq!(versions, (1..=storage::SCHEMA_VERSION).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_database_from_a_newer_build_is_refused() {
    let (guard, store) = store_or_skip!();
    sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES ($1, 0)")
        .bind(storage::SCHEMA_VERSION + 1)
        .execute(store.pool())
        .await
        .unwrap();
    let refused = PostgresStorage::connect_with(
        &guard.tagged_url(),
        PgOptions {
            schema: Some(guard.schema().to_string()),
            ..PgOptions::default()
        },
    )
    .await;
    assert_eq!(
        refused.map(|_| ()),
        Err(Error::Database(format!(
            "database schema version {} is newer than this build supports ({}); upgrade agent-runtime",
            storage::SCHEMA_VERSION + 1,
            storage::SCHEMA_VERSION
        )))
    );
}

#[tokio::test]
async fn open_accepts_postgresql_urls_and_returns_the_postgres_backend() {
    let (guard, store) = store_or_skip!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    // `open` uses the URL's own search_path (here: the test schema, through libpq `options`).
    let url = guard.tagged_url().replacen("postgres://", "postgresql://", 1);
    let url = format!("{url}&options=-csearch_path%3D{}", guard.schema());
    let opened = storage::open(&url).await.unwrap();
    assert_eq!(opened.backend(), "postgres");
    assert_eq!(opened.get_session("s1").await.unwrap().id, "s1");
}

#[tokio::test]
async fn connection_errors_never_show_the_password() {
    // Port 1 refuses at once; the password must not appear in the error.
    let err = PostgresStorage::connect("postgres://postgres:hunter2secret@127.0.0.1:1/test")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "DATABASE_ERROR");
    let text = err.to_string();
    assert!(!text.contains("hunter2secret"), "{text}");
    assert!(
        text.starts_with(
            "database error: cannot connect to postgres at 'postgres://postgres:***@127.0.0.1:1/test': "
        ),
        "{text}"
    );
    assert_eq!(
        PostgresStorage::connect("mysql://x@127.0.0.1/test")
            .await
            .unwrap_err()
            .code(),
        "INVALID_REQUEST"
    );
}

#[tokio::test]
async fn nul_characters_in_text_and_json_round_trip() {
    let (_guard, store) = store_or_skip!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    let text = "binary\u{0}output\u{0}";
    let approval = Approval {
        reason: text.into(),
        arguments: json!({"content": text}),
        ..pending_approval("s1", "c1", 2)
    };
    let committed = store
        .commit(
            "s1",
            Commit {
                messages: vec![NewMessage::tool("c0", text, None)],
                events: vec![token(text)],
                approvals: vec![approval.clone()],
                session: SessionUpdate {
                    turn_state: Some(Some(json!({"partial": text}))),
                    ..SessionUpdate::default()
                },
                ..at(2)
            },
        )
        .await
        .unwrap();
    let decided = ApprovalResolution {
        call_id: "c1".into(),
        status: ApprovalStatus::Rejected,
        feedback: Some(text.into()),
        modified_arguments: None,
        decided_at: Timestamp::from_millis(3),
    };
    store
        .commit(
            "s1",
            Commit {
                resolutions: vec![decided],
                ..at(3)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.messages_after("s1", 0, 10).await.unwrap(),
        committed.messages
    );
    assert_eq!(store.events_after("s1", 0, 10).await.unwrap(), committed.events);
    assert_eq!(
        store.get_session("s1").await.unwrap().turn_state,
        Some(json!({"partial": text}))
    );
    assert_eq!(
        store.get_approval("s1", "c1").await.unwrap(),
        Approval {
            status: ApprovalStatus::Rejected,
            feedback: Some(text.into()),
            decided_at: Some(Timestamp::from_millis(3)),
            ..approval
        }
    );
}

/// Every commit with events, from any handle, reaches every listener as a notice naming its owner
/// and session, once it is committed; a commit without events or one that fails sends none.
#[tokio::test]
async fn commits_with_events_are_noticed_by_listeners_of_other_handles() {
    use futures::StreamExt;
    let (guard, writer) = store_or_skip!();
    let reader = open_in(&guard).await;
    let mut notices = reader
        .commit_notices()
        .await
        .unwrap()
        .expect("postgres has notices");
    writer
        .create_session(new_session("noticed", None, 1))
        .await
        .unwrap();
    assert!(
        writer
            .acquire_lease("noticed", "owner_a", Duration::from_secs(60))
            .await
            .unwrap()
    );

    let mut quiet = Commit::now();
    quiet.usage = Some(Usage {
        prompt_tokens: 1,
        completion_tokens: 1,
    });
    writer.commit("noticed", quiet).await.unwrap();
    let mut fenced = Commit::now();
    fenced.lease_owner = Some("someone_else".into());
    fenced
        .events
        .push(EventPayload::AssistantMessage(AssistantMessage::Token {
            token: "never".into(),
        }));
    assert!(writer.commit("noticed", fenced).await.is_err());
    let mut loud = Commit::now();
    loud.lease_owner = Some("owner_a".into());
    loud.events
        .push(EventPayload::AssistantMessage(AssistantMessage::Token {
            token: "hi".into(),
        }));
    writer.commit("noticed", loud).await.unwrap();

    let first = tokio::time::timeout(Duration::from_secs(10), notices.next())
        .await
        .expect("a notice within 10 s");
    assert_eq!(
        first,
        Some(storage::CommitNotice {
            owner: "owner_a".into(),
            session_id: "noticed".into()
        }),
        "the first notice is the commit with events: the quiet and the failed ones sent none"
    );
}
