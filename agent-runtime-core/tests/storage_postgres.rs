//! The Postgres backend against the real server (`TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), each test in its own fresh schema, dropped after.
//!
//! Ignored unless `TEST_DATABASE_URL` is set when the tests are built (`cargo test` lists them as
//! ignored, with the reason); once asked for, a missing server or database fails them with the fix.
//!
//! What every backend must do is the conformance suite's (run here too); the tests below check
//! only what is Postgres's own: the schema's cascades, migrations across processes, URLs,
//! connection errors, and NUL characters (BYTEA text, JSON as TEXT).
#![cfg(feature = "postgres")]
// Test helpers outside #[test] fns: a failed expectation must panic here too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::approval::{Approval, ApprovalResolution, ApprovalStatus, RequestType};
use agent_runtime_core::protocol::{AssistantMessage, EventPayload, Plan};
use agent_runtime_core::session::{AgentSwitch, NewMessage, NewSession, TurnStateJson, Usage};
use agent_runtime_core::storage::pg_testing::{Guarded, fresh_schema, open_in};
use agent_runtime_core::storage::postgres::{PgOptions, PostgresStorage};
use agent_runtime_core::storage::{self, Commit, SessionUpdate, Storage};
use agent_runtime_core::{Error, Timestamp};
use serde_json::json;

