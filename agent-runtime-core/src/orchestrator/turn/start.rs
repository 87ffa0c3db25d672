//! The first, synchronous part of a turn, one function per kind of message: everything that
//! must be stored before the stream starts (API.md §4, §9.1, §9.20).

use std::sync::Arc;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::recover::close_interrupted;
use super::{CallState, ClientToolSpan, Next, Stored, Turn, TurnState, decide};
use crate::approval::{ApprovalResolution, ApprovalStatus};
use crate::context::build_window;
use crate::error::Result;
use crate::events::BusEventKind;
use crate::orchestrator::{Inner, Submission};
use crate::protocol::{ClientMessage, EventPayload, StopReason, ToolError};
use crate::session::{AgentSwitch, Message, NewMessage, Role, Session, SessionStatus, Usage};
use crate::storage::{Commit, Committed, Expected, SessionUpdate};
use crate::time::Timestamp;

/// The first part of the turn `sub` starts, on `session` as stored once its lease was taken.
/// Returns the turn, what it does next, and the seq of the first event of its stream.
pub(super) async fn start(
    rt: &Arc<Inner>,
    mut session: Session,
    sub: Submission,
    cancel: CancellationToken,
) -> Result<(Turn, Next, u64)> {
    if session.status == SessionStatus::Running {
        // We hold the lease, so nobody runs it: a turn interrupted by a crash.
        close_interrupted(rt, &session, true).await?;
        session = rt.storage.get_session(&session.id).await?;
    }
    let mut turn = Turn::new(rt.clone(), session, cancel);
    let rid = sub.request_id;
    let (next, first) = match sub.message {
        ClientMessage::UserMessage { content, agent_type } => {
            user_message(&mut turn, content, agent_type, rid).await?
        }
        ClientMessage::SwitchAgent {
            agent_type,
            content,
            reason,
        } => switch_agent(&mut turn, agent_type, content, reason, rid).await?,
        ClientMessage::ToolResult {
            call_id,
            result,
            error,
        } => tool_result(&mut turn, call_id, result, error, rid).await?,
        ClientMessage::HitlDecision(d) => decide::decide(&mut turn, d, rid).await?,
    };
    Ok((turn, next, first))
}

/// A turn's first commit, built before the lease is taken: for a user message without an agent
/// to switch to, on a session idle on the default agent, before the session is read; for a tool
/// result, from the session as read before the lease (to check the call). The lease and this
/// commit are one storage call ([`Storage::lease_and_commit`]); a session not as the commit
/// expects takes the lease only, and the message goes the long way ([`start`]).
///
/// [`Storage::lease_and_commit`]: crate::storage::Storage::lease_and_commit
pub(super) struct QuickStart {
    /// What the commit assumes of the session.
    pub expected: Expected,
    /// The turn's first commit: the user message, the session running, the fresh turn state; or
    /// the tool result closing its call, the session running.
    pub commit: Commit,
    /// The message to route, when the orchestrator routes it.
    route: Option<String>,
    /// A tool result's turn, built on the session read before the lease (its state without the
    /// answered call), and the span of the call the client ran, recorded once the answer is
    /// stored.
    answered: Option<(Box<Turn>, Option<ClientToolSpan>)>,
}

/// The [`QuickStart`] of `sub`, if it has one; `stored` is the session as read before the lease,
/// when the submission is a tool result (checked: its call is open). A user message too large
/// for the default agent has none: the long way answers it for the agent the session is really
/// on.
pub(super) fn quick_start(rt: &Arc<Inner>, sub: &Submission, stored: Option<Session>) -> Option<QuickStart> {
    if let Some(session) = stored {
        return quick_tool_result(rt, sub, session);
    }
    let ClientMessage::UserMessage {
        content,
        agent_type: None,
    } = &sub.message
    else {
        return None;
    };
    let agent = &rt.config.default_agent;
    check_fits(rt, agent, content).ok()?;
    // As `user_message` decides it for a message without an agent type on the default agent.
    let route = rt.config.multi_agent_enabled && rt.config.auto_agent_switching && agent == "orchestrator";
    let mut state = TurnState::fresh();
    state.route_pending = route;
    let commit = Commit {
        at: Some(Timestamp::now()),
        lease_owner: Some(rt.owner.clone()),
        messages: vec![NewMessage::user(content.clone(), Some(agent.clone()))],
        request_id: sub.request_id.clone(),
        session: SessionUpdate {
            turn_state: Some(Some(state.to_stored())),
            ..running()
        },
        ..Commit::default()
    };
    Some(QuickStart {
        expected: Expected {
            status: SessionStatus::Idle,
            current_agent: Some(agent.clone()),
            last_event_seq: None,
        },
        commit,
        route: route.then(|| content.clone()),
        answered: None,
    })
}

