//! Postgres storage through sqlx: sessions shared by several server processes, with gap-free seqs
//! from counters on the session row and leases judged by the database's clock.
//!
//! Every [`Commit`] is one transaction following the shared commit order (`storage::commit`), whose
//! first step locks the session row (`FOR NO KEY UPDATE`), so two processes appending to one
//! session at once are serialized by Postgres and their seqs stay strictly increasing and gap-free.
//! A commit that only appends (most) is one statement, one round trip ([`APPEND_COMMIT`]); the
//! others run the shared steps in a transaction. Appending inserts new rows only: its cost does
//! not depend on the session's length.
//!
//! Times are stored as BIGINT milliseconds (the exact value of a [`Timestamp`]); JSON values as
//! TEXT holding serde_json's output, which comes back byte for byte (JSONB would refuse `\u0000`);
//! free text that tools or humans write (message content, approval reason and feedback) as UTF-8
//! BYTEA, since a Postgres TEXT value cannot hold a NUL character and a tool's output may.
//! Lease expiry is a `timestamptz` compared with `clock_timestamp()`, so processes with skewed
//! clocks agree on who holds a lease.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Executor, Postgres, QueryBuilder, Row, Transaction};
use tracing::instrument;

use super::commit::{self, CommitSteps, Head, SessionChange};
use super::support::{SessionCursor, check_commit, check_page_limit};
use super::{
    Commit, CommitNotice, CommitNotices, Committed, Expected, Leased, Liveness, SCHEMA_VERSION, SessionPage,
    SessionQuery, Storage, redact_url,
};
use crate::approval::{Approval, ApprovalResolution, ApprovalStatus, RequestType};
use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::protocol::{Event, Plan};
use crate::session::{
    AgentSwitch, Message, NewSession, Role, Session, SessionStatus, ToolCall, TurnStateJson, Usage,
};
use crate::time::Timestamp;

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// The migrations, in order: (version, SQL). The last version is [`SCHEMA_VERSION`].
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_owner_liveness.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_cancel_requests.sql"),
    ),
    (4, include_str!("../../migrations/postgres/0004_budgets.sql")),
    (
        5,
        include_str!("../../migrations/postgres/0005_tool_results_by_call.sql"),
    ),
    (
        6,
        include_str!("../../migrations/postgres/0006_sessions_indexes_off_the_commit_path.sql"),
    ),
    (
        7,
        include_str!("../../migrations/postgres/0007_sqlite_messages_events_without_rowid.sql"),
    ),
];

/// How long a pooled connection may sit idle before it is pinged when handed out.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// The LISTEN/NOTIFY channel of commits with events; the payload is `<lease owner or -> <session id>`.
const COMMITS_CHANNEL: &str = "agent_runtime_commits";

/// The LISTEN/NOTIFY channel of cancel requests; the payload is `<lease owner asked> <session id>`.
const CANCELS_CHANNEL: &str = "agent_runtime_cancels";

/// True while the owner `r` (a `runtime_owners` row) holds its advisory lock. A bigint advisory
/// lock shows in `pg_locks` with its high half in `classid`, its low half in `objid`, `objsubid` 1.
macro_rules! owner_lock_held {
    () => {
        "EXISTS (SELECT 1 FROM pg_locks l
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND ((l.classid::bigint << 32) | l.objid::bigint) = r.lock_key)"
    };
}

/// True for a session row whose lease owner registered (`runtime_owners`) and no longer holds its
/// advisory lock: its process, or its liveness connection, is gone.
const LEASE_OWNER_DEAD: &str = concat!(
    "EXISTS (SELECT 1 FROM runtime_owners r WHERE r.owner = sessions.lease_owner AND NOT ",
    owner_lock_held!(),
    ")"
);

/// Forgets dead owners that hold no lease any more.
const FORGET_DEAD_OWNERS: &str = concat!(
    "DELETE FROM runtime_owners r
     WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.lease_owner = r.owner) AND NOT ",
    owner_lock_held!()
);

/// Advisory lock key that serializes schema creation and migrations across processes.
const MIGRATION_LOCK_KEY: i64 = 0x6167_656e_7472_7431; // "agentrt1"

/// Columns of `sessions` that make a [`Session`], in the order [`session_from_row`] reads them.
const SESSION_COLUMNS: &str = "id, user_id, metadata, created_at, last_activity, current_agent, \
     status, message_count, last_message_seq, last_event_seq, prompt_tokens, completion_tokens, \
     turn_state, budget, cost, cached_prompt_tokens";

const MESSAGE_COLUMNS: &str = "seq, role, content, agent, tool_calls, tool_call_id, created_at";

const APPROVAL_COLUMNS: &str = "session_id, call_id, tool_name, arguments, reason, request_type, \
     status, created_at, decided_at, feedback, modified_arguments";

/// How to connect: pool size, schema, timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct PgOptions {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// The schema the tables live in (created if absent, and set as the `search_path` of every
    /// connection). `None`: the server's default `search_path` (normally `public`).
    pub schema: Option<String>,
    /// How long to wait for a pooled connection before failing with `Database`.
    pub acquire_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 10,
            schema: None,
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

/// Storage in a Postgres database, shared safely by several processes.
#[derive(Debug, Clone)]
pub struct PostgresStorage {
    pool: PgPool,
    /// Commit notices to send (`<owner> <session>`), sent by [`send_notices`] after the commit.
    notices: tokio::sync::mpsc::UnboundedSender<String>,
}

/// Sends commit notices in batches, off the commits' path. A NOTIFY inside a commit makes Postgres
/// serialize the commits that notify (its notify queue takes a database-wide lock until the
/// transaction ends): measured at 64 users, 167–170 scenarios/s that way against 177–188 batched
/// and 180–187 with no notices at all. Sent afterwards, a notice costs one short statement per
/// batch, and listeners still read the committed rows (a notice is only a wake-up).
///
/// The notices go out on a connection of their own, not the pool's: behind a busy pool a wake-up
/// waited for a free connection (tens of milliseconds at 64 users), and its transaction commits
/// with `synchronous_commit = off`, since a wake-up lost to a crash costs a follower latency
/// (it polls), never an event. If that connection cannot be had, the pool sends the batch.
async fn send_notices(
    pool: PgPool,
    connect: PgConnectOptions,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut own: Option<PgConnection> = None;
    let mut batch: Vec<String> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(n) => batch.push(n),
                Err(_) => break,
            }
        }
        batch.sort();
        batch.dedup();
        if own.is_none() {
            own = notice_connection(&connect).await;
        }
        let notify = || {
            sqlx::query("SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n")
                .bind(COMMITS_CHANNEL)
                .bind(&batch)
        };
        let mut sent = match own.as_mut() {
            Some(conn) => notify().execute(&mut *conn).await,
            None => notify().execute(&pool).await,
        };
        if sent.is_err() && own.take().is_some() {
            // The connection was lost: this batch goes through the pool, the next reconnects.
            sent = notify().execute(&pool).await;
        }
        if let Err(e) = sent {
            tracing::warn!(error = %e, notices = batch.len(), "commit notices not sent; followers in other processes poll");
        }
        batch.clear();
    }
}

