//! Model backends: the object-safe [`LlmBackend`] trait that streams a chat completion as
//! [`Chunk`]s, the OpenAI-compatible HTTP backend, and (feature `test-utils`) a scripted double.
//!
//! A backend yields text deltas, tool-call deltas (assembled by index with [`ToolCallAssembler`]),
//! usage when the server reports it, and exactly one [`Chunk::Finish`] as the last item. A stream
//! that ends any other way is an [`Error::Llm`], except a refusal of a prompt longer than the
//! model's context: [`Error::ContextTooLarge`], which the engine answers by trimming the window.
//! When [`Completion::usage`] is `None` the server did not report usage and the caller counts
//! tokens itself with its tokenizer (API.md §9.9).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::protocol::ToolSpec;
use crate::session::Usage;

mod breaker;
mod chunk_json;
pub mod openai;
pub mod sse;
pub mod wire;

#[cfg(feature = "test-utils")]
pub mod mock;
#[cfg(feature = "test-utils")]
pub mod model_server;
#[cfg(feature = "test-utils")]
pub mod scripted;

pub use openai::{OpenAiBackend, OpenAiConfig};
#[cfg(feature = "test-utils")]
pub use scripted::{Script, ScriptedBackend};

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatRole {
    /// Instructions (the agent's system prompt).
    System,
    /// The human.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
}

/// A tool call the model made: its id, the tool's name and the raw JSON text of its arguments.
///
/// The arguments stay raw text because models produce invalid JSON at times; the engine validates
/// them and tells the model what was wrong (API.md §5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatToolCall {
    /// The model's id for the call (`""` when the server sent none; the engine assigns one).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments as the model wrote them (JSON text, possibly malformed).
    pub arguments: String,
}

impl ChatToolCall {
    /// A tool call from its parts.
    pub fn new(id: impl Into<String>, name: impl Into<String>, arguments: impl Into<String>) -> Self {
        ChatToolCall {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }
}

/// One message of the conversation sent to a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: ChatRole,
    /// Its text (`""` for an assistant message that only carries tool calls).
    pub content: String,
    /// The tool calls of an assistant message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ChatToolCall>,
    /// For a tool message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    fn plain(role: ChatRole, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::plain(ChatRole::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::plain(ChatRole::User, content)
    }

    /// An assistant message with text only (add calls with [`ChatMessage::with_tool_calls`]).
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::plain(ChatRole::Assistant, content)
    }

    /// An assistant message carrying tool calls (and possibly text before them).
    pub fn assistant_with_tool_calls(content: impl Into<String>, tool_calls: Vec<ChatToolCall>) -> Self {
        Self::plain(ChatRole::Assistant, content).with_tool_calls(tool_calls)
    }

    /// The result of the tool call `tool_call_id`.
    pub fn tool(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            tool_call_id: Some(tool_call_id.into()),
            ..Self::plain(ChatRole::Tool, content)
        }
    }

    /// This message with `tool_calls` set.
    pub fn with_tool_calls(mut self, tool_calls: Vec<ChatToolCall>) -> Self {
        self.tool_calls = tool_calls;
        self
    }
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides.
    #[default]
    Auto,
    /// No tool calls.
    None,
    /// At least one tool call.
    Required,
    /// A call to this function (the only reliable way with weak servers, see [`Capabilities`]).
    Function(String),
}

/// One chat completion request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation, system prompt first.
    pub messages: Vec<ChatMessage>,
    /// The tools offered (none: no `tools` field is sent). Shared: an agent's offer is built once
    /// and every model call points at it.
    #[serde(default, with = "shared_tools")]
    pub tools: Arc<[ToolSpec]>,
    /// Whether and which tool the model must call (sent only when tools are offered).
    #[serde(default)]
    pub tool_choice: ToolChoice,
    /// Sampling temperature; `None` leaves the server's default.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Cap on generated tokens; `None` leaves the server's default.
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

impl ChatRequest {
    /// A request for these messages with no tools and server defaults.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        ChatRequest {
            messages,
            ..ChatRequest::default()
        }
    }

    /// This request offering `tools`.
    pub fn with_tools(mut self, tools: impl Into<Arc<[ToolSpec]>>) -> Self {
        self.tools = tools.into();
        self
    }

    /// This request with `tool_choice`.
    pub fn with_tool_choice(mut self, tool_choice: ToolChoice) -> Self {
        self.tool_choice = tool_choice;
        self
    }

    /// This request with a temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// This request with a cap on generated tokens.
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }
}

/// `ChatRequest::tools` as a plain list on the wire.
mod shared_tools {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::protocol::ToolSpec;

