//! Budgets through the real server (issue 18), on SQLite and Postgres: each budget trips exactly at
//! its limit, a raise resumes the same turn, a rejected raise closes it, routing is gated, restarts, cost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_core::session::Usage;
use agent_runtime_core::storage::pg_testing::SchemaGuard;
use common::*;
use serde_json::{Value, json};

/// Where a test's server keeps its sessions.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Db {
    Sqlite,
    Postgres,
}

/// A database for one test: a SQLite file in a temp dir, or a fresh Postgres schema.
struct Store {
    url: String,
    _dir: tempfile::TempDir,
    _guard: Option<Arc<SchemaGuard>>,
}

async fn store(db: Db) -> Store {
    let dir = tempfile::tempdir().unwrap();
    match db {
        Db::Sqlite => Store {
            url: format!("sqlite://{}", dir.path().join("budgets.db").display()),
            _dir: dir,
            _guard: None,
        },
        Db::Postgres => {
            let (guard, url) = fault_support::postgres_url().await;
            Store {
                url,
                _dir: dir,
                _guard: Some(guard),
            }
        }
    }
}

/// Every model call reports this usage: 20400 tokens (the prompt well above what the runtime
/// counts for it, so a token budget's check before a call depends on the reported usage alone).
fn usage() -> Usage {
    Usage {
        prompt_tokens: 20_000,
        completion_tokens: 400,
        ..Default::default()
    }
}

fn read(path: &str) -> MockResponse {
    MockResponse::script(&Script::tool_call("read_file", json!({"path": path})).usage(usage()))
}

fn answer(text: &str) -> MockResponse {
    MockResponse::script(&Script::text(text).usage(usage()))
}

/// A server on `store` with the coder as the default agent (no routing call), and a session in a
/// project with three files, created with `budget`.
async fn setup(
    store: &Store,
    llm: &MockLlmServer,
    extra: &[(&str, &str)],
    budget: Value,
) -> (Server, String) {
    let mut env = vec![("AGENT_RUNTIME__DEFAULT_AGENT", "coder")];
    env.extend_from_slice(extra);
    let s = Server::start_with(&llm.url(), Some(&store.url), &env).await;
    let project = s.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    for f in ["a.txt", "b.txt", "c.txt"] {
        std::fs::write(project.join(f), f).unwrap();
    }
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}, "budget": budget}))
        .await;
    (s, id)
}

