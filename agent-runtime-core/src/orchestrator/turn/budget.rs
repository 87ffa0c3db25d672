//! Budgets within a turn: what the turn and its session have spent, the gate asked before each model
//! call (routing and plan calls too), tool call and step, the `budget` approval it pauses on, its decision.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Turn;
use crate::approval::{Approval, ApprovalResolution, ApprovalStatus, RequestType};
use crate::budget::{self, Budget, BudgetKind, BudgetUsage, Decision, Spent, Step};
use crate::error::{Error, Result};
use crate::events::BusEventKind;
use crate::llm::ChatRequest;
use crate::protocol::{AssistantMessage, Decision as Verb, EventPayload, HitlDecision, TurnUsage};
use crate::session::{NewMessage, Usage};
use crate::storage::Commit;
use crate::time::Timestamp;

/// The tool name a budget approval shows (it runs nothing).
pub(super) const RAISE_BUDGET: &str = "raise_budget";

/// A reached budget the turn paused on (or whose raise was rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct BudgetPause {
    /// The budget approval's call id.
    pub call_id: String,
    pub budget: BudgetKind,
    pub spent: f64,
    pub limit: f64,
    pub proposed: f64,
}

/// What the turn has spent of its own budgets, and the turn budgets raised in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct TurnSpend {
    /// Cost of the turn's priced model calls.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub cost: f64,
    /// Tool calls the turn made.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub tool_calls: u64,
    /// Milliseconds the turn ran before its last commit (paused time does not count).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub active_ms: u64,
    /// Turn budgets raised by approvals in this turn (they win over the session's).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub raised: Budget,
    /// The budget approval the turn waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<BudgetPause>,
    /// A budget whose raise was rejected: the turn ends with a closing message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declined: Option<BudgetPause>,
}

/// What the gate says.
pub(super) enum Gate {
    /// Go on; a model call gets at most this many completion tokens.
    Go(Option<u64>),
    /// A budget is reached: its approval is stored and the turn pauses.
    Pause,
}

impl Turn {
    /// The limits in force: the session's, with this turn's raises.
    pub(super) fn limits(&self) -> Budget {
        self.session.budget.overlaid(&self.state.spend.raised)
    }

    /// Whether the model's calls have a price.
    fn priced(&self) -> bool {
        self.rt.prices.get(&self.rt.config.llm.model).is_some()
    }

    /// Milliseconds the turn has run, paused time left out.
    pub(super) fn active_ms(&self) -> u64 {
        self.state.spend.active_ms + self.resumed_at.elapsed().as_millis() as u64
    }

    /// Folds the running time into the stored state (before each commit).
    /// Only whole milliseconds move from the clock to the state, so no fraction is lost however
    /// often it runs (a streaming answer commits many times before its deadline).
    pub(super) fn checkpoint_time(&mut self) {
        let ms = self.resumed_at.elapsed().as_millis() as u64;
        self.state.spend.active_ms += ms;
        self.resumed_at += std::time::Duration::from_millis(ms);
    }

    /// What the session and the turn have spent, stored or not.
    pub(super) fn spent(&self) -> Spent {
        let priced = self.priced();
        Spent {
            session_tokens: self.session.usage.total() + self.unsaved_usage.total(),
            session_cost: priced.then_some(self.session.cost + self.unsaved_cost),
            turn_tokens: self.state.usage.total(),
            turn_cost: priced.then_some(self.state.spend.cost),
            turn_time_secs: self.active_ms() as f64 / 1000.0,
            turn_tool_calls: self.state.spend.tool_calls,
        }
    }

    /// Counts a call's tokens and cost toward the turn and, with the next commit, the session.
    pub(super) fn add_usage(&mut self, usage: Usage) {
        self.state.usage += usage;
        self.unsaved_usage += usage;
        if let Some(cost) = self.rt.prices.cost(&self.rt.config.llm.model, &usage) {
            self.state.spend.cost += cost;
            self.unsaved_cost += cost;
            self.run_cost += cost;
        }
    }

    /// The `usage` of the turn's `done`: tokens, cost when priced, spent and remaining with budgets.
    pub(super) fn done_usage(&self) -> TurnUsage {
        let limits = self.limits();
        TurnUsage {
            tokens: self.state.usage,
            cost: self.priced().then_some(budget::money(self.state.spend.cost)),
            budget: (!limits.is_unlimited()).then(|| self.spent().report(&limits)),
        }
    }

    /// Asks the budgets about `step`; a reached one becomes a pending `budget` approval.
    pub(super) async fn gate(&mut self, step: Step) -> Result<Gate> {
        if self.state.spend.paused.is_some() {
            return Ok(Gate::Pause);
        }
        match budget::check(&self.limits(), &self.spent(), step) {
            Decision::Within { max_tokens } => Ok(Gate::Go(max_tokens)),
            Decision::Exceeded { budget, spent, limit } => {
                self.ask_to_raise(budget, spent, limit).await?;
                Ok(Gate::Pause)
            }
        }
    }

