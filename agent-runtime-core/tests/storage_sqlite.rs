//! The storage conformance suite on SQLite (a file shared by two handles, and `:memory:`), plus
//! the migration rules: a newer schema is refused, reopening an up-to-date database changes nothing.

// Set-up helpers are not `#[test]` functions, so clippy's test allowance does not reach them.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use agent_runtime_core::Storage;
use agent_runtime_core::session::NewSession;
use agent_runtime_core::storage::sqlite::SqliteStorage;
use agent_runtime_core::storage::{self, SCHEMA_VERSION};
use agent_runtime_core::{Error, EventPayload, Timestamp};
use serde_json::json;

/// Two `SqliteStorage`s (two writers, two reader pools) on one fresh temp file. The directory is
/// leaked so the file outlives the test's handles.
async fn open_pair() -> (Arc<dyn Storage>, Arc<dyn Storage>) {
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("conformance.db");
    let a = SqliteStorage::open(&path).await.unwrap();
    let b = SqliteStorage::open(&path).await.unwrap();
    (Arc::new(a), Arc::new(b))
}

mod file {
    use super::*;
    agent_runtime_core::storage_conformance_suite!(open_pair);
}

/// An in-memory database lives in one connection: both handles are the same store.
async fn open_memory_pair() -> (Arc<dyn Storage>, Arc<dyn Storage>) {
    let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open_in_memory().await.unwrap());
    (store.clone(), store)
}

mod in_memory {
    use super::*;
    agent_runtime_core::storage_conformance_suite!(open_memory_pair);
}

fn new_session(id: &str) -> NewSession {
    NewSession {
        id: id.into(),
        user_id: Some("user_1".into()),
        metadata: json!({"project_path": "/tmp/p"}),
        current_agent: "orchestrator".into(),
        created_at: Timestamp::from_millis(1_704_794_400_000),
        budget: Default::default(),
    }
}

/// Every row of the schema and version tables, as text, to compare a database before and after.
fn snapshot(path: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut out = vec![];
    for sql in [
        "SELECT type || ' ' || name || ' ' || COALESCE(sql, '') FROM sqlite_master ORDER BY name",
        "SELECT version || ' ' || applied_at FROM schema_version ORDER BY version",
        "SELECT id || ' ' || last_activity || ' ' || last_event_seq FROM sessions ORDER BY id",
    ] {
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

#[tokio::test]
async fn a_newer_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    drop(SqliteStorage::open(&path).await.unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO schema_version (version, applied_at) VALUES (?1, 0)",
        [SCHEMA_VERSION + 1],
    )
    .unwrap();
    drop(conn);
    let before = snapshot(&path);
    let err = SqliteStorage::open(&path).await.unwrap_err();
    assert_eq!(
        err,
        Error::Database(format!(
            "database schema version {} is newer than this build supports ({}); upgrade agent-runtime",
            SCHEMA_VERSION + 1,
            SCHEMA_VERSION
        ))
    );
    let url = format!("sqlite://{}", path.display());
    assert_eq!(storage::open(&url).await.unwrap_err(), err);
    assert_eq!(snapshot(&path), before);
}

#[tokio::test]
async fn reopening_an_up_to_date_database_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("current.db");
    let store = SqliteStorage::open(&path).await.unwrap();
    let created = store.create_session(new_session("kept")).await.unwrap();
    drop(store);
    let before = snapshot(&path);
    assert_eq!(
        before
            .iter()
            .filter(|l| l.starts_with(&format!("{SCHEMA_VERSION} ")))
            .count(),
        1,
        "{before:?}"
    );
    let store = SqliteStorage::open(&path).await.unwrap();
    assert_eq!(store.get_session("kept").await.unwrap(), created);
    drop(store);
    assert_eq!(snapshot(&path), before);
}

#[tokio::test]
async fn data_survives_closing_and_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("durable.db").display());
    let store = storage::open(&url).await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    let created = store.create_session(new_session("durable")).await.unwrap();
    drop(store);
    let store = storage::open(&url).await.unwrap();
    assert_eq!(store.get_session("durable").await.unwrap(), created);
}

#[tokio::test]
async fn sqlite_memory_url_opens_a_private_database() {
    let a = storage::open("sqlite::memory:").await.unwrap();
    let b = storage::open("sqlite::memory:").await.unwrap();
    a.create_session(new_session("only_in_a")).await.unwrap();
    assert_eq!(
        b.get_session("only_in_a").await,
        Err(Error::SessionNotFound("only_in_a".into()))
    );
}

