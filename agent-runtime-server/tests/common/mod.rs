//! Black-box harness: the real server binary on an ephemeral port (core's test kit runs the process
//! and reads the streams), a reqwest client, the server's auth token.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};

pub use agent_runtime_core::test_kit::EventStream as Sse;
use agent_runtime_core::test_kit::ServerProcess;
use serde_json::{Value, json};

pub const TOKEN: &str = "test-token-123";

/// The server process (killed when dropped), its temp dir, a client.
pub struct Server {
    pub process: ServerProcess,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
}

/// What the server starts with.
pub struct Options {
    pub llm_url: String,
    pub database_url: Option<String>,
    pub env: Vec<(String, String)>,
}

/// The server binary with `args` and only `env` (and `PATH`) in its environment.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent-runtime-server"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args)
        .envs(env.iter().copied());
    cmd
}

pub fn spawn_raw(args: &[&str], env: &[(&str, &str)]) -> Child {
    command(args, env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("server binary starts")
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
        let process = ServerProcess::start(command(&[], &env)).await.unwrap();
        Server {
            base: process.base.clone(),
            process,
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
        self.process.logs()
    }

    /// Stops the server with SIGTERM and waits; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        self.process.terminate()
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