    pub fn serialize<S: Serializer>(tools: &Arc<[ToolSpec]>, s: S) -> Result<S::Ok, S::Error> {
        tools.as_ref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[ToolSpec]>, D::Error> {
        Vec::<ToolSpec>::deserialize(d).map(Arc::from)
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural end of the answer.
    Stop,
    /// The model asked for tool calls.
    ToolCalls,
    /// The token cap was reached.
    Length,
    /// The server filtered the answer.
    ContentFilter,
    /// Anything else the server said.
    Other(String),
}

impl FinishReason {
    /// The reason for a wire `finish_reason` string (`function_call` is the legacy `tool_calls`).
    pub fn from_wire(reason: &str) -> Self {
        match reason {
            "stop" | "eos" => FinishReason::Stop,
            "tool_calls" | "function_call" => FinishReason::ToolCalls,
            "length" => FinishReason::Length,
            "content_filter" => FinishReason::ContentFilter,
            other => FinishReason::Other(other.to_string()),
        }
    }
}

/// One piece of a streamed completion.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// A piece of the answer's text.
    Text(String),
    /// A piece of the tool call at `index`: `id` and `name` may come once or be repeated (join only
    /// the argument pieces, see [`ToolCallAssembler`]).
    ToolCallDelta {
        /// Which call of this answer (0-based).
        index: usize,
        /// The call's id, when this piece carries it.
        id: Option<String>,
        /// The tool's name, when this piece carries it.
        name: Option<String>,
        /// A piece of the arguments' JSON text (possibly empty).
        arguments: String,
    },
    /// Token usage reported by the server (the last one wins).
    Usage(Usage),
    /// The end of the answer; always the last item of a successful stream.
    Finish(FinishReason),
}

/// The stream [`LlmBackend::stream`] returns.
pub type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<Chunk>> + Send>>;

/// What a model server can be trusted with. Weak servers (llama-cpp-python) ignore tools under
/// `tool_choice: auto` but honour a named function; the engine adapts its requests to these flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Tools offered with `tool_choice: "auto"` are actually used.
    pub auto_tool_choice: bool,
    /// `tool_choice: {"type": "function", ...}` forces a call to that function.
    pub named_tool_choice: bool,
    /// The model may return several tool calls in one answer.
    pub parallel_tool_calls: bool,
    /// The server sends a usage chunk when asked with `stream_options.include_usage`.
    pub usage_reporting: bool,
}

impl Default for Capabilities {
    /// Everything supported (OpenAI and good servers).
    fn default() -> Self {
        Capabilities {
            auto_tool_choice: true,
            named_tool_choice: true,
            parallel_tool_calls: true,
            usage_reporting: true,
        }
    }
}

impl Capabilities {
    /// Parses `full`, `llama-cpp-python`, or a comma list of the capabilities that hold
    /// (`auto_tool_choice,named_tool_choice,parallel_tool_calls,usage_reporting`; the rest are off).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "full" | "openai" => return Some(Capabilities::default()),
            "llama-cpp-python" | "llama_cpp_python" => return Some(Capabilities::llama_cpp_python()),
            _ => {}
        }
        let mut c = Capabilities {
            auto_tool_choice: false,
            named_tool_choice: false,
            parallel_tool_calls: false,
            usage_reporting: false,
        };
        for flag in s
            .split(',')
            .map(|f| f.trim().to_ascii_lowercase())
            .filter(|f| !f.is_empty())
        {
            match flag.as_str() {
                "auto_tool_choice" => c.auto_tool_choice = true,
                "named_tool_choice" => c.named_tool_choice = true,
                "parallel_tool_calls" => c.parallel_tool_calls = true,
                "usage_reporting" => c.usage_reporting = true,
                _ => return None,
            }
        }
        Some(c)
    }

    /// What llama-cpp-python (0.3.x) really does: named tool choice only, one call, no usage.
    pub fn llama_cpp_python() -> Self {
        Capabilities {
            auto_tool_choice: false,
            named_tool_choice: true,
            parallel_tool_calls: false,
            usage_reporting: false,
        }
    }
}

/// A collected completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The answer's text.
    pub text: String,
    /// The tool calls, in index order.
    pub tool_calls: Vec<ChatToolCall>,
    /// Usage as the server reported it; `None` when it reported none (count locally).
    pub usage: Option<Usage>,
    /// Why the model stopped.
    pub finish: FinishReason,
}

/// A chat model. Object-safe: held as `Arc<dyn LlmBackend>`.
#[async_trait]
pub trait LlmBackend: Send + Sync + std::fmt::Debug {
    /// Streams the completion of `request`. Errors before the first chunk (after the backend's own
    /// retries) come back here; errors after it come as an `Err` item, and end the stream.
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream>;

    /// The whole completion of `request` (collects [`LlmBackend::stream`]).
    async fn complete(&self, request: ChatRequest) -> Result<Completion> {
        collect(self.stream(request).await?).await
    }

    /// What this backend supports.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// The model name, for logs and health.
    fn model(&self) -> &str {
        "unknown"
    }

    /// Whether the backend answers at all (for `GET /health`), within a short deadline of its own.
    async fn health(&self) -> Result<()> {
        Ok(())
    }

    /// The model's context size as its server states it; `Ok(None)` when it does not say (the
    /// default). Asked once, at start-up, to bound the context window.
    async fn context_size(&self) -> Result<Option<ModelContext>> {
        Ok(None)
    }
}

/// How many tokens the model takes in one call (prompt and answer), and who said so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelContext {
    /// The context size in the model's own tokens.
    pub tokens: u64,
    /// Where it was read (`"llama.cpp server's /props n_ctx"`, `"LLM_CONTEXT_TOKENS"`, ...).
    pub source: String,
}

