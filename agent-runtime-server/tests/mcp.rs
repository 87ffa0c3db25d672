//! MCP servers end to end through the real server: the reference filesystem server (stdio) and the
//! reference "everything" server (Streamable HTTP), both from npm, and a hostile server of our own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use serde_json::{Value, json};

/// The npm packages `.ci/run` installs (`npm ci` in `agent-runtime-server/mcp-tests`), or a clear
/// failure saying how to install them: these tests never pass without the real servers.
fn node_modules() -> PathBuf {
    let dir = std::env::var_os("MCP_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp-tests/node_modules"));
    let fs = dir.join("@modelcontextprotocol/server-filesystem/dist/index.js");
    assert!(
        fs.exists(),
        "the MCP test servers are not installed at {}: run `npm ci --prefix agent-runtime-server/mcp-tests` \
         (as .ci/run does), or set MCP_TEST_NODE_MODULES",
        dir.display()
    );
    dir
}

fn fs_server_js() -> String {
    node_modules()
        .join("@modelcontextprotocol/server-filesystem/dist/index.js")
        .to_string_lossy()
        .into_owned()
}

fn hostile_server_py() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mcp_support/hostile_server.py")
        .to_string_lossy()
        .into_owned()
}

fn route(agent: &str) -> MockResponse {
    MockResponse::script(&Script::tool_call(
        "route",
        json!({"agent": agent, "reason": "file work"}),
    ))
}

fn call(name: &str, args: Value) -> MockResponse {
    MockResponse::script(&Script::tool_call(name, args))
}

/// A temp dir with `project/` (two files) and an MCP servers file of `servers`.
struct Setup {
    dir: tempfile::TempDir,
    project: PathBuf,
    config: PathBuf,
}

fn setup(servers: impl FnOnce(&Path) -> Value) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("notes.txt"), "hello from the notes").unwrap();
    std::fs::write(project.join("other.txt"), "the other file").unwrap();
    let project = project.canonicalize().unwrap();
    let config = dir.path().join("mcp.json");
    std::fs::write(&config, json!({"mcpServers": servers(&project)}).to_string()).unwrap();
    Setup { dir, project, config }
}

fn fs_servers(project: &Path) -> Value {
    json!({"fs": {
        "command": "node",
        "args": [fs_server_js(), project],
        "agents": ["coder"],
        "deny": ["write_file", "edit_file", "move_file", "create_directory"],
        "tool_approval": {"list_directory": "never"}
    }})
}

async fn start(llm: &MockLlmServer, s: &Setup, extra: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir_in(s.dir.path()).unwrap();
    start_in(llm, s, dir, extra).await
}

async fn start_in(llm: &MockLlmServer, s: &Setup, dir: tempfile::TempDir, extra: &[(&str, &str)]) -> Server {
    let db = format!("sqlite://{}", dir.path().join("rt.db").display());
    let mut env = vec![("MCP_SERVERS_FILE", s.config.to_str().unwrap())];
    env.extend_from_slice(extra);
    Server::start_in(dir, &llm.url(), &db, &env).await
}

