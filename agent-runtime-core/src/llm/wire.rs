//! The OpenAI chat-completions wire: the JSON request body, and the decoding of a streamed answer
//! (SSE bytes → [`Chunk`]s) tolerant of what real servers send; also the reverse, for test servers.
//!
//! Quirks handled: explicit `null` everywhere, a final chunk with empty `choices` and `usage` (plus
//! extras like `timings`), id and name repeated in every tool-call chunk, the legacy
//! `function_call` field (ignored when `tool_calls` is present), an empty body without `[DONE]`.
//! A server refusing a prompt longer than its context is told apart as
//! [`Error::ContextTooLarge`], so the engine can trim the window and try again.

use std::borrow::Cow;
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Value, json};

use super::sse::SseDecoder;
use super::{ChatMessage, ChatRequest, ChatRole, Chunk, FinishReason, ToolChoice};
use crate::error::{Error, Result};
use crate::protocol::ToolSpec;
use crate::session::Usage;

/// The JSON body of `POST /v1/chat/completions` for `request`, streamed, as a [`Value`] (for
/// tests and tools; the backend sends [`request_json`]'s bytes, the same JSON).
pub fn request_body(model: &str, request: &ChatRequest, include_usage: bool) -> Value {
    serde_json::from_slice(&request_json(model, request, include_usage)).unwrap_or(Value::Null)
}

/// The JSON text of `POST /v1/chat/completions` for `request`, streamed, written straight from
/// the request's own fields (no intermediate [`Value`]: the tool schemas are not copied).
///
/// Assistant messages with tool calls carry `content: ""`, never `null` (llama-cpp-python answers
/// 500 to `null`; API.md §9.21). `tools` and `tool_choice` are sent only when tools are offered
/// (OpenAI refuses a `tool_choice` without tools). `stream_options.include_usage` only when
/// `include_usage`.
pub fn request_json(model: &str, request: &ChatRequest, include_usage: bool) -> Vec<u8> {
    write_request(model, request, include_usage, None)
}

/// [`request_json`] with the `tools` array's JSON text already written (`tools_json`, from a
/// [`ToolsJson`]), spliced in rather than written again.
fn write_request(
    model: &str,
    request: &ChatRequest,
    include_usage: bool,
    tools_json: Option<&[u8]>,
) -> Vec<u8> {
    let offered = !request.tools.is_empty();
    // Room for the whole text, so the buffer is not grown and copied on the way.
    let texts: usize = request
        .messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_call_id.as_ref().map_or(0, |id| id.len() + 18)
                + m.tool_calls
                    .iter()
                    .map(|c| c.id.len() + c.name.len() + c.arguments.len() + 64)
                    .sum::<usize>()
                + 48
        })
        .sum();
    let mut out = Vec::with_capacity(model.len() + texts + tools_json.map_or(0, <[u8]>::len) + 160);
    // The same members in the same order as the serde-derived body this replaces (see the tests'
    // `reference`): model, messages, stream, tools, tool_choice, temperature, max_tokens,
    // stream_options; cached tools at the end.
    out.extend_from_slice(b"{\"model\":");
    write_str(&mut out, model);
    out.extend_from_slice(b",\"messages\":[");
    for (i, m) in request.messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_message(&mut out, m);
    }
    out.extend_from_slice(b"],\"stream\":true");
    if offered {
        if tools_json.is_none() {
            out.extend_from_slice(b",\"tools\":");
            // Serializing borrowed strings and `Value`s into a `Vec` cannot fail.
            let _ = serde_json::to_writer(&mut out, &ToolsArray(&request.tools));
        }
        out.extend_from_slice(b",\"tool_choice\":");
        match &request.tool_choice {
            ToolChoice::Auto => out.extend_from_slice(b"\"auto\""),
            ToolChoice::None => out.extend_from_slice(b"\"none\""),
            ToolChoice::Required => out.extend_from_slice(b"\"required\""),
            ToolChoice::Function(name) => {
                out.extend_from_slice(b"{\"type\":\"function\",\"function\":{\"name\":");
                write_str(&mut out, name);
                out.extend_from_slice(b"}}");
            }
        }
    }
    if let Some(t) = request.temperature {
        out.extend_from_slice(b",\"temperature\":");
        // Through the decimal text so 0.2f32 goes out as 0.2, not 0.20000000298023224; serde_json
        // writes the `f64` (and a non-finite one as `null`).
        let _ = serde_json::to_writer(&mut out, &t.to_string().parse().unwrap_or(f64::from(t)));
    }
    if let Some(n) = request.max_tokens {
        out.extend_from_slice(b",\"max_tokens\":");
        crate::protocol::write_decimal(&mut out, u64::from(n));
    }
    if include_usage {
        out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
    }
    if let Some(tools) = tools_json.filter(|_| offered) {
        out.extend_from_slice(b",\"tools\":");
        out.extend_from_slice(tools);
    }
    out.push(b'}');
    out
}

