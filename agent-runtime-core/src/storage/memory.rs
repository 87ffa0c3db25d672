//! In-memory storage: the whole store behind one std `Mutex`, for tests, examples and embedders
//! that need no durability. Same semantics as the SQL backends (it passes the conformance suite).
//!
//! Every operation takes the lock, works on plain data and lets go before returning; nothing is
//! awaited while the lock is held. A commit runs the shared commit steps against the current state,
//! staging its changes, and applies them only once every step has passed: that makes it atomic.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use super::commit::{self, CommitSteps, Head, SessionChange};
use super::liveness::OwnerRegistry;
use super::support::{SessionCursor, check_commit, check_page_limit};
use super::{Commit, Committed, Expected, Leased, Liveness, SessionPage, SessionQuery, Storage};
use crate::approval::{Approval, ApprovalResolution, ApprovalStatus};
use crate::error::{Error, Result};
use crate::protocol::{Event, Plan};
use crate::session::{AgentSwitch, Message, NewSession, Session, SessionStatus};
use crate::time::Timestamp;

/// In-memory storage. Cheap to create; everything is lost when it is dropped.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    sessions: Mutex<HashMap<String, SessionData>>,
    owners: OwnerRegistry,
}

/// Everything that belongs to one session; deleting the entry deletes all of it.
#[derive(Debug)]
struct SessionData {
    session: Session,
    /// `messages[i].seq == i + 1`: seqs are gap-free, so a seq is an index.
    messages: Vec<Message>,
    /// `events[i].seq == i + 1`.
    events: Vec<Event>,
    /// In insertion order (replacing keeps the position), like a SQL row id.
    approvals: Vec<Approval>,
    switches: Vec<AgentSwitch>,
    plans: HashMap<String, Plan>,
    requests: HashMap<String, u64>,
    lease: Option<Lease>,
}

#[derive(Debug, Clone)]
struct Lease {
    owner: String,
    expires_at: Timestamp,
    /// Another caller asked the owner to cancel its turn (`Storage::request_cancel`).
    cancel_requested: bool,
}

impl SessionData {
    /// Held until another owner takes it, expired or not (see `Storage::acquire_lease`).
    fn lease_held_by(&self, owner: &str) -> bool {
        matches!(&self.lease, Some(l) if l.owner == owner)
    }
}

impl MemoryStorage {
    /// A new, empty store.
    pub fn new() -> Self {
        MemoryStorage::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, SessionData>> {
        // A panic while holding the lock cannot leave a half-applied commit (commits validate
        // before they mutate), so the data behind a poisoned lock is still consistent.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the session's data, or `SessionNotFound`.
    /// Takes the session's lease for `owner` if it is free, expired, `owner`'s, or a dead
    /// owner's (see `Storage::acquire_lease`).
    fn acquire(&self, d: &mut SessionData, owner: &str, ttl: Duration) -> bool {
        let now = Timestamp::now();
        let free = match &d.lease {
            None => true,
            Some(l) => l.owner == owner || l.expires_at <= now || self.owners.is_dead(&l.owner),
        };
        if free {
            d.lease = Some(Lease {
                owner: owner.to_string(),
                expires_at: now.plus(ttl),
                cancel_requested: false,
            });
        }
        free
    }

    fn with_session<T>(&self, id: &str, f: impl FnOnce(&mut SessionData) -> Result<T>) -> Result<T> {
        let mut sessions = self.lock();
        let data = sessions
            .get_mut(id)
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        f(data)
    }
}

fn page<T: Clone>(items: &[T], after: u64, limit: usize) -> Vec<T> {
    let start = usize::try_from(after).unwrap_or(usize::MAX).min(items.len());
    items[start..].iter().take(limit).cloned().collect()
}

/// One commit's steps on a session: they read the session's data and stage every change here;
/// only a commit that got through all of them is applied ([`Staged::apply`]), which makes it
/// atomic.
struct MemoryCommit<'d> {
    data: &'d SessionData,
    staged: Staged,
}

/// What a commit changes, until it is applied.
#[derive(Default)]
struct Staged {
    /// The session's approvals with this commit's puts and decisions, if it has any.
    approvals: Option<Vec<Approval>>,
    messages: Vec<Message>,
    events: Vec<Event>,
    request: Option<(String, u64)>,
    switches: Vec<AgentSwitch>,
    plans: Vec<Plan>,
    session: Option<Session>,
    release_lease: bool,
}

impl MemoryCommit<'_> {
    fn approvals(&mut self) -> &mut Vec<Approval> {
        self.staged
            .approvals
            .get_or_insert_with(|| self.data.approvals.clone())
    }
}