/// The `application_name` of the notice sender's connection (`pg_stat_activity` shows it).
pub const NOTICES_APPLICATION: &str = "agent-runtime commit notices";

/// The notice sender's own connection, committing without waiting for the WAL's flush; `None`
/// (logged) if it cannot be opened, and the pool is used meanwhile.
async fn notice_connection(connect: &PgConnectOptions) -> Option<PgConnection> {
    let opened = async {
        let named = connect.clone().application_name(NOTICES_APPLICATION);
        let mut conn = PgConnection::connect_with(&named).await?;
        conn.execute("SET synchronous_commit = off").await?;
        Ok::<_, sqlx::Error>(conn)
    };
    match tokio::time::timeout(Duration::from_secs(5), opened).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "commit notices: no connection of their own; sending through the pool");
            None
        }
        Err(_) => {
            tracing::warn!("commit notices: connecting timed out; sending through the pool");
            None
        }
    }
}

impl PostgresStorage {
    /// Connects to `postgres://...` or `postgresql://...` with default [`PgOptions`] and applies
    /// the migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// Connects with `options` and applies the migrations (creating the schema if it is absent).
    /// `Database` if the server cannot be reached or its schema is newer than this build.
    #[instrument(skip_all, fields(url = %redact_url(url), schema = ?options.schema))]
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::InvalidRequest(format!(
                "not a postgres url: '{}'",
                redact_url(url)
            )));
        }
        if options.max_connections == 0 {
            return Err(Error::InvalidRequest("max_connections must be at least 1".into()));
        }
        let schema = match &options.schema {
            Some(s) => Some(quote_ident(s)?),
            None => None,
        };
        let connect_options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Database(format!("invalid postgres url '{}': {e}", redact_url(url))))?;
        let mut pool_options = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // sqlx pings every connection it hands out by default: a round trip before each
            // statement. Only a connection idle long enough to have been cut is pinged (and
            // replaced if dead); one in steady use shows a cut as the error of its next query.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            });
        if let Some(quoted) = &schema {
            // Every connection, including ones the pool opens later, works in the schema only.
            let set_path: Arc<str> = format!("SET search_path TO {quoted}").into();
            pool_options = pool_options.after_connect(move |conn, _meta| {
                let sql = set_path.clone();
                Box::pin(async move {
                    conn.execute(sqlx::AssertSqlSafe(sql.to_string())).await?;
                    Ok(())
                })
            });
        }
        let target = super::diagnose::PgTarget::of(&connect_options);
        // One direct connection first: the pool would only report "timed out" after
        // `acquire_timeout`, where this says "connection refused" or "database does not exist"
        // at once.
        let probe = tokio::time::timeout(
            options.acquire_timeout,
            PgConnection::connect_with(&connect_options),
        )
        .await
        .map_err(|_| target.timed_out(options.acquire_timeout.as_secs()))?
        .map_err(|e| target.connect_failed(&e))?;
        let _ = probe.close().await;
        let pool = pool_options
            .connect_with(connect_options.clone())
            .await
            .map_err(|e| target.connect_failed(&e))?;
        migrate(&pool, schema.as_deref()).await?;
        let (notices, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(send_notices(pool.clone(), connect_options, rx));
        Ok(PostgresStorage { pool, notices })
    }

    /// The underlying pool (for embedders that keep their own tables next to the runtime's).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Creates the schema if needed and applies every migration newer than the database's version,
/// in one transaction under an advisory lock, so processes starting together do not race.
async fn migrate(pool: &PgPool, schema: Option<&str>) -> Result<()> {
    let mut tx = pool.begin().await.map_err(Error::database)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *tx)
        .await
        .map_err(Error::database)?;
    if let Some(quoted) = schema {
        tx.execute(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {quoted}"
        )))
        .await
        .map_err(Error::database)?;
    }
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    BIGINT PRIMARY KEY,
             applied_at BIGINT NOT NULL
         )",
    )
    .await
    .map_err(Error::database)?;
    let current: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(Error::database)?;
    if current > SCHEMA_VERSION {
        return Err(Error::Database(format!(
            "database schema version {current} is newer than this build supports \
             ({SCHEMA_VERSION}); upgrade agent-runtime"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tracing::info!(version, "applying postgres migration");
        sqlx::raw_sql(*sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::Database(format!("migration {version} failed: {e}")))?;
        sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)")
            .bind(version)
            .bind(Timestamp::now().as_millis())
            .execute(&mut *tx)
            .await
            .map_err(Error::database)?;
    }
    tx.commit().await.map_err(Error::database)
}

/// `name` as a quoted SQL identifier. Only plain names are accepted, so a schema name can never
/// smuggle SQL in.
fn quote_ident(name: &str) -> Result<String> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        Ok(format!("\"{name}\""))
    } else {
        Err(Error::InvalidRequest(format!(
            "invalid schema name '{name}': use 1-63 ASCII letters, digits and '_', not starting with a digit"
        )))
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::InvalidRequest(format!("{what} {v} is out of range")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Database(format!("stored {what} {v} is negative")))
}

/// A page size as SQL `LIMIT`: `usize` beyond `i64` is as good as unlimited.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn to_json_text(v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(format!("cannot serialize: {e}")))
}

fn from_json_text<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::Database(format!("stored {what} is not valid: {e}")))
}

fn get<'r, T>(row: &'r PgRow, col: &str) -> Result<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(col).map_err(Error::database)
}

/// Free text stored as UTF-8 bytes (BYTEA holds NUL characters, TEXT cannot).
fn text_from_bytes(bytes: Vec<u8>, what: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|_| Error::Database(format!("stored {what} is not UTF-8")))
}

/// A session's budgets as stored: `NULL` when unlimited.
fn budget_text(b: &Budget) -> Result<Option<String>> {
    if b.is_unlimited() {
        Ok(None)
    } else {
        to_json_text(b).map(Some)
    }
}

fn session_from_row(row: &PgRow) -> Result<Session> {
    let status: String = get(row, "status")?;
    let metadata: String = get(row, "metadata")?;
    let turn_state: Option<String> = get(row, "turn_state")?;
    let budget: Option<String> = get(row, "budget")?;
    Ok(Session {
        id: get(row, "id")?,
        user_id: get(row, "user_id")?,
        metadata: from_json_text(&metadata, "metadata")?,
        created_at: Timestamp::from_millis(get(row, "created_at")?),
        last_activity: Timestamp::from_millis(get(row, "last_activity")?),
        current_agent: get(row, "current_agent")?,
        status: SessionStatus::parse(&status)
            .ok_or_else(|| Error::Database(format!("stored session status '{status}' is unknown")))?,
        message_count: to_u64(get(row, "message_count")?, "message_count")?,
        last_message_seq: to_u64(get(row, "last_message_seq")?, "last_message_seq")?,
        last_event_seq: to_u64(get(row, "last_event_seq")?, "last_event_seq")?,
        usage: Usage {
            prompt_tokens: to_u64(get(row, "prompt_tokens")?, "prompt_tokens")?,
            completion_tokens: to_u64(get(row, "completion_tokens")?, "completion_tokens")?,
            cached_prompt_tokens: to_u64(get(row, "cached_prompt_tokens")?, "cached_prompt_tokens")?,
        },
        // The text as stored, checked to be JSON but not parsed into a value.
        turn_state: (turn_state.map(TurnStateJson::from_text).transpose())
            .map_err(|e| Error::Database(format!("stored turn_state is not valid: {e}")))?,
        budget: match budget {
            Some(b) => from_json_text(&b, "budget")?,
            None => Budget::default(),
        },
        cost: get(row, "cost")?,
    })
}

