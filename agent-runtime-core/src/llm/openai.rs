//! The OpenAI-compatible backend: `POST {LLM_PROXY_URL}/v1/chat/completions` streamed over reqwest,
//! with timeouts, retries before the first token, and a circuit breaker while the server is down.
//!
//! Retries (exponential backoff with jitter; `Retry-After` honoured) cover connect and transport
//! errors, 429 and 5xx, and only happen before the first chunk reached the caller: once a token was
//! streamed, a failure ends the stream with an error, never a silent restart.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;

use super::breaker::{Breaker, Permit};
use super::wire::{ChunkDecoder, ToolsJson, excerpt, is_context_overflow};
use super::{Capabilities, ChatRequest, Chunk, ChunkStream, LlmBackend, ModelContext, secs};
use crate::error::{Error, Result};

/// The longest `Retry-After` waited for; a server asking for more fails the call instead of
/// holding the user's turn.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long `health` waits for `GET /v1/models` in all (connecting included): a model server that
/// accepts and never answers is reported unavailable this soon.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the start-up question "what is your context size?" may take in all.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Settings of an [`OpenAiBackend`]. Plain data; only [`OpenAiConfig::from_env`] reads the
/// environment.
#[derive(Clone, PartialEq)]
pub struct OpenAiConfig {
    /// Base URL of the server, with or without `/v1` and a trailing slash.
    pub base_url: String,
    /// Model name sent in every request.
    pub model: String,
    /// Sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// Limit for establishing the TCP connection.
    pub connect_timeout: Duration,
    /// Limit from sending the request to the first chunk of the answer (prompt processing included).
    pub first_byte_timeout: Duration,
    /// Limit for a gap between two pieces of a streaming answer.
    pub idle_timeout: Duration,
    /// The longest one answer may stream in all (a model that never stops is cut off).
    pub max_answer: Duration,
    /// Retries after the first attempt (only before the first chunk).
    pub max_retries: u32,
    /// Backoff before the first retry; doubles each time, with jitter.
    pub backoff_base: Duration,
    /// Cap on one backoff.
    pub backoff_max: Duration,
    /// Consecutive failed calls that open the circuit (0: never).
    pub breaker_threshold: u32,
    /// How long an open circuit fails fast before one trial call.
    pub breaker_cooldown: Duration,
    /// What the server supports (see [`Capabilities::llama_cpp_python`] for a weak one).
    pub capabilities: Capabilities,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "http://localhost:8002".to_string(),
            model: "gpt-4o-mini".to_string(),
            api_key: None,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_answer: Duration::from_secs(600),
            max_retries: 3,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(8),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            capabilities: Capabilities::default(),
        }
    }
}

impl std::fmt::Debug for OpenAiConfig {
    // By hand: the API key must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("connect_timeout", &self.connect_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_answer", &self.max_answer)
            .field("max_retries", &self.max_retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("capabilities", &self.capabilities)
            .finish()
    }
}

impl OpenAiConfig {
    /// The defaults overridden by `LLM_PROXY_URL`, `LLM_MODEL` and `LLM_API_KEY` (API.md §8).
    /// A URL that does not parse is an `InvalidRequest` naming the variable.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`OpenAiConfig::from_env`], reading variables through `var` (tests pass a map).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let set = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let mut config = OpenAiConfig::default();
        if let Some(url) = set("LLM_PROXY_URL") {
            parse_base(&url).map_err(|e| Error::InvalidRequest(format!("LLM_PROXY_URL: {e}")))?;
            config.base_url = url;
        }
        if let Some(model) = set("LLM_MODEL") {
            config.model = model;
        }
        config.api_key = set("LLM_API_KEY");
        Ok(config)
    }
}

/// The base URL without a trailing slash or `/v1`.
fn parse_base(url: &str) -> std::result::Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid URL '{url}': {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("invalid URL '{url}': expected http:// or https://"));
    }
    let trimmed = url.trim_end_matches('/');
    let base = trimmed
        .strip_suffix("/v1")
        .unwrap_or(trimmed)
        .trim_end_matches('/');
    Ok(base.to_string())
}