#[tokio::test]
async fn an_unopenable_path_is_a_database_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/missing-dir/a.db", dir.path().display());
    assert!(matches!(storage::open(&url).await, Err(Error::Database(_))));
}

/// The schema of a database written by the build before migration 0006: files 0001 to 0005.
const SCHEMA_5: &[&str] = &[
    include_str!("../migrations/sqlite/0001_init.sql"),
    include_str!("../migrations/sqlite/0002_owner_liveness.sql"),
    include_str!("../migrations/sqlite/0003_cancel_requests.sql"),
    include_str!("../migrations/sqlite/0004_budgets.sql"),
    include_str!("../migrations/sqlite/0005_tool_results_by_call.sql"),
];

/// The indexes of the `sessions` table, by name.
fn session_indexes(path: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sessions' AND sql IS NOT NULL ORDER BY name")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

/// A new file at `path` with the migrations `schema` applied and recorded, as an older build left it.
fn file_at_version(path: &std::path::Path, schema: &[&str]) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .unwrap();
    for (version, sql) in (1..).zip(schema) {
        conn.execute_batch(sql).unwrap();
        conn.execute("INSERT INTO schema_version VALUES (?1, 0)", [version])
            .unwrap();
    }
    conn
}

#[tokio::test]
async fn a_version_5_database_is_migrated_with_its_sessions_listed_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v5.db");
    let conn = file_at_version(&path, SCHEMA_5);
    for (id, user, status, at) in [
        ("s1", Some("ann"), "idle", 10),
        ("s2", None, "running", 20),
        ("s3", Some("ann"), "running", 30),
        ("s4", Some("bob"), "idle", 40),
    ] {
        conn.execute(
            "INSERT INTO sessions (id, user_id, metadata, created_at, last_activity, current_agent, status)
             VALUES (?1, ?2, '{}', 0, ?3, 'orchestrator', ?4)",
            rusqlite::params![id, user, at, status],
        )
        .unwrap();
    }
    drop(conn);
    assert_eq!(
        session_indexes(&path),
        [
            "sessions_by_activity",
            "sessions_by_status_activity",
            "sessions_by_user_activity",
            "sessions_lease_owner"
        ]
    );

    let store = SqliteStorage::open(&path).await.unwrap();
    let ids = |page: storage::SessionPage| {
        let ids: Vec<String> = page.sessions.into_iter().map(|s| s.id).collect();
        (ids, page.total)
    };
    let query = |user: Option<&str>, status| storage::SessionQuery {
        user_id: user.map(str::to_string),
        status,
        limit: 10,
        cursor: None,
    };
    assert_eq!(
        ids(store.list_sessions(query(None, None)).await.unwrap()),
        (vec!["s4".into(), "s3".into(), "s2".into(), "s1".into()], 4)
    );
    assert_eq!(
        ids(store.list_sessions(query(Some("ann"), None)).await.unwrap()),
        (vec!["s3".into(), "s1".into()], 2)
    );
    let running = Some(agent_runtime_core::session::SessionStatus::Running);
    assert_eq!(
        ids(store.list_sessions(query(None, running)).await.unwrap()),
        (vec!["s3".into(), "s2".into()], 2)
    );
    drop(store);

    assert_eq!(
        session_indexes(&path),
        [
            "sessions_by_activity",
            "sessions_by_status",
            "sessions_by_user",
            "sessions_lease_owner"
        ]
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let versions: Vec<i64> = conn
        .prepare("SELECT version FROM schema_version ORDER BY version")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
}

/// The schema of a database written by the build before migration 0007: files 0001 to 0006.
const SCHEMA_6: &[&str] = &[
    include_str!("../migrations/sqlite/0001_init.sql"),
    include_str!("../migrations/sqlite/0002_owner_liveness.sql"),
    include_str!("../migrations/sqlite/0003_cancel_requests.sql"),
    include_str!("../migrations/sqlite/0004_budgets.sql"),
    include_str!("../migrations/sqlite/0005_tool_results_by_call.sql"),
    include_str!("../migrations/sqlite/0006_sessions_indexes_off_the_commit_path.sql"),
];

