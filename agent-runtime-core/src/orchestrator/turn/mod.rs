//! One turn as a state machine (API.md §5.2–5.4): route, stream the model, check each tool call,
//! ask for approval, execute, loop; pause for humans or clients; persist every step before it is sent.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::routing::{self, SWITCH_TOOL};

mod budget;
mod decide;
mod guard;
mod model;
mod plan;
mod recover;
mod start;
mod submit;

use super::Inner;
use crate::approval::{
    Approval, ApprovalRequirement, ApprovalResolution, ApprovalStatus, RequestType, ToolRequest,
    policy::canonical_tool_name,
};
use crate::config::ToolExecution;
use crate::context::truncate_output;
use crate::error::{Error, Result};
use crate::events::BusEventKind;
use crate::llm::{ChatMessage, ChatRequest, ChatRole, ChatToolCall, ToolChoice};
use crate::protocol::{AssistantMessage, EventPayload, StopReason, ToolError};
use crate::session::{
    AgentSwitch, Message, NewMessage, Role, Session, SessionStatus, ToolCall, TurnStateJson, Usage,
};
use crate::storage::{Commit, Committed, SessionUpdate};
use crate::telemetry::{CallKind, ChatSpan, ClientOffer, TurnTrace};
use crate::time::Timestamp;
use crate::tools::{ToolContext, ToolFailure};
pub(super) use budget::budget_usage;
use opentelemetry::KeyValue;
pub(super) use recover::{cancel, recover_interrupted};
use submit::give_back;
pub(super) use submit::submit;

/// Where an open tool call of the paused or running turn stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum CallState {
    /// Stored with the assistant message; not yet checked.
    New,
    /// Waiting for a human decision.
    AwaitingApproval,
    /// Cleared to run with these arguments (the proposal, or the human's edit).
    Ready { run_arguments: Value },
    /// Rejected by the human.
    Rejected { feedback: Option<String> },
    /// Waiting for the client's result.
    AwaitingClient,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenCall {
    call_id: String,
    tool_name: String,
    arguments: Value,
    #[serde(flatten)]
    state: CallState,
}

/// The part of a turn that must survive a restart; stored as the session's `turn_state`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct TurnState {
    turn_id: String,
    iterations: u32,
    auto_switches: u32,
    usage: Usage,
    open_calls: Vec<OpenCall>,
    /// The approved plan this turn carries out, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan: Option<plan::PlanRun>,
    /// Loop and ping-pong detection.
    #[serde(default, skip_serializing_if = "is_default")]
    guard: guard::Guard,
    /// Takeovers after its process stopped since the turn last made progress (a model answer or
    /// a tool's result stored); at [`recover::MAX_RESUMES`] the next takeover ends it instead.
    #[serde(default, skip_serializing_if = "is_default")]
    resumes: u32,
    /// Its process handed it over while shutting down: the next owner resumes it with reason
    /// `handed_over`, and that takeover does not count against `resumes`.
    #[serde(default, skip_serializing_if = "is_default")]
    handed_over: bool,
    /// The orchestrator has yet to route the turn's user message: stored with the message and
    /// cleared with the routing decision (a switch or a plan), so a turn cut in between is
    /// routed again where it resumes instead of answered by the session's current agent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    route_pending: bool,
    /// The router chose a plan and a budget paused the plan call: where the turn resumes (the
    /// raise approved), the plan is asked for without routing again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    plan_call_pending: bool,
    /// Budgets: what the turn spent, raises, and the budget approval it waits for.
    #[serde(default, skip_serializing_if = "is_default")]
    spend: budget::TurnSpend,
    /// The `traceparent` of the turn's first agent span, which a resumed turn's spans link to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trace_origin: Option<String>,
    /// Calls out for the client to run, with when and under which span (telemetry on only): their
    /// `execute_tool` spans are built when they are answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    client_offers: Vec<crate::telemetry::ClientOffer>,
}

/// A turn state's field left out of the stored JSON while it holds its default: every such
/// field is `#[serde(default)]`, so the state reads back the same (here and in earlier versions).
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl TurnState {
    fn fresh() -> Self {
        TurnState {
            turn_id: format!("turn_{}", uuid::Uuid::new_v4().simple()),
            ..TurnState::default()
        }
    }

    fn load(session: &Session) -> Self {
        TurnState::stored(session).unwrap_or_else(TurnState::fresh)
    }

    /// The session's stored turn state, if it has one that reads as a turn state; read straight
    /// from its JSON text (no `Value` in between).
    fn stored(session: &Session) -> Option<Self> {
        (session.turn_state.as_ref()).and_then(|t| serde_json::from_str(t.as_str()).ok())
    }

    /// The state as stored: its JSON text, written straight from the struct.
    fn to_stored(&self) -> TurnStateJson {
        TurnStateJson::to_json(self).unwrap_or_else(|_| TurnStateJson::from_value(&Value::Null))
    }
}

/// What the turn does after its first (synchronous) commit.
enum Next {
    /// Route (if the orchestrator should) and run the loop.
    Run { route: Option<String> },
    /// Nothing more: the first commit ended the stream.
    Nothing,
    /// Continue a turn taken over from a stopped process (`reason` as in `turn_resumed`): route
    /// the message if the orchestrator had not yet, else check the calls its model asked for that
    /// were not checked yet; then the loop (see `recover::resume_orphan`).
    Resume { reason: &'static str },
}

/// The `execute_tool` span of a call the client ran, recorded once its answer is stored.
struct ClientToolSpan {
    offer: ClientOffer,
    tool_name: String,
    arguments: Value,
    /// The result (content capture only) or the error code.
    result: std::result::Result<Option<Value>, String>,
}

/// What a turn's commit stored that its caller may still need: the events, with their seqs.
/// (The session goes into the turn, not copied.)
struct Stored {
    events: Vec<crate::protocol::Event>,
}

struct Turn {
    rt: Arc<Inner>,
    session: Session,
    state: TurnState,
    cancel: CancellationToken,
    /// Cancelled when this process drains: the turn stops at its next step boundary and hands
    /// itself over (see [`Turn::hand_off`]).
    handover: CancellationToken,
    /// Tokens spent but not yet added to the session's total (rides on the next commit).
    unsaved_usage: Usage,
    /// Cost spent but not yet added to the session's (rides on the next commit).
    unsaved_cost: f64,
    /// When the turn last resumed (or last stored its running time).
    resumed_at: std::time::Instant,
    /// The last answer was cut at the turn's time budget.
    cut_by_deadline: bool,
    /// Cost of the model calls made by this run of the turn (for metrics: counted once).
    run_cost: f64,
    /// Changes that ride on the next commit instead of costing one of their own (the final
    /// answer goes out with `done`); their events are published only once stored.
    deferred: Option<Commit>,
    /// The final commit keeps the session's lease (the caller goes on using it).
    keep_lease: bool,
    /// The turn's spans; `None` when telemetry is off.
    trace: Option<TurnTrace>,
}

impl Turn {
    fn new(rt: Arc<Inner>, session: Session, cancel: CancellationToken) -> Self {
        let state = TurnState::load(&session);
        // Under the caller's current context: the front-end's request span, if any.
        let trace = (rt.telemetry.as_ref()).map(|t| {
            let (model, url) = (rt.llm.model(), &rt.config.llm.proxy_url);
            TurnTrace::new(t, &session.id, model, url, state.trace_origin.as_deref())
        });
        Turn {
            rt,
            state,
            session,
            cancel,
            handover: CancellationToken::new(),
            unsaved_usage: Usage::default(),
            unsaved_cost: 0.0,
            resumed_at: std::time::Instant::now(),
            cut_by_deadline: false,
            run_cost: 0.0,
            deferred: None,
            keep_lease: false,
            trace,
        }
    }

