//! Whole turns through the real server and a mock OpenAI-compatible model server: routing,
//! approvals (edit, reject), client execution, busy sessions, cancel, reconnect, idempotency.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use serde_json::{Value, json};

fn route(agent: &str) -> MockResponse {
    MockResponse::script(&Script::tool_call(
        "route",
        json!({"agent": agent, "reason": "code work"}),
    ))
}

/// create → routed to coder → write_file needs approval → listed → decided → answer → done.
async fn approval_flow(database_url: Option<&str>, decision: &str) {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(&llm.url(), database_url, &[]).await;
    let project = s.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await;
    llm.push(route("coder"));
    llm.push(MockResponse::script(&Script::tool_call(
        "write_file",
        json!({"path": "widget.txt", "content": "original"}),
    )));
    llm.push(MockResponse::script(&Script::text("Виджет готов.")));

    let first = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Создай новый виджет профиля"}),
        )
        .await;
    assert_eq!(
        kinds(&first),
        ["agent_switched", "tool_call", "done:awaiting_approval"]
    );
    let switched = find(&first, "agent_switched");
    assert_eq!(
        (&switched["from_agent"], &switched["to_agent"]),
        (&json!("orchestrator"), &json!("coder"))
    );
    let call = find(&first, "tool_call");
    let call_id = call["call_id"].as_str().unwrap().to_string();
    assert_eq!(
        (&call["tool_name"], &call["arguments"], &call["requires_approval"]),
        (
            &json!("write_file"),
            &json!({"path": "widget.txt", "content": "original"}),
            &json!(true)
        )
    );

    let pending: Value = s.get_json(&format!("/sessions/{id}/pending-approvals")).await;
    let mut listed = pending["pending_approvals"][0].clone();
    assert!(listed["created_at"].take().as_str().unwrap().ends_with('Z'));
    assert!(listed["reason"].take().is_string());
    assert_eq!(
        listed,
        json!({"call_id": call_id, "tool_name": "write_file", "arguments": {"path": "widget.txt", "content": "original"},
               "reason": null, "request_type": "tool", "created_at": null})
    );
    let session: Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(session["status"], "awaiting_approval");

    let mut body = json!({"call_id": call_id, "decision": decision, "feedback": "use the edited text"});
    if decision == "edit" {
        body["modified_arguments"] = json!({"path": "widget.txt", "content": "edited"});
    }
    let r = s
        .post(&format!("/api/v1/sessions/{id}/hitl-decision"), body.clone())
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
    assert_eq!(find(&second, "approval_resolved")["decision"], decision);
    let answer: String = second
        .iter()
        .filter(|e| e["type"] == "assistant_message" && e["is_final"] == false)
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(answer, "Виджет готов.");
    assert_eq!(find(&second, "assistant_message")["is_final"], false);
    let result = find(&second, "tool_result");
    let written = std::fs::read_to_string(project.join("widget.txt"));
    if decision == "edit" {
        assert_eq!(written.unwrap(), "edited");
        assert!(result.get("error").is_none(), "{result}");
    } else {
        assert!(written.is_err(), "a rejected write must not happen");
        assert!(
            result["error"].is_object() || result["result"].is_string(),
            "{result}"
        );
    }
    // Seqs of both streams continue each other.
    let seqs: Vec<u64> = first
        .iter()
        .chain(&second)
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    let (status, again) = error_of(
        s.post(&format!("/sessions/{id}/hitl-decision"), body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &again["error"]["code"]),
        (409, &json!("APPROVAL_ALREADY_DECIDED"))
    );
    let pending: Value = s.get_json(&format!("/sessions/{id}/pending-approvals")).await;
    assert_eq!(pending, json!({"pending_approvals": []}));
    let current: Value = s.get_json(&format!("/agents/{id}/current")).await;
    assert_eq!(
        (
            current["current_agent"]["type"].as_str(),
            current["switch_count"].as_u64()
        ),
        (Some("coder"), Some(1))
    );
    let messages: Value = s.get_json(&format!("/sessions/{id}/messages")).await;
    let roles: Vec<&str> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(messages["messages"][1]["tool_calls"][0]["id"], json!(call_id));
    assert_eq!(messages["messages"][3]["content"], "Виджет готов.");
    // The model was told about the rejection with the human's words.
    if decision == "reject" {
        let last = llm.requests().last().cloned().unwrap();
        let told = last["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["role"] == "tool")
            .unwrap()
            .clone();
        assert!(
            told["content"].as_str().unwrap().contains("use the edited text"),
            "{told}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edited_write_is_performed_with_the_edited_content() {
    approval_flow(None, "edit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_write_is_not_performed_and_the_model_is_told() {
    approval_flow(None, "reject").await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn the_approval_flow_runs_on_postgres() {
    use agent_runtime_core::storage::pg_testing;
    // A fresh schema: the shared one may hold another build's older schema version.
    let guard = pg_testing::fresh_schema().await;
    drop(pg_testing::open_in(&guard).await);
    approval_flow(Some(&guard.server_url()), "edit").await;
    drop(guard);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_execution_continues_with_the_clients_tool_result() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let id = s.session(json!({"metadata": {"tool_execution": "client"}})).await;
    llm.push(route("coder"));
    llm.push(MockResponse::script(&Script::tool_call(
        "read_file",
        json!({"path": "src/lib.rs"}),
    )));
    llm.push(MockResponse::script(&Script::text("It has one line.")));
    let first = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Fix the code in lib.rs", "role": "user"}),
        )
        .await;
    assert_eq!(
        kinds(&first),
        ["agent_switched", "tool_call", "done:awaiting_tool_result"]
    );
    let call = find(&first, "tool_call");
    assert_eq!(call["requires_approval"], false);
    let session: Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(session["status"], "awaiting_tool_result");
    let second = s
        .send(
            &id,
            json!({"type": "tool_result", "call_id": call["call_id"], "result": "fn main() {}"}),
        )
        .await;
    // The client's result is recorded in the stream too, so a replay shows the whole turn.
    assert_eq!(
        kinds(&second),
        ["tool_result", "assistant_final", "done:completed"]
    );
    assert_eq!(find(&second, "tool_result")["result"], "fn main() {}");
    let last = llm.requests().last().cloned().unwrap();
    let tool = last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap()
        .clone();
    assert!(
        tool["content"].as_str().unwrap().contains("fn main() {}"),
        "{tool}"
    );
    let (status, body) = error_of(
        s.post("/agent/message/stream", json!({"session_id": id, "message": {"type": "tool_result", "call_id": call["call_id"], "result": 1}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("TOOL_CALL_NOT_FOUND"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_messages_one_runs_one_is_busy_and_cancel_ends_the_turn() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let id = s.session(json!({})).await;
    llm.push(MockResponse::hang());
    let send = || {
        s.post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "Explain this"}}),
        )
        .send()
    };
    let (a, b) = tokio::join!(send(), send());
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 409]);
    let (running, busy) = if a.status() == 200 { (a, b) } else { (b, a) };
    assert_eq!(
        error_of(busy).await,
        (
            409,
            json!({"error": {"code": "SESSION_BUSY", "message": format!("session '{id}' is busy: a turn is already running")}})
        )
    );
    // The model call hangs: the turn is running until cancelled.
    while llm.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancel: Value = s
        .post(&format!("/sessions/{id}/cancel"), json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancel, json!({"status": "cancelled"}));
    let events = Sse::new(running).all().await;
    assert_eq!(kinds(&events).last().unwrap(), "done:cancelled");
    let session: Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(session["status"], "idle");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnecting_client_gets_every_missed_event_once_and_the_turn_goes_on() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let id = s.session(json!({})).await;
    llm.push(route("ask"));
    let words: Vec<String> = (0..40).map(|i| format!("w{i} ")).collect();
    llm.push(
        MockResponse::script(&Script::text(words.concat()))
            .split_every(40)
            .drip(Duration::from_millis(20)),
    );
    let r = s
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "What is this?"}}),
        )
        .send()
        .await
        .unwrap();
    let mut sse = Sse::new(r);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(sse.next().await.unwrap());
    }
    drop(sse); // the client goes away mid-turn
    let last = seen.last().unwrap()["seq"].as_u64().unwrap();
    let r = s
        .get(&format!("/sessions/{id}/events"))
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    let rest = Sse::new(r).all().await;
    let all: Vec<Value> = seen.iter().chain(&rest).cloned().collect();
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(kinds(&all).last().unwrap(), "done:completed");
    // A full replay is the same events, and ?after= works like the header.
    let replay = Sse::new(
        s.get(&format!("/api/v1/sessions/{id}/events?after=0"))
            .send()
            .await
            .unwrap(),
    )
    .all()
    .await;
    assert_eq!(replay, all);
    let tail = Sse::new(
        s.get(&format!("/sessions/{id}/events?after={last}"))
            .send()
            .await
            .unwrap(),
    )
    .all()
    .await;
    assert_eq!(tail, rest);
    let messages: Value = s.get_json(&format!("/sessions/{id}/messages")).await;
    assert_eq!(messages["messages"][1]["content"], json!(words.concat()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_request_id_replays_the_turn_instead_of_running_another() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let id = s.session(json!({})).await;
    llm.push(route("ask"));
    llm.push(MockResponse::script(&Script::text("Once.")));
    let body = json!({"session_id": id, "request_id": "req-1", "message": {"type": "user_message", "content": "hi"}});
    let first = Sse::new(
        s.post("/agent/message/stream", body.clone())
            .send()
            .await
            .unwrap(),
    )
    .all()
    .await;
    let again = Sse::new(s.post("/agent/message/stream", body).send().await.unwrap())
        .all()
        .await;
    assert_eq!(
        kinds(&first),
        ["agent_switched", "assistant_final", "done:completed"]
    );
    assert_eq!(again, first);
    assert_eq!(llm.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn model_failures_after_the_stream_started_are_error_events() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false")],
    )
    .await;
    let id = s.session(json!({})).await;
    llm.push(MockResponse::status(
        400,
        r#"{"error":{"message":"bad request"}}"#,
    ));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "hi"}))
        .await;
    assert_eq!(kinds(&events), ["error", "done:error"]);
    assert_eq!(find(&events, "error")["code"], "LLM_ERROR");
    assert_eq!(find(&events, "error")["is_final"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_follow_stream_gets_keep_alive_comments() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(&llm.url(), None, &[("SSE_KEEPALIVE_SECS", "1")]).await;
    let id = s.session(json!({})).await;
    let mut sse = Sse::new(
        s.get(&format!("/sessions/{id}/events?follow=true"))
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(sse.next_frame().await.unwrap(), ": keep-alive");
    let metrics = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("sse_streams_active 1"), "{metrics}");
}
