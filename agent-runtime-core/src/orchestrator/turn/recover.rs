//! Ending turns that cannot end by themselves: one interrupted by a crash (found at start-up or
//! by the next message) and one cancelled while paused.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::submit::{give_back, take_session};
use super::{CallState, OpenCall, Turn, TurnState, cancelled};
use crate::error::{Error, Result};
use crate::orchestrator::{CancelOutcome, Inner};
use crate::session::{Role, Session, SessionStatus, ToolCall};

/// Gives a turn interrupted by a crash its ending: open calls get "interrupted", pending approvals
/// are cancelled, an `error` and `done` are stored, and the session is idle again.
pub(super) async fn close_interrupted(rt: &Arc<Inner>, session: &Session, keep_lease: bool) -> Result<()> {
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