    /// Opens the span of the session's current agent (`invoke_agent`), ending the previous one,
    /// unless `only_if_none` and one is open already.
    fn trace_agent(&mut self, only_if_none: bool) {
        let Some(t) = &mut self.trace else { return };
        if only_if_none && t.in_agent() {
            return;
        }
        let tp = t.enter_agent(&self.session.current_agent, &self.state.turn_id);
        if self.state.trace_origin.is_none() {
            self.state.trace_origin = tp;
        }
    }

    /// An event on the current agent's span (opened if need be).
    fn trace_event(&mut self, name: &'static str, attrs: Vec<opentelemetry::KeyValue>) {
        if self.trace.is_some() {
            self.trace_agent(true);
        }
        if let Some(t) = &self.trace {
            t.event(name, attrs);
        }
    }

    /// Hands a call to the client to run; with telemetry on, notes the offer for its span.
    fn offer_to_client(&mut self, call_id: &str) {
        self.set_state(call_id, CallState::AwaitingClient);
        if let Some(offer) = self.trace.as_ref().and_then(|t| t.offer(call_id)) {
            self.state.client_offers.retain(|o| o.call_id != call_id);
            self.state.client_offers.push(offer);
        }
    }

    /// A `chat` span for a model call, when telemetry is on.
    fn chat_span(&self, kind: CallKind, req: &ChatRequest) -> Option<ChatSpan> {
        self.trace.as_ref().map(|t| t.chat(kind, req))
    }

    /// Keeps `c` for the next commit.
    fn defer(&mut self, c: Commit) {
        self.deferred = Some(match self.deferred.take() {
            Some(d) => d.then(c),
            None => c,
        });
    }

    fn id(&self) -> &str {
        &self.session.id
    }

    fn agent(&self) -> String {
        self.session.current_agent.clone()
    }

    fn mode(&self) -> ToolExecution {
        self.session
            .metadata
            .get("tool_execution")
            .and_then(Value::as_str)
            .and_then(ToolExecution::parse)
            .unwrap_or(self.rt.config.tool_execution)
    }

    fn project_root(&self) -> Option<PathBuf> {
        self.session
            .metadata
            .get("project_path")
            .and_then(Value::as_str)
            .map(PathBuf::from)
    }

    fn tool_context(&self) -> Option<ToolContext> {
        Some(ToolContext {
            project_root: self.project_root()?,
            command_timeout: self.rt.config.command_timeout,
            max_output_bytes: self.rt.config.max_tool_output_bytes,
            cancel: self.cancel.child_token(),
            sandbox: self.rt.command_sandbox(&self.agent()),
        })
    }

    /// Commits under this process's lease, publishes the events (moved to the hub, not copied),
    /// and keeps the session current. Returns the seq of the first event stored, if any.
    async fn commit(&mut self, c: Commit, with_state: bool) -> Result<Option<u64>> {
        let stored = self.commit_quietly(c, with_state).await?;
        let first = stored.events.first().map(|e| e.seq);
        self.rt.hubs.publish(&self.session.id, stored.events);
        Ok(first)
    }

    /// Commits without publishing (the caller publishes once the session is free again).
    async fn commit_quietly(&mut self, c: Commit, with_state: bool) -> Result<Stored> {
        let c = self.prepare(c, with_state);
        let committed = self.rt.storage.commit(&self.session.id, c).await?;
        Ok(self.stored(committed))
    }

    /// `c` as this turn commits it: after what was deferred, stamped now, under this process's
    /// lease, with the usage and cost not yet stored and (`with_state`) the turn state.
    fn prepare(&mut self, c: Commit, with_state: bool) -> Commit {
        let mut c = match self.deferred.take() {
            Some(d) => d.then(c),
            None => c,
        };
        c.at = Some(Timestamp::now());
        c.lease_owner = Some(self.rt.owner.clone());
        self.checkpoint_time();
        if self.unsaved_usage != Usage::default() {
            c.usage = Some(c.usage.unwrap_or_default() + std::mem::take(&mut self.unsaved_usage));
        }
        if self.unsaved_cost != 0.0 {
            c.cost = Some(c.cost.unwrap_or(0.0) + std::mem::take(&mut self.unsaved_cost));
        }
        if with_state {
            c.session.turn_state = Some(Some(self.state.to_stored()));
        }
        c
    }

    /// Takes in what a commit of this turn stored: the session as it is now, its messages in
    /// the recent-messages cache.
    fn stored(&mut self, committed: Committed) -> Stored {
        let Committed {
            messages,
            events,
            session,
        } = committed;
        let before = session.last_message_seq - messages.len() as u64;
        self.rt.hubs.recent.extend(before, &session, &messages);
        self.session = session;
        Stored { events }
    }

    async fn emit(&mut self, payload: EventPayload) -> Result<()> {
        self.commit(
            Commit {
                events: vec![payload],
                ..Commit::default()
            },
            false,
        )
        .await
        .map(|_| ())
        .map(|_| ())
    }

    /// Records a switch and streams it. Automatic switches count against the turn's limit.
    async fn switch_to(&mut self, to: &str, reason: &str, automatic: bool) -> Result<()> {
        if automatic {
            if self.state.auto_switches >= self.rt.config.max_agent_switches {
                return Err(Error::AgentSwitchLimit(format!(
                    "AGENT_RUNTIME__MAX_AGENT_SWITCHES ({}) automatic switches reached in this turn",
                    self.rt.config.max_agent_switches
                )));
            }
            self.state.guard.switch(&self.session.current_agent, to)?;
            self.state.auto_switches += 1;
        }
        let from = self.agent();
        let switch = AgentSwitch {
            from_agent: from.clone(),
            to_agent: to.into(),
            reason: reason.into(),
            timestamp: Timestamp::now(),
        };
        let c = Commit {
            switches: vec![switch],
            events: vec![EventPayload::AgentSwitched {
                from_agent: from.clone(),
                to_agent: to.into(),
                reason: reason.into(),
            }],
            ..Commit::default()
        };
        self.commit(c, true).await?;
        if self.trace.as_ref().is_some_and(|t| t.in_agent()) {
            self.trace_agent(false);
        }
        self.rt.bus.publish(
            BusEventKind::AgentSwitched,
            self.id(),
            json!({"from_agent": from, "to_agent": to, "reason": reason, "automatic": automatic}),
        );
        Ok(())
    }