fn message_from_row(row: &PgRow) -> Result<Message> {
    let role: String = get(row, "role")?;
    let tool_calls: Option<String> = get(row, "tool_calls")?;
    Ok(Message {
        seq: to_u64(get(row, "seq")?, "message seq")?,
        role: Role::parse(&role)
            .ok_or_else(|| Error::Database(format!("stored message role '{role}' is unknown")))?,
        content: text_from_bytes(get(row, "content")?, "message content")?,
        agent: get(row, "agent")?,
        tool_calls: match tool_calls {
            Some(s) => from_json_text::<Vec<ToolCall>>(&s, "tool_calls")?,
            None => vec![],
        },
        tool_call_id: get(row, "tool_call_id")?,
        created_at: Timestamp::from_millis(get(row, "created_at")?),
    })
}

fn event_from_row(row: &PgRow) -> Result<Event> {
    let payload: String = get(row, "payload")?;
    Ok(Event::new(
        to_u64(get(row, "seq")?, "event seq")?,
        from_json_text(&payload, "event payload")?,
    ))
}

fn approval_from_row(row: &PgRow) -> Result<Approval> {
    let arguments: String = get(row, "arguments")?;
    let request_type: String = get(row, "request_type")?;
    let status: String = get(row, "status")?;
    let modified: Option<String> = get(row, "modified_arguments")?;
    let decided_at: Option<i64> = get(row, "decided_at")?;
    Ok(Approval {
        call_id: get(row, "call_id")?,
        session_id: get(row, "session_id")?,
        tool_name: get(row, "tool_name")?,
        arguments: from_json_text(&arguments, "approval arguments")?,
        reason: text_from_bytes(get(row, "reason")?, "approval reason")?,
        request_type: match request_type.as_str() {
            "tool" => RequestType::Tool,
            "plan" => RequestType::Plan,
            "budget" => RequestType::Budget,
            other => {
                return Err(Error::Database(format!(
                    "stored approval request_type '{other}' is unknown"
                )));
            }
        },
        status: ApprovalStatus::parse(&status)
            .ok_or_else(|| Error::Database(format!("stored approval status '{status}' is unknown")))?,
        created_at: Timestamp::from_millis(get(row, "created_at")?),
        decided_at: decided_at.map(Timestamp::from_millis),
        feedback: get::<Option<Vec<u8>>>(row, "feedback")?
            .map(|f| text_from_bytes(f, "approval feedback"))
            .transpose()?,
        modified_arguments: modified
            .map(|s| from_json_text(&s, "modified_arguments"))
            .transpose()?,
    })
}

/// Messages as the column arrays of an `UNNEST` insert (all but their seqs and time).
#[derive(Default)]
struct MessageColumns<'a> {
    roles: Vec<&'static str>,
    contents: Vec<&'a [u8]>,
    agents: Vec<Option<&'a str>>,
    tool_calls: Vec<Option<String>>,
    tool_call_ids: Vec<Option<&'a str>>,
}

impl<'a> MessageColumns<'a> {
    fn push(
        &mut self,
        role: Role,
        content: &'a str,
        agent: Option<&'a str>,
        tool_calls: &[ToolCall],
        tool_call_id: Option<&'a str>,
    ) -> Result<()> {
        self.roles.push(role.as_str());
        self.contents.push(content.as_bytes());
        self.agents.push(agent);
        self.tool_calls.push(if tool_calls.is_empty() {
            None
        } else {
            Some(to_json_text(&tool_calls)?)
        });
        self.tool_call_ids.push(tool_call_id);
        Ok(())
    }
}

fn switch_from_row(row: &PgRow) -> Result<AgentSwitch> {
    Ok(AgentSwitch {
        from_agent: get(row, "from_agent")?,
        to_agent: get(row, "to_agent")?,
        reason: get(row, "reason")?,
        timestamp: Timestamp::from_millis(get(row, "at")?),
    })
}

fn request_type_str(t: RequestType) -> &'static str {
    match t {
        RequestType::Tool => "tool",
        RequestType::Plan => "plan",
        RequestType::Budget => "budget",
    }
}

/// The lease's time to live in milliseconds, capped at 100 years (beyond that Postgres's
/// interval arithmetic overflows, and it is forever anyway).
fn lease_ttl_millis(ttl: Duration) -> f64 {
    const CAP: u128 = 100 * 366 * 24 * 3600 * 1000;
    ttl.as_millis().min(CAP) as f64
}

impl PostgresStorage {
    /// Takes the lease (see [`Storage::acquire_lease`]) and returns the session row as it is once
    /// taken, in one round trip; `None` if another owner holds the lease.
    async fn take_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<Option<PgRow>> {
        // One conditional UPDATE judged by the database's clock: atomic across processes.
        // The liveness test runs only when the lease is neither free, ours, nor expired.
        let taken = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE sessions
             SET lease_owner = $2,
                 lease_expires_at = clock_timestamp() + $3 * INTERVAL '1 millisecond',
                 cancel_requested_at = NULL
             WHERE id = $1
               AND CASE WHEN lease_owner IS NULL OR lease_owner = $2
                             OR lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp()
                        THEN TRUE
                        ELSE {LEASE_OWNER_DEAD} END
             RETURNING {SESSION_COLUMNS}"
        )))
        .bind(session_id)
        .bind(owner)
        .bind(lease_ttl_millis(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::database)?;
        if taken.is_none() {
            self.ensure_session(session_id).await?;
        }
        Ok(taken)
    }

    /// `SessionNotFound` unless the session exists (used when a read came back empty).
    async fn ensure_session(&self, session_id: &str) -> Result<()> {
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM sessions WHERE id = $1")
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::database)?;
        match found {
            Some(_) => Ok(()),
            None => Err(Error::SessionNotFound(session_id.to_string())),
        }
    }

    /// The rows a read of one session's children returns; if there are none, `SessionNotFound`
    /// when that is because the session is gone.
    async fn session_rows(&self, session_id: &str, query: PgQuery<'_>) -> Result<Vec<PgRow>> {
        let rows = query.fetch_all(&self.pool).await.map_err(Error::database)?;
        if rows.is_empty() {
            self.ensure_session(session_id).await?;
        }
        Ok(rows)
    }
}

/// One commit's steps in its transaction (dropped un-committed on error: Postgres rolls it back).
struct PgCommit<'t, 's> {
    tx: &'t mut Transaction<'static, Postgres>,
    session_id: &'s str,
    /// The session's recorded switches, read with its head: the next switch's seq follows it.
    switch_count: i64,
}

