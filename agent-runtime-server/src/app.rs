//! The routes: one table of paths and operations ([`ROUTES`], which the OpenAPI document reads), a
//! `match` on method and route, auth first, and handlers that parse, call the core once, serialize.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime_core::budget::BudgetUsage;
use agent_runtime_core::orchestrator::{
    ApprovalPreview, CancelOutcome, CreateSession, CurrentAgent, Follow, Orchestrator, Submission,
};
use agent_runtime_core::protocol::ClientMessage;
use agent_runtime_core::storage::SessionQuery;
use agent_runtime_core::telemetry::within_request;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::body::BodyLimits;
use crate::error::{ApiError, HttpError};
use crate::metrics::Metrics;
use crate::views::*;

/// A response body: a JSON document or an event stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What every request shares.
#[derive(Debug)]
pub struct App {
    /// The runtime.
    pub rt: Orchestrator,
    /// The `x-internal-auth` token (`None`: auth off, loopback only).
    pub token: Option<String>,
    /// Request body limit.
    pub max_request_bytes: usize,
    /// SSE keep-alive interval.
    pub keep_alive: Duration,
    /// How long reading a request body may take.
    pub request_timeout: Duration,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// A known route, with its path parameter. Which paths give which route is [`ROUTES`]' business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/health`
    Health,
    /// `/openapi.json`
    OpenApi,
    /// `/metrics`
    Metrics,
    /// `/sessions`
    Sessions,
    /// `/sessions/{id}`
    Session(String),
    /// `/sessions/{id}/messages` and `/history`
    Messages(String),
    /// `/sessions/{id}/events`
    Events(String),
    /// `/sessions/{id}/pending-approvals`
    PendingApprovals(String),
    /// `/sessions/{id}/usage`
    Usage(String),
    /// `/sessions/{id}/hitl-decision`
    HitlDecision(String),
    /// `/sessions/{id}/cancel`
    Cancel(String),
    /// `/sessions/{id}/approvals/{call_id}/preview`: session id, call id
    ApprovalPreview(String, String),
    /// `/agents`
    Agents,
    /// `/agents/{id}/current`
    CurrentAgent(String),
    /// `/agent/message/stream`
    MessageStream,
}

/// The part of the product an operation belongs to (its OpenAPI tag, a module of a generated client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// Creating, reading, listing and deleting sessions.
    Sessions,
    /// Sending messages, reading the conversation, following and cancelling turns.
    Messages,
    /// Human approvals of tool calls and plans.
    Approvals,
    /// The agents and a session's current agent.
    Agents,
    /// Health, metrics and this API's description.
    System,
}

impl Tag {
    /// Every tag, in the order the OpenAPI document lists them.
    pub const ALL: [Tag; 5] = [
        Tag::Sessions,
        Tag::Messages,
        Tag::Approvals,
        Tag::Agents,
        Tag::System,
    ];

    /// The tag's name.
    pub fn name(self) -> &'static str {
        match self {
            Tag::Sessions => "sessions",
            Tag::Messages => "messages",
            Tag::Approvals => "approvals",
            Tag::Agents => "agents",
            Tag::System => "system",
        }
    }

    /// What the tag groups.
    pub fn description(self) -> &'static str {
        match self {
            Tag::Sessions => "Create, read, list and delete sessions.",
            Tag::Messages => {
                "Send messages and follow the turn's events; read the conversation; cancel a turn."
            }
            Tag::Approvals => "Approvals of dangerous tool calls and of plans.",
            Tag::Agents => "The agents and the agent of a session.",
            Tag::System => "Health, metrics and this description.",
        }
    }
}

/// A body's JSON Schema, generated from the Rust type the handler reads or writes.
pub type SchemaFn = fn(&mut schemars::SchemaGenerator) -> serde_json::Value;

fn schema<T: schemars::JsonSchema>(g: &mut schemars::SchemaGenerator) -> serde_json::Value {
    g.subschema_for::<T>().to_value()
}

fn any_object(_: &mut schemars::SchemaGenerator) -> serde_json::Value {
    serde_json::json!({"type": "object"})
}

/// What an operation answers when it succeeds.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// A JSON document with this status.
    Json(u16, SchemaFn),
    /// Plain text (the metrics).
    Text,
    /// A `text/event-stream` of the turn's events.
    Events,
}

