//! The one commit algorithm: the order in which every backend stores a [`Commit`], and what its
//! rows are given (seqs, times, the session's new counters). Backends supply only the steps.
//!
//! A commit, inside one backend transaction:
//!
//! 1. reads the session's head (its seq counters and lease owner; SQL backends lock the row here),
//!    `SessionNotFound` if it is gone, `SessionBusy` if the commit is fenced by a lease another
//!    owner holds;
//! 2. puts its approvals, then applies its resolutions as compare-and-set (pending → decided), so a
//!    commit may put an approval and decide it; a failed one is `ApprovalNotFound` or
//!    `ApprovalAlreadyDecided`;
//! 3. appends its messages and events with the session's next seqs, all stamped `at`;
//! 4. remembers its `request_id` with the seq of its first event (a reused id keeps its first
//!    turn), then records its switches and puts its plans;
//! 5. updates the session row ([`SessionChange`]) and returns the session as stored.
//!
//! Any error leaves the transaction to the backend to roll back, so nothing of the commit stays.
//!
//! Most commits only append ([`Appending`]: messages, events, a request id and the session
//! change; every commit of a streaming turn). Steps 1, 3, 4 and 5 need nothing from the head but
//! the seqs to continue from, so a backend that pays a round trip per step (Postgres) may run them
//! as one statement that numbers the rows from the head it locks, and hand that head to
//! [`Appending::finish`], which judges it and numbers the rows exactly as [`run`] does.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::support::counted_messages;
use super::{Commit, Committed};
use crate::approval::{Approval, ApprovalResolution};
use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::protocol::{Event, EventPayload, Plan};
use crate::session::{AgentSwitch, Message, NewMessage, Session, SessionStatus, TurnStateJson, Usage};
use crate::time::Timestamp;

/// What a commit needs to know of its session before it writes anything.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Head {
    /// The seq of the session's last message (0 if none).
    pub last_message_seq: u64,
    /// The seq of the session's last event (0 if none).
    pub last_event_seq: u64,
    /// Who holds the session's lease, expired or not (the owner holds it until another takes it).
    pub lease_owner: Option<String>,
}

/// How a commit changes the session row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SessionChange {
    /// Messages appended: `last_message_seq` grows by this.
    pub messages: u64,
    /// Events appended: `last_event_seq` grows by this.
    pub events: u64,
    /// Messages that count in `message_count` (all but system notes).
    pub counted_messages: u64,
    /// Switches recorded.
    pub switches: u64,
    /// Tokens to add.
    pub usage: Usage,
    /// Cost to add.
    pub cost: f64,
    /// New budgets, if any.
    pub budget: Option<Budget>,
    /// The new `last_activity`.
    pub at: Timestamp,
    /// New status, if any.
    pub status: Option<SessionStatus>,
    /// New current agent, if any: the commit's explicit one, else its last switch's target.
    pub current_agent: Option<String>,
    /// `Some(None)` clears the turn state, `Some(Some(v))` sets it.
    pub turn_state: Option<Option<TurnStateJson>>,
    /// Whether the lease is given up (only a fenced commit can give it up).
    pub release_lease: bool,
}

impl SessionChange {
    /// What `commit` does to its session row; its turn state is taken out of it, not copied.
    fn of(commit: &mut Commit, at: Timestamp) -> SessionChange {
        SessionChange {
            messages: commit.messages.len() as u64,
            events: commit.events.len() as u64,
            counted_messages: counted_messages(commit),
            switches: commit.switches.len() as u64,
            usage: commit.usage.unwrap_or_default(),
            cost: commit.cost.unwrap_or(0.0),
            budget: commit.session.budget,
            at,
            status: commit.session.status,
            // An explicit current agent wins over the switches' last target.
            current_agent: commit
                .session
                .current_agent
                .clone()
                .or_else(|| commit.switches.last().map(|s| s.to_agent.clone())),
            turn_state: commit.session.turn_state.take(),
            release_lease: commit.release_lease && commit.lease_owner.is_some(),
        }
    }

    /// The change applied to a session value (what the SQL backends' `UPDATE` does to the row).
    pub(crate) fn apply_to(self, s: &mut Session) {
        s.last_message_seq += self.messages;
        s.last_event_seq += self.events;
        s.message_count += self.counted_messages;
        s.usage += self.usage;
        s.cost += self.cost;
        if let Some(budget) = self.budget {
            s.budget = budget;
        }
        s.last_activity = self.at;
        if let Some(status) = self.status {
            s.status = status;
        }
        if let Some(agent) = self.current_agent {
            s.current_agent = agent;
        }
        if let Some(turn_state) = self.turn_state {
            s.turn_state = turn_state;
        }
    }
}

