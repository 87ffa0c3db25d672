//! One turn as a state machine (API.md §5.2–5.4): route, stream the model, check each tool call,
//! ask for approval, execute, loop; pause for humans or clients; persist every step before it is sent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use super::routing::{self, SWITCH_TOOL};

#[path = "guard.rs"]
mod guard;
#[path = "model.rs"]
mod model;
#[path = "plan.rs"]
mod plan;
use super::stream::{EventStream, Follow};
use super::{CancelOutcome, Inner, Submission};
use crate::approval::{
    Approval, ApprovalRequirement, ApprovalResolution, ApprovalStatus, RequestType, ToolRequest,
    policy::canonical_tool_name,
};
use crate::config::ToolExecution;
use crate::context::{ContextLimits, build_window, truncate_output};
use crate::error::{Error, Result};
use crate::events::BusEventKind;
use crate::llm::{ChatMessage, ChatRequest, ChatRole, ChatToolCall, ToolChoice};
use crate::protocol::{AssistantMessage, ClientMessage, EventPayload, HitlDecision, StopReason, ToolError};
use crate::session::{AgentSwitch, Message, NewMessage, Role, Session, SessionStatus, ToolCall, Usage};
use crate::storage::{Commit, Committed, SessionQuery, SessionUpdate};
use crate::time::Timestamp;
use crate::tools::{ToolContext, ToolFailure};

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
    #[serde(default)]
    plan: Option<plan::PlanRun>,
    /// Loop and ping-pong detection.
    #[serde(default)]
    guard: guard::Guard,
}

impl TurnState {
    fn fresh() -> Self {
        TurnState {
            turn_id: format!("turn_{}", uuid::Uuid::new_v4().simple()),
            ..TurnState::default()
        }
    }

    fn load(session: &Session) -> Self {
        session
            .turn_state
            .clone()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_else(TurnState::fresh)
    }

    fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// What the turn does after its first (synchronous) commit.
enum Next {
    /// Route (if the orchestrator should) and run the loop.
    Run { route: Option<String> },
    /// Nothing more: the first commit ended the stream.
    Nothing,
}

struct Turn {
    rt: Arc<Inner>,
    session: Session,
    state: TurnState,
    cancel: CancellationToken,
    /// Tokens spent but not yet added to the session's total (rides on the next commit).
    unsaved_usage: Usage,
    /// Changes that ride on the next commit instead of costing one of their own (the final
    /// answer goes out with `done`); their events are published only once stored.
    deferred: Option<Commit>,
    /// The final commit keeps the session's lease (the caller goes on using it).
    keep_lease: bool,
}

impl Turn {
    fn new(rt: Arc<Inner>, session: Session, cancel: CancellationToken) -> Self {
        Turn {
            rt,
            state: TurnState::load(&session),
            session,
            cancel,
            unsaved_usage: Usage::default(),
            deferred: None,
            keep_lease: false,
        }
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
        })
    }

    /// Commits under this process's lease, publishes the events, and keeps the session current.
    async fn commit(&mut self, c: Commit, with_state: bool) -> Result<Committed> {
        let committed = self.commit_quietly(c, with_state).await?;
        self.rt.hubs.publish(&self.session.id, &committed.events);
        Ok(committed)
    }

    /// Commits without publishing (the caller publishes once the session is free again).
    async fn commit_quietly(&mut self, c: Commit, with_state: bool) -> Result<Committed> {
        let mut c = match self.deferred.take() {
            Some(d) => d.then(c),
            None => c,
        };
        c.at = Some(Timestamp::now());
        c.lease_owner = Some(self.rt.owner.clone());
        if self.unsaved_usage != Usage::default() {
            c.usage = Some(c.usage.unwrap_or_default() + std::mem::take(&mut self.unsaved_usage));
        }
        if with_state {
            c.session.turn_state = Some(Some(self.state.to_value()));
        }
        let committed = self.rt.storage.commit(&self.session.id, c).await?;
        self.session = committed.session.clone();
        Ok(committed)
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
        self.rt.bus.publish(
            BusEventKind::AgentSwitched,
            self.id(),
            json!({"from_agent": from, "to_agent": to, "reason": reason, "automatic": automatic}),
        );
        Ok(())
    }

    /// A forced function call (`tool_choice` names it): the arguments the model wrote, or `None`
    /// when the call failed. Its tokens count toward the turn's usage.
    async fn forced_call(
        &mut self,
        system: String,
        user: &str,
        spec: crate::protocol::ToolSpec,
    ) -> Option<String> {
        let name = spec.name.clone();
        let req = ChatRequest {
            messages: vec![
                chat(ChatRole::System, system),
                chat(ChatRole::User, user.to_string()),
            ],
            tools: vec![spec],
            tool_choice: ToolChoice::Function(name.clone()),
            temperature: Some(0.0),
            max_tokens: Some(500),
        };
        match self.complete_counted(&req).await? {
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

    /// Adds tokens to the turn's usage and, with the next commit, to the session's.
    fn add_usage(&mut self, usage: Usage) {
        self.state.usage += usage;
        self.unsaved_usage += usage;
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
        let args = self
            .forced_call(
                routing::route_prompt(&described, plans),
                content,
                routing::route_spec(&choices),
            )
            .await;
        let decision = args.and_then(|a| routing::parse_route(&a, &choices));
        if let Some((choice, _)) = &decision
            && choice == routing::PLAN_CHOICE
            && self.propose_plan(content, &candidates).await?
        {
            return Ok(Some(StopReason::AwaitingApproval));
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
                let (a, r) = routing::classify_by_keywords(content);
                (a.to_string(), r.to_string())
            }
        };
        if !self.rt.agents.contains(&agent) {
            return Ok(None);
        }
        self.switch_to(&agent, &reason, true).await?;
        Ok(None)
    }

    fn count_usage(&self, req: &ChatRequest, text: &str, calls: &[ChatToolCall]) -> Usage {
        let t = &self.rt.tokenizer;
        let prompt: usize = req
            .messages
            .iter()
            .map(|m| t.count(&m.content) + 4)
            .sum::<usize>()
            + req
                .tools
                .iter()
                .map(|s| t.count(&s.parameters.to_string()) + t.count(&s.description))
                .sum::<usize>();
        let completion = t.count(text)
            + calls
                .iter()
                .map(|c| t.count(&c.arguments) + t.count(&c.name))
                .sum::<usize>();
        Usage {
            prompt_tokens: prompt as u64,
            completion_tokens: completion as u64,
        }
    }

    /// One model call: stream tokens as events, then store the assistant message and its calls.
    /// Returns whether the model asked for tools.
    async fn model_call(&mut self) -> Result<bool> {
        let agent_type = self.agent();
        let agent = self
            .rt
            .agents
            .get(&agent_type)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("session agent '{agent_type}' is not registered")))?;
        let limits = ContextLimits {
            max_messages: self.rt.config.max_context_messages,
            max_tokens: self.rt.config.max_context_tokens,
        };
        let recent = self
            .rt
            .storage
            .recent_messages(self.id(), limits.max_messages)
            .await?;
        let window = build_window(self.rt.tokenizer.as_ref(), limits, &agent.system_prompt, &recent)?;
        let mut messages = vec![chat(ChatRole::System, agent.system_prompt.clone())];
        messages.extend(window.messages.iter().map(to_chat));
        let names: Vec<&str> = agent.tools.iter().map(String::as_str).collect();
        let mut tools = self.rt.tools.specs(&names);
        if self.auto_switching() {
            tools.push(routing::switch_spec(&self.rt.agents.types()));
        }
        let req = ChatRequest {
            messages,
            tools,
            tool_choice: ToolChoice::Auto,
            temperature: self.rt.config.temperature,
            max_tokens: None,
        };
        let answer = self.ask_model(req).await?;
        self.state.iterations += 1;
        self.add_usage(answer.usage);
        let (text, calls) = (answer.text, answer.calls);

        let mut stored_calls = Vec::with_capacity(calls.len());
        for c in calls {
            let id = self
                .unique_call_id(&c.id, &stored_calls, &window.messages)
                .await?;
            let arguments = match serde_json::from_str::<Value>(&c.arguments) {
                Ok(v @ Value::Object(_)) => v,
                _ => Value::String(c.arguments.clone()),
            };
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
        Ok(has_calls)
    }

    fn auto_switching(&self) -> bool {
        self.rt.config.multi_agent_enabled && self.rt.config.auto_agent_switching
    }

    /// The model's id when it is unique in the session, else `call_<uuid>`.
    async fn unique_call_id(
        &self,
        model_id: &str,
        this_response: &[ToolCall],
        window: &[Message],
    ) -> Result<String> {
        let fresh = || format!("call_{}", uuid::Uuid::new_v4().simple());
        if model_id.is_empty()
            || model_id.len() > 128
            || this_response.iter().any(|c| c.id == model_id)
            || window
                .iter()
                .any(|m| m.tool_calls.iter().any(|c| c.id == model_id))
        {
            return Ok(fresh());
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
            .tools
            .get(name)
            .ok_or_else(|| ToolFailure::Invalid(format!("unknown tool '{tool_name}'")))?;
        if !arguments.is_object() {
            return Err(ToolFailure::Invalid(format!(
                "the arguments of '{tool_name}' are not a JSON object: {}",
                truncate_output(&arguments.to_string(), 200)
            )));
        }
        agent
            .authorize(name, &tool.touched_paths(arguments))
            .map_err(ToolFailure::Invalid)?;
        match self.tool_context() {
            Some(ctx) => tool.check(&ctx, arguments),
            // Client execution: the client's sandbox; only the argument shape is ours to check.
            None if self.mode() == ToolExecution::Client => {
                let ctx = ToolContext {
                    project_root: std::env::temp_dir(),
                    command_timeout: self.rt.config.command_timeout,
                    max_output_bytes: self.rt.config.max_tool_output_bytes,
                    cancel: CancellationToken::new(),
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
        let Some(pos) = self.state.open_calls.iter().position(|c| c.call_id == call_id) else {
            return Ok(());
        };
        let call = self.state.open_calls.remove(pos);
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
            call_id: call.call_id.clone(),
            tool_name: call.tool_name.clone(),
            result,
            error,
        });
        self.commit(c, true).await?;
        Ok(())
    }

    async fn refuse(&mut self, call: &OpenCall, failure: ToolFailure) -> Result<()> {
        let tool_call = EventPayload::ToolCall {
            call_id: call.call_id.clone(),
            tool_name: call.tool_name.clone(),
            arguments: call.arguments.clone(),
            requires_approval: false,
            reason: None,
        };
        let extra = Commit {
            events: vec![tool_call],
            ..Commit::default()
        };
        self.finish_call(&call.call_id, Err(failure.to_tool_error()), extra)
            .await
    }

    fn set_state(&mut self, call_id: &str, state: CallState) {
        if let Some(c) = self.state.open_calls.iter_mut().find(|c| c.call_id == call_id) {
            c.state = state;
        }
    }

    /// Checks every new call: refusals get their result now, switches happen, dangerous calls
    /// become pending approvals, the rest are cleared to run (or handed to the client).
    async fn triage(&mut self) -> Result<()> {
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
            if call.tool_name == SWITCH_TOOL && self.auto_switching() {
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
            let agent = self.agent();
            let name = canonical_tool_name(&call.tool_name).to_string();
            let requirement = self.rt.policy.evaluate(&ToolRequest {
                session_id: self.id(),
                agent: &agent,
                tool_name: &name,
                arguments: &call.arguments,
            });
            match requirement {
                ApprovalRequirement::Ask(reason) => {
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
                    self.rt.bus.publish(
                        BusEventKind::ApprovalRequested,
                        self.id(),
                        json!({"call_id": call.call_id, "tool_name": call.tool_name, "reason": reason, "request_type": "tool"}),
                    );
                }
                ApprovalRequirement::Run => {
                    let state = if self.mode() == ToolExecution::Client {
                        CallState::AwaitingClient
                    } else {
                        CallState::Ready {
                            run_arguments: call.arguments.clone(),
                        }
                    };
                    self.set_state(&call.call_id, state);
                    self.commit(
                        Commit {
                            events: vec![EventPayload::ToolCall {
                                call_id: call.call_id.clone(),
                                tool_name: call.tool_name.clone(),
                                arguments: call.arguments.clone(),
                                requires_approval: false,
                                reason: None,
                            }],
                            ..Commit::default()
                        },
                        true,
                    )
                    .await?;
                }
            }
        }
        Ok(())
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
        let tool_call = EventPayload::ToolCall {
            call_id: call.call_id.clone(),
            tool_name: call.tool_name.clone(),
            arguments: call.arguments.clone(),
            requires_approval: false,
            reason: None,
        };
        if self.state.auto_switches >= self.rt.config.max_agent_switches {
            let refusal = ToolError {
                code: "AGENT_SWITCH_LIMIT".into(),
                message: "agent switch limit reached".into(),
            };
            self.finish_call(
                &call.call_id,
                Err(refusal),
                Commit {
                    events: vec![tool_call],
                    ..Commit::default()
                },
            )
            .await?;
            return self.switch_to(&target, &reason, true).await;
        }
        self.emit(tool_call).await?;
        self.switch_to(&target, &reason, true).await?;
        self.finish_call(
            &call.call_id,
            Ok(json!(format!("Switched to the {target} agent, which continues."))),
            Commit::default(),
        )
        .await
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
                } if self.mode() == ToolExecution::Client => {
                    // Approved: streamed again for the client to execute.
                    self.set_state(&call.call_id, CallState::AwaitingClient);
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
                    let outcome = self.execute(&call.tool_name, arguments).await;
                    if self.cancel.is_cancelled() {
                        return Err(cancelled());
                    }
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
        let Some(ctx) = self.tool_context() else {
            return Err(ToolFailure::Failed(
                "this session has no metadata.project_path, so the runtime cannot run tools".into(),
            )
            .to_tool_error());
        };
        let Some(tool) = self.rt.tools.get(name) else {
            return Err(ToolFailure::Invalid(format!("unknown tool '{tool_name}'")).to_tool_error());
        };
        tool.run(&ctx, arguments).await.map_err(|f| f.to_tool_error())
    }

    /// The loop: settle open calls, call the model, triage its calls, until done or paused.
    async fn run_loop(&mut self) -> Result<StopReason> {
        loop {
            if let Some(pause) = self.settle_calls().await? {
                return Ok(pause);
            }
            if self.cancel.is_cancelled() {
                return Err(cancelled());
            }
            if self.state.iterations >= self.rt.config.max_turn_iterations {
                return Ok(StopReason::MaxIterations);
            }
            if !self.model_call().await? {
                return Ok(StopReason::Completed);
            }
            self.triage().await?;
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
        );
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
            usage: self.state.usage,
        });
        let status = match stop {
            StopReason::AwaitingApproval => SessionStatus::AwaitingApproval,
            StopReason::AwaitingToolResult => SessionStatus::AwaitingToolResult,
            _ => SessionStatus::Idle,
        };
        let turn_state = if paused { Some(self.state.to_value()) } else { None };
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
        let kind = if error.is_some() {
            BusEventKind::TurnFailed
        } else {
            BusEventKind::TurnCompleted
        };
        self.rt.bus.publish(
            kind,
            self.id(),
            json!({"turn_id": self.state.turn_id, "stop_reason": stop}),
        );
        Ok(committed.events)
    }

    async fn run(mut self, next: Next) {
        let outcome = match next {
            Next::Nothing => return self.release().await,
            Next::Run { route } => {
                self.rt.bus.publish(
                    BusEventKind::TurnStarted,
                    self.id(),
                    json!({"turn_id": self.state.turn_id}),
                );
                let routed = match route {
                    Some(content) => self.route(&content).await,
                    None => Ok(None),
                };
                match routed {
                    Ok(Some(pause)) => Ok(pause),
                    Ok(None) => self.run_plan().await,
                    Err(e) => Err(e),
                }
            }
        };
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
        self.rt.hubs.publish(&self.session.id, &last);
    }

    async fn release(self) {
        give_back(&self.rt, &self.session.id).await;
    }
}

