//! Turns that cannot go on by themselves: one whose process stopped (found at start-up, by the
//! watcher or by the next message) is resumed here or ended; one cancelled while paused is ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::submit::{give_back, keep_lease, take_session};
use super::{CallState, Next, OpenCall, Turn, TurnState, cancelled};
use crate::config::TurnRecovery;
use crate::error::{Error, Result};
use crate::orchestrator::stream::RunningTurn;
use crate::orchestrator::{CancelOutcome, Inner};
use crate::protocol::{AssistantMessage, EventPayload, ToolError};
use crate::session::{Role, Session, SessionStatus, ToolCall};
use crate::storage::Commit;

/// Takeovers of one turn without progress after which the next one ends it instead (a turn
/// whose every attempt kills its process must not kill every process in turn).
pub(super) const MAX_RESUMES: u32 = 3;

/// The result of a call with side effects that was running when its process stopped.
const INTERRUPTED_CALL: &str = "interrupted: the process running it stopped";

/// Continues, in this process, the running turn of `session` whose process stopped or handed it
/// over: this process holds the session's lease and `running` is its slot here. `turn_resumed`
/// is stored first (tokens streamed after its `after_seq` are void); then each call that was
/// cleared to run gets its fate: a read-only tool runs again, one with side effects gets
/// `TOOL_EXECUTION_FAILED` "interrupted: the process running it stopped" and the model decides;
/// and the turn goes on from its last committed step on its own task. A turn without a readable
/// state, or taken over [`MAX_RESUMES`] times without progress, is ended as interrupted instead.
pub(in crate::orchestrator) async fn resume_orphan(
    rt: &Arc<Inner>,
    session: Session,
    running: RunningTurn,
) -> Result<()> {
    let id = session.id.clone();
    let state = TurnState::stored(&session).filter(|s| s.handed_over || s.resumes < MAX_RESUMES);
    let Some(mut state) = state else {
        tracing::warn!(session_id = %id, "a stopped turn cannot be resumed (no state, or resumed {MAX_RESUMES} times without progress); ending it");
        let closed = close_interrupted(rt, &session, false).await;
        if closed.is_err() {
            let _ = rt.storage.release_lease(&id, &rt.owner).await;
        }
        rt.hubs.finish_turn(&id);
        return closed;
    };
    let reason = if state.handed_over {
        "handed_over"
    } else {
        state.resumes += 1;
        "owner_stopped"
    };
    state.handed_over = false;
    let mut turn = Turn::new(rt.clone(), session, running.cancel.clone());
    turn.handover = running.handover.clone();
    turn.state = state;
    if let Err(e) = take_over(&mut turn, reason).await {
        give_back(rt, &id).await;
        return Err(e);
    }
    tracing::info!(session_id = %id, reason, "resumed a turn of a stopped process");
    keep_lease(
        rt.clone(),
        id.clone(),
        running.cancel.clone(),
        running.finished.clone(),
    );
    let span = tracing::info_span!("turn", session_id = %id, turn_id = %turn.state.turn_id, resumed = reason);
    tokio::spawn(tracing::Instrument::instrument(
        // Boxed, as in `spawn_turn`: only a pointer moves into the task.
        Box::pin(turn.run(Next::Resume { reason })),
        span,
    ));
    Ok(())
}

/// The stored part of a takeover: `turn_resumed`, then the fate of each call in flight.
async fn take_over(turn: &mut Turn, reason: &str) -> Result<()> {
    let after_seq = last_seq_before_void_tokens(&turn.rt, &turn.session).await?;
    turn.commit(
        Commit {
            events: vec![EventPayload::TurnResumed {
                after_seq,
                reason: reason.into(),
            }],
            ..Commit::default()
        },
        true,
    )
    .await?;
    for call in turn.state.open_calls.clone() {
        if !matches!(call.state, CallState::Ready { .. })
            || turn.mode() == crate::config::ToolExecution::Client
        {
            continue;
        }
        let read_only = (turn.rt.tools.get(&call.tool_name)).is_some_and(|t| !t.has_side_effects());
        if !read_only {
            let e = ToolError {
                code: "TOOL_EXECUTION_FAILED".into(),
                message: INTERRUPTED_CALL.into(),
            };
            turn.finish_call(&call.call_id, Err(e), Commit::default()).await?;
        }
    }
    Ok(())
}

/// The seq of the session's last event that is not a streamed token: tokens after it belong to
/// the model answer that was cut, and are void once the turn is resumed.
async fn last_seq_before_void_tokens(rt: &Arc<Inner>, session: &Session) -> Result<u64> {
    const PAGE: u64 = 256;
    let mut upto = session.last_event_seq;
    while upto > 0 {
        let from = upto.saturating_sub(PAGE);
        let page = rt.storage.events_after(&session.id, from, PAGE as usize).await?;
        let kept = page.iter().rev().filter(|e| e.seq <= upto).find(|e| {
            !matches!(
                e.payload,
                EventPayload::AssistantMessage(AssistantMessage::Token { .. })
            )
        });
        if let Some(e) = kept {
            return Ok(e.seq);
        }
        upto = from;
    }
    Ok(0)
}

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
    rt.hubs.publish(&session.id, last);
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

/// How many orphaned turns one pass takes over at once: one after another, the last turn of a dead
/// process waited for all the others (seconds for a dozen under load, measured by the chaos test).
const RECOVERY_CONCURRENCY: usize = 16;

