//! Human decisions on pending approvals, of tool calls and of plans alike: checked against what
//! is pending, recorded (compare-and-set) with their `approval_resolved` event, then the turn goes on.

use serde_json::json;

use super::plan::{PlanRun, plan_from_arguments};
use super::{CallState, Next, Turn};
use crate::approval::{Approval, ApprovalResolution, ApprovalStatus, RequestType};
use crate::error::{Error, Result};
use crate::events::BusEventKind;
use crate::protocol::{Decision, EventPayload, HitlDecision, Plan, StopReason};
use crate::session::SessionStatus;
use crate::storage::{Commit, SessionUpdate};

/// What a decision changes beside its resolution and its `approval_resolved` event.
struct Outcome {
    status: ApprovalStatus,
    kind: BusEventKind,
    /// Plans to store (an edited plan).
    plans: Vec<Plan>,
    /// Other approvals of the turn are still pending: the turn stays paused.
    still_pending: bool,
    /// The session's new budgets (a raised session budget).
    session_budget: Option<crate::budget::Budget>,
}

/// Records a human decision on a pending tool call or plan. Returns what the turn does next and
/// the seq of the first event of the decision's stream.
pub(super) async fn decide(
    turn: &mut Turn,
    d: HitlDecision,
    request_id: Option<String>,
) -> Result<(Next, u64)> {
    let approval = turn.rt.storage.get_approval(turn.id(), &d.call_id).await?;
    if approval.status != ApprovalStatus::Pending {
        return Err(Error::ApprovalAlreadyDecided(d.call_id));
    }
    let (outcome, request_type) = match approval.request_type {
        RequestType::Plan => (plan_decision(turn, &d)?, Some("plan")),
        RequestType::Tool => (tool_decision(turn, &d, &approval)?, None),
        RequestType::Budget => {
            let (status, kind, session_budget) = turn.budget_decision(&d)?;
            let still_pending = turn
                .state
                .open_calls
                .iter()
                .any(|c| c.state == CallState::AwaitingApproval);
            let outcome = Outcome {
                status,
                kind,
                plans: vec![],
                still_pending,
                session_budget,
            };
            (outcome, Some("budget"))
        }
    };
    record(turn, &d, outcome, request_id, request_type).await
}

/// A decision on a tool call: approve runs it as proposed, edit with the (checked) new arguments,
/// reject tells the model.
fn tool_decision(turn: &mut Turn, d: &HitlDecision, approval: &Approval) -> Result<Outcome> {
    let open = turn
        .state
        .open_calls
        .iter()
        .any(|c| c.call_id == d.call_id && c.state == CallState::AwaitingApproval);
    if !open {
        return Err(Error::ApprovalAlreadyDecided(d.call_id.clone()));
    }
    let (status, state, kind) = match &d.decision {
        Decision::Approve => (
            ApprovalStatus::Approved,
            CallState::Ready {
                run_arguments: approval.arguments.clone(),
            },
            BusEventKind::ApprovalApproved,
        ),
        Decision::Edit { arguments } => {
            turn.check_call(&approval.tool_name, arguments)
                .map_err(|f| Error::InvalidTool(f.message().to_string()))?;
            (
                ApprovalStatus::Edited,
                CallState::Ready {
                    run_arguments: arguments.clone(),
                },
                BusEventKind::ApprovalApproved,
            )
        }
        Decision::Reject { feedback } => (
            ApprovalStatus::Rejected,
            CallState::Rejected {
                feedback: feedback.clone(),
            },
            BusEventKind::ApprovalRejected,
        ),
    };
    turn.set_state(&d.call_id, state);
    let still_pending = turn
        .state
        .open_calls
        .iter()
        .any(|c| c.state == CallState::AwaitingApproval)
        || turn.state.spend.paused.is_some();
    Ok(Outcome {
        status,
        kind,
        plans: vec![],
        still_pending,
        session_budget: None,
    })
}

/// A decision on a plan: approve runs it, edit runs the modified plan, reject lets the
/// orchestrator answer without it.
fn plan_decision(turn: &mut Turn, d: &HitlDecision) -> Result<Outcome> {
    let proposed = turn
        .state
        .plan
        .as_ref()
        .is_some_and(|r| r.plan.plan_id == d.call_id && r.current.is_none());
    if !proposed {
        return Err(Error::ApprovalAlreadyDecided(d.call_id.clone()));
    }
    let (status, kind, plans) = match &d.decision {
        Decision::Approve => (ApprovalStatus::Approved, BusEventKind::ApprovalApproved, vec![]),
        Decision::Edit { arguments } => {
            let agents = turn.rt.agents.types();
            let plan = plan_from_arguments(arguments, &agents, &d.call_id).map_err(Error::InvalidTool)?;
            turn.state.plan = Some(PlanRun {
                plan: plan.clone(),
                current: None,
            });
            (ApprovalStatus::Edited, BusEventKind::ApprovalApproved, vec![plan])
        }
        Decision::Reject { .. } => {
            turn.state.plan = None;
            (ApprovalStatus::Rejected, BusEventKind::ApprovalRejected, vec![])
        }
    };
    Ok(Outcome {
        status,
        kind,
        plans,
        still_pending: false,
        session_budget: None,
    })
}

/// Stores the decision (compare-and-set) with its `approval_resolved` event, and `done` when the
/// turn stays paused on other approvals; publishes it on the bus.
async fn record(
    turn: &mut Turn,
    d: &HitlDecision,
    outcome: Outcome,
    request_id: Option<String>,
    request_type: Option<&str>,
) -> Result<(Next, u64)> {
    let mut events = vec![EventPayload::ApprovalResolved {
        call_id: d.call_id.clone(),
        decision: d.decision.verb().into(),
    }];
    let status_after = if outcome.still_pending {
        events.push(EventPayload::Done {
            stop_reason: StopReason::AwaitingApproval,
            usage: turn.done_usage(),
        });
        SessionStatus::AwaitingApproval
    } else {
        SessionStatus::Running
    };
    let c = Commit {
        resolutions: vec![ApprovalResolution::of_decision(d, outcome.status)],
        plans: outcome.plans,
        events,
        request_id,
        session: SessionUpdate {
            status: Some(status_after),
            budget: outcome.session_budget,
            ..SessionUpdate::default()
        },
        ..Commit::default()
    };
    let first = turn.commit(c, true).await?;
    let mut note = json!({"call_id": d.call_id, "decision": d.decision.verb()});
    if let Some(t) = request_type {
        note["request_type"] = json!(t);
    }
    turn.trace_event(
        "agent_runtime.approval.decided",
        vec![
            opentelemetry::KeyValue::new("gen_ai.tool.call.id", d.call_id.clone()),
            opentelemetry::KeyValue::new("agent_runtime.approval.decision", d.decision.verb()),
        ],
    );
    turn.rt.bus.publish(outcome.kind, turn.id(), note);
    let first = first.unwrap_or(1);
    // While other approvals are pending the turn stays paused: this stream ends with its `done`.
    let next = if outcome.still_pending {
        Next::Nothing
    } else {
        Next::Run { route: None }
    };
    Ok((next, first))
}
