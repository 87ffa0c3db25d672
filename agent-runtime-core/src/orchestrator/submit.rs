//! How a submission becomes a turn: the checks made before anything is stored, the first
//! (synchronous) commit, the session lease, decisions, cancellation and crash recovery.

use super::{CallState, Next, OpenCall, Turn, TurnState, cancelled, plan};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::approval::{ApprovalResolution, ApprovalStatus, RequestType};
use crate::context::build_window;
use crate::error::{Error, Result};
use crate::events::BusEventKind;
use crate::orchestrator::stream::{EventStream, Follow};
use crate::orchestrator::{CancelOutcome, Inner, Submission};
use crate::protocol::{ClientMessage, EventPayload, HitlDecision, StopReason, ToolError};
use crate::session::{AgentSwitch, Message, NewMessage, Role, Session, SessionStatus, ToolCall, Usage};
use crate::storage::{Commit, SessionUpdate};
use crate::time::Timestamp;

/// Takes the session for a turn in this process and in storage, and returns it as stored once
/// taken; `SESSION_BUSY` otherwise.
async fn take_session(
    rt: &Arc<Inner>,
    session_id: &str,
) -> Result<(crate::orchestrator::stream::RunningTurn, Session)> {
    let running = match rt.hubs.start_turn(session_id) {
        Some(r) => r,
        None => {
            // A turn that already stored its end may still be letting go of the session.
            let winding_down = rt.storage.get_session(session_id).await?.status != SessionStatus::Running;
            if let Some(t) = rt.hubs.running(session_id).filter(|_| winding_down) {
                let finished = t.finished.notified();
                tokio::pin!(finished);
                finished.as_mut().enable();
                if rt.hubs.running(session_id).is_some() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), finished).await;
                }
            }
            rt.hubs
                .start_turn(session_id)
                .ok_or_else(|| Error::SessionBusy(session_id.into()))?
        }
    };
    rt.prove_alive().await;
    match rt
        .storage
        .lease_session(session_id, &rt.owner, rt.config.lease_ttl)
        .await
    {
        Ok(Some(session)) => Ok((running, session)),
        Ok(None) => {
            rt.hubs.finish_turn(session_id);
            Err(Error::SessionBusy(session_id.into()))
        }
        Err(e) => {
            rt.hubs.finish_turn(session_id);
            Err(e)
        }
    }
}

pub(super) async fn give_back(rt: &Arc<Inner>, session_id: &str) {
    let _ = rt.storage.release_lease(session_id, &rt.owner).await;
    rt.hubs.finish_turn(session_id);
}

/// Renews the lease while the turn runs; a lost lease cancels the turn.
fn keep_lease(
    rt: Arc<Inner>,
    session_id: String,
    cancel: CancellationToken,
    finished: Arc<tokio::sync::Notify>,
) {
    let every = (rt.config.lease_ttl / 3).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let done = finished.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        loop {
            tokio::select! {
                _ = &mut done => return,
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match rt
                .storage
                .renew_lease(&session_id, &rt.owner, rt.config.lease_ttl)
                .await
            {
                Ok(true) => {}
                _ => {
                    warn!(session_id, "session lease lost; cancelling the turn");
                    cancel.cancel();
                    return;
                }
            }
        }
    });
}