/// The tool_result events of a stream, each as `(tool_name, result, error)`.
fn results(events: &[Value]) -> Vec<(String, Value, Value)> {
    events
        .iter()
        .filter(|e| e["type"] == "tool_result")
        .map(|e| {
            (
                e["tool_name"].as_str().unwrap().to_string(),
                e.get("result").cloned().unwrap_or(Value::Null),
                e.get("error").cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Every tool name the model was offered in request `i`.
fn offered(llm: &MockLlmServer, i: usize) -> Vec<String> {
    llm.requests()[i]["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| t["function"]["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_coder_lists_and_reads_through_the_filesystem_server_with_an_edited_approval() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(fs_servers);
    let s = start(&llm, &st, &[]).await;
    let project = st.project.to_str().unwrap();
    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("coder"));
    llm.push(call("fs__list_directory", json!({"path": project})));
    llm.push(call(
        "fs__read_text_file",
        json!({"path": format!("{project}/notes.txt")}),
    ));
    llm.push(MockResponse::script(&Script::text("Прочитал.")));

    let first = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Прочитай заметки в проекте"}),
        )
        .await;
    assert_eq!(
        kinds(&first),
        [
            "agent_switched",
            "tool_call",
            "tool_result",
            "tool_call",
            "done:awaiting_approval"
        ]
    );
    assert_eq!(
        results(&first),
        [(
            "fs__list_directory".to_string(),
            json!({"text": "[FILE] notes.txt\n[FILE] other.txt", "structured_content": {"content": "[FILE] notes.txt\n[FILE] other.txt"}}),
            Value::Null
        )]
    );
    let ask = first.iter().filter(|e| e["type"] == "tool_call").nth(1).unwrap();
    assert_eq!(
        (&ask["tool_name"], &ask["requires_approval"], &ask["reason"]),
        (
            &json!("fs__read_text_file"),
            &json!(true),
            &json!("The MCP tool 'fs__read_text_file' requires approval")
        )
    );
    // The coder's model call offered the server's tools, the denied ones never.
    let tools = offered(&llm, 1);
    assert!(tools.contains(&"fs__read_text_file".to_string()), "{tools:?}");
    assert!(
        !tools
            .iter()
            .any(|t| t == "fs__write_file" || t == "fs__edit_file"),
        "{tools:?}"
    );

    let call_id = ask["call_id"].as_str().unwrap();
    let r = s
        .post(
            &format!("/sessions/{id}/hitl-decision"),
            json!({"call_id": call_id, "decision": "edit",
                   "modified_arguments": {"path": format!("{project}/other.txt")}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let second = Sse::new(r).all().await;
    assert_eq!(
        kinds(&second),
        [
            "approval_resolved",
            "tool_result",
            "assistant_final",
            "done:completed"
        ]
    );
    assert_eq!(
        results(&second),
        [(
            "fs__read_text_file".to_string(),
            json!({"text": "the other file", "structured_content": {"content": "the other file"}}),
            Value::Null
        )]
    );

    let health = s.get_json("/health").await;
    assert_eq!(
        health["mcp_servers"],
        json!([{"name": "fs", "transport": "stdio", "state": "running", "tools": 10, "restarts": 0}])
    );
    let agents = s.get_json("/agents").await;
    let tools_of = |t: &str| -> Vec<String> {
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["type"] == t)
            .unwrap()["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .filter(|n| n.starts_with("fs__"))
            .collect()
    };
    assert_eq!(
        tools_of("coder"),
        [
            "fs__directory_tree",
            "fs__get_file_info",
            "fs__list_allowed_directories",
            "fs__list_directory",
            "fs__list_directory_with_sizes",
            "fs__read_file",
            "fs__read_media_file",
            "fs__read_multiple_files",
            "fs__read_text_file",
            "fs__search_files"
        ]
    );
    assert_eq!(tools_of("architect"), Vec::<String>::new());
    let metrics = s.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("mcp_tool_calls_total{server=\"fs\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mcp_tool_errors_total{server=\"fs\"} 0\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_rejected_mcp_call_never_reaches_the_server_and_the_model_reads_the_feedback() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(fs_servers);
    let s = start(&llm, &st, &[]).await;
    let project = st.project.to_str().unwrap();
    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("coder"));
    llm.push(call(
        "fs__read_text_file",
        json!({"path": format!("{project}/notes.txt")}),
    ));
    llm.push(MockResponse::script(&Script::text("Хорошо, не читаю.")));
    let first = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Прочитай заметки"}),
        )
        .await;
    assert_eq!(
        kinds(&first),
        ["agent_switched", "tool_call", "done:awaiting_approval"]
    );
    let call_id = find(&first, "tool_call")["call_id"].as_str().unwrap().to_string();
    let r = s
        .post(
            &format!("/sessions/{id}/hitl-decision"),
            json!({"call_id": call_id, "decision": "reject", "feedback": "not the notes"}),
        )
        .send()
        .await
        .unwrap();
    let second = Sse::new(r).all().await;
    assert_eq!(
        results(&second),
        [(
            "fs__read_text_file".to_string(),
            Value::Null,
            json!({"code": "REJECTED", "message": "the user rejected this call: not the notes"})
        )]
    );
    let metrics = s.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("mcp_tool_calls_total{server=\"fs\"} 0\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_mcp_approval_pending_across_a_restart_runs_on_the_new_server_once_approved() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(fs_servers);
    let s = start(&llm, &st, &[]).await;
    let project = st.project.to_str().unwrap().to_string();
    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("coder"));
    llm.push(call(
        "fs__read_text_file",
        json!({"path": format!("{project}/notes.txt")}),
    ));
    let first = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Прочитай заметки"}),
        )
        .await;
    assert_eq!(
        kinds(&first),
        ["agent_switched", "tool_call", "done:awaiting_approval"]
    );
    let call_id = find(&first, "tool_call")["call_id"].as_str().unwrap().to_string();

    let Server { mut process, dir, .. } = s;
    assert!(process.terminate(), "{}", process.logs());
    drop(process);
    let s = start_in(&llm, &st, dir, &[]).await;
    let pending = s.get_json(&format!("/sessions/{id}/pending-approvals")).await;
    assert_eq!(pending["pending_approvals"][0]["call_id"], json!(call_id));
    llm.push(MockResponse::script(&Script::text("Готово.")));
    let r = s
        .post(
            &format!("/sessions/{id}/hitl-decision"),
            json!({"call_id": call_id, "decision": "approve"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let second = Sse::new(r).all().await;
    assert_eq!(
        results(&second),
        [(
            "fs__read_text_file".to_string(),
            json!({"text": "hello from the notes", "structured_content": {"content": "hello from the notes"}}),
            Value::Null
        )]
    );
    assert_eq!(kinds(&second).last().unwrap(), "done:completed");
}

#[tokio::test]
async fn an_agent_not_given_a_server_is_refused_its_tools_and_a_denied_tool_is_unknown() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(fs_servers);
    let s = start(&llm, &st, &[]).await;
    let project = st.project.to_str().unwrap();
    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("architect"));
    llm.push(call("fs__list_directory", json!({"path": project})));
    llm.push(MockResponse::script(&Script::text("Нельзя.")));
    let events = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Опиши архитектуру"}),
        )
        .await;
    assert_eq!(
        results(&events),
        [(
            "fs__list_directory".to_string(),
            Value::Null,
            json!({"code": "INVALID_TOOL", "message": "the architect agent may not use the tool 'fs__list_directory'; its MCP server is not given to this agent"})
        )]
    );
    assert!(offered(&llm, 1).iter().all(|t| !t.starts_with("fs__")));

    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("coder"));
    llm.push(call(
        "fs__write_file",
        json!({"path": format!("{project}/x.txt"), "content": "x"}),
    ));
    llm.push(MockResponse::script(&Script::text("Нет такого.")));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "Запиши файл"}))
        .await;
    assert_eq!(
        results(&events),
        [(
            "fs__write_file".to_string(),
            Value::Null,
            json!({"code": "INVALID_TOOL", "message": "unknown tool 'fs__write_file'"})
        )]
    );
    assert!(!st.project.join("x.txt").exists());
}