impl CommitSteps for PgCommit<'_, '_> {
    async fn head(&mut self) -> Result<Option<Head>> {
        // The row lock serializes every commit of this session, across processes, and with
        // `acquire_lease`: the owner holds the lease until another owner has taken it.
        let row = sqlx::query(
            "SELECT last_message_seq, last_event_seq, switch_count, lease_owner
             FROM sessions WHERE id = $1 FOR NO KEY UPDATE",
        )
        .bind(self.session_id)
        .fetch_optional(&mut **self.tx)
        .await
        .map_err(Error::database)?;
        let Some(row) = row else {
            return Ok(None);
        };
        self.switch_count = get(&row, "switch_count")?;
        Ok(Some(Head {
            last_message_seq: to_u64(get(&row, "last_message_seq")?, "last_message_seq")?,
            last_event_seq: to_u64(get(&row, "last_event_seq")?, "last_event_seq")?,
            lease_owner: get(&row, "lease_owner")?,
        }))
    }

    async fn put_approval(&mut self, a: &Approval) -> Result<()> {
        sqlx::query(
            "INSERT INTO approvals (session_id, call_id, tool_name, arguments, reason,
                 request_type, status, created_at, decided_at, feedback, modified_arguments)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (session_id, call_id) DO UPDATE SET
                 tool_name = EXCLUDED.tool_name, arguments = EXCLUDED.arguments,
                 reason = EXCLUDED.reason, request_type = EXCLUDED.request_type,
                 status = EXCLUDED.status, created_at = EXCLUDED.created_at,
                 decided_at = EXCLUDED.decided_at, feedback = EXCLUDED.feedback,
                 modified_arguments = EXCLUDED.modified_arguments",
        )
        .bind(self.session_id)
        .bind(&a.call_id)
        .bind(&a.tool_name)
        .bind(to_json_text(&a.arguments)?)
        .bind(a.reason.as_bytes())
        .bind(request_type_str(a.request_type))
        .bind(a.status.as_str())
        .bind(a.created_at.as_millis())
        .bind(a.decided_at.map(Timestamp::as_millis))
        .bind(a.feedback.as_deref().map(str::as_bytes))
        .bind(a.modified_arguments.as_ref().map(to_json_text).transpose()?)
        .execute(&mut **self.tx)
        .await
        .map_err(Error::database)?;
        Ok(())
    }

    async fn decide(&mut self, r: &ApprovalResolution) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE approvals SET status = $3, feedback = $4, modified_arguments = $5,
                 decided_at = $6
             WHERE session_id = $1 AND call_id = $2 AND status = 'pending'",
        )
        .bind(self.session_id)
        .bind(&r.call_id)
        .bind(r.status.as_str())
        .bind(r.feedback.as_deref().map(str::as_bytes))
        .bind(r.modified_arguments.as_ref().map(to_json_text).transpose()?)
        .bind(r.decided_at.as_millis())
        .execute(&mut **self.tx)
        .await
        .map_err(Error::database)?
        .rows_affected();
        Ok(done == 1)
    }

    async fn approval_exists(&mut self, call_id: &str) -> Result<bool> {
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM approvals WHERE session_id = $1 AND call_id = $2")
                .bind(self.session_id)
                .bind(call_id)
                .fetch_optional(&mut **self.tx)
                .await
                .map_err(Error::database)?;
        Ok(exists.is_some())
    }

    async fn insert_messages(&mut self, messages: &[Message]) -> Result<()> {
        let Some(first) = messages.first() else {
            return Ok(());
        };
        // One statement for all of them; they share the commit's time.
        let mut seqs = Vec::with_capacity(messages.len());
        let mut columns = MessageColumns::default();
        for m in messages {
            seqs.push(to_i64(m.seq, "message seq")?);
            columns.push(
                m.role,
                &m.content,
                m.agent.as_deref(),
                &m.tool_calls,
                m.tool_call_id.as_deref(),
            )?;
        }
        sqlx::query(
            "INSERT INTO messages (session_id, seq, role, content, agent, tool_calls,
                 tool_call_id, created_at)
             SELECT $1, t.seq, t.role, t.content, t.agent, t.tool_calls, t.tool_call_id, $8
             FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::BYTEA[], $5::TEXT[], $6::TEXT[],
                         $7::TEXT[]) AS t(seq, role, content, agent, tool_calls, tool_call_id)",
        )
        .bind(self.session_id)
        .bind(seqs)
        .bind(columns.roles)
        .bind(columns.contents)
        .bind(columns.agents)
        .bind(columns.tool_calls)
        .bind(columns.tool_call_ids)
        .bind(first.created_at.as_millis())
        .execute(&mut **self.tx)
        .await
        .map_err(Error::database)?;
        Ok(())
    }

    async fn insert_events(&mut self, events: &[Event], at: Timestamp) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut seqs = Vec::with_capacity(events.len());
        let mut kinds = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        for e in events {
            seqs.push(to_i64(e.seq, "event seq")?);
            kinds.push(e.payload.kind());
            let json = e.payload_json();
            payloads.push(
                json.map_err(|e| Error::Internal(format!("cannot serialize: {e}")))?
                    .into_owned(),
            );
        }
        sqlx::query(
            "INSERT INTO events (session_id, seq, kind, payload, created_at)
             SELECT $1, t.seq, t.kind, t.payload, $5
             FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::TEXT[]) AS t(seq, kind, payload)",
        )
        .bind(self.session_id)
        .bind(seqs)
        .bind(kinds)
        .bind(payloads)
        .bind(at.as_millis())
        .execute(&mut **self.tx)
        .await
        .map_err(Error::database)?;
        Ok(())
    }

    async fn remember_request(&mut self, request_id: &str, first_event_seq: u64) -> Result<()> {
        sqlx::query(
            "INSERT INTO requests (session_id, request_id, event_seq) VALUES ($1, $2, $3)
             ON CONFLICT (session_id, request_id) DO NOTHING",
        )
        .bind(self.session_id)
        .bind(request_id)
        .bind(to_i64(first_event_seq, "event seq")?)
        .execute(&mut **self.tx)
        .await
        .map_err(Error::database)?;
        Ok(())
    }

    async fn insert_switches(&mut self, switches: &[AgentSwitch]) -> Result<()> {
        for (seq, s) in (self.switch_count + 1..).zip(switches) {
            sqlx::query(
                "INSERT INTO switches (session_id, seq, from_agent, to_agent, reason, at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(self.session_id)
            .bind(seq)
            .bind(&s.from_agent)
            .bind(&s.to_agent)
            .bind(&s.reason)
            .bind(s.timestamp.as_millis())
            .execute(&mut **self.tx)
            .await
            .map_err(Error::database)?;
        }
        Ok(())
    }

    async fn put_plan(&mut self, p: &Plan) -> Result<()> {
        sqlx::query(
            "INSERT INTO plans (session_id, plan_id, plan) VALUES ($1, $2, $3)
             ON CONFLICT (session_id, plan_id) DO UPDATE SET plan = EXCLUDED.plan",
        )
        .bind(self.session_id)
        .bind(&p.plan_id)
        .bind(to_json_text(p)?)
        .execute(&mut **self.tx)
        .await
        .map_err(Error::database)?;
        Ok(())
    }

    async fn update_session(&mut self, change: SessionChange) -> Result<Session> {
        let query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE sessions SET {APPLY_CHANGE} WHERE id = $1 RETURNING {SESSION_COLUMNS}"
        )))
        .bind(self.session_id);
        let row = bind_change(query, &change)?
            .fetch_one(&mut **self.tx)
            .await
            .map_err(Error::database)?;
        session_from_row(&row)
    }
}