/// A backend's steps of one commit, inside its transaction, on one session. [`run`] calls them in
/// order; a step that fails ends the commit, and the backend rolls its transaction back.
pub(crate) trait CommitSteps {
    /// The session's head, locking it against other commits; `None` if there is no session.
    async fn head(&mut self) -> Result<Option<Head>>;
    /// Inserts the approval, or replaces the one with its call id.
    async fn put_approval(&mut self, approval: &Approval) -> Result<()>;
    /// Decides the approval if it is pending: `false` if it is absent or already decided.
    async fn decide(&mut self, resolution: &ApprovalResolution) -> Result<bool>;
    /// Whether an approval with this call id exists (to tell why [`decide`](Self::decide) failed).
    async fn approval_exists(&mut self, call_id: &str) -> Result<bool>;
    /// Appends messages whose seqs and times are set.
    async fn insert_messages(&mut self, messages: &[Message]) -> Result<()>;
    /// Appends events whose seqs are set, happening `at` (events carry no time of their own).
    async fn insert_events(&mut self, events: &[Event], at: Timestamp) -> Result<()>;
    /// Remembers the turn's request id with its first event seq, unless the id is known already.
    async fn remember_request(&mut self, request_id: &str, first_event_seq: u64) -> Result<()>;
    /// Records switches after the session's earlier ones.
    async fn insert_switches(&mut self, switches: &[AgentSwitch]) -> Result<()>;
    /// Inserts the plan, or replaces the one with its plan id.
    async fn put_plan(&mut self, plan: &Plan) -> Result<()>;
    /// Applies the change to the session row and returns the session as stored.
    async fn update_session(&mut self, change: SessionChange) -> Result<Session>;
}

/// Stores `commit` through `steps`, in the order the module documents.
pub(crate) async fn run<S: CommitSteps>(
    steps: &mut S,
    session_id: &str,
    mut commit: Commit,
) -> Result<Committed> {
    let at = commit.at.unwrap_or_else(Timestamp::now);
    let head = admit(session_id, steps.head().await?, commit.lease_owner.as_deref())?;

    for a in &commit.approvals {
        steps.put_approval(a).await?;
    }
    for r in &commit.resolutions {
        if !steps.decide(r).await? {
            return Err(if steps.approval_exists(&r.call_id).await? {
                Error::ApprovalAlreadyDecided(r.call_id.clone())
            } else {
                Error::ApprovalNotFound(r.call_id.clone())
            });
        }
    }

    let change = SessionChange::of(&mut commit, at);
    let (messages, events) = numbered(&head, commit.messages, encoded(commit.events)?, at);
    steps.insert_messages(&messages).await?;
    steps.insert_events(&events, at).await?;
    if let Some(request_id) = &commit.request_id {
        // The first event of this commit (or of the next one, if it has none).
        steps
            .remember_request(request_id, head.last_event_seq + 1)
            .await?;
    }
    steps.insert_switches(&commit.switches).await?;
    for p in &commit.plans {
        steps.put_plan(p).await?;
    }
    let session = steps.update_session(change).await?;
    Ok(Committed {
        messages,
        events,
        session,
    })
}

/// A commit that only appends: no approvals, resolutions, switches or plans. A backend stores it
/// in one step that locks the head and, unless `lease_owner` is set and is not the head's lease
/// owner (the fence of step 1), writes: messages numbered from `head.last_message_seq + 1`,
/// events from `head.last_event_seq + 1`, the request id (unless known) with
/// `head.last_event_seq + 1`, and the session `change`. Then [`finish`](Self::finish).
#[derive(Debug)]
pub(crate) struct Appending {
    /// The commit's fence: it writes only while this owner holds the lease.
    pub lease_owner: Option<String>,
    /// When it happens: the messages' and events' time.
    pub at: Timestamp,
    /// Messages to append, in order.
    pub messages: Vec<NewMessage>,
    /// Events to append, in order, each with its JSON text (the row, and later its SSE frame).
    pub events: Vec<(EventPayload, Arc<str>)>,
    /// The turn's request id to remember.
    pub request_id: Option<String>,
    /// What it does to the session row.
    pub change: SessionChange,
}

