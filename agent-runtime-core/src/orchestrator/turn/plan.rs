//! Plans (API.md §5.5): the orchestrator's forced `propose_plan` call (asking the budgets first), the plan
//! approval, and carrying out an approved plan subtask by subtask, on its agents, with `plan_updated` events.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Turn;
use super::model::forced_request;
use crate::approval::{Approval, ApprovalResolution, ApprovalStatus, RequestType};
use crate::error::{Error, Result};
use crate::events::BusEventKind;
use crate::orchestrator::routing;
use crate::protocol::{EventPayload, Plan, StopReason, Subtask};
use crate::session::NewMessage;
use crate::storage::Commit;
use crate::time::Timestamp;

/// An approved (or proposed) plan and which subtask is in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct PlanRun {
    pub plan: Plan,
    /// The subtask in progress; `None` until the plan is approved and started.
    pub current: Option<usize>,
}

/// Reads a plan from a function call's (or an edit's) arguments; the subtasks' agents must exist.
pub(super) fn plan_from_arguments(
    args: &Value,
    agents: &[String],
    plan_id: &str,
) -> std::result::Result<Plan, String> {
    let goal = args
        .get("goal")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    let items = args
        .get("subtasks")
        .and_then(Value::as_array)
        .ok_or("a plan needs a subtasks array")?;
    if goal.is_empty() {
        return Err("a plan needs a non-empty goal".into());
    }
    if items.is_empty() || items.len() > 20 {
        return Err("a plan needs 1 to 20 subtasks".into());
    }
    let mut subtasks = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let description = item
            .get("description")
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or("");
        let agent = item.get("agent").and_then(Value::as_str).unwrap_or("");
        if description.is_empty() {
            return Err(format!("subtask {} needs a description", i + 1));
        }
        if !agents.iter().any(|a| a == agent) {
            return Err(format!(
                "subtask {} names an unknown agent '{agent}' (agents: {})",
                i + 1,
                agents.join(", ")
            ));
        }
        subtasks.push(Subtask {
            id: (i + 1).to_string(),
            description: description.to_string(),
            agent: agent.to_string(),
            status: "pending".into(),
        });
    }
    Ok(Plan {
        plan_id: plan_id.to_string(),
        goal: goal.to_string(),
        subtasks,
    })
}

impl Turn {
    /// Asks the model for a plan (forced `propose_plan`), the budgets asked first as before any
    /// model call. A valid plan becomes a pending plan approval and the turn pauses
    /// (`AwaitingApproval`); a reached budget pauses it before the call (`BudgetExceeded`, the
    /// plan call pending until the raise is approved); anything else lets routing go on (`None`).
    pub(super) async fn propose_plan(
        &mut self,
        content: &str,
        agents: &[String],
    ) -> Result<Option<StopReason>> {
        let described: Vec<(String, String)> = agents
            .iter()
            .filter_map(|t| self.rt.agents.get(t).map(|a| (t.clone(), a.description.clone())))
            .collect();
        let mut req = forced_request(
            routing::plan_prompt(&described),
            content,
            routing::plan_spec(agents),
            super::PLAN_MAX_TOKENS,
        );
        let prompt = self.count_usage(&req, "", &[]);
        // Stored with a pause, so the raise resumes at this call.
        self.state.plan_call_pending = true;
        if !self.gate_call(&mut req, prompt).await? {
            return Ok(Some(StopReason::BudgetExceeded));
        }
        self.state.plan_call_pending = false;
        let Some(raw) = self.forced_call(req).await else {
            return Ok(None);
        };
        let plan_id = format!("plan_{}", uuid::Uuid::new_v4().simple());
        let args = routing::parse_arguments(&raw).unwrap_or(Value::Null);
        let plan = match plan_from_arguments(&args, agents, &plan_id) {
            Ok(p) => p,
            Err(why) => {
                tracing::warn!(%why, "the proposed plan is unusable; routing once instead");
                return Ok(None);
            }
        };
        let reason = "Plan requires approval".to_string();
        let approval = Approval {
            call_id: plan_id.clone(),
            session_id: self.id().to_string(),
            tool_name: routing::PLAN_TOOL.into(),
            arguments: serde_json::to_value(&plan).unwrap_or(Value::Null),
            reason: reason.clone(),
            request_type: RequestType::Plan,
            status: ApprovalStatus::Pending,
            created_at: Timestamp::now(),
            decided_at: None,
            feedback: None,
            modified_arguments: None,
        };
        self.state.plan = Some(PlanRun {
            plan: plan.clone(),
            current: None,
        });
        // The routing decision is this plan, stored with it.
        self.state.route_pending = false;
        let c = Commit {
            plans: vec![plan.clone()],
            approvals: vec![approval],
            events: vec![EventPayload::PlanProposed(plan)],
            ..Commit::default()
        };
        self.commit(c, true).await?;
        self.rt.bus.publish(
            BusEventKind::ApprovalRequested,
            self.id(),
            json!({"call_id": plan_id, "tool_name": routing::PLAN_TOOL, "reason": reason, "request_type": "plan"}),
        );
        Ok(Some(StopReason::AwaitingApproval))
    }

