//! Turns survive their process (issue 15): the real server binary is SIGKILLed mid-answer or
//! mid-command and restarted, or SIGTERMed while another replica lives, and the turn goes on
//! where it stopped — `turn_resumed`, then the rest — with every event a client assembled across
//! its reconnections equal to what is stored. On SQLite and on Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use std::time::{Duration, Instant};

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use fault_support::*;
use serde_json::{Value, json};

const ENV: &[(&str, &str)] = &[
    ("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false"),
    ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
    // execute_command runs without approval.
    ("HITL_DANGEROUS_TOOLS", "delete_file"),
    ("DRAIN_TIMEOUT_SECS", "8"),
];

/// An answer that streams for about 20 s unless its turn is stopped.
fn endless_answer() -> MockResponse {
    let text: String = (0..2000).map(|w| format!("w{w} ")).collect();
    MockResponse::script(&Script::text(text.trim_end()))
        .split_every(4)
        .drip(Duration::from_millis(10))
}

/// A short answer streamed in a few pieces.
fn short_answer(text: &str) -> MockResponse {
    MockResponse::script(&Script::text(text)).split_every(6)
}

async fn start_stream(s: &Server, id: &str, content: &str) -> EventStream {
    let r = s
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": content}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", s.logs());
    EventStream::cut_tolerant(r)
}

/// Follows the session on `s` from after `last` (the `Last-Event-ID` a client sends when it
/// reconnects) until the turn's `done`.
async fn reconnect(s: &Server, id: &str, last: u64) -> Vec<Value> {
    let r = s
        .get(&format!("/sessions/{id}/events"))
        .header("last-event-id", last.to_string())
        .send()
        .await
        .unwrap();
    let mut rec = EventStream::cut_tolerant(r);
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = rec.next().await {
            if e["type"] == "done" {
                return;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "no done within 30 s after reconnecting: {:?}\n{}",
        rec.events,
        s.logs()
    );
    rec.events
}

fn last_seq(events: &[Value]) -> u64 {
    events.last().map_or(0, |e| e["seq"].as_u64().unwrap())
}

/// The `turn_resumed` events among `events`.
fn resumptions(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] == "turn_resumed")
        .cloned()
        .collect()
}

/// `turn_resumed` as stored: the seq after which streamed tokens are void, the reason.
fn resumed_at(seq: u64, after_seq: u64, reason: &str) -> Value {
    json!({"type": "turn_resumed", "after_seq": after_seq, "reason": reason, "seq": seq, "is_final": false})
}

/// The text a client assembles from tokens, honouring `turn_resumed` (tokens after its
/// `after_seq` and before it are dropped).
fn assembled_text(events: &[Value]) -> String {
    let mut tokens: Vec<(u64, String)> = Vec::new();
    for e in events {
        if e["type"] == "turn_resumed" {
            let after = e["after_seq"].as_u64().unwrap();
            tokens.retain(|(seq, _)| *seq <= after);
        } else if e["type"] == "assistant_message" && e["is_final"] == false {
            tokens.push((e["seq"].as_u64().unwrap(), e["token"].as_str().unwrap().into()));
        }
    }
    tokens.into_iter().map(|(_, t)| t).collect()
}

/// The stored events of the session equal, whole, what the client assembled from its streams.
async fn assert_client_saw_the_store(s: &Server, id: &str, received: &[Value], ctx: &str) {
    let stored = stored(s, id).await;
    assert_received_are_stored(received, &stored.events, ctx);
    assert_eq!(
        received,
        stored.events.as_slice(),
        "{ctx}: what the client assembled"
    );
    assert_history_valid(&stored.messages, ctx);
}

