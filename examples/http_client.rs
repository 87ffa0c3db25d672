//! Drives the HTTP API (API.md) from a small Rust client with reqwest: health → create a session →
//! stream a message (SSE) → list pending approvals → approve → read the history and the current
//! agent. Prints each request and what came back.
//!
//! By default it runs offline: it starts a mock OpenAI-compatible model with scripted answers and
//! the real server (in-process, on a free port, SQLite in a temp dir). With `--server URL` it talks
//! to a server you started instead (`cargo run -p agent-runtime-server`), whose model answers.
//!
//! Run: `cargo run -p agent-runtime-examples --example http_client`
//! or:  `cargo run -p agent-runtime-examples --example http_client -- --server http://127.0.0.1:8001 --project "$PWD"`

#[path = "support/demo.rs"]
mod demo;

use std::path::PathBuf;
use std::time::Duration;

use agent_runtime_core::test_kit::SseReader;
use clap::Parser;
use serde_json::{Value, json};

/// The command line.
#[derive(Debug, Parser)]
struct Args {
    /// A running server; without it the example starts its own, with a mock model.
    #[arg(long)]
    server: Option<String>,
    /// The server's `x-internal-auth` token (`INTERNAL_API_KEY`).
    #[arg(long, env = "INTERNAL_API_KEY")]
    token: Option<String>,
    /// The project folder for the session (absolute); default: the current directory.
    #[arg(long)]
    project: Option<PathBuf>,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The server's base URL, its token, and the client.
struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        println!("\n$ {method} {path}");
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.header("x-internal-auth", t),
            None => req,
        }
    }

    /// A JSON request; fails on a non-2xx status with the API's error body.
    async fn json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, Failure> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            println!("  {body}");
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let value: Value = resp.json().await?;
        println!("< {status}\n  {value}");
        if !status.is_success() {
            return Err(format!("{path}: {status} {value}").into());
        }
        Ok(value)
    }

    /// A streaming request: prints each SSE event as it arrives; returns the events' JSON.
    async fn stream(&self, path: &str, body: Value) -> Result<Vec<Value>, Failure> {
        let req = self.request(reqwest::Method::POST, path);
        println!("  {body}");
        let resp = req.json(&body).send().await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("{path}: {status} {}", resp.text().await?).into());
        }
        println!("< {status} {}", header(&resp, "content-type"));
        let mut reader = SseReader::new(resp);
        let mut events = Vec::new();
        while let Some(event) = reader.next().await? {
            println!("  id: {}  data: {}", event.id.unwrap_or_default(), event.data);
            events.push(serde_json::from_str(&event.data)?);
        }
        Ok(events)
    }
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn stop_reason(events: &[Value]) -> Option<&str> {
    events.last().and_then(|e| e["stop_reason"].as_str())
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let args = Args::parse();
    // Kept alive until the end: the stand stops when dropped.
    let (api, project, _stand) = match args.server {
        Some(base) => {
            let project = match args.project {
                Some(p) => p,
                None => std::env::current_dir()?,
            };
            let api = Api {
                base: base.trim_end_matches('/').to_string(),
                token: args.token,
                http: reqwest::Client::new(),
            };
            (api, project, None)
        }
        None => {
            let stand = demo::start(demo::listening_model(Duration::ZERO)).await?;
            println!(
                "offline stand: server {}, mock model {}",
                stand.base,
                stand.llm.url()
            );
            let api = Api {
                base: stand.base.clone(),
                token: Some(demo::TOKEN.to_string()),
                http: reqwest::Client::new(),
            };
            (api, stand.project.clone(), Some(stand))
        }
    };
    use reqwest::Method;

    api.json(Method::GET, "/health", None).await?;
    let created = api
        .json(
            Method::POST,
            "/api/v1/sessions",
            Some(json!({"user_id": "user_123", "metadata": {"project_path": project}})),
        )
        .await?;
    let sid = created["session_id"]
        .as_str()
        .ok_or("no session_id in the answer")?
        .to_string();

    let events = api
        .stream(
            "/api/v1/agent/message/stream",
            json!({"session_id": sid, "message": {"type": "user_message", "content": "Создай src/ProfileWidget.tsx: виджет профиля"}}),
        )
        .await?;

    if stop_reason(&events) == Some("awaiting_approval") {
        let pending = api
            .json(
                Method::GET,
                &format!("/api/v1/sessions/{sid}/pending-approvals"),
                None,
            )
            .await?;
        let approvals = pending["pending_approvals"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for approval in approvals {
            api.stream(
                &format!("/api/v1/sessions/{sid}/hitl-decision"),
                json!({"call_id": approval["call_id"], "decision": "approve"}),
            )
            .await?;
        }
    }

    api.json(Method::GET, &format!("/api/v1/sessions/{sid}/history"), None)
        .await?;
    api.json(Method::GET, &format!("/api/v1/agents/{sid}/current"), None)
        .await?;
    if _stand.is_some() {
        let written = std::fs::read_to_string(project.join("src/ProfileWidget.tsx"))?;
        println!(
            "\nwrote src/ProfileWidget.tsx ({} bytes) after the approval",
            written.len()
        );
    }
    Ok(())
}