/// A model behind an OpenAI-compatible chat-completions API.
#[derive(Debug)]
pub struct OpenAiBackend {
    config: OpenAiConfig,
    client: reqwest::Client,
    base: String,
    /// Parsed once: a `&str` would be parsed again on every model call.
    chat_url: reqwest::Url,
    /// `Authorization: Bearer <LLM_API_KEY>`, built once (and marked sensitive) rather than
    /// formatted and validated again on every model call.
    auth: Option<HeaderValue>,
    models_url: String,
    breaker: Breaker,
    /// Set once the server ignored `stream_options.include_usage` (llama-cpp-python does).
    usage_missing: Arc<AtomicBool>,
    /// The offered tool lists' JSON, written once each.
    tools_json: ToolsJson,
}

/// How one attempt failed.
struct AttemptError {
    error: Error,
    /// Worth another attempt (connect/transport error, 429, 5xx).
    retry: bool,
    /// The server's `Retry-After`.
    retry_after: Option<Duration>,
    /// Counts against the circuit breaker: the backend looks down, not merely unhappy with us.
    down: bool,
}

impl AttemptError {
    fn down(error: Error, retry: bool) -> Self {
        AttemptError {
            error,
            retry,
            retry_after: None,
            down: true,
        }
    }

    fn answered(error: Error) -> Self {
        AttemptError {
            error,
            retry: false,
            retry_after: None,
            down: false,
        }
    }
}

