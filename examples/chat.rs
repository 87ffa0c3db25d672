//! `chat`: an interactive terminal client for the runtime's HTTP server — how a person uses the
//! runtime without an IDE. It streams the assistant's tokens as they arrive, shows agent switches
//! and tool calls, asks `approve / edit / reject?` when a tool needs approval (edit takes the new
//! arguments as one JSON line, or opens `$EDITOR` when standard input is a terminal), and when the
//! connection drops mid-turn it reconnects to `GET /sessions/{id}/events` with `Last-Event-ID`, so
//! nothing is lost or shown twice. Connection notices go to standard error.
//!
//! Against a server (`cargo run -p agent-runtime-server`, with a model configured):
//!
//!     cargo run -p agent-runtime-examples --bin chat -- --server http://127.0.0.1:8001 --project "$PWD"
//!
//! Offline, with a demo model and an in-process server (`--drop-after 3` also cuts the first stream
//! after three events, to show the reconnect). The demo model reacts to what is typed: a question
//! goes to the ask agent, which reads the project; a request to create or change a file goes to the
//! coder, whose `write_file` waits for your approval:
//!
//!     cargo run -p agent-runtime-examples --bin chat -- --demo
//!     printf 'Создай src/ProfileWidget.tsx: виджет профиля\napprove\n/quit\n' | cargo run -p agent-runtime-examples --bin chat -- --demo --drop-after 3
//!
//! Commands: a line of text is a message; `/agent TYPE [text]` switches agent; `/agents` lists them;
//! `/pending` decides pending approvals; `/cancel` stops the turn; `/quit` (or end of input) leaves,
//! at every prompt, the approval prompt included.

#[path = "support/demo.rs"]
mod demo;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_runtime_core::test_kit::SseReader;
use clap::Parser;
use reqwest::Method;
use serde_json::{Value, json};

/// How many times in a row a lost stream is reconnected before giving up.
const MAX_RECONNECTS: u32 = 5;

/// The command line.
#[derive(Debug, Parser)]
#[command(about = "An interactive terminal client for agent-runtime-server.")]
struct Args {
    /// The server's base URL.
    #[arg(long, env = "AGENT_RUNTIME_URL", default_value = "http://127.0.0.1:8001")]
    server: String,
    /// The `x-internal-auth` token (the server's `INTERNAL_API_KEY`).
    #[arg(long, env = "INTERNAL_API_KEY")]
    token: Option<String>,
    /// Continue this session instead of creating one.
    #[arg(long)]
    session: Option<String>,
    /// The project folder tools work in, for a new session; default: the current directory.
    #[arg(long)]
    project: Option<PathBuf>,
    /// Run offline: start a mock model and a server in-process (ignores --server and --token).
    #[arg(long)]
    demo: bool,
    /// Cut the first stream after N events, once, to exercise the reconnect.
    #[arg(long, value_name = "N")]
    drop_after: Option<usize>,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Prints events as lines, keeping a token stream on one line.
#[derive(Debug, Default)]
struct Screen {
    /// Tokens were printed and the line is not ended yet.
    mid_line: bool,
    /// The current assistant message streamed tokens (its final event need not repeat the text).
    streamed: bool,
    /// A notice already broke the current token line on the terminal.
    noticed: bool,
}

impl Screen {
    fn line(&mut self, text: &str) {
        self.end_line();
        println!("{text}");
    }

    fn end_line(&mut self) {
        if self.mid_line {
            println!();
            self.mid_line = false;
        }
    }

    /// A notice about the connection, on standard error so the conversation on standard output
    /// stays whole; on its own line when it interrupts a token stream.
    fn notice(&mut self, text: &str) {
        let _ = std::io::stdout().flush();
        let gap = if self.mid_line && !self.noticed { "\n" } else { "" };
        self.noticed = true;
        eprintln!("{gap}{text}");
    }

