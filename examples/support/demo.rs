//! An offline stand: a mock OpenAI-compatible model that answers what it is sent, and the real HTTP server
//! (`server::serve`, what the `agent-runtime-server` binary runs) on a free port of 127.0.0.1,
//! over SQLite in a temporary directory that also holds the session's project folder.

use std::path::PathBuf;
use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_server::{config, server};
use serde_json::{Value, json};

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

/// What the demo project holds at the start, so a question has something to read.
const README: &str = "# Demo project\n\nThe folder `chat --demo` works in. Ask about it (the ask agent reads it), or ask to \
create or change a file (the coder writes it, after your approval).\n";

/// The demo's model: it reads each request and answers what a real model would, in small steps.
/// The routing call sends a request to create or change something to the coder and anything else
/// to the ask agent; the coder calls `write_file` (which needs approval) for the file the message
/// names, the ask agent calls `read_file` on it (or `list_files` when it names none), and after the
/// tool result both answer from what the tool returned. `drip` slows the token stream so a client
/// sees it arrive (and can lose its connection mid-turn).
pub fn listening_model(drip: Duration) -> impl Fn(&Value) -> MockResponse + Send + Sync + 'static {
    move |request: &Value| {
        let slow = |script: &Script| MockResponse::script(script).split_every(48).drip(drip);
        let tools: Vec<&str> = request["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["function"]["name"].as_str())
            .collect();
        let messages: &[Value] = request["messages"].as_array().map_or(&[], Vec::as_slice);
        let said = messages
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default();
        let lang = Lang::of(said);
        let wants_change = asks_for_a_change(said);
        if tools.contains(&"route") {
            let (agent, reason) = match (wants_change, lang) {
                (true, Lang::Ru) => ("coder", "просят создать или изменить файл"),
                (true, Lang::En) => ("coder", "the message asks to create or change a file"),
                (false, Lang::Ru) => ("ask", "это вопрос о проекте"),
                (false, Lang::En) => ("ask", "the message is a question about the project"),
            };
            return MockResponse::script(&Script::tool_call(
                "route",
                json!({"agent": agent, "reason": reason}),
            ));
        }
        // After a tool result the agent answers from it; after a hand-over the new agent starts on
        // the message afresh.
        if let Some(result) = messages.last().filter(|m| m["role"] == "tool") {
            let tool = called_tool(messages, result);
            if tool != "switch_agent" {
                return slow(&Script::text(answer_from(tool, result, lang)));
            }
        }
        let file = named_file(said);
        if wants_change && !tools.contains(&"write_file") && tools.contains(&"switch_agent") {
            let reason = match lang {
                Lang::Ru => "нужно записать файл",
                Lang::En => "a file needs writing",
            };
            return MockResponse::script(&Script::tool_call(
                "switch_agent",
                json!({"agent_type": "coder", "reason": reason}),
            ));
        }
        if wants_change && tools.contains(&"write_file") {
            let path = file.unwrap_or_else(|| "notes.md".to_string());
            let content = content_for(&path, said);
            let text = match lang {
                Lang::Ru => format!("Записываю {path}."),
                Lang::En => format!("Writing {path}."),
            };
            return slow(
                &Script::tool_call("write_file", json!({"path": path, "content": content})).with_text(text),
            );
        }
        match file {
            Some(path) if tools.contains(&"read_file") => {
                slow(&Script::tool_call("read_file", json!({"path": path})))
            }
            _ if tools.contains(&"list_files") => slow(&Script::tool_call("list_files", json!({}))),
            _ => slow(&Script::text(match lang {
                Lang::Ru => "Это демо-модель: она читает проект и пишет файлы, когда её просят.",
                Lang::En => "This is the demo model: it reads the project, and writes files when asked.",
            })),
        }
    }
}

#[derive(Clone, Copy)]
enum Lang {
    Ru,
    En,
}