impl Answer {
    /// A JSON document with this status, whose schema is `T`'s.
    const fn json<T: schemars::JsonSchema>(status: u16) -> Answer {
        Answer::Json(status, schema::<T>)
    }
}

/// One method on one route: what it is called, what it reads and what it answers.
#[derive(Debug)]
pub struct Operation {
    /// The method.
    pub method: &'static Method,
    /// The OpenAPI `operationId`, in the product's words.
    pub id: &'static str,
    /// Where it belongs.
    pub tag: Tag,
    /// One line saying what it does.
    pub summary: &'static str,
    /// The request body, if it takes one.
    pub request: Option<SchemaFn>,
    /// The answer on success.
    pub answer: Answer,
    /// The error statuses it can answer (500 is always possible).
    pub errors: &'static [u16],
    /// Query parameters: name and JSON type.
    pub query: &'static [(&'static str, &'static str)],
}

// The methods of the table (a `Method` cannot be made and borrowed inside a `const fn`).
const METHOD_GET: &Method = &Method::GET;
const METHOD_POST: &Method = &Method::POST;
const METHOD_PATCH: &Method = &Method::PATCH;
const METHOD_DELETE: &Method = &Method::DELETE;

impl Operation {
    /// An operation answering `answer`, with an empty summary, no body, no query parameter and
    /// no error status but 500; the methods below add them.
    const fn new(method: &'static Method, id: &'static str, tag: Tag, answer: Answer) -> Operation {
        Operation {
            method,
            id,
            tag,
            summary: "",
            request: None,
            answer,
            errors: &[],
            query: &[],
        }
    }

    const fn get(id: &'static str, tag: Tag, answer: Answer) -> Operation {
        Operation::new(METHOD_GET, id, tag, answer)
    }

    const fn post(id: &'static str, tag: Tag, answer: Answer) -> Operation {
        Operation::new(METHOD_POST, id, tag, answer)
    }

    const fn patch(id: &'static str, tag: Tag, answer: Answer) -> Operation {
        Operation::new(METHOD_PATCH, id, tag, answer)
    }

    const fn delete(id: &'static str, tag: Tag, answer: Answer) -> Operation {
        Operation::new(METHOD_DELETE, id, tag, answer)
    }

    /// What it does, in one line.
    const fn summary(mut self, summary: &'static str) -> Operation {
        self.summary = summary;
        self
    }

    /// The request body it reads.
    const fn body(mut self, request: SchemaFn) -> Operation {
        self.request = Some(request);
        self
    }

    /// The error statuses it can answer besides 500.
    const fn errors(mut self, errors: &'static [u16]) -> Operation {
        self.errors = errors;
        self
    }

    /// Its query parameters: name and JSON type.
    const fn query(mut self, query: &'static [(&'static str, &'static str)]) -> Operation {
        self.query = query;
        self
    }
}

/// The parameters a path template captures (empty when the template has none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathParams {
    /// `{session_id}`
    pub session_id: String,
    /// `{call_id}`
    pub call_id: String,
}

/// One route: its path, the other spelling it answers, and its operations.
#[derive(Debug)]
pub struct RouteSpec {
    /// The path template, as documented (`/sessions/{session_id}`); also served under `/api/v1`.
    pub path: &'static str,
    /// Another path served by the same route, for clients of the earlier runtime (not documented
    /// as an operation of its own).
    pub alias: Option<&'static str>,
    /// Served without a token.
    pub public: bool,
    /// The route of a matching path, given its parameters.
    make: fn(PathParams) -> Route,
    /// One per method the route answers.
    pub operations: &'static [Operation],
}

impl RouteSpec {
    /// A route needing the token, with no alias and no operation yet.
    const fn new(path: &'static str, make: fn(PathParams) -> Route) -> RouteSpec {
        RouteSpec {
            path,
            alias: None,
            public: false,
            make,
            operations: &[],
        }
    }

    /// Served without a token.
    const fn public(mut self) -> RouteSpec {
        self.public = true;
        self
    }

    /// Also served at `alias`.
    const fn alias(mut self, alias: &'static str) -> RouteSpec {
        self.alias = Some(alias);
        self
    }