/// The `SET` list applying a [`SessionChange`] to the session row but its lease (`$13`, given
/// up or not): `$2` to `$12` and `$14` to `$17`, bound by [`bind_change`].
macro_rules! apply_counts {
    () => {
        "last_message_seq = last_message_seq + $2,
         last_event_seq = last_event_seq + $3,
         message_count = message_count + $4,
         switch_count = switch_count + $5,
         prompt_tokens = prompt_tokens + $6,
         completion_tokens = completion_tokens + $7,
         last_activity = $8,
         status = COALESCE($9, status),
         current_agent = COALESCE($10, current_agent),
         turn_state = CASE WHEN $11 THEN $12 ELSE turn_state END,
         cost = cost + $14,
         cached_prompt_tokens = cached_prompt_tokens + $15,
         budget = CASE WHEN $16 THEN $17 ELSE budget END"
    };
}

/// The `SET` list applying a [`SessionChange`] to the session row: `$1` is the session's id,
/// `$2` to `$17` the change, bound by [`bind_change`].
const APPLY_CHANGE: &str = concat!(
    apply_counts!(),
    ",
     lease_owner = CASE WHEN $13 THEN NULL ELSE lease_owner END,
     lease_expires_at = CASE WHEN $13 THEN NULL ELSE lease_expires_at END,
     cancel_requested_at = CASE WHEN $13 THEN NULL ELSE cancel_requested_at END"
);

/// Binds `$2` to `$17` of [`APPLY_CHANGE`] (the query has bound `$1`, the session's id).
fn bind_change<'q>(query: PgQuery<'q>, change: &'q SessionChange) -> Result<PgQuery<'q>> {
    let (set_turn_state, turn_state) = match &change.turn_state {
        None => (false, None),
        Some(v) => (true, v.as_ref().map(TurnStateJson::as_str)),
    };
    Ok(query
        .bind(to_i64(change.messages, "message count")?)
        .bind(to_i64(change.events, "event count")?)
        .bind(to_i64(change.counted_messages, "message count")?)
        .bind(to_i64(change.switches, "switch count")?)
        .bind(to_i64(change.usage.prompt_tokens, "prompt_tokens")?)
        .bind(to_i64(change.usage.completion_tokens, "completion_tokens")?)
        .bind(change.at.as_millis())
        .bind(change.status.map(SessionStatus::as_str))
        .bind(change.current_agent.as_deref())
        .bind(set_turn_state)
        .bind(turn_state)
        .bind(change.release_lease)
        .bind(change.cost)
        .bind(to_i64(change.usage.cached_prompt_tokens, "cached_prompt_tokens")?)
        .bind(change.budget.is_some())
        .bind(change.budget.as_ref().map(budget_text).transpose()?.flatten()))
}

/// An appending commit ([`commit::Appending`]) as one statement, which Postgres runs as its own
/// transaction: the shared commit's steps as data-modifying CTEs. `head` locks the session row as
/// the first step does; `ok` is that head unless the commit is fenced (`$18`, its lease owner)
/// by a lease someone else holds; every write reads `ok`, so a refused commit writes nothing,
/// and numbers its rows from the locked head (`WITH ORDINALITY` counts from 1), as
/// `Appending::finish` does. The one row returned is the head as locked and the session as
/// written (NULL columns if nothing was); no row: no session. `$19`–`$23` are the messages'
/// columns, `$24`–`$25` the events', `$26` the request id; `$8` is the commit's time.
static APPEND_COMMIT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH head AS (
             SELECT id, last_message_seq, last_event_seq, lease_owner
             FROM sessions WHERE id = $1 FOR NO KEY UPDATE
         ), ok AS (
             SELECT * FROM head WHERE $18::TEXT IS NULL OR lease_owner = $18
         ), {APPEND_ROWS}, s AS (
             UPDATE sessions SET {APPLY_CHANGE}
             WHERE id = $1 AND EXISTS (SELECT 1 FROM ok)
             RETURNING {SESSION_COLUMNS}
         )
         SELECT head.last_message_seq AS head_message_seq, head.last_event_seq AS head_event_seq,
             head.lease_owner AS head_lease_owner, s.*
         FROM head LEFT JOIN s ON TRUE"
    )
});

/// The rows of an appending commit, as data-modifying CTEs reading `ok` (the locked head, only
/// if the commit may write): its messages (`$19`–`$23`), events (`$24`–`$25`) and request id
/// (`$26`), numbered from `ok`'s seqs and stamped `$8`.
const APPEND_ROWS: &str = "m AS (
             INSERT INTO messages (session_id, seq, role, content, agent, tool_calls,
                 tool_call_id, created_at)
             SELECT ok.id, ok.last_message_seq + t.n, t.role, t.content, t.agent, t.tool_calls,
                 t.tool_call_id, $8
             FROM ok, UNNEST($19::TEXT[], $20::BYTEA[], $21::TEXT[], $22::TEXT[], $23::TEXT[])
                 WITH ORDINALITY AS t(role, content, agent, tool_calls, tool_call_id, n)
         ), e AS (
             INSERT INTO events (session_id, seq, kind, payload, created_at)
             SELECT ok.id, ok.last_event_seq + t.n, t.kind, t.payload, $8
             FROM ok, UNNEST($24::TEXT[], $25::TEXT[]) WITH ORDINALITY AS t(kind, payload, n)
         ), r AS (
             INSERT INTO requests (session_id, request_id, event_seq)
             SELECT ok.id, $26, ok.last_event_seq + 1 FROM ok WHERE $26::TEXT IS NOT NULL
             ON CONFLICT (session_id, request_id) DO NOTHING
         )";