/// SIGKILL mid-answer, restart on the same database: the restarted process resumes the turn at
/// once; the client, reconnecting with `Last-Event-ID`, sees `turn_resumed` then the rest.
async fn a_turn_killed_mid_answer_resumes_after_the_restart(db: &str) {
    let dir = tempfile::tempdir().unwrap();
    let llm = MockLlmServer::start().await.unwrap();
    let first = Server::start_with(&llm.url(), Some(db), ENV).await;
    let id = first.session(json!({})).await;
    llm.push(endless_answer());
    let mut rec = start_stream(&first, &id, "tell me").await;
    for _ in 0..5 {
        rec.next().await.expect("tokens before the kill");
    }
    drop(first); // SIGKILL
    let mut received = rec.events;

    let after = MockLlmServer::start().await.unwrap();
    after.push(short_answer("the whole answer"));
    let restarted = Instant::now();
    let second = Server::start_in(dir, &after.url(), db, ENV).await;
    let rest = reconnect(&second, &id, last_seq(&received)).await;
    let took = restarted.elapsed();
    received.extend(rest.clone());

    let resumed = resumptions(&received);
    assert_eq!(resumed.len(), 1, "{received:#?}");
    assert_eq!(
        resumed[0],
        resumed_at(resumed[0]["seq"].as_u64().unwrap(), 0, "owner_stopped"),
        "every token before it is void: the user message has no event"
    );
    assert_eq!(
        kinds(&rest),
        ["turn_resumed", "assistant_final", "done:completed"]
    );
    assert_eq!(assembled_text(&received), "the whole answer");
    assert_client_saw_the_store(&second, &id, &received, "resumed").await;
    assert_eq!(after.request_count(), 1, "the model was asked again once");

    // The session takes the next message at once.
    after.push(short_answer("fine"));
    let next = second
        .send(&id, json!({"type": "user_message", "content": "and now?"}))
        .await;
    assert_eq!(kinds(&next), ["assistant_final", "done:completed"]);
    eprintln!("restart to the resumed turn's done: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_a_turn_killed_mid_answer_resumes_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("rt.db").display());
    a_turn_killed_mid_answer_resumes_after_the_restart(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_a_turn_killed_mid_answer_resumes_after_the_restart() {
    let (_guard, url) = postgres_url().await;
    a_turn_killed_mid_answer_resumes_after_the_restart(&url).await;
}

/// The router choosing `agent`.
fn route(agent: &str) -> MockResponse {
    MockResponse::script(&Script::tool_call(
        "route",
        json!({"agent": agent, "reason": "design work"}),
    ))
}

/// The forced function of each chat request `llm` got (`None`: a free answer).
fn forced(llm: &MockLlmServer) -> Vec<Option<String>> {
    (llm.requests().iter())
        .map(|r| r["tool_choice"]["function"]["name"].as_str().map(String::from))
        .collect()
}

/// SIGKILL while the orchestrator routes the message (stored, not yet routed), restart: the
/// resumed turn asks the router again and the routed agent answers, as the cut turn would have;
/// not the orchestrator itself, with the message unrouted.
async fn a_turn_killed_while_routing_is_routed_after_the_restart(db: &str) {
    let dir = tempfile::tempdir().unwrap();
    let env: &[(&str, &str)] = &[("AGENT_RUNTIME__PLANS_ENABLED", "false")];
    let llm = MockLlmServer::start().await.unwrap();
    // About five minutes to stream: the process dies first.
    llm.push(route("architect").split_every(1).drip(Duration::from_millis(500)));
    let first = Server::start_with(&llm.url(), Some(db), env).await;
    let id = first.session(json!({})).await;
    let mut rec = start_stream(&first, &id, "design a cache").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while forced(&llm).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the router was never asked: {}",
            first.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(first); // SIGKILL
    while rec.next().await.is_some() {}
    assert_eq!(
        rec.events,
        Vec::<Value>::new(),
        "nothing streamed before the kill"
    );

    let after = MockLlmServer::start().await.unwrap();
    after.push(route("architect"));
    after.push(short_answer("designed"));
    let second = Server::start_in(dir, &after.url(), db, env).await;
    let rest = reconnect(&second, &id, 0).await;
    assert_eq!(
        kinds(&rest),
        [
            "turn_resumed",
            "agent_switched",
            "assistant_final",
            "done:completed"
        ]
    );
    assert_eq!(rest[0], resumed_at(1, 0, "owner_stopped"));
    let switched = find(&rest, "agent_switched");
    assert_eq!(
        (&switched["from_agent"], &switched["to_agent"]),
        (&json!("orchestrator"), &json!("architect"))
    );
    assert_eq!(assembled_text(&rest), "designed");
    let last = rest.iter().rfind(|e| e["type"] == "assistant_message").unwrap();
    assert_eq!(
        (&last["is_final"], &last["content"]),
        (&json!(true), &json!("designed"))
    );
    assert_eq!(forced(&llm), [Some("route".to_string())]);
    assert_eq!(
        forced(&after),
        [Some("route".to_string()), None],
        "the router was asked again, then the routed agent"
    );
    assert_eq!(
        after.requests()[0]["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["content"],
        "design a cache"
    );
    assert_client_saw_the_store(&second, &id, &rest, "routed after the restart").await;
    let session = second.get(&format!("/sessions/{id}")).send().await.unwrap();
    let session: Value = session.json().await.unwrap();
    assert_eq!(
        (&session["status"], &session["current_agent"]),
        (&json!("idle"), &json!("architect"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_a_turn_killed_while_routing_is_routed_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("rt.db").display());
    a_turn_killed_while_routing_is_routed_after_the_restart(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_a_turn_killed_while_routing_is_routed_after_the_restart() {
    let (_guard, url) = postgres_url().await;
    a_turn_killed_while_routing_is_routed_after_the_restart(&url).await;
}

/// SIGKILL while `execute_command` runs `sleep 2; echo x >> f.txt`: after the restart the command
/// is not run again (the file has at most the one line the orphaned shell may still write), its
/// result is the "interrupted" error, and the model decides what next.
async fn a_command_killed_mid_run_is_never_run_again(db: &str) {
    let dir = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    let llm = MockLlmServer::start().await.unwrap();
    let first = Server::start_with(&llm.url(), Some(db), ENV).await;
    let id = first
        .session(json!({"metadata": {"project_path": project.path().to_str().unwrap()}}))
        .await;
    llm.push(MockResponse::script(&Script::tool_call(
        "execute_command",
        json!({"command": "sleep 2; echo x >> f.txt"}),
    )));
    let mut rec = start_stream(&first, &id, "run it").await;
    let call = rec.until("tool_call").await.expect("tool_call streamed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first); // SIGKILL, the command still sleeping
    let mut received = rec.events;

    let after = MockLlmServer::start().await.unwrap();
    after.push(short_answer("it was interrupted"));
    let second = Server::start_in(dir, &after.url(), db, ENV).await;
    let rest = reconnect(&second, &id, last_seq(&received)).await;
    received.extend(rest.clone());
    assert_eq!(
        kinds(&rest),
        ["turn_resumed", "tool_result", "assistant_final", "done:completed"]
    );
    assert_eq!(
        find(&rest, "tool_result"),
        &json!({"type": "tool_result", "call_id": call["call_id"], "tool_name": "execute_command",
            "error": {"code": "TOOL_EXECUTION_FAILED", "message": "interrupted: the process running it stopped"},
            "seq": rest[0]["seq"].as_u64().unwrap() + 1, "is_final": false})
    );
    assert_eq!(rest[0]["reason"], "owner_stopped");
    assert_client_saw_the_store(&second, &id, &received, "command").await;
    // Long enough for an orphaned shell to finish: one line at most, never two.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines = std::fs::read_to_string(project.path().join("f.txt"))
        .unwrap_or_default()
        .lines()
        .count();
    assert!(lines <= 1, "the command ran {lines} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_a_command_killed_mid_run_is_never_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("rt.db").display());
    a_command_killed_mid_run_is_never_run_again(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_a_command_killed_mid_run_is_never_run_again() {
    let (_guard, url) = postgres_url().await;
    a_command_killed_mid_run_is_never_run_again(&url).await;
}

/// SIGTERM on replica A mid-answer while B lives: A exits within `DRAIN_TIMEOUT_SECS`, its
/// stream ends without `done`, B resumes the turn (`handed_over`), and the client reconnecting to
/// B with `Last-Event-ID` gets every event: no gap, no duplicate.
async fn a_sigterm_hands_the_turn_over_to_the_live_replica(db: &str) {
    let (la, lb) = (
        MockLlmServer::start().await.unwrap(),
        MockLlmServer::start().await.unwrap(),
    );
    let mut a = Server::start_with(&la.url(), Some(db), ENV).await;
    let b = Server::start_with(&lb.url(), Some(db), ENV).await;
    let id = b.session(json!({})).await;
    la.push(endless_answer());
    lb.push(short_answer("finished on b"));
    let mut rec = start_stream(&a, &id, "long one").await;
    for _ in 0..5 {
        rec.next().await.expect("tokens before the SIGTERM");
    }
    let reader = tokio::spawn(async move {
        while rec.next().await.is_some() {}
        rec.events
    });
    let signalled = Instant::now();
    assert!(a.terminate(), "A exits cleanly\n{}", a.logs());
    let exited = signalled.elapsed();
    assert!(
        exited < Duration::from_secs(8),
        "A exited {exited:?} after SIGTERM (DRAIN_TIMEOUT_SECS=8)"
    );
    let mut received = reader.await.unwrap();
    assert!(
        received
            .iter()
            .all(|e| e["type"] == "assistant_message" && e["is_final"] == false),
        "A's stream ends without done: {received:?}"
    );
    let rest = reconnect(&b, &id, last_seq(&received)).await;
    received.extend(rest.clone());
    let resumed = resumptions(&received);
    assert_eq!(
        resumed,
        [resumed_at(resumed[0]["seq"].as_u64().unwrap(), 0, "handed_over")],
        "{}",
        b.logs()
    );
    assert_eq!(assembled_text(&received), "finished on b");
    assert_client_saw_the_store(&b, &id, &received, "handed over").await;
    assert_eq!(lb.request_count(), 1);
    eprintln!("A exited {exited:?} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_a_sigterm_hands_the_turn_over_to_the_live_process() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("rt.db").display());
    a_sigterm_hands_the_turn_over_to_the_live_replica(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_a_sigterm_hands_the_turn_over_to_the_live_replica() {
    let (_guard, url) = postgres_url().await;
    a_sigterm_hands_the_turn_over_to_the_live_replica(&url).await;
}

/// SIGTERM while a command runs: the draining process refuses new messages with 503
/// `SHUTTING_DOWN`, lets the command finish (its result is stored, once), and hands the turn
/// over; the process restarted on the same file resumes it with the model's next step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_process_lets_a_running_command_finish_and_refuses_new_messages() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("rt.db").display());
    let project = tempfile::tempdir().unwrap();
    let metadata = json!({"metadata": {"project_path": project.path().to_str().unwrap()}});
    let llm = MockLlmServer::start().await.unwrap();
    let mut a = Server::start_with(&llm.url(), Some(&db), ENV).await;
    let (id, other) = (a.session(metadata.clone()).await, a.session(metadata).await);
    llm.push(MockResponse::script(&Script::tool_call(
        "execute_command",
        json!({"command": "sleep 2; echo x >> f.txt"}),
    )));
    let mut rec = start_stream(&a, &id, "run it").await;
    rec.until("tool_call").await.expect("tool_call streamed");
    // A connection of its own, open before the signal: the draining server still answers on it.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let warm = client
        .get(a.url("/health"))
        .header("x-internal-auth", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    warm.text().await.unwrap(); // read to its end: the connection goes back to the pool
    let pid = a.process.child.id().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = client
        .post(a.url("/agent/message/stream"))
        .header("x-internal-auth", TOKEN)
        .json(&json!({"session_id": other, "message": {"type": "user_message", "content": "hi"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(refused).await,
        (
            503,
            json!({"error": {"code": "SHUTTING_DOWN", "message": "this server is shutting down and takes no new turns: send the request to another replica, or retry once it is back (its running turns are handed over, not lost)"}})
        )
    );
    let mut received = rec.rest_within(Duration::from_secs(10)).await;
    assert_eq!(
        kinds(&received),
        ["tool_call", "tool_result"],
        "the command finished before the hand-over; no done"
    );
    assert!(a.process.child.wait().unwrap().success(), "{}", a.logs());

    let after = MockLlmServer::start().await.unwrap();
    after.push(short_answer("done after the restart"));
    let b = Server::start_with(&after.url(), Some(&db), ENV).await;
    let rest = reconnect(&b, &id, last_seq(&received)).await;
    received.extend(rest.clone());
    assert_eq!(
        kinds(&rest),
        ["turn_resumed", "assistant_final", "done:completed"]
    );
    assert_eq!(rest[0]["reason"], "handed_over");
    assert_eq!(
        std::fs::read_to_string(project.path().join("f.txt")).unwrap(),
        "x\n",
        "the command ran once"
    );
    assert_client_saw_the_store(&b, &id, &received, "drained").await;
}