    /// Its operations, one per method.
    const fn ops(mut self, operations: &'static [Operation]) -> RouteSpec {
        self.operations = operations;
        self
    }
}

const ID_ERRORS: &[u16] = &[401, 404];
const STREAM_ERRORS: &[u16] = &[400, 401, 404, 409, 413];

/// Every route of the API. The one list: resolving a path, the `Allow` header, the metrics'
/// route labels and the OpenAPI document all read it.
#[rustfmt::skip] // a table: a line for each route, and for each operation its line and its summary's
pub static ROUTES: &[RouteSpec] = &[
    RouteSpec::new("/health", |_| Route::Health).public().ops(&[
        Operation::get("getHealth", Tag::System, Answer::json::<HealthView>(200)).errors(&[503])
            .summary("Health of the server, its storage and its model server"),
    ]),
    RouteSpec::new("/openapi.json", |_| Route::OpenApi).public().ops(&[
        Operation::get("getOpenApi", Tag::System, Answer::Json(200, any_object))
            .summary("This document"),
    ]),
    RouteSpec::new("/metrics", |_| Route::Metrics).public().ops(&[
        Operation::get("getMetrics", Tag::System, Answer::Text)
            .summary("Prometheus metrics (text format)"),
    ]),
    RouteSpec::new("/sessions", |_| Route::Sessions).ops(&[
        Operation::get("listSessions", Tag::Sessions, Answer::json::<SessionList>(200)).errors(&[400, 401])
            .query(&[("user_id", "string"), ("limit", "integer"), ("cursor", "string")])
            .summary("List sessions, newest activity first"),
        Operation::post("createSession", Tag::Sessions, Answer::json::<CreatedSession>(201))
            .body(schema::<CreateSession>).errors(&[400, 401, 409, 413])
            .summary("Create a session"),
    ]),
    RouteSpec::new("/sessions/{session_id}", |p| Route::Session(p.session_id)).ops(&[
        Operation::get("getSession", Tag::Sessions, Answer::json::<SessionView>(200)).errors(ID_ERRORS)
            .summary("One session"),
        Operation::patch("updateSession", Tag::Sessions, Answer::json::<SessionView>(200))
            .body(schema::<SessionPatch>).errors(&[400, 401, 404, 413])
            .summary("Change a session's budgets (the turn's next step sees them)"),
        Operation::delete("deleteSession", Tag::Sessions, Answer::json::<StatusReply>(200)).errors(ID_ERRORS)
            .summary("Delete a session and everything it holds (cancels its turn)"),
    ]),
    RouteSpec::new("/sessions/{session_id}/messages", |p| Route::Messages(p.session_id))
        .alias("/sessions/{session_id}/history").ops(&[
        Operation::get("listMessages", Tag::Messages, Answer::json::<MessageList>(200))
            .errors(&[400, 401, 404]).query(&[("after", "integer"), ("limit", "integer")])
            .summary("The stored conversation (also served as /sessions/{session_id}/history)"),
    ]),
    RouteSpec::new("/sessions/{session_id}/events", |p| Route::Events(p.session_id)).ops(&[
        Operation::get("streamEvents", Tag::Messages, Answer::Events).errors(&[400, 401, 404])
            .query(&[("after", "integer"), ("follow", "boolean")])
            .summary("Replay the events after Last-Event-ID (or ?after=), then follow the running turn"),
    ]),
    RouteSpec::new("/sessions/{session_id}/pending-approvals", |p| Route::PendingApprovals(p.session_id))
        .ops(&[
        Operation::get("listPendingApprovals", Tag::Approvals, Answer::json::<PendingApprovals>(200))
            .errors(ID_ERRORS)
            .summary("The approvals waiting for a decision"),
    ]),
    RouteSpec::new("/sessions/{session_id}/usage", |p| Route::Usage(p.session_id)).ops(&[
        Operation::get("getSessionUsage", Tag::Sessions, Answer::json::<BudgetUsage>(200)).errors(ID_ERRORS)
            .summary("Tokens, cost, budgets, and what was spent and remains of each"),
    ]),
    RouteSpec::new("/sessions/{session_id}/hitl-decision", |p| Route::HitlDecision(p.session_id)).ops(&[
        Operation::post("decideApproval", Tag::Approvals, Answer::Events)
            .body(schema::<HitlDecisionRequest>).errors(STREAM_ERRORS)
            .summary("Approve, edit or reject a pending approval; streams the continued turn"),
    ]),
    RouteSpec::new("/sessions/{session_id}/cancel", |p| Route::Cancel(p.session_id)).ops(&[
        Operation::post("cancelTurn", Tag::Messages, Answer::json::<StatusReply>(200)).errors(ID_ERRORS)
            .summary("Cancel the running or paused turn"),
    ]),
    RouteSpec::new("/sessions/{session_id}/approvals/{call_id}/preview", |p| Route::ApprovalPreview(p.session_id, p.call_id))
        .ops(&[
        Operation::get("previewApproval", Tag::Approvals, Answer::json::<ApprovalPreview>(200))
            .errors(&[400, 401, 404, 409])
            .summary("The unified diff a pending write_file or delete_file approval would make to the file now"),
    ]),
    RouteSpec::new("/agents", |_| Route::Agents).ops(&[
        Operation::get("listAgents", Tag::Agents, Answer::json::<AgentList>(200)).errors(&[401])
            .summary("The agents, their tools and restrictions"),
    ]),
    RouteSpec::new("/agents/{session_id}/current", |p| Route::CurrentAgent(p.session_id)).ops(&[
        Operation::get("getCurrentAgent", Tag::Agents, Answer::json::<CurrentAgent>(200)).errors(ID_ERRORS)
            .summary("The session's agent and its switches"),
    ]),
    RouteSpec::new("/agent/message/stream", |_| Route::MessageStream).ops(&[
        Operation::post("streamMessage", Tag::Messages, Answer::Events)
            .body(schema::<StreamRequest>).errors(STREAM_ERRORS)
            .summary("Send a message (user message, switch, tool result, decision); streams the turn's events"),
    ]),
];