/// [`Storage::lease_and_commit`] for an appending commit fenced by the owner taking the lease, as
/// one statement: [`APPEND_COMMIT`]'s rows and session change, with the lease taken as
/// `take_lease` takes it. `head` locks the row and judges whether `$18` may take the lease
/// (`free`); `ok` is that head only if it is free, the session is as expected (`$28` its status,
/// `$29` its agent, `$30` its last event seq, each where given) and no turn was started with the
/// request id `$26`. Postgres updates a row at most once per statement, so the session is
/// updated by one of two exclusive `UPDATE`s: `s` takes the lease (for `$27` ms) and applies the
/// change, `t` (free but not as expected) only takes the lease. The one row returned is the head
/// as locked, whether it was free, whether the commit was stored, and the session as written
/// (NULL columns if nothing was); no row: no session.
static LEASE_AND_APPEND: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    const TAKE: &str = "lease_owner = $18,
             lease_expires_at = clock_timestamp() + $27 * INTERVAL '1 millisecond',
             cancel_requested_at = NULL";
    format!(
        "WITH head AS (
             SELECT id, last_message_seq, last_event_seq, lease_owner, status, current_agent,
                 CASE WHEN lease_owner IS NULL OR lease_owner = $18
                           OR lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp()
                      THEN TRUE
                      ELSE {LEASE_OWNER_DEAD} END AS free
             FROM sessions WHERE id = $1 FOR NO KEY UPDATE
         ), ok AS (
             SELECT * FROM head
             WHERE free AND status = $28
               AND ($29::TEXT IS NULL OR current_agent = $29)
               AND ($30::BIGINT IS NULL OR last_event_seq = $30)
               AND NOT EXISTS (SELECT 1 FROM requests q WHERE q.session_id = $1 AND q.request_id = $26)
         ), {APPEND_ROWS}, s AS (
             UPDATE sessions SET {counts}, {TAKE}
             WHERE id = $1 AND EXISTS (SELECT 1 FROM ok)
             RETURNING {SESSION_COLUMNS}
         ), t AS (
             UPDATE sessions SET {TAKE}
             WHERE id = $1 AND EXISTS (SELECT 1 FROM head WHERE free) AND NOT EXISTS (SELECT 1 FROM ok)
             RETURNING {SESSION_COLUMNS}
         ), written AS (
             SELECT * FROM s UNION ALL SELECT * FROM t
         )
         SELECT head.last_message_seq AS head_message_seq, head.last_event_seq AS head_event_seq,
             head.free, EXISTS (SELECT 1 FROM s) AS committed, written.*
         FROM head LEFT JOIN written ON TRUE",
        counts = apply_counts!()
    )
});

/// An appending commit's statement ([`APPEND_COMMIT`] or [`LEASE_AND_APPEND`]) with `$1` to
/// `$26` bound: the session's id, the change, `fence` (`$18`) and the rows.
fn bind_append<'q>(
    sql: &'q str,
    session_id: &'q str,
    commit: &'q commit::Appending,
    fence: Option<&'q str>,
) -> Result<PgQuery<'q>> {
    let mut columns = MessageColumns::default();
    for m in &commit.messages {
        columns.push(
            m.role,
            &m.content,
            m.agent.as_deref(),
            &m.tool_calls,
            m.tool_call_id.as_deref(),
        )?;
    }
    let mut kinds = Vec::with_capacity(commit.events.len());
    let mut payloads = Vec::with_capacity(commit.events.len());
    for (e, json) in &commit.events {
        kinds.push(e.kind());
        payloads.push(&**json);
    }
    let query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(session_id);
    Ok(bind_change(query, &commit.change)?
        .bind(fence)
        .bind(columns.roles)
        .bind(columns.contents)
        .bind(columns.agents)
        .bind(columns.tool_calls)
        .bind(columns.tool_call_ids)
        .bind(kinds)
        .bind(payloads)
        .bind(commit.request_id.as_deref()))
}

impl PostgresStorage {
    /// Stores an appending commit in one round trip ([`APPEND_COMMIT`]).
    async fn append(&self, session_id: &str, commit: commit::Appending) -> Result<Committed> {
        let row = bind_append(&APPEND_COMMIT, session_id, &commit, commit.lease_owner.as_deref())?
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::database)?;
        let (head, session) = match &row {
            None => (None, None),
            Some(row) => {
                let head = Head {
                    last_message_seq: to_u64(get(row, "head_message_seq")?, "last_message_seq")?,
                    last_event_seq: to_u64(get(row, "head_event_seq")?, "last_event_seq")?,
                    lease_owner: get(row, "head_lease_owner")?,
                };
                let written: Option<String> = get(row, "id")?;
                let session = written.map(|_| session_from_row(row)).transpose()?;
                (Some(head), session)
            }
        };
        commit.finish(session_id, head, session)
    }
}

