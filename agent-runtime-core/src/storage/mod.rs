//! Durable storage: one object-safe trait, used as `Arc<dyn Storage>`, with an in-memory, a SQLite
//! (default) and a Postgres backend. Every state change of a turn is one atomic [`Commit`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::approval::{Approval, ApprovalResolution};
use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::protocol::{Event, EventPayload, Plan};
use crate::session::{
    AgentSwitch, Message, NewMessage, NewSession, Session, SessionStatus, TurnStateJson, Usage,
};
use crate::time::Timestamp;

pub use liveness::Liveness;

/// The schema version this build writes. A database stamped with a higher version is refused.
pub const SCHEMA_VERSION: i64 = 7;

/// Which sessions to list and where to start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionQuery {
    /// Only this user's sessions.
    pub user_id: Option<String>,
    /// Only sessions in this status (used at start-up to find interrupted turns).
    pub status: Option<SessionStatus>,
    /// Page size, 1..=1000.
    pub limit: usize,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of sessions, newest activity first.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPage {
    /// The sessions of this page.
    pub sessions: Vec<Session>,
    /// Opaque cursor for the next page, `None` on the last page.
    pub next_cursor: Option<String>,
    /// How many sessions match the query's filters across all pages (the cursor aside).
    pub total: u64,
}

/// Changes to a session's own fields that ride along with a commit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionUpdate {
    /// New status.
    pub status: Option<SessionStatus>,
    /// New current agent.
    pub current_agent: Option<String>,
    /// `Some(None)` clears the turn state, `Some(Some(v))` sets it.
    pub turn_state: Option<Option<TurnStateJson>>,
    /// New budgets (the whole set).
    pub budget: Option<Budget>,
}

/// One atomic write: everything in it is stored, with fresh gap-free seqs, or nothing is.
///
/// Messages get the session's next message seqs and events its next event seqs, in the order
/// given. `last_activity` becomes `at`. If any part fails (the lease is not held by
/// `lease_owner`, an approval resolution finds the approval not pending, the session is gone),
/// nothing of the commit is stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Commit {
    /// When these changes happened.
    pub at: Option<Timestamp>,
    /// If set, the commit only succeeds while this owner holds the session's lease (fencing).
    pub lease_owner: Option<String>,
    /// Messages to append.
    pub messages: Vec<NewMessage>,
    /// Events to append.
    pub events: Vec<EventPayload>,
    /// Approvals to insert or replace (by session and call id).
    pub approvals: Vec<Approval>,
    /// Decisions on pending approvals (compare-and-set: pending → decided, exactly once).
    pub resolutions: Vec<ApprovalResolution>,
    /// Agent switches to record (also sets `current_agent` to the last one's `to_agent`).
    pub switches: Vec<AgentSwitch>,
    /// Plans to insert or replace (by session and plan id).
    pub plans: Vec<Plan>,
    /// Tokens to add to the session's usage.
    pub usage: Option<Usage>,
    /// Cost to add to the session's cost.
    pub cost: Option<f64>,
    /// The client's `request_id` of the turn this commit starts, remembered with the seq of the
    /// commit's first event.
    pub request_id: Option<String>,
    /// Changes to the session row.
    pub session: SessionUpdate,
    /// Gives up `lease_owner`'s lease in the same transaction (a turn's last commit).
    pub release_lease: bool,
}

impl Commit {
    /// An empty commit happening now.
    pub fn now() -> Self {
        Commit {
            at: Some(Timestamp::now()),
            ..Commit::default()
        }
    }

    /// This commit followed by `later`, as one: rows in order, later session changes win.
    pub fn then(mut self, later: Commit) -> Commit {
        self.at = later.at.or(self.at);
        self.lease_owner = later.lease_owner.or(self.lease_owner);
        self.messages.extend(later.messages);
        self.events.extend(later.events);
        self.approvals.extend(later.approvals);
        self.resolutions.extend(later.resolutions);
        self.switches.extend(later.switches);
        self.plans.extend(later.plans);
        self.usage = match (self.usage, later.usage) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.cost = match (self.cost, later.cost) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.request_id = self.request_id.or(later.request_id);
        self.session = SessionUpdate {
            status: later.session.status.or(self.session.status),
            current_agent: later.session.current_agent.or(self.session.current_agent),
            turn_state: later.session.turn_state.or(self.session.turn_state),
            budget: later.session.budget.or(self.session.budget),
        };
        self.release_lease |= later.release_lease;
        self
    }
}