    fn show(&mut self, e: &Value) {
        self.noticed = false;
        let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
        match e["type"].as_str().unwrap_or_default() {
            "assistant_message" if e["is_final"] != true => {
                print!("{}", s("token"));
                let _ = std::io::stdout().flush();
                self.mid_line = true;
                self.streamed = true;
            }
            "assistant_message" => {
                if !self.streamed {
                    print!("{}", s("content"));
                }
                self.mid_line = true;
                self.streamed = false;
                self.end_line();
            }
            "agent_switched" => self.line(&format!(
                "[agent: {} → {}] {}",
                s("from_agent"),
                s("to_agent"),
                s("reason")
            )),
            "tool_call" => {
                let flag = if e["requires_approval"] == true {
                    " (needs approval)"
                } else {
                    ""
                };
                self.line(&format!("[tool] {} {}{flag}", s("tool_name"), e["arguments"]));
            }
            "tool_result" => {
                let outcome = match e.get("error") {
                    Some(err) if !err.is_null() => format!("error {}", compact(err)),
                    _ => compact(&e["result"]),
                };
                self.line(&format!("[tool result] {}: {outcome}", s("tool_name")));
            }
            "approval_resolved" => self.line(&format!("[approval] {}: {}", s("call_id"), s("decision"))),
            "plan_proposed" | "plan_updated" => {
                self.line(&format!("[plan] {}", s("goal")));
                for t in e["subtasks"].as_array().into_iter().flatten() {
                    let status = t["status"]
                        .as_str()
                        .map(|x| format!(" ({x})"))
                        .unwrap_or_default();
                    self.line(&format!(
                        "  {} [{}] {}{status}",
                        t["id"],
                        t["agent"].as_str().unwrap_or_default(),
                        t["description"].as_str().unwrap_or_default()
                    ));
                }
            }
            "error" => self.line(&format!("[error {}] {}", s("code"), s("message"))),
            "done" => self.line(&format!(
                "[done: {}; tokens {} prompt + {} completion]",
                s("stop_reason"),
                e["usage"]["prompt_tokens"],
                e["usage"]["completion_tokens"]
            )),
            other => self.line(&format!("[{other}] {}", compact(e))),
        }
    }
}

fn compact(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// One line of standard input without its newline; `None` at end of input. When the input is not
/// a terminal the line is echoed, so a piped session reads like a typed one.
async fn read_line(prompt: &str) -> Option<String> {
    print!("{prompt}");
    let _ = std::io::stdout().flush();
    let line = tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        match std::io::stdin().read_line(&mut s) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(s.trim_end_matches(['\n', '\r']).to_string()),
        }
    })
    .await
    .ok()
    .flatten();
    if !std::io::stdin().is_terminal() {
        println!("{}", line.as_deref().unwrap_or(""));
    }
    line
}

/// The client: the server, the session, and how far its events have been shown.
struct Chat {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    session: String,
    /// The seq of the last event shown: the `Last-Event-ID` of a reconnect, and the guard
    /// against showing an event twice.
    last_seq: u64,
    /// `--drop-after`, until it has been used.
    drop_after: Option<usize>,
    screen: Screen,
}