    /// A forced function call (`req`, built by [`model::forced_request`]): the arguments the
    /// model wrote, or `None` when the call failed. Its tokens count toward the turn's usage.
    async fn forced_call(&mut self, req: ChatRequest) -> Option<String> {
        let name = match &req.tool_choice {
            ToolChoice::Function(name) => name.clone(),
            _ => String::new(),
        };
        match self.complete_counted(CallKind::Plan, &req).await? {
            Ok((c, usage)) => {
                self.add_usage(usage);
                Some(model::arguments_of(&c, &name))
            }
            Err(e) => {
                warn!(error = %e, function = %name, "forced function call failed");
                None
            }
        }
    }

    /// The orchestrator's routing call (the keyword classifier when it fails). Returns a pause
    /// when the orchestrator proposed a plan instead of routing once.
    async fn route(&mut self, content: &str) -> Result<Option<StopReason>> {
        let candidates: Vec<String> = self
            .rt
            .agents
            .types()
            .into_iter()
            .filter(|t| *t != self.rt.config.default_agent)
            .collect();
        if candidates.is_empty() {
            self.state.route_pending = false;
            return Ok(None);
        }
        let described: Vec<(String, String)> = candidates
            .iter()
            .filter_map(|t| self.rt.agents.get(t).map(|a| (t.clone(), a.description.clone())))
            .collect();
        let plans = self.rt.config.plans_enabled;
        let mut choices = candidates.clone();
        if plans {
            choices.push(routing::PLAN_CHOICE.to_string());
        }
        let (decision, failure) = if std::mem::take(&mut self.state.plan_call_pending) && plans {
            // The router chose a plan before a budget paused the plan call: not asked again.
            let plan = (routing::PLAN_CHOICE.to_string(), String::new());
            (Some(plan), routing::RouterFailure::Unusable)
        } else {
            let Some(answered) = self
                .route_call(
                    routing::route_prompt(&described, plans),
                    content,
                    routing::route_spec(&choices),
                    ROUTE_MAX_TOKENS,
                )
                .await?
            else {
                // A budget paused the turn before the call: routing waits for its raise.
                return Ok(Some(StopReason::BudgetExceeded));
            };
            let decision = (answered.as_ref().ok()).and_then(|a| routing::parse_route(a, &choices));
            (
                decision,
                answered.err().unwrap_or(routing::RouterFailure::Unusable),
            )
        };
        if let Some((choice, _)) = &decision
            && choice == routing::PLAN_CHOICE
            && let Some(pause) = self.propose_plan(content, &candidates).await?
        {
            return Ok(Some(pause));
        }
        let (agent, reason) = match decision {
            Some((a, r)) if a != routing::PLAN_CHOICE => (
                a,
                if r.is_empty() {
                    "Routed by the orchestrator".to_string()
                } else {
                    r
                },
            ),
            _ => {
                warn!(?failure, "the router did not decide; keywords do");
                let (a, r) = routing::keyword_fallback(content, &failure);
                (a.to_string(), r)
            }
        };
        // Decided: the switch's commit stores that nothing is left to route.
        self.state.route_pending = false;
        if !self.rt.agents.contains(&agent) {
            return Ok(None);
        }
        self.switch_to(&agent, &reason, true).await?;
        Ok(None)
    }

    /// The user message a resumed turn still has to route: the session's newest user message
    /// (nothing is stored between it and the routing decision).
    async fn message_to_route(&self) -> Result<String> {
        let recent = self.rt.storage.recent_messages(self.id(), 8).await?;
        recent
            .into_iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content)
            .ok_or_else(|| Error::Internal("a turn to route has no user message".into()))
    }

    /// Routes `content` when given (a pause if the orchestrator proposed a plan or a budget
    /// paused its call), then runs the turn's plan or loop. A turn whose routing waited behind a
    /// budget routes its message once the raise is approved (the routing decision clears
    /// `route_pending`, so it routes once); when the raise was declined, it closes unrouted.
    async fn route_and_run(&mut self, content: Option<String>) -> Result<StopReason> {
        let content = match content {
            _ if self.state.spend.declined.is_some() => None,
            None if self.state.route_pending => Some(self.message_to_route().await?),
            given => given,
        };
        if let Some(content) = content
            && let Some(pause) = self.route(&content).await?
        {
            return Ok(pause);
        }
        self.run_plan().await
    }

    fn count_usage(&self, req: &ChatRequest, text: &str, calls: &[ChatToolCall]) -> Usage {
        self.count_usage_with(req, self.rt.offered_tool_tokens(&req.tools), text, calls)
    }

    /// [`Turn::count_usage`] with the tools' tokens already known (an agent's offer counts them
    /// once).
    fn count_usage_with(
        &self,
        req: &ChatRequest,
        tool_tokens: usize,
        text: &str,
        calls: &[ChatToolCall],
    ) -> Usage {
        let t = &self.rt.tokenizer;
        let prompt: usize = req
            .messages
            .iter()
            .map(|m| t.count(&m.content) + 4)
            .sum::<usize>()
            + tool_tokens;
        let completion = t.count(text)
            + calls
                .iter()
                .map(|c| t.count(&c.arguments) + t.count(&c.name))
                .sum::<usize>();
        Usage {
            prompt_tokens: prompt as u64,
            completion_tokens: completion as u64,
            ..Default::default()
        }
    }

