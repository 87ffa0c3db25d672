//! SQLite storage (the default backend) over rusqlite: one file in WAL mode, versioned migrations
//! applied at open, every commit one `BEGIN IMMEDIATE` transaction.
//!
//! # Threads and connections
//!
//! rusqlite is blocking, so no call runs on the async executor. Writes go to one writer thread
//! that owns the write connection and applies queued writes in group commits ([`writer`]); SQLite
//! allows one writer at a time anyway. Reads are closures queued for a few reader threads, each
//! with its own read-only connection ([`reader`]), so they run beside the writer under WAL. Other
//! processes or other `SqliteStorage`s on the same file are serialized by SQLite's own lock, with a
//! 5 s busy timeout. An in-memory database exists only inside its one connection, so there reads
//! go through the writer thread too.
//!
//! # Commits
//!
//! A commit runs the shared commit steps (`storage::commit`): it reads the session's seq counters,
//! inserts its rows with the next seqs, bumps the counters and updates the session, all inside the
//! writer's `BEGIN IMMEDIATE` transaction (which takes the write lock first, so two writers never
//! read the same counter). Resolutions are compare-and-set updates (`WHERE status = 'pending'`);
//! a failed one returns an error, and the writer undoes the commit (it rolls the batch back and
//! runs the batch's other writes again alone: `writer`'s doc).

mod heads;
mod prepared;
mod reader;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};

use heads::CachedHead;
use prepared::Db;

use super::commit::{self, CommitSteps, Head, SessionChange};
use super::liveness::{LockFileRegistry, OwnerRegistry};
use super::support::{SessionCursor, check_commit, check_page_limit};
use super::{
    Commit, Committed, Expected, Leased, Liveness, SCHEMA_VERSION, SessionPage, SessionQuery, Storage,
};
use crate::approval::{Approval, ApprovalResolution, ApprovalStatus, RequestType};
use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::protocol::{Event, EventPayload, Plan};
use crate::session::{
    AgentSwitch, Message, NewSession, Role, Session, SessionStatus, ToolCall, TurnStateJson, Usage,
};
use crate::time::Timestamp;

/// The migrations, in order: `(version, SQL)`. The last version is [`SCHEMA_VERSION`].
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../../migrations/sqlite/0002_owner_liveness.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/sqlite/0003_cancel_requests.sql"),
    ),
    (4, include_str!("../../../migrations/sqlite/0004_budgets.sql")),
    (
        5,
        include_str!("../../../migrations/sqlite/0005_tool_results_by_call.sql"),
    ),
    (
        6,
        include_str!("../../../migrations/sqlite/0006_sessions_indexes_off_the_commit_path.sql"),
    ),
    (
        7,
        include_str!("../../../migrations/sqlite/0007_messages_events_without_rowid.sql"),
    ),
];

/// How long a connection waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Reader threads (each with its read connection) per database file. Reads are CPU work on the
/// OS's page cache, so a few threads keep the cores busy; more reads queue for them (opening a
/// connection parses the schema, which costs more than a read).
const READERS: usize = 4;

/// The session row's columns in `session_from_row`'s order. Macros, not constants, so that the
/// statements naming them are literals (`concat!`), kept prepared by their address (`prepared`).
macro_rules! session_columns {
    () => {
        "id, user_id, metadata, created_at, last_activity, current_agent, status, \
         message_count, last_message_seq, last_event_seq, prompt_tokens, completion_tokens, turn_state, \
         budget, cost, cached_prompt_tokens"
    };
}
macro_rules! message_columns {
    () => {
        "seq, role, content, agent, tool_calls, tool_call_id, created_at"
    };
}
macro_rules! approval_columns {
    () => {
        "call_id, session_id, tool_name, arguments, reason, request_type, status, \
         created_at, decided_at, feedback, modified_arguments"
    };
}
const SESSION_COLUMNS: &str = session_columns!();