impl ModelContext {
    /// A context of `tokens` read from `source`.
    pub fn new(tokens: u64, source: impl Into<String>) -> Self {
        ModelContext {
            tokens,
            source: source.into(),
        }
    }

    /// The `MAX_CONTEXT_TOKENS` this context allows: three quarters of it. The window is counted
    /// with `o200k_base`, which most local models' tokenizers need more tokens than for the same
    /// text, and the answer needs room too.
    pub fn window_bound(&self) -> usize {
        usize::try_from(self.tokens - self.tokens / 4).unwrap_or(usize::MAX)
    }
}

/// Collects a chunk stream into a [`Completion`]. A stream that ends without [`Chunk::Finish`] is an
/// error: a cut answer must never pass for a short one.
pub async fn collect(mut stream: ChunkStream) -> Result<Completion> {
    let mut text = String::new();
    let mut calls = ToolCallAssembler::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        match chunk? {
            Chunk::Text(piece) => text.push_str(&piece),
            Chunk::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            } => calls.push(index, id.as_deref(), name.as_deref(), &arguments),
            Chunk::Usage(u) => usage = Some(u),
            Chunk::Finish(finish) => {
                return Ok(Completion {
                    text,
                    tool_calls: calls.finish(),
                    usage,
                    finish,
                });
            }
        }
    }
    Err(Error::Llm("stream ended without a finish".to_string()))
}

/// Joins tool-call deltas into whole calls by `index`.
///
/// Some servers repeat the id and the name in every chunk: they are taken from the first chunk that
/// has them (non-empty) and never concatenated; only argument pieces are joined.
///
/// ```
/// use agent_runtime_core::llm::{ChatToolCall, ToolCallAssembler};
///
/// let mut calls = ToolCallAssembler::new();
/// calls.push(0, Some("call_1"), Some("get_weather"), "{\"city\":");
/// calls.push(0, Some("call_1"), Some("get_weather"), " \"Paris\"}");
/// assert_eq!(
///     calls.finish(),
///     vec![ChatToolCall::new("call_1", "get_weather", r#"{"city": "Paris"}"#)]
/// );
/// ```
#[derive(Debug, Clone, Default)]
pub struct ToolCallAssembler {
    calls: BTreeMap<usize, ChatToolCallParts>,
}

#[derive(Debug, Clone, Default)]
struct ChatToolCallParts {
    id: Option<String>,
    name: Option<String>,
    arguments: String,
}

impl ToolCallAssembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one delta of the call at `index`.
    pub fn push(&mut self, index: usize, id: Option<&str>, name: Option<&str>, arguments: &str) {
        let call = self.calls.entry(index).or_default();
        if call.id.is_none() {
            call.id = id.filter(|s| !s.is_empty()).map(str::to_string);
        }
        if call.name.is_none() {
            call.name = name.filter(|s| !s.is_empty()).map(str::to_string);
        }
        call.arguments.push_str(arguments);
    }

    /// Whether no delta was pushed.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The calls in index order; a call without an id gets `""`.
    pub fn finish(self) -> Vec<ChatToolCall> {
        self.calls
            .into_values()
            .map(|c| ChatToolCall {
                id: c.id.unwrap_or_default(),
                name: c.name.unwrap_or_default(),
                arguments: c.arguments,
            })
            .collect()
    }
}

/// Formats a duration as seconds for error messages (`"0.2 s"`, `"60 s"`).
pub(crate) fn secs(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembler_joins_arguments_and_keeps_the_first_id_and_name() {
        let mut a = ToolCallAssembler::new();
        a.push(0, Some("call_1"), Some("get_weather"), "{\"ci");
        a.push(1, None, Some("read_file"), "");
        a.push(0, Some("call_1"), Some("get_weather"), "ty\": \"Paris\"}");
        a.push(1, Some("call_2"), None, "{}");
        a.push(0, Some(""), Some(""), "");
        assert_eq!(
            a.finish(),
            vec![
                ChatToolCall::new("call_1", "get_weather", "{\"city\": \"Paris\"}"),
                ChatToolCall::new("call_2", "read_file", "{}"),
            ]
        );
    }

    #[test]
    fn assembler_gives_an_empty_id_to_a_call_without_one() {
        let mut a = ToolCallAssembler::new();
        a.push(0, None, Some("ls"), "{}");
        assert_eq!(a.finish(), vec![ChatToolCall::new("", "ls", "{}")]);
    }

    #[tokio::test]
    async fn collect_refuses_a_stream_without_finish() {
        let stream: ChunkStream = Box::pin(futures::stream::iter(vec![Ok(Chunk::Text("Hi".into()))]));
        assert_eq!(
            collect(stream).await,
            Err(Error::Llm("stream ended without a finish".to_string()))
        );
    }

    #[test]
    fn seconds_are_formatted_for_humans() {
        assert_eq!(secs(std::time::Duration::from_secs(60)), "60 s");
        assert_eq!(secs(std::time::Duration::from_millis(200)), "0.2 s");
    }
}