    /// Stores the plan with subtask `i` set to `status` and streams `plan_updated`.
    async fn update_plan(&mut self, i: usize, status: &str) -> Result<()> {
        let Some(run) = self.state.plan.as_mut() else {
            return Ok(());
        };
        if let Some(s) = run.plan.subtasks.get_mut(i) {
            s.status = status.to_string();
        }
        let plan = run.plan.clone();
        self.commit(
            Commit {
                plans: vec![plan.clone()],
                events: vec![EventPayload::PlanUpdated(plan)],
                ..Commit::default()
            },
            true,
        )
        .await
        .map(|_| ())
    }

    /// Starts subtask `i`: `plan_updated`, a switch to its agent, and its description as the
    /// user's message for that agent. Each subtask gets its own budget of model calls.
    async fn start_subtask(&mut self, i: usize) -> Result<()> {
        let Some(run) = self.state.plan.as_mut() else {
            return Ok(());
        };
        run.current = Some(i);
        let (goal, n) = (run.plan.goal.clone(), run.plan.subtasks.len());
        let Some(sub) = run.plan.subtasks.get(i).cloned() else {
            return Ok(());
        };
        self.state.iterations = 0;
        self.update_plan(i, "in_progress").await?;
        if sub.agent != self.agent() {
            let reason = format!("Plan step {} of {n}", i + 1);
            self.switch_to(&sub.agent, &reason, false).await?;
        }
        let text = format!("Plan step {} of {n} (goal: {goal}): {}", i + 1, sub.description);
        self.commit(
            Commit {
                messages: vec![NewMessage::user(text, Some(sub.agent))],
                ..Commit::default()
            },
            true,
        )
        .await
        .map(|_| ())
    }

    /// The loop, subtask after subtask while an approved plan runs.
    pub(super) async fn run_plan(&mut self) -> Result<StopReason> {
        if let Some(run) = &self.state.plan
            && run.current.is_none()
        {
            self.start_subtask(0).await?;
        }
        loop {
            let stop = self.run_loop().await?;
            let Some(current) = self.state.plan.as_ref().and_then(|r| r.current) else {
                return Ok(stop);
            };
            if stop != StopReason::Completed {
                return Ok(stop);
            }
            self.update_plan(current, "completed").await?;
            let total = self.state.plan.as_ref().map_or(0, |r| r.plan.subtasks.len());
            if current + 1 >= total {
                self.state.plan = None;
                return Ok(StopReason::Completed);
            }
            self.start_subtask(current + 1).await?;
        }
    }

    /// Ends the plan of a turn that stops otherwise than paused: a proposal still awaiting its
    /// approval is cancelled; the subtask in progress is `failed`.
    pub(super) async fn abandon_plan(&mut self, why: &str) -> Result<()> {
        let Some(run) = self.state.plan.clone() else {
            return Ok(());
        };
        match run.current {
            Some(current) => self.update_plan(current, "failed").await?,
            None => {
                let id = run.plan.plan_id.clone();
                let c = Commit {
                    resolutions: vec![ApprovalResolution {
                        call_id: id.clone(),
                        status: ApprovalStatus::Cancelled,
                        feedback: Some(why.to_string()),
                        modified_arguments: None,
                        decided_at: Timestamp::now(),
                    }],
                    events: vec![EventPayload::ApprovalResolved {
                        call_id: id.clone(),
                        decision: "cancel".into(),
                    }],
                    ..Commit::default()
                };
                match self.commit(c, true).await {
                    Ok(_) | Err(Error::ApprovalAlreadyDecided(_)) => {}
                    Err(e) => return Err(e),
                }
                self.rt
                    .bus
                    .publish(BusEventKind::ApprovalCancelled, self.id(), json!({"call_id": id}));
            }
        }
        self.state.plan = None;
        Ok(())
    }
}