/// SQLite storage. Cloning is not needed: share it as `Arc<dyn Storage>`.
pub struct SqliteStorage {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` for an in-memory database.
    path: Option<PathBuf>,
    writer: writer::Writer,
    /// The reader threads (files only).
    readers: Option<reader::Readers>,
    /// Which lease owners are alive.
    owners: Arc<Owners>,
}

/// Who can tell whether a lease owner is alive: lock files beside a database file (any process
/// may open the file), or this process alone (an in-memory database).
#[derive(Debug)]
enum Owners {
    Files(LockFileRegistry),
    InProcess(OwnerRegistry),
}

impl Owners {
    /// Blocking for lock files: call it on the writer thread.
    fn is_dead(&self, owner: &str) -> bool {
        match self {
            Owners::Files(r) => r.is_dead(owner),
            Owners::InProcess(r) => r.is_dead(owner),
        }
    }
}

impl std::fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn db(e: rusqlite::Error) -> Error {
    Error::database(e)
}

/// Where a `sqlite:` URL points: `None` for an in-memory database.
fn parse_url(url: &str) -> Result<Option<PathBuf>> {
    let bad = |why: &str| {
        Error::InvalidRequest(format!(
            "invalid sqlite url '{url}': {why} (expected sqlite://PATH, sqlite:PATH or sqlite::memory:)"
        ))
    };
    let rest = url
        .strip_prefix("sqlite:")
        .ok_or_else(|| bad("no sqlite: scheme"))?;
    // Options such as `?mode=rwc` (sqlx style) are accepted and ignored: the file is always
    // created if missing.
    let rest = rest.split_once('?').map_or(rest, |(path, _)| path);
    let path = rest.strip_prefix("//").unwrap_or(rest);
    match path {
        "" => Err(bad("empty path")),
        ":memory:" => Ok(None),
        p => Ok(Some(PathBuf::from(p))),
    }
}

/// Every `LIMIT` is written `LIMIT ? + 0`: with a bare bound `LIMIT ?` after an `ORDER BY`,
/// SQLite re-prepares the statement on every run (it plans for the bound value), which undoes the
/// statement cache; the expression keeps the plan (the index gives the order) and the prepared
/// statement.
///
/// Distinct statements rusqlite's statement cache keeps prepared per connection. Every statement
/// with a fixed text is kept by [`Db`] instead (found by its text's address, not its hash); the
/// cache holds only those built per call (the session list's filters, the checkpoint).
const STATEMENT_CACHE: usize = 16;

fn configure(conn: &Connection, file: bool) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_handler(Some(wait_briefly))?;
    if file {
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// The busy handler of the writer's and the checkpointer's connections: the lock they wait for
/// (each other's, during the checkpointer's `RESTART`, or another process's write) is held for
/// milliseconds, so they look again every 100 µs for the first 5 ms, then every millisecond, up
/// to [`BUSY_TIMEOUT`] in all. SQLite's own handler (`busy_timeout`) sleeps 1, 2, 5, 10, 15, 20,
/// 25 ms and longer between looks, so a commit queued behind a restart of the WAL waited tens of
/// milliseconds after the lock was free (the 64-user p99 went from about 35 to 50-58 ms).
fn wait_briefly(retries: i32) -> bool {
    const SHORT: i32 = 50;
    let long = (BUSY_TIMEOUT.as_millis() as i32).saturating_sub(5);
    match retries {
        r if r < SHORT => std::thread::sleep(Duration::from_micros(100)),
        r if r < SHORT + long => std::thread::sleep(Duration::from_millis(1)),
        _ => return false,
    }
    true
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "query_only", "ON")?;
    Ok(conn)
}

/// The connection that checkpoints the WAL of the file at `path` (it writes only the database
/// file, never a row).
fn open_checkpointer(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_handler(Some(wait_briefly))?;
    Ok(conn)
}

/// Applies pending migrations in one transaction; refuses a database newer than this build.
fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER NOT NULL PRIMARY KEY,
             applied_at INTEGER NOT NULL
         )",
    )
    .map_err(db)?;
    let current: i64 = tx
        .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| {
            r.get(0)
        })
        .map_err(db)?;
    if current > SCHEMA_VERSION {
        return Err(Error::Database(format!(
            "database schema version {current} is newer than this build supports ({SCHEMA_VERSION}); upgrade agent-runtime"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tracing::info!(version, "applying sqlite migration");
        tx.execute_batch(sql).map_err(db)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
            params![version, Timestamp::now().as_millis()],
        )
        .map_err(db)?;
    }
    tx.commit().map_err(db)
}

impl SqliteStorage {
    /// Opens `sqlite://PATH` (relative or absolute; `sqlite:///abs/path` too), `sqlite:PATH` or
    /// `sqlite::memory:`, creating the file if missing and applying migrations.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn open_url(url: &str) -> Result<Self> {
        match parse_url(url)? {
            Some(path) => Self::open(&path).await,
            None => Self::open_in_memory().await,
        }
    }

    /// Opens (or creates) the database file at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        run_blocking(move || Self::open_blocking(Some(path))).await
    }

    /// A fresh private in-memory database (gone when dropped).
    pub async fn open_in_memory() -> Result<Self> {
        run_blocking(|| Self::open_blocking(None)).await
    }

    fn open_blocking(path: Option<PathBuf>) -> Result<Self> {
        let cannot_open = |e: rusqlite::Error| match &path {
            Some(p) => super::diagnose::sqlite_open(p, &e),
            None => db(e),
        };
        let mut conn = match &path {
            Some(p) => Connection::open(p),
            None => Connection::open_in_memory(),
        }
        .map_err(cannot_open)?;
        configure(&conn, path.is_some()).map_err(cannot_open)?;
        migrate(&mut conn)?;
        let owners = match &path {
            Some(p) => Owners::Files(LockFileRegistry::beside(p)),
            None => Owners::InProcess(OwnerRegistry::default()),
        };
        // A file's WAL is checkpointed on a connection of its own (see `writer`).
        let checkpoints = match &path {
            Some(p) => Some(open_checkpointer(p).map_err(cannot_open)?),
            None => None,
        };
        let readers = match &path {
            Some(p) => Some(reader::Readers::start(p, READERS)?),
            None => None,
        };
        Ok(SqliteStorage {
            inner: Arc::new(Inner {
                owners: Arc::new(owners),
                path,
                writer: writer::Writer::start(conn, checkpoints)?,
                readers,
            }),
        })
    }

    /// Runs `f` on the writer thread, inside a transaction; its result comes back once that
    /// transaction is committed. `f` may run more than once (`writer::Writer::run`).
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T> + Clone + Send + 'static,
    {
        self.inner.writer.run(f).await
    }

    /// Runs `f` on a read connection (the writer for an in-memory database), off the executor.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T> + Clone + Send + 'static,
    {
        match &self.inner.readers {
            Some(readers) => readers.run(f).await,
            None => self.inner.writer.run(f).await,
        }
    }
}

async fn run_blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("sqlite task failed: {e}")))?
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(format!("cannot encode JSON: {e}")))
}

/// A JSON column parsed where SQLite holds its text (no copy of it into a `String` first).
fn json_col<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    opt_json_col(row, idx)?.ok_or(rusqlite::Error::InvalidColumnType(idx, String::new(), Type::Null))
}

/// A nullable JSON column, parsed as [`json_col`] parses.
fn opt_json_col<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<T>> {
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, e)
    };
    let Some(text) = row.get_ref(idx)?.as_str_or_null().map_err(|e| bad(Box::new(e)))? else {
        return Ok(None);
    };
    serde_json::from_str(text).map(Some).map_err(|e| bad(Box::new(e)))
}

fn parsed<T>(idx: usize, text: String, parse: impl FnOnce(&str) -> Option<T>) -> rusqlite::Result<T> {
    parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            Type::Text,
            format!("unexpected value '{text}'").into(),
        )
    })
}

/// Counters and seqs are `u64` in Rust and non-negative `INTEGER`s in SQLite.
fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Integer, Box::new(e)))
}

fn ts_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Timestamp> {
    row.get::<_, i64>(idx).map(Timestamp::from_millis)
}

/// `Connection::query_row` on a statement the connection keeps prepared: parsing a statement
/// costs more than running these small ones.
fn query_row<T, P: rusqlite::Params>(
    conn: &Db<'_>,
    sql: &'static str,
    params: P,
    f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.query_row(sql, params, f)
}

/// `Connection::execute` on a statement the connection keeps prepared.
fn execute<P: rusqlite::Params>(conn: &Db<'_>, sql: &'static str, params: P) -> rusqlite::Result<usize> {
    conn.execute(sql, params)
}

/// A session's budgets as stored: `NULL` when unlimited.
fn budget_json(b: &Budget) -> Result<Option<String>> {
    if b.is_unlimited() {
        Ok(None)
    } else {
        to_json(b).map(Some)
    }
}

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        id: row.get(0)?,
        user_id: row.get(1)?,
        metadata: json_col(row, 2)?,
        created_at: ts_col(row, 3)?,
        last_activity: ts_col(row, 4)?,
        current_agent: row.get(5)?,
        status: parsed(6, row.get(6)?, SessionStatus::parse)?,
        message_count: u64_col(row, 7)?,
        last_message_seq: u64_col(row, 8)?,
        last_event_seq: u64_col(row, 9)?,
        usage: Usage {
            prompt_tokens: u64_col(row, 10)?,
            completion_tokens: u64_col(row, 11)?,
            cached_prompt_tokens: u64_col(row, 15)?,
        },
        turn_state: opt_json_col(row, 12)?,
        budget: opt_json_col(row, 13)?.unwrap_or_default(),
        cost: row.get(14)?,
    })
}

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        seq: u64_col(row, 0)?,
        role: parsed(1, row.get(1)?, Role::parse)?,
        content: row.get(2)?,
        agent: row.get(3)?,
        tool_calls: json_col::<Vec<ToolCall>>(row, 4)?,
        tool_call_id: row.get(5)?,
        created_at: ts_col(row, 6)?,
    })
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event::new(u64_col(row, 0)?, json_col::<EventPayload>(row, 1)?))
}

fn request_type_str(t: RequestType) -> &'static str {
    match t {
        RequestType::Tool => "tool",
        RequestType::Plan => "plan",
        RequestType::Budget => "budget",
    }
}

fn parse_request_type(s: &str) -> Option<RequestType> {
    match s {
        "tool" => Some(RequestType::Tool),
        "plan" => Some(RequestType::Plan),
        "budget" => Some(RequestType::Budget),
        _ => None,
    }
}

