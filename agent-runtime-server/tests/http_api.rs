//! Routes, shapes, auth and every HTTP error of API.md §1–3 against the real server binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use agent_runtime_core::llm::mock::MockLlmServer;
use common::*;
use serde_json::{Value, json};

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn public_routes_need_no_token_and_answer_under_both_prefixes() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    for path in ["/health", "/api/v1/health"] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        // The Landlock ABI is the kernel's; tests/sandbox.rs checks it is at least 1.
        let abi = v["sandbox"]["landlock_abi"].clone();
        // The process id is this runtime's lease owner id, fresh per process.
        let id = v["process"]["id"].clone();
        assert!(id.as_str().unwrap().starts_with("runtime_"), "{id}");
        assert_eq!(
            v,
            json!({"status": "healthy", "service": "agent-runtime", "version": env!("CARGO_PKG_VERSION"),
                   "dependencies": {"sqlite": "connected", "llm_proxy": "available"},
                   "multi_agent": {"enabled": true, "default_agent": "orchestrator", "agents_count": 5},
                   "sandbox": {"mode": "enforce", "landlock_abi": abi, "seccomp": true, "file_tools": "openat2"},
                   "process": {"id": id, "turns": 0}})
        );
    }
    let doc: Value = s
        .client
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/agent/message/stream"]["post"].is_object());
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("http_requests_total{route=\"/health\",method=\"GET\",status=\"200\"} 2"),
        "{text}"
    );
    assert!(text.contains("sse_streams_active 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_degraded_when_the_model_server_is_down() {
    let s = Server::start("http://127.0.0.1:9").await;
    let v: Value = s
        .client
        .get(s.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "degraded");
    assert_eq!(
        v["dependencies"],
        json!({"sqlite": "connected", "llm_proxy": "unavailable"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_is_checked_before_routing() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let unauthorized =
        json!({"error": {"code": "UNAUTHORIZED", "message": "missing or wrong x-internal-auth token"}});
    for (path, token) in [
        ("/agents", None),
        ("/agents", Some("wrong")),
        ("/no/such/route", None),
        ("/api/v1/sessions", Some("")),
    ] {
        let mut req = s.client.get(s.url(path));
        if let Some(t) = token {
            req = req.header("X-Internal-Auth", t);
        }
        assert_eq!(
            error_of(req.send().await.unwrap()).await,
            (401, unauthorized.clone()),
            "{path}"
        );
    }
    let (status, body) = error_of(s.get("/no/such/route").send().await.unwrap()).await;
    assert_eq!((status, code(&body)), (404, "NOT_FOUND"));
    let r = s
        .client
        .put(s.url("/api/v1/sessions"))
        .header("x-internal-auth", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "GET, POST");
    let (status, body) = error_of(r).await;
    assert_eq!((status, code(&body)), (405, "METHOD_NOT_ALLOWED"));
    let (status, body) = error_of(s.get("/agent/message/stream").send().await.unwrap()).await;
    assert_eq!((status, code(&body)), (405, "METHOD_NOT_ALLOWED"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_have_the_documented_shapes() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let project = s.dir.path().canonicalize().unwrap();
    let project = project.to_str().unwrap();

    let r = s
        .post(
            "/sessions",
            json!({"user_id": "u1", "session_id": "s-1", "metadata": {"project_path": project}, "extra": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut created: Value = r.json().await.unwrap();
    let created_at = created["created_at"].take();
    assert!(created_at.as_str().unwrap().ends_with('Z'));
    assert_eq!(
        created,
        json!({"session_id": "s-1", "id": "s-1", "created_at": null, "current_agent": "orchestrator", "message_count": 0})
    );

    let empty = s
        .client
        .post(s.url("/sessions"))
        .header("x-internal-auth", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 201);
    let generated: Value = empty.json().await.unwrap();
    assert!(generated["session_id"].as_str().unwrap().starts_with("session_"));

    let mut got: Value = s.get_json("/api/v1/sessions/s-1").await;
    assert_eq!(got["created_at"].take(), created_at);
    assert!(got["last_activity"].take().is_string());
    assert_eq!(
        got,
        json!({"session_id": "s-1", "user_id": "u1", "created_at": null, "last_activity": null,
               "metadata": {"project_path": project}, "current_agent": "orchestrator",
               "message_count": 0, "status": "idle"})
    );

    let list: Value = s.get_json("/sessions?user_id=u1&limit=1").await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(list["sessions"][0]["session_id"], "s-1");
    assert_eq!(list["next_cursor"], Value::Null);
    let page1: Value = s.get_json("/sessions?limit=1").await;
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2: Value = s.get_json(&format!("/sessions?limit=1&cursor={cursor}")).await;
    assert_ne!(
        page1["sessions"][0]["session_id"],
        page2["sessions"][0]["session_id"]
    );

    let current: Value = s.get_json("/agents/s-1/current").await;
    assert_eq!(
        current["current_agent"]["switched_at"].as_str(),
        created_at.as_str()
    );
    assert_eq!(
        current,
        json!({"session_id": "s-1",
               "current_agent": {"type": "orchestrator", "name": current["current_agent"]["name"], "emoji": current["current_agent"]["emoji"], "switched_at": created_at},
               "previous_agent": null, "switch_count": 0, "switch_history": []})
    );

    let messages: Value = s.get_json("/sessions/s-1/history").await;
    assert_eq!(
        messages,
        json!({"session_id": "s-1", "messages": [], "message_count": 0, "current_agent": "orchestrator",
               "last_activity": created_at, "agent_history": []})
    );
    let approvals: Value = s.get_json("/sessions/s-1/pending-approvals").await;
    assert_eq!(approvals, json!({"pending_approvals": []}));
    let cancel: Value = s
        .post("/sessions/s-1/cancel", json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancel, json!({"status": "idle"}));

    let deleted: Value = s
        .delete("/api/v1/sessions/s-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(deleted, json!({"status": "deleted"}));
    let (status, body) = error_of(s.get("/sessions/s-1").send().await.unwrap()).await;
    assert_eq!(
        (status, body),
        (
            404,
            json!({"error": {"code": "SESSION_NOT_FOUND", "message": "session 's-1' not found"}})
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_are_the_five_of_the_product_in_order() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let v: Value = s.get_json("/api/v1/agents").await;
    let agents = v["agents"].as_array().unwrap();
    let types: Vec<&str> = agents.iter().map(|a| a["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["orchestrator", "coder", "architect", "debug", "ask"]);
    assert_eq!(
        agents[4]["tools"],
        json!(["read_file", "search_in_code", "list_files"])
    );
    let keys: Vec<&String> = agents[0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "command_rights",
            "description",
            "emoji",
            "name",
            "restrictions",
            "tools",
            "type"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_error_has_its_code_and_status() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[("MAX_REQUEST_BYTES", "8000"), ("MAX_CONTEXT_TOKENS", "600")],
    )
    .await;
    let id = s.session(json!({"metadata": {"tool_execution": "client"}})).await;
    let raw = |path: &str, body: &str| {
        s.client
            .post(s.url(path))
            .header("x-internal-auth", TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
    };
    let stream = |body: Value| s.post("/agent/message/stream", body);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (raw("/sessions", "{not json"), 400, "INVALID_REQUEST"),
        (raw("/sessions", "{\"user_id\": 5}"), 400, "INVALID_REQUEST"),
        (
            raw("/sessions", "{\"session_id\": \"bad id!\"}"),
            400,
            "INVALID_REQUEST",
        ),
        (
            raw(
                "/sessions",
                "{\"metadata\": {\"project_path\": \"relative/dir\"}}",
            ),
            400,
            "INVALID_REQUEST",
        ),
        (
            raw("/sessions", &format!("{{\"session_id\": \"{id}\"}}")),
            409,
            "SESSION_EXISTS",
        ),
        (
            raw("/sessions", &format!("{{\"user_id\": \"{}\"}}", "x".repeat(9000))),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (s.get("/sessions?limit=0"), 400, "INVALID_REQUEST"),
        (s.get("/sessions?limit=1001"), 400, "INVALID_REQUEST"),
        (s.get("/sessions?limit=ten"), 400, "INVALID_REQUEST"),
        (s.get("/sessions/nope/messages"), 404, "SESSION_NOT_FOUND"),
        (s.get("/sessions/nope/events"), 404, "SESSION_NOT_FOUND"),
        (
            s.get("/sessions/nope/pending-approvals"),
            404,
            "SESSION_NOT_FOUND",
        ),
        (s.get("/agents/nope/current"), 404, "SESSION_NOT_FOUND"),
        (
            s.post("/sessions/nope/cancel", json!({})),
            404,
            "SESSION_NOT_FOUND",
        ),
        (s.delete("/sessions/nope"), 404, "SESSION_NOT_FOUND"),
        (
            stream(json!({"session_id": "nope", "message": {"type": "user_message", "content": "hi"}})),
            404,
            "SESSION_NOT_FOUND",
        ),
        (
            stream(json!({"session_id": id, "message": {"type": "dance"}})),
            400,
            "INVALID_REQUEST",
        ),
        (
            stream(json!({"session_id": id, "message": {"type": "user_message", "content": 5}})),
            400,
            "INVALID_REQUEST",
        ),
        (
            stream(json!({"session_id": id, "message": {"type": "user_message", "content": " "}})),
            400,
            "INVALID_REQUEST",
        ),
        (
            stream(json!({"message": {"type": "user_message", "content": "hi"}})),
            400,
            "INVALID_REQUEST",
        ),
        (
            stream(json!({"session_id": id, "message": {"type": "switch_agent", "agent_type": "pirate"}})),
            400,
            "INVALID_REQUEST",
        ),
        (
            stream(
                json!({"session_id": id, "message": {"type": "tool_result", "call_id": "c9", "result": 1}}),
            ),
            404,
            "TOOL_CALL_NOT_FOUND",
        ),
        (
            stream(
                json!({"session_id": id, "message": {"type": "user_message", "content": (0..1000).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")}}),
            ),
            413,
            "CONTEXT_TOO_LARGE",
        ),
        (
            s.post(
                &format!("/sessions/{id}/hitl-decision"),
                json!({"call_id": "c9", "decision": "approve"}),
            ),
            404,
            "APPROVAL_NOT_FOUND",
        ),
        (
            s.post(
                &format!("/sessions/{id}/hitl-decision"),
                json!({"call_id": "c9", "decision": "maybe"}),
            ),
            400,
            "INVALID_REQUEST",
        ),
        (
            s.post(
                &format!("/sessions/{id}/hitl-decision"),
                json!({"decision": "approve"}),
            ),
            400,
            "INVALID_REQUEST",
        ),
    ];
    for (i, (req, status, expected)) in cases.into_iter().enumerate() {
        let (got_status, body) = error_of(req.send().await.unwrap()).await;
        assert_eq!((i, got_status, code(&body)), (i, status, expected), "{body}");
        assert!(body["error"]["message"].is_string());
    }
    let (_, body) = error_of(raw("/sessions", &"x".repeat(9000)).send().await.unwrap()).await;
    assert_eq!(body["error"]["message"], "request body over 8000 bytes");
    // Nothing of the refused requests was stored.
    let messages: Value = s.get_json(&format!("/sessions/{id}/messages")).await;
    assert_eq!(messages["messages"], json!([]));
    assert_eq!(llm.request_count(), 0);
}
