//! Talking to the model within a turn: stream an answer (tokens become events as they arrive),
//! and help weak models — a tool call written as JSON text is recognised, and a backend that
//! ignores `tool_choice: auto` gets a forced "next step" choice followed by a forced tool call.
//! The routing call gets its own short first-byte deadline; a prompt the model server refuses as
//! too long is trimmed and tried once more.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tracing::warn;

use super::{Turn, cancelled, chat, handed_over, to_chat};
use crate::agent::AgentDefinition;
use crate::context::{Window, build_window};
use crate::error::{Error, Result};
use crate::llm::{
    ChatRequest, ChatRole, ChatToolCall, Chunk, ChunkStream, Completion, FinishReason, ToolCallAssembler,
    ToolChoice,
};
use crate::orchestrator::routing::{ROUTE_TOOL, RouterFailure};
use crate::protocol::{AssistantMessage, EventPayload, ToolSpec};
use crate::session::Usage;
use crate::storage::Commit;
use crate::telemetry::{CallKind, ChatOutcome, ChatSpan, within};

/// At most this many token events go into one commit.
const MAX_TOKENS_PER_COMMIT: usize = 64;

/// The name of the forced choice offered to models that cannot pick tools on their own.
pub(super) const NEXT_STEP_TOOL: &str = "next_step";
const ANSWER: &str = "answer";

/// What one model call (or forced sequence) produced.
pub(super) struct Answer {
    pub text: String,
    pub calls: Vec<ChatToolCall>,
    pub usage: Usage,
}

/// What a streaming answer has gathered so far.
#[derive(Default)]
struct Partial {
    text: String,
    assembler: ToolCallAssembler,
    /// The usage the model server reported, if it did.
    reported: Option<Usage>,
    /// Token events not stored yet.
    tokens: Vec<EventPayload>,
}

impl Partial {
    /// Takes in one chunk; `Ok(true)` at the stream's end (`None`).
    fn take(&mut self, chunk: Option<Result<Chunk>>, finish: &mut Option<FinishReason>) -> Result<bool> {
        match chunk {
            None => return Ok(true),
            // Once part of the answer was streamed, trimming and asking again would repeat it.
            Some(Err(Error::ContextTooLarge(m))) if !self.text.is_empty() || !self.assembler.is_empty() => {
                return Err(Error::Llm(m));
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(Chunk::Text(t))) if !t.is_empty() => {
                self.text.push_str(&t);
                self.tokens
                    .push(EventPayload::AssistantMessage(AssistantMessage::Token {
                        token: t,
                    }));
            }
            Some(Ok(Chunk::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            })) => self
                .assembler
                .push(index, id.as_deref(), name.as_deref(), &arguments),
            Some(Ok(Chunk::Usage(u))) => self.reported = Some(u),
            Some(Ok(Chunk::Finish(f))) => *finish = Some(f),
            Some(Ok(_)) => {}
        }
        Ok(false)
    }

    /// The token events not stored yet, as one commit; `None` when there are none.
    fn burst(&mut self) -> Option<Commit> {
        (!self.tokens.is_empty()).then(|| Commit {
            events: std::mem::take(&mut self.tokens),
            ..Commit::default()
        })
    }
}

/// Takes in `first` and the chunks that are already here after it, up to
/// [`MAX_TOKENS_PER_COMMIT`] tokens: they are committed together, one transaction for a burst,
/// each token still stored before anyone sees it. `Ok(true)` when the stream ended.
fn take_burst(
    stream: &mut ChunkStream,
    first: Option<Result<Chunk>>,
    partial: &mut Partial,
    finish: &mut Option<FinishReason>,
) -> Result<bool> {
    let mut next = first;
    loop {
        if partial.take(next, finish)? {
            return Ok(true);
        }
        if partial.tokens.len() >= MAX_TOKENS_PER_COMMIT {
            return Ok(false);
        }
        match stream.next().now_or_never() {
            Some(c) => next = c,
            None => return Ok(false),
        }
    }
}