#[tokio::test]
async fn arguments_that_break_the_servers_schema_are_refused_before_approval() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(fs_servers);
    let s = start(&llm, &st, &[]).await;
    let project = st.project.to_str().unwrap();
    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("coder"));
    llm.push(call("fs__read_text_file", json!({"path": 7})));
    llm.push(MockResponse::script(&Script::text("Ошибся.")));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "Прочитай"}))
        .await;
    assert_eq!(
        results(&events),
        [(
            "fs__read_text_file".to_string(),
            Value::Null,
            json!({"code": "INVALID_TOOL", "message": "fs__read_text_file: invalid arguments: at `/path`: 7 is not of type \"string\""})
        )]
    );
    let pending = s.get_json(&format!("/sessions/{id}/pending-approvals")).await;
    assert_eq!(pending, json!({"pending_approvals": []}));
}

/// The hostile server's tools, called one after the other in one turn: each ends in bounded time
/// with a clear error, the turn goes on, and the server is restarted after it died.
#[tokio::test]
async fn a_hostile_server_ends_every_call_in_bounded_time_and_the_turn_goes_on() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(
        |_| json!({"evil": {"command": "python3", "args": [hostile_server_py()], "approval": "never"}}),
    );
    let s = start(&llm, &st, &[("MCP_TOOL_TIMEOUT_SECS", "2")]).await;
    let project = st.project.to_str().unwrap();
    let health = s.get_json("/health").await;
    assert_eq!(
        health["mcp_servers"],
        json!([{"name": "evil", "transport": "stdio", "state": "running", "tools": 7, "restarts": 0,
        "skipped_tools": [
            "'broken': its input schema is not a valid JSON Schema: \"no-such-type\" is not valid under any of the schemas listed in the 'anyOf' keyword",
            "'bad name!': a tool name must be A-Z a-z 0-9 _ - and at most 64 characters with its server prefix"
        ]}])
    );
    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("coder"));
    for t in ["hang", "garbage", "huge", "fail", "broken", "change", "die", "ok"] {
        llm.push(call(&format!("evil__{t}"), json!({})));
    }
    llm.push(MockResponse::script(&Script::text("Выжил.")));
    let began = Instant::now();
    let events = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Проверь злой сервер"}),
        )
        .await;
    assert!(began.elapsed() < Duration::from_secs(60), "{:?}", began.elapsed());
    let timeout = json!({"code": "TOOL_EXECUTION_FAILED", "message":
        "evil__hang (MCP server 'evil'): no answer within 2 s (MCP_TOOL_TIMEOUT_SECS; a message over 4194304 bytes is dropped)"});
    let mut got = results(&events);
    // The call that died names the transport's own words: check its shape, then the whole list.
    let died = got.iter_mut().find(|r| r.0 == "evil__die").unwrap();
    let msg = died.2["message"].take();
    assert!(
        msg.as_str()
            .unwrap()
            .starts_with("evil__die (MCP server 'evil'): the call failed: "),
        "{msg}"
    );
    let after = got.iter_mut().find(|r| r.0 == "evil__ok").unwrap();
    let msg = after.2["message"].take();
    // Whether the supervisor has seen the exit yet decides which of the two clear errors it is.
    let msg = msg.as_str().unwrap();
    assert!(
        msg.starts_with("evil__ok (MCP server 'evil'): the server is not running")
            || msg.starts_with("evil__ok (MCP server 'evil'): the call failed: "),
        "{msg}"
    );
    let with = |name: &str| {
        let mut t = timeout.clone();
        t["message"] = json!(t["message"].as_str().unwrap().replace("evil__hang", name));
        t
    };
    assert_eq!(
        got,
        [
            ("evil__hang".to_string(), Value::Null, with("evil__hang")),
            ("evil__garbage".to_string(), Value::Null, with("evil__garbage")),
            ("evil__huge".to_string(), Value::Null, with("evil__huge")),
            (
                "evil__fail".to_string(),
                Value::Null,
                json!({"code": "TOOL_EXECUTION_FAILED", "message": "evil__fail (MCP server 'evil'): the tool broke"})
            ),
            (
                "evil__broken".to_string(),
                Value::Null,
                json!({"code": "INVALID_TOOL", "message": "unknown tool 'evil__broken'"})
            ),
            ("evil__change".to_string(), json!("changed"), Value::Null),
            (
                "evil__die".to_string(),
                Value::Null,
                json!({"code": "TOOL_EXECUTION_FAILED", "message": null})
            ),
            (
                "evil__ok".to_string(),
                Value::Null,
                json!({"code": "TOOL_EXECUTION_FAILED", "message": null})
            ),
        ]
    );
    assert_eq!(kinds(&events).last().unwrap(), "done:completed");

    // Restarted with backoff; the tool added mid-session is offered from then on.
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        let h = s.get_json("/health").await;
        if h["mcp_servers"][0]["state"] == "running" || Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (
            &health["mcp_servers"][0]["state"],
            &health["mcp_servers"][0]["restarts"]
        ),
        (&json!("running"), &json!(1))
    );
    llm.push(call("evil__ok", json!({})));
    llm.push(MockResponse::script(&Script::text("Снова работает.")));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "Ещё раз"}))
        .await;
    assert_eq!(
        results(&events),
        [("evil__ok".to_string(), json!("fine ok"), Value::Null)]
    );
    let metrics = s.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("mcp_tool_calls_total{server=\"evil\"} 8\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mcp_tool_errors_total{server=\"evil\"} 6\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_tool_list_change_mid_session_is_offered_at_the_next_model_call() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(|_| {
        json!({"evil": {"command": "python3", "args": [hostile_server_py()], "approval": "never",
                        "tools": ["change", "ok", "added"]}})
    });
    let s = start(&llm, &st, &[]).await;
    let project = st.project.to_str().unwrap();
    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("coder"));
    llm.push(call("evil__change", json!({})));
    llm.push(MockResponse::script(&Script::text("Изменил.")));
    s.send(&id, json!({"type": "user_message", "content": "Измени список"}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get_json("/health").await["mcp_servers"][0]["tools"] != 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    llm.push(call("evil__added", json!({})));
    llm.push(MockResponse::script(&Script::text("Новый есть.")));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "Вызови новый"}))
        .await;
    assert_eq!(
        results(&events),
        [("evil__added".to_string(), json!("fine added"), Value::Null)]
    );
    let n = llm.requests().len();
    let mut tools: Vec<String> = offered(&llm, n - 1)
        .into_iter()
        .filter(|t| t.starts_with("evil__"))
        .collect();
    tools.sort();
    assert_eq!(tools, ["evil__added", "evil__change", "evil__ok"]);
}

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The reference "everything" server in its Streamable HTTP mode, killed when dropped.
struct Everything(std::process::Child);