/// One message: `{"role":…,"content":…}`, then `tool_calls` when it has any and `tool_call_id`
/// when it answers one.
fn write_message(out: &mut Vec<u8>, m: &ChatMessage) {
    out.extend_from_slice(match m.role {
        ChatRole::System => b"{\"role\":\"system\",\"content\":",
        ChatRole::User => b"{\"role\":\"user\",\"content\":",
        ChatRole::Assistant => b"{\"role\":\"assistant\",\"content\":",
        ChatRole::Tool => b"{\"role\":\"tool\",\"content\":",
    });
    write_str(out, &m.content);
    if !m.tool_calls.is_empty() {
        out.extend_from_slice(b",\"tool_calls\":[");
        for (i, c) in m.tool_calls.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"id\":");
            write_str(out, &c.id);
            out.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
            write_str(out, &c.name);
            out.extend_from_slice(b",\"arguments\":");
            write_str(out, &c.arguments);
            out.extend_from_slice(b"}}");
        }
        out.push(b']');
    }
    if let Some(id) = &m.tool_call_id {
        out.extend_from_slice(b",\"tool_call_id\":");
        write_str(out, id);
    }
    out.push(b'}');
}

/// `s` as a JSON string, the bytes serde_json writes: `\"`, `\\`, `\b`, `\t`, `\n`, `\f`, `\r`,
/// other control characters as `\u00xx` (lowercase hex), everything else (DEL, U+2028, any
/// non-ASCII) as it is. Runs needing no escape are found eight bytes at a time and copied whole
/// (serde_json looks at each byte through a table: some 5 instructions a byte).
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0;
    let mut at = 0;
    while at < bytes.len() {
        at = plain_until(bytes, at);
        if at == bytes.len() {
            break;
        }
        out.extend_from_slice(&bytes[run..at]);
        let byte = bytes[at];
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
        }
        at += 1;
        run = at;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// The index of the first byte at or after `at` that JSON needs escaped (a control character,
/// `"` or `\`), or `bytes.len()`.
fn plain_until(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    while let Some(word) = bytes.get(at..at + 8) {
        let w = u64::from_ne_bytes(word.try_into().unwrap_or_default());
        // A byte's high bit set in each: below 0x20, equal to `"`, equal to `\` (exact as to
        // whether any byte is; which one is found below).
        let below = w.wrapping_sub(ONES * 0x20) & !w;
        let quote = (w ^ (ONES * 0x22)).wrapping_sub(ONES) & !(w ^ (ONES * 0x22));
        let backslash = (w ^ (ONES * 0x5c)).wrapping_sub(ONES) & !(w ^ (ONES * 0x5c));
        if (below | quote | backslash) & HIGHS != 0 {
            break;
        }
        at += 8;
    }
    while at < bytes.len() && !matches!(bytes[at], 0..=0x1f | b'"' | b'\\') {
        at += 1;
    }
    at
}

/// Each offered tool list's `tools` array as JSON text, written once: an agent's offer is the
/// same `Arc` on every model call (`Orchestrator` builds it once), so its schemas are not walked
/// and escaped again for every request. A list is known by its allocation, which the `Weak` held
/// here keeps from being reused; lists no longer offered anywhere are dropped.
#[derive(Debug, Default)]
pub(crate) struct ToolsJson {
    known: std::sync::Mutex<Vec<KnownTools>>,
}

/// A tool list (held weakly) and its `tools` array's JSON text.
type KnownTools = (Weak<[ToolSpec]>, Arc<[u8]>);

/// Tool lists remembered at most (the five agents' offers, with room for MCP changes).
const TOOLS_JSON_KEPT: usize = 16;

impl ToolsJson {
    /// The JSON body of `request` (see [`request_json`]).
    pub(crate) fn request_json(&self, model: &str, request: &ChatRequest, include_usage: bool) -> Vec<u8> {
        if request.tools.is_empty() {
            return write_request(model, request, include_usage, None);
        }
        let tools = self.of(&request.tools);
        write_request(model, request, include_usage, Some(&tools))
    }

