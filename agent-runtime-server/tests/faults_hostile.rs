//! Hostile input (API.md §1, §1.1, §6, §9.19): each bad request gets its documented error and
//! changes nothing; tool arguments that try to leave the project are refused; commands that
//! fork-bomb or print without end are killed and their output cut.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use fault_support::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: &str = "65536";

/// Everything observable about the server's state: sessions, and one session's history and events.
async fn snapshot(s: &Server, id: &str) -> (Value, Vec<Value>, Vec<Value>) {
    let mut sessions: Value = s.get_json("/sessions").await;
    for v in sessions["sessions"].as_array_mut().unwrap() {
        v["last_activity"] = Value::Null;
    }
    let st = stored(s, id).await;
    (sessions, st.messages, st.events)
}

/// Sends raw bytes on a fresh connection; returns the status line's code (`None`: closed without
/// an answer) and the body. Reading is bounded, so a server that never answers fails the test.
async fn raw(s: &Server, request: &[u8]) -> (Option<u16>, String) {
    let addr = s.base.strip_prefix("http://").unwrap();
    let mut c = TcpStream::connect(addr).await.unwrap();
    let _ = c.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut out))
        .await
        .expect("the server answers or closes in bounded time");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok());
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn post_raw(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nx-internal-auth: {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn code_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON error body: {body:?}"));
    v["error"]["code"]
        .as_str()
        .map_or_else(|| format!("no code: {body}"), String::from)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_get_their_documented_errors_and_change_nothing() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[
            ("MAX_REQUEST_BYTES", LIMIT),
            ("REQUEST_TIMEOUT_SECS", "2"),
            ("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false"),
        ],
    )
    .await;
    let id = s.session(json!({"session_id": "victim"})).await;
    llm.push(MockResponse::script(&Script::text("first answer")));
    s.send(&id, json!({"type": "user_message", "content": "hello"}))
        .await;
    let before = snapshot(&s, &id).await;

    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let deep_msg = format!(
        r#"{{"session_id":"victim","message":{{"type":"user_message","content":"x","agent_type":{}}}}}"#,
        deep
    );
    let big = format!(
        r#"{{"session_id":"victim","message":{{"type":"user_message","content":"{}"}}}}"#,
        "a".repeat(70_000)
    );
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", "/agent/message/stream", br#"{"session_id": "victim", "message": {"#.to_vec(), 400, "INVALID_REQUEST"),
        ("not JSON", "/sessions", b"hello=world".to_vec(), 400, "INVALID_REQUEST"),
        ("wrong type: session_id", "/agent/message/stream", br#"{"session_id": 5, "message": {"type": "user_message", "content": "x"}}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("wrong type: content", "/agent/message/stream", br#"{"session_id": "victim", "message": {"type": "user_message", "content": ["x"]}}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("empty content", "/agent/message/stream", br#"{"session_id": "victim", "message": {"type": "user_message", "content": ""}}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("wrong type: metadata", "/sessions", br#"{"metadata": "x"}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("wrong type: user_id", "/sessions", br#"{"user_id": {"a": 1}}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("array body", "/sessions", b"[]".to_vec(), 400, "INVALID_REQUEST"),
        ("unknown message type", "/agent/message/stream", br#"{"session_id": "victim", "message": {"type": "rm_rf", "content": "x"}}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("missing message", "/agent/message/stream", br#"{"session_id": "victim"}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("unknown agent", "/agent/message/stream", br#"{"session_id": "victim", "message": {"type": "user_message", "content": "x", "agent_type": "root"}}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("decision: bad verb", "/sessions/victim/hitl-decision", br#"{"call_id": "c", "decision": "maybe"}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("decision: unknown call", "/sessions/victim/hitl-decision", br#"{"call_id": "c", "decision": "approve"}"#.to_vec(), 404, "APPROVAL_NOT_FOUND"),
        ("tool_result for no call", "/agent/message/stream", br#"{"session_id": "victim", "message": {"type": "tool_result", "call_id": "nope", "result": 1}}"#.to_vec(), 404, "TOOL_CALL_NOT_FOUND"),
        ("invalid UTF-8", "/agent/message/stream", b"{\"session_id\": \"victim\", \"message\": {\"type\": \"user_message\", \"content\": \"\xff\xfe\"}}".to_vec(), 400, "INVALID_REQUEST"),
        ("NUL in JSON string", "/sessions", br#"{"session_id": "a\u0000b"}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("session id with path characters", "/sessions", br#"{"session_id": "../../etc/passwd"}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("session id too long", "/sessions", format!(r#"{{"session_id": "{}"}}"#, "a".repeat(129)).into_bytes(), 400, "INVALID_REQUEST"),
        ("session id taken", "/sessions", br#"{"session_id": "victim"}"#.to_vec(), 409, "SESSION_EXISTS"),
        ("project path outside", "/sessions", br#"{"metadata": {"project_path": "relative/dir"}}"#.to_vec(), 400, "INVALID_REQUEST"),
        ("unknown session", "/agent/message/stream", br#"{"session_id": "../victim", "message": {"type": "user_message", "content": "x"}}"#.to_vec(), 404, "SESSION_NOT_FOUND"),
        ("nested 10,000 deep", "/agent/message/stream", deep_msg.into_bytes(), 400, "INVALID_REQUEST"),
        ("body over the limit", "/agent/message/stream", big.into_bytes(), 413, "PAYLOAD_TOO_LARGE"),
    ];
    let mut n = 0;
    for (what, path, body, status, code) in &cases {
        let (got, text) = raw(&s, &post_raw(path, body)).await;
        assert_eq!(
            (got, code_of(&text)),
            (Some(*status), code.to_string()),
            "{what}: {text}"
        );
        n += 1;
    }

    // Paths with traversal and encoded separators never reach another session.
    for path in [
        "/sessions/..%2Fvictim",
        "/sessions/victim%00",
        "/sessions/%2e%2e",
        "/sessions/victim%2F..%2F..%2Fetc",
        "/sessions/%ff%fe",
    ] {
        let r = s.get(path).send().await.unwrap();
        let (status, body) = error_of(r).await;
        // (The URL layer may normalize `%2e%2e` away, leaving no route: NOT_FOUND.)
        assert_eq!(status, 404, "{path}");
        assert!(
            matches!(
                body["error"]["code"].as_str(),
                Some("SESSION_NOT_FOUND" | "NOT_FOUND")
            ),
            "{path}: {body}"
        );
        n += 1;
    }

    // A body over the limit without a length (chunked) is cut at the limit.
    let mut chunked = format!(
        "POST /sessions HTTP/1.1\r\nhost: x\r\nx-internal-auth: {TOKEN}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..80 {
        chunked.extend_from_slice(format!("400\r\n{}\r\n", " ".repeat(1024)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (got, text) = raw(&s, &chunked).await;
    assert_eq!(
        (got, code_of(&text)),
        (Some(413), "PAYLOAD_TOO_LARGE".to_string())
    );
    n += 1;

    // Oversized headers: refused by the HTTP layer (431) without reaching a handler.
    let huge = format!(
        "GET /sessions/victim HTTP/1.1\r\nhost: x\r\nx-internal-auth: {TOKEN}\r\nx-junk: {}\r\nconnection: close\r\n\r\n",
        "j".repeat(1024 * 1024)
    );
    let (got, _) = raw(&s, huge.as_bytes()).await;
    assert!(matches!(got, Some(431) | None), "oversized head: {got:?}");
    n += 1;

    // A body that trickles in: cut after REQUEST_TIMEOUT_SECS with INVALID_REQUEST.
    let addr = s.base.strip_prefix("http://").unwrap().to_string();
    let mut c = TcpStream::connect(&addr).await.unwrap();
    c.write_all(
        format!("POST /sessions HTTP/1.1\r\nhost: x\r\nx-internal-auth: {TOKEN}\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{{")
            .as_bytes(),
    )
    .await
    .unwrap();
    let trickle = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            tokio::select! {
                r = c.read(&mut byte) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => out.push(byte[0]),
                },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    if c.write_all(b" ").await.is_err() { break; }
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let text = tokio::time::timeout(Duration::from_secs(20), trickle)
        .await
        .expect("a trickling body is cut in bounded time")
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(code_of(text.split_once("\r\n\r\n").unwrap().1), "INVALID_REQUEST");
    n += 1;

    // A head that trickles in: the connection is closed in bounded time.
    let mut c = TcpStream::connect(&addr).await.unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 256];
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if c.write_all(b"x-a: b\r\n").await.is_err() {
                return;
            }
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), c.read(&mut buf)).await {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a trickling head is cut in bounded time");
    n += 1;

    assert_eq!(
        snapshot(&s, &id).await,
        before,
        "hostile requests changed nothing"
    );
    eprintln!("{n} hostile requests");
    // Still serving.
    llm.push(MockResponse::script(&Script::text("still here")));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "ok?"}))
        .await;
    assert_eq!(kinds(&events), ["assistant_final", "done:completed"]);
}

/// Runs one tool call through a coder turn with HITL off; returns its `tool_result` event.
async fn tool_result(s: &Server, llm: &MockLlmServer, id: &str, tool: &str, args: Value) -> Value {
    llm.push(MockResponse::script(&Script::tool_call(tool, args)));
    llm.push(MockResponse::script(&Script::text("done")));
    let events = s.send(id, json!({"type": "user_message", "content": "go"})).await;
    assert_eq!(
        kinds(&events).last().unwrap(),
        "done:completed",
        "{:?}",
        kinds(&events)
    );
    find(&events, "tool_result").clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_arguments_that_leave_the_project_are_refused() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[
            ("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false"),
            ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
            ("HITL_ENABLED", "false"),
        ],
    )
    .await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "top secret").unwrap();
    let project = s.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("inside.txt"), "fine").unwrap();
    std::os::unix::fs::symlink(outside.path(), project.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), project.join("secret-link")).unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await;
    let secret = outside.path().join("secret.txt");
    let escapes = [
        "../secret.txt".to_string(),
        "../../../../../../etc/passwd".to_string(),
        secret.to_str().unwrap().to_string(),
        "/etc/passwd".to_string(),
        "link/secret.txt".to_string(),
        "secret-link".to_string(),
        "inside.txt\0/../../etc/passwd".to_string(),
        "a/../../secret.txt".to_string(),
        format!("{}/../secret.txt", project.display()),
    ];
    let mut n = 0;
    for path in &escapes {
        for (tool, args) in [
            ("read_file", json!({"path": path})),
            ("write_file", json!({"path": path, "content": "pwned"})),
            ("delete_file", json!({"path": path})),
            ("list_files", json!({"path": path})),
        ] {
            let r = tool_result(&s, &llm, &id, tool, args).await;
            assert_eq!(r["error"]["code"], "INVALID_TOOL", "{tool} {path:?}: {r}");
            n += 1;
        }
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "top secret");
    assert!(outside.path().join("secret.txt").exists());
    let r = tool_result(&s, &llm, &id, "read_file", json!({"path": "inside.txt"})).await;
    assert!(r.get("error").is_none(), "{r}");
    eprintln!("{n} escaping tool calls refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_bombs_and_endless_output_are_killed_and_cut() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[
            ("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false"),
            ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
            ("HITL_ENABLED", "false"),
            ("COMMAND_TIMEOUT_SECS", "3"),
            // The default 32 KiB of repeated digits is ~14,000 tokens, more than the default
            // 8,000-token window: the turn would end with CONTEXT_TOO_LARGE (see the report).
            ("MAX_TOOL_OUTPUT_BYTES", "8192"),
        ],
    )
    .await;
    let project = s.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await;
    // Endless output: ends at the timeout, output bounded.
    let r = tool_result(
        &s,
        &llm,
        &id,
        "execute_command",
        json!({"command": "yes 0123456789"}),
    )
    .await;
    let text = r.to_string();
    assert!(text.len() < 16 * 1024, "output cut: {} bytes", text.len());
    // A bounded fork bomb (depth-limited so a failure cannot take the machine down): every
    // process of the tree is killed at the timeout, the turn goes on.
    let bomb = "b() { [ ${#1} -lt 6 ] && { b x$1 & b x$1 & }; sleep 31.7; }; b x";
    let r = tool_result(&s, &llm, &id, "execute_command", json!({"command": bomb})).await;
    assert!(r.to_string().len() < 256 * 1024);
    // Nothing of the bomb survives: no `sleep 31.7` left in this project's process group tree.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains("b x") || l.contains("sleep 31.7"))
        .count();
    assert_eq!(left, 0, "processes of the bomb survived");
    let stored = stored(&s, &id).await;
    assert_history_valid(&stored.messages, "commands");
}
