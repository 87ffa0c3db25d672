//! OpenTelemetry traces and metrics after the GenAI semantic conventions: the span constructors the
//! turn engine and the server call, and the exporter set-up (off, and free, without an endpoint).
//!
//! Spans (semconv GenAI, the "development" revision of semantic-conventions v1.37):
//! `invoke_agent {agent}` for each agent's part of a turn, `chat {model}` for each model call
//! (routing and plans included), `execute_tool {tool}` for each tool the runtime runs, and for each
//! tool the client runs (built when its result arrives, from the offer kept in the turn state).
//! Approval requests and decisions are events on the agent span. Every span is built against an
//! explicit parent [`Context`]; the only implicit context is the one a front-end attaches around
//! [`crate::orchestrator::Orchestrator::submit`] (its request span), which the turn takes as its
//! parent, the one around a model request, which the HTTP backend sends on as `traceparent`, and
//! the one around a tool's run, which an MCP call sends on (`_meta`, and headers over HTTP).

mod export;
mod otlp;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use opentelemetry::metrics::{BoundHistogram, Histogram, MeterProvider as _};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::config::TelemetrySettings;
use crate::error::{Error, Result};
use crate::llm::{ChatRequest, FinishReason};
use crate::session::Usage;

/// The provider name on every model span: the runtime speaks the OpenAI chat-completions API to
/// whatever server `LLM_PROXY_URL` names.
pub const PROVIDER: &str = "openai";

/// A running exporter of traces and metrics, shared by an orchestrator and its front-end. Cheap
/// to clone. Where telemetry is off there is no `Telemetry` at all (an `Option` that is `None`),
/// so nothing is built.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Shared>,
}

struct Shared {
    tracer: SdkTracer,
    tracers: SdkTracerProvider,
    meters: SdkMeterProvider,
    duration: Histogram<f64>,
    tokens: Histogram<u64>,
    capture_content: bool,
    dropped: Arc<AtomicU64>,
    /// The newest turns' model and model server with what derives from them, shared by every
    /// turn that has the same (one model per server in practice: built once).
    constants: std::sync::Mutex<Option<Arc<TurnConstants>>>,
}

/// What the spans and metrics of every turn with one model and model server share, built once:
/// shared strings are reference-counted values, the metric series are bound (the SDK resolves
/// their attribute sets once, not at every record).
struct TurnConstants {
    model: Value,
    model_name: String,
    proxy_url: String,
    server: Value,
    port: i64,
    chat_name: String,
    /// `gen_ai.client.operation.duration`'s attributes of a call that succeeded (a failed call
    /// adds `error.type`), and its bound series.
    duration: Vec<KeyValue>,
    succeeded: BoundHistogram<f64>,
    /// `gen_ai.client.token.usage`'s bound series, input and output.
    input: BoundHistogram<u64>,
    output: BoundHistogram<u64>,
}

impl TurnConstants {
    fn new(telemetry: &Shared, model: &str, proxy_url: &str) -> Self {
        let (host, port) = server_of(proxy_url);
        let shared = |s: &str| Value::String(opentelemetry::StringValue::from(Arc::<str>::from(s)));
        let (model_v, server) = (shared(model), shared(&host));
        let duration = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.provider.name", PROVIDER),
            KeyValue::new("gen_ai.request.model", model_v.clone()),
            KeyValue::new("server.address", server.clone()),
        ];
        let tokens = |kind: &'static str| {
            let mut a = duration.clone();
            a.push(KeyValue::new("gen_ai.token.type", kind));
            telemetry.tokens.bind(&a)
        };
        TurnConstants {
            input: tokens("input"),
            output: tokens("output"),
            succeeded: telemetry.duration.bind(&duration),
            duration,
            model: model_v,
            model_name: model.to_string(),
            proxy_url: proxy_url.to_string(),
            server,
            port,
            chat_name: format!("chat {model}"),
        }
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("capture_content", &self.inner.capture_content)
            .field("dropped_spans", &self.dropped_spans())
            .finish()
    }
}

