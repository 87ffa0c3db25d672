//! End to end through the real `agent-runtime-server` binary against a real small model:
//! SmolLM2-135M-Instruct at temperature 0 behind the real llama-cpp-python server, started and
//! stopped by `examples/real-model/model-server.sh`; HTTP + SSE on 127.0.0.1 only.
//!
//! Ignored by default like `agent-runtime-core/tests/real_model.rs`: run with `-- --ignored` after
//! `model-server.sh setup`; a model server that does not start fails them. By default the binary's backend
//! assumes full capabilities, so tools go out under `tool_choice: auto`, which this model ignores
//! and its agents answer in plain text; the `read_file` case sets `LLM_CAPABILITIES` to the
//! model's real ones (the engine then forces the call) and adds an agent with
//! `AGENT_RUNTIME__AGENTS_FILE`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

mod common;

use std::time::Duration;

use agent_runtime_core::llm::model_server::{MODEL, ModelServer, SERVER_LOCK};
use agent_runtime_core::session::NewMessage;
use agent_runtime_core::storage::{self, Commit};
use common::{Server, Sse, kinds};
use serde_json::{Value, json};

/// The longest a whole turn may take before the test calls it a hang.
const TURN_LIMIT: Duration = Duration::from_secs(180);

/// The model server, held alone for the test (one per process).
macro_rules! model_server {
    () => {{
        let lock = SERVER_LOCK.lock().await;
        (lock, ModelServer::start())
    }};
}

/// The runtime's server binary on the model, at temperature 0, with `extra` settings.
async fn runtime(model: &ModelServer, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![("LLM_MODEL", MODEL), ("LLM_TEMPERATURE", "0")];
    env.extend_from_slice(extra);
    Server::start_with(&model.base_url, None, &env).await
}

/// A session on a fresh project directory.
async fn session(rt: &Server) -> String {
    let project = rt.dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    rt.session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await
}

/// Sends a user message and reads the turn to its end, within the limit.
async fn say(rt: &Server, session: &str, agent: Option<&str>, content: &str) -> Vec<Value> {
    let mut message = json!({"type": "user_message", "content": content});
    if let Some(a) = agent {
        message["agent_type"] = json!(a);
    }
    let events = tokio::time::timeout(TURN_LIMIT, rt.send(session, message))
        .await
        .unwrap_or_else(|_| panic!("the turn did not end within {TURN_LIMIT:?}"));
    let summary: Vec<&Value> = events
        .iter()
        .filter(|e| !(e["type"] == "assistant_message" && e["is_final"] == false))
        .collect();
    eprintln!("turn of {} events: {summary:?}", events.len());
    events
}