impl Turn {
    /// One model step over the newest messages that fit `agent`'s window. When the model server
    /// refuses the prompt as longer than its context, the window is halved and the step tried
    /// once more; a second refusal ends the turn with `CONTEXT_TOO_LARGE` naming the context size.
    /// The budgets are asked first, with the prompt's tokens: `None` when one paused the turn;
    /// otherwise `max_tokens` is capped to the tokens that remain.
    pub(super) async fn ask_within_window(
        &mut self,
        agent: &AgentDefinition,
    ) -> Result<Option<(Answer, Window)>> {
        let offer = self.rt.offer(agent);
        let mut limits = offer.limits;
        // This process usually saw the session's newest messages committed (by this turn or the
        // previous one): read the store only when it did not.
        let recent = match self.rt.hubs.recent.get(&self.session, limits.max_messages) {
            Some(known) => known,
            None => {
                let read = self
                    .rt
                    .storage
                    .recent_messages(self.id(), limits.max_messages)
                    .await?;
                self.rt.hubs.recent.put(&self.session, limits.max_messages, &read);
                read
            }
        };
        let mut trimmed = false;
        loop {
            let window = match build_window(self.rt.tokenizer.as_ref(), limits, &agent.system_prompt, &recent)
            {
                Err(Error::ContextTooLarge(m)) if trimmed => {
                    return Err(self.too_long(&format!("trimmed to fit, {m}")));
                }
                other => other?,
            };
            let mut messages = vec![chat(ChatRole::System, agent.system_prompt.clone())];
            messages.extend(window.messages.iter().map(to_chat));
            let mut req = ChatRequest {
                messages,
                tools: offer.tools.clone(),
                tool_choice: ToolChoice::Auto,
                temperature: self.rt.config.temperature,
                max_tokens: self.rt.config.llm.max_tokens,
            };
            let prompt = self.count_usage_with(&req, offer.tool_tokens, "", &[]);
            if !self.gate_call(&mut req, prompt).await? {
                return Ok(None);
            }
            match self.ask_model(req).await {
                Err(Error::ContextTooLarge(why)) if trimmed => {
                    return Err(self.too_long(&format!(
                        "it refused again with the window trimmed to {} tokens: {why}",
                        window.tokens
                    )));
                }
                Err(Error::ContextTooLarge(why)) => {
                    warn!(%why, window_tokens = window.tokens, "the model server refused the prompt as too long; trying once with half the window");
                    limits.max_tokens = (window.tokens / 2).max(1);
                    trimmed = true;
                }
                other => return other.map(|answer| Some((answer, window))),
            }
        }
    }

    /// The error that ends a turn whose prompt the model server refused even trimmed: what
    /// happened, the model's context size (or that it is unknown) and the settings that fix it.
    fn too_long(&self, what: &str) -> Error {
        let configured = self.rt.config.max_context_tokens;
        let context = match &self.rt.model_context {
            Some(c) => format!(
                "The model's context is {} tokens ({}); lower MAX_CONTEXT_TOKENS (now {configured}) \
                 or serve the model with a larger context",
                c.tokens, c.source
            ),
            None => format!(
                "The model's context size is unknown: set LLM_CONTEXT_TOKENS to it, or lower \
                 MAX_CONTEXT_TOKENS (now {configured})"
            ),
        };
        Error::ContextTooLarge(format!(
            "the model server refused the prompt as longer than its context; {what}. {context}"
        ))
    }

    /// The orchestrator's forced `route` call, whose first byte must come within
    /// `ROUTING_TIMEOUT_SECS` (the rest streams under the backend's own timeouts). The budgets
    /// are asked first, as before an agent's call: `None` when one paused the turn (nothing was
    /// sent); otherwise `max_tokens` is capped at the tokens that remain. Its tokens count toward
    /// the turn's usage. `Err` only when the turn was cancelled or a pause could not be stored.
    pub(super) async fn route_call(
        &mut self,
        system: String,
        user: &str,
        spec: crate::protocol::ToolSpec,
        max_tokens: u32,
    ) -> Result<Option<std::result::Result<String, RouterFailure>>> {
        let mut req = forced_request(system, user, spec, max_tokens);
        let prompt = self.count_usage(&req, "", &[]);
        if !self.gate_call(&mut req, prompt).await? {
            return Ok(None);
        }
        let limit = self.rt.config.routing_timeout;
        let span = self.chat_span(CallKind::Route, &req);
        let started = tokio::select! {
            s = tokio::time::timeout(limit, within(span.as_ref(), self.rt.llm.stream(req.clone()))) => s,
            _ = self.cancel.cancelled() => return Err(cancelled()),
            _ = self.handover.cancelled() => return Err(handed_over()),
        };
        let stream = match started {
            Err(_) => {
                close(span, Err("timeout"));
                return Ok(Some(Err(RouterFailure::NoAnswer(limit))));
            }
            Ok(Err(e)) => {
                close(span, Err(e.code()));
                return Ok(Some(Err(RouterFailure::Failed(e.to_string()))));
            }
            Ok(Ok(stream)) => stream,
        };
        let completed = tokio::select! {
            c = crate::llm::collect(stream) => c,
            _ = self.cancel.cancelled() => return Err(cancelled()),
            _ = self.handover.cancelled() => return Err(handed_over()),
        };
        match completed {
            Ok(c) => {
                let usage = c
                    .usage
                    .unwrap_or_else(|| self.count_usage(&req, &c.text, &c.tool_calls));
                close(span, Ok(outcome(&c, usage)));
                self.add_usage(usage);
                Ok(Some(Ok(arguments_of(&c, ROUTE_TOOL))))
            }
            Err(e) => {
                close(span, Err(e.code()));
                Ok(Some(Err(RouterFailure::Failed(e.to_string()))))
            }
        }
    }