/// Every message and event row of the file at `path`, every column as text, in key order.
fn message_and_event_rows(path: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut out = vec![];
    for sql in [
        "SELECT session_id || '|' || seq || '|' || role || '|' || content || '|' || COALESCE(agent, 'NULL')
                || '|' || tool_calls || '|' || COALESCE(tool_call_id, 'NULL') || '|' || created_at
         FROM messages ORDER BY session_id, seq",
        "SELECT session_id || '|' || seq || '|' || payload FROM events ORDER BY session_id, seq",
    ] {
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

/// `name`'s `CREATE` statement as SQLite keeps it.
fn create_sql(path: &Path, name: &str) -> String {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT sql FROM sqlite_master WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .unwrap()
}

#[tokio::test]
async fn a_version_6_database_is_migrated_with_messages_and_events_kept_without_rowids() {
    use agent_runtime_core::protocol::AssistantMessage;
    use agent_runtime_core::session::{NewMessage, ToolCall};
    use agent_runtime_core::storage::Commit;

    // Rows as the current build writes them, copied into a file with the version-6 schema.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.db");
    let store = SqliteStorage::open(&source).await.unwrap();
    for id in ["a", "b"] {
        store.create_session(new_session(id)).await.unwrap();
        let call = ToolCall {
            id: format!("call_{id}"),
            name: "read_file".into(),
            arguments: json!({"path": "a.md"}),
        };
        let mut commit = Commit::now();
        commit.messages = vec![
            NewMessage::user(format!("question to {id}"), None),
            NewMessage::assistant("reading", Some("coder".into()), vec![call]),
            NewMessage::tool(format!("call_{id}"), "# A", Some("coder".into())),
        ];
        commit.events = ["one", "two", "three"]
            .map(|t| EventPayload::AssistantMessage(AssistantMessage::Token { token: t.into() }))
            .to_vec();
        store.commit(id, commit).await.unwrap();
    }
    let messages = store.messages_after("a", 0, 100).await.unwrap();
    let events = store.events_after("b", 0, 100).await.unwrap();
    drop(store);

    let path = dir.path().join("v6.db");
    let conn = file_at_version(&path, SCHEMA_6);
    conn.execute("ATTACH DATABASE ?1 AS source", [source.to_str().unwrap()])
        .unwrap();
    conn.execute_batch(
        "INSERT INTO sessions SELECT * FROM source.sessions;
         INSERT INTO messages SELECT * FROM source.messages;
         INSERT INTO events SELECT * FROM source.events;
         DETACH DATABASE source;",
    )
    .unwrap();
    drop(conn);
    let before = message_and_event_rows(&path);
    assert_eq!(before.len(), 12, "{before:?}");
    assert!(!create_sql(&path, "events").contains("WITHOUT ROWID"));

    let store = SqliteStorage::open(&path).await.unwrap();
    assert_eq!(store.messages_after("a", 0, 100).await.unwrap(), messages);
    assert_eq!(store.events_after("b", 0, 100).await.unwrap(), events);
    assert!(store.tool_call_answered("a", "call_a").await.unwrap());
    assert!(!store.tool_call_answered("a", "call_b").await.unwrap());
    drop(store);

    assert_eq!(message_and_event_rows(&path), before);
    assert!(create_sql(&path, "messages").ends_with(") WITHOUT ROWID"));
    assert!(create_sql(&path, "events").ends_with(") WITHOUT ROWID"));
    assert_eq!(
        create_sql(&path, "messages_by_tool_call_id"),
        "CREATE INDEX messages_by_tool_call_id ON messages (session_id, tool_call_id) WHERE tool_call_id IS NOT NULL"
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let leftovers: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('messages_new', 'events_new')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leftovers, 0);
    let versions: Vec<i64> = conn
        .prepare("SELECT version FROM schema_version ORDER BY version")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    // Deleting a session still takes its rows with it.
    drop(conn);
    let store = SqliteStorage::open(&path).await.unwrap();
    store.delete_session("a").await.unwrap();
    drop(store);
    assert_eq!(
        message_and_event_rows(&path),
        before
            .into_iter()
            .filter(|r| r.starts_with("b|"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_commit_longer_than_one_insert_statement_stores_every_row_in_order() {
    use agent_runtime_core::protocol::AssistantMessage;
    use agent_runtime_core::session::NewMessage;
    use agent_runtime_core::storage::Commit;

    // 16 rows go in one multi-row INSERT: 37 events are three statements, 17 messages two.
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStorage::open(&dir.path().join("long.db")).await.unwrap();
    store.create_session(new_session("long")).await.unwrap();
    let mut commit = Commit::now();
    commit.messages = (1..=17)
        .map(|i| NewMessage::user(format!("message {i}"), None))
        .collect();
    commit.events = (1..=37)
        .map(|i| {
            EventPayload::AssistantMessage(AssistantMessage::Token {
                token: format!("t{i}"),
            })
        })
        .collect();
    let done = store.commit("long", commit.clone()).await.unwrap();

    let messages = store.messages_after("long", 0, 100).await.unwrap();
    let events = store.events_after("long", 0, 100).await.unwrap();
    assert_eq!(messages, done.messages);
    assert_eq!(events, done.events);
    assert_eq!(
        messages
            .iter()
            .map(|m| (m.seq, m.content.clone()))
            .collect::<Vec<_>>(),
        (1..=17).map(|i| (i, format!("message {i}"))).collect::<Vec<_>>()
    );
    assert_eq!(
        events
            .iter()
            .map(|e| (e.seq, e.payload.clone()))
            .collect::<Vec<_>>(),
        (1..=37).zip(commit.events).collect::<Vec<_>>()
    );
    assert_eq!(store.get_session("long").await.unwrap(), done.session);
    assert_eq!(
        (
            done.session.last_message_seq,
            done.session.last_event_seq,
            done.session.message_count
        ),
        (17, 37, 17)
    );
}

// The writer's cache of session heads (src/storage/sqlite/heads.rs) must never hide what another
// connection committed: another process's writes are made here by a plain connection to the
// same file, between two commits of a store whose cache holds the session.

/// A store on a fresh file, a session on it with one commit stored (so its head is cached), and a
/// plain connection to the file: another process.
async fn store_and_other_process(id: &str) -> (SqliteStorage, rusqlite::Connection, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heads.db");
    let store = SqliteStorage::open(&path).await.unwrap();
    store.create_session(new_session(id)).await.unwrap();
    store.commit(id, token_commit("first")).await.unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    (store, other, dir)
}

fn token_commit(t: &str) -> agent_runtime_core::storage::Commit {
    use agent_runtime_core::protocol::AssistantMessage;
    let mut c = agent_runtime_core::storage::Commit::now();
    c.events
        .push(EventPayload::AssistantMessage(AssistantMessage::Token {
            token: t.into(),
        }));
    c
}

#[tokio::test]
async fn a_lease_another_process_took_between_two_commits_fences_the_next_one_out() {
    let (store, other, _dir) = store_and_other_process("s").await;
    assert!(
        store
            .acquire_lease("s", "me", std::time::Duration::from_secs(30))
            .await
            .unwrap()
    );
    let mut mine = token_commit("mine");
    mine.lease_owner = Some("me".into());
    store.commit("s", mine.clone()).await.unwrap();
    other
        .execute(
            "UPDATE sessions SET lease_owner = 'them', lease_expires_at = 0 WHERE id = 's'",
            [],
        )
        .unwrap();
    assert_eq!(
        store.commit("s", mine).await.map(|_| ()),
        Err(Error::SessionBusy("s".into()))
    );
    assert_eq!(store.events_after("s", 0, 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_session_another_process_deleted_between_two_commits_is_not_found_by_the_next_one() {
    let (store, other, _dir) = store_and_other_process("s").await;
    other.execute("DELETE FROM sessions WHERE id = 's'", []).unwrap();
    assert_eq!(
        store.commit("s", token_commit("late")).await.map(|_| ()),
        Err(Error::SessionNotFound("s".into()))
    );
    assert_eq!(
        store.get_session("s").await.map(|_| ()),
        Err(Error::SessionNotFound("s".into()))
    );
}

#[tokio::test]
async fn a_turn_another_process_moved_on_between_two_commits_is_what_the_next_one_returns() {
    let (store, other, _dir) = store_and_other_process("s").await;
    // Another process's turn: a running status, its turn state, an event and its counter.
    other
        .execute_batch(
            "BEGIN;
             INSERT INTO events (session_id, seq, payload)
                 VALUES ('s', 2, '{\"type\":\"assistant_message\",\"token\":\"theirs\"}');
             UPDATE sessions SET status = 'running', turn_state = '{\"theirs\":true}',
                 last_event_seq = 2, current_agent = 'coder' WHERE id = 's';
             COMMIT;",
        )
        .unwrap();
    let done = store.commit("s", token_commit("mine")).await.unwrap();
    assert_eq!(done.session, store.get_session("s").await.unwrap());
    assert_eq!(
        (
            done.session.status,
            done.session.current_agent.as_str(),
            done.session.turn_state.as_ref().map(|t| t.as_str()),
            done.session.last_event_seq,
            done.events.iter().map(|e| e.seq).collect::<Vec<_>>()
        ),
        (
            agent_runtime_core::session::SessionStatus::Running,
            "coder",
            Some("{\"theirs\":true}"),
            3,
            vec![3]
        )
    );
}

#[tokio::test]
async fn a_turn_another_store_committed_between_two_lease_and_commits_is_seen_by_the_next_one() {
    use agent_runtime_core::session::SessionStatus;
    use agent_runtime_core::storage::{Expected, Leased};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.db");
    let (a, b) = (
        SqliteStorage::open(&path).await.unwrap(),
        SqliteStorage::open(&path).await.unwrap(),
    );
    a.create_session(new_session("s")).await.unwrap();
    let ttl = std::time::Duration::from_secs(30);
    let idle_at = |seq| Expected {
        status: SessionStatus::Idle,
        current_agent: None,
        last_event_seq: Some(seq),
    };
    let mut first = token_commit("a1");
    first.lease_owner = Some("a".into());
    first.release_lease = true;
    let Leased::Committed(_) = a
        .lease_and_commit("s", "a", ttl, &idle_at(0), first.clone())
        .await
        .unwrap()
    else {
        panic!("a's first turn was not committed")
    };
    // The other store's turn, while `a` holds the session's head in its cache.
    let mut theirs = first.clone();
    theirs.lease_owner = Some("b".into());
    let Leased::Committed(_) = b
        .lease_and_commit("s", "b", ttl, &idle_at(1), theirs)
        .await
        .unwrap()
    else {
        panic!("b's turn was not committed")
    };
    // Built on the session as `a` last stored it: no longer as expected.
    let Leased::Taken(seen) = a
        .lease_and_commit("s", "a", ttl, &idle_at(1), first.clone())
        .await
        .unwrap()
    else {
        panic!("a committed on a session that had moved on")
    };
    assert_eq!(seen, a.get_session("s").await.unwrap());
    assert_eq!(seen.last_event_seq, 2);
    let Leased::Committed(done) = a
        .lease_and_commit("s", "a", ttl, &idle_at(2), first)
        .await
        .unwrap()
    else {
        panic!("a's turn on the session as it is was not committed")
    };
    assert_eq!(done.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
}

/// `lease_and_commit` on a session whose cached head shows the lease the owner's takes it in
/// the commit's own `UPDATE`: as `acquire_lease` would, the cancel request is cleared and the
/// expiry renewed, so another owner is refused.
#[tokio::test]
async fn a_lease_taken_in_the_commits_own_update_clears_the_cancel_and_renews_the_expiry() {
    use agent_runtime_core::session::SessionStatus;
    use agent_runtime_core::storage::{Expected, Leased};
    let (store, other, _dir) = store_and_other_process("s").await;
    let ttl = std::time::Duration::from_secs(30);
    assert!(store.acquire_lease("s", "me", ttl).await.unwrap());
    assert_eq!(store.request_cancel("s").await.unwrap(), Some("me".into()));
    assert_eq!(store.cancel_requests("me").await.unwrap(), vec!["s".to_string()]);
    let before = Timestamp::now().as_millis();
    let mut c = token_commit("turn");
    c.lease_owner = Some("me".into());
    let expected = Expected {
        status: SessionStatus::Idle,
        current_agent: None,
        last_event_seq: Some(1),
    };
    let Leased::Committed(done) = store
        .lease_and_commit("s", "me", ttl, &expected, c)
        .await
        .unwrap()
    else {
        panic!("the owner's turn was not committed")
    };
    assert_eq!(done.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
    assert_eq!(store.cancel_requests("me").await.unwrap(), Vec::<String>::new());
    let (owner, expires): (String, i64) = other
        .query_row(
            "SELECT lease_owner, lease_expires_at FROM sessions WHERE id = 's'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(owner, "me");
    assert!(expires >= before + 30_000, "expires {expires}, before {before}");
    assert!(!store.acquire_lease("s", "them", ttl).await.unwrap());
}
