//! An offline stand: a mock OpenAI-compatible model with scripted answers, and the real HTTP server
//! (`server::serve`, what the `agent-runtime-server` binary runs) on a free port of 127.0.0.1,
//! over SQLite in a temporary directory that also holds the session's project folder.

use std::path::PathBuf;
use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_server::{config, server};
use serde_json::json;

/// The token the stand's server requires in `x-internal-auth`.
pub const TOKEN: &str = "demo-token";

/// A running stand; the server task ends with the program.
pub struct Demo {
    /// `http://127.0.0.1:PORT` of the server.
    pub base: String,
    /// An empty project folder for sessions (`metadata.project_path`).
    pub project: PathBuf,
    /// The mock model (kept alive: dropping it stops it).
    pub llm: MockLlmServer,
    _dir: tempfile::TempDir,
}

/// The model's answers for "Создай новый виджет профиля": the routing call choosing the coder, the
/// coder's sentence and `write_file` call, its answer after the tool result, and a few spare answers
/// for later messages. `drip` slows the token stream so a client sees it arrive (and can lose its
/// connection mid-turn).
pub fn widget_script(drip: Duration) -> Vec<MockResponse> {
    let slow = |script: &Script| MockResponse::script(script).split_every(48).drip(drip);
    let mut answers = vec![
        MockResponse::script(&Script::tool_call(
            "route",
            json!({"agent": "coder", "reason": "the user wants new code"}),
        )),
        slow(
            &Script::tool_call(
                "write_file",
                json!({"path": "src/ProfileWidget.tsx", "content": "export const ProfileWidget = () => null;\n"}),
            )
            .with_text("Создаю виджет профиля."),
        ),
        slow(&Script::text("Готово: виджет создан.")),
    ];
    for _ in 0..5 {
        answers.push(slow(&Script::text(
            "Это демо: у модели больше нет заготовленных ответов.",
        )));
    }
    answers
}

/// Starts the mock model with `answers` queued, then the server, and waits until it answers `/health`.
pub async fn start(answers: Vec<MockResponse>) -> Result<Demo, String> {
    let llm = MockLlmServer::start().await.map_err(|e| e.to_string())?;
    for answer in answers {
        llm.push(answer);
    }
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let project = dir.path().join("project");
    std::fs::create_dir(&project).map_err(|e| format!("project dir: {e}"))?;
    let args = [
        "agent-runtime-server".to_string(),
        "--port=0".to_string(),
        format!(
            "--database-url=sqlite://{}",
            dir.path().join("agent-runtime.db").display()
        ),
        format!("--llm-proxy-url={}", llm.url()),
        format!("--internal-api-key={TOKEN}"),
    ];
    let config = config::load(args, |_| None).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| format!("cannot listen: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    tokio::spawn(async move {
        // The stand lives as long as the program: it never asks the server to stop.
        let forever = std::future::pending::<&'static str>();
        if let Err(e) = server::serve(config, listener, forever).await {
            eprintln!("demo server stopped: {e}");
        }
    });
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..100 {
        let health = client.get(format!("{base}/health")).send().await;
        if health.is_ok_and(|r| r.status().is_success()) {
            return Ok(Demo {
                base,
                project,
                llm,
                _dir: dir,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("the demo server did not answer on {base}"))
}