/// A span's attributes at its start, in a vector with room for `more` that are set later (at
/// its end): the span keeps this vector, which then is not grown (and copied) by them.
fn attrs_with_room<const N: usize>(start: [KeyValue; N], more: usize) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(N + more);
    attrs.extend(start);
    attrs
}

/// A span's name, `{operation} {target}`: one allocation, no formatting machinery (a span
/// name is built for every request, agent and tool).
fn span_name(operation: &str, target: &str) -> String {
    let mut name = String::with_capacity(operation.len() + 1 + target.len());
    name.push_str(operation);
    name.push(' ');
    name.push_str(target);
    name
}

/// The base URL's signal path: `http://c:4318` → `http://c:4318/v1/traces`.
fn signal_url(base: &str, path: &str) -> String {
    format!("{}/{path}", base.trim_end_matches('/'))
}

fn sampler(s: &TelemetrySettings) -> Sampler {
    let ratio = Sampler::TraceIdRatioBased(s.sampler_ratio);
    match s.sampler.as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => ratio,
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => Sampler::ParentBased(Box::new(ratio)),
        _ => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
    }
}

impl Telemetry {
    /// Starts exporting as `settings` say; `Ok(None)` when no endpoint is set (telemetry off).
    /// Spans go through a bounded queue to one export thread, metrics through a periodic reader
    /// of their own; neither ever waits on a turn's path.
    pub fn start(settings: &TelemetrySettings) -> Result<Option<Telemetry>> {
        if !settings.enabled() {
            return Ok(None);
        }
        let base = settings.endpoint.as_deref();
        let traces_url = match (&settings.traces_endpoint, base) {
            (Some(full), _) => full.clone(),
            (None, Some(b)) => signal_url(b, "v1/traces"),
            (None, None) => return Ok(None),
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::InvalidRequest(format!(
                "OTEL_EXPORTER_OTLP_ENDPOINT: could not set up the OTLP {what} exporter: {e}"
            ))
        };
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        // The standard header variables, as the metric exporter reads them for itself.
        let headers = std::env::var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_HEADERS"))
            .map(|h| otlp::parse_headers(&h))
            .unwrap_or_default();
        let mut spans = otlp::TraceExporter::new(otlp::Target {
            url: traces_url,
            headers,
            timeout: settings.export_timeout,
        });
        opentelemetry_sdk::trace::SpanExporter::set_resource(&mut spans, &resource);
        let dropped = Arc::new(AtomicU64::new(0));
        let processor = export::QueueProcessor::start(
            spans,
            export::Batching {
                max_queue: settings.max_queue_size,
                max_batch: settings.max_export_batch_size,
                delay: settings.schedule_delay,
            },
            dropped.clone(),
        )
        .map_err(|e| fail("span", &e))?;
        let tracers = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler(settings))
            .with_resource(resource.clone())
            .build();
        let mut meters = SdkMeterProvider::builder().with_resource(resource);
        if let Some(b) = base {
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(signal_url(b, "v1/metrics"))
                .with_timeout(settings.export_timeout)
                .build()
                .map_err(|e| fail("metric", &e))?;
            meters = meters.with_reader(
                PeriodicReader::builder(metrics)
                    .with_interval(settings.metric_export_interval)
                    .build(),
            );
        }
        let meters = meters.build();
        let meter = meters.meter("agent-runtime");
        let duration = meter
            .f64_histogram("gen_ai.client.operation.duration")
            .with_unit("s")
            .with_description("GenAI operation duration")
            .with_boundaries(vec![
                0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
            ])
            .build();
        let tokens = meter
            .u64_histogram("gen_ai.client.token.usage")
            .with_unit("{token}")
            .with_description("Measures number of input and output tokens used")
            .with_boundaries(vec![
                1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
            ])
            .build();
        STARTED.store(true, Ordering::Relaxed);
        Ok(Some(Telemetry {
            inner: Arc::new(Shared {
                tracer: tracers.tracer("agent-runtime"),
                tracers,
                meters,
                duration,
                tokens,
                capture_content: settings.capture_content,
                dropped,
                constants: std::sync::Mutex::new(None),
            }),
        }))
    }

    /// Spans not delivered: dropped from a full queue, or in an export that failed or timed out.
    pub fn dropped_spans(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Whether prompts, answers and tool arguments go on the spans.
    pub fn captures_content(&self) -> bool {
        self.inner.capture_content
    }

    /// Exports what has ended so far (waits for the export thread, at most 30 s).
    pub fn flush(&self) {
        let _ = self.inner.tracers.force_flush();
        let _ = self.inner.meters.force_flush();
    }

    /// Exports what is left and stops the exporters.
    pub fn shutdown(&self) {
        let _ = self.inner.tracers.shutdown();
        let _ = self.inner.meters.shutdown();
    }

    /// The server span of an HTTP request: `{method} {route}`, continuing the client's W3C
    /// `traceparent` (read from the request's `headers`) when it sent one.
    pub fn request_span(
        &self,
        method: &str,
        route: &'static str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> RequestSpan {
        // Looked up by ready-made names: a name given as text is parsed (and hashed) afresh.
        static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
        static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");
        let header = |name: &http::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // Without a `traceparent` the propagator would hand back the current context: skip it.
        let parent = match header(&TRACEPARENT) {
            Some(traceparent) => TraceContextPropagator::new().extract(&Carrier {
                traceparent: Some(traceparent),
                tracestate: header(&TRACESTATE),
            }),
            None => Context::current(),
        };
        let method_value = match method {
            "GET" => Value::from("GET"),
            "POST" => Value::from("POST"),
            "PUT" => Value::from("PUT"),
            "PATCH" => Value::from("PATCH"),
            "DELETE" => Value::from("DELETE"),
            other => Value::from(other.to_string()),
        };
        let span = self
            .inner
            .tracer
            .span_builder(span_name(method, route))
            .with_kind(SpanKind::Server)
            .with_attributes(attrs_with_room(
                [
                    KeyValue::new("http.request.method", method_value),
                    KeyValue::new("http.route", route),
                    KeyValue::new("url.path", path.to_string()),
                ],
                // The status code, and `error.type` for a 5xx.
                2,
            ))
            .start_with_context(&self.inner.tracer, &parent);
        RequestSpan {
            cx: parent.with_span(span),
        }
    }

    fn open(&self, name: String, kind: SpanKind, parent: &Context, attrs: Vec<KeyValue>) -> Context {
        self.start_linked(name, kind, parent, attrs, vec![])
    }

    fn start_linked(
        &self,
        name: String,
        kind: SpanKind,
        parent: &Context,
        attrs: Vec<KeyValue>,
        links: Vec<Link>,
    ) -> Context {
        let span = self
            .inner
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attrs)
            .with_links(links)
            .start_with_context(&self.inner.tracer, parent);
        parent.with_span(span)
    }
}