impl Lang {
    /// Russian when the message has Cyrillic letters, English otherwise.
    fn of(text: &str) -> Lang {
        if text.chars().any(|c| ('\u{400}'..='\u{4ff}').contains(&c)) {
            Lang::Ru
        } else {
            Lang::En
        }
    }
}

/// Whether the message asks to create or change something: one of its words starts like a verb
/// that does.
fn asks_for_a_change(text: &str) -> bool {
    const VERBS: &[&str] = &[
        "созда",
        "добав",
        "измен",
        "исправ",
        "напиш",
        "перепиш",
        "обнов",
        "сделай",
        "переимен",
        "допиш",
        "create",
        "add",
        "change",
        "write",
        "fix",
        "update",
        "make",
        "rename",
        "edit",
        "implement",
        "refactor",
    ];
    text.split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .any(|word| VERBS.iter().any(|verb| word.starts_with(verb)))
}

/// The first word that looks like a file path (`notes.md`, `src/App.tsx`).
fn named_file(text: &str) -> Option<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| ",;:!?\"'`()«»".contains(c))
                .trim_end_matches('.')
        })
        .find(|w| {
            w.rsplit_once('.').is_some_and(|(stem, ext)| {
                !stem.is_empty()
                    && (1..=5).contains(&ext.len())
                    && ext.chars().all(|c| c.is_ascii_alphanumeric())
            })
        })
        .map(str::to_string)
}

/// What the coder writes into `path` for the request `said`.
fn content_for(path: &str, said: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let (stem, ext) = file.rsplit_once('.').unwrap_or((file, ""));
    match ext {
        "ts" | "tsx" | "js" | "jsx" => format!("export const {stem} = () => null;\n"),
        "md" => format!("# {stem}\n\n{said}\n"),
        _ => format!("{said}\n"),
    }
}

/// The name of the tool whose result `result` is.
fn called_tool<'a>(messages: &'a [Value], result: &Value) -> &'a str {
    messages
        .iter()
        .rev()
        .filter_map(|m| m["tool_calls"].as_array())
        .flatten()
        .find(|c| c["id"] == result["tool_call_id"])
        .and_then(|c| c["function"]["name"].as_str())
        .unwrap_or_default()
}

/// The answer after a result of `tool`, from what the tool returned.
fn answer_from(tool: &str, result: &Value, lang: Lang) -> String {
    let content = result["content"].as_str().unwrap_or_default();
    let parsed: Value = serde_json::from_str(content).unwrap_or(Value::Null);
    if tool == "write_file" {
        return match (&parsed["bytes_written"], lang) {
            (Value::Number(n), Lang::Ru) => format!(
                "Готово: {} записан ({n} байт).",
                parsed["path"].as_str().unwrap_or("файл")
            ),
            (Value::Number(n), Lang::En) => format!(
                "Done: {} written ({n} bytes).",
                parsed["path"].as_str().unwrap_or("the file")
            ),
            (_, Lang::Ru) => format!("Файл не записан: {}", excerpt(content)),
            (_, Lang::En) => format!("Nothing written: {}", excerpt(content)),
        };
    }
    match lang {
        Lang::Ru => format!("Вот что я прочитал ({tool}): {}", excerpt(content)),
        Lang::En => format!("Here is what I read ({tool}): {}", excerpt(content)),
    }
}

/// `text` on one line, cut at 200 characters.
fn excerpt(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// Starts the mock model answering with `model`, then the server, and waits until it answers
/// `/health`. The project folder starts with a `README.md`.
pub async fn start(model: impl Fn(&Value) -> MockResponse + Send + Sync + 'static) -> Result<Demo, String> {
    let llm = MockLlmServer::start().await.map_err(|e| e.to_string())?;
    llm.respond_with(model);
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let project = dir.path().join("project");
    std::fs::create_dir(&project).map_err(|e| format!("project dir: {e}"))?;
    std::fs::write(project.join("README.md"), README).map_err(|e| format!("project README: {e}"))?;
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