impl Chat {
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.header("x-internal-auth", t),
            None => req,
        }
    }

    /// A JSON call; an API error is shown and returned as `None`.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>, Failure> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            self.show_http_error(resp).await;
            return Ok(None);
        }
        Ok(Some(resp.json().await?))
    }

    async fn show_http_error(&mut self, resp: reqwest::Response) {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let e = &body["error"];
        match (e["code"].as_str(), e["message"].as_str()) {
            (Some(code), Some(message)) => self.screen.line(&format!("[error {code}] {message}")),
            _ => self.screen.line(&format!("[error] HTTP {status}")),
        }
    }

    /// A POST answered with an event stream, followed to its `done`; returns the stop reason.
    async fn post_stream(&mut self, path: &str, body: Value) -> Result<Option<String>, Failure> {
        let resp = self.request(Method::POST, path).json(&body).send().await?;
        if !resp.status().is_success() {
            self.show_http_error(resp).await;
            return Ok(None);
        }
        self.follow(resp).await
    }

    /// Shows a stream's events until `done`. A dropped connection (or `--drop-after`) is resumed
    /// from `GET /sessions/{id}/events` with `Last-Event-ID`: the turn went on without us, and the
    /// server replays what we missed, then follows the turn live.
    async fn follow(&mut self, resp: reqwest::Response) -> Result<Option<String>, Failure> {
        let mut reader = SseReader::new(resp);
        let mut shown = 0usize;
        let mut attempts = 0u32;
        loop {
            match reader.next().await {
                Ok(Some(frame)) => {
                    attempts = 0;
                    let event: Value = serde_json::from_str(&frame.data)?;
                    let seq = frame.id.or(event["seq"].as_u64()).unwrap_or(0);
                    if seq <= self.last_seq {
                        continue; // already shown before a reconnect
                    }
                    self.last_seq = seq;
                    self.screen.show(&event);
                    if event["type"] == "done" {
                        return Ok(event["stop_reason"].as_str().map(String::from));
                    }
                    shown += 1;
                    if self.drop_after != Some(shown) {
                        continue;
                    }
                    self.drop_after = None;
                    self.screen
                        .notice(&format!("[connection dropped on purpose after event {seq}]"));
                }
                Ok(None) => self.screen.notice("[connection closed before the turn ended]"),
                Err(e) => self.screen.notice(&format!("[connection lost: {e}]")),
            }
            reader = loop {
                attempts += 1;
                if attempts > MAX_RECONNECTS {
                    return Err(format!("gave up after {MAX_RECONNECTS} reconnects").into());
                }
                self.screen.notice(&format!(
                    "[reconnecting: GET /sessions/{}/events, Last-Event-ID: {}]",
                    self.session, self.last_seq
                ));
                let resumed = self
                    .request(Method::GET, &format!("/sessions/{}/events", self.session))
                    .header("last-event-id", self.last_seq.to_string())
                    .send()
                    .await;
                match resumed {
                    Ok(r) if r.status().is_success() => {
                        self.screen.notice("[reconnected]");
                        break SseReader::new(r);
                    }
                    Ok(r) => self.show_http_error(r).await,
                    Err(e) => self.screen.notice(&format!("[reconnect failed: {e}]")),
                }
                tokio::time::sleep(Duration::from_millis(300 * u64::from(attempts))).await;
            };
        }
    }

    /// Sends a message of the API's `message` shape and handles what the turn asks for.
    async fn send(&mut self, message: Value) -> Result<bool, Failure> {
        let body = json!({"session_id": self.session, "message": message});
        let stop = self.post_stream("/agent/message/stream", body).await?;
        self.after(stop).await
    }

    /// What a stream's stop reason asks of the user; `false` when the input ended.
    async fn after(&mut self, stop: Option<String>) -> Result<bool, Failure> {
        match stop.as_deref() {
            Some("awaiting_approval") => self.decide_pending().await,
            Some("awaiting_tool_result") => {
                self.screen.line(CLIENT_MODE);
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// Asks about each pending approval in turn until none is left; `false` when the input ended.
    async fn decide_pending(&mut self) -> Result<bool, Failure> {
        loop {
            let path = format!("/sessions/{}/pending-approvals", self.session);
            let Some(list) = self.call(Method::GET, &path, None).await? else {
                return Ok(true);
            };
            let Some(approval) = list["pending_approvals"].get(0).cloned() else {
                return Ok(true);
            };
            self.screen.line(&format!(
                "[approval needed] {} {} — {}",
                approval["tool_name"].as_str().unwrap_or_default(),
                approval["arguments"],
                approval["reason"].as_str().unwrap_or_default()
            ));
            let Some(answer) = read_line("approve / edit / reject? ").await else {
                return Ok(false);
            };
            let (verb, rest) = answer.trim().split_once(' ').unwrap_or((answer.trim(), ""));
            let call_id = approval["call_id"].clone();
            let decision = match verb {
                // Leaves chat; the approval stays pending (`--session ID` picks it up again).
                "/quit" | "/exit" => return Ok(false),
                "approve" | "a" | "y" | "yes" => json!({"call_id": call_id, "decision": "approve"}),
                "edit" | "e" => match edit(&approval["arguments"]).await? {
                    Some(args) => json!({"call_id": call_id, "decision": "edit", "modified_arguments": args}),
                    None => return Ok(false),
                },
                "reject" | "r" | "n" | "no" => {
                    let mut d = json!({"call_id": call_id, "decision": "reject"});
                    if !rest.trim().is_empty() {
                        d["feedback"] = json!(rest.trim());
                    }
                    d
                }
                _ => {
                    self.screen.line(
                        "answer approve, edit or reject (reject may add feedback: `reject use .ts`), or /quit",
                    );
                    continue;
                }
            };
            let path = format!("/sessions/{}/hitl-decision", self.session);
            let stop = self.post_stream(&path, decision).await?;
            if stop.as_deref() == Some("awaiting_tool_result") {
                self.screen.line(CLIENT_MODE);
                return Ok(true);
            }
        }
    }

    async fn list_agents(&mut self) -> Result<(), Failure> {
        if let Some(list) = self.call(Method::GET, "/agents", None).await? {
            for a in list["agents"].as_array().into_iter().flatten() {
                self.screen.line(&format!(
                    "  {} {:<12} {}",
                    a["emoji"].as_str().unwrap_or_default(),
                    a["type"].as_str().unwrap_or_default(),
                    a["name"].as_str().unwrap_or_default()
                ));
            }
        }
        Ok(())
    }
}

/// New arguments for an edit: `$VISUAL`/`$EDITOR` on a temp file when standard input is a
/// terminal, else one JSON object line (empty keeps the arguments). `None` when the input ended.
async fn edit(current: &Value) -> Result<Option<Value>, Failure> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .ok()
        .filter(|e| !e.trim().is_empty());
    if let (Some(editor), true) = (editor, std::io::stdin().is_terminal()) {
        let file = tempfile::Builder::new().suffix(".json").tempfile()?;
        std::fs::write(file.path(), serde_json::to_string_pretty(current)?)?;
        loop {
            let path = file.path().to_path_buf();
            let editor = editor.clone();
            // Through the shell, so editors with arguments (`code --wait`) work.
            let status = tokio::task::spawn_blocking(move || {
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!("{editor} \"$1\""))
                    .arg("sh")
                    .arg(&path)
                    .status()
            })
            .await??;
            if !status.success() {
                return Err(format!("the editor exited with {status}").into());
            }
            match serde_json::from_str::<Value>(&std::fs::read_to_string(file.path())?) {
                Ok(v) if v.is_object() => return Ok(Some(v)),
                Ok(_) => println!("the arguments must be a JSON object"),
                Err(e) => println!("not valid JSON: {e}"),
            }
            match read_line("press Enter to edit again (/quit leaves) ")
                .await
                .as_deref()
                .map(str::trim)
            {
                None | Some("/quit" | "/exit") => return Ok(None),
                Some(_) => {}
            }
        }
    }
    println!("arguments now: {current}");
    loop {
        let Some(line) = read_line("new arguments (one JSON object; empty keeps them): ").await else {
            return Ok(None);
        };
        if matches!(line.trim(), "/quit" | "/exit") {
            return Ok(None);
        }
        if line.trim().is_empty() {
            return Ok(Some(current.clone()));
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() => return Ok(Some(v)),
            Ok(_) => println!("the arguments must be a JSON object"),
            Err(e) => println!("not valid JSON: {e}"),
        }
    }
}

