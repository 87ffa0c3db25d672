//! Fresh Postgres schemas for tests (feature `test-utils`): each test gets its own schema on the
//! real server (`TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`), dropped
//! with everything in it when the last handle goes. The Postgres tests are ignored unless
//! `TEST_DATABASE_URL` is set when they are built (cfg `postgres_tests`, from the build script);
//! once asked for, a server or database that is not there fails them with the cause and the fix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support: failing loudly is the point

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

use crate::approval::Approval;
use crate::protocol::{Event, Plan};
use crate::session::{AgentSwitch, Message, NewSession};
use crate::storage::postgres::{PgOptions, PostgresStorage};
use crate::storage::{self, Commit, SessionQuery, Storage};
use crate::{Session, Timestamp};

/// The test database: `TEST_DATABASE_URL`, or `postgres://postgres@127.0.0.1:5432/test`.
pub fn database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Why connecting to `url` failed, and what fixes it: a missing database, a refused role and a
/// server that does not answer each get their own advice.
pub fn connect_failure_hint(url: &str, error: &sqlx::Error) -> String {
    use std::str::FromStr;
    let shown = storage::redact_url(url);
    let Ok(options) = sqlx::postgres::PgConnectOptions::from_str(url) else {
        return format!("TEST_DATABASE_URL {shown} is not a Postgres URL ({error})");
    };
    let (host, port, user) = (options.get_host(), options.get_port(), options.get_username());
    let database = options.get_database().unwrap_or(user);
    let code = match error {
        sqlx::Error::Database(e) => e.code().map(|c| c.into_owned()),
        _ => None,
    };
    match (code.as_deref(), error) {
        (Some("3D000"), _) => format!(
            "the Postgres server at {host}:{port} has no database \"{database}\": \
             create it with `createdb -h {host} -p {port} -U {user} {database}` \
             (or set TEST_DATABASE_URL to one that exists)"
        ),
        (Some(c), _) if c.starts_with("28") => format!(
            "the Postgres server at {host}:{port} refused the role \"{user}\" ({error}): \
             set TEST_DATABASE_URL to a role and password it accepts"
        ),
        (_, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => format!(
            "nothing answers at {host}:{port} ({error}): start Postgres, e.g. \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
             or set TEST_DATABASE_URL to a server that runs"
        ),
        _ => format!("cannot connect to {shown} ({error})"),
    }
}

/// A fresh schema for one test, dropped (with everything in it) when the last holder lets go.
#[derive(Debug)]
pub struct SchemaGuard {
    url: String,
    schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let url = self.url.clone();
        let schema = self.schema.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with its
        // own runtime. A lock_timeout keeps a stuck connection from hanging the test; a schema
        // left behind is removed by a later run's stale-schema sweep.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&url).await {
                    // Connections of this test may still sit in an aborted transaction whose
                    // rollback waits for the (now blocked) test runtime: end them first.
                    let _ = sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    )
                    .bind(&schema)
                    .execute(&mut conn)
                    .await;
                    let _ = conn.execute("SET lock_timeout = '5s'").await;
                    let _ = conn
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                        )))
                        .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

static SWEPT: AtomicBool = AtomicBool::new(false);

/// Drops `art_test_<secs>_...` schemas of earlier runs that are more than an hour old.
async fn sweep_stale_schemas(conn: &mut PgConnection) {
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::TEXT FROM pg_namespace WHERE nspname LIKE 'art\\_test\\_%'")
            .fetch_all(&mut *conn)
            .await
            .expect("list schemas");
    let now = Timestamp::now().as_millis() / 1000;
    for name in names {
        let created: Option<i64> = name
            .strip_prefix("art_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse().ok());
        if created.is_some_and(|c| now - c > 3600) {
            let _ = conn
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
                )))
                .await;
        }
    }
}

/// A fresh, not yet created schema name and its guard.
///
/// # Panics
/// When the test database cannot be reached, with [`connect_failure_hint`]'s cause and fix: a
/// Postgres test that runs needs Postgres.
pub async fn fresh_schema() -> Arc<SchemaGuard> {
    let url = database_url();
    match PgConnection::connect(&url).await {
        Ok(mut conn) => {
            sweep_stale_schemas(&mut conn).await;
            let _ = conn.close().await;
        }
        Err(e) => panic!("Postgres test database: {}", connect_failure_hint(&url, &e)),
    }
    let schema = format!(
        "art_test_{}_{}",
        Timestamp::now().as_millis() / 1000,
        uuid::Uuid::new_v4().simple()
    );
    Arc::new(SchemaGuard { url, schema })
}

impl SchemaGuard {
    /// The URL for this test's pools: tagged with the schema as `application_name`, so the guard
    /// can find their connections.
    pub fn tagged_url(&self) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}application_name={}", self.url, self.schema)
    }

    /// [`tagged_url`](Self::tagged_url) with this schema as the `search_path`: a server process
    /// given it as its `DATABASE_URL` works in this schema (open it once first to create it).
    pub fn server_url(&self) -> String {
        format!("{}&options=-csearch_path%3D{}", self.tagged_url(), self.schema)
    }
}