/// Two handles with separate pools (two "processes") on one fresh schema.
async fn open_pair() -> (Arc<dyn Storage>, Arc<dyn Storage>) {
    let guard = fresh_schema().await;
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

agent_runtime_core::storage_conformance_suite!(open_pair, #[cfg_attr(not(postgres_tests), ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test")]);

/// One store in a fresh schema.
macro_rules! fresh_store {
    () => {{
        let guard = fresh_schema().await;
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
        budget: Default::default(),
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

/// Every table of the schema that holds a session's data.
const SESSION_TABLES: [&str; 7] = [
    "sessions",
    "messages",
    "events",
    "approvals",
    "switches",
    "plans",
    "requests",
];

/// How many rows of `session_id` each of [`SESSION_TABLES`] holds.
async fn rows_of(store: &PostgresStorage, session_id: &str) -> Vec<(&'static str, i64)> {
    let mut counts = Vec::new();
    for table in SESSION_TABLES {
        let col = if table == "sessions" { "id" } else { "session_id" };
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {col} = $1"
        )))
        .bind(session_id)
        .fetch_one(store.pool())
        .await
        .unwrap();
        counts.push((table, n));
    }
    counts
}

/// The conformance suite sees a deleted session's data only through the API; this looks at the
/// tables themselves: every one cascades from `sessions`, so no row of it is left anywhere.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn deleting_a_session_removes_every_row_of_it() {
    let (_guard, store) = fresh_store!();
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

    assert_eq!(rows_of(&store, "s1").await, SESSION_TABLES.map(|t| (t, 0)));
    assert_eq!(rows_of(&store, "s2").await, SESSION_TABLES.map(|t| (t, 1)));
}

/// A commit of messages and events runs as one statement; when the database refuses one of its
/// rows (here an event seq a stray row already holds), none of its writes stay: not the rows
/// written before the refused one, nor the request id, nor the session's change.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_commit_refused_midway_by_the_database_leaves_nothing() {
    let (_guard, store) = fresh_store!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    let first = Commit {
        messages: vec![NewMessage::user("first", None)],
        events: vec![token("first")],
        ..at(5)
    };
    store.commit("s1", first).await.unwrap();
    // A row the counters do not know of: seq 3 is taken behind the storage's back.
    sqlx::query(
        "INSERT INTO events (session_id, seq, kind, payload, created_at) VALUES ('s1', 3, 'x', '{}', 0)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let before = store.get_session("s1").await.unwrap();
    let refused = Commit {
        messages: vec![NewMessage::user("lost", None)],
        events: vec![token("lost 2"), token("lost 3")],
        request_id: Some("req_lost".into()),
        usage: Some(Usage {
            prompt_tokens: 5,
            ..Usage::default()
        }),
        session: SessionUpdate {
            current_agent: Some("coder".into()),
            turn_state: Some(Some(TurnStateJson::from_value(&json!({"lost": true})))),
            ..SessionUpdate::default()
        },
        ..at(9)
    };
    assert!(matches!(
        store.commit("s1", refused).await,
        Err(Error::Database(m)) if m.contains("duplicate key")
    ));
    assert_eq!(store.get_session("s1").await.unwrap(), before);
    assert_eq!(
        rows_of(&store, "s1").await,
        [
            ("sessions", 1),
            ("messages", 1),
            ("events", 2),
            ("approvals", 0),
            ("switches", 0),
            ("plans", 0),
            ("requests", 0)
        ]
    );
    assert_eq!(store.find_request("s1", "req_lost").await.unwrap(), None);
}

/// The owner's commits and its lease renewals race on the session row from two processes: every
/// commit is stored (none refused, none lost) with gap-free seqs, while the row changes under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn commits_racing_lease_renewals_are_all_stored() {
    let guard = fresh_schema().await;
    let (a, b) = (open_in(&guard).await, open_in(&guard).await);
    a.create_session(new_session("s1", None, 1)).await.unwrap();
    let ttl = Duration::from_secs(60);
    assert!(a.acquire_lease("s1", "o1", ttl).await.unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut renewers = Vec::new();
    for store in [a.clone(), b.clone()] {
        let stop = stop.clone();
        renewers.push(tokio::spawn(async move {
            let mut renewed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(store.renew_lease("s1", "o1", ttl).await.unwrap());
                renewed += 1;
            }
            renewed
        }));
    }
    let mut committers = Vec::new();
    for (t, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        committers.push(tokio::spawn(async move {
            for i in 0..100 {
                let c = Commit {
                    lease_owner: Some("o1".into()),
                    messages: vec![NewMessage::user(format!("{t}:{i}"), None)],
                    events: vec![token("x")],
                    ..at(10)
                };
                store.commit("s1", c).await.unwrap();
            }
        }));
    }
    for c in committers {
        c.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in renewers {
        assert!(r.await.unwrap() > 0);
    }
    let s = a.get_session("s1").await.unwrap();
    assert_eq!(
        (s.last_message_seq, s.last_event_seq, s.message_count),
        (400, 400, 400)
    );
    let seqs: Vec<u64> = b
        .messages_after("s1", 0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
}

/// The pool pings only connections that sat idle (a round trip saved on every statement under
/// load): one the server cut while it was idle is replaced, and the next call succeeds.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn an_idle_connection_the_server_cut_is_replaced_without_an_error() {
    let guard = fresh_schema().await;
    let store = PostgresStorage::connect_with(
        &guard.tagged_url(),
        PgOptions {
            max_connections: 1,
            schema: Some(guard.schema().to_string()),
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let mut other = <sqlx::PgConnection as sqlx::Connection>::connect(&storage::pg_testing::database_url())
        .await
        .unwrap();
    let cut: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert!(cut);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.get_session("s1").await.unwrap().id, "s1");
    let new_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_ne!(new_pid, pid);
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn processes_starting_together_migrate_once() {
    let guard = fresh_schema().await;
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
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_database_from_a_newer_build_is_refused() {
    let (guard, store) = fresh_store!();
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
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn open_accepts_postgresql_urls_and_returns_the_postgres_backend() {
    let (guard, store) = fresh_store!();
    store.create_session(new_session("s1", None, 1)).await.unwrap();
    // `open` uses the URL's own search_path (here: the test schema, through libpq `options`).
    let url = guard.tagged_url().replacen("postgres://", "postgresql://", 1);
    let url = format!("{url}&options=-csearch_path%3D{}", guard.schema());
    let opened = storage::open(&url).await.unwrap();
    assert_eq!(opened.backend(), "postgres");
    assert_eq!(opened.get_session("s1").await.unwrap().id, "s1");
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn connection_errors_never_show_the_password() {
    // Port 1 refuses at once; the password must not appear in the error.
    let err = PostgresStorage::connect("postgres://postgres:hunter2secret@127.0.0.1:1/test")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "DATABASE_ERROR");
    let text = err.to_string();
    assert!(!text.contains("hunter2secret"), "{text}");
    assert_eq!(
        text,
        "database error: cannot connect to 127.0.0.1:1 (connection refused) — is PostgreSQL running there?"
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
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn nul_characters_in_text_and_json_round_trip() {
    let (_guard, store) = fresh_store!();
    // JSON is stored as TEXT, not JSONB (which refuses `\u0000`): the metadata's NUL survives.
    let new = new_session("s1", None, 1);
    store.create_session(new.clone()).await.unwrap();
    assert_eq!(store.get_session("s1").await.unwrap().metadata, new.metadata);
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
                    turn_state: Some(Some(TurnStateJson::from_value(&json!({"partial": text})))),
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
        Some(TurnStateJson::from_value(&json!({"partial": text})))
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
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn commits_with_events_are_noticed_by_listeners_of_other_handles() {
    use futures::StreamExt;
    let (guard, writer) = fresh_store!();
    let reader = open_in(&guard).await;
    // The channel is the database's: other tests' schemas notify on it too.
    let mut notices = reader
        .commit_notices()
        .await
        .unwrap()
        .expect("postgres has notices")
        .filter(|n| futures::future::ready(n.session_id == "noticed"));
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
        ..Default::default()
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

    // The channel is shared by every schema of the database (other tests commit too): the first
    // notice naming this session is the one to check.
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(n) = notices.next().await {
            if n.session_id == "noticed" {
                return Some(n);
            }
        }
        None
    })
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

/// The commit notices have a connection of their own; when Postgres drops it, the next notice
/// still arrives (sent through the pool, then on a new connection), and so does the one after.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn commit_notices_survive_their_connection_being_terminated() {
    use futures::StreamExt;
    let (guard, writer) = fresh_store!();
    let reader = open_in(&guard).await;
    let mut notices = reader
        .commit_notices()
        .await
        .unwrap()
        .expect("postgres has notices")
        .filter(|n| futures::future::ready(n.session_id == "renoticed"));
    writer
        .create_session(new_session("renoticed", None, 1))
        .await
        .unwrap();
    assert!(
        writer
            .acquire_lease("renoticed", "owner_a", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let token_commit = |token: &str| {
        let mut c = Commit::now();
        c.lease_owner = Some("owner_a".into());
        c.events
            .push(EventPayload::AssistantMessage(AssistantMessage::Token {
                token: token.into(),
            }));
        c
    };
    let expected = Some(storage::CommitNotice {
        owner: "owner_a".into(),
        session_id: "renoticed".into(),
    });
    writer.commit("renoticed", token_commit("one")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), notices.next()).await;
    assert_eq!(first.expect("a notice within 10 s"), expected);

    // Every notice sender's connection in the database (other tests' too: they recover the same way).
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1) AS t",
    )
    .bind(agent_runtime_core::storage::postgres::NOTICES_APPLICATION)
    .fetch_one(writer.pool())
    .await
    .unwrap();
    assert!(killed >= 1, "the writer's notice connection was found");

    for token in ["two", "three"] {
        writer.commit("renoticed", token_commit(token)).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), notices.next()).await;
        assert_eq!(next.expect("a notice within 10 s"), expected, "after {token}");
    }
}

/// A cancel request reaches every listener of the cancel channel as a notice naming the lease
/// owner asked and the session; a request nobody can be asked (no lease) sends none.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn cancel_requests_are_noticed_by_listeners_of_other_handles() {
    use futures::StreamExt;
    let (guard, asker) = fresh_store!();
    let owner = open_in(&guard).await;
    // The channel is the database's: other tests' schemas notify on it too.
    let ours = ["cancel_unleased", "cancel_leased"];
    let mut notices = owner
        .cancel_notices()
        .await
        .unwrap()
        .expect("postgres has cancel notices")
        .filter(move |n| futures::future::ready(ours.contains(&n.session_id.as_str())));
    for id in ours {
        asker.create_session(new_session(id, None, 1)).await.unwrap();
    }
    assert!(
        owner
            .acquire_lease("cancel_leased", "owner_a", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert_eq!(asker.request_cancel("cancel_unleased").await, Ok(None));
    assert_eq!(
        asker.request_cancel("cancel_leased").await,
        Ok(Some("owner_a".into()))
    );

    let first = tokio::time::timeout(Duration::from_secs(10), notices.next())
        .await
        .expect("a notice within 10 s");
    assert_eq!(
        first,
        Some(storage::CommitNotice {
            owner: "owner_a".into(),
            session_id: "cancel_leased".into()
        }),
        "the first notice is the leased session's: the unleased one sent none"
    );
}
