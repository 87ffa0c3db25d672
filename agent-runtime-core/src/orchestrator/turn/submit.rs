//! How a submission becomes a turn: the checks made before anything is stored, the session
//! lease, idempotent replays, and the turn's task (its first part is in `start`).

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use super::recover::resume_orphan;
use super::start::{quick_start, start};
use super::{CallState, Next, Turn, TurnState};
use crate::config::TurnRecovery;
use crate::error::{Error, Result};
use crate::orchestrator::stream::{EventStream, Follow};
use crate::orchestrator::{Inner, Submission};
use crate::protocol::ClientMessage;
use crate::session::{Session, SessionStatus};
use crate::storage::{Commit, Expected, Leased};

/// Takes the session for a turn in this process and in storage, and returns it as stored once
/// taken; `SESSION_BUSY` otherwise.
pub(super) async fn take_session(
    rt: &Arc<Inner>,
    session_id: &str,
) -> Result<(crate::orchestrator::stream::RunningTurn, Session)> {
    let (running, leased) = take_session_with(rt, session_id, None).await?;
    match leased {
        Leased::Taken(session) => Ok((running, session)),
        Leased::Committed(c) => Ok((running, c.session)),
        Leased::Busy => Err(Error::SessionBusy(session_id.into())),
    }
}

/// [`take_session`], storing `first` with the lease if the session is as it expects
/// ([`Storage::lease_and_commit`]): `Leased::Taken` or `Leased::Committed`, never `Busy`.
///
/// [`Storage::lease_and_commit`]: crate::storage::Storage::lease_and_commit
async fn take_session_with(
    rt: &Arc<Inner>,
    session_id: &str,
    first: Option<(&Expected, Commit)>,
) -> Result<(crate::orchestrator::stream::RunningTurn, Leased)> {
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
    // Checked once the slot is taken: a drain that began before sees this turn and hands it over.
    if rt.is_draining() {
        rt.hubs.finish_turn(session_id);
        return Err(shutting_down());
    }
    rt.prove_alive().await;
    rt.watch_cancel_requests().await;
    let (owner, ttl) = (&rt.owner, rt.config.lease_ttl);
    let leased = match first {
        Some((expected, commit)) => {
            let leased = rt
                .storage
                .lease_and_commit(session_id, owner, ttl, expected, commit)
                .await;
            if leased.is_err() {
                // A backend may have kept the lease when the commit failed.
                let _ = rt.storage.release_lease(session_id, owner).await;
            }
            leased
        }
        None => (rt.storage.lease_session(session_id, owner, ttl).await)
            .map(|s| s.map_or(Leased::Busy, Leased::Taken)),
    };
    match leased {
        Ok(Leased::Busy) => {
            rt.hubs.finish_turn(session_id);
            Err(Error::SessionBusy(session_id.into()))
        }
        Ok(leased) => Ok((running, leased)),
        Err(e) => {
            rt.hubs.finish_turn(session_id);
            Err(e)
        }
    }
}

/// `SHUTTING_DOWN`: this process drains and starts no turn.
pub(super) fn shutting_down() -> Error {
    Error::ShuttingDown(
        "this server is shutting down and takes no new turns: send the request to another replica, \
         or retry once it is back (its running turns are handed over, not lost)"
            .into(),
    )
}

pub(super) async fn give_back(rt: &Arc<Inner>, session_id: &str) {
    let _ = rt.storage.release_lease(session_id, &rt.owner).await;
    rt.hubs.finish_turn(session_id);
}