impl CommitSteps for MemoryCommit<'_> {
    async fn head(&mut self) -> Result<Option<Head>> {
        Ok(Some(Head {
            last_message_seq: self.data.session.last_message_seq,
            last_event_seq: self.data.session.last_event_seq,
            lease_owner: self.data.lease.as_ref().map(|l| l.owner.clone()),
        }))
    }

    async fn put_approval(&mut self, approval: &Approval) -> Result<()> {
        let approvals = self.approvals();
        match approvals.iter_mut().find(|x| x.call_id == approval.call_id) {
            Some(slot) => *slot = approval.clone(),
            None => approvals.push(approval.clone()),
        }
        Ok(())
    }

    async fn decide(&mut self, r: &ApprovalResolution) -> Result<bool> {
        let pending = self
            .approvals()
            .iter_mut()
            .find(|x| x.call_id == r.call_id && x.status == ApprovalStatus::Pending);
        let Some(slot) = pending else {
            return Ok(false);
        };
        slot.status = r.status;
        slot.feedback = r.feedback.clone();
        slot.modified_arguments = r.modified_arguments.clone();
        slot.decided_at = Some(r.decided_at);
        Ok(true)
    }

    async fn approval_exists(&mut self, call_id: &str) -> Result<bool> {
        Ok(self.approvals().iter().any(|x| x.call_id == call_id))
    }

    async fn insert_messages(&mut self, messages: &[Message]) -> Result<()> {
        self.staged.messages = messages.to_vec();
        Ok(())
    }

    async fn insert_events(&mut self, events: &[Event], _at: Timestamp) -> Result<()> {
        self.staged.events = events.to_vec();
        Ok(())
    }

    async fn remember_request(&mut self, request_id: &str, first_event_seq: u64) -> Result<()> {
        self.staged.request = Some((request_id.to_string(), first_event_seq));
        Ok(())
    }

    async fn insert_switches(&mut self, switches: &[AgentSwitch]) -> Result<()> {
        self.staged.switches = switches.to_vec();
        Ok(())
    }

    async fn put_plan(&mut self, plan: &Plan) -> Result<()> {
        self.staged.plans.push(plan.clone());
        Ok(())
    }

    async fn update_session(&mut self, change: SessionChange) -> Result<Session> {
        let mut session = self.data.session.clone();
        self.staged.release_lease = change.release_lease;
        change.apply_to(&mut session);
        self.staged.session = Some(session.clone());
        Ok(session)
    }
}

impl Staged {
    fn apply(self, data: &mut SessionData) {
        if let Some(approvals) = self.approvals {
            data.approvals = approvals;
        }
        data.messages.extend(self.messages);
        data.events.extend(self.events);
        if let Some((request_id, first_event_seq)) = self.request {
            // A reused request id keeps the turn it first started.
            data.requests.entry(request_id).or_insert(first_event_seq);
        }
        data.switches.extend(self.switches);
        for p in self.plans {
            data.plans.insert(p.plan_id.clone(), p);
        }
        if let Some(session) = self.session {
            data.session = session;
        }
        if self.release_lease {
            data.lease = None;
        }
    }
}

fn apply_commit(data: &mut SessionData, session_id: &str, commit: Commit) -> Result<Committed> {
    let mut steps = MemoryCommit {
        data,
        staged: Staged::default(),
    };
    let committed = commit::run_blocking(&mut steps, session_id, commit)?;
    let staged = steps.staged;
    staged.apply(data);
    Ok(committed)
}

#[async_trait]
impl Storage for MemoryStorage {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn create_session(&self, new: NewSession) -> Result<Session> {
        let mut sessions = self.lock();
        if sessions.contains_key(&new.id) {
            return Err(Error::SessionExists(new.id));
        }
        let session = new.into_session();
        sessions.insert(
            session.id.clone(),
            SessionData {
                session: session.clone(),
                messages: vec![],
                events: vec![],
                approvals: vec![],
                switches: vec![],
                plans: HashMap::new(),
                requests: HashMap::new(),
                lease: None,
            },
        );
        Ok(session)
    }

    async fn get_session(&self, id: &str) -> Result<Session> {
        self.with_session(id, |d| Ok(d.session.clone()))
    }