/// The files under `root` with their sizes, relative paths sorted.
fn files(root: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let (Ok(rel), Ok(meta)) = (path.strip_prefix(root), entry.metadata()) {
                out.push((rel.display().to_string(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

const CLIENT_MODE: &str =
    "[this session executes tools on the client; chat does not: use a runtime-mode session]";

const HELP: &str = "type a message, or: /agent TYPE [text] · /agents · /pending · /cancel · /quit";

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let args = Args::parse();
    let stand = if args.demo {
        let stand = demo::start(demo::listening_model(Duration::from_millis(25))).await?;
        eprintln!(
            "[demo] server {} · mock model {} · project {}",
            stand.base,
            stand.llm.url(),
            stand.project.display()
        );
        Some(stand)
    } else {
        None
    };
    let (base, token, project) = match &stand {
        Some(s) => (
            s.base.clone(),
            Some(demo::TOKEN.to_string()),
            Some(s.project.clone()),
        ),
        None => (
            args.server.trim_end_matches('/').to_string(),
            args.token,
            args.project,
        ),
    };
    let mut chat = Chat {
        http: reqwest::Client::new(),
        base,
        token,
        session: String::new(),
        last_seq: 0,
        drop_after: args.drop_after,
        screen: Screen::default(),
    };

    match args.session {
        Some(id) => {
            chat.session = id.clone();
            let Some(s) = chat.call(Method::GET, &format!("/sessions/{id}"), None).await? else {
                return Err(format!("cannot continue session {id}").into());
            };
            println!(
                "session {id} · agent {} · {} messages · {}",
                s["current_agent"].as_str().unwrap_or_default(),
                s["message_count"],
                s["status"].as_str().unwrap_or_default()
            );
            // A session left waiting for a decision picks up where it stopped.
            if s["status"] == "awaiting_approval" && !chat.decide_pending().await? {
                return Ok(());
            }
        }
        None => {
            let project = match project {
                Some(p) => p,
                None => std::env::current_dir()?,
            };
            let project = std::fs::canonicalize(&project)
                .map_err(|e| format!("--project {}: {e}", project.display()))?;
            let body = json!({"user_id": "chat", "metadata": {"project_path": project}});
            let Some(s) = chat.call(Method::POST, "/sessions", Some(body)).await? else {
                return Err("cannot create a session".into());
            };
            chat.session = s["session_id"].as_str().unwrap_or_default().to_string();
            println!(
                "session {} · agent {} · project {}",
                chat.session,
                s["current_agent"].as_str().unwrap_or_default(),
                project.display()
            );
        }
    }
    println!("{HELP}");
    let mut open = true;
    while open {
        let Some(line) = read_line("you> ").await else {
            break;
        };
        let line = line.trim();
        let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        open = match command {
            "" => true,
            "/quit" | "/exit" => false,
            "/help" => {
                println!("{HELP}");
                true
            }
            "/agents" => {
                chat.list_agents().await?;
                true
            }
            "/pending" => chat.decide_pending().await?,
            "/cancel" => {
                let path = format!("/sessions/{}/cancel", chat.session);
                if let Some(v) = chat.call(Method::POST, &path, None).await? {
                    chat.screen
                        .line(&format!("[cancel: {}]", v["status"].as_str().unwrap_or_default()));
                }
                true
            }
            "/agent" if rest.is_empty() => {
                println!("usage: /agent TYPE [text]");
                true
            }
            "/agent" => {
                let (agent, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let mut message = json!({"type": "switch_agent", "agent_type": agent});
                if !text.trim().is_empty() {
                    message["content"] = json!(text.trim());
                }
                chat.send(message).await?
            }
            _ if command.starts_with('/') => {
                println!("unknown command {command}; {HELP}");
                true
            }
            _ => {
                chat.send(json!({"type": "user_message", "content": line}))
                    .await?
            }
        };
    }
    if let Some(stand) = &stand {
        for (path, bytes) in files(&stand.project) {
            println!("[demo] project file {path} ({bytes} bytes)");
        }
    }
    println!("bye");
    Ok(())
}