/// `submit` of the facade.
pub(in crate::orchestrator) async fn submit(
    rt: Arc<Inner>,
    session_id: &str,
    sub: Submission,
) -> Result<EventStream> {
    let session = rt.storage.get_session(session_id).await?;
    validate(&rt, &session, &sub.message)?;
    let rid = sub.request_id.as_deref();
    if let Some(replay) = replay_request(&rt, session_id, rid).await? {
        return Ok(replay);
    }
    let (running, session) = match take_session(&rt, session_id).await {
        Ok(r) => r,
        Err(Error::SessionBusy(id)) => {
            // A duplicate of a submission still starting: wait for its first commit and replay it.
            if rid.is_some() {
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Some(replay) = replay_request(&rt, session_id, rid).await? {
                        return Ok(replay);
                    }
                }
            }
            return Err(Error::SessionBusy(id));
        }
        Err(e) => return Err(e),
    };
    // Looked up again now that the session is ours: the original may have run and ended
    // between the first look and taking the session.
    match replay_request(&rt, session_id, rid).await {
        Ok(None) => {}
        Ok(Some(replay)) => {
            give_back(&rt, session_id).await;
            return Ok(replay);
        }
        Err(e) => {
            give_back(&rt, session_id).await;
            return Err(e);
        }
    }
    // Subscribed before the first commit: the turn's events all arrive live, none is read back.
    let subscribed =
        EventStream::subscribe(rt.storage.clone(), rt.hubs.clone(), session_id, Follow::UntilDone);
    match start(&rt, session, sub, running.cancel.clone()).await {
        Ok((turn, next, first_seq)) => {
            let stream = subscribed.after(first_seq.saturating_sub(1));
            keep_lease(
                rt.clone(),
                session_id.to_string(),
                running.cancel.clone(),
                running.finished.clone(),
            );
            let span = info_span!("turn", session_id, turn_id = %turn.state.turn_id);
            tokio::spawn(turn.run(next).instrument(span));
            Ok(stream)
        }
        Err(e) => {
            give_back(&rt, session_id).await;
            Err(e)
        }
    }
}

/// The stream replaying the turn a `request_id` already started, if one did.
async fn replay_request(
    rt: &Arc<Inner>,
    session_id: &str,
    request_id: Option<&str>,
) -> Result<Option<EventStream>> {
    let Some(rid) = request_id else { return Ok(None) };
    let first = rt.storage.find_request(session_id, rid).await?;
    if first.is_some() {
        rt.listen_for_commits().await; // the turn may run in another process
    }
    Ok(first.map(|first| {
        EventStream::new(
            rt.storage.clone(),
            rt.hubs.clone(),
            session_id,
            first.saturating_sub(1),
            Follow::UntilDone,
        )
    }))
}

/// Checks what can be checked before anything is stored.
fn validate(rt: &Arc<Inner>, session: &Session, m: &ClientMessage) -> Result<()> {
    let agent_ok = |t: &str| {
        if !rt.config.multi_agent_enabled && t != rt.config.default_agent {
            return Err(Error::InvalidRequest(
                "multi-agent mode is disabled: sessions stay on the default agent".into(),
            ));
        }
        if rt.agents.contains(t) {
            Ok(())
        } else {
            Err(Error::InvalidRequest(format!(
                "unknown agent type '{t}' (known: {})",
                rt.agents.types().join(", ")
            )))
        }
    };
    match m {
        ClientMessage::UserMessage { content, agent_type } => {
            if content.trim().is_empty() {
                return Err(Error::InvalidRequest("content must be a non-empty string".into()));
            }
            if let Some(t) = agent_type {
                agent_ok(t)?;
            }
        }
        ClientMessage::SwitchAgent {
            agent_type, content, ..
        } => {
            agent_ok(agent_type)?;
            if content.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err(Error::InvalidRequest(
                    "content must be a non-empty string when given".into(),
                ));
            }
        }
        ClientMessage::ToolResult { call_id, .. } => {
            let open = TurnState::load(session).open_calls.iter().any(|c| {
                c.call_id == *call_id
                    && matches!(c.state, CallState::AwaitingClient | CallState::AwaitingApproval)
            });
            if !open
                || !matches!(
                    session.status,
                    SessionStatus::AwaitingToolResult | SessionStatus::AwaitingApproval
                )
            {
                return Err(Error::ToolCallNotFound(call_id.clone()));
            }
        }
        ClientMessage::HitlDecision(d) => {
            if !matches!(d.decision.as_str(), "approve" | "edit" | "reject") {
                return Err(Error::InvalidRequest(
                    "decision must be approve, edit or reject".into(),
                ));
            }
            if d.decision == "edit" && !d.modified_arguments.as_ref().is_some_and(Value::is_object) {
                return Err(Error::InvalidRequest(
                    "an edit needs modified_arguments as a JSON object".into(),
                ));
            }
        }
    }
    Ok(())
}

