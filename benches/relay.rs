//! The physical limit: a bare relay serving the load generator's scenario over the same routes and
//! SSE framing as the server, relaying the model's stream with nothing stored and nothing counted.
//!
//! ```text
//! relay --llm-proxy-url http://127.0.0.1:PORT [--port 0] [--internal-api-key KEY]
//! ```
//! It prints `listening on ADDR` first, as the server does. Routes (also under `/api/v1`):
//! `POST /sessions`, `POST /agent/message/stream` (`user_message`, `tool_result`) and
//! `GET /sessions/{id}/history` (or `/messages`). Each session is an in-memory event counter, its
//! history and its open tool call; each message is one streamed model call
//! (`POST {LLM_PROXY_URL}/v1/chat/completions`) relayed as `assistant_message` tokens, the final
//! `assistant_message`, `tool_call` events and `done`, each with its `id:` seq. Nothing else of the
//! runtime is here: no storage, no tokenizer, no routing, no agents, no leases.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use agent_runtime_core::llm::sse::{SseDecoder, SseFrame};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

/// One session: what the relay must remember to answer the next request.
#[derive(Default)]
struct Session {
    /// The last event seq handed out.
    seq: u64,
    /// The conversation in the history route's shape.
    messages: Vec<Value>,
    /// The tool call (id, name) a `tool_result` may answer.
    open_call: Option<(String, String)>,
}

struct Relay {
    sessions: Mutex<HashMap<String, Session>>,
    model: reqwest::Client,
    chat_url: String,
    key: Option<String>,
}

impl Relay {
    fn with_session<T>(&self, id: &str, f: impl FnOnce(&mut Session) -> T) -> Option<T> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.get_mut(id).map(f)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, &json!({"error": {"code": code, "message": message}}))
}

fn now() -> String {
    // The relay keeps no clock of its own for the scenario; a fixed time keeps the answer's shape.
    "2026-01-01T00:00:00Z".to_string()
}

async fn handle(
    relay: Arc<Relay>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    if let Some(key) = &relay.key {
        let given = req.headers().get("x-internal-auth").and_then(|v| v.to_str().ok());
        if given != Some(key.as_str()) {
            return Ok(error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "missing or wrong x-internal-auth",
            ));
        }
    }
    let path = req.uri().path().to_string();
    let path = path.strip_prefix("/api/v1").unwrap_or(&path);
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let response = match (&method, segments.as_slice()) {
        (&Method::POST, ["sessions"]) => create_session(&relay, req).await,
        (&Method::POST, ["agent", "message", "stream"]) => message_stream(&relay, req).await,
        (&Method::GET, ["sessions", id, "history" | "messages"]) => history(&relay, id),
        _ => error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "the relay serves only the load generator's routes",
        ),
    };
    Ok(response)
}

async fn body_json(req: Request<hyper::body::Incoming>) -> Option<Value> {
    let bytes = req.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(Value::is_object)
}

async fn create_session(relay: &Relay, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let Some(body) = body_json(req).await else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "the body must be a JSON object",
        );
    };
    let id = match body["session_id"].as_str() {
        Some(id) => id.to_string(),
        None => format!("session_{:032x}", fastrand::u128(..)),
    };
    {
        let mut sessions = relay.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if sessions.contains_key(&id) {
            return error(StatusCode::CONFLICT, "SESSION_EXISTS", "that session id is taken");
        }
        sessions.insert(id.clone(), Session::default());
    }
    json_response(
        StatusCode::CREATED,
        &json!({"session_id": id, "id": id, "created_at": now(), "current_agent": "orchestrator", "message_count": 0}),
    )
}

fn history(relay: &Relay, id: &str) -> Response<Body> {
    let answer = relay.with_session(id, |s| {
        json!({"session_id": id, "messages": s.messages, "message_count": s.messages.len(),
               "current_agent": "orchestrator", "last_activity": now(), "agent_history": []})
    });
    match answer {
        Some(body) => json_response(StatusCode::OK, &body),
        None => error(StatusCode::NOT_FOUND, "SESSION_NOT_FOUND", "no such session"),
    }
}