#[async_trait]
impl Storage for PostgresStorage {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(Error::database)?;
        Ok(())
    }

    #[instrument(skip_all, fields(session_id = %new.id))]
    async fn create_session(&self, new: NewSession) -> Result<Session> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO sessions (id, user_id, metadata, created_at, last_activity, current_agent,
                 status, budget)
             VALUES ($1, $2, $3, $4, $4, $5, 'idle', $6)
             RETURNING {SESSION_COLUMNS}"
        )))
        .bind(&new.id)
        .bind(new.user_id.as_deref())
        .bind(to_json_text(&new.metadata)?)
        .bind(new.created_at.as_millis())
        .bind(&new.current_agent)
        .bind(budget_text(&new.budget)?)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => Error::SessionExists(new.id.clone()),
            _ => Error::database(e),
        })?;
        session_from_row(&row)
    }

    #[instrument(skip(self))]
    async fn get_session(&self, id: &str) -> Result<Session> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::database)?
        .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        session_from_row(&row)
    }

    #[instrument(skip(self))]
    async fn list_sessions(&self, query: SessionQuery) -> Result<SessionPage> {
        check_page_limit(query.limit)?;
        let after = query.cursor.as_deref().map(SessionCursor::decode).transpose()?;
        let filtered = |select: &str| {
            let mut q: QueryBuilder<Postgres> =
                QueryBuilder::new(format!("SELECT {select} FROM sessions WHERE TRUE"));
            if let Some(user_id) = &query.user_id {
                q.push(" AND user_id = ").push_bind(user_id.clone());
            }
            if let Some(status) = query.status {
                q.push(" AND status = ").push_bind(status.as_str());
            }
            q
        };
        // Counted over the filters alone, on the user_id or status index (migration 0006).
        let total: i64 = filtered("COUNT(*)")
            .build_query_scalar()
            .fetch_one(&self.pool)
            .await
            .map_err(Error::database)?;
        let mut q = filtered(SESSION_COLUMNS);
        if let Some(after) = after {
            q.push(" AND (last_activity, id) < (")
                .push_bind(after.last_activity)
                .push(", ")
                .push_bind(after.id)
                .push(")");
        }
        q.push(" ORDER BY last_activity DESC, id DESC LIMIT ")
            .push_bind(query.limit as i64 + 1);
        let rows = q.build().fetch_all(&self.pool).await.map_err(Error::database)?;
        let mut sessions = rows.iter().map(session_from_row).collect::<Result<Vec<_>>>()?;
        let next_cursor = if sessions.len() > query.limit {
            sessions.truncate(query.limit);
            sessions
                .last()
                .map(|s| SessionCursor::after(s.last_activity, &s.id).encode())
        } else {
            None
        };
        Ok(SessionPage {
            sessions,
            next_cursor,
            total: u64::try_from(total).unwrap_or_default(),
        })
    }

    #[instrument(skip(self))]
    async fn delete_session(&self, id: &str) -> Result<()> {
        // Every other table references sessions ON DELETE CASCADE: one statement, atomic.
        let deleted = sqlx::query("DELETE FROM sessions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(Error::database)?
            .rows_affected();
        if deleted == 0 {
            return Err(Error::SessionNotFound(id.to_string()));
        }
        Ok(())
    }

    #[instrument(skip(self, commit), fields(
        messages = commit.messages.len(),
        events = commit.events.len(),
    ))]
    async fn commit(&self, session_id: &str, commit: Commit) -> Result<Committed> {
        check_commit(session_id, &commit)?;
        let notice = (!commit.events.is_empty())
            .then(|| format!("{} {session_id}", commit.lease_owner.as_deref().unwrap_or("-")));
        let committed = match commit::Appending::of(commit)? {
            // Most commits: one round trip.
            Ok(appending) => self.append(session_id, appending).await?,
            Err(commit) => {
                let mut tx = self.pool.begin().await.map_err(Error::database)?;
                // On error `tx` is dropped un-committed: Postgres rolls the whole commit back.
                let mut steps = PgCommit {
                    tx: &mut tx,
                    session_id,
                    switch_count: 0,
                };
                let committed = commit::run(&mut steps, session_id, *commit).await?;
                tx.commit().await.map_err(Error::database)?;
                committed
            }
        };
        if let Some(payload) = notice {
            // To listeners (other processes' followers), now that it is committed.
            let _ = self.notices.send(payload);
        }
        Ok(committed)
    }

    #[instrument(skip(self))]
    async fn messages_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Message>> {
        let query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = $1 AND seq > $2
             ORDER BY seq LIMIT $3"
        )))
        .bind(session_id)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(sql_limit(limit));
        let rows = self.session_rows(session_id, query).await?;
        rows.iter().map(message_from_row).collect()
    }

    #[instrument(skip(self))]
    async fn recent_messages(&self, session_id: &str, limit: usize) -> Result<Vec<Message>> {
        let query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = $1
             ORDER BY seq DESC LIMIT $2"
        )))
        .bind(session_id)
        .bind(sql_limit(limit));
        let rows = self.session_rows(session_id, query).await?;
        rows.iter().rev().map(message_from_row).collect()
    }

    #[instrument(skip(self))]
    async fn events_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Event>> {
        let query = sqlx::query(
            "SELECT seq, payload FROM events WHERE session_id = $1 AND seq > $2
             ORDER BY seq LIMIT $3",
        )
        .bind(session_id)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(sql_limit(limit));
        let rows = self.session_rows(session_id, query).await?;
        rows.iter().map(event_from_row).collect()
    }

    #[instrument(skip(self))]
    async fn find_request(&self, session_id: &str, request_id: &str) -> Result<Option<u64>> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT event_seq FROM requests WHERE session_id = $1 AND request_id = $2")
                .bind(session_id)
                .bind(request_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(Error::database)?;
        match seq {
            Some(s) => Ok(Some(to_u64(s, "request event seq")?)),
            None => {
                self.ensure_session(session_id).await?;
                Ok(None)
            }
        }
    }

    #[instrument(skip(self))]
    async fn tool_call_answered(&self, session_id: &str, call_id: &str) -> Result<bool> {
        let answered: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE session_id = $1 AND tool_call_id = $2)",
        )
        .bind(session_id)
        .bind(call_id)
        .fetch_one(&self.pool)
        .await
        .map_err(Error::database)?;
        if !answered {
            self.ensure_session(session_id).await?;
        }
        Ok(answered)
    }

    #[instrument(skip(self))]
    async fn get_approval(&self, session_id: &str, call_id: &str) -> Result<Approval> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE session_id = $1 AND call_id = $2"
        )))
        .bind(session_id)
        .bind(call_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::database)?;
        match row {
            Some(row) => approval_from_row(&row),
            None => {
                self.ensure_session(session_id).await?;
                Err(Error::ApprovalNotFound(call_id.to_string()))
            }
        }
    }

    #[instrument(skip(self))]
    async fn pending_approvals(&self, session_id: &str) -> Result<Vec<Approval>> {
        let query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE session_id = $1 AND status = 'pending'
             ORDER BY created_at, ord"
        )))
        .bind(session_id);
        let rows = self.session_rows(session_id, query).await?;
        rows.iter().map(approval_from_row).collect()
    }

    #[instrument(skip(self))]
    async fn switch_history(&self, session_id: &str) -> Result<Vec<AgentSwitch>> {
        let query = sqlx::query(
            "SELECT from_agent, to_agent, reason, at FROM switches WHERE session_id = $1
             ORDER BY seq",
        )
        .bind(session_id);
        let rows = self.session_rows(session_id, query).await?;
        rows.iter().map(switch_from_row).collect()
    }

    #[instrument(skip(self))]
    async fn session_history(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Session, Vec<Message>, Vec<AgentSwitch>)> {
        // Two round trips, not four: the session with its switches (a row per switch, or one
        // with no switch), then its messages, which need no check that the session exists.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS}, w.from_agent, w.to_agent, w.reason, w.at
             FROM sessions LEFT JOIN switches w ON w.session_id = sessions.id
             WHERE sessions.id = $1 ORDER BY w.seq"
        )))
        .bind(session_id)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::database)?;
        let Some(first) = rows.first() else {
            return Err(Error::SessionNotFound(session_id.to_string()));
        };
        let session = session_from_row(first)?;
        let switches = match get::<Option<String>>(first, "to_agent")? {
            None => vec![],
            Some(_) => rows.iter().map(switch_from_row).collect::<Result<_>>()?,
        };
        let messages = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = $1 AND seq > $2
             ORDER BY seq LIMIT $3"
        )))
        .bind(session_id)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(Error::database)?
        .iter()
        .map(message_from_row)
        .collect::<Result<_>>()?;
        Ok((session, messages, switches))
    }

    #[instrument(skip(self))]
    async fn get_plan(&self, session_id: &str, plan_id: &str) -> Result<Option<Plan>> {
        let plan: Option<String> =
            sqlx::query_scalar("SELECT plan FROM plans WHERE session_id = $1 AND plan_id = $2")
                .bind(session_id)
                .bind(plan_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(Error::database)?;
        if plan.is_none() {
            self.ensure_session(session_id).await?;
        }
        plan.map(|p| from_json_text(&p, "plan")).transpose()
    }

    #[instrument(skip(self))]
    async fn acquire_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        Ok(self.take_lease(session_id, owner, ttl).await?.is_some())
    }

    #[instrument(skip(self))]
    async fn lease_session(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<Option<Session>> {
        self.take_lease(session_id, owner, ttl)
            .await?
            .map(|row| session_from_row(&row))
            .transpose()
    }

    /// One statement ([`LEASE_AND_APPEND`]) for an appending commit fenced by `owner` that keeps
    /// the lease; any other commit goes the trait's way (the lease, then the commit).
    #[instrument(skip(self, expected, commit), fields(
        messages = commit.messages.len(), events = commit.events.len()))]
    async fn lease_and_commit(
        &self,
        session_id: &str,
        owner: &str,
        ttl: Duration,
        expected: &Expected,
        commit: Commit,
    ) -> Result<Leased> {
        check_commit(session_id, &commit)?;
        if commit.lease_owner.as_deref() != Some(owner) || commit.release_lease {
            return super::lease_then_commit(self, session_id, owner, ttl, expected, commit).await;
        }
        let notice = (!commit.events.is_empty()).then(|| format!("{owner} {session_id}"));
        let appending = match commit::Appending::of(commit)? {
            Ok(a) => a,
            Err(commit) => {
                return super::lease_then_commit(self, session_id, owner, ttl, expected, *commit).await;
            }
        };
        let last_event_seq = (expected.last_event_seq)
            .map(|s| to_i64(s, "last_event_seq"))
            .transpose()?;
        let row = bind_append(&LEASE_AND_APPEND, session_id, &appending, Some(owner))?
            .bind(lease_ttl_millis(ttl))
            .bind(expected.status.as_str())
            .bind(expected.current_agent.as_deref())
            .bind(last_event_seq)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::database)?
            .ok_or_else(|| Error::SessionNotFound(session_id.to_string()))?;
        if !get::<bool>(&row, "free")? {
            return Ok(Leased::Busy);
        }
        let session = session_from_row(&row)?;
        if !get::<bool>(&row, "committed")? {
            return Ok(Leased::Taken(session));
        }
        // The head as the commit's fence judges it: the lease is `owner`'s now.
        let head = Head {
            last_message_seq: to_u64(get(&row, "head_message_seq")?, "last_message_seq")?,
            last_event_seq: to_u64(get(&row, "head_event_seq")?, "last_event_seq")?,
            lease_owner: Some(owner.to_string()),
        };
        let committed = appending.finish(session_id, Some(head), Some(session))?;
        if let Some(payload) = notice {
            // To listeners (other processes' followers), now that it is committed.
            let _ = self.notices.send(payload);
        }
        Ok(Leased::Committed(committed))
    }

    #[instrument(skip(self))]
    async fn renew_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        // Expired but not taken over is still held: only `acquire_lease` changes the owner, under
        // the same row lock, so two owners never overlap.
        let renewed = sqlx::query(
            "UPDATE sessions
             SET lease_expires_at = clock_timestamp() + $3 * INTERVAL '1 millisecond'
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(session_id)
        .bind(owner)
        .bind(lease_ttl_millis(ttl))
        .execute(&self.pool)
        .await
        .map_err(Error::database)?
        .rows_affected();
        if renewed == 0 {
            self.ensure_session(session_id).await?;
        }
        Ok(renewed == 1)
    }

    #[instrument(skip(self))]
    async fn release_lease(&self, session_id: &str, owner: &str) -> Result<()> {
        let released = sqlx::query(
            "UPDATE sessions SET lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(session_id)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(Error::database)?
        .rows_affected();
        if released == 0 {
            self.ensure_session(session_id).await?;
        }
        Ok(())
    }

    #[instrument(skip(self))]
    async fn hold_liveness(&self, owner: &str) -> Result<Liveness> {
        // A connection of its own, outside the pool's count, that lives as long as the token.
        let mut conn = self.pool.acquire().await.map_err(Error::database)?.detach();
        let lock_key = i64::try_from(uuid::Uuid::new_v4().as_u64_pair().0 >> 2).unwrap_or(1);
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(lock_key)
            .execute(&mut conn)
            .await
            .map_err(Error::database)?;
        sqlx::query(
            "INSERT INTO runtime_owners (owner, lock_key, started_at) VALUES ($1, $2, $3)
             ON CONFLICT (owner) DO UPDATE SET lock_key = EXCLUDED.lock_key, started_at = EXCLUDED.started_at",
        )
        .bind(owner)
        .bind(lock_key)
        .bind(Timestamp::now().as_millis())
        .execute(&self.pool)
        .await
        .map_err(Error::database)?;
        sqlx::query(FORGET_DEAD_OWNERS)
            .execute(&self.pool)
            .await
            .map_err(Error::database)?;
        Ok(Liveness::new(conn))
    }

    async fn commit_notices(&self) -> Result<Option<CommitNotices>> {
        listen(&self.pool, COMMITS_CHANNEL).await.map(Some)
    }

    #[instrument(skip(self))]
    async fn request_cancel(&self, session_id: &str) -> Result<Option<String>> {
        let mut tx = self.pool.begin().await.map_err(Error::database)?;
        let owner: Option<String> = sqlx::query_scalar(
            "UPDATE sessions SET cancel_requested_at = $2
             WHERE id = $1 AND lease_owner IS NOT NULL RETURNING lease_owner",
        )
        .bind(session_id)
        .bind(Timestamp::now().as_millis())
        .fetch_optional(&mut *tx)
        .await
        .map_err(Error::database)?;
        let Some(owner) = owner else {
            drop(tx);
            self.ensure_session(session_id).await?;
            return Ok(None);
        };
        // Delivered to the owner when, and only if, the mark commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CANCELS_CHANNEL)
            .bind(format!("{owner} {session_id}"))
            .execute(&mut *tx)
            .await
            .map_err(Error::database)?;
        tx.commit().await.map_err(Error::database)?;
        Ok(Some(owner))
    }

    #[instrument(skip(self))]
    async fn cancel_requests(&self, owner: &str) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT id FROM sessions WHERE lease_owner = $1 AND cancel_requested_at IS NOT NULL",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::database)
    }

    async fn cancel_notices(&self) -> Result<Option<CommitNotices>> {
        listen(&self.pool, CANCELS_CHANNEL).await.map(Some)
    }

    #[instrument(skip(self))]
    async fn orphaned_sessions(&self, limit: usize) -> Result<Vec<String>> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM sessions
             WHERE status = $1
               AND (lease_owner IS NULL OR lease_expires_at IS NULL
                    OR lease_expires_at <= clock_timestamp() OR {LEASE_OWNER_DEAD})
             LIMIT $2"
        )))
        .bind(SessionStatus::Running.as_str())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(Error::database)
    }
}