    fn of(&self, tools: &Arc<[ToolSpec]>) -> Arc<[u8]> {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, json)) = known
            .iter()
            .find(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(tools)))
        {
            return json.clone();
        }
        known.retain(|(w, _)| w.strong_count() > 0);
        if known.len() >= TOOLS_JSON_KEPT {
            known.remove(0);
        }
        let json: Arc<[u8]> = serde_json::to_vec(&ToolsArray(tools)).unwrap_or_default().into();
        known.push((Arc::downgrade(tools), json.clone()));
        json
    }
}

struct ToolsArray<'a>(&'a [ToolSpec]);

impl Serialize for ToolsArray<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        tools(&Some(self.0), s)
    }
}

/// `{"type": "function", "function": …}`, the wrapper of a call and of a tool.
#[derive(Serialize)]
struct Function<T> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: T,
}

fn function<T>(function: T) -> Function<T> {
    Function {
        kind: "function",
        function,
    }
}

#[derive(Serialize)]
struct ToolFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a Value,
}

fn tools<S: Serializer>(t: &Option<&[ToolSpec]>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(t.unwrap_or_default().iter().map(|t| {
        function(ToolFunction {
            name: &t.name,
            description: &t.description,
            parameters: &t.parameters,
        })
    }))
}

/// The serde-derived body [`write_request`] replaced, kept as the reference its bytes are
/// compared with.
#[cfg(test)]
mod reference {
    use super::*;
    use crate::llm::ChatToolCall;

    pub(super) fn request_json(
        model: &str,
        request: &ChatRequest,
        include_usage: bool,
        tools_json: Option<&[u8]>,
    ) -> Vec<u8> {
        let offered = !request.tools.is_empty();
        let body = Body {
            model,
            messages: &request.messages,
            stream: true,
            tools: offered
                .then_some(&request.tools[..])
                .filter(|_| tools_json.is_none()),
            tool_choice: offered.then_some(Choice(&request.tool_choice)),
            temperature: request
                .temperature
                .map(|t| t.to_string().parse().unwrap_or(f64::from(t))),
            max_tokens: request.max_tokens,
            stream_options: include_usage.then_some(StreamOptions { include_usage: true }),
        };
        let mut out = serde_json::to_vec(&body).unwrap();
        if let Some(tools) = tools_json.filter(|_| offered)
            && out.pop() == Some(b'}')
        {
            out.extend_from_slice(b",\"tools\":");
            out.extend_from_slice(tools);
            out.push(b'}');
        }
        out
    }

    #[derive(Serialize)]
    struct Body<'a> {
        model: &'a str,
        #[serde(serialize_with = "messages")]
        messages: &'a [ChatMessage],
        stream: bool,
        #[serde(skip_serializing_if = "Option::is_none", serialize_with = "tools")]
        tools: Option<&'a [ToolSpec]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_choice: Option<Choice<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        temperature: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        max_tokens: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stream_options: Option<StreamOptions>,
    }

    #[derive(Serialize)]
    struct StreamOptions {
        include_usage: bool,
    }

    #[derive(Serialize)]
    struct WireMessage<'a> {
        role: ChatRole,
        content: &'a str,
        #[serde(skip_serializing_if = "<[_]>::is_empty", serialize_with = "calls")]
        tool_calls: &'a [ChatToolCall],
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_call_id: Option<&'a str>,
    }

    #[derive(Serialize)]
    struct WireCall<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'static str,
        function: CallFunction<'a>,
    }

    #[derive(Serialize)]
    struct CallFunction<'a> {
        name: &'a str,
        arguments: &'a str,
    }

    #[derive(Serialize)]
    struct Named<'a> {
        name: &'a str,
    }

    fn messages<S: Serializer>(m: &&[ChatMessage], s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(m.iter().map(|m| WireMessage {
            role: m.role,
            content: &m.content,
            tool_calls: &m.tool_calls,
            tool_call_id: m.tool_call_id.as_deref(),
        }))
    }

    fn calls<S: Serializer>(c: &&[ChatToolCall], s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(c.iter().map(|c| WireCall {
            id: &c.id,
            kind: "function",
            function: CallFunction {
                name: &c.name,
                arguments: &c.arguments,
            },
        }))
    }

    struct Choice<'a>(&'a ToolChoice);

    impl Serialize for Choice<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            match self.0 {
                ToolChoice::Auto => s.serialize_str("auto"),
                ToolChoice::None => s.serialize_str("none"),
                ToolChoice::Required => s.serialize_str("required"),
                ToolChoice::Function(name) => function(Named { name }).serialize(s),
            }
        }
    }
}

// The chunk as decoded: by [`super::chunk_json::parse`] for the common shapes, by serde for the
// rest (both give the same value; strings are borrowed from the event's data where they can be).