fn approval_from_row(row: &Row<'_>) -> rusqlite::Result<Approval> {
    Ok(Approval {
        call_id: row.get(0)?,
        session_id: row.get(1)?,
        tool_name: row.get(2)?,
        arguments: json_col(row, 3)?,
        reason: row.get(4)?,
        request_type: parsed(5, row.get(5)?, parse_request_type)?,
        status: parsed(6, row.get(6)?, ApprovalStatus::parse)?,
        created_at: ts_col(row, 7)?,
        decided_at: row.get::<_, Option<i64>>(8)?.map(Timestamp::from_millis),
        feedback: row.get(9)?,
        modified_arguments: opt_json_col(row, 10)?,
    })
}

fn read_session(conn: &Db<'_>, id: &str) -> Result<Session> {
    query_row(
        conn,
        concat!("SELECT ", session_columns!(), " FROM sessions WHERE id = ?1"),
        [id],
        session_from_row,
    )
    .optional()
    .map_err(db)?
    .ok_or_else(|| Error::SessionNotFound(id.to_string()))
}

/// The session `create_session` just inserted, as [`read_session`] would read it back (the row is
/// the `INSERT`'s values and the columns' defaults): its JSON columns parsed from the text stored
/// (a float's digits parse back to the nearest value, not always the one written), the rest
/// taken as given.
fn created(new: NewSession, metadata: &str, budget: Option<&str>) -> Result<Session> {
    let decode =
        |e: serde_json::Error| Error::Internal(format!("cannot decode the session just stored: {e}"));
    let metadata = serde_json::from_str(metadata).map_err(decode)?;
    let budget = budget
        .map(serde_json::from_str)
        .transpose()
        .map_err(decode)?
        .unwrap_or_default();
    Ok(Session {
        metadata,
        budget,
        ..new.into_session()
    })
}

/// `SessionNotFound` unless the session exists. A read whose rows prove the session exists (a
/// session's rows go with it) asks only when it found none.
fn ensure_session(conn: &Db<'_>, id: &str) -> Result<()> {
    let found = query_row(conn, "SELECT 1 FROM sessions WHERE id = ?1", [id], |_| Ok(()))
        .optional()
        .map_err(db)?;
    found.ok_or_else(|| Error::SessionNotFound(id.to_string()))
}

fn read_messages_after(conn: &Db<'_>, id: &str, after: u64, limit: usize) -> Result<Vec<Message>> {
    query_list(
        conn,
        concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE session_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3 + 0"
        ),
        params![id, sql_seq(after), sql_limit(limit)],
        message_from_row,
    )
}

fn read_switches(conn: &Db<'_>, id: &str) -> Result<Vec<AgentSwitch>> {
    query_list(
        conn,
        "SELECT from_agent, to_agent, reason, at FROM agent_switches WHERE session_id = ?1 ORDER BY id",
        [id],
        |r| {
            Ok(AgentSwitch {
                from_agent: r.get(0)?,
                to_agent: r.get(1)?,
                reason: r.get(2)?,
                timestamp: ts_col(r, 3)?,
            })
        },
    )
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A seq, counter or token count as SQLite stores it (saturating; no real value comes near).
fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// One commit's steps on the writer's connection, inside its transaction (an error after a row
/// was written makes the writer undo the commit, see `writer`). `BEGIN IMMEDIATE` has taken the write lock already.
///
/// The head is the whole session row: the commit's `UPDATE` changes it as
/// [`SessionChange::apply_to`] does, so the session it returns is the head with the change applied,
/// not read back (nothing else in the commit touches the row, and the write lock keeps other
/// writers out).
struct SqliteCommit<'a, 'c> {
    tx: &'a Db<'c>,
    session_id: &'a str,
    /// The commit sets the turn state: the stored one is not parsed.
    sets_turn_state: bool,
    /// The session as `head` found it, with its lease owner.
    session: Option<CachedHead>,
    /// The head found before the commit began (`lease_and_commit` looks at it to judge the
    /// expectation): `head` takes it instead of looking again.
    prefetched: Option<CachedHead>,
    /// The lease `lease_and_commit` takes in the commit's own `UPDATE` (owner, expiry): its
    /// cached head showed it free or the owner's already, so taking it cannot fail.
    take_lease: Option<(&'a str, i64)>,
}

/// A commit's head: the session (`session_from_row`'s columns; its turn state left out, `None`,
/// when `skip_turn_state`, as the commit replaces it) and its lease owner. `None` if there is no
/// session. Read from the row: see [`find_head`] for the writer's cache.
fn read_head(conn: &Db<'_>, id: &str, skip_turn_state: bool) -> Result<Option<CachedHead>> {
    query_row(
        conn,
        "SELECT id, user_id, metadata, created_at, last_activity, current_agent, status,
             message_count, last_message_seq, last_event_seq, prompt_tokens, completion_tokens,
             CASE WHEN ?2 THEN NULL ELSE turn_state END,
             budget, cost, cached_prompt_tokens, lease_owner
         FROM sessions WHERE id = ?1",
        params![id, skip_turn_state],
        |r| {
            Ok(CachedHead {
                session: session_from_row(r)?,
                lease_owner: r.get(16)?,
                metadata_bytes: r.get_ref(2)?.as_bytes().map_or(0, <[u8]>::len),
            })
        },
    )
    .optional()
    .map_err(db)
}

/// The session's head for a write that will put it back as it writes the row
/// ([`keep_head`]): taken out of the writer's cache (the whole session, turn state included),
/// or else read as [`read_head`] reads it.
fn find_head(conn: &Db<'_>, id: &str, skip_turn_state: bool) -> Result<Option<CachedHead>> {
    match conn.heads(|h| h.take(id)).flatten() {
        Some(head) => Ok(Some(head)),
        None => read_head(conn, id, skip_turn_state),
    }
}

/// Puts the session as the write just stored it (whole: turn state included) in the writer's
/// cache, if this is the writer's connection.
fn keep_head(conn: &Db<'_>, session: &Session, lease_owner: Option<String>, metadata_bytes: usize) {
    conn.heads(|h| {
        h.put(CachedHead {
            session: session.clone(),
            lease_owner,
            metadata_bytes,
        })
    });
}

/// Rows one multi-row `INSERT` writes at most; a longer commit runs it again for the rest. Each
/// row count is its own cached statement.
const ROWS_PER_INSERT: usize = 16;

/// `INSERT INTO {into} VALUES` followed by `rows` rows of `?1` (the session id, shared) and
/// `width` numbered parameters each: `(?1, ?2, ?3), (?1, ?4, ?5)` for a width of 2.
fn multi_row_insert(into: &str, width: usize, rows: usize) -> String {
    let mut sql = format!("INSERT INTO {into} VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(?1" } else { ", (?1" });
        for col in 0..width {
            sql.push_str(&format!(", ?{}", 2 + row * width + col));
        }
        sql.push(')');
    }
    sql
}

/// Binds `value` to parameter `idx` (a number from 1, or a `:name`) of `stmt`, run later by `raw_execute`.
fn bind(
    stmt: &mut rusqlite::Statement<'_>,
    idx: impl rusqlite::BindIndex,
    value: impl rusqlite::ToSql,
) -> Result<()> {
    stmt.raw_bind_parameter(idx, value).map_err(db)
}

