//! The OTLP/HTTP trace exporter: encodes the SDK's finished spans straight into one reused
//! protobuf buffer (no intermediate proto structs) and POSTs it over one keep-alive client.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// Protobuf wire types.
const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

/// `SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK` and `…_IS_REMOTE_MASK`.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// An append-only protobuf writer over a borrowed buffer.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u32) {
        self.varint(u64::from((field << 3) | wire));
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        if !b.is_empty() {
            self.tag(field, LEN);
            self.varint(b.len() as u64);
            self.0.extend_from_slice(b);
        }
    }

    fn str(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, VARINT);
            self.varint(v);
        }
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, I64);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn fixed32(&mut self, field: u32, v: u32) {
        if v != 0 {
            self.tag(field, I32);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// A nested message: written in place after a one-byte length, which is widened (the
    /// message moved up) only when the message is 128 bytes or more.
    fn message(&mut self, field: u32, body: impl FnOnce(&mut Writer<'_>)) {
        self.message_sized(field, 1, body);
    }

    /// [`Writer::message`] with room for a length of `width` bytes (1 to 3) left before the
    /// message: a message expected to take `width` bytes' length (a span: 128 bytes to 16 KiB)
    /// is not moved once written. A length of another width moves the message up or down, so
    /// the bytes are the same whatever `width` is (the length is always minimal).
    fn message_sized(&mut self, field: u32, width: usize, body: impl FnOnce(&mut Writer<'_>)) {
        self.tag(field, LEN);
        let at = self.0.len();
        self.0.extend_from_slice(&[0, 0, 0][..width]);
        body(&mut Writer(self.0));
        let len = self.0.len() - at - width;
        if len < 0x80 && width == 1 {
            self.0[at] = len as u8;
            return;
        }
        let mut prefix = [0u8; 10];
        let mut n = 0;
        let mut v = len as u64;
        while v >= 0x80 {
            prefix[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        prefix[n] = v as u8;
        n += 1;
        if n != width {
            let end = self.0.len();
            if n > width {
                self.0.resize(end + n - width, 0);
            }
            self.0.copy_within(at + width..end, at + n);
            self.0.truncate(end + n - width);
        }
        self.0[at..at + n].copy_from_slice(&prefix[..n]);
    }
}

/// Nanoseconds since the epoch, as `as_nanos() as u64` (modulo 2^64) without its 128-bit product.
fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        (d.as_secs().wrapping_mul(1_000_000_000)).wrapping_add(u64::from(d.subsec_nanos()))
    })
}

/// `common.v1.AnyValue`'s fields.
fn any_value(w: &mut Writer<'_>, v: &Value) {
    match v {
        Value::String(s) => {
            // An empty string is still a string value: written even when empty.
            w.tag(1, LEN);
            w.varint(s.as_str().len() as u64);
            w.0.extend_from_slice(s.as_str().as_bytes());
        }
        Value::Bool(b) => {
            w.tag(2, VARINT);
            w.varint(u64::from(*b));
        }
        Value::I64(i) => {
            w.tag(3, VARINT);
            w.varint(*i as u64);
        }
        Value::F64(f) => {
            w.tag(4, I64);
            w.0.extend_from_slice(&f.to_le_bytes());
        }
        Value::Array(a) => w.message(5, |w| match a {
            Array::Bool(xs) => xs
                .iter()
                .for_each(|x| w.message(1, |w| any_value(w, &Value::Bool(*x)))),
            Array::I64(xs) => xs
                .iter()
                .for_each(|x| w.message(1, |w| any_value(w, &Value::I64(*x)))),
            Array::F64(xs) => xs
                .iter()
                .for_each(|x| w.message(1, |w| any_value(w, &Value::F64(*x)))),
            Array::String(xs) => xs.iter().for_each(|x| {
                w.message(1, |w| {
                    w.tag(1, LEN);
                    w.varint(x.as_str().len() as u64);
                    w.0.extend_from_slice(x.as_str().as_bytes());
                })
            }),
            // A kind of array added to the API after this encoder: sent as an empty array.
            _ => {}
        }),
        // A kind of value added to the API after this encoder: sent as an empty value.
        _ => {}
    }
}

/// The bytes a varint of `v` takes.
#[inline(always)]
fn varint_len(v: u64) -> usize {
    // 1 for 0..=127, then one more per 7 bits.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends a varint to a buffer that already has room for it.
#[inline(always)]
fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// One `common.v1.KeyValue` in `field`. The common case, a string, bool or integer (every
/// attribute the runtime sets but a double) under a field below 16, with key and text together
/// under 112 bytes (so every tag and length is one byte), is written inline as two headers of
/// fixed size and the two texts; anything else by [`attribute_general`].
#[inline(always)]
fn attribute(w: &mut Writer<'_>, field: u32, k: &str, v: &Value) {
    // `AnyValue`'s tag and payload: (tag byte, varint payload, bytes payload).
    let (tag, int, bytes): (u8, u64, &[u8]) = match v {
        Value::String(s) => (1 << 3 | LEN as u8, 0, s.as_str().as_bytes()),
        Value::Bool(b) => (2 << 3 | VARINT as u8, u64::from(*b), &[]),
        Value::I64(i) => (3 << 3 | VARINT as u8, *i as u64, &[]),
        _ => return attribute_general(w, field, k, v),
    };
    if field >= 16 || k.len() + bytes.len() >= 112 {
        return attribute_general(w, field, k, v);
    }
    // The `KeyValue` is then at most 2 + k + 2 + 2 + bytes (a string) or 2 + k + 2 + 11 (an
    // integer) bytes: under 128.
    let is_len = tag & 7 == LEN as u8;
    let any_len = if is_len {
        2 + bytes.len()
    } else {
        1 + varint_len(int)
    };
    // An empty key is proto3's default: not written (as `Writer::str` does).
    let key_len = if k.is_empty() { 0 } else { 2 + k.len() };
    let kv_len = key_len + 2 + any_len;
    let buf = &mut *w.0;
    buf.reserve(2 + kv_len);
    let field_tag = (field << 3) as u8 | LEN as u8;
    if k.is_empty() {
        buf.extend_from_slice(&[field_tag, kv_len as u8]);
    } else {
        buf.extend_from_slice(&[field_tag, kv_len as u8, 1 << 3 | LEN as u8, k.len() as u8]);
        buf.extend_from_slice(k.as_bytes());
    }
    if is_len {
        buf.extend_from_slice(&[2 << 3 | LEN as u8, any_len as u8, tag, bytes.len() as u8]);
        buf.extend_from_slice(bytes);
    } else {
        buf.extend_from_slice(&[2 << 3 | LEN as u8, any_len as u8, tag]);
        put_varint(buf, int);
    }
}

/// [`attribute`] of any value: a scalar (string, bool, integer, double) with its lengths
/// computed up front, after one `reserve`, without the nested messages' length fix-up; arrays
/// through the nested message writer.
#[inline(never)]
fn attribute_general(w: &mut Writer<'_>, field: u32, k: &str, v: &Value) {
    // `AnyValue`'s tag and payload: (tag byte, varint payload, bytes payload).
    let (tag, int, bytes): (u8, u64, &[u8]) = match v {
        Value::String(s) => (1 << 3 | LEN as u8, 0, s.as_str().as_bytes()),
        Value::Bool(b) => (2 << 3 | VARINT as u8, u64::from(*b), &[]),
        Value::I64(i) => (3 << 3 | VARINT as u8, *i as u64, &[]),
        Value::F64(f) => return attribute_f64(w, field, k, *f),
        _ => {
            return w.message(field, |w| {
                w.str(1, k);
                w.message(2, |w| any_value(w, v));
            });
        }
    };
    let any_len = 1 + if tag & 7 == LEN as u8 {
        varint_len(bytes.len() as u64) + bytes.len()
    } else {
        varint_len(int)
    };
    // An empty key is proto3's default: not written (as `Writer::str` does).
    let key_len = if k.is_empty() {
        0
    } else {
        1 + varint_len(k.len() as u64) + k.len()
    };
    let kv_len = key_len + 1 + varint_len(any_len as u64) + any_len;
    let tag_len = varint_len(u64::from((field << 3) | LEN));
    let buf = &mut *w.0;
    buf.reserve(tag_len + varint_len(kv_len as u64) + kv_len);
    put_varint(buf, u64::from((field << 3) | LEN));
    put_varint(buf, kv_len as u64);
    if !k.is_empty() {
        buf.push(1 << 3 | LEN as u8);
        put_varint(buf, k.len() as u64);
        buf.extend_from_slice(k.as_bytes());
    }
    buf.push(2 << 3 | LEN as u8);
    put_varint(buf, any_len as u64);
    buf.push(tag);
    if tag & 7 == LEN as u8 {
        put_varint(buf, bytes.len() as u64);
        buf.extend_from_slice(bytes);
    } else {
        put_varint(buf, int);
    }
}

/// [`attribute`] of a double: its fixed eight bytes.
fn attribute_f64(w: &mut Writer<'_>, field: u32, k: &str, f: f64) {
    w.message(field, |w| {
        w.str(1, k);
        w.message(2, |w| {
            w.tag(4, I64);
            w.0.extend_from_slice(&f.to_le_bytes());
        });
    });
}

/// Repeated `common.v1.KeyValue` in `field`.
fn attributes<'k>(w: &mut Writer<'_>, field: u32, attrs: impl IntoIterator<Item = (&'k str, &'k Value)>) {
    for (k, v) in attrs {
        attribute(w, field, k, v);
    }
}

/// Whether two spans' scopes are the same scope: the runtime's spans all share one, without
/// attributes, compared without the general comparison's sorting copies.
fn same_scope(a: &InstrumentationScope, b: &InstrumentationScope) -> bool {
    if a.attributes().next().is_none() && b.attributes().next().is_none() {
        return a.name() == b.name() && a.version() == b.version() && a.schema_url() == b.schema_url();
    }
    a == b
}

fn kv(a: &KeyValue) -> (&str, &Value) {
    (a.key.as_str(), &a.value)
}

fn flags(cx: &SpanContext, remote_parent: bool) -> u32 {
    let mut f = u32::from(cx.trace_flags().to_u8()) | HAS_IS_REMOTE;
    if remote_parent {
        f |= IS_REMOTE;
    }
    f
}

/// `trace.v1.Span`'s fields.
fn span(w: &mut Writer<'_>, s: &SpanData) {
    let cx = &s.span_context;
    w.bytes(1, &cx.trace_id().to_bytes());
    w.bytes(2, &cx.span_id().to_bytes());
    let state = cx.trace_state().header();
    w.str(3, &state);
    if s.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        w.bytes(4, &s.parent_span_id.to_bytes());
    }
    w.str(5, &s.name);
    let kind = match s.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    w.uint(6, kind);
    w.fixed64(7, nanos(s.start_time));
    w.fixed64(8, nanos(s.end_time));
    attributes(w, 9, s.attributes.iter().map(kv));
    w.uint(10, u64::from(s.dropped_attributes_count));
    for e in &s.events.events {
        w.message(11, |w| {
            w.fixed64(1, nanos(e.timestamp));
            w.str(2, &e.name);
            attributes(w, 3, e.attributes.iter().map(kv));
            w.uint(4, u64::from(e.dropped_attributes_count));
        });
    }
    w.uint(12, u64::from(s.events.dropped_count));
    for l in &s.links.links {
        let lcx = &l.span_context;
        w.message(13, |w| {
            w.bytes(1, &lcx.trace_id().to_bytes());
            w.bytes(2, &lcx.span_id().to_bytes());
            w.str(3, &lcx.trace_state().header());
            attributes(w, 4, l.attributes.iter().map(kv));
            w.uint(5, u64::from(l.dropped_attributes_count));
            w.fixed32(6, flags(lcx, lcx.is_remote()));
        });
    }
    w.uint(14, u64::from(s.links.dropped_count));
    w.message(15, |w| match &s.status {
        Status::Unset => {}
        Status::Ok => w.uint(3, 1),
        Status::Error { description } => {
            w.str(2, description);
            w.uint(3, 2);
        }
    });
    w.fixed32(16, flags(cx, s.parent_span_is_remote));
}

/// `common.v1.InstrumentationScope`'s fields.
fn scope(w: &mut Writer<'_>, s: &InstrumentationScope) {
    w.str(1, s.name());
    w.str(2, s.version().unwrap_or_default());
    attributes(w, 3, s.attributes().map(kv));
}

/// The fields of `resource.v1.Resource` (its attributes), encoded once.
fn resource(r: &Resource) -> Vec<u8> {
    let mut buf = Vec::new();
    attributes(&mut Writer(&mut buf), 1, r.iter().map(|(k, v)| (k.as_str(), v)));
    buf
}

/// Encodes an `ExportTraceServiceRequest` of `spans` into `out` (cleared first): one
/// `ResourceSpans` and a `ScopeSpans` per run of spans from the same instrumentation scope.
/// `resource` is [`resource`]'s encoding.
fn encode_request(out: &mut Vec<u8>, resource: &[u8], schema_url: &str, spans: &[SpanData]) {
    out.clear();
    let w = &mut Writer(out);
    w.message(1, |w| {
        w.message(1, |w| w.0.extend_from_slice(resource));
        let mut rest = spans;
        while let Some(first) = rest.first() {
            let sc = &first.instrumentation_scope;
            let n = rest
                .iter()
                .position(|s| !same_scope(&s.instrumentation_scope, sc))
                .unwrap_or(rest.len());
            let (run, next) = rest.split_at(n);
            w.message(2, |w| {
                w.message(1, |w| scope(w, sc));
                for s in run {
                    // A span takes 128 bytes to 16 KiB: a two-byte length.
                    w.message_sized(2, 2, |w| span(w, s));
                }
                w.str(3, sc.schema_url().unwrap_or_default());
            });
            rest = next;
        }
        w.str(3, schema_url);
    });
}

/// `OTEL_EXPORTER_OTLP_HEADERS`' format: `key=value` pairs separated by commas, values
/// percent-encoded; a malformed pair is skipped.
pub(super) fn parse_headers(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let (k, v) = (k.trim(), percent_decode(v.trim())?);
            (!k.is_empty()).then(|| (k.to_string(), v))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where and how the trace exporter sends.
pub(super) struct Target {
    pub url: String,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_TRACES_HEADERS` or `OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Vec<(String, String)>,
    /// The most one export (its retries included) may take.
    pub timeout: Duration,
}

/// The exporter the export thread drives. Its client is built on that thread at the first export
/// (a blocking client may not be built on an async runtime's thread).
pub(super) struct TraceExporter {
    target: Target,
    headers: reqwest::header::HeaderMap,
    client: Mutex<Option<reqwest::blocking::Client>>,
    resource: Vec<u8>,
    schema_url: String,
    /// The most bytes per span a body has taken so far: the next body's buffer is sized for as
    /// many spans at that rate, so it is not grown (and copied) while it is written.
    per_span: AtomicUsize,
}

impl std::fmt::Debug for TraceExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceExporter")
            .field("url", &self.target.url)
            .finish()
    }
}