/// What a commit stored, with the seqs it was given.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// The stored messages.
    pub messages: Vec<Message>,
    /// The stored events.
    pub events: Vec<Event>,
    /// The session after the commit.
    pub session: Session,
}

/// What a turn's first commit was built on, checked by [`Storage::lease_and_commit`] once the
/// lease is taken: the session's status, and where given its current agent and last event seq.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// The session's status.
    pub status: SessionStatus,
    /// Its current agent, when the commit depends on it.
    pub current_agent: Option<String>,
    /// The seq of its last event, when the commit was built from the session as read before.
    pub last_event_seq: Option<u64>,
}

impl Expected {
    /// Whether a session with this status, agent and last event seq is what was expected.
    pub fn met(&self, status: SessionStatus, current_agent: &str, last_event_seq: u64) -> bool {
        status == self.status
            && self.current_agent.as_deref().is_none_or(|a| a == current_agent)
            && self.last_event_seq.is_none_or(|seq| seq == last_event_seq)
    }
}

/// What [`Storage::lease_and_commit`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Leased {
    /// Another owner holds the lease: nothing was stored.
    Busy,
    /// The lease is taken, but the session was not as expected (or the commit's request id had
    /// started a turn already), so nothing was committed: the session as stored once taken.
    Taken(Session),
    /// The lease is taken and the commit stored, in one transaction.
    Committed(Committed),
}

/// [`Storage::lease_and_commit`] in two steps, as the trait's default does it: the lease
/// ([`Storage::lease_session`]), then the commit if the session is as expected. For backends
/// that do it in one step for some commits only.
pub(crate) async fn lease_then_commit<S: Storage + ?Sized>(
    store: &S,
    session_id: &str,
    owner: &str,
    ttl: Duration,
    expected: &Expected,
    commit: Commit,
) -> Result<Leased> {
    let Some(session) = store.lease_session(session_id, owner, ttl).await? else {
        return Ok(Leased::Busy);
    };
    if !expected.met(session.status, &session.current_agent, session.last_event_seq) {
        return Ok(Leased::Taken(session));
    }
    if let Some(rid) = &commit.request_id
        && store.find_request(session_id, rid).await?.is_some()
    {
        return Ok(Leased::Taken(session));
    }
    store.commit(session_id, commit).await.map(Leased::Committed)
}