impl Drop for Everything {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn everything(port: u16) -> Everything {
    let js = node_modules().join("@modelcontextprotocol/server-everything/dist/index.js");
    let child = std::process::Command::new("node")
        .arg(js)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "the everything server did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Everything(child)
}

#[tokio::test]
async fn a_streamable_http_server_answers_text_structured_content_and_sees_the_project_root() {
    let port = free_port();
    let _server = everything(port).await;
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(|_| {
        json!({"web": {"url": format!("http://127.0.0.1:{port}/mcp"), "approval": "never",
                       "tools": ["echo", "get-sum", "get-structured-content", "get-roots-list"]}})
    });
    let s = start(&llm, &st, &[]).await;
    let health = s.get_json("/health").await;
    assert_eq!(
        health["mcp_servers"],
        json!([{"name": "web", "transport": "http", "state": "running", "tools": 4, "restarts": 0}])
    );
    let project = st.project.to_str().unwrap();
    let id = s.session(json!({"metadata": {"project_path": project}})).await;
    llm.push(route("coder"));
    llm.push(call("web__echo", json!({"message": "привет"})));
    llm.push(call("web__get-sum", json!({"a": 2, "b": 3})));
    llm.push(call("web__get-roots-list", json!({})));
    llm.push(MockResponse::script(&Script::text("Всё ответило.")));
    let events = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Проверь веб-сервер"}),
        )
        .await;
    let got = results(&events);
    assert_eq!(
        got[..2],
        [
            ("web__echo".to_string(), json!("Echo: привет"), Value::Null),
            (
                "web__get-sum".to_string(),
                json!("The sum of 2 and 3 is 5."),
                Value::Null
            ),
        ]
    );
    let roots = got[2].1.as_str().unwrap_or_default();
    assert!(
        roots.contains(&format!("URI: file://{project}")),
        "the project root is offered as the server's root: {got:?}"
    );
}

