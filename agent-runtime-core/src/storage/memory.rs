//! In-memory storage: the whole store behind one std `Mutex`, for tests, examples and embedders
//! that need no durability. Same semantics as the SQL backends (it passes the conformance suite).
//!
//! Every operation takes the lock, works on plain data and lets go before returning; nothing is
//! awaited while the lock is held. A commit validates everything against the current state (and a
//! copy of the session's approvals) before it changes anything, which is what makes it atomic.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use super::liveness::OwnerRegistry;
use super::support::{SessionCursor, check_commit, check_page_limit, counted_messages};
use super::{Commit, Committed, Liveness, SessionPage, SessionQuery, Storage};
use crate::approval::{Approval, ApprovalStatus};
use crate::error::{Error, Result};
use crate::protocol::{Event, Plan};
use crate::session::{AgentSwitch, Message, NewSession, Session, SessionStatus, Usage};
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

#[derive(Debug)]
struct Lease {
    owner: String,
    expires_at: Timestamp,
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

fn apply_commit(data: &mut SessionData, session_id: &str, commit: Commit) -> Result<Committed> {
    let now = Timestamp::now();
    let at = commit.at.unwrap_or(now);
    if let Some(owner) = &commit.lease_owner
        && !data.lease_held_by(owner)
    {
        return Err(Error::SessionBusy(session_id.to_string()));
    }

    let counted = counted_messages(&commit);
    // Approvals first, then resolutions (which may decide an approval put by this same commit),
    // on a copy: a failed resolution drops the copy and nothing has changed.
    let approvals = if commit.approvals.is_empty() && commit.resolutions.is_empty() {
        None
    } else {
        let mut staged = data.approvals.clone();
        for a in commit.approvals {
            match staged.iter_mut().find(|x| x.call_id == a.call_id) {
                Some(slot) => *slot = a,
                None => staged.push(a),
            }
        }
        for r in commit.resolutions {
            let slot = staged
                .iter_mut()
                .find(|x| x.call_id == r.call_id)
                .ok_or_else(|| Error::ApprovalNotFound(r.call_id.clone()))?;
            if slot.status != ApprovalStatus::Pending {
                return Err(Error::ApprovalAlreadyDecided(r.call_id));
            }
            slot.status = r.status;
            slot.feedback = r.feedback;
            slot.modified_arguments = r.modified_arguments;
            slot.decided_at = Some(r.decided_at);
        }
        Some(staged)
    };

    // Nothing below can fail.
    let s = &mut data.session;
    let first_event_seq = s.last_event_seq + 1;
    let messages: Vec<Message> = commit
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| Message {
            seq: s.last_message_seq + i as u64 + 1,
            role: m.role,
            content: m.content,
            agent: m.agent,
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
            created_at: at,
        })
        .collect();
    let events: Vec<Event> = commit
        .events
        .into_iter()
        .enumerate()
        .map(|(i, payload)| Event {
            seq: first_event_seq + i as u64,
            payload,
        })
        .collect();
    s.last_message_seq += messages.len() as u64;
    s.last_event_seq += events.len() as u64;
    s.message_count += counted;
    s.last_activity = at;
    if let Some(last) = commit.switches.last() {
        s.current_agent = last.to_agent.clone();
    }
    if let Some(agent) = commit.session.current_agent {
        s.current_agent = agent;
    }
    if let Some(status) = commit.session.status {
        s.status = status;
    }
    if commit.release_lease && commit.lease_owner.is_some() {
        data.lease = None;
    }
    if let Some(turn_state) = commit.session.turn_state {
        s.turn_state = turn_state;
    }
    if let Some(usage) = commit.usage {
        s.usage += usage;
    }
    let session = s.clone();

    data.messages.extend(messages.iter().cloned());
    data.events.extend(events.iter().cloned());
    if let Some(staged) = approvals {
        data.approvals = staged;
    }
    data.switches.extend(commit.switches);
    for p in commit.plans {
        data.plans.insert(p.plan_id.clone(), p);
    }
    if let Some(request_id) = commit.request_id {
        // A reused request id keeps the turn it first started.
        data.requests.entry(request_id).or_insert(first_event_seq);
    }
    Ok(Committed {
        messages,
        events,
        session,
    })
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
        let session = Session {
            id: new.id.clone(),
            user_id: new.user_id,
            metadata: new.metadata,
            created_at: new.created_at,
            last_activity: new.created_at,
            current_agent: new.current_agent,
            status: SessionStatus::Idle,
            message_count: 0,
            last_message_seq: 0,
            last_event_seq: 0,
            usage: Usage::default(),
            turn_state: None,
        };
        sessions.insert(
            new.id,
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
        self.with_session(session_id, |d| {
            let now = Timestamp::now();
            let free = match &d.lease {
                None => true,
                Some(l) => l.owner == owner || l.expires_at <= now || self.owners.is_dead(&l.owner),
            };
            if free {
                d.lease = Some(Lease {
                    owner: owner.to_string(),
                    expires_at: now.plus(ttl),
                });
            }
            Ok(free)
        })
    }

    async fn renew_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.with_session(session_id, |d| {
            if !d.lease_held_by(owner) {
                return Ok(false);
            }
            d.lease = Some(Lease {
                owner: owner.to_string(),
                expires_at: Timestamp::now().plus(ttl),
            });
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