/// The span of one HTTP request; attach [`RequestSpan::context`] around the work it covers.
#[derive(Debug)]
pub struct RequestSpan {
    cx: Context,
}

impl RequestSpan {
    /// The context to attach (`FutureExt::with_context`) around the request's work.
    pub fn context(&self) -> Context {
        self.cx.clone()
    }

    /// Ends the span with the response's status (5xx marks it an error).
    pub fn end(self, status: u16) {
        let span = self.cx.span();
        let code = KeyValue::new("http.response.status_code", i64::from(status));
        if status >= 500 {
            span.set_attributes([code, KeyValue::new("error.type", status.to_string())]);
            span.set_status(Status::error(""));
        } else {
            span.set_attribute(code);
        }
        span.end();
    }
}

/// The W3C `traceparent` of `cx`'s span, if it has a valid one.
pub fn traceparent(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    write_hex(&mut out[3..35], &sc.trace_id().to_bytes());
    write_hex(&mut out[36..52], &sc.span_id().to_bytes());
    write_hex(&mut out[53..55], &[sc.trace_flags().to_u8()]);
    std::str::from_utf8(&out).ok().map(str::to_owned)
}

/// Writes `bytes` as lowercase hexadecimal into `out` (twice their length): each byte's two
/// digits with one table lookup.
fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut pairs = [[0u8; 2]; 256];
        let mut b = 0;
        while b < 256 {
            pairs[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
            b += 1;
        }
        pairs
    };
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&PAIRS[usize::from(*b)]);
    }
}