/// Renews the lease while the turn runs; a lost lease cancels the turn.
pub(super) fn keep_lease(
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
    if rt.is_draining() {
        return Err(shutting_down());
    }
    // Only a tool result is checked against the stored session before the lease is taken; any
    // other message needs the session only to exist, which taking the lease finds out (one
    // writer job instead of a read and a writer job).
    let stored = match &sub.message {
        ClientMessage::ToolResult { .. } => Some(rt.storage.get_session(session_id).await?),
        _ => None,
    };
    let rid = sub.request_id.as_deref();
    // Before the checks: a repeated `tool_result` answers a call that its first copy closed.
    if let Some(replay) = replay_request(&rt, session_id, rid).await? {
        return Ok(replay);
    }
    validate(&rt, &sub.message)?;
    if let (Some(session), ClientMessage::ToolResult { call_id, .. }) = (&stored, &sub.message) {
        check_call_open(session, call_id)?;
    }
    // The common user message, and a tool result: its first commit goes with the lease, one
    // storage call.
    let mut quick = quick_start(&rt, &sub, stored);
    let first = (quick.as_mut()).map(|q| (&q.expected, std::mem::take(&mut q.commit)));
    let (running, leased) = match take_session_with(&rt, session_id, first).await {
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
    let session = match (leased, quick) {
        (Leased::Committed(committed), Some(quick)) => {
            // Subscribed before its commit's events are published and the turn's run commits
            // the next ones: none is missed.
            let subscribed =
                EventStream::subscribe(rt.storage.clone(), rt.hubs.clone(), session_id, Follow::UntilDone);
            let (turn, next, first_seq) = quick.started(&rt, committed, running.cancel.clone());
            return Ok(spawn_turn(
                &rt,
                session_id,
                running,
                turn,
                next,
                subscribed.after(first_seq - 1),
            ));
        }
        (Leased::Committed(c), None) => c.session,
        (Leased::Taken(session), _) => session,
        (Leased::Busy, _) => return Err(Error::SessionBusy(session_id.into())),
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
    if session.status == SessionStatus::Running && rt.config.turn_recovery == TurnRecovery::Resume {
        // We hold the lease, so nobody runs it: a turn whose process stopped. It goes on here;
        // the new message waits for it like any message sent while a turn runs.
        // Boxed (in its own statement, so the moved temporary keeps no slot here): a rare path
        // whose future would otherwise size every submit's.
        let resuming = Box::pin(resume_orphan(&rt, session, running));
        resuming.await?;
        return Err(Error::SessionBusy(session_id.into()));
    }
    // Subscribed before the first commit: the turn's events all arrive live, none is read back.
    let subscribed =
        EventStream::subscribe(rt.storage.clone(), rt.hubs.clone(), session_id, Follow::UntilDone);
    // Boxed: the long way (not the quick start) holds the biggest states of a submit (a turn
    // being built, a decision's calls); inline, every submit's future had its size.
    let started = Box::pin(start(&rt, session, sub, running.cancel.clone()));
    match started.await {
        Ok((turn, next, first_seq)) => {
            let stream = subscribed.after(first_seq.saturating_sub(1));
            Ok(spawn_turn(&rt, session_id, running, turn, next, stream))
        }
        Err(e) => {
            give_back(&rt, session_id).await;
            Err(e)
        }
    }
}

/// Runs the started `turn` in its own task under the lease, which it keeps renewed; `stream` is
/// the submission's answer.
fn spawn_turn(
    rt: &Arc<Inner>,
    session_id: &str,
    running: crate::orchestrator::stream::RunningTurn,
    mut turn: Turn,
    next: Next,
    stream: EventStream,
) -> EventStream {
    turn.handover = running.handover.clone();
    keep_lease(
        rt.clone(),
        session_id.to_string(),
        running.cancel.clone(),
        running.finished.clone(),
    );
    let span = info_span!("turn", session_id, turn_id = %turn.state.turn_id);
    // Boxed where it is built: spawning moved the whole turn's future (about 7 KB) a few times
    // on its way into the task; boxed, only a pointer moves.
    tokio::spawn(Box::pin(turn.run(next)).instrument(span));
    stream
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

/// Checks what can be checked before anything is stored without the session (a tool result's
/// call: [`check_call_open`]).
fn validate(rt: &Arc<Inner>, m: &ClientMessage) -> Result<()> {
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
        // Checked against the stored session: `check_call_open`.
        ClientMessage::ToolResult { .. } => {}
        // Its verb and arguments were checked when it was parsed.
        ClientMessage::HitlDecision(_) => {}
    }
    Ok(())
}

/// `TOOL_CALL_NOT_FOUND` unless the session waits for the result of the call `call_id`.
fn check_call_open(session: &Session, call_id: &str) -> Result<()> {
    let open = TurnState::load(session).open_calls.iter().any(|c| {
        c.call_id == call_id && matches!(c.state, CallState::AwaitingClient | CallState::AwaitingApproval)
    });
    if !open
        || !matches!(
            session.status,
            SessionStatus::AwaitingToolResult | SessionStatus::AwaitingApproval
        )
    {
        return Err(Error::ToolCallNotFound(call_id.to_string()));
    }
    Ok(())
}
