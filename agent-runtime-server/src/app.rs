//! The routes: a plain `match` on method and path segments (every route also under `/api/v1`),
//! auth before routing, and handlers that parse, make one call into the core, and serialize.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime_core::orchestrator::{CancelOutcome, CreateSession, Follow, Orchestrator, Submission};
use agent_runtime_core::protocol::ClientMessage;
use agent_runtime_core::storage::SessionQuery;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::error::ApiError;
use crate::health::HealthCheck;
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
    /// The cached health checks.
    pub health: HealthCheck,
}

/// A known route, with its path parameter.
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
    /// `/sessions/{id}/hitl-decision`
    HitlDecision(String),
    /// `/sessions/{id}/cancel`
    Cancel(String),
    /// `/agents`
    Agents,
    /// `/agents/{id}/current`
    CurrentAgent(String),
    /// `/agent/message/stream`
    MessageStream,
}

impl Route {
    /// The route of `path` (with or without the `/api/v1` prefix), if any.
    pub fn resolve(path: &str) -> Option<Route> {
        let path = match path.strip_prefix("/api/v1") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => path,
        };
        let segs: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        Some(match segs.as_slice() {
            ["health"] => Route::Health,
            ["openapi.json"] => Route::OpenApi,
            ["metrics"] => Route::Metrics,
            ["sessions"] => Route::Sessions,
            ["sessions", id] => Route::Session(id.to_string()),
            ["sessions", id, "messages" | "history"] => Route::Messages(id.to_string()),
            ["sessions", id, "events"] => Route::Events(id.to_string()),
            ["sessions", id, "pending-approvals"] => Route::PendingApprovals(id.to_string()),
            ["sessions", id, "hitl-decision"] => Route::HitlDecision(id.to_string()),
            ["sessions", id, "cancel"] => Route::Cancel(id.to_string()),
            ["agents"] => Route::Agents,
            ["agents", id, "current"] => Route::CurrentAgent(id.to_string()),
            ["agent", "message", "stream"] => Route::MessageStream,
            _ => return None,
        })
    }

    /// The route's template, as metrics and logs name it.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::OpenApi => "/openapi.json",
            Route::Metrics => "/metrics",
            Route::Sessions => "/sessions",
            Route::Session(_) => "/sessions/{session_id}",
            Route::Messages(_) => "/sessions/{session_id}/messages",
            Route::Events(_) => "/sessions/{session_id}/events",
            Route::PendingApprovals(_) => "/sessions/{session_id}/pending-approvals",
            Route::HitlDecision(_) => "/sessions/{session_id}/hitl-decision",
            Route::Cancel(_) => "/sessions/{session_id}/cancel",
            Route::Agents => "/agents",
            Route::CurrentAgent(_) => "/agents/{session_id}/current",
            Route::MessageStream => "/agent/message/stream",
        }
    }

    /// The methods the route answers.
    pub fn methods(&self) -> &'static [Method] {
        match self {
            Route::Sessions => &[Method::GET, Method::POST],
            Route::Session(_) => &[Method::GET, Method::DELETE],
            Route::HitlDecision(_) | Route::Cancel(_) | Route::MessageStream => &[Method::POST],
            _ => &[Method::GET],
        }
    }

    /// Served without a token.
    pub fn is_public(&self) -> bool {
        matches!(self, Route::Health | Route::OpenApi | Route::Metrics)
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
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
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

/// Reads the body within the limit and parses it; an empty body is `{}` when `empty_ok`.
async fn read_json<T: DeserializeOwned>(
    app: &App,
    req: Request<Incoming>,
    empty_ok: bool,
) -> Result<T, ApiError> {
    let too_large = || {
        ApiError::new(
            "PAYLOAD_TOO_LARGE",
            format!("request body over {} bytes", app.max_request_bytes),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_request_bytes as u64) {
        return Err(too_large());
    }
    // A body that trickles in holds a task and a connection: bounded like the head.
    let collected = tokio::time::timeout(
        app.request_timeout,
        Limited::new(req.into_body(), app.max_request_bytes).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::invalid(format!(
            "request body not received within {} s",
            app.request_timeout.as_secs()
        ))
    })?;
    let bytes = collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::invalid(format!("cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) && empty_ok {
        b"{}"
    } else {
        &bytes
    };
    // serde's derived structs also accept a JSON array (fields by position): `[]` would be an
    // empty create-session request. Bodies are objects (API.md §1).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid("invalid JSON body: expected a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
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
            Err(ApiError::new(
                "UNAUTHORIZED",
                "missing or wrong x-internal-auth token",
            ))
        }
    }

    /// Serves one request: a span, the route, metrics. Never fails: errors become responses.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        let route = Route::resolve(req.uri().path());
        let label = route.as_ref().map_or("unmatched", Route::label);
        let span = tracing::info_span!("request", %method, route = label);
        let response = async {
            let r = self
                .dispatch(route, req)
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
        .await;
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
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        // Auth comes before routing, so unknown routes do not reveal themselves (API.md §9.13).
        if !route.as_ref().is_some_and(Route::is_public) {
            self.authorize(req.headers())?;
        }
        let route = route.ok_or_else(|| ApiError::not_found(req.uri().path()))?;
        let query = Query::parse(req.uri().query());
        let rt = &self.rt;
        match (req.method().clone(), route) {
            (Method::GET, Route::Health) => {
                let (view, storage_ok) = self.health.check(rt).await;
                let status = if storage_ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Ok(json(status, &view))
            }
            (Method::GET, Route::OpenApi) => ok(&crate::openapi::document()),
            (Method::GET, Route::Metrics) => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())).boxed_unsync());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(r)
            }
            (Method::POST, Route::Sessions) => {
                let body: CreateSessionRequest = read_json(self, req, true).await?;
                let session = rt
                    .create_session(CreateSession {
                        user_id: body.user_id,
                        metadata: body.metadata,
                        session_id: body.session_id,
                    })
                    .await?;
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
            (Method::DELETE, Route::Session(id)) => {
                rt.delete_session(&id).await?;
                ok(&StatusReply {
                    status: "deleted".into(),
                })
            }
            (Method::GET, Route::Messages(id)) => {
                let history = rt
                    .history(&id, query.number("after", 0)?, query.number("limit", 1000)?)
                    .await?;
                ok(&MessageList::from(&history))
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
                let body: HitlDecisionBody = read_json(self, req, false).await?;
                let submission = Submission {
                    request_id: body.request_id,
                    message: ClientMessage::HitlDecision(body.decision),
                };
                stream(self, rt.submit(&id, submission).await?)
            }
            (Method::POST, Route::Cancel(id)) => {
                let status = match rt.cancel(&id).await? {
                    CancelOutcome::Cancelled => "cancelled",
                    CancelOutcome::Idle => "idle",
                };
                ok(&StatusReply {
                    status: status.into(),
                })
            }
            (Method::GET, Route::Agents) => ok(&AgentList { agents: rt.agents() }),
            (Method::GET, Route::CurrentAgent(id)) => {
                ok(&CurrentAgentView::from(&rt.current_agent(&id).await?))
            }
            (Method::POST, Route::MessageStream) => {
                let body: StreamRequest = read_json(self, req, false).await?;
                let submission = Submission {
                    request_id: body.request_id,
                    message: body.message,
                };
                stream(self, rt.submit(&body.session_id, submission).await?)
            }
            (method, route) => Ok(method_not_allowed(&method, &route)),
        }
    }
}

fn method_not_allowed(method: &Method, route: &Route) -> Response<Body> {
    let e = ApiError::new(
        "METHOD_NOT_ALLOWED",
        format!("{method} is not allowed on {}", route.label()),
    );
    let mut r = error_response(&e);
    let allow: Vec<&str> = route.methods().iter().map(Method::as_str).collect();
    if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