    /// Asks the budgets before a model call of `req`, whose prompt counts as `prompt` (as
    /// [`Turn::count_usage`] counts it when the server reports no usage): `false` when one paused
    /// the turn; otherwise `req.max_tokens` is capped at the tokens that remain, if any budget
    /// counts them.
    pub(super) async fn gate_call(&mut self, req: &mut ChatRequest, prompt: Usage) -> Result<bool> {
        let step = Step::ModelCall {
            prompt_tokens: prompt.prompt_tokens,
            prompt_cost: self.rt.prices.cost(&self.rt.config.llm.model, &prompt),
        };
        match self.gate(step).await? {
            Gate::Pause => Ok(false),
            Gate::Go(Some(left)) => {
                let left = u32::try_from(left).unwrap_or(u32::MAX).max(1);
                req.max_tokens = Some(req.max_tokens.map_or(left, |m| m.min(left)));
                Ok(true)
            }
            Gate::Go(None) => Ok(true),
        }
    }

    /// Stores the approval that raises `budget` (streamed as `budget_exceeded`) and pauses on it.
    async fn ask_to_raise(&mut self, budget: BudgetKind, spent: f64, limit: f64) -> Result<()> {
        let call_id = format!("budget_{}", uuid::Uuid::new_v4().simple());
        let proposed = budget::proposed_limit(budget, limit);
        let arguments = json!({
            "budget": budget.as_str(),
            "spent": budget.amount(spent),
            "limit": budget.amount(limit),
            "proposed_limit": budget.amount(proposed),
        });
        let reason = format!(
            "The {} budget is reached ({} of {}); approve to raise it to {} and go on, or edit \
             with {{\"limit\": N}}",
            budget.as_str(),
            budget.amount(spent),
            budget.amount(limit),
            budget.amount(proposed)
        );
        let approval = Approval {
            call_id: call_id.clone(),
            session_id: self.id().to_string(),
            tool_name: RAISE_BUDGET.into(),
            arguments: arguments.clone(),
            reason: reason.clone(),
            request_type: RequestType::Budget,
            status: ApprovalStatus::Pending,
            created_at: Timestamp::now(),
            decided_at: None,
            feedback: None,
            modified_arguments: None,
        };
        self.state.spend.paused = Some(BudgetPause {
            call_id: call_id.clone(),
            budget,
            spent,
            limit,
            proposed,
        });
        let c = Commit {
            approvals: vec![approval],
            events: vec![EventPayload::BudgetExceeded {
                call_id: call_id.clone(),
                budget,
                spent: budget.amount(spent),
                limit: budget.amount(limit),
                proposed_limit: budget.amount(proposed),
                reason: reason.clone(),
            }],
            ..Commit::default()
        };
        self.commit(c, true).await?;
        let mut note = arguments;
        note["call_id"] = json!(call_id);
        self.rt
            .bus
            .publish(BusEventKind::BudgetExceeded, self.id(), note.clone());
        note["request_type"] = json!("budget");
        note["tool_name"] = json!(RAISE_BUDGET);
        note["reason"] = json!(reason);
        self.rt
            .bus
            .publish(BusEventKind::ApprovalRequested, self.id(), note);
        Ok(())
    }

    /// A decision on the budget approval the turn waits for: `approve` sets the proposed limit,
    /// `edit` with `{"limit": N}` sets N (more than what was spent), either resumes the turn;
    /// `reject` ends it with a closing message. Returns the status, bus kind and new session
    /// budgets (for a session budget).
    pub(super) fn budget_decision(
        &mut self,
        d: &HitlDecision,
    ) -> Result<(ApprovalStatus, BusEventKind, Option<Budget>)> {
        let pause = match &self.state.spend.paused {
            Some(p) if p.call_id == d.call_id => p.clone(),
            _ => return Err(Error::ApprovalAlreadyDecided(d.call_id.clone())),
        };
        let (status, limit) = match &d.decision {
            Verb::Approve => (ApprovalStatus::Approved, pause.proposed),
            Verb::Edit { arguments } => (ApprovalStatus::Edited, edited_limit(&pause, arguments)?),
            Verb::Reject { .. } => {
                self.state.spend.paused = None;
                self.state.spend.declined = Some(pause);
                return Ok((ApprovalStatus::Rejected, BusEventKind::ApprovalRejected, None));
            }
        };
        self.state.spend.paused = None;
        let kind = pause.budget;
        let session_budget = if kind.of_session() {
            let mut b = self.session.budget;
            b.set(kind, limit);
            Some(b)
        } else {
            self.state.spend.raised.set(kind, limit);
            None
        };
        self.rt.bus.publish(
            BusEventKind::BudgetRaised,
            self.id(),
            json!({"call_id": d.call_id, "budget": kind.as_str(), "limit": kind.amount(limit),
                   "previous_limit": kind.amount(pause.limit)}),
        );
        Ok((status, BusEventKind::ApprovalApproved, session_budget))
    }

