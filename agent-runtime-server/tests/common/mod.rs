//! Black-box harness: the real server binary on an ephemeral port, a reqwest client, SSE reading.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde_json::{Value, json};

pub const TOKEN: &str = "test-token-123";

/// The server process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    /// Everything the server wrote to stderr so far (its logs), read by a thread so that a chatty
    /// server never blocks on a full pipe. `AGENT_RUNTIME_TEST_LOGS=1` also echoes it as it comes.
    pub logs: Arc<Mutex<String>>,
}

/// Reads the child's stderr to its end on a thread of its own.
fn drain_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let logs = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = child.stderr.take() {
        let (sink, echo) = (
            logs.clone(),
            std::env::var_os("AGENT_RUNTIME_TEST_LOGS").is_some(),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[server] {line}");
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
    }
    logs
}

/// What the server starts with.
pub struct Options {
    pub llm_url: String,
    pub database_url: Option<String>,
    pub env: Vec<(String, String)>,
}

pub fn spawn_raw(args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent-runtime-server"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("server binary starts")
}

impl Server {
    pub async fn start(llm_url: &str) -> Server {
        Self::start_with(llm_url, None, &[]).await
    }

    pub async fn start_with(llm_url: &str, database_url: Option<&str>, extra: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let db = database_url
            .map(String::from)
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("rt.db").display()));
        Self::start_in(dir, llm_url, &db, extra).await
    }

    pub async fn start_in(dir: tempfile::TempDir, llm_url: &str, db: &str, extra: &[(&str, &str)]) -> Server {
        let mut env: Vec<(&str, &str)> = vec![
            ("PORT", "0"),
            ("DATABASE_URL", db),
            ("LLM_PROXY_URL", llm_url),
            ("INTERNAL_API_KEY", TOKEN),
            ("LOG_LEVEL", "warn"),
        ];
        env.extend_from_slice(extra);
        let mut child = spawn_raw(&[], &env);
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let logs = drain_stderr(&mut child);
        Server {
            child,
            logs,
            base: format!("http://{addr}"),
            dir,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).header("x-internal-auth", TOKEN)
    }

    pub fn post(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.url(path))
            .header("x-internal-auth", TOKEN)
            .json(&body)
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .delete(self.url(path))
            .header("x-internal-auth", TOKEN)
    }

    /// `GET path` with the auth header, the body as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).send().await.unwrap().json().await.unwrap()
    }

    /// Creates a session with `body`, returns its id.
    pub async fn session(&self, body: Value) -> String {
        let r = self.post("/api/v1/sessions", body).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        v["session_id"].as_str().unwrap().to_string()
    }

    /// Sends a message and reads its stream to the end.
    pub async fn send(&self, session_id: &str, message: Value) -> Vec<Value> {
        let r = self
            .post(
                "/agent/message/stream",
                json!({"session_id": session_id, "message": message}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        Sse::new(r).all().await
    }

    /// What the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Stops the server with SIGTERM and waits; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap().success()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An SSE response read incrementally.
pub struct Sse {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
    /// Every frame seen, comments included, raw.
    pub frames: Vec<String>,
}

impl Sse {
    pub fn new(r: reqwest::Response) -> Sse {
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        assert_eq!(r.headers()["cache-control"], "no-cache");
        assert_eq!(r.headers()["x-accel-buffering"], "no");
        Sse {
            stream: r.bytes_stream().boxed(),
            buf: String::new(),
            frames: Vec::new(),
        }
    }

    /// The next frame (event or comment), `None` at the end of the body.
    pub async fn next_frame(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame = self.buf[..end].to_string();
                self.buf.drain(..end + 2);
                self.frames.push(frame.clone());
                return Some(frame);
            }
            match self.stream.next().await {
                Some(Ok(b)) => self.buf.push_str(std::str::from_utf8(&b).unwrap()),
                Some(Err(e)) => panic!("stream failed: {e}"),
                None => {
                    assert!(self.buf.is_empty(), "trailing bytes {:?}", self.buf);
                    return None;
                }
            }
        }
    }

    /// The next event (comments skipped); checks `id:` equals the event's seq.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let frame = self.next_frame().await?;
            if frame.starts_with(':') {
                continue;
            }
            let mut lines = frame.lines();
            let id: u64 = lines
                .next()
                .unwrap()
                .strip_prefix("id: ")
                .unwrap()
                .parse()
                .unwrap();
            let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
            assert_eq!(lines.next(), None);
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["seq"], id);
            return Some(v);
        }
    }

    /// Every remaining event.
    pub async fn all(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

/// `type` of each event, with the `stop_reason` of `done`.
pub fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e["type"].as_str().unwrap() {
            "done" => format!("done:{}", e["stop_reason"].as_str().unwrap()),
            "assistant_message" if e["is_final"] == true => "assistant_final".to_string(),
            "assistant_message" => "token".to_string(),
            t => t.to_string(),
        })
        .filter(|k| k != "token")
        .collect()
}

pub fn find<'a>(events: &'a [Value], kind: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {events:#?}"))
}

/// The error body of a response, with its status.
pub async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

pub fn err(code: &str) -> Value {
    json!(code)
}