    /// One model call: stream tokens as events, then store the assistant message and its calls.
    /// Returns whether the model asked for tools; `None` when a budget paused the turn first.
    async fn model_call(&mut self) -> Result<Option<bool>> {
        let agent_type = self.agent();
        let agent = self
            .rt
            .agents
            .get(&agent_type)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("session agent '{agent_type}' is not registered")))?;
        let Some((answer, window)) = self.ask_within_window(&agent).await? else {
            return Ok(None);
        };
        self.state.iterations += 1;
        // A stored answer is progress: takeovers count again from zero.
        self.state.resumes = 0;
        self.add_usage(answer.usage);
        let (text, calls) = (answer.text, answer.calls);

        let mut stored_calls = Vec::with_capacity(calls.len());
        for c in calls {
            let arguments = match routing::parse_arguments(&c.arguments) {
                Some(v @ Value::Object(_)) => v,
                _ => Value::String(c.arguments.clone()),
            };
            let approval = self.may_ask(&c.name, &arguments);
            let id = self
                .unique_call_id(&c.id, &stored_calls, &window.messages, approval)
                .await?;
            stored_calls.push(ToolCall {
                id,
                name: c.name.clone(),
                arguments,
            });
        }
        self.state.open_calls = stored_calls
            .iter()
            .map(|c| OpenCall {
                call_id: c.id.clone(),
                tool_name: c.name.clone(),
                arguments: c.arguments.clone(),
                state: CallState::New,
            })
            .collect();
        let mut events = Vec::new();
        if !text.is_empty() || stored_calls.is_empty() {
            events.push(EventPayload::AssistantMessage(AssistantMessage::Complete {
                content: text.clone(),
            }));
        }
        let has_calls = !stored_calls.is_empty();
        let c = Commit {
            messages: vec![NewMessage::assistant(text, Some(agent_type), stored_calls)],
            events,
            ..Commit::default()
        };
        if has_calls {
            self.commit(c, true).await?;
        } else {
            // The answer is final: it is stored (and published) with what ends the turn.
            self.defer(c);
        }
        Ok(Some(has_calls))
    }

    /// Whether the approval policy asks a human about this call (it will be asked again, with the
    /// same request, when the call runs).
    fn may_ask(&self, tool_name: &str, arguments: &Value) -> bool {
        matches!(
            self.requirement(tool_name, arguments),
            ApprovalRequirement::Ask(_)
        )
    }

    /// Whether this call waits for a human: an MCP tool by its server's `approval`/`tool_approval`
    /// (a server's own hints are untrusted), every other tool by the approval policy.
    fn requirement(&self, tool_name: &str, arguments: &Value) -> ApprovalRequirement {
        let name = canonical_tool_name(tool_name);
        if self.rt.is_mcp(name)
            && let Some(approval) = self.rt.mcp.as_ref().and_then(|m| m.approval_of(name))
        {
            return match approval {
                crate::tools::mcp::McpApproval::Always => {
                    ApprovalRequirement::ask(format!("The MCP tool '{name}' requires approval"))
                }
                crate::tools::mcp::McpApproval::Never => ApprovalRequirement::Run,
            };
        }
        let agent = self.agent();
        self.rt.policy.evaluate(&ToolRequest {
            session_id: self.id(),
            agent: &agent,
            tool_name: name,
            arguments,
        })
    }

    /// Where an MCP call runs: the session's project root when it has one (offered to the server
    /// as its root), else no root.
    fn mcp_context(&self) -> ToolContext {
        self.tool_context().unwrap_or_else(|| ToolContext {
            project_root: std::path::PathBuf::new(),
            command_timeout: self.rt.config.command_timeout,
            max_output_bytes: self.rt.config.max_tool_output_bytes,
            cancel: self.cancel.child_token(),
            sandbox: Default::default(),
        })
    }

    /// The model's id when it is unique in the session, else `call_<uuid>`. Ids are compared with
    /// this response and the window, then looked up among the session's tool results (every
    /// earlier call has one by now: [`Storage::tool_call_answered`], an indexed lookup however
    /// long the session); a call that will need an approval is also checked against the
    /// session's approvals (keyed by call id, plans' ids among them).
    ///
    /// [`Storage::tool_call_answered`]: crate::storage::Storage::tool_call_answered
    async fn unique_call_id(
        &self,
        model_id: &str,
        this_response: &[ToolCall],
        window: &[Message],
        needs_approval: bool,
    ) -> Result<String> {
        let fresh = || format!("call_{}", uuid::Uuid::new_v4().simple());
        if model_id.is_empty()
            || model_id.len() > 128
            || this_response.iter().any(|c| c.id == model_id)
            || window
                .iter()
                .any(|m| m.tool_calls.iter().any(|c| c.id == model_id))
            || self.rt.storage.tool_call_answered(self.id(), model_id).await?
        {
            return Ok(fresh());
        }
        if !needs_approval {
            return Ok(model_id.to_string());
        }
        match self.rt.storage.get_approval(self.id(), model_id).await {
            Err(Error::ApprovalNotFound(_)) => Ok(model_id.to_string()),
            Ok(_) => Ok(fresh()),
            Err(e) => Err(e),
        }
    }

    /// Checks a call against the tool registry, the agent's tools and path rule, and the tool's
    /// own validation. `Err` is the refusal text for the model.
    fn check_call(&self, tool_name: &str, arguments: &Value) -> std::result::Result<(), ToolFailure> {
        let name = canonical_tool_name(tool_name);
        let agent_type = self.agent();
        let agent = self
            .rt
            .agents
            .get(&agent_type)
            .ok_or_else(|| ToolFailure::Invalid(format!("unknown agent '{agent_type}'")))?;
        let tool = self
            .rt
            .tool(name)
            .ok_or_else(|| ToolFailure::Invalid(format!("unknown tool '{tool_name}'")))?;
        if !arguments.is_object() {
            return Err(ToolFailure::Invalid(format!(
                "the arguments of '{tool_name}' are not a JSON object: {}",
                truncate_output(&arguments.to_string(), 200)
            )));
        }
        if self.rt.is_mcp(name) {
            if !self.rt.mcp.as_ref().is_some_and(|m| m.serves(&agent_type, name)) {
                return Err(ToolFailure::Invalid(format!(
                    "the {} agent may not use the tool '{name}'; its MCP server is not given to this agent",
                    agent.agent_type
                )));
            }
            return tool.check(&self.mcp_context(), arguments);
        }
        agent
            .authorize(name, &tool.touched_paths(arguments))
            .map_err(ToolFailure::Invalid)?;
        match self.tool_context() {
            Some(ctx) => tool.check(&ctx, arguments),
            // Client execution: the client's sandbox; only the argument shape is ours to check,
            // and none of this machine's files has a say in it.
            None if self.mode() == ToolExecution::Client => {
                let ctx = ToolContext {
                    project_root: std::path::PathBuf::from(crate::tools::sandbox::SHAPE_ONLY_ROOT),
                    command_timeout: self.rt.config.command_timeout,
                    max_output_bytes: self.rt.config.max_tool_output_bytes,
                    cancel: CancellationToken::new(),
                    sandbox: Default::default(),
                };
                match tool.check(&ctx, arguments) {
                    Err(ToolFailure::Invalid(m)) if !m.contains("outside") => Err(ToolFailure::Invalid(m)),
                    _ => Ok(()),
                }
            }
            None => Ok(()),
        }
    }

    /// Stores one call's result (message + event) and closes it.
    async fn finish_call(
        &mut self,
        call_id: &str,
        outcome: std::result::Result<Value, ToolError>,
        extra: Commit,
    ) -> Result<()> {
        let Some((c, span)) = self.close_call(call_id, outcome, extra) else {
            return Ok(());
        };
        self.commit(c, true).await?;
        self.trace_client_tool(span);
        Ok(())
    }

    /// Closes one open call in the turn state and returns the commit storing its result (its
    /// message and event) after `extra`, not yet made; with the span of a call the client ran,
    /// to record once it is stored. `None` if the call is not open.
    fn close_call(
        &mut self,
        call_id: &str,
        outcome: std::result::Result<Value, ToolError>,
        extra: Commit,
    ) -> Option<(Commit, Option<ClientToolSpan>)> {
        let pos = self.state.open_calls.iter().position(|c| c.call_id == call_id)?;
        let call = self.state.open_calls.remove(pos);
        let offered = (self.state.client_offers.iter().position(|o| o.call_id == call_id))
            .map(|i| self.state.client_offers.remove(i));
        // A call the client ran gets its span once the answer is stored (content only on opt-in).
        let span = offered.zip(self.trace.as_ref()).map(|(offer, t)| {
            let result = match &outcome {
                Ok(v) => Ok(t.captures_content().then(|| v.clone())),
                Err(e) => Err(e.code.clone()),
            };
            ClientToolSpan {
                offer,
                tool_name: call.tool_name.clone(),
                arguments: call.arguments.clone(),
                result,
            }
        });
        let max = self.rt.config.max_tool_output_bytes;
        let (content, result, error) = match outcome {
            Ok(Value::String(s)) => {
                let s = truncate_output(&s, max);
                (s.clone(), Some(Value::String(s)), None)
            }
            Ok(v) => {
                let text = v.to_string();
                if text.len() > max {
                    let cut = truncate_output(&text, max);
                    (cut.clone(), Some(Value::String(cut)), None)
                } else {
                    (text, Some(v), None)
                }
            }
            Err(e) => (format!("{}: {}", e.code, e.message), None, Some(e)),
        };
        let mut c = extra;
        c.messages
            .push(NewMessage::tool(&call.call_id, content, Some(self.agent())));
        c.events.push(EventPayload::ToolResult {
            call_id: call.call_id,
            tool_name: call.tool_name,
            result,
            error,
        });
        Some((c, span))
    }

    /// Records the span of a call the client ran, once its answer is stored.
    fn trace_client_tool(&self, span: Option<ClientToolSpan>) {
        if let (Some(s), Some(t)) = (span, &self.trace) {
            let r = s.result.as_ref().map(Option::as_ref).map_err(String::as_str);
            t.client_tool(&s.offer, &s.tool_name, &s.arguments, r);
        }
    }

    /// Answers a call refused before it runs (API.md §9.2).
    async fn refuse(&mut self, call: &OpenCall, failure: ToolFailure) -> Result<()> {
        let extra = self.refused_call(call);
        self.finish_call(&call.call_id, Err(failure.to_tool_error()), extra)
            .await
    }

    /// What goes out before a refused call's result: its `tool_call` in runtime mode, nothing in
    /// client mode, where clients execute every `tool_call` they see (API.md §9.2).
    fn refused_call(&self, call: &OpenCall) -> Commit {
        if self.mode() == ToolExecution::Client {
            return Commit::default();
        }
        Commit {
            events: vec![EventPayload::ToolCall {
                call_id: call.call_id.clone(),
                tool_name: call.tool_name.clone(),
                arguments: call.arguments.clone(),
                requires_approval: false,
                reason: None,
            }],
            ..Commit::default()
        }
    }

    fn set_state(&mut self, call_id: &str, state: CallState) {
        if let Some(c) = self.state.open_calls.iter_mut().find(|c| c.call_id == call_id) {
            c.state = state;
        }
    }

    /// Checks every new call: refusals get their result now, switches happen, dangerous calls
    /// become pending approvals, the rest are cleared to run (or handed to the client). Each call
    /// first asks the budgets; a reached one pauses the turn before it (`Some`).
    async fn triage(&mut self) -> Result<Option<StopReason>> {
        let new: Vec<OpenCall> = self
            .state
            .open_calls
            .iter()
            .filter(|c| c.state == CallState::New)
            .cloned()
            .collect();
        for call in new {
            if self.cancel.is_cancelled() {
                return Err(cancelled());
            }
            if let budget::Gate::Pause = self.gate(crate::budget::Step::ToolCall).await? {
                return Ok(Some(StopReason::BudgetExceeded));
            }
            self.state.spend.tool_calls += 1;
            if let Value::String(raw) = &call.arguments {
                let msg = format!(
                    "the arguments of '{}' are not valid JSON ({}); call the tool again with a JSON object",
                    call.tool_name,
                    truncate_output(raw, 200)
                );
                self.refuse(&call, ToolFailure::Invalid(msg)).await?;
                self.state.guard.invalid_call()?;
                continue;
            }
            if call.tool_name == SWITCH_TOOL && self.rt.auto_switching() {
                self.hand_over(&call).await?;
                continue;
            }
            if let Err(f) = self.check_call(&call.tool_name, &call.arguments) {
                self.refuse(&call, f).await?;
                self.state.guard.invalid_call()?;
                continue;
            }
            if let Err(e) = self.state.guard.valid_call(&call.tool_name, &call.arguments) {
                self.refuse(&call, ToolFailure::Invalid(e.to_string())).await?;
                return Err(e);
            }
            let requirement = self.requirement(&call.tool_name, &call.arguments);
            match requirement {
                ApprovalRequirement::Ask(reason) => self.ask_approval(&call, reason).await?,
                ApprovalRequirement::Run => self.clear_to_run(&call).await?,
            }
        }
        Ok(None)
    }

    /// A call the policy asks a human about: stored as a pending approval and streamed as a
    /// `tool_call` with `requires_approval: true`.
    async fn ask_approval(&mut self, call: &OpenCall, reason: String) -> Result<()> {
        self.set_state(&call.call_id, CallState::AwaitingApproval);
        let approval = Approval {
            call_id: call.call_id.clone(),
            session_id: self.id().to_string(),
            tool_name: call.tool_name.clone(),
            arguments: call.arguments.clone(),
            reason: reason.clone(),
            request_type: RequestType::Tool,
            status: ApprovalStatus::Pending,
            created_at: Timestamp::now(),
            decided_at: None,
            feedback: None,
            modified_arguments: None,
        };
        let c = Commit {
            approvals: vec![approval],
            events: vec![EventPayload::ToolCall {
                call_id: call.call_id.clone(),
                tool_name: call.tool_name.clone(),
                arguments: call.arguments.clone(),
                requires_approval: true,
                reason: Some(reason.clone()),
            }],
            ..Commit::default()
        };
        self.commit(c, true).await?;
        self.trace_event(
            "agent_runtime.approval.requested",
            vec![
                KeyValue::new("gen_ai.tool.name", call.tool_name.clone()),
                KeyValue::new("gen_ai.tool.call.id", call.call_id.clone()),
                KeyValue::new("agent_runtime.approval.reason", reason.clone()),
            ],
        );
        self.rt.bus.publish(
            BusEventKind::ApprovalRequested,
            self.id(),
            json!({"call_id": call.call_id, "tool_name": call.tool_name, "reason": reason, "request_type": "tool"}),
        );
        Ok(())
    }

    /// A call cleared to run: streamed as `tool_call`, then run here or handed to the client.
    async fn clear_to_run(&mut self, call: &OpenCall) -> Result<()> {
        // MCP tools run in the runtime in both execution modes.
        let state = if self.mode() == ToolExecution::Client && !self.rt.is_mcp(&call.tool_name) {
            CallState::AwaitingClient
        } else {
            CallState::Ready {
                run_arguments: call.arguments.clone(),
            }
        };
        let for_client = state == CallState::AwaitingClient;
        if for_client {
            self.offer_to_client(&call.call_id);
        } else {
            self.set_state(&call.call_id, state);
        }
        let c = Commit {
            events: vec![EventPayload::ToolCall {
                call_id: call.call_id.clone(),
                tool_name: call.tool_name.clone(),
                arguments: call.arguments.clone(),
                requires_approval: false,
                reason: None,
            }],
            ..Commit::default()
        };
        if for_client {
            // The turn pauses next: the call goes out with that commit.
            self.defer(c);
            Ok(())
        } else {
            // Streamed before the tool runs, so the client sees what is running.
            self.commit(c, true).await.map(|_| ())
        }
    }

    /// The runtime's `switch_agent` tool: the new agent continues the turn.
    async fn hand_over(&mut self, call: &OpenCall) -> Result<()> {
        let target = call
            .arguments
            .get("agent_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !self.rt.agents.contains(&target) {
            let msg = format!(
                "unknown agent '{target}'; agents: {}",
                self.rt.agents.types().join(", ")
            );
            return self.refuse(call, ToolFailure::Invalid(msg)).await;
        }
        let reason = call
            .arguments
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("Agent hand-over")
            .to_string();
        if self.state.auto_switches >= self.rt.config.max_agent_switches {
            let refusal = ToolError {
                code: "AGENT_SWITCH_LIMIT".into(),
                message: "agent switch limit reached".into(),
            };
            let extra = self.refused_call(call);
            self.finish_call(&call.call_id, Err(refusal), extra).await?;
            return self.switch_to(&target, &reason, true).await;
        }
        let told = format!("Switched to the {target} agent, which continues.");
        if self.mode() == ToolExecution::Client {
            // Clients execute every `tool_call` they see (API.md §9.2): the runtime's own
            // hand-over shows only as `agent_switched`; the model still gets its call answered.
            self.switch_to(&target, &reason, true).await?;
            return self.answer_unseen(&call.call_id, told).await;
        }
        let tool_call = EventPayload::ToolCall {
            call_id: call.call_id.clone(),
            tool_name: call.tool_name.clone(),
            arguments: call.arguments.clone(),
            requires_approval: false,
            reason: None,
        };
        self.emit(tool_call).await?;
        self.switch_to(&target, &reason, true).await?;
        self.finish_call(&call.call_id, Ok(json!(told)), Commit::default())
            .await
    }

    /// Stores one call's answer for the model only (no event) and closes it.
    async fn answer_unseen(&mut self, call_id: &str, content: String) -> Result<()> {
        self.state.open_calls.retain(|c| c.call_id != call_id);
        let c = Commit {
            messages: vec![NewMessage::tool(call_id, content, Some(self.agent()))],
            ..Commit::default()
        };
        self.commit(c, true).await.map(|_| ())
    }

    /// Runs cleared calls, reports rejections, and tells whether the turn must pause.
    async fn settle_calls(&mut self) -> Result<Option<StopReason>> {
        let calls = self.state.open_calls.clone();
        for call in calls {
            if self.cancel.is_cancelled() {
                return Err(cancelled());
            }
            match call.state {
                CallState::Ready {
                    run_arguments: arguments,
                } if self.mode() == ToolExecution::Client && !self.rt.is_mcp(&call.tool_name) => {
                    // Approved: streamed again for the client to execute.
                    self.offer_to_client(&call.call_id);
                    self.commit(
                        Commit {
                            events: vec![EventPayload::ToolCall {
                                call_id: call.call_id.clone(),
                                tool_name: call.tool_name.clone(),
                                arguments,
                                requires_approval: false,
                                reason: None,
                            }],
                            ..Commit::default()
                        },
                        true,
                    )
                    .await?;
                }
                CallState::Ready {
                    run_arguments: arguments,
                } => {
                    if self.handover.is_cancelled() {
                        return Err(handed_over());
                    }
                    let span =
                        (self.trace.as_ref()).map(|t| t.tool(&call.tool_name, &call.call_id, &arguments));
                    let run = self.execute(&call.tool_name, arguments);
                    let outcome = crate::telemetry::within_tool(span.as_ref(), run).await;
                    if let Some(span) = span {
                        span.end(outcome.as_ref().map_err(|e| e.code.as_str()));
                    }
                    if self.cancel.is_cancelled() {
                        return Err(cancelled());
                    }
                    self.state.resumes = 0;
                    self.rt.bus.publish(
                        BusEventKind::ToolExecuted,
                        self.id(),
                        json!({"call_id": call.call_id, "tool_name": call.tool_name, "ok": outcome.is_ok()}),
                    );
                    self.finish_call(&call.call_id, outcome, Commit::default())
                        .await?;
                }
                CallState::Rejected { feedback } => {
                    let message = match feedback.as_deref().map(str::trim) {
                        Some(f) if !f.is_empty() => format!("the user rejected this call: {f}"),
                        _ => "the user rejected this call".to_string(),
                    };
                    let e = ToolError {
                        code: "REJECTED".into(),
                        message,
                    };
                    self.finish_call(&call.call_id, Err(e), Commit::default()).await?;
                }
                CallState::New | CallState::AwaitingApproval | CallState::AwaitingClient => {}
            }
        }
        let waiting = |s: &CallState| self.state.open_calls.iter().any(|c| c.state == *s);
        Ok(if waiting(&CallState::AwaitingApproval) {
            Some(StopReason::AwaitingApproval)
        } else if waiting(&CallState::AwaitingClient) {
            Some(StopReason::AwaitingToolResult)
        } else {
            None
        })
    }

    async fn execute(&self, tool_name: &str, arguments: Value) -> std::result::Result<Value, ToolError> {
        let name = canonical_tool_name(tool_name);
        if self.rt.is_mcp(name) {
            let Some(tool) = self.rt.tool(name) else {
                return Err(ToolFailure::Failed(format!(
                    "the MCP tool '{tool_name}' is no longer offered by its server"
                ))
                .to_tool_error());
            };
            return tool
                .run(&self.mcp_context(), arguments)
                .await
                .map_err(|f| f.to_tool_error());
        }
        let Some(ctx) = self.tool_context() else {
            return Err(ToolFailure::Failed(
                "this session has no metadata.project_path, so the runtime cannot run tools".into(),
            )
            .to_tool_error());
        };
        let Some(tool) = self.rt.tool(name) else {
            return Err(ToolFailure::Invalid(format!("unknown tool '{tool_name}'")).to_tool_error());
        };
        tool.run(&ctx, arguments).await.map_err(|f| f.to_tool_error())
    }

    /// The loop: settle open calls, call the model, triage its calls, until done or paused.
    async fn run_loop(&mut self) -> Result<StopReason> {
        if self.close_declined().await? {
            return Ok(StopReason::BudgetExceeded);
        }
        loop {
            if self.handover.is_cancelled() {
                return Err(handed_over());
            }
            // Calls a budget paused before are triaged where the turn stopped.
            if self.state.open_calls.iter().any(|c| c.state == CallState::New)
                && let Some(pause) = self.triage().await?
            {
                return Ok(pause);
            }
            if let Some(pause) = self.settle_calls().await? {
                return Ok(pause);
            }
            if self.cancel.is_cancelled() {
                return Err(cancelled());
            }
            if self.state.iterations >= self.rt.config.max_turn_iterations {
                return Ok(StopReason::MaxIterations);
            }
            if self.handover.is_cancelled() {
                return Err(handed_over());
            }
            match self.model_call().await? {
                None => return Ok(StopReason::BudgetExceeded),
                Some(false) if self.cut_by_deadline => {
                    self.cut_by_deadline = false;
                    if let budget::Gate::Pause = self.gate(crate::budget::Step::Between).await? {
                        return Ok(StopReason::BudgetExceeded);
                    }
                    return Ok(StopReason::Completed);
                }
                Some(false) => return Ok(StopReason::Completed),
                Some(true) => {}
            }
            if let Some(pause) = self.triage().await? {
                return Ok(pause);
            }
        }
    }

    /// Gives every open call a result and cancels its pending approval.
    async fn close_open_calls(&mut self, why: &str, code: &str) -> Result<()> {
        let calls = self.state.open_calls.clone();
        for call in calls {
            let mut extra = Commit::default();
            if call.state == CallState::AwaitingApproval {
                extra.resolutions.push(ApprovalResolution {
                    call_id: call.call_id.clone(),
                    status: ApprovalStatus::Cancelled,
                    feedback: Some(why.to_string()),
                    modified_arguments: None,
                    decided_at: Timestamp::now(),
                });
                extra.events.push(EventPayload::ApprovalResolved {
                    call_id: call.call_id.clone(),
                    decision: "cancel".into(),
                });
                self.rt.bus.publish(
                    BusEventKind::ApprovalCancelled,
                    self.id(),
                    json!({"call_id": call.call_id}),
                );
            }
            let e = ToolError {
                code: code.into(),
                message: why.into(),
            };
            match self
                .finish_call(&call.call_id, Err(e.clone()), extra.clone())
                .await
            {
                Err(Error::ApprovalAlreadyDecided(_)) => {
                    // Decided meanwhile: still owed a result.
                    self.finish_call(&call.call_id, Err(e), Commit::default()).await?;
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Ends the stream: `error` (if any) and `done`, with the session's new status. Returns the
    /// final events, not yet published: the session must be released first, so a client that
    /// reacts to `done` at once finds it free.
    async fn finish(&mut self, outcome: Result<StopReason>) -> Result<Vec<crate::protocol::Event>> {
        let (stop, error) = match outcome {
            Ok(stop) => (stop, None),
            Err(Error::Internal(m)) if m == CANCELLED => (StopReason::Cancelled, None),
            Err(e) => (StopReason::Error, Some(e)),
        };
        let paused = matches!(
            stop,
            StopReason::AwaitingApproval | StopReason::AwaitingToolResult
        ) || (stop == StopReason::BudgetExceeded && self.state.spend.paused.is_some());
        if !paused {
            let (why, code) = match stop {
                StopReason::Cancelled => ("cancelled: the turn was cancelled", "CANCELLED"),
                _ => (
                    "not executed: the turn ended before this call ran",
                    "TOOL_EXECUTION_FAILED",
                ),
            };
            self.close_open_calls(why, code).await?;
            self.abandon_plan(why).await?;
            self.abandon_budget(why).await?;
        }
        let mut events = Vec::new();
        if let Some(e) = &error {
            warn!(code = e.code(), error = %e, "turn failed");
            events.push(EventPayload::Error {
                code: e.code().into(),
                message: e.public_message(),
            });
        }
        events.push(EventPayload::Done {
            stop_reason: stop,
            usage: self.done_usage(),
        });
        let status = match stop {
            StopReason::AwaitingApproval => SessionStatus::AwaitingApproval,
            StopReason::BudgetExceeded if paused => SessionStatus::AwaitingApproval,
            StopReason::AwaitingToolResult => SessionStatus::AwaitingToolResult,
            _ => SessionStatus::Idle,
        };
        self.checkpoint_time();
        let turn_state = if paused {
            Some(self.state.to_stored())
        } else {
            None
        };
        let c = Commit {
            events,
            session: SessionUpdate {
                status: Some(status),
                turn_state: Some(turn_state),
                ..SessionUpdate::default()
            },
            release_lease: !self.keep_lease,
            ..Commit::default()
        };
        let committed = self.commit_quietly(c, false).await?;
        if let Some(t) = &mut self.trace {
            let stop = serde_json::to_value(stop).ok();
            let stop = stop.as_ref().and_then(Value::as_str).unwrap_or("unknown");
            t.end_agent(Some((stop, error.as_ref().map(|e| e.code()))));
        }
        let kind = if error.is_some() {
            BusEventKind::TurnFailed
        } else {
            BusEventKind::TurnCompleted
        };
        self.rt.bus.publish(
            kind,
            self.id(),
            json!({"turn_id": self.state.turn_id, "stop_reason": stop, "cost": self.run_cost}),
        );
        Ok(committed.events)
    }

    async fn run(mut self, next: Next) {
        let started = std::time::Instant::now();
        let outcome = match next {
            Next::Nothing => {
                if let Some(t) = &mut self.trace {
                    t.end_agent(None);
                }
                return self.release().await;
            }
            Next::Run { route } => {
                self.trace_agent(true);
                self.publish_started(None);
                self.route_and_run(route).await
            }
            Next::Resume { reason } => {
                self.publish_started(Some(reason));
                if self.state.route_pending {
                    // Cut before the orchestrator decided: route the message as the turn would have.
                    match self.message_to_route().await {
                        Ok(content) => self.route_and_run(Some(content)).await,
                        Err(e) => Err(e),
                    }
                } else {
                    let unchecked = self.state.open_calls.iter().any(|c| c.state == CallState::New);
                    let triaged = if unchecked { self.triage().await } else { Ok(None) };
                    match triaged {
                        Ok(Some(pause)) => Ok(pause),
                        Ok(None) => self.run_plan().await,
                        Err(e) => Err(e),
                    }
                }
            }
        };
        if matches!(&outcome, Err(e) if is_handed_over(e)) {
            return self.hand_off().await;
        }
        // A model failure says how long the client really waited (routing included), not only
        // the last call's limit.
        let outcome = outcome.map_err(|e| match e {
            Error::Llm(m) => Error::Llm(format!(
                "{m}; the turn ran {} in all",
                crate::llm::secs(started.elapsed())
            )),
            other => other,
        });
        // The final commit gives the lease up; only if it failed must the lease be released apart.
        let (last, released) = match self.finish(outcome).await {
            Ok(events) => (events, true),
            Err(e) => {
                warn!(error = %e, session_id = self.id(), "could not record the end of a turn");
                (vec![], false)
            }
        };
        if !released {
            let _ = self
                .rt
                .storage
                .release_lease(&self.session.id, &self.rt.owner)
                .await;
        }
        self.rt.hubs.finish_turn(&self.session.id);
        self.rt.hubs.publish(&self.session.id, last);
    }

    /// `turn.started` on the bus: the turn runs in this process now, on this agent (`resumed`:
    /// taken over from a stopped or draining process, with `turn_resumed`'s reason).
    fn publish_started(&self, resumed: Option<&str>) {
        let mut data = json!({"turn_id": self.state.turn_id, "agent": self.agent()});
        if let Some(reason) = resumed {
            data["resumed"] = json!(reason);
        }
        self.rt.bus.publish(BusEventKind::TurnStarted, self.id(), data);
    }

    async fn release(self) {
        give_back(&self.rt, &self.session.id).await;
    }

    /// Hands the turn over at a step boundary (this process drains): its state is stored with
    /// the session still `running`, and the lease released, so the first live process to look
    /// (another replica, or this one restarted) resumes it at once. No `done`: the turn goes on.
    async fn hand_off(mut self) {
        self.state.handed_over = true;
        let c = Commit {
            release_lease: true,
            ..Commit::default()
        };
        match self.commit(c, true).await {
            Ok(_) => tracing::info!(
                session_id = self.id(),
                "turn handed over: this process is draining"
            ),
            Err(e) => {
                warn!(error = %e, session_id = self.id(), "could not store a turn handed over; it resumes as if its process died");
                let _ = self
                    .rt
                    .storage
                    .release_lease(&self.session.id, &self.rt.owner)
                    .await;
            }
        }
        self.rt.hubs.finish_turn(&self.session.id);
    }
}

/// Token budget of the routing call: an agent and a one-sentence reason.
const ROUTE_MAX_TOKENS: u32 = 120;
/// Token budget of the plan call.
pub(super) const PLAN_MAX_TOKENS: u32 = 800;

const CANCELLED: &str = "\u{0}cancelled";

fn cancelled() -> Error {
    Error::Internal(CANCELLED.into())
}

const HANDED_OVER: &str = "\u{0}handed over";

/// The turn stopped at a step boundary to be handed over (never stored: see [`Turn::hand_off`]).
fn handed_over() -> Error {
    Error::Internal(HANDED_OVER.into())
}

fn is_handed_over(e: &Error) -> bool {
    matches!(e, Error::Internal(m) if m == HANDED_OVER)
}

fn chat(role: ChatRole, content: String) -> ChatMessage {
    ChatMessage {
        role,
        content,
        tool_calls: vec![],
        tool_call_id: None,
    }
}

fn to_chat(m: &Message) -> ChatMessage {
    let role = match m.role {
        Role::User => ChatRole::User,
        Role::Assistant => ChatRole::Assistant,
        Role::Tool => ChatRole::Tool,
        Role::System => ChatRole::System,
    };
    ChatMessage {
        role,
        content: m.content.clone(),
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| ChatToolCall {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments: if c.arguments.is_object() {
                    c.arguments.to_string()
                } else {
                    "{}".into()
                },
            })
            .collect(),
        tool_call_id: m.tool_call_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TurnState {
        TurnState {
            turn_id: "turn_1".into(),
            iterations: 2,
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 3,
                cached_prompt_tokens: 0,
            },
            spend: budget::TurnSpend {
                active_ms: 7,
                ..budget::TurnSpend::default()
            },
            ..TurnState::default()
        }
    }

    fn read(text: &str) -> TurnState {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_turn_state_is_stored_without_the_fields_at_their_defaults() {
        assert_eq!(
            state().to_stored().as_str(),
            r#"{"turn_id":"turn_1","iterations":2,"auto_switches":0,"usage":{"prompt_tokens":10,"completion_tokens":3},"open_calls":[],"spend":{"active_ms":7}}"#
        );
        assert_eq!(
            TurnState::default().to_stored().as_str(),
            r#"{"turn_id":"","iterations":0,"auto_switches":0,"usage":{"prompt_tokens":0,"completion_tokens":0},"open_calls":[]}"#
        );
    }

    #[test]
    fn a_turn_state_stored_through_a_json_value_by_earlier_versions_reads_back_the_same() {
        // Earlier versions stored `serde_json::to_string` of the state as a `Value`: keys sorted.
        let stored = TurnStateJson::from_value(&serde_json::to_value(state()).unwrap());
        assert_eq!(
            stored.as_str(),
            r#"{"auto_switches":0,"iterations":2,"open_calls":[],"spend":{"active_ms":7},"turn_id":"turn_1","usage":{"completion_tokens":3,"prompt_tokens":10}}"#
        );
        let session = Session {
            id: "s1".into(),
            user_id: None,
            metadata: json!({}),
            created_at: Timestamp::from_millis(1),
            last_activity: Timestamp::from_millis(1),
            current_agent: "coder".into(),
            status: SessionStatus::AwaitingToolResult,
            message_count: 1,
            last_message_seq: 1,
            last_event_seq: 1,
            usage: Usage::default(),
            turn_state: Some(stored),
            budget: Default::default(),
            cost: 0.0,
        };
        assert_eq!(TurnState::stored(&session), Some(state()));
    }

    #[test]
    fn a_turn_state_reads_back_the_same_whether_its_defaults_were_written_or_left_out() {
        let written_out = json!({"turn_id": "turn_1", "iterations": 2, "auto_switches": 0,
            "usage": {"prompt_tokens": 10, "completion_tokens": 3}, "open_calls": [], "plan": null,
            "guard": {"invalid_in_a_row": 0, "calls": [], "previous_agent": null, "bounces": 0},
            "resumes": 0, "handed_over": false,
            "spend": {"cost": 0.0, "tool_calls": 0, "active_ms": 7, "raised": {}, "paused": null, "declined": null}});
        assert_eq!(read(&written_out.to_string()), state());
        assert_eq!(read(state().to_stored().as_str()), state());
    }
}