/// The notices of `channel` (payload `<owner> <session id>`), on a listening connection of their
/// own. `recv` reconnects after a lost connection (notices sent meanwhile are lost: listeners'
/// polling covers them); the stream ends only if reconnecting fails.
async fn listen(pool: &PgPool, channel: &'static str) -> Result<CommitNotices> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .map_err(Error::database)?;
    listener.listen(channel).await.map_err(Error::database)?;
    let notices = futures::stream::unfold(listener, move |mut l| async move {
        loop {
            match l.recv().await {
                Ok(n) => match n.payload().split_once(' ') {
                    Some((owner, session)) => {
                        let notice = CommitNotice {
                            owner: owner.to_string(),
                            session_id: session.to_string(),
                        };
                        return Some((notice, l));
                    }
                    None => continue,
                },
                Err(e) => {
                    tracing::warn!(error = %e, channel, "notices: listener failed; listeners poll");
                    return None;
                }
            }
        }
    });
    Ok(Box::pin(notices))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_schema_names_are_accepted() {
        assert_eq!(quote_ident("art_test_1").unwrap(), "\"art_test_1\"");
        for bad in ["", "a\"b", "a;drop", "1abc", &"x".repeat(64)] {
            assert!(matches!(quote_ident(bad), Err(Error::InvalidRequest(_))), "{bad}");
        }
    }
}