/// Statuses a collector answers when it may take the export a little later (OTLP/HTTP's
/// retryable responses).
const RETRYABLE: &[u16] = &[429, 502, 503, 504];

impl TraceExporter {
    pub(super) fn new(target: Target) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &target.headers {
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                reqwest::header::HeaderValue::from_str(v),
            ) {
                headers.insert(k, v);
            }
        }
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/x-protobuf"),
        );
        TraceExporter {
            target,
            headers,
            client: Mutex::new(None),
            resource: Vec::new(),
            schema_url: String::new(),
            per_span: AtomicUsize::new(0),
        }
    }

    /// Encodes `spans` as one export request's body.
    pub(super) fn encode(&self, spans: &[SpanData]) -> Vec<u8> {
        let per_span = self.per_span.load(Ordering::Relaxed);
        let head = self.resource.len() + self.schema_url.len() + 64;
        let mut body = Vec::with_capacity(head + per_span * spans.len());
        encode_request(&mut body, &self.resource, &self.schema_url, spans);
        if !spans.is_empty() {
            // Rounded up a little, so a batch slightly denser than the last is not grown either.
            let rate = body.len().saturating_sub(head) / spans.len() * 9 / 8 + 1;
            self.per_span.store(per_span.max(rate), Ordering::Relaxed);
        }
        body
    }

    /// POSTs one encoded request, retrying a retryable answer within the export timeout. Safe to
    /// call from several threads at once: they share the client's keep-alive connections.
    pub(super) fn post(&self, body: bytes::Bytes) -> Result<(), String> {
        let started = std::time::Instant::now();
        let client = {
            let mut c = self.client.lock().map_err(|e| e.to_string())?;
            match &*c {
                Some(c) => c.clone(),
                None => {
                    let built = reqwest::blocking::Client::builder()
                        .timeout(self.target.timeout)
                        .build()
                        .map_err(|e| e.to_string())?;
                    *c = Some(built.clone());
                    built
                }
            }
        };
        let mut delay = Duration::from_millis(100);
        loop {
            let left = self.target.timeout.saturating_sub(started.elapsed());
            let sent = client
                .post(&self.target.url)
                .headers(self.headers.clone())
                .timeout(left)
                .body(body.clone())
                .send()
                .map_err(|e| e.to_string())?;
            let status = sent.status();
            // Read the (small) answer to the end so the connection is kept for the next export.
            let _ = sent.bytes();
            if status.is_success() {
                return Ok(());
            }
            if !RETRYABLE.contains(&status.as_u16()) || started.elapsed() + delay >= self.target.timeout {
                return Err(format!("the collector answered {status}"));
            }
            std::thread::sleep(delay);
            delay *= 2;
        }
    }
}