#[derive(Debug, Default, PartialEq, Deserialize)]
pub(super) struct WireChunk<'a> {
    #[serde(default)]
    pub(super) choices: Option<Vec<WireChoice<'a>>>,
    #[serde(default)]
    pub(super) usage: Option<WireUsage>,
    #[serde(default)]
    pub(super) error: Option<Value>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct WireChoice<'a> {
    #[serde(default)]
    pub(super) index: Option<usize>,
    #[serde(default)]
    pub(super) delta: Option<WireDelta<'a>>,
    #[serde(default)]
    pub(super) finish_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct WireDelta<'a> {
    #[serde(default)]
    pub(super) content: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) tool_calls: Option<Vec<WireToolCall<'a>>>,
    #[serde(default)]
    pub(super) function_call: Option<WireFunction<'a>>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct WireToolCall<'a> {
    #[serde(default)]
    pub(super) index: Option<usize>,
    #[serde(default)]
    pub(super) id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) function: Option<WireFunction<'a>>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct WireFunction<'a> {
    #[serde(default)]
    pub(super) name: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) arguments: Option<Cow<'a, str>>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct WireUsage {
    #[serde(default)]
    pub(super) prompt_tokens: Option<u64>,
    #[serde(default)]
    pub(super) completion_tokens: Option<u64>,
    #[serde(default)]
    pub(super) prompt_tokens_details: Option<WirePromptDetails>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct WirePromptDetails {
    #[serde(default)]
    pub(super) cached_tokens: Option<u64>,
}

/// A chunk's JSON: the fast reader for the shapes it knows, serde for everything else (and for
/// every error, so its messages are serde's).
pub(super) fn parse_chunk(data: &str) -> serde_json::Result<WireChunk<'_>> {
    match super::chunk_json::parse(data) {
        Some(chunk) => Ok(chunk),
        None => serde_json::from_str(data),
    }
}

/// What an empty `200` event stream means: llama-cpp-python answers so when the prompt is longer
/// than its context (its log says `Requested tokens (N) exceed context window of M`).
pub const EMPTY_STREAM: &str = "the model server sent an empty stream (no [DONE] or finish_reason), \
     which is how llama-cpp-python refuses a prompt longer than its context";

/// Whether a model server's error text (message, `code` or `type`) says the prompt does not fit
/// its context: OpenAI's and vLLM's `context_length_exceeded` / "maximum context length",
/// llama.cpp's `exceed_context_size_error`, llama-cpp-python's "exceed context window".
pub fn is_context_overflow(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "context_length_exceeded",
        "maximum context length",
        "exceed_context_size",
        "exceeds the available context",
        "exceed context window",
        "context window of",
        "context length exceeded",
        "prompt is too long",
    ]
    .iter()
    .any(|p| t.contains(p))
}

/// Decodes a streamed chat completion: body bytes in, [`Chunk`]s out.
///
/// The finish is held back until `[DONE]` or the end of the body (the usage chunk comes after the
/// `finish_reason` on the wire) and is always the last chunk. A body that ends with neither
/// `[DONE]` nor a `finish_reason` is an error: a cut answer must not pass for a short one.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    sse: SseDecoder,
    answer: AnswerState,
}

/// What the chunks decoded so far said about the answer's end.
#[derive(Debug, Default)]
struct AnswerState {
    finish: Option<FinishReason>,
    saw_tool_calls: bool,
    done: bool,
}

impl ChunkDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// `[DONE]` came: the answer is complete and the rest of the body can be ignored.
    pub fn is_done(&self) -> bool {
        self.answer.done
    }

    /// A `finish_reason` came (the answer is complete even if `[DONE]` never does).
    pub fn has_finish(&self) -> bool {
        self.answer.finish.is_some()
    }

    /// Feeds a piece of the body; returns the chunks it completed. Each event's JSON is parsed
    /// where the SSE decoder holds it; events after `[DONE]` or an error are skipped.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Chunk>> {
        let mut out = Vec::new();
        if self.answer.done {
            return Ok(out);
        }
        let (answer, mut result) = (&mut self.answer, Ok(()));
        self.sse.push_data(bytes, |data| {
            if result.is_ok() && !answer.done {
                result = answer.on_data(data, &mut out);
            }
        });
        result.map(|()| out)
    }

    /// The end of the body: the held-back finish, or an error when the answer was cut.
    pub fn finish(&mut self) -> Result<Vec<Chunk>> {
        let mut out = Vec::new();
        if self.answer.done {
            return Ok(out);
        }
        let (answer, mut result) = (&mut self.answer, Ok(()));
        self.sse.finish_data(|data| {
            if result.is_ok() && !answer.done {
                result = answer.on_data(data, &mut out);
            }
        });
        result?;
        if self.answer.done {
            return Ok(out);
        }
        match self.answer.finish.take() {
            Some(reason) => {
                self.answer.done = true;
                out.push(Chunk::Finish(reason));
                Ok(out)
            }
            None if self.sse.bytes_seen() == 0 => Err(Error::ContextTooLarge(EMPTY_STREAM.to_string())),
            None => Err(Error::Llm(
                "stream ended without [DONE] or finish_reason".to_string(),
            )),
        }
    }
}