/// The server's direct children, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so read after the last ')'.
        let after = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        let ppid = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s[s.rfind(')').unwrap_or(0) + 1..].trim_start().starts_with('Z'))
        .unwrap_or(false)
}

#[tokio::test]
async fn a_stdio_server_dies_with_the_runtime_even_when_it_is_killed() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(fs_servers);
    let mut s = start(&llm, &st, &[]).await;
    let server_pid = s.process.child.id();
    let children = children_of(server_pid);
    assert_eq!(children.len(), 1, "one MCP child: {children:?}");
    let child = children[0];
    assert!(alive(child));
    s.process.child.kill().unwrap();
    s.process.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(child) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !alive(child),
        "the MCP server {child} outlived the SIGKILLed runtime"
    );
}

/// A start-up with `MCP_SERVERS_FILE` holding `text`: its exit code, stdout and operator lines.
fn start_up_with_servers_file(text: &str) -> (i32, String, Vec<String>) {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mcp.json");
    std::fs::write(&file, text).unwrap();
    let db = format!("sqlite://{}", dir.path().join("rt.db").display());
    let mut child = spawn_raw(
        &["--port", "0"],
        &[
            ("DATABASE_URL", db.as_str()),
            ("MCP_SERVERS_FILE", file.to_str().unwrap()),
        ],
    );
    let status = child.wait().unwrap();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let lines = stderr
        .lines()
        .filter(|l| l.starts_with("agent-runtime-server: "))
        .map(|l| l.replace(&file.display().to_string(), "FILE"))
        .collect();
    (status.code().unwrap(), stdout, lines)
}