/// The multi-row `INSERT`s of one table for 1 to [`ROWS_PER_INSERT`] rows, built once.
struct RowInserts(std::sync::LazyLock<Vec<String>>);

impl RowInserts {
    fn sql(&'static self, rows: usize) -> &'static str {
        &self.0[rows - 1]
    }
}

const MESSAGE_INSERT_COLUMNS: usize = 7;
static MESSAGE_INSERTS: RowInserts = RowInserts(std::sync::LazyLock::new(|| {
    (1..=ROWS_PER_INSERT)
        .map(|rows| {
            multi_row_insert(
                "messages (session_id, seq, role, content, agent, tool_calls, tool_call_id, created_at)",
                MESSAGE_INSERT_COLUMNS,
                rows,
            )
        })
        .collect()
}));

const EVENT_INSERT_COLUMNS: usize = 2;
static EVENT_INSERTS: RowInserts = RowInserts(std::sync::LazyLock::new(|| {
    (1..=ROWS_PER_INSERT)
        .map(|rows| multi_row_insert("events (session_id, seq, payload)", EVENT_INSERT_COLUMNS, rows))
        .collect()
}));

/// Binds a multi-row message `INSERT` ([`MESSAGE_INSERTS`]) to `chunk` and runs it.
fn bind_messages(insert: &mut rusqlite::Statement<'_>, session_id: &str, chunk: &[Message]) -> Result<()> {
    bind(insert, 1, session_id)?;
    for (i, m) in chunk.iter().enumerate() {
        let at = 2 + i * MESSAGE_INSERT_COLUMNS;
        bind(insert, at, sql_seq(m.seq))?;
        bind(insert, at + 1, m.role.as_str())?;
        bind(insert, at + 2, &m.content)?;
        bind(insert, at + 3, &m.agent)?;
        bind(insert, at + 4, to_json(&m.tool_calls)?)?;
        bind(insert, at + 5, &m.tool_call_id)?;
        bind(insert, at + 6, m.created_at.as_millis())?;
    }
    insert.raw_execute().map_err(db)?;
    Ok(())
}

/// Binds a multi-row event `INSERT` ([`EVENT_INSERTS`]) to `chunk` and runs it.
fn bind_events(insert: &mut rusqlite::Statement<'_>, session_id: &str, chunk: &[Event]) -> Result<()> {
    bind(insert, 1, session_id)?;
    for (i, e) in chunk.iter().enumerate() {
        let at = 2 + i * EVENT_INSERT_COLUMNS;
        bind(insert, at, sql_seq(e.seq))?;
        let json = e
            .payload_json()
            .map_err(|e| Error::Internal(format!("cannot encode JSON: {e}")))?;
        bind(insert, at + 1, &*json)?;
    }
    insert.raw_execute().map_err(db)?;
    Ok(())
}

/// Which optional columns a commit's session `UPDATE` sets.
#[derive(Debug, Clone, Copy)]
struct SessionUpdate {
    agent: bool,
    status: bool,
    turn_state: bool,
    release_lease: bool,
    budget: bool,
    take_lease: bool,
}

/// The session `UPDATE` of every [`SessionUpdate`], built once, indexed by [`SessionUpdate::index`].
static SESSION_UPDATES: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0..64).map(|i| SessionUpdate::of_index(i).build()).collect());

impl SessionUpdate {
    fn index(self) -> usize {
        usize::from(self.agent)
            | usize::from(self.status) << 1
            | usize::from(self.turn_state) << 2
            | usize::from(self.release_lease) << 3
            | usize::from(self.budget) << 4
            | usize::from(self.take_lease) << 5
    }

    fn of_index(i: usize) -> SessionUpdate {
        SessionUpdate {
            agent: i & 1 != 0,
            status: i & 2 != 0,
            turn_state: i & 4 != 0,
            release_lease: i & 8 != 0,
            budget: i & 16 != 0,
            take_lease: i & 32 != 0,
        }
    }

    fn sql(self) -> &'static str {
        &SESSION_UPDATES[self.index()]
    }

    fn build(self) -> String {
        let mut sql = String::with_capacity(512);
        sql.push_str(
            "UPDATE sessions SET
                 last_message_seq = last_message_seq + ?2,
                 last_event_seq = last_event_seq + ?3,
                 message_count = message_count + ?4,
                 last_activity = ?5,
                 prompt_tokens = prompt_tokens + ?6,
                 completion_tokens = completion_tokens + ?7,
                 cost = cost + ?8,
                 cached_prompt_tokens = cached_prompt_tokens + ?9",
        );
        if self.agent {
            sql.push_str(", current_agent = :agent");
        }
        if self.status {
            sql.push_str(", status = :status");
        }
        if self.turn_state {
            sql.push_str(", turn_state = :turn_state");
        }
        if self.release_lease {
            sql.push_str(", lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL");
        }
        if self.budget {
            sql.push_str(", budget = :budget");
        }
        if self.take_lease {
            // As `ACQUIRE_LEASE` sets them.
            sql.push_str(", lease_owner = :owner, lease_expires_at = :expires, cancel_requested_at = NULL");
        }
        sql.push_str(" WHERE id = ?1");
        sql
    }
}

impl CommitSteps for SqliteCommit<'_, '_> {
    async fn head(&mut self) -> Result<Option<Head>> {
        let found = match self.prefetched.take() {
            Some(head) => Some(head),
            None => find_head(self.tx, self.session_id, self.sets_turn_state)?,
        };
        Ok(found.map(|found| {
            let head = Head {
                last_message_seq: found.session.last_message_seq,
                last_event_seq: found.session.last_event_seq,
                lease_owner: found.lease_owner.clone(),
            };
            self.session = Some(found);
            head
        }))
    }