    /// After a rejected raise: the calls that waited behind the budget get their "not executed"
    /// result, then the closing assistant message, which goes out with `done`. `true` if the turn
    /// ends here.
    pub(super) async fn close_declined(&mut self) -> Result<bool> {
        let Some(p) = self.state.spend.declined.take() else {
            return Ok(false);
        };
        self.close_open_calls(
            "not executed: the turn's budget was reached and raising it was declined",
            "TOOL_EXECUTION_FAILED",
        )
        .await?;
        let text = format!(
            "I stopped here: this turn reached its {} budget ({} of {}) and raising it was declined.",
            p.budget.as_str(),
            p.budget.amount(p.spent),
            p.budget.amount(p.limit)
        );
        let agent = self.agent();
        self.defer(Commit {
            messages: vec![NewMessage::assistant(text.clone(), Some(agent), vec![])],
            events: vec![EventPayload::AssistantMessage(AssistantMessage::Complete {
                content: text,
            })],
            ..Commit::default()
        });
        Ok(true)
    }

    /// Cancels the budget approval the turn waits for, when it ends otherwise.
    pub(super) async fn abandon_budget(&mut self, why: &str) -> Result<()> {
        let Some(p) = self.state.spend.paused.take() else {
            return Ok(());
        };
        let c = Commit {
            resolutions: vec![ApprovalResolution {
                call_id: p.call_id.clone(),
                status: ApprovalStatus::Cancelled,
                feedback: Some(why.to_string()),
                modified_arguments: None,
                decided_at: Timestamp::now(),
            }],
            events: vec![EventPayload::ApprovalResolved {
                call_id: p.call_id.clone(),
                decision: "cancel".into(),
            }],
            ..Commit::default()
        };
        match self.commit(c, true).await {
            Ok(_) | Err(Error::ApprovalAlreadyDecided(_)) => {}
            Err(e) => return Err(e),
        }
        self.rt.bus.publish(
            BusEventKind::ApprovalCancelled,
            self.id(),
            json!({"call_id": p.call_id}),
        );
        Ok(())
    }
}

/// The session's usage, budgets, spent and remaining (turn budgets of its paused turn, if any).
pub(in crate::orchestrator) fn budget_usage(
    rt: &crate::orchestrator::Inner,
    session: &crate::session::Session,
) -> BudgetUsage {
    let state = super::TurnState::stored(session).unwrap_or_default();
    let model = &rt.config.llm.model;
    let priced = rt.prices.get(model).is_some();
    let spent = Spent {
        session_tokens: session.usage.total(),
        session_cost: priced.then_some(session.cost),
        turn_tokens: state.usage.total(),
        turn_cost: priced.then_some(state.spend.cost),
        turn_time_secs: state.spend.active_ms as f64 / 1000.0,
        turn_tool_calls: state.spend.tool_calls,
    };
    let limits = session.budget.overlaid(&state.spend.raised);
    let report = spent.report(&limits);
    let cost_unavailable = (!priced).then(|| match &rt.config.model_prices_file {
        None => "no MODEL_PRICES_FILE is set: tokens are counted, cost is not".to_string(),
        Some(_) => {
            format!("MODEL_PRICES_FILE has no price for the model '{model}': tokens are counted, cost is not")
        }
    });
    BudgetUsage {
        session_id: session.id.clone(),
        prompt_tokens: session.usage.prompt_tokens,
        cached_prompt_tokens: session.usage.cached_prompt_tokens,
        completion_tokens: session.usage.completion_tokens,
        total_tokens: session.usage.total(),
        cost: priced.then_some(budget::money(session.cost)),
        cost_unavailable,
        budget: limits,
        spent: report.spent,
        remaining: report.remaining,
    }
}

/// The limit of an `edit`: `{"limit": N}`, N a number (whole for all but cost) above what was spent.
fn edited_limit(pause: &BudgetPause, arguments: &Value) -> Result<f64> {
    let kind = pause.budget;
    let raw = arguments.get("limit");
    let n = raw
        .and_then(if kind.whole() {
            |v: &Value| v.as_u64().map(|n| n as f64)
        } else {
            |v: &Value| v.as_f64().filter(|f| f.is_finite())
        })
        .ok_or_else(|| {
            Error::InvalidTool(format!(
                "a budget edit needs modified_arguments {{\"limit\": N}} with N {} (got {})",
                if kind.whole() {
                    "a whole number"
                } else {
                    "a number"
                },
                raw.map_or("nothing".to_string(), Value::to_string)
            ))
        })?;
    if n <= pause.spent {
        return Err(Error::InvalidTool(format!(
            "the new {} limit {} must be more than what was spent ({})",
            kind.as_str(),
            kind.amount(n),
            kind.amount(pause.spent)
        )));
    }
    Ok(n)
}