/// Persistence of sessions, messages, events, approvals, switches, plans and leases.
///
/// Every backend passes the conformance suite (`storage::conformance`, feature `test-utils`).
/// Implementations never block the async executor.
#[async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The backend's name as `/health` reports it: `memory`, `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Checks the store answers.
    async fn ping(&self) -> Result<()>;

    /// Creates a session: status idle, counters 0. `SessionExists` if the id is taken.
    async fn create_session(&self, new: NewSession) -> Result<Session>;

    /// One session. `SessionNotFound` if absent.
    async fn get_session(&self, id: &str) -> Result<Session>;

    /// Sessions by newest `last_activity` first (ties by id), filtered, one page at a time.
    /// `InvalidRequest` for a cursor this backend did not issue.
    async fn list_sessions(&self, query: SessionQuery) -> Result<SessionPage>;

    /// Removes the session and everything that belongs to it. `SessionNotFound` if absent.
    async fn delete_session(&self, id: &str) -> Result<()>;

    /// Applies a [`Commit`] atomically. `SessionNotFound`, `SessionBusy` (lease not held),
    /// `ApprovalNotFound` / `ApprovalAlreadyDecided` (a resolution failed), `Database`.
    async fn commit(&self, session_id: &str, commit: Commit) -> Result<Committed>;

    /// Messages with seq > `after`, oldest first, at most `limit`.
    async fn messages_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Message>>;

    /// The newest `limit` messages, oldest first. Cost independent of the history's length.
    async fn recent_messages(&self, session_id: &str, limit: usize) -> Result<Vec<Message>>;

    /// Events with seq > `after`, oldest first, at most `limit`.
    async fn events_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Event>>;

    /// The seq of the first event of the turn started with this `request_id`, if any.
    async fn find_request(&self, session_id: &str, request_id: &str) -> Result<Option<u64>>;

    /// Whether a tool result of the session answers the call `call_id` (an indexed lookup, cost
    /// independent of the history's length). The runtime answers every call before it asks the
    /// model again, so these and the newest answer's calls are every call id the session used.
    async fn tool_call_answered(&self, session_id: &str, call_id: &str) -> Result<bool>;

    /// One approval. `ApprovalNotFound` if absent.
    async fn get_approval(&self, session_id: &str, call_id: &str) -> Result<Approval>;

    /// Pending approvals of the session, oldest first.
    async fn pending_approvals(&self, session_id: &str) -> Result<Vec<Approval>>;

    /// Every switch of the session, oldest first.
    async fn switch_history(&self, session_id: &str) -> Result<Vec<AgentSwitch>>;

    /// What a history request answers: the session, its messages with seq > `after` (at most
    /// `limit`, oldest first) and every switch of its agent. `SessionNotFound` if absent.
    /// Backends that can read all three in one go override it.
    async fn session_history(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Session, Vec<Message>, Vec<AgentSwitch>)> {
        let session = self.get_session(session_id).await?;
        let messages = self.messages_after(session_id, after, limit).await?;
        let switches = self.switch_history(session_id).await?;
        Ok((session, messages, switches))
    }

    /// One plan. `None` if absent.
    async fn get_plan(&self, session_id: &str, plan_id: &str) -> Result<Option<Plan>>;

    /// Takes the session's lease for `owner` for `ttl` if it is free, expired, already
    /// `owner`'s, or held by a dead owner (one that held a [`Liveness`] it no longer holds: see
    /// [`hold_liveness`](Storage::hold_liveness)). `Ok(false)` if another owner holds it.
    /// `SessionNotFound` if absent.
    ///
    /// Expiry only lets *another* owner take the lease: until one does, the owner still holds it
    /// (it may renew it and commit under it), so a process that was slow to renew (a long pause,
    /// a loaded machine) keeps its turn unless someone else has really taken the session over.
    async fn acquire_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool>;

    /// [`acquire_lease`](Storage::acquire_lease), then the session as stored once the lease is
    /// held (`None` if another owner holds it): what a turn starts from. Backends that can do both
    /// in one round trip override it.
    async fn lease_session(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<Option<Session>> {
        if self.acquire_lease(session_id, owner, ttl).await? {
            self.get_session(session_id).await.map(Some)
        } else {
            Ok(None)
        }
    }

    /// Takes the lease as [`lease_session`](Storage::lease_session) does and, if the session is
    /// as `expected` and no turn was started with the commit's `request_id`, applies `commit`
    /// (fenced by `owner`'s lease) in the same transaction: a turn's start in one round trip.
    /// `Leased::Busy` if another owner holds the lease, `Leased::Taken` (lease taken, nothing
    /// committed: the caller goes the long way) if the session is not as expected.
    /// `SessionNotFound` if absent; a commit that fails stores nothing of the commit (the lease
    /// may stay taken: the caller releases it).
    /// Backends that can do it in one transaction override it.
    async fn lease_and_commit(
        &self,
        session_id: &str,
        owner: &str,
        ttl: Duration,
        expected: &Expected,
        commit: Commit,
    ) -> Result<Leased> {
        lease_then_commit(self, session_id, owner, ttl, expected, commit).await
    }

    /// Extends `owner`'s lease, expired or not. `Ok(false)` if another owner took it or it was
    /// released.
    async fn renew_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool>;

    /// Gives the lease up if `owner` holds it (otherwise does nothing).
    async fn release_lease(&self, session_id: &str, owner: &str) -> Result<()>;

    /// Registers `owner` as alive for as long as the returned [`Liveness`] lives and its process
    /// runs. Once it is dropped, or the process dies however it dies, `owner` is dead and
    /// [`acquire_lease`](Storage::acquire_lease) gives its leases to the next owner that asks,
    /// without waiting for them to expire. Owners that never held one are judged by expiry alone.
    async fn hold_liveness(&self, owner: &str) -> Result<Liveness>;

    /// Ids of sessions whose turn is `running` while nobody can be running it: the lease is free,
    /// expired, or held by a dead owner. At most `limit`, in no particular order. Cheap enough to
    /// ask every fraction of a second: it reads only running sessions.
    async fn orphaned_sessions(&self, limit: usize) -> Result<Vec<String>>;

    /// Commits with events, by any process, as they happen, where the backend can tell (Postgres:
    /// LISTEN/NOTIFY). `Ok(None)`: it cannot, and followers of turns in other processes poll. A
    /// notice is a wake-up, not data: the stored rows stay the truth, and a missed notice costs
    /// latency, never an event.
    async fn commit_notices(&self) -> Result<Option<CommitNotices>> {
        Ok(None)
    }

    /// Asks the owner of the session's lease to cancel its turn: marks the session until the
    /// lease is next taken or released, and wakes the owner where the backend can (Postgres:
    /// [`cancel_notices`](Storage::cancel_notices)). Returns the owner asked, `None` if nobody
    /// holds the lease (nothing is marked then). `SessionNotFound` if absent.
    async fn request_cancel(&self, session_id: &str) -> Result<Option<String>>;

    /// Ids of the sessions whose lease `owner` holds and whose turn another process asked to
    /// cancel ([`request_cancel`](Storage::request_cancel)). Cheap enough to ask every few
    /// milliseconds: it reads only `owner`'s sessions.
    async fn cancel_requests(&self, owner: &str) -> Result<Vec<String>>;

    /// Cancel requests, by any process, as they are made, where the backend can tell (Postgres:
    /// LISTEN/NOTIFY): each notice names the lease owner asked and the session. `Ok(None)`: it
    /// cannot, and owners poll [`cancel_requests`](Storage::cancel_requests). A wake-up, not
    /// data: the mark on the session stays the truth.
    async fn cancel_notices(&self) -> Result<Option<CommitNotices>> {
        Ok(None)
    }
}