/// A template of [`ROUTES`] (a path or an alias) with what rules a path out before it is walked.
struct Template {
    template: &'static str,
    /// How many segments it has: a path of another length cannot match.
    segments: usize,
    /// Its first segment when that is a literal (`None` for a parameter, which matches any).
    first: Option<&'static str>,
    spec: &'static RouteSpec,
}

/// Every template of [`ROUTES`] in the table's order (each route's path, then its alias), as
/// [`Route::resolve`] tries them: walking each template per request was most of its cost.
static TEMPLATES: std::sync::LazyLock<Vec<Template>> = std::sync::LazyLock::new(|| {
    ROUTES
        .iter()
        .flat_map(|spec| {
            std::iter::once(spec.path)
                .chain(spec.alias)
                .map(move |t| (t, spec))
        })
        .map(|(template, spec)| {
            let mut rest = template;
            let mut parts = std::iter::from_fn(|| next_part(&mut rest));
            let first_part = parts.next();
            let segments = usize::from(first_part.is_some()) + parts.count();
            let first = first_part.filter(|p| !p.starts_with('{'));
            Template {
                template,
                segments,
                first,
                spec,
            }
        })
        .collect()
});

/// The most segments a template of [`ROUTES`] has; a longer path matches none.
const MAX_SEGMENTS: usize = 5;

/// Whether the path's segments match a template's (`{session_id}` and `{call_id}` match any one
/// segment); the parameters, percent-decoded, when it does. A segment is compared with a literal
/// as it stands unless it holds a `%` (decoding anything else cannot make it equal a literal,
/// which has no `+`); nothing is allocated until the template matches.
fn matches_template(template: &'static str, segs: &[&str]) -> Option<PathParams> {
    let mut parts = template;
    for &seg in segs {
        match next_part(&mut parts)? {
            "{session_id}" | "{call_id}" => {}
            literal if literal == seg => {}
            literal if seg.contains('%') && percent_decode(seg) == literal => {}
            _ => return None,
        }
    }
    if next_part(&mut parts).is_some() {
        return None;
    }
    let mut params = PathParams::default();
    let mut parts = template;
    for &seg in segs {
        match next_part(&mut parts) {
            Some("{session_id}") => params.session_id = percent_decode(seg),
            Some("{call_id}") => params.call_id = percent_decode(seg),
            _ => {}
        }
    }
    Some(params)
}