    /// One model step of the loop, in the way the backend can do it.
    pub(super) async fn ask_model(&mut self, req: ChatRequest) -> Result<Answer> {
        let caps = self.rt.llm.capabilities();
        if !req.tools.is_empty() && !caps.auto_tool_choice && caps.named_tool_choice {
            // Such models rarely choose to stop on their own: after a bounded number of tool
            // results since the user's message, they answer.
            let gathered = req
                .messages
                .iter()
                .rev()
                .take_while(|m| m.role != ChatRole::User)
                .filter(|m| m.role == ChatRole::Tool)
                .count();
            if gathered >= self.rt.config.llm.forced_tool_steps as usize {
                let mut answer_req = req;
                answer_req.tools = Arc::from([]);
                return self.stream_answer(answer_req).await;
            }
            return self.choose_then_call(req).await;
        }
        let names: Vec<String> = req.tools.iter().map(|t| t.name.clone()).collect();
        let mut answer = self.stream_answer(req).await?;
        if answer.calls.is_empty()
            && let Some(call) = text_tool_call(&answer.text, &names)
        {
            answer.calls.push(call);
            answer.text.clear();
        }
        Ok(answer)
    }

    /// Streams the model's answer: each text piece is committed as a token event as it arrives.
    async fn stream_answer(&mut self, req: ChatRequest) -> Result<Answer> {
        let span = self.chat_span(CallKind::Step, &req);
        let mut finish = None;
        let answer = self.stream_into(&req, span.as_ref(), &mut finish).await;
        if let Some(span) = span {
            match &answer {
                Ok(a) => span.end(Ok(ChatOutcome {
                    usage: Some(a.usage),
                    finish: finish.as_ref(),
                    output: Some((&a.text, &a.calls)),
                })),
                Err(e) => span.end(Err(e.code())),
            }
        }
        answer
    }

    /// [`Turn::stream_answer`] within its span; `finish` gets why the model stopped.
    async fn stream_into(
        &mut self,
        req: &ChatRequest,
        span: Option<&ChatSpan>,
        finish: &mut Option<FinishReason>,
    ) -> Result<Answer> {
        let mut stream = tokio::select! {
            s = within(span, self.rt.llm.stream(req.clone())) => s?,
            _ = self.cancel.cancelled() => return Err(cancelled()),
            // The answer is cut: the next owner asks again (`turn_resumed` voids what streamed).
            _ = self.handover.cancelled() => return Err(handed_over()),
        };
        let mut partial = Partial::default();
        let mut ended = false;
        let deadline = self.answer_deadline();
        let at_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(at_deadline);
        while !ended {
            let first = tokio::select! {
                c = stream.next() => c,
                _ = self.cancel.cancelled() => return Err(cancelled()),
                _ = self.handover.cancelled() => return Err(handed_over()),
                _ = &mut at_deadline => return Ok(self.cut_at_deadline(req, partial)),
            };
            ended = take_burst(&mut stream, first, &mut partial, finish)?;
            if let Some(burst) = partial.burst() {
                if ended {
                    // The answer is complete: its last tokens are stored with the message.
                    self.defer(burst);
                } else {
                    self.commit(burst, false).await?;
                }
            }
        }
        let calls = partial.assembler.finish();
        let usage = partial
            .reported
            .unwrap_or_else(|| self.count_usage(req, &partial.text, &calls));
        Ok(Answer {
            text: partial.text,
            calls,
            usage,
        })
    }