impl Appending {
    /// `commit` as an appending commit, or back unchanged (boxed: it is large) if it does more
    /// than append.
    pub(crate) fn of(mut commit: Commit) -> Result<std::result::Result<Appending, Box<Commit>>> {
        let appends_only = commit.approvals.is_empty()
            && commit.resolutions.is_empty()
            && commit.switches.is_empty()
            && commit.plans.is_empty();
        if !appends_only {
            return Ok(Err(Box::new(commit)));
        }
        let at = commit.at.unwrap_or_else(Timestamp::now);
        let change = SessionChange::of(&mut commit, at);
        Ok(Ok(Appending {
            lease_owner: commit.lease_owner,
            at,
            messages: commit.messages,
            events: encoded(commit.events)?,
            request_id: commit.request_id,
            change,
        }))
    }

    /// The commit's outcome from what its one statement saw and did: `head`, the session's head
    /// as it locked it (`None`: no session); `session`, the row as it wrote it (`None`: it wrote
    /// nothing). Errors as [`run`]'s, and the rows numbered as [`run`] numbers them.
    pub(crate) fn finish(
        self,
        session_id: &str,
        head: Option<Head>,
        session: Option<Session>,
    ) -> Result<Committed> {
        let head = admit(session_id, head, self.lease_owner.as_deref())?;
        let session = session.ok_or_else(|| {
            Error::Internal(format!(
                "the commit on session '{session_id}' was admitted but its session row was not written"
            ))
        })?;
        let (messages, events) = numbered(&head, self.messages, self.events, self.at);
        Ok(Committed {
            messages,
            events,
            session,
        })
    }
}

/// Step 1's judgement of the head: `SessionNotFound` without one, `SessionBusy` if the commit is
/// fenced by a lease another owner holds (or nobody does).
fn admit(session_id: &str, head: Option<Head>, owner: Option<&str>) -> Result<Head> {
    let head = head.ok_or_else(|| Error::SessionNotFound(session_id.to_string()))?;
    if fenced_out(owner, head.lease_owner.as_deref()) {
        return Err(Error::SessionBusy(session_id.to_string()));
    }
    Ok(head)
}

/// Whether a commit fenced by `owner` (if any) is refused on a session whose lease `head_owner` holds.
fn fenced_out(owner: Option<&str>, head_owner: Option<&str>) -> bool {
    owner.is_some_and(|o| head_owner != Some(o))
}

/// Each payload with its JSON text, serialized here once: the backend stores that text as the
/// event's row, and the event keeps it for its SSE frame.
fn encoded(events: Vec<EventPayload>) -> Result<Vec<(EventPayload, Arc<str>)>> {
    events
        .into_iter()
        .map(|p| match p.to_json() {
            Ok(json) => Ok((p, Arc::from(json))),
            Err(e) => Err(Error::Internal(format!("cannot encode an event as JSON: {e}"))),
        })
        .collect()
}

/// The commit's messages and events with the seqs that follow `head`, happening `at`.
fn numbered(
    head: &Head,
    messages: Vec<NewMessage>,
    events: Vec<(EventPayload, Arc<str>)>,
    at: Timestamp,
) -> (Vec<Message>, Vec<Event>) {
    let messages = (head.last_message_seq + 1..)
        .zip(messages)
        .map(|(seq, m)| Message {
            seq,
            role: m.role,
            content: m.content,
            agent: m.agent,
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
            created_at: at,
        })
        .collect();
    let events = (head.last_event_seq + 1..)
        .zip(events)
        .map(|(seq, (payload, json))| Event::stored(seq, payload, json))
        .collect();
    (messages, events)
}