impl AnswerState {
    fn on_data(&mut self, data: &str, out: &mut Vec<Chunk>) -> Result<()> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(());
        }
        if data == "[DONE]" {
            self.done = true;
            let reason = self.finish.take().unwrap_or(FinishReason::Stop);
            out.push(Chunk::Finish(self.normalize(reason)));
            return Ok(());
        }
        let chunk = parse_chunk(data)
            .map_err(|e| Error::Llm(format!("invalid JSON in stream: {e}: {}", excerpt(data, 200))))?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string());
            let code = error.get("code").and_then(Value::as_str).unwrap_or_default();
            if is_context_overflow(code) || is_context_overflow(&message) {
                return Err(Error::ContextTooLarge(format!(
                    "the model server refused the prompt as longer than its context: {message}"
                )));
            }
            return Err(Error::Llm(format!("model server error: {message}")));
        }
        // Only the first choice is ours (we never ask for n > 1).
        let choice = chunk
            .choices
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.index.unwrap_or(0) == 0);
        if let Some(choice) = choice {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.push(Chunk::Text(text.into_owned()));
                }
                match delta.tool_calls {
                    Some(calls) => {
                        for (position, call) in calls.into_iter().enumerate() {
                            let function = call.function.unwrap_or(WireFunction {
                                name: None,
                                arguments: None,
                            });
                            self.saw_tool_calls = true;
                            out.push(Chunk::ToolCallDelta {
                                index: call.index.unwrap_or(position),
                                id: call.id.map(Cow::into_owned),
                                name: function.name.map(Cow::into_owned),
                                arguments: function.arguments.map(Cow::into_owned).unwrap_or_default(),
                            });
                        }
                    }
                    // The legacy single-call field, only when the modern one is absent.
                    None => {
                        if let Some(f) = delta.function_call {
                            self.saw_tool_calls = true;
                            out.push(Chunk::ToolCallDelta {
                                index: 0,
                                id: None,
                                name: f.name.map(Cow::into_owned),
                                arguments: f.arguments.map(Cow::into_owned).unwrap_or_default(),
                            });
                        }
                    }
                }
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                self.finish = Some(FinishReason::from_wire(&reason));
            }
        }
        if let Some(u) = chunk.usage {
            out.push(Chunk::Usage(Usage {
                prompt_tokens: u.prompt_tokens.unwrap_or(0),
                completion_tokens: u.completion_tokens.unwrap_or(0),
                cached_prompt_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            }));
        }
        Ok(())
    }

    /// Some servers say `stop` after streaming tool calls; the calls are what matters.
    fn normalize(&self, reason: FinishReason) -> FinishReason {
        if self.saw_tool_calls && reason == FinishReason::Stop {
            FinishReason::ToolCalls
        } else {
            reason
        }
    }
}

/// Decodes a whole body at once (for tests and tools): every chunk, or the first error.
pub fn decode_body(body: &[u8]) -> Result<Vec<Chunk>> {
    let mut decoder = ChunkDecoder::new();
    let mut chunks = decoder.push(body)?;
    chunks.extend(decoder.finish()?);
    Ok(chunks)
}