/// A tool result's [`QuickStart`]: its first commit made as [`tool_result`] makes it, on the
/// session as read before the lease; `lease_and_commit` stores it only if the session's status,
/// agent and last event are still the ones read.
fn quick_tool_result(rt: &Arc<Inner>, sub: &Submission, session: Session) -> Option<QuickStart> {
    let ClientMessage::ToolResult {
        call_id,
        result,
        error,
    } = &sub.message
    else {
        return None;
    };
    let expected = Expected {
        status: session.status,
        current_agent: Some(session.current_agent.clone()),
        last_event_seq: Some(session.last_event_seq),
    };
    // The turn's cancel token is the running turn's, given once the session is taken.
    let mut turn = Turn::new(rt.clone(), session, CancellationToken::new());
    let (extra, outcome) = tool_result_commit(
        &mut turn,
        call_id,
        result.clone(),
        error.clone(),
        sub.request_id.clone(),
    );
    let (c, span) = turn.close_call(call_id, outcome, extra)?;
    let commit = turn.prepare(c, true);
    Some(QuickStart {
        expected,
        commit,
        route: None,
        answered: Some((Box::new(turn), span)),
    })
}

impl QuickStart {
    /// The turn whose first commit `lease_and_commit` stored, as [`start`] returns it.
    pub(super) fn started(
        self,
        rt: &Arc<Inner>,
        mut committed: Committed,
        cancel: CancellationToken,
    ) -> (Turn, Next, u64) {
        let session = &committed.session;
        let first = session.last_event_seq - committed.events.len() as u64 + 1;
        let next = Next::Run { route: self.route };
        if let Some((turn, span)) = self.answered {
            let mut turn = *turn;
            turn.cancel = cancel;
            let Stored { events } = turn.stored(committed);
            rt.hubs.publish(turn.id(), events);
            turn.trace_client_tool(span);
            return (turn, next, first);
        }
        let before = session.last_message_seq - committed.messages.len() as u64;
        rt.hubs.recent.extend(before, session, &committed.messages);
        rt.hubs
            .publish(&session.id, std::mem::take(&mut committed.events));
        let turn = Turn::new(rt.clone(), committed.session, cancel);
        (turn, next, first)
    }
}

fn running() -> SessionUpdate {
    SessionUpdate {
        status: Some(SessionStatus::Running),
        ..SessionUpdate::default()
    }
}

/// A user message: cancels what the paused turn waits for, switches if asked, stores the message,
/// and runs a fresh turn (routed when it is on the orchestrator).
async fn user_message(
    turn: &mut Turn,
    content: String,
    agent_type: Option<String>,
    request_id: Option<String>,
) -> Result<(Next, u64)> {
    let rt = turn.rt.clone();
    let agent = agent_type.as_deref().unwrap_or(&turn.session.current_agent);
    check_fits(&rt, agent, &content)?;
    let first_seq = turn.session.last_event_seq + 1;
    cancel_paused_turn(turn, request_id).await?;
    turn.state = TurnState::fresh();
    if let Some(t) = &agent_type {
        let c = explicit_switch(turn, t, "User requested agent switch");
        turn.commit(
            Commit {
                session: running(),
                ..c
            },
            true,
        )
        .await?;
    }
    let agent = turn.agent();
    let route = agent_type.is_none()
        && agent == rt.config.default_agent
        && rt.config.multi_agent_enabled
        && rt.config.auto_agent_switching
        && agent == "orchestrator";
    // Stored with the message: a turn cut before the routing decision is routed where it resumes.
    turn.state.route_pending = route;
    let c = Commit {
        messages: vec![NewMessage::user(content.clone(), Some(agent.clone()))],
        session: running(),
        ..Commit::default()
    };
    turn.commit(c, true).await?;
    Ok((
        Next::Run {
            route: route.then_some(content),
        },
        first_seq,
    ))
}

/// An explicit switch: alone it is streamed and ends at once; with `content` it cancels what the
/// paused turn waits for and runs a fresh turn on the new agent.
async fn switch_agent(
    turn: &mut Turn,
    agent_type: String,
    content: Option<String>,
    reason: Option<String>,
    request_id: Option<String>,
) -> Result<(Next, u64)> {
    let rt = turn.rt.clone();
    let reason = reason.unwrap_or_else(|| "User requested agent switch".into());
    if let Some(text) = &content {
        check_fits(&rt, &agent_type, text)?;
    }
    let first = turn.session.last_event_seq + 1;
    let Some(text) = content else {
        let mut c = explicit_switch(turn, &agent_type, &reason);
        c.request_id = request_id;
        c.events.push(EventPayload::Done {
            stop_reason: StopReason::Completed,
            usage: Usage::default().into(),
        });
        let first = turn.commit(c, false).await?;
        return Ok((Next::Nothing, first.unwrap_or(1)));
    };
    cancel_paused_turn(turn, request_id).await?;
    let c = explicit_switch(turn, &agent_type, &reason);
    turn.state = TurnState::fresh();
    turn.commit(
        Commit {
            session: running(),
            ..c
        },
        true,
    )
    .await?;
    turn.commit(
        Commit {
            messages: vec![NewMessage::user(text, Some(agent_type))],
            ..Commit::default()
        },
        true,
    )
    .await?;
    Ok((Next::Run { route: None }, first))
}