/// The W3C trace-context headers of one request or stored offer, for the propagator.
struct Carrier {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl opentelemetry::propagation::Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = Vec::new();
        if self.traceparent.is_some() {
            keys.push("traceparent");
        }
        if self.tracestate.is_some() {
            keys.push("tracestate");
        }
        keys
    }
}

/// The `traceparent` to send on an outgoing request made within the current context (the
/// model call's span); `None` when telemetry is off or the request is outside any span.
pub fn outgoing_traceparent() -> Option<String> {
    // Without any exporter in the process, not even the current context is looked up.
    if !STARTED.load(Ordering::Relaxed) {
        return None;
    }
    traceparent(&Context::current())
}

/// The W3C trace-context fields to send on an outgoing request made within the current context
/// (an MCP call inside its `execute_tool` span): `traceparent`, and `tracestate` when the span
/// carries one. Empty when telemetry is off or the request is outside any span.
pub fn outgoing_trace_context() -> Vec<(&'static str, String)> {
    let Some(tp) = outgoing_traceparent() else {
        return Vec::new();
    };
    let mut fields = vec![("traceparent", tp)];
    let state = Context::current().span().span_context().trace_state().header();
    if !state.is_empty() {
        fields.push(("tracestate", state));
    }
    fields
}

/// Set once any [`Telemetry`] has started in this process.
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A `traceparent` the runtime wrote and stored (a paused turn's, an offer's), read back as a
/// remote span context: version `00` only, as [`traceparent`] writes; what the W3C propagator
/// rejects is rejected (the unit tests compare the two), and a one-digit flags field too. No
/// carrier, no propagator, no copy.
fn parse_traceparent(v: &str) -> Option<SpanContext> {
    let b = v.as_bytes();
    if b.len() != 55 || !b.starts_with(b"00-") || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace = TraceId::from_bytes(read_hex::<16>(&b[3..35])?);
    let span = SpanId::from_bytes(read_hex::<8>(&b[36..52])?);
    let [flags] = read_hex::<1>(&b[53..55])?;
    let flags = TraceFlags::new(flags) & TraceFlags::SAMPLED;
    let sc = SpanContext::new(trace, span, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// `N` bytes from `2N` lowercase hexadecimal digits.
fn read_hex<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn finish_reason_value(f: &FinishReason) -> opentelemetry::StringValue {
    match f {
        FinishReason::Stop => "stop".into(),
        FinishReason::ToolCalls => "tool_calls".into(),
        FinishReason::Length => "length".into(),
        FinishReason::ContentFilter => "content_filter".into(),
        FinishReason::Other(o) => o.clone().into(),
    }
}

/// `host` and `port` of a URL such as `http://127.0.0.1:8002/v1`.
fn server_of(url: &str) -> (String, i64) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = rest.split('/').next().unwrap_or(rest);
    let default = if scheme == "https" { 443 } else { 80 };
    match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(default)),
        None => (authority.to_string(), default),
    }
}

/// The trace of one turn (one submission's work): its parent (the request's span, if any), the
/// open agent span, and the span the turn first ran under, which a resumed turn links to.
pub(crate) struct TurnTrace {
    tel: Telemetry,
    parent: Context,
    agent: Option<Context>,
    /// `gen_ai.conversation.id`, shared by every span of the turn.
    session_id: Value,
    constants: Arc<TurnConstants>,
    /// The `traceparent` of the turn's first agent span, before this submission resumed it.
    resumed_from: Option<SpanContext>,
}

/// What kind of model call a `chat` span is (the `agent_runtime.call` attribute).
#[derive(Debug, Clone, Copy)]
pub(crate) enum CallKind {
    /// The orchestrator's routing call.
    Route,
    /// The orchestrator's plan proposal.
    Plan,
    /// A step of an agent's loop.
    Step,
    /// A forced choice or call for a model without automatic tool choice.
    Forced,
}