/// The next segment of a template's rest (`/sessions/{session_id}`: `sessions`, then
/// `{session_id}`), found by hand: `str::split` cost more than the rest of the match. Templates
/// have no empty segment.
fn next_part(rest: &mut &'static str) -> Option<&'static str> {
    let r = rest.strip_prefix('/').unwrap_or(rest);
    if r.is_empty() {
        return None;
    }
    let end = r.bytes().position(|b| b == b'/').unwrap_or(r.len());
    let (part, tail) = r.split_at(end);
    *rest = tail;
    Some(part)
}

impl Route {
    /// The route of `path` (with or without the `/api/v1` prefix), if any.
    pub fn resolve(path: &str) -> Option<Route> {
        let path = match path.strip_prefix("/api/v1") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => path,
        };
        // The segments borrowed from the path, in place (this ran per request, and collected
        // each segment into a `String` of a `Vec` first).
        let mut held = [""; MAX_SEGMENTS];
        let mut n = 0;
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            *held.get_mut(n)? = seg;
            n += 1;
        }
        let segs = &held[..n];
        // Only templates of the path's length that start with its first segment can match (one
        // holding a `%` may decode to any literal, so it is tried against every template).
        let first = segs.first().copied().unwrap_or("");
        let encoded = first.contains('%');
        TEMPLATES
            .iter()
            .filter(|t| t.segments == n && (encoded || t.first.is_none_or(|f| f == first)))
            .find_map(|t| matches_template(t.template, segs).map(t.spec.make))
    }

    /// The entry of [`ROUTES`] this route comes from (every route is made by one).
    pub fn spec(&self) -> Option<&'static RouteSpec> {
        let kind = std::mem::discriminant(self);
        ROUTES
            .iter()
            .find(|spec| std::mem::discriminant(&(spec.make)(PathParams::default())) == kind)
    }

    /// The route's template, as metrics and logs name it.
    pub fn label(&self) -> &'static str {
        self.spec().map_or("unmatched", |spec| spec.path)
    }

    /// The methods the route answers.
    pub fn methods(&self) -> Vec<Method> {
        self.spec()
            .map(|spec| spec.operations.iter().map(|op| op.method.clone()).collect())
            .unwrap_or_default()
    }

    /// Served without a token.
    pub fn is_public(&self) -> bool {
        self.spec().is_some_and(|spec| spec.public)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters, decoded.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ApiError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                ApiError::invalid(format!(
                    "query parameter '{key}' must be a non-negative whole number"
                ))
            }),
        }
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    json_body(
        status,
        serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

/// A response of JSON text already written.
fn json_body(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The response of an error, in the one JSON shape.
pub fn error_response(e: &ApiError) -> Response<Body> {
    json(e.status(), &e.body())
}

fn ok<T: Serialize>(value: &T) -> Result<Response<Body>, ApiError> {
    Ok(json(StatusCode::OK, value))
}

/// Reads the body within the limit and parses it; an empty body is `{}` when `empty_ok`. A declared
/// `Content-Length` over the limit is refused before anything is read.
async fn read_json<T: DeserializeOwned>(
    app: &App,
    req: Request<Incoming>,
    empty_ok: bool,
) -> Result<T, ApiError> {
    let limits = BodyLimits {
        max_bytes: app.max_request_bytes,
        timeout: app.request_timeout,
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_request_bytes as u64) {
        return Err(limits.too_large());
    }
    crate::body::read_json(req.into_body(), limits, empty_ok).await
}

fn stream(
    app: &App,
    events: agent_runtime_core::orchestrator::EventStream,
) -> Result<Response<Body>, ApiError> {
    Ok(crate::sse::response(events, app.keep_alive, app.metrics.stream_opened()).map(BodyExt::boxed_unsync))
}

impl App {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else { return Ok(()) };
        let given = headers
            .get("x-internal-auth")
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if crate::auth::token_matches(given, token.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::http(
                HttpError::Unauthorized,
                "missing or wrong x-internal-auth token",
            ))
        }
    }

    /// Serves one request: a span, the route, metrics. Never fails: errors become responses.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        let route = Route::resolve(req.uri().path());
        // The console's files are public and static: served before auth. Only paths no API route
        // matches are looked up, so API requests do no extra work.
        if route.is_none()
            && let Some(found) = crate::console::resolve(req.uri().path())
        {
            let response = crate::console::serve(&method, req.uri().path(), found);
            self.metrics.observe(
                crate::console::LABEL,
                method.as_str(),
                response.status().as_u16(),
                started.elapsed(),
            );
            return Ok(response);
        }
        // The route's entry looked up once, for its label and whether it is public.
        let spec = route.as_ref().and_then(Route::spec);
        let label = spec.map_or("unmatched", |spec| spec.path);
        let public = spec.is_some_and(|spec| spec.public);
        let span = tracing::info_span!("request", %method, route = label);
        // The OpenTelemetry server span (telemetry on), continuing the client's `traceparent`.
        let otel = (self.rt.telemetry())
            .map(|t| t.request_span(method.as_str(), label, req.uri().path(), req.headers()));
        // Pinned in place: awaiting a local moves it into a second slot of this future, which
        // made it twice the route's future, copied whole into its box per request.
        let mut response = std::pin::pin!(
            async {
                let r = self
                    .dispatch(route, public, req)
                    .await
                    .unwrap_or_else(|e| error_response(&e));
                tracing::info!(
                    status = r.status().as_u16(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "answered"
                );
                r
            }
            .instrument(span)
        );
        let response = match otel {
            None => response.as_mut().await,
            Some(otel) => {
                // By reference: the request's future is large (every route's state), and moving
                // it into the context wrapper copied it several times per request (callgrind: the
                // copies were most of export's cost per scenario).
                let r = within_request(&otel, response.as_mut()).await;
                otel.end(r.status().as_u16());
                r
            }
        };
        self.metrics.observe(
            label,
            method.as_str(),
            response.status().as_u16(),
            started.elapsed(),
        );
        Ok(response)
    }

    async fn dispatch(
        &self,
        route: Option<Route>,
        public: bool,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        // Auth comes before routing, so unknown routes do not reveal themselves (docs/API.md, details 13).
        if !public {
            self.authorize(req.headers())?;
        }
        let route = route.ok_or_else(|| ApiError::not_found(req.uri().path()))?;
        let query = Query::parse(req.uri().query());
        let rt = &self.rt;
        match (req.method().clone(), route) {
            (Method::GET, Route::Health) => {
                let (view, storage_ok) = crate::health::check(rt).await;
                let status = if storage_ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Ok(json(status, &view))
            }
            (Method::GET, Route::OpenApi) => ok(&crate::openapi::document()),
            (Method::GET, Route::Metrics) => {
                let mut r = Response::new(
                    Full::new(Bytes::from(
                        self.metrics.render() + &crate::metrics::render_mcp(&self.rt),
                    ))
                    .boxed_unsync(),
                );
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(r)
            }
            (Method::POST, Route::Sessions) => {
                let body: CreateSession = read_json(self, req, true).await?;
                let session = rt.create_session(body).await?;
                Ok(json(StatusCode::CREATED, &CreatedSession::from(&session)))
            }
            (Method::GET, Route::Sessions) => {
                let page = rt
                    .list_sessions(SessionQuery {
                        user_id: query.get("user_id").map(String::from),
                        status: None,
                        limit: query.number("limit", 100)?,
                        cursor: query.get("cursor").filter(|c| !c.is_empty()).map(String::from),
                    })
                    .await?;
                ok(&SessionList {
                    sessions: page.sessions.iter().map(SessionView::from).collect(),
                    next_cursor: page.next_cursor,
                    total: page.total,
                })
            }
            (Method::GET, Route::Session(id)) => ok(&SessionView::from(&rt.get_session(&id).await?)),
            (Method::PATCH, Route::Session(id)) => {
                let body: SessionPatch = read_json(self, req, false).await?;
                let patch = body.budget.ok_or_else(|| {
                    ApiError::invalid("nothing to change: PATCH /sessions/{id} takes {\"budget\": {...}}")
                })?;
                ok(&SessionView::from(&rt.set_budget(&id, &patch).await?))
            }
            (Method::GET, Route::Usage(id)) => ok(&rt.budget_usage(&id).await?),
            (Method::DELETE, Route::Session(id)) => {
                // Boxed, as the rare routes whose futures are several KB (see submit below).
                let deleting = Box::pin(rt.delete_session(&id));
                deleting.await?;
                ok(&StatusReply {
                    status: "deleted".into(),
                })
            }
            (Method::GET, Route::Messages(id)) => {
                let history = rt
                    .history(&id, query.number("after", 0)?, query.number("limit", 1000)?)
                    .await?;
                Ok(json_body(StatusCode::OK, MessageList::json(&history)))
            }
            (Method::GET, Route::Events(id)) => {
                let after = match req.headers().get("last-event-id") {
                    Some(v) => v
                        .to_str()
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or_else(|| ApiError::invalid("Last-Event-ID must be an event seq"))?,
                    None => query.number("after", 0)?,
                };
                let follow = match query.get("follow") {
                    Some("true" | "1") => Follow::Forever,
                    None | Some("false" | "0") => Follow::UntilIdle,
                    Some(_) => {
                        return Err(ApiError::invalid(
                            "query parameter 'follow' must be true or false",
                        ));
                    }
                };
                stream(self, rt.events(&id, after, follow).await?)
            }
            (Method::GET, Route::PendingApprovals(id)) => ok(&PendingApprovals {
                pending_approvals: rt.pending_approvals(&id).await?.iter().map(Into::into).collect(),
            }),
            (Method::POST, Route::HitlDecision(id)) => {
                let body: HitlDecisionRequest = read_json(self, req, false).await?;
                let submission = Submission {
                    request_id: body.request_id,
                    message: ClientMessage::HitlDecision(body.decision),
                };
                // Boxed: see the message-stream route below.
                let submitted = Box::pin(rt.submit(&id, submission));
                stream(self, submitted.await?)
            }
            (Method::POST, Route::Cancel(id)) => {
                let cancelling = Box::pin(rt.cancel(&id));
                let status = match cancelling.await? {
                    CancelOutcome::Cancelled => "cancelled",
                    CancelOutcome::Idle => "idle",
                };
                ok(&StatusReply {
                    status: status.into(),
                })
            }
            (Method::GET, Route::ApprovalPreview(id, call_id)) => {
                ok(&rt.approval_preview(&id, &call_id).await?)
            }
            (Method::GET, Route::Agents) => ok(&AgentList { agents: rt.agents() }),
            (Method::GET, Route::CurrentAgent(id)) => ok(&rt.current_agent(&id).await?),
            (Method::POST, Route::MessageStream) => {
                let body: StreamRequest = read_json(self, req, false).await?;
                let submission = Submission {
                    request_id: body.request_id,
                    message: body.message,
                };
                // Boxed: a submit's future is several KB (cancel's and delete's too, the other
                // routes' under 1 KB); inline, it made every request's future that size, copied
                // whole at each move. Boxed in its own statement: a temporary moved into the box
                // inside the awaiting expression still kept its slot in this future.
                let submitted = Box::pin(rt.submit(&body.session_id, submission));
                stream(self, submitted.await?)
            }
            (method, route) => Ok(method_not_allowed(&method, &route)),
        }
    }
}