#[test]
fn a_servers_file_that_does_not_parse_or_has_an_unknown_key_stops_start_up_with_the_place() {
    assert_eq!(
        start_up_with_servers_file("{\"mcpServers\": {\n  \"fs\": {\"command\": \"x\",}\n}}"),
        (
            2,
            String::new(),
            vec![
                "agent-runtime-server: MCP_SERVERS_FILE: FILE: line 2 column 25: trailing comma".to_string()
            ]
        )
    );
    assert_eq!(
        start_up_with_servers_file(r#"{"mcpServers": {"fs": {"command": "x", "deny": [], "aproval": "never"}}}"#),
        (
            2,
            String::new(),
            vec!["agent-runtime-server: MCP_SERVERS_FILE: FILE: line 1 column 60: at `mcpServers.fs.aproval`: unknown field `aproval`, \
                  expected one of `type`, `command`, `args`, `env`, `cwd`, `url`, `headers`, `agents`, `tools`, `deny`, \
                  `approval`, `tool_approval`"
                .to_string()]
        )
    );
    assert_eq!(
        start_up_with_servers_file(r#"{"mcpServers": {"fs": {"command": "x", "agents": ["codr"]}}}"#),
        (
            2,
            String::new(),
            vec![
                "agent-runtime-server: MCP_SERVERS_FILE: server 'fs': unknown agent 'codr' in `agents` \
                  (known: orchestrator, coder, architect, debug, ask)"
                    .to_string()
            ]
        )
    );
}

#[tokio::test]
async fn a_server_that_cannot_start_is_reported_and_its_tools_are_not_offered() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(|project| {
        let mut servers = fs_servers(project);
        servers["gone"] = json!({"command": "/nonexistent/mcp-server"});
        servers
    });
    let s = start(&llm, &st, &[]).await;
    let health = s.get_json("/health").await;
    assert_eq!(health["status"], "healthy");
    let mut servers = health["mcp_servers"].clone();
    let restarts = servers[1]["restarts"].take();
    assert!(restarts.as_u64().is_some(), "{health}");
    assert_eq!(
        servers,
        json!([
            {"name": "fs", "transport": "stdio", "state": "running", "tools": 10, "restarts": 0},
            {"name": "gone", "transport": "stdio", "state": servers[1]["state"], "restarts": null, "tools": 0,
             "error": "cannot start `/nonexistent/mcp-server`: No such file or directory (os error 2)"}
        ])
    );
    assert!(["restarting", "starting"].contains(&servers[1]["state"].as_str().unwrap()));
}

#[tokio::test]
async fn mcp_calls_run_in_the_runtime_in_a_client_mode_session() {
    let llm = MockLlmServer::start().await.unwrap();
    let st = setup(fs_servers);
    let s = start(&llm, &st, &[]).await;
    let project = st.project.to_str().unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project, "tool_execution": "client"}}))
        .await;
    llm.push(route("coder"));
    llm.push(call("fs__list_directory", json!({"path": project})));
    llm.push(MockResponse::script(&Script::text("Готово.")));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "Что в проекте?"}))
        .await;
    assert_eq!(
        kinds(&events),
        [
            "agent_switched",
            "tool_call",
            "tool_result",
            "assistant_final",
            "done:completed"
        ]
    );
    assert_eq!(
        results(&events),
        [(
            "fs__list_directory".to_string(),
            json!({"text": "[FILE] notes.txt\n[FILE] other.txt", "structured_content": {"content": "[FILE] notes.txt\n[FILE] other.txt"}}),
            Value::Null
        )]
    );
}