impl CallKind {
    fn as_str(self) -> &'static str {
        match self {
            CallKind::Route => "route",
            CallKind::Plan => "plan",
            CallKind::Step => "step",
            CallKind::Forced => "forced",
        }
    }
}

impl TurnTrace {
    /// A turn's trace under the current context (the request span a front-end attached);
    /// `origin` is the stored `traceparent` of the paused turn this submission resumes.
    pub(crate) fn new(
        tel: &Telemetry,
        session_id: &str,
        model: &str,
        proxy_url: &str,
        origin: Option<&str>,
    ) -> Self {
        let constants = {
            let mut last = tel.inner.constants.lock().unwrap_or_else(|e| e.into_inner());
            match &*last {
                Some(c) if c.model_name == model && c.proxy_url == proxy_url => c.clone(),
                _ => {
                    let c = Arc::new(TurnConstants::new(&tel.inner, model, proxy_url));
                    *last = Some(c.clone());
                    c
                }
            }
        };
        TurnTrace {
            tel: tel.clone(),
            parent: Context::current(),
            agent: None,
            session_id: Value::String(opentelemetry::StringValue::from(Arc::<str>::from(session_id))),
            constants,
            resumed_from: origin.and_then(parse_traceparent),
        }
    }

    /// Opens `invoke_agent {agent}` (ending the previous agent's span); returns its
    /// `traceparent`, which the turn keeps so a later resumption can link to it.
    pub(crate) fn enter_agent(&mut self, agent: &str, turn_id: &str) -> Option<String> {
        self.end_agent(None);
        let links = self
            .resumed_from
            .clone()
            .map(|sc| vec![Link::with_context(sc)])
            .unwrap_or_default();
        let cx = self.tel.start_linked(
            span_name("invoke_agent", agent),
            SpanKind::Internal,
            &self.parent,
            attrs_with_room(
                [
                    KeyValue::new("gen_ai.operation.name", "invoke_agent"),
                    KeyValue::new("gen_ai.provider.name", PROVIDER),
                    KeyValue::new("gen_ai.agent.name", agent.to_string()),
                    KeyValue::new("gen_ai.conversation.id", self.session_id.clone()),
                    KeyValue::new("gen_ai.request.model", self.constants.model.clone()),
                    KeyValue::new("agent_runtime.turn.id", turn_id.to_string()),
                ],
                // The stop reason, and `error.type` for a failed turn.
                2,
            ),
            links,
        );
        let tp = traceparent(&cx);
        self.agent = Some(cx);
        tp
    }

    /// Ends the open agent span; `error` is the turn's error code, if it failed.
    pub(crate) fn end_agent(&mut self, outcome: Option<(&str, Option<&str>)>) {
        if let Some(cx) = self.agent.take() {
            let span = cx.span();
            if let Some((stop, error)) = outcome {
                let stop = KeyValue::new("agent_runtime.stop_reason", stop.to_string());
                if let Some(code) = error {
                    span.set_attributes([stop, KeyValue::new("error.type", code.to_string())]);
                    span.set_status(Status::error(code.to_string()));
                } else {
                    span.set_attribute(stop);
                }
            }
            span.end();
        }
    }

    /// Whether prompts, answers and tool arguments go on the spans.
    pub(crate) fn captures_content(&self) -> bool {
        self.tel.captures_content()
    }

    /// Whether an agent span is open.
    pub(crate) fn in_agent(&self) -> bool {
        self.agent.is_some()
    }

    /// An event on the open agent span (approval asked, decided).
    pub(crate) fn event(&self, name: &'static str, attrs: Vec<KeyValue>) {
        if let Some(cx) = &self.agent {
            cx.span().add_event(name, attrs);
        }
    }

    fn under(&self) -> &Context {
        self.agent.as_ref().unwrap_or(&self.parent)
    }