fn method_not_allowed(method: &Method, route: &Route) -> Response<Body> {
    let e = ApiError::http(
        HttpError::MethodNotAllowed,
        format!("{method} is not allowed on {}", route.label()),
    );
    let mut r = error_response(&e);
    let methods = route.methods();
    let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
    if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_of_the_table_has_a_summary() {
        let silent: Vec<&str> = (ROUTES.iter())
            .flat_map(|route| route.operations)
            .filter(|op| op.summary.is_empty())
            .map(|op| op.id)
            .collect();
        assert_eq!(silent, Vec::<&str>::new());
    }

    #[test]
    fn routes_resolve_with_and_without_the_prefix() {
        assert_eq!(
            Route::resolve("/api/v1/sessions/s1/history"),
            Some(Route::Messages("s1".into()))
        );
        assert_eq!(
            Route::resolve("/sessions/a%3Ab/cancel"),
            Some(Route::Cancel("a:b".into()))
        );
        assert_eq!(Route::resolve("/api/v1/health"), Some(Route::Health));
        assert_eq!(Route::resolve("/api/v1"), None);
        assert_eq!(Route::resolve("/api/v2/health"), None);
        assert_eq!(
            Route::resolve("/agent/message/stream/"),
            Some(Route::MessageStream)
        );
        assert_eq!(Route::resolve("/sessions/s1/messages/x"), None);
        assert_eq!(Route::resolve("/agents/s1"), None);
        assert_eq!(Route::resolve("/sessions/s1/approvals/c1/preview/x"), None);
    }

    #[test]
    fn percent_encoded_segments_match_literals_and_decode_into_parameters() {
        let got = [
            "/se%73sions/s%201/cancel",
            "/sessions/a+b/approvals/c%2F1/preview",
            "/sessions/a+b/c%61ncel",
            "/sessions/s1/ca+ncel",
        ]
        .map(Route::resolve);
        assert_eq!(
            got,
            [
                Some(Route::Cancel("s 1".into())),
                Some(Route::ApprovalPreview("a b".into(), "c/1".into())),
                Some(Route::Cancel("a b".into())),
                None,
            ]
        );
    }

    #[test]
    fn templates_have_no_empty_segment_and_none_more_than_a_path_is_matched_on() {
        let templates: Vec<&str> = ROUTES
            .iter()
            .flat_map(|spec| std::iter::once(spec.path).chain(spec.alias))
            .collect();
        let malformed: Vec<&str> = (templates.iter().copied())
            .filter(|t| !t.starts_with('/') || t[1..].split('/').any(str::is_empty))
            .collect();
        assert_eq!(malformed, Vec::<&str>::new());
        let longest = (templates.iter())
            .map(|t| t.split('/').filter(|s| !s.is_empty()).count())
            .max();
        assert_eq!(longest, Some(MAX_SEGMENTS));
    }

    #[test]
    fn a_path_resolves_to_what_walking_every_template_in_order_finds() {
        let walk = |path: &str| {
            let path = path.strip_prefix("/api/v1").unwrap_or(path);
            let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            ROUTES.iter().find_map(|spec| {
                std::iter::once(spec.path)
                    .chain(spec.alias)
                    .find_map(|template| matches_template(template, &segs))
                    .map(spec.make)
            })
        };
        let mut paths: Vec<String> = [
            "/",
            "",
            "/x",
            "/sessions/",
            "/%73essions",
            "/agent/message",
            "/agents/a/current",
        ]
        .map(String::from)
        .to_vec();
        for spec in ROUTES {
            for template in std::iter::once(spec.path).chain(spec.alias) {
                let filled = template
                    .replace("{session_id}", "s%201")
                    .replace("{call_id}", "c");
                paths.push(filled.clone());
                paths.push(format!("{filled}/more"));
                paths.push(filled.replacen("/s", "/%73", 1));
                paths.push(
                    filled
                        .rsplit_once('/')
                        .map_or(String::new(), |(head, _)| head.to_string()),
                );
            }
        }
        let resolved: Vec<Option<Route>> = paths.iter().map(|p| Route::resolve(p)).collect();
        let walked: Vec<Option<Route>> = paths.iter().map(|p| walk(p)).collect();
        assert_eq!(resolved, walked);
        assert!(resolved.iter().filter(|r| r.is_some()).count() >= ROUTES.len());
    }

    #[test]
    fn every_route_of_the_table_resolves_from_its_path_and_names_it() {
        let got: Vec<(&str, Option<&str>)> = ROUTES
            .iter()
            .map(|spec| {
                let path = spec
                    .path
                    .replace("{session_id}", "s-1")
                    .replace("{call_id}", "c-1");
                (spec.path, Route::resolve(&path).map(|r| r.label()))
            })
            .collect();
        let want: Vec<(&str, Option<&str>)> =
            ROUTES.iter().map(|spec| (spec.path, Some(spec.path))).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_wrong_method_is_told_the_allowed_ones() {
        let r = method_not_allowed(&Method::PUT, &Route::Session("s1".into()));
        assert_eq!(
            (
                r.status(),
                r.headers().get(header::ALLOW).map(|v| v.to_str().unwrap())
            ),
            (StatusCode::METHOD_NOT_ALLOWED, Some("GET, PATCH, DELETE"))
        );
    }
}