    /// When the turn's time budget stops a streaming answer, if it has one.
    fn answer_deadline(&self) -> Option<tokio::time::Instant> {
        self.limits().turn_time_secs.and_then(|secs| {
            let left = secs.saturating_mul(1000).saturating_sub(self.active_ms());
            tokio::time::Instant::now().checked_add(std::time::Duration::from_millis(left))
        })
    }

    /// The answer cut by the turn's time budget: what streamed so far is the answer (its tokens
    /// stored with it); calls not complete are dropped.
    fn cut_at_deadline(&mut self, req: &ChatRequest, mut partial: Partial) -> Answer {
        self.cut_by_deadline = true;
        let usage = self.count_usage(req, &partial.text, &[]);
        if let Some(burst) = partial.burst() {
            self.defer(burst);
        }
        Answer {
            text: partial.text,
            calls: vec![],
            usage,
        }
    }

    /// A non-streamed call whose tokens are counted; `None` if cancelled.
    pub(super) async fn complete_counted(
        &mut self,
        kind: CallKind,
        req: &ChatRequest,
    ) -> Option<Result<(Completion, Usage)>> {
        let span = self.chat_span(kind, req);
        let answered = tokio::select! {
            r = within(span.as_ref(), self.rt.llm.complete(req.clone())) => r,
            _ = self.cancel.cancelled() => return None,
            _ = self.handover.cancelled() => return Some(Err(handed_over())),
        };
        let counted = answered.map(|c| {
            let usage = c
                .usage
                .unwrap_or_else(|| self.count_usage(req, &c.text, &c.tool_calls));
            (c, usage)
        });
        match &counted {
            Ok((c, usage)) => close(span, Ok(outcome(c, *usage))),
            Err(e) => close(span, Err(e.code())),
        }
        Some(counted)
    }

    /// For models that ignore `tool_choice: auto`: a forced choice of the next step (a tool or
    /// the answer), then a forced call of the chosen tool, or a streamed answer without tools.
    async fn choose_then_call(&mut self, req: ChatRequest) -> Result<Answer> {
        let names: Vec<String> = req.tools.iter().map(|t| t.name.clone()).collect();
        let mut choose = req.clone();
        choose.tools = Arc::from([next_step_spec(&names)]);
        choose.tool_choice = ToolChoice::Function(NEXT_STEP_TOOL.into());
        choose.temperature = Some(0.0);
        let (chosen, mut usage) = match self.complete_counted(CallKind::Forced, &choose).await {
            None => return Err(cancelled()),
            Some(Err(e)) => return Err(e),
            Some(Ok((c, u))) => (arguments_of(&c, NEXT_STEP_TOOL), u),
        };
        let action = crate::orchestrator::routing::parse_arguments(&chosen)
            .and_then(|v| v.get("action").and_then(Value::as_str).map(str::to_string))
            .filter(|a| names.contains(a));
        if let Some(tool) = action {
            let mut call = req.clone();
            call.tools = (call.tools.iter()).filter(|t| t.name == tool).cloned().collect();
            call.tool_choice = ToolChoice::Function(tool.clone());
            call.temperature = Some(0.0);
            match self.complete_counted(CallKind::Forced, &call).await {
                None => return Err(cancelled()),
                Some(Err(e)) => return Err(e),
                Some(Ok((c, u))) => {
                    usage += u;
                    let arguments = arguments_of(&c, &tool);
                    return Ok(Answer {
                        text: String::new(),
                        calls: vec![ChatToolCall::new("", tool, arguments)],
                        usage,
                    });
                }
            }
        }
        let mut answer_req = req;
        answer_req.tools = Arc::from([]);
        answer_req.tool_choice = ToolChoice::Auto;
        let mut answer = self.stream_answer(answer_req).await?;
        answer.usage += usage;
        Ok(answer)
    }
}

/// A forced call of the function `spec` (`tool_choice` names it) on a system prompt and one
/// user message: the routing call and the plan call.
pub(super) fn forced_request(system: String, user: &str, spec: ToolSpec, max_tokens: u32) -> ChatRequest {
    let name = spec.name.clone();
    ChatRequest {
        messages: vec![
            chat(ChatRole::System, system),
            chat(ChatRole::User, user.to_string()),
        ],
        tools: Arc::from([spec]),
        tool_choice: ToolChoice::Function(name),
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
    }
}

