//! A scripted model for tests, examples and benches: each `stream` call replays the next [`Script`]
//! (text, tool calls, errors, delays) as the same chunk shapes the OpenAI backend produces.
//!
//! Every request received is recorded, so a test can assert what the engine sent to the model.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::{Capabilities, ChatRequest, Chunk, ChunkStream, FinishReason, LlmBackend};
use crate::error::{Error, Result};
use crate::session::Usage;

/// Argument text is streamed in pieces of this many characters, as real servers do.
const ARGUMENT_PIECE_CHARS: usize = 8;

/// One scripted model answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    fail_before: Option<Error>,
    text: String,
    tool_calls: Vec<(String, String)>,
    usage: Option<Usage>,
    fail_after: Option<(usize, Error)>,
    delay_per_chunk: Duration,
    first_byte_delay: Duration,
}

impl Script {
    fn empty() -> Self {
        Script {
            fail_before: None,
            text: String::new(),
            tool_calls: Vec::new(),
            usage: None,
            fail_after: None,
            delay_per_chunk: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
        }
    }

    /// A text answer, streamed in word-ish tokens that keep their spaces ("Hello", " world").
    pub fn text(text: impl Into<String>) -> Self {
        Script {
            text: text.into(),
            ..Script::empty()
        }
    }

    /// An answer calling the tool `name` with `arguments`.
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Self {
        Script::empty().and_tool_call(name, arguments)
    }

    /// An answer calling `name` with raw argument text (e.g. malformed JSON).
    pub fn raw_tool_call(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        Script::empty().and_raw_tool_call(name, arguments)
    }

    /// A call that fails before anything is streamed (`stream` returns `Err`).
    pub fn error(error: Error) -> Self {
        Script {
            fail_before: Some(error),
            ..Script::empty()
        }
    }

    /// One more tool call in the same answer.
    pub fn and_tool_call(self, name: impl Into<String>, arguments: Value) -> Self {
        self.and_raw_tool_call(name, arguments.to_string())
    }

    /// One more tool call with raw argument text.
    pub fn and_raw_tool_call(mut self, name: impl Into<String>, arguments: impl Into<String>) -> Self {
        self.tool_calls.push((name.into(), arguments.into()));
        self
    }

    /// Text streamed before the tool calls.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = text.into();
        self
    }

    /// Usage reported before the finish (none by default, like servers that do not report it).
    pub fn usage(mut self, usage: Usage) -> Self {
        self.usage = Some(usage);
        self
    }

    /// The stream yields `chunks` chunks, then `error` (a model stream cut midway).
    pub fn fail_after(mut self, chunks: usize, error: Error) -> Self {
        self.fail_after = Some((chunks, error));
        self
    }

    /// A pause before every chunk.
    pub fn delay_per_chunk(mut self, delay: Duration) -> Self {
        self.delay_per_chunk = delay;
        self
    }

    /// A pause inside `stream` before it returns (the model reading the prompt).
    pub fn first_byte_delay(mut self, delay: Duration) -> Self {
        self.first_byte_delay = delay;
        self
    }

    /// The chunks this script streams when it succeeds: text tokens, then each tool call (id and
    /// name in its first delta, arguments in pieces), usage, and the finish.
    pub fn chunks(&self) -> Vec<Chunk> {
        let mut chunks: Vec<Chunk> = tokens(&self.text).into_iter().map(Chunk::Text).collect();
        for (index, (name, arguments)) in self.tool_calls.iter().enumerate() {
            let pieces = pieces(arguments, ARGUMENT_PIECE_CHARS);
            for (n, piece) in pieces.into_iter().enumerate() {
                chunks.push(Chunk::ToolCallDelta {
                    index,
                    id: (n == 0).then(|| format!("call_{index}")),
                    name: (n == 0).then(|| name.clone()),
                    arguments: piece,
                });
            }
        }
        if let Some(usage) = self.usage {
            chunks.push(Chunk::Usage(usage));
        }
        let finish = if self.tool_calls.is_empty() {
            FinishReason::Stop
        } else {
            FinishReason::ToolCalls
        };
        chunks.push(Chunk::Finish(finish));
        chunks
    }

    /// This script as an OpenAI SSE body (cut without `[DONE]` where it would fail midway), for
    /// mock HTTP servers.
    pub fn sse_body(&self, model: &str) -> String {
        let mut chunks = self.chunks();
        if let Some((n, _)) = &self.fail_after {
            chunks.truncate(*n);
        }
        super::wire::encode_sse(model, &chunks)
    }
}