    /// Opens `chat {model}` for a model call under the agent span.
    pub(crate) fn chat(&self, kind: CallKind, req: &ChatRequest) -> ChatSpan {
        let mut attrs = attrs_with_room(
            [
                KeyValue::new("gen_ai.operation.name", "chat"),
                KeyValue::new("gen_ai.provider.name", PROVIDER),
                KeyValue::new("gen_ai.request.model", self.constants.model.clone()),
                KeyValue::new("gen_ai.conversation.id", self.session_id.clone()),
                KeyValue::new("server.address", self.constants.server.clone()),
                KeyValue::new("server.port", self.constants.port),
                KeyValue::new("agent_runtime.call", kind.as_str()),
            ],
            // The request's two options and input messages, then what `ChatSpan::end` adds:
            // response model, finish reasons, two token counts, output messages.
            3 + 5,
        );
        if let Some(t) = req.max_tokens {
            attrs.push(KeyValue::new("gen_ai.request.max_tokens", i64::from(t)));
        }
        if let Some(t) = req.temperature {
            attrs.push(KeyValue::new("gen_ai.request.temperature", f64::from(t)));
        }
        if self.tel.captures_content() {
            let messages: Vec<serde_json::Value> = req
                .messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect();
            attrs.push(KeyValue::new(
                "gen_ai.input.messages",
                serde_json::Value::Array(messages).to_string(),
            ));
        }
        let cx = self.tel.open(
            self.constants.chat_name.clone(),
            SpanKind::Client,
            self.under(),
            attrs,
        );
        ChatSpan {
            tel: self.tel.clone(),
            cx,
            started: Instant::now(),
            constants: self.constants.clone(),
        }
    }

    /// Opens `execute_tool {tool}` under the agent span.
    pub(crate) fn tool(&self, tool: &str, call_id: &str, arguments: &serde_json::Value) -> ToolSpan {
        let mut attrs = vec![
            KeyValue::new("gen_ai.operation.name", "execute_tool"),
            KeyValue::new("gen_ai.tool.name", tool.to_string()),
            KeyValue::new("gen_ai.tool.call.id", call_id.to_string()),
            KeyValue::new("gen_ai.tool.type", TOOL_TYPE_AGENT_SIDE),
            KeyValue::new("gen_ai.conversation.id", self.session_id.clone()),
        ];
        if self.tel.captures_content() {
            attrs.push(KeyValue::new("gen_ai.tool.call.arguments", arguments.to_string()));
        }
        ToolSpan {
            capture: self.tel.captures_content(),
            cx: self.tel.open(
                span_name("execute_tool", tool),
                SpanKind::Internal,
                self.under(),
                attrs,
            ),
        }
    }

    /// Notes a call going out for the client to run (client execution mode): when, and under which
    /// span, so the `execute_tool` span can be built once its result arrives, maybe in another
    /// request or process. `None` outside any valid span.
    pub(crate) fn offer(&self, call_id: &str) -> Option<ClientOffer> {
        Some(ClientOffer {
            call_id: call_id.to_string(),
            at_ms: crate::time::Timestamp::now().as_millis(),
            parent: traceparent(self.under())?,
        })
    }

    /// The `execute_tool {tool}` span of a call the client ran, built when it is answered: from
    /// the offer to now, a child of the agent span that offered it (stored with the offer), with
    /// a link to the span the answer came under (the client's `tool_result` request, or the
    /// request that cancelled the call). `result` is the result (content capture only) or the
    /// error code.
    pub(crate) fn client_tool(
        &self,
        offer: &ClientOffer,
        tool: &str,
        arguments: &serde_json::Value,
        result: std::result::Result<Option<&serde_json::Value>, &str>,
    ) {
        let Some(parent) = parse_traceparent(&offer.parent) else {
            return;
        };
        let parent = Context::new().with_remote_span_context(parent);
        let mut attrs = vec![
            KeyValue::new("gen_ai.operation.name", "execute_tool"),
            KeyValue::new("gen_ai.tool.name", tool.to_string()),
            KeyValue::new("gen_ai.tool.call.id", offer.call_id.clone()),
            KeyValue::new("gen_ai.tool.type", TOOL_TYPE_CLIENT_SIDE),
            KeyValue::new("gen_ai.conversation.id", self.session_id.clone()),
        ];
        let capture = self.tel.captures_content();
        if capture {
            attrs.push(KeyValue::new("gen_ai.tool.call.arguments", arguments.to_string()));
        }
        match result {
            Ok(Some(v)) if capture => {
                attrs.push(KeyValue::new("gen_ai.tool.call.result", v.to_string()));
            }
            Ok(_) => {}
            Err(code) => attrs.push(KeyValue::new("error.type", code.to_string())),
        }
        let here = self.parent.span().span_context().clone();
        let links = if here.is_valid() {
            vec![Link::with_context(here)]
        } else {
            vec![]
        };
        let start =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(offer.at_ms).unwrap_or(0));
        let tracer = &self.tel.inner.tracer;
        let span = tracer
            .span_builder(span_name("execute_tool", tool))
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attrs)
            .with_links(links)
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        if let Err(code) = result {
            cx.span().set_status(Status::error(code.to_string()));
        }
        cx.span().end();
    }
}