    async fn list_sessions(&self, query: SessionQuery) -> Result<SessionPage> {
        check_page_limit(query.limit)?;
        let cursor = query.cursor.as_deref().map(SessionCursor::decode).transpose()?;
        let sessions = self.lock();
        let filtered = sessions
            .values()
            .map(|d| &d.session)
            .filter(|s| query.user_id.is_none() || s.user_id == query.user_id)
            .filter(|s| query.status.is_none_or(|st| s.status == st));
        let total = filtered.clone().count() as u64;
        let mut matching: Vec<&Session> = filtered
            .filter(|s| match &cursor {
                None => true,
                Some(c) => (s.last_activity.as_millis(), s.id.as_str()) < (c.last_activity, c.id.as_str()),
            })
            .collect();
        matching.sort_by(|x, y| (y.last_activity, &y.id).cmp(&(x.last_activity, &x.id)));
        let more = matching.len() > query.limit;
        let page: Vec<Session> = matching.into_iter().take(query.limit).cloned().collect();
        let next_cursor = match (more, page.last()) {
            (true, Some(last)) => Some(SessionCursor::after(last.last_activity, &last.id).encode()),
            _ => None,
        };
        Ok(SessionPage {
            sessions: page,
            next_cursor,
            total,
        })
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn delete_session(&self, id: &str) -> Result<()> {
        self.lock()
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))
    }

    #[tracing::instrument(level = "debug", skip(self, commit), fields(
        messages = commit.messages.len(), events = commit.events.len()))]
    async fn commit(&self, session_id: &str, commit: Commit) -> Result<Committed> {
        check_commit(session_id, &commit)?;
        self.with_session(session_id, |d| apply_commit(d, session_id, commit))
    }

    async fn messages_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Message>> {
        self.with_session(session_id, |d| Ok(page(&d.messages, after, limit)))
    }

    async fn recent_messages(&self, session_id: &str, limit: usize) -> Result<Vec<Message>> {
        self.with_session(session_id, |d| {
            let start = d.messages.len().saturating_sub(limit);
            Ok(d.messages[start..].to_vec())
        })
    }

    async fn events_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Event>> {
        self.with_session(session_id, |d| Ok(page(&d.events, after, limit)))
    }

    async fn find_request(&self, session_id: &str, request_id: &str) -> Result<Option<u64>> {
        self.with_session(session_id, |d| Ok(d.requests.get(request_id).copied()))
    }

    async fn tool_call_answered(&self, session_id: &str, call_id: &str) -> Result<bool> {
        // In memory a scan of the session's messages (no I/O) stands in for the index.
        self.with_session(session_id, |d| {
            Ok(d.messages
                .iter()
                .any(|m| m.tool_call_id.as_deref() == Some(call_id)))
        })
    }

    async fn get_approval(&self, session_id: &str, call_id: &str) -> Result<Approval> {
        self.with_session(session_id, |d| {
            d.approvals
                .iter()
                .find(|a| a.call_id == call_id)
                .cloned()
                .ok_or_else(|| Error::ApprovalNotFound(call_id.to_string()))
        })
    }

    async fn pending_approvals(&self, session_id: &str) -> Result<Vec<Approval>> {
        self.with_session(session_id, |d| {
            let mut pending: Vec<Approval> = d
                .approvals
                .iter()
                .filter(|a| a.status == ApprovalStatus::Pending)
                .cloned()
                .collect();
            // Stable: equal times keep insertion order.
            pending.sort_by_key(|a| a.created_at);
            Ok(pending)
        })
    }

    async fn switch_history(&self, session_id: &str) -> Result<Vec<AgentSwitch>> {
        self.with_session(session_id, |d| Ok(d.switches.clone()))
    }

    async fn get_plan(&self, session_id: &str, plan_id: &str) -> Result<Option<Plan>> {
        self.with_session(session_id, |d| Ok(d.plans.get(plan_id).cloned()))
    }

    async fn acquire_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.with_session(session_id, |d| Ok(self.acquire(d, owner, ttl)))
    }

    async fn lease_and_commit(
        &self,
        session_id: &str,
        owner: &str,
        ttl: Duration,
        expected: &Expected,
        commit: Commit,
    ) -> Result<Leased> {
        check_commit(session_id, &commit)?;
        self.with_session(session_id, |d| {
            let before = d.lease.clone();
            if !self.acquire(d, owner, ttl) {
                return Ok(Leased::Busy);
            }
            let s = &d.session;
            let replayed = (commit.request_id.as_ref()).is_some_and(|r| d.requests.contains_key(r));
            if replayed || !expected.met(s.status, &s.current_agent, s.last_event_seq) {
                return Ok(Leased::Taken(d.session.clone()));
            }
            // As the SQL backends' transaction: a failed commit leaves the lease as it was.
            apply_commit(d, session_id, commit)
                .map(Leased::Committed)
                .inspect_err(|_| d.lease = before)
        })
    }

    async fn renew_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.with_session(session_id, |d| {
            if !d.lease_held_by(owner) {
                return Ok(false);
            }
            if let Some(l) = &mut d.lease {
                l.expires_at = Timestamp::now().plus(ttl);
            }
            Ok(true)
        })
    }

    async fn release_lease(&self, session_id: &str, owner: &str) -> Result<()> {
        self.with_session(session_id, |d| {
            if matches!(&d.lease, Some(l) if l.owner == owner) {
                d.lease = None;
            }
            Ok(())
        })
    }

    async fn request_cancel(&self, session_id: &str) -> Result<Option<String>> {
        self.with_session(session_id, |d| {
            Ok(d.lease.as_mut().map(|l| {
                l.cancel_requested = true;
                l.owner.clone()
            }))
        })
    }

    async fn cancel_requests(&self, owner: &str) -> Result<Vec<String>> {
        Ok(self
            .lock()
            .iter()
            .filter(|(_, d)| matches!(&d.lease, Some(l) if l.owner == owner && l.cancel_requested))
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn hold_liveness(&self, owner: &str) -> Result<Liveness> {
        Ok(self.owners.hold(owner))
    }

    async fn orphaned_sessions(&self, limit: usize) -> Result<Vec<String>> {
        let now = Timestamp::now();
        Ok(self
            .lock()
            .values()
            .filter(|d| d.session.status == SessionStatus::Running)
            .filter(|d| match &d.lease {
                None => true,
                Some(l) => l.expires_at <= now || self.owners.is_dead(&l.owner),
            })
            .map(|d| d.session.id.clone())
            .take(limit)
            .collect())
    }
}