/// The first `max` characters of `text`, marked when cut.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Encodes chunks as an OpenAI SSE body, as a real server streams them (one `data:` event per chunk,
/// usage in a final chunk with empty `choices`, then `[DONE]` when the chunks end with a finish).
/// Test servers use it to serve arbitrary answers.
pub fn encode_sse(model: &str, chunks: &[Chunk]) -> String {
    let mut body = String::new();
    let mut event = |v: Value| {
        body.push_str("data: ");
        body.push_str(&v.to_string());
        body.push_str("\n\n");
    };
    let frame = |delta: Value, finish: Option<&str>| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    event(frame(json!({"role": "assistant", "content": null}), None));
    let mut finished = false;
    for chunk in chunks {
        match chunk {
            Chunk::Text(t) => event(frame(json!({"content": t}), None)),
            Chunk::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            } => {
                let mut call = json!({"index": index, "function": {"arguments": arguments}});
                if let Some(id) = id {
                    call["id"] = json!(id);
                    call["type"] = json!("function");
                }
                if let Some(name) = name {
                    call["function"]["name"] = json!(name);
                }
                event(frame(json!({"tool_calls": [call]}), None));
            }
            Chunk::Usage(u) => event(json!({
                "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [],
                "usage": usage_json(u),
            })),
            Chunk::Finish(reason) => {
                let reason = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::ToolCalls => "tool_calls",
                    FinishReason::Length => "length",
                    FinishReason::ContentFilter => "content_filter",
                    FinishReason::Other(other) => other.as_str(),
                };
                event(frame(json!({}), Some(reason)));
                finished = true;
            }
        }
    }
    if finished {
        body.push_str("data: [DONE]\n\n");
    }
    body
}