    async fn put_approval(&mut self, a: &Approval) -> Result<()> {
        execute(
            self.tx,
            "INSERT INTO approvals (session_id, call_id, tool_name, arguments, reason, request_type, status,
                                    created_at, decided_at, feedback, modified_arguments)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (session_id, call_id) DO UPDATE SET
                 tool_name = excluded.tool_name, arguments = excluded.arguments,
                 reason = excluded.reason, request_type = excluded.request_type,
                 status = excluded.status, created_at = excluded.created_at,
                 decided_at = excluded.decided_at, feedback = excluded.feedback,
                 modified_arguments = excluded.modified_arguments",
            params![
                self.session_id,
                a.call_id,
                a.tool_name,
                to_json(&a.arguments)?,
                a.reason,
                request_type_str(a.request_type),
                a.status.as_str(),
                a.created_at.as_millis(),
                a.decided_at.map(Timestamp::as_millis),
                a.feedback,
                a.modified_arguments.as_ref().map(to_json).transpose()?,
            ],
        )
        .map_err(db)?;
        Ok(())
    }

    async fn decide(&mut self, r: &ApprovalResolution) -> Result<bool> {
        let changed = execute(
            self.tx,
            "UPDATE approvals SET status = ?3, feedback = ?4, modified_arguments = ?5, decided_at = ?6
             WHERE session_id = ?1 AND call_id = ?2 AND status = 'pending'",
            params![
                self.session_id,
                r.call_id,
                r.status.as_str(),
                r.feedback,
                r.modified_arguments.as_ref().map(to_json).transpose()?,
                r.decided_at.as_millis(),
            ],
        )
        .map_err(db)?;
        Ok(changed > 0)
    }

    async fn approval_exists(&mut self, call_id: &str) -> Result<bool> {
        let found = query_row(
            self.tx,
            "SELECT 1 FROM approvals WHERE session_id = ?1 AND call_id = ?2",
            params![self.session_id, call_id],
            |_| Ok(()),
        )
        .optional()
        .map_err(db)?;
        Ok(found.is_some())
    }

    async fn insert_messages(&mut self, messages: &[Message]) -> Result<()> {
        for chunk in messages.chunks(ROWS_PER_INSERT) {
            self.tx
                .with(MESSAGE_INSERTS.sql(chunk.len()), |insert| {
                    bind_messages(insert, self.session_id, chunk)
                })
                .map_err(db)??;
        }
        Ok(())
    }

    async fn insert_events(&mut self, events: &[Event], _at: Timestamp) -> Result<()> {
        for chunk in events.chunks(ROWS_PER_INSERT) {
            self.tx
                .with(EVENT_INSERTS.sql(chunk.len()), |insert| {
                    bind_events(insert, self.session_id, chunk)
                })
                .map_err(db)??;
        }
        Ok(())
    }

    async fn remember_request(&mut self, request_id: &str, first_event_seq: u64) -> Result<()> {
        execute(
            self.tx,
            "INSERT INTO requests (session_id, request_id, first_event_seq, created_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            params![
                self.session_id,
                request_id,
                sql_seq(first_event_seq),
                Timestamp::now().as_millis()
            ],
        )
        .map_err(db)?;
        Ok(())
    }

    async fn insert_switches(&mut self, switches: &[AgentSwitch]) -> Result<()> {
        for s in switches {
            execute(
                self.tx,
                "INSERT INTO agent_switches (session_id, from_agent, to_agent, reason, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    self.session_id,
                    s.from_agent,
                    s.to_agent,
                    s.reason,
                    s.timestamp.as_millis()
                ],
            )
            .map_err(db)?;
        }
        Ok(())
    }

    async fn put_plan(&mut self, p: &Plan) -> Result<()> {
        execute(
            self.tx,
            "INSERT INTO plans (session_id, plan_id, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (session_id, plan_id) DO UPDATE SET body = excluded.body",
            params![self.session_id, p.plan_id, to_json(p)?],
        )
        .map_err(db)?;
        Ok(())
    }

    async fn update_session(&mut self, change: SessionChange) -> Result<Session> {
        let (set_turn_state, turn_state) = match &change.turn_state {
            None => (false, None),
            Some(v) => (true, v.as_ref().map(TurnStateJson::as_str)),
        };
        let budget = change.budget.as_ref().map(budget_json).transpose()?.flatten();
        // Only the columns the commit changes are set: SQLite rewrites the entry of every index
        // over a column in the `SET` list (status, lease owner), changed or not. A few distinct
        // statements come of it, each kept prepared.
        let set = SessionUpdate {
            agent: change.current_agent.is_some(),
            status: change.status.is_some(),
            turn_state: set_turn_state,
            release_lease: change.release_lease,
            budget: change.budget.is_some(),
            // A lease given up in the same commit is not taken: it ends free either way.
            take_lease: self.take_lease.is_some() && !change.release_lease,
        };
        let changed = self
            .tx
            .with(set.sql(), |update| {
                bind(update, 1, self.session_id)?;
                bind(update, 2, sql_seq(change.messages))?;
                bind(update, 3, sql_seq(change.events))?;
                bind(update, 4, sql_seq(change.counted_messages))?;
                bind(update, 5, change.at.as_millis())?;
                bind(update, 6, sql_seq(change.usage.prompt_tokens))?;
                bind(update, 7, sql_seq(change.usage.completion_tokens))?;
                bind(update, 8, change.cost)?;
                bind(update, 9, sql_seq(change.usage.cached_prompt_tokens))?;
                if let Some(agent) = &change.current_agent {
                    bind(update, ":agent", agent)?;
                }
                if let Some(status) = change.status {
                    bind(update, ":status", status.as_str())?;
                }
                if set_turn_state {
                    bind(update, ":turn_state", turn_state)?;
                }
                if change.budget.is_some() {
                    bind(update, ":budget", &budget)?;
                }
                if let (true, Some((owner, expires))) = (set.take_lease, self.take_lease) {
                    bind(update, ":owner", owner)?;
                    bind(update, ":expires", expires)?;
                }
                update.raw_execute().map_err(db)
            })
            .map_err(db)??;
        // The row is not read back (neither by `RETURNING`, which SQLite runs into an ephemeral
        // table, nor by a `SELECT`): the head read it, and this statement changes it exactly as
        // `apply_to` does.
        if changed == 0 {
            return Err(Error::SessionNotFound(self.session_id.to_string()));
        }
        let CachedHead {
            mut session,
            lease_owner,
            metadata_bytes,
        } = self.session.take().ok_or_else(|| {
            Error::Internal(format!(
                "the commit on session '{}' updated it before reading it",
                self.session_id
            ))
        })?;
        let sets_budget = change.budget.is_some();
        let lease_owner = if change.release_lease { None } else { lease_owner };
        change.apply_to(&mut session);
        if sets_budget {
            // As a read would parse the stored text (a float's digits parse back to the nearest
            // value, not always the one written).
            session.budget = match &budget {
                Some(text) => serde_json::from_str(text)
                    .map_err(|e| Error::Internal(format!("cannot decode the budget just stored: {e}")))?,
                None => Budget::default(),
            };
        }
        // Whole now: a turn state the head left out was replaced by the change.
        keep_head(self.tx, &session, lease_owner, metadata_bytes);
        Ok(session)
    }
}

fn list_blocking(
    conn: &Connection,
    query: &SessionQuery,
    cursor: Option<SessionCursor>,
) -> Result<SessionPage> {
    use rusqlite::types::Value as Sql;
    let mut clauses: Vec<&str> = vec![];
    let mut args: Vec<Sql> = vec![];
    if let Some(user) = &query.user_id {
        clauses.push("user_id = ?");
        args.push(Sql::Text(user.clone()));
    }
    if let Some(status) = query.status {
        clauses.push("status = ?");
        args.push(Sql::Text(status.as_str().to_string()));
    }
    // Counted over the filters alone, on the user_id or status index (migration 0006).
    let count_filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let total: i64 = conn
        .prepare_cached(&format!("SELECT COUNT(*) FROM sessions {count_filter}"))
        .and_then(|mut stmt| stmt.query_row(params_from_iter(args.iter()), |r| r.get(0)))
        .map_err(db)?;
    if let Some(c) = cursor {
        clauses.push("(last_activity, id) < (?, ?)");
        args.push(Sql::Integer(c.last_activity));
        args.push(Sql::Text(c.id));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    // One row more than the page tells whether there is a next page.
    args.push(Sql::Integer(sql_limit(query.limit).saturating_add(1)));
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions {filter} ORDER BY last_activity DESC, id DESC LIMIT ? + 0"
        ))
        .map_err(db)?;
    let mut sessions = stmt
        .query_map(params_from_iter(args), session_from_row)
        .map_err(db)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db)?;
    let more = sessions.len() > query.limit;
    sessions.truncate(query.limit);
    let next_cursor = match (more, sessions.last()) {
        (true, Some(last)) => Some(SessionCursor::after(last.last_activity, &last.id).encode()),
        _ => None,
    };
    Ok(SessionPage {
        sessions,
        next_cursor,
        total: u64::try_from(total).unwrap_or_default(),
    })
}