impl OpenAiBackend {
    /// A backend for `config`. `InvalidRequest` for a base URL that does not parse.
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        let base = parse_base(&config.base_url).map_err(Error::InvalidRequest)?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Retries are ours (`attempt`, before the first chunk, with backoff). reqwest's own
            // layer (HTTP/2 refusals only) copied every request's headers in case it retried;
            // a refusal now comes back as a transport error and our loop retries it.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .build()
            .map_err(|e| Error::Llm(format!("cannot build the HTTP client: {}", describe(&e))))?;
        let chat_url = format!("{base}/v1/chat/completions");
        let chat_url = reqwest::Url::parse(&chat_url)
            .map_err(|e| Error::InvalidRequest(format!("invalid URL '{chat_url}': {e}")))?;
        let auth = match &config.api_key {
            None => None,
            Some(key) => {
                let mut value = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
                    Error::InvalidRequest(
                        "LLM_API_KEY: holds a character an HTTP header cannot carry \
                         (a line break or another control character)"
                            .into(),
                    )
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(OpenAiBackend {
            chat_url,
            auth,
            models_url: format!("{base}/v1/models"),
            base,
            breaker: Breaker::new(config.breaker_threshold, config.breaker_cooldown),
            usage_missing: Arc::new(AtomicBool::new(false)),
            tools_json: ToolsJson::default(),
            client,
            config,
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    /// One request: answer headers and body up to the first chunk, within `first_byte_timeout`.
    async fn attempt(&self, body: &bytes::Bytes, include_usage: bool) -> Result<Live, AttemptError> {
        let deadline = Instant::now() + self.config.first_byte_timeout;
        let first_byte = || {
            Error::Llm(format!(
                "the model server accepted the request but sent nothing within {} \
                 (LLM_FIRST_BYTE_TIMEOUT_SECS)",
                secs(self.config.first_byte_timeout)
            ))
        };
        // Built by hand rather than through a `RequestBuilder`: the headers are ready-made values.
        let mut request = reqwest::Request::new(reqwest::Method::POST, self.chat_url.clone());
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(auth) = &self.auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        // The model call's span (when telemetry is on) continues on the model server.
        if let Some(tp) =
            crate::telemetry::outgoing_traceparent().and_then(|tp| HeaderValue::try_from(tp).ok())
        {
            headers.insert(HeaderName::from_static("traceparent"), tp);
        }
        *request.body_mut() = Some(body.clone().into());
        let response = match tokio::time::timeout_at(deadline, self.client.execute(request)).await {
            Err(_) => return Err(AttemptError::down(first_byte(), false)),
            Ok(Err(e)) => {
                let what = if e.is_connect() {
                    "cannot connect to the model server"
                } else {
                    "request to the model server failed"
                };
                return Err(AttemptError::down(
                    Error::Llm(format!("{what}: {}", describe(&e))),
                    true,
                ));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = tokio::time::timeout_at(deadline, response.text())
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default();
            if is_context_overflow(&text) {
                return Err(AttemptError::answered(Error::ContextTooLarge(format!(
                    "the model server refused the prompt as longer than its context ({status}): {}",
                    excerpt(text.trim(), 300)
                ))));
            }
            let error = Error::Llm(format!(
                "model server answered {status}: {}",
                excerpt(text.trim(), 300)
            ));
            let code = status.as_u16();
            let retry = code == 429 || status.is_server_error();
            return Err(AttemptError {
                error,
                retry: retry && retry_after.is_none_or(|d| d <= MAX_RETRY_AFTER),
                retry_after,
                down: retry,
            });
        }
        let mut live = Live {
            body: Box::pin(response.bytes_stream()),
            decoder: ChunkDecoder::new(),
            pending: VecDeque::new(),
            ended: false,
            idle_timeout: self.config.idle_timeout,
            started: std::time::Instant::now(),
            max_answer: self.config.max_answer,
            include_usage,
            saw_usage: false,
            usage_missing: self.usage_missing.clone(),
        };
        while live.pending.is_empty() && !live.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            match live.read_more(left).await {
                Ok(()) => {}
                Err(ReadError::Timeout) => return Err(AttemptError::down(first_byte(), false)),
                Err(ReadError::Transport(e)) => return Err(AttemptError::down(e, true)),
                Err(ReadError::Protocol(e)) => return Err(AttemptError::answered(e)),
            }
        }
        Ok(live)
    }

    /// The wait before retry number `attempt` (0-based): the server's `Retry-After` if it gave
    /// one, else `backoff_base · 2^attempt` capped at `backoff_max`, jittered into its upper half
    /// so that many clients do not retry in lockstep.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait;
        }
        let full = self
            .config
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.config.backoff_max);
        full / 2 + (full / 2).mul_f64(random_fraction())
    }
}

/// A number in [0, 1) from the std hasher's per-instance random keys (no RNG crate needed for jitter).
fn random_fraction() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x9e37_79b9_7f4a_7c15);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A reqwest error with its causes (its own text alone says little: "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait]
impl LlmBackend for OpenAiBackend {
    #[tracing::instrument(name = "llm.stream", skip_all, fields(model = %self.config.model, messages = request.messages.len()))]
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream> {
        let permit: Permit = self.breaker.acquire()?;
        let include_usage = self.capabilities().usage_reporting;
        let body =
            bytes::Bytes::from((self.tools_json).request_json(&self.config.model, &request, include_usage));
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            match self.attempt(&body, include_usage).await {
                Ok(live) => {
                    permit.success();
                    return Ok(live.into_stream());
                }
                Err(failed) if failed.retry && attempt < self.config.max_retries => {
                    let wait = self.backoff(attempt, failed.retry_after);
                    tracing::warn!(error = %failed.error, attempt, wait_ms = wait.as_millis() as u64, "model call failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(failed) => {
                    if failed.down {
                        permit.failure();
                    } else {
                        permit.success();
                    }
                    // The caller's real wait: every attempt and every backoff between them.
                    let error = match failed.error {
                        Error::Llm(m) if attempt > 0 => Error::Llm(format!(
                            "{m} (after {} attempts, {} in all)",
                            attempt + 1,
                            secs(started.elapsed())
                        )),
                        other => other,
                    };
                    tracing::warn!(%error, "model call failed");
                    return Err(error);
                }
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = self.config.capabilities;
        if self.usage_missing.load(Ordering::Relaxed) {
            caps.usage_reporting = false;
        }
        caps
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    #[tracing::instrument(name = "llm.health", skip_all)]
    async fn health(&self) -> Result<()> {
        let response = match self.get(&self.models_url, HEALTH_TIMEOUT).await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(Error::Llm(format!(
                    "the model server did not answer GET /v1/models within {}",
                    secs(HEALTH_TIMEOUT)
                )));
            }
            Err(e) => return Err(Error::Llm(format!("model server unreachable: {}", describe(&e)))),
        };
        if response.status().is_success() {
            Ok(())
        } else {
            Err(Error::Llm(format!(
                "model server answered {} to GET /v1/models",
                response.status()
            )))
        }
    }

    /// Asks the server at once, within [`DISCOVERY_TIMEOUT`] in all, where each kind says it:
    /// llama.cpp's `GET /props` (`default_generation_settings.n_ctx`), vLLM's `GET /v1/models`
    /// (`max_model_len` of this model), Ollama's `POST /api/show` once `GET /api/version` said
    /// it is Ollama (`num_ctx` among the parameters, else the model's `*.context_length`). The
    /// first that answers, in that order.
    #[tracing::instrument(name = "llm.context_size", skip_all)]
    async fn context_size(&self) -> Result<Option<ModelContext>> {
        let props = async {
            let v = self.get_json(&format!("{}/props", self.base)).await?;
            let n = v
                .pointer("/default_generation_settings/n_ctx")
                .or_else(|| v.get("n_ctx"))?;
            Some(ModelContext::new(n.as_u64()?, "llama.cpp server's /props n_ctx"))
        };
        let models = async {
            let v = self.get_json(&self.models_url).await?;
            let models = v.get("data")?.as_array()?;
            let model = models
                .iter()
                .find(|m| m.get("id").and_then(Value::as_str) == Some(self.config.model.as_str()))
                .or(if models.len() == 1 { models.first() } else { None })?;
            let n = model.get("max_model_len")?.as_u64()?;
            Some(ModelContext::new(
                n,
                "the model server's /v1/models max_model_len",
            ))
        };
        let ollama = async {
            // Only a server that says it is Ollama gets the POST (another would take it for a
            // chat request, or log an odd one).
            let version = self.get_json(&format!("{}/api/version", self.base)).await?;
            version.get("version")?.as_str()?;
            let request = self
                .client
                .post(format!("{}/api/show", self.base))
                .json(&serde_json::json!({"model": self.config.model}));
            let v: Value = request
                .send()
                .await
                .ok()?
                .error_for_status()
                .ok()?
                .json()
                .await
                .ok()?;
            let num_ctx = v.get("parameters").and_then(Value::as_str).and_then(|p| {
                p.lines().find_map(|l| {
                    let mut words = l.split_whitespace();
                    (words.next() == Some("num_ctx")).then(|| words.next()?.parse::<u64>().ok())?
                })
            });
            if let Some(n) = num_ctx {
                return Some(ModelContext::new(n, "Ollama's /api/show num_ctx"));
            }
            let info = v.get("model_info")?.as_object()?;
            let n = info
                .iter()
                .find(|(k, _)| k.ends_with(".context_length"))
                .and_then(|(_, n)| n.as_u64())?;
            Some(ModelContext::new(n, "Ollama's /api/show context_length"))
        };
        let asked = async {
            let (props, models, ollama) = tokio::join!(props, models, ollama);
            props.or(models).or(ollama)
        };
        match tokio::time::timeout(DISCOVERY_TIMEOUT, asked).await {
            Ok(found) => Ok(found.filter(|c| c.tokens > 0)),
            Err(_) => Err(Error::Llm(format!(
                "the model server did not say its context size within {}",
                secs(DISCOVERY_TIMEOUT)
            ))),
        }
    }
}

impl OpenAiBackend {
    /// `GET url` with the API key, within `limit` in all.
    async fn get(&self, url: &str, limit: Duration) -> reqwest::Result<reqwest::Response> {
        let mut request = self.client.get(url).timeout(limit);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        request.send().await
    }

    /// The JSON of a successful `GET url`; `None` for anything else.
    async fn get_json(&self, url: &str) -> Option<Value> {
        // The caller bounds the whole question; a request of its own ends only after that.
        let response = self.get(url, DISCOVERY_TIMEOUT * 2).await.ok()?;
        response.error_for_status().ok()?.json().await.ok()
    }
}

type BodyStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

enum ReadError {
    Timeout,
    Transport(Error),
    Protocol(Error),
}

/// An answer being streamed: the body, its decoder, and chunks decoded but not yet handed out.
struct Live {
    body: BodyStream,
    decoder: ChunkDecoder,
    pending: VecDeque<Chunk>,
    ended: bool,
    idle_timeout: Duration,
    /// When the answer started, and how long it may stream in all.
    started: std::time::Instant,
    max_answer: Duration,
    include_usage: bool,
    saw_usage: bool,
    usage_missing: Arc<AtomicBool>,
}

impl Live {
    /// Reads one more piece of the body (waiting at most `limit`) and decodes it.
    async fn read_more(&mut self, limit: Duration) -> Result<(), ReadError> {
        let piece = tokio::time::timeout(limit, self.body.next()).await;
        let decoded = match piece {
            Err(_) => {
                self.ended = true;
                return Err(ReadError::Timeout);
            }
            Ok(Some(Ok(bytes))) => {
                let chunks = self.decoder.push(&bytes);
                if self.decoder.is_done() {
                    self.ended = true;
                }
                chunks
            }
            Ok(Some(Err(e))) => {
                self.ended = true;
                return Err(ReadError::Transport(Error::Llm(format!(
                    "model stream broke: {}",
                    describe(&e)
                ))));
            }
            Ok(None) => {
                self.ended = true;
                self.decoder.finish()
            }
        };
        match decoded {
            Ok(chunks) => {
                self.pending.extend(chunks);
                Ok(())
            }
            Err(e) => {
                self.ended = true;
                Err(ReadError::Protocol(e))
            }
        }
    }

    /// The next chunk for the caller; gaps longer than the idle timeout end the stream. Bytes
    /// that carry no chunk (SSE comments, keep-alives) do not count as progress.
    async fn next_chunk(&mut self) -> Option<Result<Chunk>> {
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        if self.started.elapsed() > self.max_answer {
            self.ended = true;
            return Some(Err(Error::Llm(format!(
                "model answer still streaming after {}; stopped",
                secs(self.max_answer)
            ))));
        }
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                match &chunk {
                    Chunk::Usage(_) => self.saw_usage = true,
                    Chunk::Finish(_) if self.include_usage && !self.saw_usage => {
                        // Asked for usage and got none: stop asking (the caller counts locally).
                        self.usage_missing.store(true, Ordering::Relaxed);
                    }
                    _ => {}
                }
                return Some(Ok(chunk));
            }
            if self.ended {
                return None;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_more(left).await {
                Ok(()) => {}
                // The answer was complete, only `[DONE]` is missing: finish instead of failing.
                Err(ReadError::Timeout) if self.decoder.has_finish() => match self.decoder.finish() {
                    Ok(chunks) => self.pending.extend(chunks),
                    Err(e) => return Some(Err(e)),
                },
                Err(ReadError::Timeout) => {
                    return Some(Err(Error::Llm(format!(
                        "model stream idle for {}",
                        secs(self.idle_timeout)
                    ))));
                }
                Err(ReadError::Transport(e) | ReadError::Protocol(e)) => return Some(Err(e)),
            }
        }
    }

    fn into_stream(self) -> ChunkStream {
        Box::pin(futures::stream::unfold(self, |mut live| async move {
            let item = live.next_chunk().await?;
            Some((item, live))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_with_or_without_v1_and_slash_are_the_same() {
        for url in [
            "http://h:8002",
            "http://h:8002/",
            "http://h:8002/v1",
            "http://h:8002/v1/",
        ] {
            assert_eq!(parse_base(url).unwrap(), "http://h:8002", "{url}");
        }
        assert_eq!(parse_base("http://h/proxy/v1").unwrap(), "http://h/proxy");
        assert!(parse_base("localhost:8002").is_err());
    }

    #[test]
    fn config_reads_the_llm_variables_and_names_a_bad_one() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let config = OpenAiConfig::from_lookup(vars(&[
            ("LLM_PROXY_URL", "http://proxy:9000/v1"),
            ("LLM_MODEL", "smollm2"),
            ("LLM_API_KEY", "sk-1"),
        ]))
        .unwrap();
        assert_eq!(
            config,
            OpenAiConfig {
                base_url: "http://proxy:9000/v1".into(),
                model: "smollm2".into(),
                api_key: Some("sk-1".into()),
                ..OpenAiConfig::default()
            }
        );
        assert_eq!(
            OpenAiConfig::from_lookup(vars(&[("LLM_API_KEY", "")])).unwrap(),
            OpenAiConfig::default()
        );
        let err = OpenAiConfig::from_lookup(vars(&[("LLM_PROXY_URL", "nope")])).unwrap_err();
        assert!(
            err.to_string().starts_with("LLM_PROXY_URL: invalid URL 'nope'"),
            "{err}"
        );
        assert!(!format!("{config:?}").contains("sk-1"));
    }

    #[test]
    fn an_api_key_no_header_can_carry_is_refused_when_the_backend_is_built() {
        let err = OpenAiBackend::new(OpenAiConfig {
            api_key: Some("sk-1\nX-Injected: yes".into()),
            ..OpenAiConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "LLM_API_KEY: holds a character an HTTP header cannot carry \
             (a line break or another control character)"
        );
        assert!(!err.to_string().contains("sk-1"));
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let backend = OpenAiBackend::new(OpenAiConfig {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(300),
            ..OpenAiConfig::default()
        })
        .unwrap();
        for (attempt, full) in [(0, 100), (1, 200), (2, 300), (10, 300)] {
            let wait = backend.backoff(attempt, None);
            let full = Duration::from_millis(full);
            assert!(wait >= full / 2 && wait <= full, "attempt {attempt}: {wait:?}");
        }
        assert_eq!(
            backend.backoff(0, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
    }
}