/// A usage as OpenAI-compatible servers report it (cached tokens in `prompt_tokens_details`).
fn usage_json(u: &Usage) -> Value {
    let mut v = json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                       "total_tokens": u.prompt_tokens + u.completion_tokens});
    if u.cached_prompt_tokens > 0 {
        v["prompt_tokens_details"] = json!({"cached_tokens": u.cached_prompt_tokens});
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ChatToolCall;

    fn offered() -> Arc<[ToolSpec]> {
        Arc::from(vec![ToolSpec {
            name: "read_file".into(),
            description: "Reads a \"file\"".into(),
            parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
        }])
    }

    #[test]
    fn a_request_whose_tools_were_written_once_is_the_same_json() {
        let history = vec![
            ChatMessage::system("be brief"),
            ChatMessage::user("read a"),
            ChatMessage::assistant_with_tool_calls(
                "",
                vec![ChatToolCall::new("c1", "read_file", r#"{"path":"a"}"#)],
            ),
            ChatMessage::tool("c1", "A"),
        ];
        let req = ChatRequest::new(history)
            .with_tools(offered())
            .with_temperature(0.2)
            .with_max_tokens(5);
        let expected = json!({
            "model": "m",
            "stream": true,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "read a"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}}]},
                {"role": "tool", "content": "A", "tool_call_id": "c1"},
            ],
            "tools": [{"type": "function", "function": {
                "name": "read_file", "description": "Reads a \"file\"",
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}],
            "tool_choice": "auto",
            "temperature": 0.2,
            "max_tokens": 5,
            "stream_options": {"include_usage": true},
        });
        assert_eq!(request_body("m", &req, true), expected);
        let cache = ToolsJson::default();
        for _ in 0..2 {
            let cached: Value = serde_json::from_slice(&cache.request_json("m", &req, true)).unwrap();
            assert_eq!(cached, expected);
        }
        // Another list with the same tools is another entry, with the same text.
        let again = req.clone().with_tools(offered());
        let cached: Value = serde_json::from_slice(&cache.request_json("m", &again, true)).unwrap();
        assert_eq!(cached, expected);
        assert_eq!(cache.known.lock().unwrap().len(), 2);
        // Without tools: neither `tools` nor `tool_choice`.
        let bare = ChatRequest::new(vec![ChatMessage::user("hi")]);
        let cached: Value = serde_json::from_slice(&cache.request_json("m", &bare, false)).unwrap();
        assert_eq!(
            cached,
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
        );
    }

    /// Texts with every kind of escape, at every offset within an eight-byte word.
    fn awkward_texts() -> Vec<String> {
        let mut texts: Vec<String> = [
            "",
            "plain words, long enough to fill several eight-byte words of text",
            "Проект 🚀 日本語 ünïcödé",
            "quote \" backslash \\ slash / DEL \u{7f}",
            "controls \u{0}\u{1}\u{8}\t\n\u{b}\u{c}\r\u{e}\u{1b}\u{1f} end",
            "\u{2028}\u{2029}\u{feff}\u{10ffff}",
            "{\"path\":\"a\\b\"}",
            "\"\"\"\\\\\n\n",
        ]
        .map(String::from)
        .to_vec();
        for b in 0u8..0x80 {
            for pad in 0..9 {
                texts.push(format!(
                    "{}{}{}",
                    "x".repeat(pad),
                    char::from(b),
                    "y".repeat(9 - pad)
                ));
            }
        }
        texts
    }

    #[test]
    fn a_string_is_written_with_the_bytes_serde_json_writes() {
        for text in awkward_texts() {
            let mut out = b"prefix".to_vec();
            write_str(&mut out, &text);
            let expected = [b"prefix".to_vec(), serde_json::to_vec(&text).unwrap()].concat();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }

    #[test]
    fn a_request_written_directly_is_byte_identical_to_the_serde_body() {
        let texts = awkward_texts();
        let choices = [
            ToolChoice::Auto,
            ToolChoice::None,
            ToolChoice::Required,
            ToolChoice::Function("read_\"file\"\n".into()),
        ];
        let temperatures = [
            None,
            Some(0.0),
            Some(0.2),
            Some(1.5),
            Some(-0.0),
            Some(f32::NAN),
            Some(f32::INFINITY),
        ];
        let max_tokens = [None, Some(0), Some(7), Some(u32::MAX)];
        let tools_json = serde_json::to_vec(&ToolsArray(&offered())).unwrap();
        let mut cases = 0;
        for (i, text) in texts.iter().enumerate().step_by(7) {
            let history = [
                ChatMessage::system(text.as_str()),
                ChatMessage::user(text.as_str()),
                ChatMessage::assistant(text.as_str()),
                ChatMessage::assistant_with_tool_calls(
                    text.as_str(),
                    vec![
                        ChatToolCall::new(text.as_str(), text.as_str(), text.as_str()),
                        ChatToolCall::new("c2", "ls", "{}"),
                    ],
                ),
                ChatMessage::tool(text.as_str(), text.as_str()),
            ];
            let mut req = ChatRequest::new(history[..(i % 6).max(1)].to_vec());
            req.temperature = temperatures[i % temperatures.len()];
            req.max_tokens = max_tokens[i % max_tokens.len()];
            for model in ["m", text.as_str()] {
                for include_usage in [false, true] {
                    for tools in [false, true] {
                        let mut req = req.clone();
                        if tools {
                            req = req.with_tools(offered());
                            req.tool_choice = choices[i % choices.len()].clone();
                        }
                        for cached in [None, Some(&tools_json[..])] {
                            let written = write_request(model, &req, include_usage, cached);
                            let reference = reference::request_json(model, &req, include_usage, cached);
                            assert_eq!(
                                String::from_utf8(written).unwrap(),
                                String::from_utf8(reference).unwrap()
                            );
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 2 * 2 * 2 * 2 * texts.len().div_ceil(7));
    }

    #[test]
    fn tool_lists_no_longer_offered_are_forgotten() {
        let cache = ToolsJson::default();
        let req = ChatRequest::new(vec![ChatMessage::user("hi")]);
        for _ in 0..3 {
            // Each request's list is dropped with it.
            let _ = cache.request_json("m", &req.clone().with_tools(offered()), false);
        }
        assert_eq!(cache.known.lock().unwrap().len(), 1);
    }

    #[test]
    fn usage_after_the_finish_comes_before_the_finish_chunk() {
        let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n\
                    data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1},\"timings\":{}}\n\n\
                    data: [DONE]\n\n";
        assert_eq!(
            decode_body(body.as_bytes()).unwrap(),
            vec![
                Chunk::Text("Hi".into()),
                Chunk::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 1,
                    ..Default::default()
                }),
                Chunk::Finish(FinishReason::Stop),
            ]
        );
    }

    #[test]
    fn a_llama_cpp_python_stream_with_escaped_text_and_a_tool_call_decodes_whole() {
        let body = "data: {\"id\": \"c\", \"object\": \"chat.completion.chunk\", \"created\": 1, \"model\": \"m\", \"choices\": [{\"index\": 0, \"delta\": {\"role\": \"assistant\", \"content\": \"\\u041f\\u0440\\u0438 \\ud83d\\ude00\\n\"}, \"logprobs\": null, \"finish_reason\": null}]}\r\n\r\n\
                    data: {\"id\": \"c\", \"object\": \"chat.completion.chunk\", \"created\": 1, \"model\": \"m\", \"choices\": [{\"index\": 0, \"delta\": {\"tool_calls\": [{\"index\": 0, \"id\": \"call_1\", \"type\": \"function\", \"function\": {\"name\": \"ls\", \"arguments\": \"{\\\"path\\\": \\\".\\\"}\"}}]}, \"logprobs\": null, \"finish_reason\": \"tool_calls\"}]}\r\n\r\n\
                    data: [DONE]\r\n\r\n";
        assert_eq!(
            decode_body(body.as_bytes()).unwrap(),
            vec![
                Chunk::Text("При 😀\n".into()),
                Chunk::ToolCallDelta {
                    index: 0,
                    id: Some("call_1".into()),
                    name: Some("ls".into()),
                    arguments: "{\"path\": \".\"}".into(),
                },
                Chunk::Finish(FinishReason::ToolCalls),
            ]
        );
    }

    #[test]
    fn a_finish_reason_without_done_is_a_complete_answer() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"},\"finish_reason\":\"length\"}]}\n\n";
        assert_eq!(
            decode_body(body.as_bytes()).unwrap(),
            vec![Chunk::Text("ok".into()), Chunk::Finish(FinishReason::Length)]
        );
    }

    #[test]
    fn a_cut_stream_bad_json_and_error_events_are_llm_errors() {
        let cut = "data: {\"choices\":[{\"delta\":{\"content\":\"The\"},\"finish_reason\":null}]}\n\n";
        assert_eq!(
            decode_body(cut.as_bytes()),
            Err(Error::Llm("stream ended without [DONE] or finish_reason".into()))
        );
        let bad = decode_body(b"data: {\"choices\": [\n\n");
        assert!(
            matches!(&bad, Err(Error::Llm(m)) if m.starts_with("invalid JSON in stream")),
            "{bad:?}"
        );
        assert_eq!(
            decode_body(b"data: {\"error\": {\"message\": \"out of memory\", \"code\": 500}}\n\n"),
            Err(Error::Llm("model server error: out of memory".into()))
        );
    }

    #[test]
    fn an_empty_body_and_a_context_error_event_are_context_too_large() {
        assert_eq!(decode_body(b""), Err(Error::ContextTooLarge(EMPTY_STREAM.into())));
        let event = br#"data: {"error": {"message": "Requested tokens (5030) exceed context window of 4096", "code": 400}}

"#;
        assert_eq!(
            decode_body(event),
            Err(Error::ContextTooLarge(
                "the model server refused the prompt as longer than its context: Requested tokens (5030) exceed context window of 4096".into()
            ))
        );
    }

    #[test]
    fn legacy_function_call_is_used_only_without_tool_calls() {
        let body = "data: {\"choices\":[{\"delta\":{\"function_call\":{\"name\":\"ls\",\"arguments\":\"{}\"}},\"finish_reason\":\"function_call\"}]}\n\ndata: [DONE]\n\n";
        assert_eq!(
            decode_body(body.as_bytes()).unwrap(),
            vec![
                Chunk::ToolCallDelta {
                    index: 0,
                    id: None,
                    name: Some("ls".into()),
                    arguments: "{}".into()
                },
                Chunk::Finish(FinishReason::ToolCalls),
            ]
        );
    }

    #[test]
    fn encoded_chunks_decode_to_the_same_chunks() {
        let chunks = vec![
            Chunk::Text("Привет".into()),
            Chunk::ToolCallDelta {
                index: 0,
                id: Some("call_0".into()),
                name: Some("ls".into()),
                arguments: "{\"pa".into(),
            },
            Chunk::ToolCallDelta {
                index: 0,
                id: None,
                name: None,
                arguments: "th\":\".\"}".into(),
            },
            Chunk::Usage(Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                ..Default::default()
            }),
            Chunk::Finish(FinishReason::ToolCalls),
        ];
        assert_eq!(decode_body(encode_sse("m", &chunks).as_bytes()).unwrap(), chunks);
    }

    #[test]
    fn a_body_pushed_byte_by_byte_decodes_to_the_same_chunks_and_stops_at_done() {
        let chunks = vec![
            Chunk::Text("Привет".into()),
            Chunk::Text(" мир".into()),
            Chunk::Finish(FinishReason::Stop),
        ];
        let body = encode_sse("m", &chunks) + "data: {\"choices\":[{\"delta\":{\"content\":\"late\"}}]}\n\n";
        let mut decoder = ChunkDecoder::new();
        let mut decoded = Vec::new();
        for b in body.as_bytes() {
            decoded.extend(decoder.push(std::slice::from_ref(b)).unwrap());
        }
        decoded.extend(decoder.finish().unwrap());
        assert_eq!((decoded, decoder.is_done()), (chunks, true));
    }

    #[test]
    fn the_first_bad_event_of_a_piece_fails_it_and_the_events_after_it_are_not_read() {
        let mut decoder = ChunkDecoder::new();
        let piece = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                     data: {\"error\": {\"message\": \"boom\"}}\n\n\
                     data: {\"error\": {\"message\": \"second\"}}\n\n";
        assert_eq!(
            decoder.push(piece.as_bytes()),
            Err(Error::Llm("model server error: boom".into()))
        );
    }
}