fn query_list<T>(
    conn: &Db<'_>,
    sql: &'static str,
    args: impl rusqlite::Params,
    f: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    conn.with(sql, |stmt| {
        let rows = stmt.query_map(args, f)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
    })
    .and_then(|r| r)
    .map_err(db)
}

/// Runs a lease update; 0 rows changed means refused, or `SessionNotFound` if there is no session.
fn lease_update(
    conn: &Db<'_>,
    session_id: &str,
    sql: &'static str,
    args: impl rusqlite::Params,
) -> Result<bool> {
    let changed = execute(conn, sql, args).map_err(db)?;
    if changed == 0 {
        ensure_session(conn, session_id)?;
    }
    Ok(changed > 0)
}

/// Takes the lease if free, expired, or already the owner's: `?1` id, `?2` owner, `?3` new expiry,
/// `?4` now (milliseconds).
const ACQUIRE_LEASE: &str = "UPDATE sessions
     SET lease_owner = ?2, lease_expires_at = ?3, cancel_requested_at = NULL
     WHERE id = ?1 AND (lease_owner IS NULL OR lease_owner = ?2 OR lease_expires_at <= ?4)";

/// Takes the lease from `?4`, a dead owner, if it still holds it: `?1` id, `?2` owner, `?3` new expiry.
const TAKE_OVER_LEASE: &str = "UPDATE sessions
     SET lease_owner = ?2, lease_expires_at = ?3, cancel_requested_at = NULL
     WHERE id = ?1 AND lease_owner = ?4";