/// [`run`] for a backend whose steps never wait (they block or work in memory): runs it to the
/// end on the calling thread. `Internal` if a step did wait, which would be a backend bug.
pub(crate) fn run_blocking<S: CommitSteps>(
    steps: &mut S,
    session_id: &str,
    commit: Commit,
) -> Result<Committed> {
    let mut future = pin!(run(steps, session_id, commit));
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => Err(Error::Internal(
            "a blocking storage backend's commit step waited".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps whose head never comes: a backend that wrongly waits.
    struct Waits;

    impl CommitSteps for Waits {
        async fn head(&mut self) -> Result<Option<Head>> {
            std::future::pending().await
        }
        async fn put_approval(&mut self, _: &Approval) -> Result<()> {
            Ok(())
        }
        async fn decide(&mut self, _: &ApprovalResolution) -> Result<bool> {
            Ok(true)
        }
        async fn approval_exists(&mut self, _: &str) -> Result<bool> {
            Ok(true)
        }
        async fn insert_messages(&mut self, _: &[Message]) -> Result<()> {
            Ok(())
        }
        async fn insert_events(&mut self, _: &[Event], _: Timestamp) -> Result<()> {
            Ok(())
        }
        async fn remember_request(&mut self, _: &str, _: u64) -> Result<()> {
            Ok(())
        }
        async fn insert_switches(&mut self, _: &[AgentSwitch]) -> Result<()> {
            Ok(())
        }
        async fn put_plan(&mut self, _: &Plan) -> Result<()> {
            Ok(())
        }
        async fn update_session(&mut self, _: SessionChange) -> Result<Session> {
            Err(Error::Internal("never reached".into()))
        }
    }

    fn head(owner: Option<&str>) -> Option<Head> {
        Some(Head {
            last_message_seq: 4,
            last_event_seq: 9,
            lease_owner: owner.map(str::to_string),
        })
    }

    fn token() -> EventPayload {
        EventPayload::AssistantMessage(crate::protocol::AssistantMessage::Token { token: "t".into() })
    }

    fn appending(owner: Option<&str>) -> Appending {
        let mut c = Commit::now();
        c.lease_owner = owner.map(str::to_string);
        c.messages.push(NewMessage::user("hi", None));
        c.events.push(token());
        Appending::of(c).unwrap().expect("only appends")
    }

    #[test]
    fn only_a_commit_without_approvals_resolutions_switches_or_plans_is_appending() {
        let mut c = Commit::now();
        c.plans.push(Plan {
            plan_id: "p".into(),
            goal: "g".into(),
            subtasks: vec![],
        });
        assert_eq!(Appending::of(c.clone()).unwrap().map(|_| ()), Err(Box::new(c)));
    }

    #[test]
    fn an_appending_commit_is_judged_and_numbered_as_run_does() {
        let missing = Error::SessionNotFound("s".into());
        assert_eq!(appending(None).finish("s", None, None).map(|_| ()), Err(missing));
        let busy = Error::SessionBusy("s".into());
        assert_eq!(
            appending(Some("o1"))
                .finish("s", head(Some("o2")), None)
                .map(|_| ()),
            Err(busy.clone())
        );
        assert_eq!(
            appending(Some("o1")).finish("s", head(None), None).map(|_| ()),
            Err(busy)
        );
        // Admitted, yet the statement wrote no session row: a backend bug, not a silent success.
        assert!(matches!(
            appending(Some("o1")).finish("s", head(Some("o1")), None),
            Err(Error::Internal(_))
        ));
        let a = appending(None);
        let at = a.at;
        let session = Session {
            id: "s".into(),
            user_id: None,
            metadata: serde_json::json!({}),
            created_at: at,
            last_activity: at,
            current_agent: "orchestrator".into(),
            status: SessionStatus::Idle,
            message_count: 5,
            last_message_seq: 5,
            last_event_seq: 10,
            usage: Usage::default(),
            turn_state: None,
            budget: Budget::default(),
            cost: 0.0,
        };
        let done = a.finish("s", head(Some("o2")), Some(session.clone())).unwrap();
        assert_eq!(
            done,
            Committed {
                messages: vec![Message {
                    seq: 5,
                    role: crate::session::Role::User,
                    content: "hi".into(),
                    agent: None,
                    tool_calls: vec![],
                    tool_call_id: None,
                    created_at: at,
                }],
                events: vec![Event::new(10, token())],
                session,
            }
        );
        // The event keeps the JSON text the backend stored as its row, for its SSE frame.
        let kept = done.events[0].payload_json().unwrap();
        assert!(
            matches!(&kept, std::borrow::Cow::Borrowed(j) if *j == r#"{"type":"assistant_message","token":"t"}"#),
            "{kept:?}"
        );
    }

    #[test]
    fn a_blocking_commit_whose_step_waits_is_an_internal_error_not_a_hang() {
        assert_eq!(
            run_blocking(&mut Waits, "s", Commit::now()).map(|_| ()),
            Err(Error::Internal(
                "a blocking storage backend's commit step waited".into()
            ))
        );
    }
}
