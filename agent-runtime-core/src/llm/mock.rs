//! A mock OpenAI-compatible model server on 127.0.0.1 for tests and benches: a small hand-written
//! HTTP/1.1 responder serving `/v1/chat/completions` from a queue of canned responses, and other
//! paths (`/v1/models`, llama.cpp's `/props`, ...) from fixed answers.
//!
//! Hand-written rather than hyper so a response can misbehave the way real servers do: a body cut
//! at any byte, dripped slowly, a stall, a dropped connection, an empty 200.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::scripted::Script;
use crate::error::{Error, Result};

/// The biggest request head or body the mock accepts.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// How an SSE body is cut into pieces on the wire.
#[derive(Debug, Clone, PartialEq)]
enum Split {
    Whole,
    Every(usize),
    At(Vec<usize>),
}

/// How a streamed body ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    /// The chunked body is terminated properly.
    Complete,
    /// The connection is closed mid-body.
    Abort,
    /// Nothing more is sent; the connection stays open.
    Stall,
}

/// One canned answer to a chat-completions request.
#[derive(Debug, Clone, PartialEq)]
pub enum MockResponse {
    /// `200 text/event-stream` with this body, chunked on the wire.
    Sse {
        /// The body bytes.
        body: Vec<u8>,
        /// How the body is cut into writes.
        split: SplitSpec,
        /// Pause between two pieces.
        delay: Duration,
        /// How the body ends.
        end: EndSpec,
    },
    /// Any status with a body and extra headers (500, 429 with `Retry-After`, ...).
    Status {
        /// The status code.
        status: u16,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// The body.
        body: String,
    },
    /// The connection is closed after the request is read, without an answer.
    Reset,
    /// The request is read and never answered.
    Hang,
    /// `200 text/event-stream` with an empty body (llama-cpp-python on some errors).
    Empty,
    /// These bytes exactly (a captured response: head and body), then the connection closes.
    Raw(Vec<u8>),
}

/// How an SSE body is cut into writes (see [`MockResponse::split_every`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSpec(Split);

/// How an SSE body ends (see [`MockResponse::then_abort`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndSpec(End);

impl MockResponse {
    /// A streamed answer with this exact body (e.g. a captured fixture), sent in one write.
    pub fn sse(body: impl Into<Vec<u8>>) -> Self {
        MockResponse::Sse {
            body: body.into(),
            split: SplitSpec(Split::Whole),
            delay: Duration::ZERO,
            end: EndSpec(End::Complete),
        }
    }

    /// A streamed answer playing `script` on the OpenAI wire.
    pub fn script(script: &Script) -> Self {
        Self::sse(script.sse_body("mock-model"))
    }

    /// An answer with `status` and `body`.
    pub fn status(status: u16, body: impl Into<String>) -> Self {
        MockResponse::Status {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The connection closed without an answer.
    pub fn reset() -> Self {
        MockResponse::Reset
    }

    /// No answer at all.
    pub fn hang() -> Self {
        MockResponse::Hang
    }

    /// `200` with an empty event stream.
    pub fn empty() -> Self {
        MockResponse::Empty
    }

    /// A captured response written byte for byte (head and body), then the connection closed.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        MockResponse::Raw(bytes.into())
    }

    /// Adds a header to a [`MockResponse::Status`] answer.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        if let MockResponse::Status { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    fn with_sse(mut self, f: impl FnOnce(&mut SplitSpec, &mut Duration, &mut EndSpec)) -> Self {
        if let MockResponse::Sse {
            split, delay, end, ..
        } = &mut self
        {
            f(split, delay, end);
        }
        self
    }

    /// Writes the body `n` bytes at a time (1: byte by byte, splitting UTF-8 characters and CRLFs).
    pub fn split_every(self, n: usize) -> Self {
        self.with_sse(|split, _, _| *split = SplitSpec(Split::Every(n.max(1))))
    }

    /// Writes the body in pieces cut at these byte offsets.
    pub fn split_at(self, offsets: Vec<usize>) -> Self {
        self.with_sse(|split, _, _| *split = SplitSpec(Split::At(offsets)))
    }

    /// Pauses this long between two pieces.
    pub fn drip(self, delay: Duration) -> Self {
        self.with_sse(|_, d, _| *d = delay)
    }

    /// Closes the connection after the body without ending the chunked encoding (a cut transfer).
    pub fn then_abort(self) -> Self {
        self.with_sse(|_, _, end| *end = EndSpec(End::Abort))
    }

    /// Sends the body, then nothing more while keeping the connection open (a stalled model).
    pub fn then_stall(self) -> Self {
        self.with_sse(|_, _, end| *end = EndSpec(End::Stall))
    }
}

/// A request the mock received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The request target.
    pub path: String,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The JSON body (`Null` when empty or not JSON).
    pub body: Value,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Answers a chat-completions request body when no canned answer is queued.
pub type Responder = Arc<dyn Fn(&Value) -> MockResponse + Send + Sync>;