/// [`ACQUIRE_LEASE`], or else [`TAKE_OVER_LEASE`] if the holder is dead (on the writer thread).
fn acquire(conn: &Db<'_>, owners: &Owners, id: &str, owner: &str, ttl: Duration) -> Result<bool> {
    let now = Timestamp::now().as_millis();
    let expires = now.saturating_add(ttl_millis(ttl));
    if lease_update(conn, id, ACQUIRE_LEASE, params![id, owner, expires, now])? {
        set_lease_owner(conn, id, Some(owner));
        return Ok(true);
    }
    let holder: Option<String> = conn
        .query_row(
            "SELECT lease_owner FROM sessions WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )
        .map_err(db)?;
    match holder {
        Some(dead) if owners.is_dead(&dead) => {
            tracing::info!(session_id = id, dead_owner = %dead, "taking over the lease of a dead owner");
            let taken = lease_update(conn, id, TAKE_OVER_LEASE, params![id, owner, expires, dead])?;
            if taken {
                set_lease_owner(conn, id, Some(owner));
            }
            Ok(taken)
        }
        _ => Ok(false),
    }
}

/// The lease owner a write just stored, in the session's cached head (if kept).
fn set_lease_owner(conn: &Db<'_>, id: &str, owner: Option<&str>) {
    conn.heads(|h| {
        if let Some(head) = h.get_mut(id) {
            head.lease_owner = owner.map(str::to_string);
        }
    });
}

fn ttl_millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl Storage for SqliteStorage {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        self.read(|c| query_row(c, "SELECT 1", [], |_| Ok(())).map_err(db))
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(session_id = %new.id))]
    async fn create_session(&self, new: NewSession) -> Result<Session> {
        self.write(move |c| {
            let metadata = to_json(&new.metadata)?;
            let budget = budget_json(&new.budget)?;
            let changed = execute(c,
                    "INSERT INTO sessions (id, user_id, metadata, created_at, last_activity, current_agent, status,
                                           budget)
                     VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
                    params![
                        new.id,
                        new.user_id,
                        metadata,
                        new.created_at.as_millis(),
                        new.current_agent,
                        SessionStatus::Idle.as_str(),
                        budget
                    ],
                )
                .map_err(db)?;
            if changed == 0 {
                return Err(Error::SessionExists(new.id));
            }
            let session = created(new, &metadata, budget.as_deref())?;
            keep_head(c, &session, None, metadata.len());
            Ok(session)
        })
        .await
    }

    async fn get_session(&self, id: &str) -> Result<Session> {
        let id = id.to_string();
        self.read(move |c| read_session(c, &id)).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_sessions(&self, query: SessionQuery) -> Result<SessionPage> {
        check_page_limit(query.limit)?;
        let cursor = query.cursor.as_deref().map(SessionCursor::decode).transpose()?;
        self.read(move |c| list_blocking(c, &query, cursor)).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn delete_session(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.write(move |c| {
            c.heads(|h| h.forget(&id));
            // Child rows go with it: every table cascades on the session.
            let changed = execute(c, "DELETE FROM sessions WHERE id = ?1", [&id]).map_err(db)?;
            if changed == 0 {
                return Err(Error::SessionNotFound(id));
            }
            Ok(())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self, commit), fields(
        messages = commit.messages.len(), events = commit.events.len()))]
    async fn commit(&self, session_id: &str, commit: Commit) -> Result<Committed> {
        check_commit(session_id, &commit)?;
        let id = session_id.to_string();
        self.write(move |c| {
            let mut steps = SqliteCommit {
                tx: c,
                session_id: &id,
                sets_turn_state: commit.session.turn_state.is_some(),
                session: None,
                prefetched: None,
                take_lease: None,
            };
            commit::run_blocking(&mut steps, &id, commit)
        })
        .await
    }

    async fn messages_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Message>> {
        let id = session_id.to_string();
        self.read(move |c| {
            ensure_session(c, &id)?;
            read_messages_after(c, &id, after, limit)
        })
        .await
    }

    async fn session_history(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Session, Vec<Message>, Vec<AgentSwitch>)> {
        let id = session_id.to_string();
        // One hand-off to a reader for the three reads.
        self.read(move |c| {
            let session = read_session(c, &id)?;
            let messages = read_messages_after(c, &id, after, limit)?;
            let switches = read_switches(c, &id)?;
            Ok((session, messages, switches))
        })
        .await
    }

    async fn recent_messages(&self, session_id: &str, limit: usize) -> Result<Vec<Message>> {
        let id = session_id.to_string();
        self.read(move |c| {
            // Walks the (session_id, seq) key backwards from the end: cost ~ limit, not history.
            let mut newest_first = query_list(
                c,
                concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2 + 0"
                ),
                params![id, sql_limit(limit)],
                message_from_row,
            )?;
            if newest_first.is_empty() {
                ensure_session(c, &id)?;
            }
            newest_first.reverse();
            Ok(newest_first)
        })
        .await
    }

    async fn events_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Event>> {
        let id = session_id.to_string();
        self.read(move |c| {
            ensure_session(c, &id)?;
            query_list(
                c,
                "SELECT seq, payload FROM events WHERE session_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3 + 0",
                params![id, sql_seq(after), sql_limit(limit)],
                event_from_row,
            )
        })
        .await
    }

    async fn find_request(&self, session_id: &str, request_id: &str) -> Result<Option<u64>> {
        let (id, request_id) = (session_id.to_string(), request_id.to_string());
        self.read(move |c| {
            ensure_session(c, &id)?;
            query_row(
                c,
                "SELECT first_event_seq FROM requests WHERE session_id = ?1 AND request_id = ?2",
                params![id, request_id],
                |r| u64_col(r, 0),
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn tool_call_answered(&self, session_id: &str, call_id: &str) -> Result<bool> {
        let (id, call_id) = (session_id.to_string(), call_id.to_string());
        self.read(move |c| {
            let answered = query_row(
                c,
                "SELECT EXISTS (SELECT 1 FROM messages WHERE session_id = ?1 AND tool_call_id = ?2)",
                params![id, call_id],
                |r| r.get::<_, bool>(0),
            )
            .map_err(db)?;
            if !answered {
                ensure_session(c, &id)?;
            }
            Ok(answered)
        })
        .await
    }

    async fn get_approval(&self, session_id: &str, call_id: &str) -> Result<Approval> {
        let (id, call_id) = (session_id.to_string(), call_id.to_string());
        self.read(move |c| {
            ensure_session(c, &id)?;
            query_row(
                c,
                concat!(
                    "SELECT ",
                    approval_columns!(),
                    " FROM approvals WHERE session_id = ?1 AND call_id = ?2"
                ),
                params![id, call_id],
                approval_from_row,
            )
            .optional()
            .map_err(db)?
            .ok_or_else(|| Error::ApprovalNotFound(call_id.clone()))
        })
        .await
    }

    async fn pending_approvals(&self, session_id: &str) -> Result<Vec<Approval>> {
        let id = session_id.to_string();
        self.read(move |c| {
            ensure_session(c, &id)?;
            query_list(
                c,
                concat!(
                    "SELECT ",
                    approval_columns!(),
                    " FROM approvals WHERE session_id = ?1 AND status = 'pending' ORDER BY created_at, rowid"
                ),
                [&id],
                approval_from_row,
            )
        })
        .await
    }

    async fn switch_history(&self, session_id: &str) -> Result<Vec<AgentSwitch>> {
        let id = session_id.to_string();
        self.read(move |c| {
            ensure_session(c, &id)?;
            read_switches(c, &id)
        })
        .await
    }

    async fn get_plan(&self, session_id: &str, plan_id: &str) -> Result<Option<Plan>> {
        let (id, plan_id) = (session_id.to_string(), plan_id.to_string());
        self.read(move |c| {
            ensure_session(c, &id)?;
            query_row(
                c,
                "SELECT body FROM plans WHERE session_id = ?1 AND plan_id = ?2",
                params![id, plan_id],
                |r| json_col::<Plan>(r, 0),
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn acquire_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let (id, owner, owners) = (
            session_id.to_string(),
            owner.to_string(),
            self.inner.owners.clone(),
        );
        self.write(move |c| acquire(c, &owners, &id, &owner, ttl)).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn lease_session(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<Option<Session>> {
        // One job on the writer thread: no read connection hand-off after taking the lease.
        let (id, owner, owners) = (
            session_id.to_string(),
            owner.to_string(),
            self.inner.owners.clone(),
        );
        self.write(move |c| {
            let taken = acquire(c, &owners, &id, &owner, ttl)?;
            taken.then(|| read_session(c, &id)).transpose()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self, expected, commit), fields(
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
        let (id, owner, owners, expected) = (
            session_id.to_string(),
            owner.to_string(),
            self.inner.owners.clone(),
            expected.clone(),
        );
        // One writer job: a failed commit changes nothing, the lease included.
        self.write(move |c| {
            // A cached head whose lease is free or the owner's already: `ACQUIRE_LEASE` would
            // take it (nobody else wrote the row since, `heads`' doc), so a commit that goes
            // ahead takes it in its own `UPDATE`, one statement fewer. Otherwise the lease first.
            let lease_is_free = c
                .heads(|h| {
                    h.get_mut(&id)
                        .is_some_and(|head| head.lease_owner.as_deref().is_none_or(|o| o == owner))
                })
                .unwrap_or(false);
            if !lease_is_free && !acquire(c, &owners, &id, &owner, ttl)? {
                return Ok(Leased::Busy);
            }
            // The commit's head, read once: it tells whether the session is as expected, and is
            // the session returned when it is not (or the request was seen), or the commit's head.
            let sets_turn_state = commit.session.turn_state.is_some();
            // A cached head is whole; one read from the row leaves out a turn state the commit
            // would replace.
            let cached = c.heads(|h| h.take(&id)).flatten();
            let whole = cached.is_some() || !sets_turn_state;
            let mut head = match cached {
                Some(head) => head,
                None => {
                    read_head(c, &id, sets_turn_state)?.ok_or_else(|| Error::SessionNotFound(id.clone()))?
                }
            };
            let session = &head.session;
            let replayed = match &commit.request_id {
                Some(rid) => query_row(
                    c,
                    "SELECT 1 FROM requests WHERE session_id = ?1 AND request_id = ?2",
                    params![id, rid],
                    |_| Ok(()),
                )
                .optional()
                .map_err(db)?
                .is_some(),
                None => false,
            };
            if replayed || !expected.met(session.status, &session.current_agent, session.last_event_seq) {
                if lease_is_free {
                    // Taken alone, as promised: it cannot be refused.
                    if !acquire(c, &owners, &id, &owner, ttl)? {
                        return Err(Error::Internal(format!(
                            "the free lease of session '{id}' was refused"
                        )));
                    }
                    head.lease_owner = Some(owner.clone());
                }
                // Unless the head left the turn state out, it is the session as stored.
                let head = match whole {
                    true => head,
                    false => read_head(c, &id, false)?.ok_or_else(|| Error::SessionNotFound(id.clone()))?,
                };
                keep_head(c, &head.session, head.lease_owner, head.metadata_bytes);
                return Ok(Leased::Taken(head.session));
            }
            let expires = Timestamp::now().as_millis().saturating_add(ttl_millis(ttl));
            if lease_is_free {
                // The head as the commit's `UPDATE` will leave it: the lease the owner's.
                head.lease_owner = Some(owner.clone());
            }
            let mut steps = SqliteCommit {
                tx: c,
                session_id: &id,
                sets_turn_state,
                session: None,
                prefetched: Some(head),
                take_lease: lease_is_free.then_some((owner.as_str(), expires)),
            };
            commit::run_blocking(&mut steps, &id, commit).map(Leased::Committed)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn renew_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let (id, owner) = (session_id.to_string(), owner.to_string());
        self.write(move |c| {
            let now = Timestamp::now().as_millis();
            lease_update(
                c,
                &id,
                "UPDATE sessions SET lease_expires_at = ?3 WHERE id = ?1 AND lease_owner = ?2",
                params![id, owner, now.saturating_add(ttl_millis(ttl))],
            )
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn request_cancel(&self, session_id: &str) -> Result<Option<String>> {
        let id = session_id.to_string();
        self.write(move |c| {
            let now = Timestamp::now().as_millis();
            let owner: Option<String> = c
                .query_row(
                    "UPDATE sessions SET cancel_requested_at = ?2
                     WHERE id = ?1 AND lease_owner IS NOT NULL RETURNING lease_owner",
                    params![id, now],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            if owner.is_none() {
                ensure_session(c, &id)?;
            }
            Ok(owner)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn cancel_requests(&self, owner: &str) -> Result<Vec<String>> {
        let owner = owner.to_string();
        self.read(move |c| {
            query_list(
                c,
                "SELECT id FROM sessions WHERE lease_owner = ?1 AND cancel_requested_at IS NOT NULL",
                params![owner],
                |r| r.get(0),
            )
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn release_lease(&self, session_id: &str, owner: &str) -> Result<()> {
        let (id, owner) = (session_id.to_string(), owner.to_string());
        self.write(move |c| {
            lease_update(
                c,
                &id,
                "UPDATE sessions SET lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL
                 WHERE id = ?1 AND lease_owner = ?2",
                params![id, owner],
            )
            .map(|released| {
                if released {
                    set_lease_owner(c, &id, None);
                }
            })
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn hold_liveness(&self, owner: &str) -> Result<Liveness> {
        let registry = match self.inner.owners.as_ref() {
            Owners::InProcess(r) => return Ok(r.hold(owner)),
            Owners::Files(r) => r.clone(),
        };
        let owner = owner.to_string();
        // On the writer thread: the sweep reads which owners still hold leases.
        self.write(move |c| {
            let held = registry.hold(&owner)?;
            let holders: Vec<String> = query_list(
                c,
                "SELECT DISTINCT lease_owner FROM sessions WHERE lease_owner IS NOT NULL",
                [],
                |r| r.get(0),
            )?;
            registry.sweep(|o| holders.iter().any(|h| h == o));
            Ok(held)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn orphaned_sessions(&self, limit: usize) -> Result<Vec<String>> {
        let owners = self.inner.owners.clone();
        // On the writer thread: the lock files are checked beside the rows they judge.
        self.write(move |c| {
            let now = Timestamp::now().as_millis();
            let running: Vec<(String, Option<String>, Option<i64>)> = query_list(
                c,
                "SELECT id, lease_owner, lease_expires_at FROM sessions WHERE status = ?1",
                params![SessionStatus::Running.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            // Every running session of a process has the same owner: its lock file is looked at
            // once per pass, not once per session (an `openat`, `flock` and `close` each).
            let mut dead: Vec<(String, bool)> = Vec::new();
            let mut is_dead = |o: &str| match dead.iter().find(|(known, _)| *known == o) {
                Some((_, d)) => *d,
                None => {
                    let d = owners.is_dead(o);
                    dead.push((o.to_string(), d));
                    d
                }
            };
            let orphaned: Vec<String> = running
                .iter()
                .filter(|(_, owner, expires)| match (owner, expires) {
                    (Some(o), Some(e)) => *e <= now || is_dead(o),
                    (Some(o), None) => is_dead(o),
                    (None, _) => true,
                })
                .map(|(id, _, _)| id.clone())
                .take(limit)
                .collect();
            Ok(orphaned)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_files_or_memory() {
        let cases = [
            ("sqlite::memory:", None),
            ("sqlite://:memory:", None),
            ("sqlite://agent-runtime.db", Some("agent-runtime.db")),
            ("sqlite://data/a.db", Some("data/a.db")),
            ("sqlite:///abs/path/a.db", Some("/abs/path/a.db")),
            ("sqlite:a.db", Some("a.db")),
            ("sqlite:/abs/a.db", Some("/abs/a.db")),
            ("sqlite://a.db?mode=rwc", Some("a.db")),
        ];
        for (url, want) in cases {
            assert_eq!(parse_url(url).unwrap(), want.map(PathBuf::from), "{url}");
        }
    }

    #[test]
    fn empty_or_foreign_urls_are_invalid_requests() {
        for url in ["sqlite://", "sqlite:", "postgres://x", "sqlite:?mode=rwc"] {
            assert!(matches!(parse_url(url), Err(Error::InvalidRequest(_))), "{url}");
        }
    }

    fn token_commit(t: &str) -> Commit {
        let mut c = Commit::now();
        c.events.push(EventPayload::AssistantMessage(
            crate::protocol::AssistantMessage::Token { token: t.into() },
        ));
        c
    }

    async fn store_with_session(id: &str) -> (SqliteStorage, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStorage::open(&dir.path().join("h.db")).await.unwrap();
        let new = NewSession {
            id: id.into(),
            user_id: None,
            metadata: serde_json::json!({"k": 1}),
            current_agent: "orchestrator".into(),
            created_at: Timestamp::from_millis(1),
            budget: Budget::default(),
        };
        store.create_session(new).await.unwrap();
        (store, dir)
    }

    /// White-box: the writer's own connection changes the row behind the cache's back (no
    /// write of the storage does that); the next commit answers from the cache, which shows it
    /// is used. Another connection's write is seen (the tests of `tests/storage_sqlite.rs`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_takes_its_head_from_the_writers_cache_not_the_row() {
        let (store, _dir) = store_with_session("s").await;
        store.commit("s", token_commit("a")).await.unwrap();
        store
            .write(|c| {
                c.execute("UPDATE sessions SET current_agent = 'behind' WHERE id = 's'", [])
                    .map_err(db)
            })
            .await
            .unwrap();
        let done = store.commit("s", token_commit("b")).await.unwrap();
        assert_eq!(
            (done.session.current_agent.as_str(), done.session.last_event_seq),
            ("orchestrator", 2)
        );
        let kept = store.write(|c| Ok(c.heads(|h| h.len()))).await.unwrap();
        assert_eq!(kept, Some(1));
    }

    /// A batch whose later write fails after writing is rolled back and its writes replayed one
    /// by one: the cache must not keep the head a rolled-back commit put there, or the replayed
    /// commit would number its events after rows that were never stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_rolled_back_partway_leaves_no_head_of_its_writes_in_the_cache() {
        let (store, _dir) = store_with_session("s").await;
        let store = std::sync::Arc::new(store);
        store.commit("s", token_commit("a")).await.unwrap();
        // Holds the writer so that the two writes below queue up into one batch.
        let held = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write(|_| {
                        std::thread::sleep(Duration::from_millis(200));
                        Ok(())
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (commit, failing) = tokio::join!(
            store.commit("s", token_commit("b")),
            store.write(|c| -> Result<()> {
                c.execute("UPDATE sessions SET message_count = 99 WHERE id = 's'", [])
                    .map_err(db)?;
                Err(Error::InvalidRequest("fails after writing".into()))
            })
        );
        held.await.unwrap().unwrap();
        assert_eq!(failing, Err(Error::InvalidRequest("fails after writing".into())));
        let commit = commit.unwrap();
        assert_eq!(commit.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
        let next = store.commit("s", token_commit("c")).await.unwrap();
        assert_eq!(next.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
        assert_eq!(next.session, store.get_session("s").await.unwrap());
        assert_eq!(
            store
                .events_after("s", 0, 10)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn migrations_end_at_the_schema_version() {
        assert_eq!(MIGRATIONS.last().map(|(v, _)| *v), Some(SCHEMA_VERSION));
        for (i, (v, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v, i as i64 + 1);
        }
    }
}