const CANCELLED: &str = "\u{0}cancelled";

fn cancelled() -> Error {
    Error::Internal(CANCELLED.into())
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

/// Takes the session for a turn in this process and in storage; `SESSION_BUSY` otherwise.
async fn take_session(rt: &Arc<Inner>, session_id: &str) -> Result<super::stream::RunningTurn> {
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
    match rt
        .storage
        .acquire_lease(session_id, &rt.owner, rt.config.lease_ttl)
        .await
    {
        Ok(true) => Ok(running),
        Ok(false) => {
            rt.hubs.finish_turn(session_id);
            Err(Error::SessionBusy(session_id.into()))
        }
        Err(e) => {
            rt.hubs.finish_turn(session_id);
            Err(e)
        }
    }
}

async fn give_back(rt: &Arc<Inner>, session_id: &str) {
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
pub(super) async fn submit(rt: Arc<Inner>, session_id: &str, sub: Submission) -> Result<EventStream> {
    let session = rt.storage.get_session(session_id).await?;
    validate(&rt, &session, &sub.message)?;
    if let Some(rid) = &sub.request_id
        && let Some(first) = rt.storage.find_request(session_id, rid).await?
    {
        return Ok(EventStream::new(
            rt.storage.clone(),
            rt.hubs.clone(),
            session_id,
            first.saturating_sub(1),
            Follow::UntilDone,
        ));
    }
    let running = match take_session(&rt, session_id).await {
        Ok(r) => r,
        Err(Error::SessionBusy(id)) => {
            // A duplicate of a submission still starting: wait for its first commit and replay it.
            if let Some(rid) = &sub.request_id {
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Some(first) = rt.storage.find_request(session_id, rid).await? {
                        return Ok(EventStream::new(
                            rt.storage.clone(),
                            rt.hubs.clone(),
                            session_id,
                            first.saturating_sub(1),
                            Follow::UntilDone,
                        ));
                    }
                }
            }
            return Err(Error::SessionBusy(id));
        }
        Err(e) => return Err(e),
    };
    match start(&rt, session_id, sub, running.cancel.clone()).await {
        Ok((turn, next, first_seq)) => {
            let stream = EventStream::new(
                rt.storage.clone(),
                rt.hubs.clone(),
                session_id,
                first_seq.saturating_sub(1),
                Follow::UntilDone,
            );
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
            match paused_stream(&rt, session_id, &e) {
                Some(stream) => Ok(stream),
                None => Err(e),
            }
        }
    }
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
async fn start(
    rt: &Arc<Inner>,
    session_id: &str,
    sub: Submission,
    cancel: CancellationToken,
) -> Result<(Turn, Next, u64)> {
    let mut session = rt.storage.get_session(session_id).await?;
    if session.status == SessionStatus::Running {
        // We hold the lease, so nobody runs it: a turn interrupted by a crash.
        close_interrupted(rt, &session, true).await?;
        session = rt.storage.get_session(session_id).await?;
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
        ClientMessage::HitlDecision(d) => {
            let first = decide(&mut turn, d, request_id).await?;
            (Next::Run { route: None }, first)
        }
    };
    Ok((turn, next, first))
}

/// The newest message alone must fit the window (API.md §9.1: an HTTP error, not an event).
fn check_fits(rt: &Arc<Inner>, session: &Session, agent_type: Option<&str>, content: &str) -> Result<()> {
    let agent = agent_type.unwrap_or(&session.current_agent);
    let prompt = rt
        .agents
        .get(agent)
        .map(|a| a.system_prompt.as_str())
        .unwrap_or("");
    let probe = Message {
        seq: 0,
        role: Role::User,
        content: content.to_string(),
        agent: None,
        tool_calls: vec![],
        tool_call_id: None,
        created_at: Timestamp::now(),
    };
    let limits = ContextLimits {
        max_messages: rt.config.max_context_messages,
        max_tokens: rt.config.max_context_tokens,
    };
    build_window(
        rt.tokenizer.as_ref(),
        limits,
        prompt,
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
async fn decide(turn: &mut Turn, d: HitlDecision, request_id: Option<String>) -> Result<u64> {
    let approval = turn.rt.storage.get_approval(turn.id(), &d.call_id).await?;
    if approval.status != ApprovalStatus::Pending {
        return Err(Error::ApprovalAlreadyDecided(d.call_id));
    }
    if approval.request_type == RequestType::Plan {
        return plan::decide_plan(turn, d, request_id).await;
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
        resolutions: vec![ApprovalResolution {
            call_id: d.call_id.clone(),
            status,
            feedback: d.feedback.clone(),
            modified_arguments: if d.decision == "edit" {
                d.modified_arguments.clone()
            } else {
                None
            },
            decided_at: Timestamp::now(),
        }],
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
    if still_pending {
        // The other approvals keep the turn paused; this stream ends with its `done`.
        return Err(Paused(first).into());
    }
    Ok(first)
}

/// A decision that leaves the turn paused: the stream is just what was committed.
struct Paused(u64);

impl From<Paused> for Error {
    fn from(p: Paused) -> Self {
        Error::Internal(format!("{PAUSED_PREFIX}{}", p.0))
    }
}

const PAUSED_PREFIX: &str = "\u{0}paused:";

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

/// `recover_interrupted` of the facade.
pub(super) async fn recover_interrupted(rt: Arc<Inner>) -> Result<usize> {
    let mut recovered = 0;
    let mut cursor = None;
    loop {
        let page = rt
            .storage
            .list_sessions(SessionQuery {
                user_id: None,
                status: Some(SessionStatus::Running),
                limit: 100,
                cursor,
            })
            .await?;
        for s in &page.sessions {
            if rt.hubs.running(&s.id).is_some() {
                continue;
            }
            if !rt
                .storage
                .acquire_lease(&s.id, &rt.owner, rt.config.lease_ttl)
                .await?
            {
                continue; // another live process runs it
            }
            let fresh = rt.storage.get_session(&s.id).await?;
            if fresh.status == SessionStatus::Running {
                close_interrupted(&rt, &fresh, false).await?;
                recovered += 1;
            }
            rt.storage.release_lease(&s.id, &rt.owner).await?;
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(recovered),
        }
    }
}

/// `cancel` of the facade.
pub(super) async fn cancel(rt: Arc<Inner>, session_id: &str) -> Result<CancelOutcome> {
    let session = rt.storage.get_session(session_id).await?;
    if let Some(t) = rt.hubs.running(session_id) {
        super::stop_turn(&t).await;
        return Ok(CancelOutcome::Cancelled);
    }
    if session.status == SessionStatus::Idle {
        return Ok(CancelOutcome::Idle);
    }
    let running = take_session(&rt, session_id).await?;
    let session = rt.storage.get_session(session_id).await?;
    let mut turn = Turn::new(rt.clone(), session, running.cancel.clone());
    let result = turn.finish(Err(cancelled())).await;
    give_back(&rt, session_id).await;
    if let Ok(events) = &result {
        rt.hubs.publish(session_id, events);
    }
    result.map(|_| CancelOutcome::Cancelled)
}

/// Turns the "paused after a decision" marker into the stream of what was committed.
fn paused_stream(rt: &Arc<Inner>, session_id: &str, e: &Error) -> Option<EventStream> {
    match e {
        Error::Internal(m) => m
            .strip_prefix(PAUSED_PREFIX)
            .and_then(|n| n.parse::<u64>().ok())
            .map(|first| {
                EventStream::new(
                    rt.storage.clone(),
                    rt.hubs.clone(),
                    session_id,
                    first.saturating_sub(1),
                    Follow::UntilDone,
                )
            }),
        _ => None,
    }
}