#[derive(Default)]
struct Shared {
    queue: Mutex<VecDeque<MockResponse>>,
    /// Fixed answers by method and path (every request gets the same one).
    fixed: Mutex<Vec<(String, String, MockResponse)>>,
    requests: Mutex<Vec<RecordedRequest>>,
    count: AtomicUsize,
    responder: Mutex<Option<Responder>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queue", &self.queue)
            .field("requests", &self.requests)
            .field("count", &self.count)
            .field("responder", &lock(&self.responder).is_some())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running mock model server; stops when dropped.
#[derive(Debug)]
pub struct MockLlmServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl MockLlmServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Internal(format!("mock model server cannot bind: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("mock model server has no address: {e}")))?;
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(MockLlmServer { addr, shared, stop })
    }

    /// The base URL (`http://127.0.0.1:PORT`), as `LLM_PROXY_URL` would be.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues the answer to the next chat-completions request. With the queue empty, requests get
    /// a 500 saying so.
    pub fn push(&self, response: MockResponse) {
        lock(&self.shared.queue).push_back(response);
    }

    /// Answers every `method` request for `path` (query string ignored) with `response` from now
    /// on: a model server's `/props` or `/api/show`, or a `/v1/models` that hangs
    /// ([`MockResponse::hang`]) instead of the built-in list naming `mock-model`.
    pub fn answer(&self, method: &str, path: &str, response: MockResponse) {
        let mut fixed = lock(&self.shared.fixed);
        fixed.retain(|(m, p, _)| !(m == method && p == path));
        fixed.push((method.to_string(), path.to_string(), response));
    }

    /// Answers every request that finds the queue empty by calling `responder` with its JSON body:
    /// a model that reacts to what it is sent (the `chat --demo` stand).
    pub fn respond_with(&self, responder: impl Fn(&Value) -> MockResponse + Send + Sync + 'static) {
        *lock(&self.shared.responder) = Some(Arc::new(responder));
    }

    /// The JSON bodies of the chat-completions requests received, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.shared.requests)
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    /// The chat-completions requests received, with method, path and headers.
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// How many chat-completions requests arrived.
    pub fn request_count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Canned answers not used yet.
    pub fn remaining(&self) -> usize {
        lock(&self.shared.queue).len()
    }
}

impl Drop for MockLlmServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((socket, _)) = accepted else { continue };
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve(socket, shared, stop.clone()) => {}
            }
        });
    }
}

/// Serves one request on the connection (every answer says `Connection: close`).
async fn serve(mut socket: TcpStream, shared: Arc<Shared>, stop: CancellationToken) -> std::io::Result<()> {
    let Some(request) = read_request(&mut socket).await? else {
        return Ok(());
    };
    let path = request.path.split('?').next().unwrap_or_default();
    let fixed = lock(&shared.fixed)
        .iter()
        .find(|(m, p, _)| *m == request.method && p == path)
        .map(|(_, _, r)| r.clone());
    if let Some(response) = fixed {
        return respond(&mut socket, Some(response), &stop).await;
    }
    if request.method == "GET" && path.ends_with("/models") {
        let body = r#"{"object":"list","data":[{"id":"mock-model","object":"model"}]}"#;
        return write_status(&mut socket, 200, &[], body).await;
    }
    if request.method != "POST" || !path.ends_with("/chat/completions") {
        return write_status(&mut socket, 404, &[], r#"{"error":{"message":"not found"}}"#).await;
    }
    shared.count.fetch_add(1, Ordering::SeqCst);
    let body = request.body.clone();
    lock(&shared.requests).push(request);
    let queued = lock(&shared.queue).pop_front();
    let responder = lock(&shared.responder).clone();
    let response = queued.or_else(|| responder.map(|answer| answer(&body)));
    respond(&mut socket, response, &stop).await
}

/// Writes one canned answer (`None`: the queue ran dry).
async fn respond(
    socket: &mut TcpStream,
    response: Option<MockResponse>,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    match response {
        None => {
            let body = r#"{"error":{"message":"mock: no canned response left"}}"#;
            write_status(socket, 500, &[], body).await
        }
        Some(MockResponse::Status {
            status,
            headers,
            body,
        }) => write_status(socket, status, &headers, &body).await,
        Some(MockResponse::Reset) => Ok(()),
        Some(MockResponse::Raw(bytes)) => {
            socket.write_all(&bytes).await?;
            socket.flush().await
        }
        Some(MockResponse::Hang) => {
            stop.cancelled().await;
            Ok(())
        }
        Some(MockResponse::Empty) => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 0\r\n\
                        connection: close\r\n\r\n";
            socket.write_all(head.as_bytes()).await?;
            socket.flush().await
        }
        Some(MockResponse::Sse {
            body,
            split,
            delay,
            end,
        }) => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                        transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            socket.write_all(head.as_bytes()).await?;
            socket.flush().await?;
            for (i, piece) in cut(&body, &split.0).into_iter().enumerate() {
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                socket
                    .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
                socket.write_all(piece).await?;
                socket.write_all(b"\r\n").await?;
                socket.flush().await?;
            }
            match end.0 {
                End::Complete => {
                    socket.write_all(b"0\r\n\r\n").await?;
                    socket.flush().await
                }
                End::Abort => Ok(()),
                End::Stall => {
                    stop.cancelled().await;
                    Ok(())
                }
            }
        }
    }
}

fn cut<'a>(body: &'a [u8], split: &Split) -> Vec<&'a [u8]> {
    let pieces: Vec<&[u8]> = match split {
        Split::Whole => vec![body],
        Split::Every(n) => body.chunks(*n).collect(),
        Split::At(offsets) => {
            let mut pieces = Vec::new();
            let mut start = 0;
            for &at in offsets {
                let at = at.min(body.len());
                if at > start {
                    pieces.push(&body[start..at]);
                    start = at;
                }
            }
            pieces.push(&body[start..]);
            pieces
        }
    };
    // An empty chunk would end a chunked body early.
    pieces.into_iter().filter(|p| !p.is_empty()).collect()
}

async fn write_status(
    socket: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} Mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.flush().await
}

/// Reads one request (head and `content-length` body); `None` if the client went away first.
async fn read_request(socket: &mut TcpStream) -> std::io::Result<Option<RecordedRequest>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(None);
        }
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_REQUEST_BYTES);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok(Some(RecordedRequest {
        method,
        path,
        headers,
        body,
    }))
}