async fn decide(s: &Server, id: &str, body: Value) -> Vec<Value> {
    let r = s
        .post(&format!("/sessions/{id}/hitl-decision"), body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    Sse::new(r).all().await
}

/// The pending budget approval, its `created_at` and `reason` checked and taken out.
async fn pending_budget(s: &Server, id: &str) -> Value {
    let pending: Value = s.get_json(&format!("/sessions/{id}/pending-approvals")).await;
    let list = pending["pending_approvals"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{pending}");
    let mut a = list[0].clone();
    assert!(a["created_at"].take().as_str().unwrap().ends_with('Z'));
    assert!(a["reason"].take().as_str().unwrap().contains("budget is reached"));
    a
}

/// `done.usage` with the turn's time spent taken out (it depends on the machine's speed).
fn done_usage(events: &[Value]) -> Value {
    let mut u = events.last().unwrap()["usage"].clone();
    let secs = u["spent"].as_object_mut().unwrap().remove("turn_time_secs");
    assert!(secs.as_ref().is_some_and(Value::is_u64), "{u}");
    u
}

async fn a_tool_call_budget_pauses_before_the_call_past_it_and_approve_resumes_that_call(db: Db) {
    let store = store(db).await;
    let llm = MockLlmServer::start().await.unwrap();
    let (s, id) = setup(&store, &llm, &[], json!({"turn_tool_calls": 2})).await;
    for r in [
        read("a.txt"),
        read("b.txt"),
        read("c.txt"),
        answer("All three read."),
    ] {
        llm.push(r);
    }
    let first = s
        .send(&id, json!({"type": "user_message", "content": "Read the files"}))
        .await;
    assert_eq!(
        kinds(&first),
        [
            "tool_call",
            "tool_result",
            "tool_call",
            "tool_result",
            "budget_exceeded",
            "done:budget_exceeded"
        ]
    );
    // Two calls ran; the model's third call waits, unrun, behind the budget.
    assert_eq!(llm.request_count(), 3);
    let exceeded = find(&first, "budget_exceeded").clone();
    let call_id = exceeded["call_id"].as_str().unwrap().to_string();
    assert_eq!(
        pending_budget(&s, &id).await,
        json!({"call_id": call_id, "tool_name": "raise_budget", "request_type": "budget",
               "arguments": {"budget": "turn_tool_calls", "spent": 2, "limit": 2, "proposed_limit": 4},
               "reason": null, "created_at": null})
    );
    assert_eq!(
        done_usage(&first),
        json!({"prompt_tokens": 60000, "completion_tokens": 1200,
               "spent": {"session_tokens": 61200, "turn_tokens": 61200, "turn_tool_calls": 2},
               "remaining": {"turn_tool_calls": 0}})
    );
    let session: Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(
        (&session["status"], &session["budget"]),
        (&json!("awaiting_approval"), &json!({"turn_tool_calls": 2}))
    );

    let second = decide(&s, &id, json!({"call_id": call_id, "decision": "approve"})).await;
    assert_eq!(
        kinds(&second),
        [
            "approval_resolved",
            "tool_call",
            "tool_result",
            "assistant_final",
            "done:completed"
        ]
    );
    // The same turn went on where it stopped: the third call ran, then one more model call.
    assert_eq!(find(&second, "tool_call")["arguments"], json!({"path": "c.txt"}));
    let result = find(&second, "tool_result");
    assert!(result["result"].to_string().contains("c.txt"), "{result}");
    assert_eq!(llm.request_count(), 4);
    assert_eq!(
        done_usage(&second),
        json!({"prompt_tokens": 80000, "completion_tokens": 1600,
               "spent": {"session_tokens": 81600, "turn_tokens": 81600, "turn_tool_calls": 3},
               "remaining": {"turn_tool_calls": 1}})
    );
    let seqs: Vec<u64> = first
        .iter()
        .chain(&second)
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // The turn's raise does not outlive it: the session's budget is unchanged.
    let session: Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(
        (&session["status"], &session["budget"]),
        (&json!("idle"), &json!({"turn_tool_calls": 2}))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tool_call_budget_trips_at_its_limit_on_sqlite() {
    a_tool_call_budget_pauses_before_the_call_past_it_and_approve_resumes_that_call(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_tool_call_budget_trips_at_its_limit_on_postgres() {
    a_tool_call_budget_pauses_before_the_call_past_it_and_approve_resumes_that_call(Db::Postgres).await;
}

async fn a_turn_token_budget_caps_max_tokens_trips_before_the_call_and_an_edit_sets_the_limit(db: Db) {
    let store = store(db).await;
    let llm = MockLlmServer::start().await.unwrap();
    let (s, id) = setup(&store, &llm, &[], json!({"turn_tokens": 40800})).await;
    for r in [read("a.txt"), read("b.txt"), answer("Both read.")] {
        llm.push(r);
    }
    let first = s
        .send(&id, json!({"type": "user_message", "content": "Read a and b"}))
        .await;
    assert_eq!(
        kinds(&first),
        [
            "tool_call",
            "tool_result",
            "tool_call",
            "tool_result",
            "budget_exceeded",
            "done:budget_exceeded"
        ]
    );
    // 40800 tokens spent by two calls: a third could not have a single token.
    assert_eq!(llm.request_count(), 2);
    let requests = llm.requests();
    let caps: Vec<u64> = requests
        .iter()
        .map(|r| r["max_tokens"].as_u64().unwrap())
        .collect();
    assert!(
        caps[0] < 40800 && caps[1] < 20400,
        "max_tokens capped to what remains: {caps:?}"
    );
    let call_id = find(&first, "budget_exceeded")["call_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        pending_budget(&s, &id).await["arguments"],
        json!({"budget": "turn_tokens", "spent": 40800, "limit": 40800, "proposed_limit": 81600})
    );

    // An edit must leave room: at or below what was spent it is refused, and nothing changes.
    let r = s
        .post(
            &format!("/sessions/{id}/hitl-decision"),
            json!({"call_id": call_id, "decision": "edit", "modified_arguments": {"limit": 40800}}),
        )
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(r).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("INVALID_TOOL")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must be more than what was spent (40800)"),
        "{body}"
    );
    assert_eq!(pending_budget(&s, &id).await["call_id"], json!(call_id));

    let second = decide(
        &s,
        &id,
        json!({"call_id": call_id, "decision": "edit", "modified_arguments": {"limit": 100000}}),
    )
    .await;
    assert_eq!(
        kinds(&second),
        ["approval_resolved", "assistant_final", "done:completed"]
    );
    assert_eq!(find(&second, "approval_resolved")["decision"], "edit");
    assert_eq!(
        done_usage(&second)["remaining"],
        json!({"turn_tokens": 100000 - 61200})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_token_budget_trips_at_its_limit_on_sqlite() {
    a_turn_token_budget_caps_max_tokens_trips_before_the_call_and_an_edit_sets_the_limit(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_turn_token_budget_trips_at_its_limit_on_postgres() {
    a_turn_token_budget_caps_max_tokens_trips_before_the_call_and_an_edit_sets_the_limit(Db::Postgres).await;
}

async fn a_session_token_budget_spans_turns_and_a_rejected_raise_ends_the_turn_with_a_closing_message(
    db: Db,
) {
    let store = store(db).await;
    let llm = MockLlmServer::start().await.unwrap();
    let (s, id) = setup(&store, &llm, &[], json!({"session_tokens": 40800})).await;
    llm.push(answer("One."));
    llm.push(answer("Two."));
    for content in ["first", "second"] {
        let events = s
            .send(&id, json!({"type": "user_message", "content": content}))
            .await;
        assert_eq!(kinds(&events), ["assistant_final", "done:completed"]);
    }
    let third = s
        .send(&id, json!({"type": "user_message", "content": "third"}))
        .await;
    assert_eq!(kinds(&third), ["budget_exceeded", "done:budget_exceeded"]);
    assert_eq!(llm.request_count(), 2);
    let call_id = find(&third, "budget_exceeded")["call_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        pending_budget(&s, &id).await["arguments"],
        json!({"budget": "session_tokens", "spent": 40800, "limit": 40800, "proposed_limit": 81600})
    );

    let closed = decide(
        &s,
        &id,
        json!({"call_id": call_id, "decision": "reject", "feedback": "enough for today"}),
    )
    .await;
    assert_eq!(
        kinds(&closed),
        ["approval_resolved", "assistant_final", "done:budget_exceeded"]
    );
    let closing = "I stopped here: this turn reached its session_tokens budget (40800 of 40800) and raising it was declined.";
    assert_eq!(find(&closed, "assistant_message")["content"], closing);
    let session: Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(
        (&session["status"], &session["budget"]),
        (&json!("idle"), &json!({"session_tokens": 40800}))
    );
    let messages: Value = s.get_json(&format!("/sessions/{id}/messages")).await;
    let last = messages["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (&last["role"], &last["content"]),
        (&json!("assistant"), &json!(closing))
    );
    let pending: Value = s.get_json(&format!("/sessions/{id}/pending-approvals")).await;
    assert_eq!(pending, json!({"pending_approvals": []}));

    // Raised by hand, the session goes on.
    let r = s
        .client
        .patch(s.url(&format!("/sessions/{id}")))
        .header("x-internal-auth", TOKEN)
        .json(&json!({"budget": {"session_tokens": 100000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let patched: Value = r.json().await.unwrap();
    assert_eq!(patched["budget"], json!({"session_tokens": 100000}));
    llm.push(answer("Three."));
    let fourth = s
        .send(&id, json!({"type": "user_message", "content": "fourth"}))
        .await;
    assert_eq!(kinds(&fourth), ["assistant_final", "done:completed"]);
    let used: Value = s.get_json(&format!("/sessions/{id}/usage")).await;
    assert_eq!(
        used,
        json!({"session_id": id, "prompt_tokens": 60000, "cached_prompt_tokens": 0, "completion_tokens": 1200,
               "total_tokens": 61200, "cost": null,
               "cost_unavailable": "no MODEL_PRICES_FILE is set: tokens are counted, cost is not",
               "budget": {"session_tokens": 100000},
               "spent": {"session_tokens": 61200, "turn_tokens": 0, "turn_time_secs": 0, "turn_tool_calls": 0},
               "remaining": {"session_tokens": 38800}})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_budget_ends_the_turn_with_a_closing_message_on_sqlite() {
    a_session_token_budget_spans_turns_and_a_rejected_raise_ends_the_turn_with_a_closing_message(Db::Sqlite)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_rejected_budget_ends_the_turn_with_a_closing_message_on_postgres() {
    a_session_token_budget_spans_turns_and_a_rejected_raise_ends_the_turn_with_a_closing_message(
        Db::Postgres,
    )
    .await;
}

async fn a_spent_budget_pauses_a_message_before_its_routing_call_and_the_raise_routes_it_once(db: Db) {
    let store = store(db).await;
    let llm = MockLlmServer::start().await.unwrap();
    // The orchestrator (the default agent) routes each message: its routing call is gated too.
    let s = Server::start_with(&llm.url(), Some(&store.url), &[]).await;
    let id = s.session(json!({"budget": {"session_tokens": 1}})).await;
    let route = Script::tool_call("route", json!({"agent": "ask", "reason": "a question"}));
    llm.push(MockResponse::script(&route.usage(usage())));
    llm.push(answer("Because."));

    let first = s
        .send(
            &id,
            json!({"type": "user_message", "content": "why is the sky blue?"}),
        )
        .await;
    assert_eq!(kinds(&first), ["budget_exceeded", "done:budget_exceeded"]);
    assert_eq!(
        llm.request_count(),
        0,
        "nothing goes to the model past the budget"
    );
    let call_id = find(&first, "budget_exceeded")["call_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        pending_budget(&s, &id).await["arguments"],
        json!({"budget": "session_tokens", "spent": 0, "limit": 1, "proposed_limit": 2})
    );

    let raised = decide(
        &s,
        &id,
        json!({"call_id": call_id, "decision": "edit", "modified_arguments": {"limit": 100000}}),
    )
    .await;
    assert_eq!(
        kinds(&raised),
        [
            "approval_resolved",
            "agent_switched",
            "assistant_final",
            "done:completed"
        ]
    );
    let choices: Vec<Value> = llm.requests().iter().map(|r| r["tool_choice"].clone()).collect();
    assert_eq!(
        choices,
        [
            json!({"type": "function", "function": {"name": "route"}}),
            json!("auto")
        ],
        "one routing call, then the chosen agent"
    );
    let session: Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(
        (&session["status"], &session["current_agent"]),
        (&json!("idle"), &json!("ask"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_budget_pauses_before_routing_on_sqlite() {
    a_spent_budget_pauses_a_message_before_its_routing_call_and_the_raise_routes_it_once(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_spent_budget_pauses_before_routing_on_postgres() {
    a_spent_budget_pauses_a_message_before_its_routing_call_and_the_raise_routes_it_once(Db::Postgres).await;
}

async fn a_time_budget_stops_a_streaming_answer_and_a_raise_lets_the_turn_finish(db: Db) {
    let store = store(db).await;
    let llm = MockLlmServer::start().await.unwrap();
    let (s, id) = setup(&store, &llm, &[], json!({"turn_time_secs": 1})).await;
    let words: Vec<String> = (0..40).map(|i| format!("word{i}")).collect();
    let full = words.join(" ");
    // About 4 seconds of answer against a 1-second budget.
    llm.push(
        MockResponse::script(&Script::text(&full).usage(usage()))
            .split_every(100)
            .drip(Duration::from_millis(100)),
    );
    llm.push(answer("Finished."));
    let first = s
        .send(&id, json!({"type": "user_message", "content": "Write a lot"}))
        .await;
    assert_eq!(
        kinds(&first),
        ["assistant_final", "budget_exceeded", "done:budget_exceeded"]
    );
    let cut = find(&first, "assistant_message");
    let streamed: String = first
        .iter()
        .filter(|e| e["type"] == "assistant_message" && e["is_final"] == false)
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    let partial = first
        .iter()
        .find(|e| e["type"] == "assistant_message" && e["is_final"] == true)
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(partial, streamed, "{cut}");
    assert!(
        full.starts_with(&partial) && partial.len() < full.len(),
        "the answer is cut at the limit: {partial:?}"
    );
    let a = pending_budget(&s, &id).await;
    assert_eq!(
        (
            &a["arguments"]["budget"],
            &a["arguments"]["limit"],
            &a["arguments"]["proposed_limit"]
        ),
        (&json!("turn_time_secs"), &json!(1), &json!(2))
    );
    let second = decide(
        &s,
        &id,
        json!({"call_id": a["call_id"], "decision": "edit", "modified_arguments": {"limit": 600}}),
    )
    .await;
    assert_eq!(
        kinds(&second),
        ["approval_resolved", "assistant_final", "done:completed"]
    );
    assert_eq!(llm.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_time_budget_stops_a_streaming_answer_on_sqlite() {
    a_time_budget_stops_a_streaming_answer_and_a_raise_lets_the_turn_finish(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_time_budget_stops_a_streaming_answer_on_postgres() {
    a_time_budget_stops_a_streaming_answer_and_a_raise_lets_the_turn_finish(Db::Postgres).await;
}

/// Prices per million tokens: 6000 fresh prompt tokens at 2.50, 4000 cached at 1.25 and 2000
/// completion tokens at 10.00 cost 0.015 + 0.005 + 0.020 = 0.04 a call.
fn priced_usage() -> Usage {
    Usage {
        prompt_tokens: 10_000,
        completion_tokens: 2_000,
        cached_prompt_tokens: 4_000,
    }
}

async fn cost_is_counted_to_the_cent_and_a_session_cost_budget_trips_at_its_limit(db: Db) {
    let store = store(db).await;
    let llm = MockLlmServer::start().await.unwrap();
    let prices = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        prices.path(),
        r#"{"gpt-4o-mini": {"input": 2.5, "cached_input": 1.25, "output": 10.0}}"#,
    )
    .unwrap();
    let prices_path = prices.path().to_str().unwrap().to_string();
    let (s, id) = setup(
        &store,
        &llm,
        &[("MODEL_PRICES_FILE", &prices_path)],
        json!({"session_cost": 0.08}),
    )
    .await;
    for path in ["a.txt", "b.txt"] {
        llm.push(MockResponse::script(
            &Script::tool_call("read_file", json!({"path": path})).usage(priced_usage()),
        ));
    }
    llm.push(MockResponse::script(&Script::text("Read.").usage(priced_usage())));
    let first = s
        .send(&id, json!({"type": "user_message", "content": "Read a and b"}))
        .await;
    assert_eq!(
        kinds(&first),
        [
            "tool_call",
            "tool_result",
            "tool_call",
            "tool_result",
            "budget_exceeded",
            "done:budget_exceeded"
        ]
    );
    let usage = &first.last().unwrap()["usage"];
    assert!((usage["cost"].as_f64().unwrap() - 0.08).abs() < 1e-9, "{usage}");
    let a = pending_budget(&s, &id).await;
    assert_eq!(
        a["arguments"],
        json!({"budget": "session_cost", "spent": 0.08, "limit": 0.08, "proposed_limit": 0.16})
    );
    let used: Value = s.get_json(&format!("/sessions/{id}/usage")).await;
    assert_eq!(
        (
            (used["cost"].as_f64().unwrap() * 100.0).round() as i64,
            &used["cached_prompt_tokens"],
            &used["cost_unavailable"]
        ),
        (8, &json!(8000), &Value::Null),
        "{used}"
    );
    // A raise of a session budget is the session's: it stays after the turn.
    let second = decide(&s, &id, json!({"call_id": a["call_id"], "decision": "approve"})).await;
    assert_eq!(
        kinds(&second),
        ["approval_resolved", "assistant_final", "done:completed"]
    );
    let used: Value = s.get_json(&format!("/sessions/{id}/usage")).await;
    assert_eq!(
        (
            (used["cost"].as_f64().unwrap() * 100.0).round() as i64,
            &used["budget"],
            (used["remaining"]["session_cost"].as_f64().unwrap() * 100.0).round() as i64
        ),
        (12, &json!({"session_cost": 0.16}), 4),
        "{used}"
    );
    // Prometheus: the cost spent here, the budget reached and raised.
    let metrics = s.get("/metrics").send().await.unwrap().text().await.unwrap();
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("llm_cost_total ") || l.starts_with("agent_budget_events_total{"))
        .collect();
    assert_eq!(
        lines,
        [
            r#"agent_budget_events_total{event="exceeded",budget="session_cost"} 1"#,
            r#"agent_budget_events_total{event="raised",budget="session_cost"} 1"#,
            "llm_cost_total 0.12",
        ],
        "{metrics}"
    );
    drop(prices);
}

#[tokio::test(flavor = "multi_thread")]
async fn cost_is_counted_to_the_cent_on_sqlite() {
    cost_is_counted_to_the_cent_and_a_session_cost_budget_trips_at_its_limit(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn cost_is_counted_to_the_cent_on_postgres() {
    cost_is_counted_to_the_cent_and_a_session_cost_budget_trips_at_its_limit(Db::Postgres).await;
}

async fn a_turn_paused_on_a_budget_survives_a_restart_and_resumes_when_approved(db: Db) {
    let store = store(db).await;
    let llm = MockLlmServer::start().await.unwrap();
    let (mut s, id) = setup(&store, &llm, &[], json!({"turn_tool_calls": 1})).await;
    for r in [read("a.txt"), read("b.txt"), answer("Both read.")] {
        llm.push(r);
    }
    let first = s
        .send(&id, json!({"type": "user_message", "content": "Read a and b"}))
        .await;
    assert_eq!(
        kinds(&first),
        [
            "tool_call",
            "tool_result",
            "budget_exceeded",
            "done:budget_exceeded"
        ]
    );
    let before = pending_budget(&s, &id).await;
    assert!(s.terminate(), "the server stops cleanly: {}", s.logs());
    // The project stays: the next server's temp dir is another.
    let project = s.dir.path().join("project");
    let s2 = Server::start_with(
        &llm.url(),
        Some(&store.url),
        &[("AGENT_RUNTIME__DEFAULT_AGENT", "coder")],
    )
    .await;
    assert_eq!(pending_budget(&s2, &id).await, before);
    let session: Value = s2.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(session["status"], "awaiting_approval");
    let second = decide(
        &s2,
        &id,
        json!({"call_id": before["call_id"], "decision": "approve"}),
    )
    .await;
    assert_eq!(
        kinds(&second),
        [
            "approval_resolved",
            "tool_call",
            "tool_result",
            "assistant_final",
            "done:completed"
        ]
    );
    let result = find(&second, "tool_result");
    assert!(result["result"].to_string().contains("b.txt"), "{result}");
    assert_eq!(done_usage(&second)["spent"]["turn_tool_calls"], json!(2));
    drop(project);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_pause_survives_a_restart_on_sqlite() {
    a_turn_paused_on_a_budget_survives_a_restart_and_resumes_when_approved(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_budget_pause_survives_a_restart_on_postgres() {
    a_turn_paused_on_a_budget_survives_a_restart_and_resumes_when_approved(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_budgets_are_refused_with_their_key_and_change_nothing() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(&llm.url(), None, &[("TURN_TOOL_CALL_BUDGET", "5")]).await;
    // The settings' defaults, overlaid by the body; `null` lifts one.
    let r = s
        .post(
            "/sessions",
            json!({"budget": {"turn_tool_calls": null, "turn_tokens": 0}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let session: Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(session["budget"], json!({"turn_tokens": 0}));
    let plain = s.session(json!({})).await;
    let session: Value = s.get_json(&format!("/sessions/{plain}")).await;
    assert_eq!(session["budget"], json!({"turn_tool_calls": 5}));

    let (status, body) = error_of(
        s.post("/sessions", json!({"budget": {"turn_tool_calls": -1}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, &body["error"]["code"]), (400, &json!("INVALID_REQUEST")));
    for (patch, says) in [
        (
            json!({"budget": {"session_cost": "lots"}}),
            "budget.session_cost must be",
        ),
        (json!({"budget": {"turns": 3}}), "budget.turns is not a budget"),
        (json!({"budget": [1]}), "budget must be a JSON object"),
        (json!({}), "nothing to change"),
    ] {
        let r = s
            .client
            .patch(s.url(&format!("/sessions/{plain}")))
            .header("x-internal-auth", TOKEN)
            .json(&patch)
            .send()
            .await
            .unwrap();
        let (status, body) = error_of(r).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("INVALID_REQUEST")),
            "{patch}: {body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{patch}: {body}"
        );
    }
    let session: Value = s.get_json(&format!("/sessions/{plain}")).await;
    assert_eq!(session["budget"], json!({"turn_tool_calls": 5}));
    let r = s
        .client
        .patch(s.url("/sessions/nope"))
        .header("x-internal-auth", TOKEN)
        .json(&json!({"budget": {"turn_tokens": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_missing_from_the_price_table_counts_tokens_and_says_why_cost_is_null() {
    let llm = MockLlmServer::start().await.unwrap();
    let prices = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(prices.path(), r#"{"other-model": {"input": 1, "output": 2}}"#).unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[
            ("MODEL_PRICES_FILE", prices.path().to_str().unwrap()),
            ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
        ],
    )
    .await;
    let id = s.session(json!({})).await;
    llm.push(answer("Hi."));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "hello"}))
        .await;
    // No budgets, no price: done.usage is as it always was.
    assert_eq!(
        events.last().unwrap()["usage"],
        json!({"prompt_tokens": 20000, "completion_tokens": 400})
    );
    let used: Value = s.get_json(&format!("/sessions/{id}/usage")).await;
    assert_eq!(
        (&used["total_tokens"], &used["cost"], &used["cost_unavailable"]),
        (
            &json!(20400),
            &Value::Null,
            &json!(
                "MODEL_PRICES_FILE has no price for the model 'gpt-4o-mini': tokens are counted, cost is not"
            )
        )
    );
}