/// "Hello  world\n" → ["Hello", "  world", "\n"]: a token starts where whitespace follows a
/// non-space.
fn tokens(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut prev_space = false;
    for c in text.chars() {
        let space = c.is_whitespace();
        if space && !prev_space && !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
        current.push(c);
        prev_space = space;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// `text` in pieces of at most `size` characters (at least one piece, possibly empty).
fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    chars.chunks(size.max(1)).map(|c| c.iter().collect()).collect()
}

type ScriptFn = Box<dyn Fn(&ChatRequest) -> Script + Send + Sync>;

enum Source {
    Queue(Mutex<VecDeque<Script>>),
    Func(ScriptFn),
}

/// A model that replays scripts: one per `stream` call.
pub struct ScriptedBackend {
    source: Source,
    requests: Mutex<Vec<ChatRequest>>,
    capabilities: Capabilities,
    model: String,
}

impl std::fmt::Debug for ScriptedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            Source::Queue(q) => format!("{} scripts left", lock(q).len()),
            Source::Func(_) => "a function".to_string(),
        };
        f.debug_struct("ScriptedBackend")
            .field("source", &source)
            .field("model", &self.model)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ScriptedBackend {
    fn with_source(source: Source) -> Self {
        ScriptedBackend {
            source,
            requests: Mutex::new(Vec::new()),
            capabilities: Capabilities::default(),
            model: "scripted".to_string(),
        }
    }

    /// Answers with `scripts` in order; a call after the last one is an error ("script exhausted").
    pub fn new(scripts: Vec<Script>) -> Self {
        Self::with_source(Source::Queue(Mutex::new(scripts.into())))
    }

    /// Answers each request with the script `f` makes for it.
    pub fn from_fn(f: impl Fn(&ChatRequest) -> Script + Send + Sync + 'static) -> Self {
        Self::with_source(Source::Func(Box::new(f)))
    }

    /// This backend reporting `capabilities` (to test how the engine adapts).
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// This backend reporting `model` as its model name.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// Adds scripts at the end of the queue (no effect on a `from_fn` backend).
    pub fn push(&self, script: Script) {
        if let Source::Queue(q) = &self.source {
            lock(q).push_back(script);
        }
    }

    /// Every request received, oldest first.
    pub fn requests(&self) -> Vec<ChatRequest> {
        lock(&self.requests).clone()
    }

    /// Scripts not used yet (0 for a `from_fn` backend).
    pub fn remaining(&self) -> usize {
        match &self.source {
            Source::Queue(q) => lock(q).len(),
            Source::Func(_) => 0,
        }
    }
}

#[async_trait]
impl LlmBackend for ScriptedBackend {
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream> {
        let script = match &self.source {
            Source::Queue(q) => lock(q).pop_front(),
            Source::Func(f) => Some(f(&request)),
        };
        lock(&self.requests).push(request);
        let script = script.ok_or_else(|| Error::Llm("script exhausted".to_string()))?;
        if !script.first_byte_delay.is_zero() {
            tokio::time::sleep(script.first_byte_delay).await;
        }
        if let Some(error) = script.fail_before {
            return Err(error);
        }
        let mut items: VecDeque<Result<Chunk>> = script.chunks().into_iter().map(Ok).collect();
        if let Some((n, error)) = script.fail_after {
            items.truncate(n);
            items.push_back(Err(error));
        }
        let delay = script.delay_per_chunk;
        Ok(Box::pin(futures::stream::unfold(
            items,
            move |mut items| async move {
                let item = items.pop_front()?;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((item, items))
            },
        )))
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn model(&self) -> &str {
        &self.model
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ChatMessage, ChatToolCall, Completion};
    use futures::StreamExt;
    use serde_json::json;

    #[test]
    fn text_is_split_into_tokens_that_keep_their_spaces() {
        assert_eq!(tokens("Hello world"), vec!["Hello", " world"]);
        assert_eq!(tokens(" a  b\n"), vec![" a", "  b", "\n"]);
        assert_eq!(tokens(""), Vec::<String>::new());
    }

    #[tokio::test]
    async fn scripts_replay_in_order_and_requests_are_recorded() {
        let backend = ScriptedBackend::new(vec![
            Script::tool_call("read_file", json!({"path": "src/main.rs"}))
                .and_tool_call("ls", json!({}))
                .with_text("Let me look."),
            Script::text("Done.").usage(Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                ..Default::default()
            }),
        ]);
        let request = ChatRequest::new(vec![ChatMessage::user("look")]);
        assert_eq!(
            backend.complete(request.clone()).await.unwrap(),
            Completion {
                text: "Let me look.".into(),
                tool_calls: vec![
                    ChatToolCall::new("call_0", "read_file", r#"{"path":"src/main.rs"}"#),
                    ChatToolCall::new("call_1", "ls", "{}"),
                ],
                usage: None,
                finish: FinishReason::ToolCalls,
            }
        );
        assert_eq!(
            backend.complete(request.clone()).await.unwrap(),
            Completion {
                text: "Done.".into(),
                tool_calls: vec![],
                usage: Some(Usage {
                    prompt_tokens: 10,
                    completion_tokens: 2,
                    ..Default::default()
                }),
                finish: FinishReason::Stop,
            }
        );
        assert_eq!(
            backend.complete(request.clone()).await,
            Err(Error::Llm("script exhausted".into()))
        );
        assert_eq!(
            backend.requests(),
            vec![request.clone(), request.clone(), request]
        );
    }

    #[tokio::test]
    async fn a_stream_cut_midway_yields_its_chunks_then_the_error() {
        let backend = ScriptedBackend::new(vec![
            Script::text("one two three").fail_after(2, Error::Llm("cut".into())),
        ]);
        let items: Vec<Result<Chunk>> = backend
            .stream(ChatRequest::default())
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Text("one".into())),
                Ok(Chunk::Text(" two".into())),
                Err(Error::Llm("cut".into())),
            ]
        );
    }

    #[tokio::test]
    async fn from_fn_answers_from_the_request() {
        let backend = ScriptedBackend::from_fn(|r| Script::text(format!("{} messages", r.messages.len())));
        let c = backend
            .complete(ChatRequest::new(vec![
                ChatMessage::system("s"),
                ChatMessage::user("u"),
            ]))
            .await
            .unwrap();
        assert_eq!(c.text, "2 messages");
        let err = ScriptedBackend::new(vec![Script::error(Error::Llm("down".into()))])
            .complete(ChatRequest::default())
            .await;
        assert_eq!(err, Err(Error::Llm("down".into())));
    }
}