/// The first, synchronous part of a turn: everything that must be stored before the stream starts.
/// `session` is as stored once its lease was taken.
async fn start(
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
    let running = SessionUpdate {
        status: Some(SessionStatus::Running),
        ..SessionUpdate::default()
    };
    let request_id = sub.request_id.clone();
    let (next, first) = match sub.message {
        ClientMessage::UserMessage { content, agent_type } => {
            let paused = matches!(
                turn.session.status,
                SessionStatus::AwaitingApproval | SessionStatus::AwaitingToolResult
            );
            if paused {
                let why = "cancelled: the user sent a new message";
                turn.close_open_calls(why, "CANCELLED").await?;
                turn.abandon_plan(why).await?;
            }
            turn.state = TurnState::fresh();
            check_fits(rt, &turn.session, agent_type.as_deref(), &content)?;
            let mut first = None;
            if let Some(t) = &agent_type {
                let c = explicit_switch(&turn, t, "User requested agent switch");
                first = Some(
                    turn.commit(
                        Commit {
                            request_id: request_id.clone(),
                            session: running.clone(),
                            ..c
                        },
                        true,
                    )
                    .await?,
                );
            }
            let agent = turn.agent();
            let c = Commit {
                messages: vec![NewMessage::user(content.clone(), Some(agent.clone()))],
                request_id: if first.is_none() { request_id } else { None },
                session: running,
                ..Commit::default()
            };
            let committed = turn.commit(c, true).await?;
            let first_seq = first
                .and_then(|c| c.events.first().map(|e| e.seq))
                .unwrap_or(committed.session.last_event_seq + 1);
            let route = agent_type.is_none()
                && agent == rt.config.default_agent
                && rt.config.multi_agent_enabled
                && rt.config.auto_agent_switching
                && agent == "orchestrator";
            (
                Next::Run {
                    route: route.then_some(content),
                },
                first_seq,
            )
        }
        ClientMessage::SwitchAgent {
            agent_type,
            content,
            reason,
        } => {
            let reason = reason.unwrap_or_else(|| "User requested agent switch".into());
            let paused = matches!(
                turn.session.status,
                SessionStatus::AwaitingApproval | SessionStatus::AwaitingToolResult
            );
            if paused && content.is_some() {
                let why = "cancelled: the user sent a new message";
                turn.close_open_calls(why, "CANCELLED").await?;
                turn.abandon_plan(why).await?;
            }
            if let Some(text) = &content {
                check_fits(rt, &turn.session, Some(&agent_type), text)?;
            }
            let mut c = explicit_switch(&turn, &agent_type, &reason);
            c.request_id = request_id;
            match content {
                Some(text) => {
                    turn.state = TurnState::fresh();
                    let committed = turn
                        .commit(
                            Commit {
                                session: running,
                                ..c
                            },
                            true,
                        )
                        .await?;
                    let first = committed.events.first().map(|e| e.seq).unwrap_or(1);
                    turn.commit(
                        Commit {
                            messages: vec![NewMessage::user(text, Some(agent_type))],
                            ..Commit::default()
                        },
                        true,
                    )
                    .await?;
                    (Next::Run { route: None }, first)
                }
                None => {
                    c.events.push(EventPayload::Done {
                        stop_reason: StopReason::Completed,
                        usage: Usage::default(),
                    });
                    let committed = turn.commit(c, false).await?;
                    (
                        Next::Nothing,
                        committed.events.first().map(|e| e.seq).unwrap_or(1),
                    )
                }
            }
        }
        ClientMessage::ToolResult {
            call_id,
            result,
            error,
        } => {
            let pending = turn
                .state
                .open_calls
                .iter()
                .find(|c| c.call_id == call_id)
                .map(|c| c.state.clone());
            let mut extra = Commit {
                request_id,
                session: running,
                ..Commit::default()
            };
            if pending == Some(CallState::AwaitingApproval) {
                let (status, verb) = if error.is_some() {
                    (ApprovalStatus::Rejected, "reject")
                } else {
                    (ApprovalStatus::Approved, "approve")
                };
                extra.resolutions.push(ApprovalResolution {
                    call_id: call_id.clone(),
                    status,
                    feedback: error.clone(),
                    modified_arguments: None,
                    decided_at: Timestamp::now(),
                });
                extra.events.push(EventPayload::ApprovalResolved {
                    call_id: call_id.clone(),
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
            let before_seq = turn.session.last_event_seq;
            turn.finish_call(&call_id, outcome, extra).await?;
            (Next::Run { route: None }, before_seq + 1)
        }
        ClientMessage::HitlDecision(d) => decide(&mut turn, d, request_id).await?,
    };
    Ok((turn, next, first))
}

/// The newest message alone must fit the window (API.md §9.1: an HTTP error, not an event).
fn check_fits(rt: &Arc<Inner>, session: &Session, agent_type: Option<&str>, content: &str) -> Result<()> {
    let Some(agent) = rt.agents.get(agent_type.unwrap_or(&session.current_agent)) else {
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

/// Records a human decision (compare-and-set) and its `approval_resolved` event.
async fn decide(turn: &mut Turn, d: HitlDecision, request_id: Option<String>) -> Result<(Next, u64)> {
    let approval = turn.rt.storage.get_approval(turn.id(), &d.call_id).await?;
    if approval.status != ApprovalStatus::Pending {
        return Err(Error::ApprovalAlreadyDecided(d.call_id));
    }
    if approval.request_type == RequestType::Plan {
        let first = plan::decide_plan(turn, d, request_id).await?;
        return Ok((Next::Run { route: None }, first));
    }
    let open = turn
        .state
        .open_calls
        .iter()
        .any(|c| c.call_id == d.call_id && c.state == CallState::AwaitingApproval);
    if !open {
        return Err(Error::ApprovalAlreadyDecided(d.call_id));
    }
    let (status, state, kind) = match d.decision.as_str() {
        "approve" => (
            ApprovalStatus::Approved,
            CallState::Ready {
                run_arguments: approval.arguments.clone(),
            },
            BusEventKind::ApprovalApproved,
        ),
        "edit" => {
            let args = d.modified_arguments.clone().unwrap_or(Value::Null);
            turn.check_call(&approval.tool_name, &args)
                .map_err(|f| Error::InvalidTool(f.message().to_string()))?;
            (
                ApprovalStatus::Edited,
                CallState::Ready { run_arguments: args },
                BusEventKind::ApprovalApproved,
            )
        }
        _ => (
            ApprovalStatus::Rejected,
            CallState::Rejected {
                feedback: d.feedback.clone(),
            },
            BusEventKind::ApprovalRejected,
        ),
    };
    turn.set_state(&d.call_id, state);
    let still_pending = turn
        .state
        .open_calls
        .iter()
        .any(|c| c.state == CallState::AwaitingApproval);
    let mut events = vec![EventPayload::ApprovalResolved {
        call_id: d.call_id.clone(),
        decision: d.decision.clone(),
    }];
    let status_after = if still_pending {
        events.push(EventPayload::Done {
            stop_reason: StopReason::AwaitingApproval,
            usage: turn.state.usage,
        });
        SessionStatus::AwaitingApproval
    } else {
        SessionStatus::Running
    };
    let c = Commit {
        resolutions: vec![ApprovalResolution::of_decision(&d, status)],
        events,
        request_id,
        session: SessionUpdate {
            status: Some(status_after),
            ..SessionUpdate::default()
        },
        ..Commit::default()
    };
    let committed = turn.commit(c, true).await?;
    turn.rt.bus.publish(
        kind,
        turn.id(),
        json!({"call_id": d.call_id, "decision": d.decision}),
    );
    let first = committed.events.first().map(|e| e.seq).unwrap_or(1);
    // While other approvals are pending the turn stays paused: this stream ends with its `done`.
    let next = if still_pending {
        Next::Nothing
    } else {
        Next::Run { route: None }
    };
    Ok((next, first))
}

/// Gives a turn interrupted by a crash its ending: open calls get "interrupted", pending approvals
/// are cancelled, an `error` and `done` are stored, and the session is idle again.
async fn close_interrupted(rt: &Arc<Inner>, session: &Session, keep_lease: bool) -> Result<()> {
    let mut state = TurnState::load(session);
    // The history is the ground truth of which calls still lack a result (the turn state may be
    // older than the last commit, or unreadable).
    for call in unanswered_calls(rt, &session.id).await? {
        if !state.open_calls.iter().any(|c| c.call_id == call.id) {
            state.open_calls.push(OpenCall {
                call_id: call.id,
                tool_name: call.name,
                arguments: call.arguments,
                state: CallState::New,
            });
        }
    }
    let mut turn = Turn::new(rt.clone(), session.clone(), CancellationToken::new());
    turn.state = state;
    turn.keep_lease = keep_lease;
    turn.close_open_calls(
        "interrupted: the runtime stopped while this call was open",
        "TOOL_EXECUTION_FAILED",
    )
    .await?;
    let last = turn
        .finish(Err(Error::Internal(
            "the turn was interrupted: the runtime stopped while it was running".into(),
        )))
        .await?;
    rt.hubs.publish(&session.id, &last);
    Ok(())
}

/// Calls of the newest tool-calling assistant message that have no result in the history.
async fn unanswered_calls(rt: &Arc<Inner>, session_id: &str) -> Result<Vec<ToolCall>> {
    let recent = rt.storage.recent_messages(session_id, 200).await?;
    let Some(pos) = recent
        .iter()
        .rposition(|m| m.role == Role::Assistant && !m.tool_calls.is_empty())
    else {
        return Ok(vec![]);
    };
    let answered: Vec<&str> = recent[pos + 1..]
        .iter()
        .filter_map(|m| m.tool_call_id.as_deref())
        .collect();
    Ok(recent[pos]
        .tool_calls
        .iter()
        .filter(|c| !answered.contains(&c.id.as_str()))
        .cloned()
        .collect())
}

/// `recover_interrupted` of the facade: one pass over the orphaned sessions (running, and nobody
/// can be running them), each marked interrupted under a lease taken for the purpose.
pub(in crate::orchestrator) async fn recover_interrupted(rt: Arc<Inner>) -> Result<usize> {
    rt.prove_alive().await;
    let mut recovered = 0;
    for id in rt.storage.orphaned_sessions(1000).await? {
        if rt.hubs.running(&id).is_some() {
            continue;
        }
        match rt
            .storage
            .acquire_lease(&id, &rt.owner, rt.config.lease_ttl)
            .await
        {
            Ok(true) => {}
            Ok(false) | Err(Error::SessionNotFound(_)) => continue, // another process was quicker
            Err(e) => return Err(e),
        }
        let fresh = rt.storage.get_session(&id).await?;
        if fresh.status == SessionStatus::Running {
            close_interrupted(&rt, &fresh, false).await?;
            recovered += 1;
        }
        rt.storage.release_lease(&id, &rt.owner).await?;
    }
    Ok(recovered)
}

/// `cancel` of the facade.
pub(in crate::orchestrator) async fn cancel(rt: Arc<Inner>, session_id: &str) -> Result<CancelOutcome> {
    let session = rt.storage.get_session(session_id).await?;
    if let Some(t) = rt.hubs.running(session_id) {
        crate::orchestrator::stop_turn(&t).await;
        return Ok(CancelOutcome::Cancelled);
    }
    if session.status == SessionStatus::Idle {
        return Ok(CancelOutcome::Idle);
    }
    let (running, session) = take_session(&rt, session_id).await?;
    let mut turn = Turn::new(rt.clone(), session, running.cancel.clone());
    let result = turn.finish(Err(cancelled())).await;
    give_back(&rt, session_id).await;
    if let Ok(events) = &result {
        rt.hubs.publish(session_id, events);
    }
    result.map(|_| CancelOutcome::Cancelled)
}