/// That a commit with events happened: who committed (the lease owner, `-` if none) and where.
/// [`Storage::cancel_notices`] uses it too: the owner asked to cancel and the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitNotice {
    /// The committing lease owner, `-` for a commit made without a lease.
    pub owner: String,
    /// The session whose events grew.
    pub session_id: String,
}

/// A stream of [`CommitNotice`]s.
pub type CommitNotices = futures::stream::BoxStream<'static, CommitNotice>;

/// Opens the storage a `DATABASE_URL` names: `sqlite://PATH`, `sqlite::memory:`, `memory://`,
/// `postgres://...` or `postgresql://...`. Migrations are applied on open.
pub async fn open(url: &str) -> Result<Arc<dyn Storage>> {
    if url == "memory://" || url == "memory:" {
        return Ok(Arc::new(memory::MemoryStorage::new()));
    }
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(sqlite::SqliteStorage::open_url(url).await?));
    }
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(postgres::PostgresStorage::connect(url).await?));
    }
    Err(Error::InvalidRequest(format!(
        "unsupported database url '{}': expected sqlite://PATH, sqlite::memory:, memory:// or postgres://...",
        redact_url(url)
    )))
}

/// The URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}://{}:***{}",
                    &url[..scheme_end],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

mod commit;
#[cfg(feature = "test-utils")]
pub mod conformance;
mod diagnose;
mod liveness;
pub mod memory;
#[cfg(all(feature = "postgres", feature = "test-utils"))]
pub mod pg_testing;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod support;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_commits_merge_in_order_and_later_changes_win() {
        use crate::session::NewMessage;
        let first = Commit {
            messages: vec![NewMessage::user("a", None)],
            usage: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                ..Default::default()
            }),
            request_id: Some("r1".into()),
            session: SessionUpdate {
                status: Some(SessionStatus::Running),
                ..SessionUpdate::default()
            },
            ..Commit::default()
        };
        let later = Commit {
            messages: vec![NewMessage::user("b", None)],
            usage: Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 20,
                ..Default::default()
            }),
            session: SessionUpdate {
                status: Some(SessionStatus::Idle),
                turn_state: Some(None),
                ..SessionUpdate::default()
            },
            release_lease: true,
            ..Commit::default()
        };
        let merged = first.then(later);
        assert_eq!(
            merged
                .messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            merged.usage,
            Some(Usage {
                prompt_tokens: 11,
                completion_tokens: 22,
                ..Default::default()
            })
        );
        assert_eq!(merged.request_id.as_deref(), Some("r1"));
        assert_eq!(
            merged.session,
            SessionUpdate {
                status: Some(SessionStatus::Idle),
                turn_state: Some(None),
                current_agent: None,
                budget: None
            }
        );
        assert!(merged.release_lease);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }
}