/// `gen_ai.tool.type` of a tool the runtime runs itself, built-in or MCP: the GenAI conventions'
/// "extension", "a tool executed on the agent-side".
const TOOL_TYPE_AGENT_SIDE: &str = "extension";
/// `gen_ai.tool.type` of a tool the client runs (client execution mode): the conventions'
/// "function", "a tool executed on the client-side, where the agent generates parameters for a
/// predefined function, and the client executes the logic".
const TOOL_TYPE_CLIENT_SIDE: &str = "function";

/// A call offered to the client to run, kept in the turn's stored state until it is answered
/// (see [`TurnTrace::client_tool`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ClientOffer {
    pub call_id: String,
    /// When the call went out, in milliseconds since the epoch.
    pub at_ms: i64,
    /// The `traceparent` of the span it went out under (the agent that asked for it).
    pub parent: String,
}

/// An open `chat {model}` span; [`ChatSpan::context`] goes around the request so the model
/// server gets `traceparent`.
pub(crate) struct ChatSpan {
    tel: Telemetry,
    cx: Context,
    started: Instant,
    constants: Arc<TurnConstants>,
}

/// What a model call came to, for its span.
pub(crate) struct ChatOutcome<'a> {
    pub usage: Option<Usage>,
    pub finish: Option<&'a FinishReason>,
    /// The answer's text and tool calls (recorded only with content capture on).
    pub output: Option<(&'a str, &'a [crate::llm::ChatToolCall])>,
}

impl ChatSpan {
    /// The span's context, to attach around the model request.
    pub(crate) fn context(&self) -> Context {
        self.cx.clone()
    }

    /// Ends the span with the call's outcome and records the GenAI metrics.
    pub(crate) fn end(self, outcome: std::result::Result<ChatOutcome<'_>, &str>) {
        let span = self.cx.span();
        let c = &self.constants;
        let elapsed = self.started.elapsed().as_secs_f64();
        match outcome {
            Ok(o) => {
                // Set together: the span's lock is taken once, not per attribute.
                let mut attrs: [Option<KeyValue>; 4] = [
                    Some(KeyValue::new("gen_ai.response.model", c.model.clone())),
                    None,
                    None,
                    None,
                ];
                if let Some(f) = o.finish {
                    attrs[1] = Some(KeyValue::new(
                        "gen_ai.response.finish_reasons",
                        Value::Array(vec![finish_reason_value(f)].into()),
                    ));
                }
                if let Some(u) = o.usage {
                    let (input, output) = (u.prompt_tokens, u.completion_tokens);
                    attrs[2] = Some(KeyValue::new("gen_ai.usage.input_tokens", input as i64));
                    attrs[3] = Some(KeyValue::new("gen_ai.usage.output_tokens", output as i64));
                    c.input.record(input);
                    c.output.record(output);
                }
                span.set_attributes(attrs.into_iter().flatten());
                if self.tel.captures_content()
                    && let Some((text, calls)) = o.output
                {
                    let calls: Vec<serde_json::Value> = calls
                        .iter()
                        .map(|c| serde_json::json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
                        .collect();
                    let out =
                        serde_json::json!([{"role": "assistant", "content": text, "tool_calls": calls}]);
                    span.set_attribute(KeyValue::new("gen_ai.output.messages", out.to_string()));
                }
                c.succeeded.record(elapsed);
            }
            Err(error_type) => {
                span.set_attribute(KeyValue::new("error.type", error_type.to_string()));
                span.set_status(Status::error(error_type.to_string()));
                let mut attrs = c.duration.clone();
                attrs.push(KeyValue::new("error.type", error_type.to_string()));
                self.tel.inner.duration.record(elapsed, &attrs);
            }
        }
        span.end();
    }
}

/// An open `execute_tool {tool}` span.
pub(crate) struct ToolSpan {
    cx: Context,
    capture: bool,
}

impl ToolSpan {
    /// The span's context, to attach around the tool's run (an MCP call sends it on).
    pub(crate) fn context(&self) -> Context {
        self.cx.clone()
    }