pub async fn open_in(guard: &SchemaGuard) -> PostgresStorage {
    PostgresStorage::connect_with(
        &guard.tagged_url(),
        PgOptions {
            max_connections: 4,
            schema: Some(guard.schema.clone()),
            ..PgOptions::default()
        },
    )
    .await
    .expect("connect")
}

/// A Postgres store that keeps its test schema alive: the schema is dropped when the last handle
/// on it goes (the conformance cases only get the `Arc<dyn Storage>` pair).
#[derive(Debug)]
pub struct Guarded {
    /// The store.
    pub store: PostgresStorage,
    /// Keeps the schema alive.
    pub guard: Arc<SchemaGuard>,
}

#[async_trait::async_trait]
impl Storage for Guarded {
    fn backend(&self) -> &'static str {
        self.store.backend()
    }
    async fn ping(&self) -> crate::Result<()> {
        self.store.ping().await
    }
    async fn create_session(&self, new: NewSession) -> crate::Result<Session> {
        self.store.create_session(new).await
    }
    async fn get_session(&self, id: &str) -> crate::Result<Session> {
        self.store.get_session(id).await
    }
    async fn list_sessions(&self, query: SessionQuery) -> crate::Result<storage::SessionPage> {
        self.store.list_sessions(query).await
    }
    async fn delete_session(&self, id: &str) -> crate::Result<()> {
        self.store.delete_session(id).await
    }
    async fn commit(&self, session_id: &str, commit: Commit) -> crate::Result<storage::Committed> {
        self.store.commit(session_id, commit).await
    }
    async fn messages_after(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> crate::Result<Vec<Message>> {
        self.store.messages_after(session_id, after, limit).await
    }
    async fn recent_messages(&self, session_id: &str, limit: usize) -> crate::Result<Vec<Message>> {
        self.store.recent_messages(session_id, limit).await
    }
    async fn events_after(&self, session_id: &str, after: u64, limit: usize) -> crate::Result<Vec<Event>> {
        self.store.events_after(session_id, after, limit).await
    }
    async fn find_request(&self, session_id: &str, request_id: &str) -> crate::Result<Option<u64>> {
        self.store.find_request(session_id, request_id).await
    }
    async fn tool_call_answered(&self, session_id: &str, call_id: &str) -> crate::Result<bool> {
        self.store.tool_call_answered(session_id, call_id).await
    }
    async fn get_approval(&self, session_id: &str, call_id: &str) -> crate::Result<Approval> {
        self.store.get_approval(session_id, call_id).await
    }
    async fn pending_approvals(&self, session_id: &str) -> crate::Result<Vec<Approval>> {
        self.store.pending_approvals(session_id).await
    }
    async fn switch_history(&self, session_id: &str) -> crate::Result<Vec<AgentSwitch>> {
        self.store.switch_history(session_id).await
    }
    async fn get_plan(&self, session_id: &str, plan_id: &str) -> crate::Result<Option<Plan>> {
        self.store.get_plan(session_id, plan_id).await
    }
    async fn acquire_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> crate::Result<bool> {
        self.store.acquire_lease(session_id, owner, ttl).await
    }
    async fn lease_session(
        &self,
        session_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> crate::Result<Option<crate::session::Session>> {
        self.store.lease_session(session_id, owner, ttl).await
    }
    async fn renew_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> crate::Result<bool> {
        self.store.renew_lease(session_id, owner, ttl).await
    }
    async fn release_lease(&self, session_id: &str, owner: &str) -> crate::Result<()> {
        self.store.release_lease(session_id, owner).await
    }
    async fn hold_liveness(&self, owner: &str) -> crate::Result<super::Liveness> {
        self.store.hold_liveness(owner).await
    }
    async fn orphaned_sessions(&self, limit: usize) -> crate::Result<Vec<String>> {
        self.store.orphaned_sessions(limit).await
    }
    async fn commit_notices(&self) -> crate::Result<Option<super::CommitNotices>> {
        self.store.commit_notices().await
    }
    async fn request_cancel(&self, session_id: &str) -> crate::Result<Option<String>> {
        self.store.request_cancel(session_id).await
    }
    async fn cancel_requests(&self, owner: &str) -> crate::Result<Vec<String>> {
        self.store.cancel_requests(owner).await
    }
    async fn cancel_notices(&self) -> crate::Result<Option<super::CommitNotices>> {
        self.store.cancel_notices().await
    }
}

/// A store on a fresh schema that keeps the schema alive while it lives.
pub async fn guarded(guard: &Arc<SchemaGuard>) -> Arc<dyn Storage> {
    Arc::new(Guarded {
        store: open_in(guard).await,
        guard: guard.clone(),
    })
}

impl SchemaGuard {
    /// The schema's name.
    pub fn schema(&self) -> &str {
        &self.schema
    }
}