fn tokens(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "assistant_message" && e["is_final"] == false)
        .map(|e| e["token"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
#[ignore = "needs the model server: examples/real-model/model-server.sh setup"]
async fn tokens_arrive_as_separate_sse_events_then_done() {
    let (_lock, model) = model_server!();
    let rt = runtime(&model, &[]).await;
    let s = session(&rt).await;

    let events = say(&rt, &s, Some("ask"), "Say hello to me.").await;

    let toks = tokens(&events);
    assert!(
        toks.len() >= 2,
        "the answer streams in several events: {events:?}"
    );
    assert_eq!(
        kinds(&events),
        vec!["agent_switched", "assistant_final", "done:completed"],
        "{events:?}"
    );
    // Tokens come before the final message, which holds exactly their text.
    let last_token = events
        .iter()
        .rposition(|e| e["type"] == "assistant_message" && e["is_final"] == false)
        .unwrap();
    let fin = events
        .iter()
        .position(|e| e["type"] == "assistant_message" && e["is_final"] == true)
        .unwrap();
    assert!(last_token < fin);
    assert_eq!(events[fin]["content"], json!(toks.concat()));
}

#[tokio::test]
#[ignore = "needs the model server: examples/real-model/model-server.sh setup"]
async fn the_routing_call_returns_a_valid_agent_through_the_forced_function() {
    let (_lock, model) = model_server!();
    // Plans off: with `plan` offered, the model's route arguments are invalid JSON (see the core
    // test `the_routing_call_with_plans_enabled_returns_a_valid_agent`).
    let rt = runtime(&model, &[("AGENT_RUNTIME__PLANS_ENABLED", "false")]).await;
    let s = session(&rt).await;

    let r = rt
        .post(
            "/agent/message/stream",
            json!({"session_id": s, "message": {"type": "user_message", "content": "Write a Python function that adds two numbers."}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut sse = Sse::new(r);
    let first = tokio::time::timeout(TURN_LIMIT, sse.next())
        .await
        .expect("the routing decision within the limit")
        .expect("an event");
    // What the routed agent does next is not this test's business.
    let cancel = rt
        .post(&format!("/api/v1/sessions/{s}/cancel"), json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let rest = tokio::time::timeout(TURN_LIMIT, sse.all())
        .await
        .expect("the turn ends");
    eprintln!("routing: {first}");

    assert_eq!(first["type"], "agent_switched", "{first}");
    assert_eq!(first["from_agent"], "orchestrator");
    let to = first["to_agent"].as_str().unwrap();
    assert!(["coder", "architect", "debug", "ask"].contains(&to), "{first}");
    let reason = first["reason"].as_str().unwrap();
    assert!(
        !reason.starts_with("Keyword routing"),
        "the model's forced `route` call decided, not the keyword fallback: {reason}"
    );
    assert_eq!(
        rest.last().map(|e| e["type"].clone()),
        Some(json!("done")),
        "{rest:?}"
    );
    let current: Value = rt.get_json(&format!("/api/v1/agents/{s}/current")).await;
    assert_eq!(current["current_agent"]["type"], json!(to), "{current}");
}

/// Stores `pairs` long user/assistant exchanges straight into the server's SQLite file: a
/// conversation far longer than the model's 4,096-token context.
async fn seed_long_history(rt: &Server, session: &str, pairs: usize) {
    let store = storage::open(&format!("sqlite://{}", rt.dir.path().join("rt.db").display()))
        .await
        .unwrap();
    for i in 0..pairs {
        let filler = format!("Paragraph {i} of an old discussion about gardening and weather. ").repeat(60);
        let commit = Commit {
            messages: vec![
                NewMessage::user(format!("Tell me a story. {filler}"), Some("ask".into())),
                NewMessage::assistant(format!("Here is a story. {filler}"), Some("ask".into()), vec![]),
            ],
            ..Commit::now()
        };
        store.commit(session, commit).await.unwrap();
    }
}

#[tokio::test]
#[ignore = "needs the model server: examples/real-model/model-server.sh setup"]
async fn a_conversation_longer_than_the_model_context_is_trimmed_and_answered() {
    let (_lock, model) = model_server!();
    // o200k_base undercounts SmolLM2's tokens and the window leaves no room for tool schemas or
    // the answer: 1,500 keeps everything inside 4,096.
    let rt = runtime(&model, &[("MAX_CONTEXT_TOKENS", "1500")]).await;
    let s = session(&rt).await;
    seed_long_history(&rt, &s, 10).await;

    let events = say(&rt, &s, Some("ask"), "What is the capital of France?").await;

    assert_eq!(
        kinds(&events),
        vec!["agent_switched", "assistant_final", "done:completed"],
        "{events:?}"
    );
    assert!(!tokens(&events).concat().trim().is_empty());
}

#[tokio::test]
#[ignore = "needs the model server: examples/real-model/model-server.sh setup"]
async fn a_request_the_model_server_chokes_on_ends_in_a_clean_llm_error() {
    let (_lock, model) = model_server!();
    // A window far larger than the model's context: the model server answers 200 with an empty
    // body (fixture `llama-cpp-python-context-overflow.response`).
    let rt = runtime(
        &model,
        &[("MAX_CONTEXT_TOKENS", "100000"), ("MAX_CONTEXT_MESSAGES", "1000")],
    )
    .await;
    let s = session(&rt).await;
    seed_long_history(&rt, &s, 10).await;

    let events = say(&rt, &s, Some("ask"), "What is the capital of France?").await;

    assert_eq!(
        kinds(&events),
        vec!["agent_switched", "error", "done:error"],
        "{events:?}"
    );
    // The empty answer is read as "too long": the window is halved and sent once more, still far
    // over 4,096 tokens, so the turn ends naming the cause.
    assert_eq!(common::find(&events, "error")["code"], "CONTEXT_TOO_LARGE");
    // Nothing is left locked: the session is idle again.
    let session: Value = rt.get_json(&format!("/api/v1/sessions/{s}")).await;
    assert_ne!(session["status"], "running", "{session}");
}

/// A turn whose agent must read a file: the agent (from `AGENT_RUNTIME__AGENTS_FILE`) has only
/// `read_file`, and with `LLM_CAPABILITIES=llama-cpp-python` the engine forces the call the model
/// cannot choose on its own, then asks for the answer without tools. The real file content is the
/// tool result, and the answer streams.
#[tokio::test]
#[ignore = "needs the model server: examples/real-model/model-server.sh setup"]
async fn a_read_file_call_through_the_binary_gets_the_real_content_and_the_answer_streams() {
    let (_lock, model) = model_server!();
    let agents = tempfile::tempdir().unwrap();
    let agents_file = agents.path().join("agents.json");
    std::fs::write(
        &agents_file,
        json!([{
            "type": "reader", "name": "Reader Agent", "description": "Reads one file", "emoji": "📖",
            "tools": ["read_file"], "restrictions": ["read only"], "path_rule": {"kind": "read_only"},
            "system_prompt": "Call read_file with {\"path\": \"notes.txt\"}."
        }])
        .to_string(),
    )
    .unwrap();
    let rt = runtime(
        &model,
        &[
            ("LLM_CAPABILITIES", "llama-cpp-python"),
            ("HITL_ENABLED", "false"),
            ("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false"),
            ("AGENT_RUNTIME__AGENTS_FILE", agents_file.to_str().unwrap()),
            ("LLM_MAX_TOKENS", "96"),
        ],
    )
    .await;
    let s = session(&rt).await;
    std::fs::write(
        rt.dir.path().join("project/notes.txt"),
        "The secret word is PINEAPPLE.\n",
    )
    .unwrap();

    let events = say(&rt, &s, Some("reader"), "What is the secret word in notes.txt?").await;

    let calls: Vec<(&Value, &Value)> = events
        .iter()
        .filter(|e| e["type"] == "tool_call")
        .map(|e| (&e["tool_name"], &e["arguments"]))
        .collect();
    assert_eq!(
        calls,
        vec![(&json!("read_file"), &json!({"path": "notes.txt"}))],
        "{events:?}"
    );
    let results: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "tool_result")
        .map(|e| &e["result"])
        .collect();
    assert_eq!(
        results,
        vec![&json!(
            "[notes.txt: lines 1-1 of 1]\nThe secret word is PINEAPPLE.\n"
        )]
    );
    let toks = tokens(&events);
    assert!(
        toks.len() >= 2,
        "the answer after the tool result streams: {events:?}"
    );
    assert_eq!(
        events.last().unwrap()["stop_reason"],
        json!("completed"),
        "{events:?}"
    );
}