impl SpanExporter for TraceExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.post(self.encode(&batch).into())
            .map_err(OTelSdkError::InternalFailure)
    }

    fn set_resource(&mut self, r: &Resource) {
        self.resource = resource(r);
        self.schema_url = r.schema_url().unwrap_or_default().to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;
    use std::borrow::Cow;

    fn context(trace: u128, span: u64, remote: bool, state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            state.parse::<TraceState>().unwrap(),
        )
    }

    /// Spans using every field the encoder writes: every kind and status, events, links,
    /// every value type (arrays too), remote and local parents, two scopes, long strings.
    fn spans() -> Vec<SpanData> {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(1_764_500_000_000 + ms);
        let runtime = InstrumentationScope::builder("agent-runtime").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.37.0")
            .with_attributes([KeyValue::new("scope.attr", 7)])
            .build();
        let base = |i: u64, kind: SpanKind, status: Status, scope: &InstrumentationScope| SpanData {
            span_context: context(0xabcdef, 100 + i, false, ""),
            parent_span_id: if i == 0 {
                SpanId::INVALID
            } else {
                SpanId::from(100 + i - 1)
            },
            parent_span_is_remote: i == 1,
            span_kind: kind,
            name: Cow::Owned(format!("span {i}")),
            start_time: at(i),
            end_time: at(i + 5),
            attributes: vec![],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: scope.clone(),
        };
        let mut a = base(0, SpanKind::Server, Status::Unset, &runtime);
        a.attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("empty", ""),
            KeyValue::new("long", "x".repeat(300)),
            KeyValue::new("int", -42),
            KeyValue::new("port", 8080),
            KeyValue::new("float", 0.25),
            KeyValue::new("bool", true),
            KeyValue::new("no", false),
            KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(vec![opentelemetry::StringValue::from("stop"), "".into()].into()),
            ),
            KeyValue::new("ints", Value::Array(vec![1i64, -2, 3].into())),
            KeyValue::new("floats", Value::Array(vec![1.5f64, -2.0].into())),
            KeyValue::new("bools", Value::Array(vec![true, false].into())),
        ];
        a.dropped_attributes_count = 3;
        let mut b = base(1, SpanKind::Internal, Status::error("tool_failed"), &runtime);
        b.span_context = context(0xabcdef, 101, false, "vendor=value,other=x");
        b.events.events = vec![
            Event::new(
                "approval.requested",
                at(2),
                vec![KeyValue::new("tool", "write_file")],
                1,
            ),
            Event::new("empty", at(3), vec![], 0),
        ];
        b.events.dropped_count = 2;
        b.links.links = vec![Link::new(
            context(0x1234, 7, true, "k=v"),
            vec![KeyValue::new("link.attr", "a")],
            4,
        )];
        b.links.dropped_count = 1;
        let c = base(2, SpanKind::Client, Status::Ok, &runtime);
        let d = base(3, SpanKind::Producer, Status::Unset, &other);
        let e = base(4, SpanKind::Consumer, Status::error(""), &other);
        let mut many = base(5, SpanKind::Internal, Status::Unset, &runtime);
        many.attributes = (0..40)
            .map(|i| KeyValue::new(format!("attr.{i}"), format!("value number {i}")))
            .chain([
                KeyValue::new("k".repeat(200), "v".repeat(20_000)),
                KeyValue::new("max", i64::MAX),
                KeyValue::new("min", i64::MIN),
            ])
            .collect();
        vec![a, b, c, d, e, many]
    }

    fn resource() -> Resource {
        Resource::builder_empty()
            .with_service_name("agent-runtime-under-test")
            .with_attributes([KeyValue::new("deployment.environment.name", "test")])
            .with_schema_url([], "https://opentelemetry.io/schemas/1.37.0")
            .build()
    }

    #[test]
    fn the_encoded_request_decodes_to_what_the_official_otlp_conversion_builds() {
        let r = resource();
        let mut body = vec![1, 2, 3];
        encode_request(&mut body, &super::resource(&r), r.schema_url().unwrap(), &spans());
        let decoded = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let official = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans(),
                &ResourceAttributesWithSchema::from(&r),
            ),
        };
        // The official conversion makes one scope group per scope; the encoder one per run of
        // spans from the same scope: here the runs are [runtime ×3], [other ×2], [runtime].
        let mut expected = official.clone();
        let groups = &mut expected.resource_spans[0].scope_spans;
        let runtime = groups.remove(0);
        let other = groups.remove(0);
        let mut first = runtime.clone();
        first.spans.truncate(3);
        let mut last = runtime;
        last.spans.drain(..3);
        *groups = vec![first, other, last];
        assert_eq!(decoded, expected);
    }

    #[test]
    fn an_empty_batch_is_a_resource_with_no_scopes() {
        let r = resource();
        let mut body = Vec::new();
        encode_request(&mut body, &super::resource(&r), "", &[]);
        let decoded = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let mut expected = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                vec![],
                &ResourceAttributesWithSchema::from(&r),
            ),
        };
        expected.resource_spans[0].schema_url = String::new();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn nested_messages_of_every_length_class_keep_their_bytes() {
        for len in [
            0usize, 1, 127, 128, 129, 16_383, 16_384, 70_000, 2_097_151, 2_097_152,
        ] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut expected = vec![9, 3 << 3 | 2];
            prost::encoding::encode_varint(len as u64, &mut expected);
            expected.extend_from_slice(&payload);
            let mut buf = vec![9];
            Writer(&mut buf).message(3, |w| w.0.extend_from_slice(&payload));
            assert_eq!(buf, expected, "length {len}");
            for width in 1..=3 {
                let mut buf = vec![9];
                Writer(&mut buf).message_sized(3, width, |w| w.0.extend_from_slice(&payload));
                assert_eq!(buf, expected, "length {len}, room for a length of {width} bytes");
            }
        }
    }

    #[test]
    fn a_time_is_written_as_its_nanoseconds_since_the_epoch_modulo_two_to_the_64() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_764_500_000, 123_456_789),
            UNIX_EPOCH + Duration::new(u64::MAX / 1_000_000_000 + 7, 999_999_999),
            UNIX_EPOCH - Duration::from_secs(1),
        ] {
            let expected = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            assert_eq!(nanos(t), expected, "{t:?}");
        }
    }

    #[test]
    fn an_attribute_is_written_byte_for_byte_as_the_general_nested_message_encoder_writes_it() {
        // The general path: every nested message written in place and its length fixed up.
        fn general(field: u32, k: &str, v: &Value) -> Vec<u8> {
            let mut buf = vec![7];
            Writer(&mut buf).message(field, |w| {
                w.str(1, k);
                w.message(2, |w| any_value(w, v));
            });
            buf
        }
        // Around the inline path's bound (key and text under 112 bytes) and each varint's.
        let lengths = [
            0usize, 1, 100, 110, 111, 112, 115, 116, 127, 128, 16_383, 16_384, 70_000,
        ];
        let mut cases: Vec<(String, Value)> = vec![];
        for len in lengths {
            cases.push(("k".repeat(len), Value::from("v")));
            cases.push(("gen_ai.request.model".into(), Value::from("m".repeat(len))));
            cases.push(("".into(), Value::from("v".repeat(len))));
        }
        for i in [0i64, 1, 127, 128, -1, i64::MIN, i64::MAX, 8080] {
            cases.push(("server.port".into(), Value::I64(i)));
        }
        for b in [true, false] {
            cases.push(("bool".into(), Value::Bool(b)));
        }
        for f in [0.0f64, -0.0, 0.25, f64::MAX] {
            cases.push(("gen_ai.request.temperature".into(), Value::F64(f)));
        }
        cases.push((
            "gen_ai.response.finish_reasons".into(),
            Value::Array(vec![opentelemetry::StringValue::from("stop")].into()),
        ));
        for field in [1, 3, 9, 16, 200] {
            for (k, v) in &cases {
                let mut fast = vec![7];
                attribute(&mut Writer(&mut fast), field, k, v);
                let mut scalar = vec![7];
                attribute_general(&mut Writer(&mut scalar), field, k, v);
                let expected = general(field, k, v);
                assert_eq!(
                    (&fast, &scalar),
                    (&expected, &expected),
                    "field {field}, key of {} bytes, {v:?}",
                    k.len()
                );
            }
        }
    }

    #[test]
    fn headers_are_comma_separated_percent_encoded_pairs_and_malformed_ones_are_skipped() {
        assert_eq!(
            parse_headers("api-key=secret%20value, x-tenant = a%3Db ,broken,=novalue,bad=%zz,"),
            vec![
                ("api-key".to_string(), "secret value".to_string()),
                ("x-tenant".to_string(), "a=b".to_string()),
            ]
        );
    }
}