    /// Ends the span: `error` is the tool error's code when the tool failed.
    pub(crate) fn end(self, result: std::result::Result<&serde_json::Value, &str>) {
        let span = self.cx.span();
        match result {
            Ok(v) if self.capture => {
                span.set_attribute(KeyValue::new("gen_ai.tool.call.result", v.to_string()));
            }
            Ok(_) => {}
            Err(code) => {
                span.set_attribute(KeyValue::new("error.type", code.to_string()));
                span.set_status(Status::error(code.to_string()));
            }
        }
        span.end();
    }
}

/// Runs `fut` within `span`'s context (so an HTTP backend sends its `traceparent`), or as it is
/// when there is no span.
pub(crate) async fn within<F: std::future::Future>(span: Option<&ChatSpan>, fut: F) -> F::Output {
    use opentelemetry::context::FutureExt as _;
    match span {
        Some(s) => fut.with_context(s.context()).await,
        None => fut.await,
    }
}

/// Runs a tool within its `execute_tool` span's context (so an MCP call sends its trace context),
/// or as it is when there is no span.
pub(crate) async fn within_tool<F: std::future::Future>(span: Option<&ToolSpan>, fut: F) -> F::Output {
    use opentelemetry::context::FutureExt as _;
    match span {
        Some(s) => fut.with_context(s.context()).await,
        None => fut.await,
    }
}

/// Runs a request's work within its span's context: spans started inside (a submitted turn's)
/// become its children.
pub async fn within_request<F: std::future::Future>(span: &RequestSpan, fut: F) -> F::Output {
    use opentelemetry::context::FutureExt as _;
    fut.with_context(span.context()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the W3C propagator makes of `v`, as the runtime's reader should.
    fn by_propagator(v: &str) -> Option<SpanContext> {
        let carrier = Carrier {
            traceparent: Some(v.to_string()),
            tracestate: None,
        };
        let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier);
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    #[test]
    fn a_stored_traceparent_reads_back_as_the_w3c_propagator_reads_it() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cases = [
            good,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
            "",
        ];
        for v in cases {
            assert_eq!(parse_traceparent(v), by_propagator(v), "{v:?}");
        }
        // Stricter than the propagator in one way: a one-digit flags field, which the runtime
        // never writes, is refused.
        assert_eq!(
            parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0"),
            None
        );
        let read = parse_traceparent(good).unwrap();
        assert_eq!(
            (
                read.trace_id(),
                read.span_id(),
                read.trace_flags(),
                read.is_remote()
            ),
            (
                TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
                SpanId::from_hex("b7ad6b7169203331").unwrap(),
                TraceFlags::SAMPLED,
                true
            )
        );
    }

    #[test]
    fn every_byte_is_written_as_two_lowercase_hex_digits() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut out = vec![0u8; 512];
        write_hex(&mut out, &bytes);
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn a_span_context_is_written_as_the_traceparent_that_reads_back_to_it() {
        let sc = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let written = traceparent(&Context::new().with_remote_span_context(sc.clone()));
        assert_eq!(
            written.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01")
        );
        assert_eq!(parse_traceparent(&written.unwrap()), Some(sc));
        assert_eq!(traceparent(&Context::new()), None);
    }
}