/// The session's history as the model's `messages`.
fn model_messages(history: &[Value]) -> Vec<Value> {
    let mut out = vec![json!({"role": "system", "content": "You are a helpful coding agent."})];
    for m in history {
        let mut msg = json!({"role": m["role"], "content": m["content"]});
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| {
                    json!({"id": c["id"], "type": "function",
                           "function": {"name": c["name"], "arguments": c["arguments"].to_string()}})
                })
                .collect();
            msg["tool_calls"] = json!(calls);
        }
        if let Some(call) = m.get("tool_call_id") {
            msg["tool_call_id"] = call.clone();
        }
        out.push(msg);
    }
    out
}

async fn message_stream(relay: &Arc<Relay>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let Some(body) = body_json(req).await else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "the body must be a JSON object",
        );
    };
    let Some(id) = body["session_id"].as_str().map(String::from) else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "session_id is required",
        );
    };
    let message = &body["message"];
    let entry = match message["type"].as_str() {
        Some("user_message") => match message["content"].as_str() {
            Some(text) if !text.is_empty() => Ok(json!({"role": "user", "content": text})),
            _ => Err("user_message needs a non-empty content"),
        },
        Some("tool_result") => match message["call_id"].as_str() {
            Some(call) => {
                let content = match &message["result"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Ok(json!({"role": "tool", "content": content, "tool_call_id": call}))
            }
            None => Err("tool_result needs a call_id"),
        },
        _ => Err("the relay takes user_message and tool_result only"),
    };
    let entry = match entry {
        Ok(entry) => entry,
        Err(why) => return error(StatusCode::BAD_REQUEST, "INVALID_REQUEST", why),
    };
    let result = message.get("result").cloned().unwrap_or(Value::Null);
    let turn = relay.with_session(&id, |s| {
        // A tool result is echoed first as the `tool_result` event, as the server does.
        let mut echo = None;
        if let Some(call) = entry.get("tool_call_id").and_then(Value::as_str) {
            match s.open_call.take() {
                Some((open, name)) if open == call => {
                    echo = Some(json!({"type": "tool_result", "call_id": call, "tool_name": name,
                                       "result": result, "is_final": false}));
                }
                other => {
                    s.open_call = other;
                    return Err(());
                }
            }
        }
        let mut entry = entry;
        entry["seq"] = json!(s.messages.len() + 1);
        entry["agent"] = json!("orchestrator");
        entry["created_at"] = json!(now());
        s.messages.push(entry);
        Ok((echo, model_messages(&s.messages)))
    });
    let (echo, messages) = match turn {
        None => return error(StatusCode::NOT_FOUND, "SESSION_NOT_FOUND", "no such session"),
        Some(Err(())) => {
            return error(
                StatusCode::NOT_FOUND,
                "TOOL_CALL_NOT_FOUND",
                "no open tool call with that call_id",
            );
        }
        Some(Ok(turn)) => turn,
    };
    let request = json!({
        "model": "mock", "stream": true, "stream_options": {"include_usage": true},
        "messages": messages,
        "tools": [{"type": "function", "function": {"name": "read_file",
            "description": "Read a file of the project.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}],
    });
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(relay_turn(relay.clone(), id, echo, request, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let headers = r.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    headers.insert("x-accel-buffering", hyper::header::HeaderValue::from_static("no"));
    r
}

/// A tool call as its deltas arrive.
#[derive(Default)]
struct CallParts {
    id: String,
    name: String,
    arguments: String,
}

/// Calls the model and relays its stream; the last event is always `done`.
async fn relay_turn(
    relay: Arc<Relay>,
    id: String,
    echo: Option<Value>,
    request: Value,
    tx: mpsc::Sender<Bytes>,
) {
    let send = |event: Value| {
        let (relay, id, tx) = (&relay, &id, &tx);
        async move {
            let Some(seq) = relay.with_session(id, |s| {
                s.seq += 1;
                s.seq
            }) else {
                return;
            };
            let mut event = event;
            event["seq"] = json!(seq);
            let frame = format!("id: {seq}\ndata: {event}\n\n");
            // A client that left just stops receiving; the relay has nothing to finish.
            let _ = tx.send(Bytes::from(frame)).await;
        }
    };
    if let Some(echo) = echo {
        send(echo).await;
    }
    let outcome = model_call(&relay, &request, |token| {
        send(json!({"type": "assistant_message", "token": token, "is_final": false}))
    })
    .await;
    let (text, calls, usage) = match outcome {
        Ok(parts) => parts,
        Err(message) => {
            send(json!({"type": "error", "code": "LLM_ERROR", "message": message, "content": message, "is_final": true})).await;
            send(json!({"type": "done", "stop_reason": "error", "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "is_final": true})).await;
            return;
        }
    };
    if !text.is_empty() {
        send(json!({"type": "assistant_message", "content": text, "is_final": true})).await;
    }
    let mut tool_calls = Vec::new();
    for call in &calls {
        let arguments: Value = serde_json::from_str(&call.arguments).unwrap_or(Value::Null);
        send(
            json!({"type": "tool_call", "call_id": call.id, "tool_name": call.name,
                    "arguments": arguments, "requires_approval": false, "is_final": false}),
        )
        .await;
        tool_calls.push(json!({"id": call.id, "name": call.name, "arguments": arguments}));
    }
    relay.with_session(&id, |s| {
        let mut message = json!({"seq": s.messages.len() + 1, "role": "assistant", "content": text,
                                 "agent": "orchestrator", "created_at": now()});
        if !tool_calls.is_empty() {
            message["tool_calls"] = json!(tool_calls);
        }
        s.messages.push(message);
        s.open_call = calls.first().map(|c| (c.id.clone(), c.name.clone()));
    });
    let stop = if calls.is_empty() {
        "completed"
    } else {
        "awaiting_tool_result"
    };
    send(json!({"type": "done", "stop_reason": stop, "usage": usage, "is_final": true})).await;
}

/// Streams one model call: `on_token` for each text delta; returns the text, the tool calls and
/// the usage.
async fn model_call<F, Fut>(
    relay: &Relay,
    request: &Value,
    on_token: F,
) -> Result<(String, Vec<CallParts>, Value), String>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let response = relay
        .model
        .post(&relay.chat_url)
        .json(request)
        .send()
        .await
        .map_err(|e| format!("the model server did not answer: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("the model server answered {}", response.status()));
    }
    let mut body = response.bytes_stream();
    let mut decoder = SseDecoder::new();
    let (mut text, mut calls, mut usage) = (
        String::new(),
        Vec::<CallParts>::new(),
        json!({"prompt_tokens": 0, "completion_tokens": 0}),
    );
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("the model's stream broke: {e}"))?;
        for frame in decoder.push_frames(&chunk) {
            let SseFrame::Event { data, .. } = frame else {
                continue;
            };
            if data.trim() == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                return Err(format!("the model sent a chunk that is not JSON: {data}"));
            };
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                usage =
                    json!({"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"]});
            }
            let delta = &v["choices"][0]["delta"];
            if let Some(token) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                text.push_str(token);
                on_token(token.to_string()).await;
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = call["index"].as_u64().unwrap_or(0) as usize;
                if calls.len() <= index {
                    calls.resize_with(index + 1, CallParts::default);
                }
                let parts = &mut calls[index];
                if let Some(id) = call["id"].as_str() {
                    parts.id = id.to_string();
                }
                if let Some(name) = call["function"]["name"].as_str() {
                    parts.name.push_str(name);
                }
                if let Some(args) = call["function"]["arguments"].as_str() {
                    parts.arguments.push_str(args);
                }
            }
        }
    }
    Ok((text, calls, usage))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let Some(model_url) = arg("--llm-proxy-url") else {
        eprintln!("relay: --llm-proxy-url URL is required (the model server to relay)");
        return std::process::ExitCode::FAILURE;
    };
    let port = arg("--port").unwrap_or_else(|| "0".into());
    let listener = match tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("relay: cannot listen on 127.0.0.1:{port}: {e}; pick another --port");
            return std::process::ExitCode::FAILURE;
        }
    };
    let model = match reqwest::Client::builder().pool_max_idle_per_host(1024).build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay: cannot build the HTTP client: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let relay = Arc::new(Relay {
        sessions: Mutex::new(HashMap::new()),
        model,
        chat_url: format!("{}/v1/chat/completions", model_url.trim_end_matches('/')),
        key: arg("--internal-api-key"),
    });
    match listener.local_addr() {
        Ok(addr) => println!("listening on {addr}"),
        Err(e) => {
            eprintln!("relay: no local address: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let relay = relay.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(relay.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}