/// Ends a model call's span, if there is one.
fn close(span: Option<ChatSpan>, outcome: std::result::Result<ChatOutcome<'_>, &str>) {
    if let Some(span) = span {
        span.end(outcome);
    }
}

/// A whole completion as its span records it.
fn outcome(c: &Completion, usage: Usage) -> ChatOutcome<'_> {
    ChatOutcome {
        usage: Some(usage),
        finish: Some(&c.finish),
        output: Some((&c.text, &c.tool_calls)),
    }
}

/// The arguments of the forced function `name`: from the structured call, else the text (weak
/// models sometimes write the JSON as text).
pub(super) fn arguments_of(c: &Completion, name: &str) -> String {
    c.tool_calls
        .iter()
        .find(|t| t.name == name)
        .map(|t| t.arguments.clone())
        .unwrap_or_else(|| c.text.clone())
}

/// The forced "what next" function: an enum of the tools and `answer`.
fn next_step_spec(tools: &[String]) -> ToolSpec {
    let mut actions: Vec<&str> = tools.iter().map(String::as_str).collect();
    actions.push(ANSWER);
    ToolSpec {
        name: NEXT_STEP_TOOL.into(),
        description: "Decide the next step: call one of the tools, or answer the user directly.".into(),
        parameters: json!({
            "type": "object",
            "properties": {"action": {"type": "string", "enum": actions}},
            "required": ["action"],
            "additionalProperties": false
        }),
    }
}

/// Recognises a tool call the model wrote as JSON text instead of a structured call:
/// `{"name": ..., "arguments": {...}}` (also `tool`/`function` for the name and
/// `parameters`/`args` for the arguments, or `{"function": {"name", "arguments"}}`), bare or in
/// a Markdown code fence. Only names of offered tools count.
pub(super) fn text_tool_call(text: &str, tools: &[String]) -> Option<ChatToolCall> {
    let t = text.trim();
    let (start, end) = (t.find('{')?, t.rfind('}')?);
    if end < start {
        return None;
    }
    // Only when the text is essentially the JSON (optionally fenced), not prose that quotes some.
    let outside = format!("{}{}", &t[..start], &t[end + 1..]);
    let outside = outside.replace("```json", "").replace("```", "");
    if !outside.trim().is_empty() {
        return None;
    }
    let v: Value = serde_json::from_str(&t[start..=end]).ok()?;
    let v = match v.get("function") {
        Some(f) if f.is_object() => f.clone(),
        _ => v,
    };
    let name = ["name", "tool", "function"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))?;
    if !tools.iter().any(|t| t == name) {
        return None;
    }
    let args = ["arguments", "parameters", "args"]
        .iter()
        .find_map(|k| v.get(*k))
        .cloned()
        .unwrap_or(json!({}));
    let args = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ChatToolCall::new("", name, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<String> {
        vec!["read_file".into(), "list_files".into()]
    }

    #[test]
    fn recognises_json_text_tool_calls() {
        let expected = Some(ChatToolCall::new("", "read_file", r#"{"path":"a.rs"}"#));
        assert_eq!(
            text_tool_call(
                r#"{"name": "read_file", "arguments": {"path": "a.rs"}}"#,
                &tools()
            ),
            expected
        );
        assert_eq!(
            text_tool_call(
                "```json\n{\"tool\": \"read_file\", \"parameters\": {\"path\": \"a.rs\"}}\n```",
                &tools()
            ),
            expected
        );
        assert_eq!(
            text_tool_call(
                r#"{"function": {"name": "read_file", "arguments": "{\"path\":\"a.rs\"}"}}"#,
                &tools()
            ),
            Some(ChatToolCall::new("", "read_file", r#"{"path":"a.rs"}"#))
        );
    }

    #[test]
    fn prose_and_unknown_tools_are_not_calls() {
        assert_eq!(
            text_tool_call(r#"Use {"name": "read_file"} to read."#, &tools()),
            None
        );
        assert_eq!(
            text_tool_call(r#"{"name": "rm_rf", "arguments": {}}"#, &tools()),
            None
        );
        assert_eq!(text_tool_call("just text", &tools()), None);
    }
}