/// `recover_interrupted` of the facade: one pass over the orphaned sessions (running, and nobody
/// can be running them), each resumed or marked interrupted under a lease taken for the purpose,
/// several at once. Every session is tried; the first error is returned after.
pub(in crate::orchestrator) async fn recover_interrupted(rt: Arc<Inner>) -> Result<usize> {
    use futures::StreamExt;
    if rt.is_draining() {
        return Ok(0); // a draining process hands turns over; it takes none
    }
    rt.prove_alive().await;
    let ids = rt.storage.orphaned_sessions(1000).await?;
    let outcomes: Vec<Result<bool>> = futures::stream::iter(ids)
        .map(|id| recover_one(rt.clone(), id))
        .buffer_unordered(RECOVERY_CONCURRENCY)
        .collect()
        .await;
    let mut recovered = 0;
    for outcome in outcomes {
        recovered += usize::from(outcome?);
    }
    Ok(recovered)
}

/// Resumes or closes one orphaned session's turn (per `TURN_RECOVERY`); `false` when another
/// process was quicker or it ran again.
async fn recover_one(rt: Arc<Inner>, id: String) -> Result<bool> {
    if rt.hubs.running(&id).is_some() {
        return Ok(false);
    }
    if rt.config.turn_recovery == TurnRecovery::Resume {
        let Some(running) = rt.hubs.start_turn(&id) else {
            return Ok(false);
        };
        rt.watch_cancel_requests().await;
        return match rt
            .storage
            .lease_session(&id, &rt.owner, rt.config.lease_ttl)
            .await
        {
            Ok(Some(fresh)) if fresh.status == SessionStatus::Running => {
                match resume_orphan(&rt, fresh, running).await {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        tracing::warn!(session_id = %id, error = %e, "resuming a stopped turn failed");
                        Ok(false)
                    }
                }
            }
            Ok(Some(_)) => {
                give_back(&rt, &id).await;
                Ok(false)
            }
            // Another process was quicker, or the session is gone.
            Ok(None) | Err(Error::SessionNotFound(_)) => {
                rt.hubs.finish_turn(&id);
                Ok(false)
            }
            Err(e) => {
                rt.hubs.finish_turn(&id);
                Err(e)
            }
        };
    }
    match rt
        .storage
        .acquire_lease(&id, &rt.owner, rt.config.lease_ttl)
        .await
    {
        Ok(true) => {}
        Ok(false) | Err(Error::SessionNotFound(_)) => return Ok(false), // another process was quicker
        Err(e) => return Err(e),
    }
    let fresh = rt.storage.get_session(&id).await?;
    let closed = fresh.status == SessionStatus::Running;
    if closed {
        close_interrupted(&rt, &fresh, false).await?;
    }
    rt.storage.release_lease(&id, &rt.owner).await?;
    Ok(closed)
}

/// How long `cancel` waits for a turn running on another process to store its end.
const REMOTE_CANCEL_WAIT: Duration = Duration::from_secs(10);

/// How often `cancel` looks whether a turn on another process has stored its end.
const REMOTE_CANCEL_CHECK: Duration = Duration::from_millis(5);

/// How long `cancel` trusts its request to a live owner before it asks again (the lease may have
/// changed hands meanwhile, say after the owner died).
const REMOTE_CANCEL_REASK: Duration = Duration::from_secs(1);

/// `cancel` of the facade. A turn running here is stopped at once; one paused, or orphaned by a
/// dead process, is ended here under a lease taken for the purpose; one running on another live
/// process is asked to stop through the store (see [`Storage::request_cancel`]), and the answer
/// waits (bounded) until that turn has stored its end.
///
/// [`Storage::request_cancel`]: crate::storage::Storage::request_cancel
pub(in crate::orchestrator) async fn cancel(rt: Arc<Inner>, session_id: &str) -> Result<CancelOutcome> {
    let deadline = Instant::now() + REMOTE_CANCEL_WAIT;
    let mut asked: Option<Instant> = None;
    loop {
        let session = rt.storage.get_session(session_id).await?;
        if let Some(t) = rt.hubs.running(session_id) {
            crate::orchestrator::stop_turn(&t).await;
            return Ok(CancelOutcome::Cancelled);
        }
        match session.status {
            SessionStatus::Idle if asked.is_some() => return Ok(CancelOutcome::Cancelled),
            SessionStatus::Idle => return Ok(CancelOutcome::Idle),
            // Asked recently: the owner is stopping its turn.
            SessionStatus::Running if asked.is_some_and(|at| at.elapsed() < REMOTE_CANCEL_REASK) => {}
            _ => match end_here(&rt, session_id).await {
                Err(Error::SessionBusy(_)) => {
                    if rt.storage.request_cancel(session_id).await?.is_some() {
                        asked = Some(Instant::now());
                    }
                }
                Ok(CancelOutcome::Idle) if asked.is_some() => return Ok(CancelOutcome::Cancelled),
                other => return other,
            },
        }
        if Instant::now() >= deadline {
            return Err(Error::SessionBusy(session_id.into()));
        }
        tokio::time::sleep(REMOTE_CANCEL_CHECK).await;
    }
}

/// Ends the session's paused or orphaned turn as cancelled in this process; `SESSION_BUSY` if
/// another live process holds the session.
async fn end_here(rt: &Arc<Inner>, session_id: &str) -> Result<CancelOutcome> {
    let (running, session) = take_session(rt, session_id).await?;
    if session.status == SessionStatus::Idle {
        // The turn ended between the first look and taking the session.
        give_back(rt, session_id).await;
        return Ok(CancelOutcome::Idle);
    }
    let mut turn = Turn::new(rt.clone(), session, running.cancel.clone());
    let result = turn.finish(Err(cancelled())).await;
    give_back(rt, session_id).await;
    let events = result?;
    rt.hubs.publish(session_id, events);
    Ok(CancelOutcome::Cancelled)
}