/// The client's result of a call it ran (or, for a call awaiting approval, its verdict by running
/// it or not); the turn continues.
async fn tool_result(
    turn: &mut Turn,
    call_id: String,
    result: Option<Value>,
    error: Option<String>,
    request_id: Option<String>,
) -> Result<(Next, u64)> {
    let before_seq = turn.session.last_event_seq;
    let (extra, outcome) = tool_result_commit(turn, &call_id, result, error, request_id);
    turn.finish_call(&call_id, outcome, extra).await?;
    Ok((Next::Run { route: None }, before_seq + 1))
}

/// What a tool result stores before its call's answer (the session running; for a call awaiting
/// approval, its verdict), and the answer; the turn counts it as progress.
fn tool_result_commit(
    turn: &mut Turn,
    call_id: &str,
    result: Option<Value>,
    error: Option<String>,
    request_id: Option<String>,
) -> (Commit, std::result::Result<Value, ToolError>) {
    let pending = turn
        .state
        .open_calls
        .iter()
        .find(|c| c.call_id == call_id)
        .map(|c| c.state.clone());
    let mut extra = Commit {
        request_id,
        session: running(),
        ..Commit::default()
    };
    if pending == Some(CallState::AwaitingApproval) {
        let (status, verb) = if error.is_some() {
            (ApprovalStatus::Rejected, "reject")
        } else {
            (ApprovalStatus::Approved, "approve")
        };
        extra.resolutions.push(ApprovalResolution {
            call_id: call_id.to_string(),
            status,
            feedback: error.clone(),
            modified_arguments: None,
            decided_at: Timestamp::now(),
        });
        extra.events.push(EventPayload::ApprovalResolved {
            call_id: call_id.to_string(),
            decision: verb.into(),
        });
    }
    let outcome = match error {
        Some(e) => Err(ToolError {
            code: "TOOL_EXECUTION_FAILED".into(),
            message: e,
        }),
        None => Ok(result.unwrap_or(Value::Null)),
    };
    // A stored tool result is progress, as a tool the runtime ran is: takeovers count from zero.
    turn.state.resumes = 0;
    (extra, outcome)
}

/// A new message ends a paused turn: its pending approvals and open calls are cancelled. Their
/// events are the first of the new message's stream (API.md §9.20), so the submission's
/// `request_id` rides on the first commit made from here on.
async fn cancel_paused_turn(turn: &mut Turn, request_id: Option<String>) -> Result<()> {
    turn.defer(Commit {
        request_id,
        ..Commit::default()
    });
    let paused = matches!(
        turn.session.status,
        SessionStatus::AwaitingApproval | SessionStatus::AwaitingToolResult
    );
    if paused {
        let why = "cancelled: the user sent a new message";
        turn.close_open_calls(why, "CANCELLED").await?;
        turn.abandon_plan(why).await?;
        turn.abandon_budget(why).await?;
    }
    Ok(())
}

/// The newest message alone must fit the window (API.md §9.1: an HTTP error, not an event).
fn check_fits(rt: &Arc<Inner>, agent_type: &str, content: &str) -> Result<()> {
    let Some(agent) = rt.agents.get(agent_type) else {
        return Ok(());
    };
    let probe = Message {
        seq: 0,
        role: Role::User,
        content: content.to_string(),
        agent: None,
        tool_calls: vec![],
        tool_call_id: None,
        created_at: Timestamp::now(),
    };
    let limits = rt.offer(agent).limits;
    build_window(
        rt.tokenizer.as_ref(),
        limits,
        &agent.system_prompt,
        std::slice::from_ref(&probe),
    )
    .map(|_| ())
}

fn explicit_switch(turn: &Turn, to: &str, reason: &str) -> Commit {
    let from = turn.agent();
    turn.rt.bus.publish(
        BusEventKind::AgentSwitched,
        turn.id(),
        json!({"from_agent": from, "to_agent": to, "reason": reason, "automatic": false}),
    );
    Commit {
        switches: vec![AgentSwitch {
            from_agent: from.clone(),
            to_agent: to.into(),
            reason: reason.into(),
            timestamp: Timestamp::now(),
        }],
        events: vec![EventPayload::AgentSwitched {
            from_agent: from,
            to_agent: to.into(),
            reason: reason.into(),
        }],
        ..Commit::default()
    }
}
