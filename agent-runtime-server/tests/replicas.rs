//! Several server processes on one database: when one is SIGKILLed mid-turn, a live one notices at
//! once (no lease expiry wait), resumes the turn and the session takes new messages there; a cancel or delete sent
//! to one process stops the turn running on another at once; on Postgres and SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use std::time::{Duration, Instant};

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use fault_support::*;
use serde_json::{Value, json};

/// The default 30 s lease: recovery must not wait for it.
const ENV: &[(&str, &str)] = &[("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false")];

/// Kills the replica running a turn and checks the other one takes the session over; returns how
/// long that took.
async fn a_replica_takes_over_from_a_killed_one(database_url: &str) -> Duration {
    let (doomed, survivor, [_la, lb], id, _rec) = a_turn_running_on_one_of_two_replicas(database_url).await;
    let busy = survivor
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "too early"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(busy).await,
        (409, err_busy(&id)),
        "the live turn holds the session"
    );

    // /health tells the replicas apart and counts the turns each runs.
    let (d, s) = (
        doomed.get_json("/health").await,
        survivor.get_json("/health").await,
    );
    assert_eq!(
        (&d["process"]["turns"], &s["process"]["turns"]),
        (&json!(1), &json!(0))
    );
    assert_ne!(d["process"]["id"], s["process"]["id"]);

    lb.push(MockResponse::script(&Script::text("resumed here")));
    drop(doomed); // SIGKILL
    let killed = Instant::now();
    let mut status = Value::Null;
    while killed.elapsed() < Duration::from_secs(10) {
        status = survivor.get_json(&format!("/sessions/{id}")).await["status"].clone();
        if status != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = killed.elapsed();
    assert_eq!(
        status,
        "idle",
        "resumed and completed well before the 30 s lease expires\n{}",
        survivor.logs()
    );
    assert_eq!(lb.request_count(), 1, "the survivor asked the model again, once");

    lb.push(MockResponse::script(&Script::text("back again")));
    let events = survivor
        .send(&id, json!({"type": "user_message", "content": "still there?"}))
        .await;
    assert_eq!(kinds(&events), ["assistant_final", "done:completed"]);

    let stored = stored(&survivor, &id).await;
    assert_eq!(user_texts(&stored.messages), ["long one", "still there?"]);
    assert_eq!(
        kinds(&stored.events),
        [
            "turn_resumed",
            "assistant_final",
            "done:completed",
            "assistant_final",
            "done:completed"
        ],
        "the killed turn is resumed and completed on the survivor, then the new one runs"
    );
    assert_eq!(
        stored
            .events
            .iter()
            .find(|e| e["type"] == "turn_resumed")
            .unwrap()["reason"],
        "owner_stopped"
    );
    took
}

fn err_busy(id: &str) -> Value {
    json!({"error": {"code": "SESSION_BUSY", "message": format!("session '{id}' is busy: a turn is already running")}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_a_live_replica_resumes_a_killed_ones_turn_at_once() {
    let (_guard, url) = postgres_url().await;
    let took = a_replica_takes_over_from_a_killed_one(&url).await;
    eprintln!("postgres: resumed and completed {took:?} after the SIGKILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_a_live_process_resumes_a_killed_ones_turn_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let took = a_replica_takes_over_from_a_killed_one(&url).await;
    eprintln!("sqlite: resumed and completed {took:?} after the SIGKILL");
}

/// Events of `rec` with the instant each arrived, by seq.
async fn timed(mut rec: EventStream) -> Vec<(u64, Instant)> {
    let mut out = Vec::new();
    while let Some(e) = rec.next().await {
        out.push((e["seq"].as_u64().unwrap(), Instant::now()));
    }
    out
}

/// 64 sessions whose turns run on one replica, each followed on another: every follower gets
/// exactly the stored events, live. Prints how long after the turn's own stream each event reached
/// the other replica's follower (Postgres wakes followers with LISTEN/NOTIFY; without it they
/// would poll every 0.5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_followers_on_another_replica_see_each_event_as_it_happens() {
    const SESSIONS: usize = 64;
    let (_guard, url) = postgres_url().await;
    let (la, lb) = (
        MockLlmServer::start().await.unwrap(),
        MockLlmServer::start().await.unwrap(),
    );
    let runner = std::sync::Arc::new(Server::start_with(&la.url(), Some(&url), ENV).await);
    let follower = std::sync::Arc::new(Server::start_with(&lb.url(), Some(&url), ENV).await);
    let mut tasks = Vec::new();
    for n in 0..SESSIONS {
        let (runner, follower) = (runner.clone(), follower.clone());
        let id = runner.session(json!({})).await;
        let text: String = (0..30).map(|w| format!("s{n}w{w} ")).collect();
        la.push(
            MockResponse::script(&Script::text(text.trim_end()))
                .split_every(6)
                .drip(Duration::from_millis(25)),
        );
        tasks.push(tokio::spawn(async move {
            let r = runner
                .post(
                    "/agent/message/stream",
                    json!({"session_id": id, "message": {"type": "user_message", "content": "go"}}),
                )
                .send()
                .await
                .unwrap();
            let mut own = EventStream::cut_tolerant(r);
            let first = own.next().await.expect("a first event");
            let followed = EventStream::cut_tolerant(
                follower
                    .get(&format!("/sessions/{id}/events?after=0"))
                    .send()
                    .await
                    .unwrap(),
            );
            let (own_times, followed_times) = tokio::join!(
                async {
                    let mut t = vec![(first["seq"].as_u64().unwrap(), Instant::now())];
                    t.extend(timed(own).await);
                    t
                },
                timed(followed)
            );
            let stored = stored(&follower, &id).await;
            let seqs: Vec<u64> = stored.events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
            assert_eq!(
                own_times.iter().map(|t| t.0).collect::<Vec<_>>(),
                seqs,
                "{id}: own stream"
            );
            assert_eq!(
                followed_times.iter().map(|t| t.0).collect::<Vec<_>>(),
                seqs,
                "{id}: follower"
            );
            // Delays of the events committed once the follower was surely live (after a few).
            own_times
                .iter()
                .zip(&followed_times)
                .skip(4)
                .map(|(o, f)| f.1.saturating_duration_since(o.1))
                .collect::<Vec<_>>()
        }));
    }
    let mut delays: Vec<Duration> = Vec::new();
    for t in tasks {
        delays.extend(t.await.unwrap());
    }
    delays.sort();
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q) as usize];
    eprintln!(
        "cross-replica follow delay over {} events of {SESSIONS} sessions: p50 {:?}, p99 {:?}, max {:?}",
        delays.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// An answer that streams for about 20 s unless its turn is stopped.
fn endless_answer() -> MockResponse {
    let text: String = (0..4000).map(|w| format!("w{w} ")).collect();
    MockResponse::script(&Script::text(text.trim_end()))
        .split_every(4)
        .drip(Duration::from_millis(20))
}

/// Two processes on `database_url`; a turn streaming on the first (`owner`), already a few
/// events in; the second (`other`) shares the session. The model servers live as long as the
/// returned pair.
async fn a_turn_running_on_one_of_two_replicas(
    database_url: &str,
) -> (Server, Server, [MockLlmServer; 2], String, EventStream) {
    let (la, lb) = (
        MockLlmServer::start().await.unwrap(),
        MockLlmServer::start().await.unwrap(),
    );
    let owner = Server::start_with(&la.url(), Some(database_url), ENV).await;
    let other = Server::start_with(&lb.url(), Some(database_url), ENV).await;
    let id = other.session(json!({})).await;
    la.push(endless_answer());
    let r = owner
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "long one"}}),
        )
        .send()
        .await
        .unwrap();
    let mut rec = EventStream::cut_tolerant(r);
    for _ in 0..3 {
        rec.next().await.expect("tokens before the cancel");
    }
    (owner, other, [la, lb], id, rec)
}

/// Reads `rec` to its end (bounded) on a task; returns its events and when the last arrived.
fn read_to_end(mut rec: EventStream) -> tokio::task::JoinHandle<(Vec<Value>, Instant)> {
    tokio::spawn(async move {
        let ended = tokio::time::timeout(Duration::from_secs(15), async {
            let mut last = Instant::now();
            while rec.next().await.is_some() {
                last = Instant::now();
            }
            last
        })
        .await
        .expect("the turn's stream ends within 15 s");
        (rec.events, ended)
    })
}

/// A cancel sent to the process that does not run the turn stops it on the one that does: the
/// owner's stream ends with `done: cancelled` soon after, the cancel answers `cancelled` once that
/// end is stored, and the session takes a new message on either process. Returns how long after
/// the cancel was sent the owner's stream got its `done`.
async fn a_cancel_on_another_replica_stops_the_turn(database_url: &str) -> Duration {
    let (owner, other, [_la, lb], id, rec) = a_turn_running_on_one_of_two_replicas(database_url).await;
    let reader = read_to_end(rec);
    let asked = Instant::now();
    let answer: Value = other
        .post(&format!("/sessions/{id}/cancel"), json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"status": "cancelled"}), "{}", owner.logs());
    let stored_at_answer = stored(&other, &id).await;
    let (events, done_at) = reader.await.unwrap();
    let delay = done_at.saturating_duration_since(asked);

    assert_eq!(kinds(&events), ["done:cancelled"], "the turn ends cancelled");
    assert_eq!(
        stored_at_answer.events, events,
        "the cancel answered once the owner had stored the turn's end, as its stream showed it"
    );
    assert!(
        delay < Duration::from_secs(1),
        "the owner stopped the turn {delay:?} after the cancel (target: 100 ms)\n{}",
        owner.logs()
    );
    for s in [&owner, &other] {
        assert_eq!(s.get_json(&format!("/sessions/{id}")).await["status"], "idle");
    }
    lb.push(MockResponse::script(&Script::text("back again")));
    let next = other
        .send(&id, json!({"type": "user_message", "content": "still there?"}))
        .await;
    assert_eq!(kinds(&next), ["assistant_final", "done:completed"]);
    delay
}

/// A delete sent to the process that does not run the turn stops it on the one that does (its
/// stream ends with `done: cancelled`) before the session goes; then it is gone for both.
async fn a_delete_on_another_replica_stops_the_turn_and_removes_the_session(database_url: &str) -> Duration {
    let (owner, other, _llms, id, rec) = a_turn_running_on_one_of_two_replicas(database_url).await;
    let reader = read_to_end(rec);
    let asked = Instant::now();
    let answer: Value = other
        .delete(&format!("/sessions/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"status": "deleted"}), "{}", owner.logs());
    let (events, done_at) = reader.await.unwrap();
    assert_eq!(kinds(&events), ["done:cancelled"], "the turn ends cancelled");
    for s in [&owner, &other] {
        let (status, body) = error_of(s.get(&format!("/sessions/{id}")).send().await.unwrap()).await;
        assert_eq!(
            (status, body),
            (
                404,
                json!({"error": {"code": "SESSION_NOT_FOUND", "message": format!("session '{id}' not found")}})
            )
        );
    }
    done_at.saturating_duration_since(asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_a_cancel_sent_to_another_replica_stops_the_turn_at_once() {
    let (_guard, url) = postgres_url().await;
    let took = a_cancel_on_another_replica_stops_the_turn(&url).await;
    eprintln!("postgres: the owner's stream ended {took:?} after a cancel sent to another replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_a_cancel_sent_to_another_process_stops_the_turn_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let took = a_cancel_on_another_replica_stops_the_turn(&url).await;
    eprintln!("sqlite: the owner's stream ended {took:?} after a cancel sent to another process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn on_postgres_a_delete_sent_to_another_replica_stops_the_turn_and_removes_the_session() {
    let (_guard, url) = postgres_url().await;
    let took = a_delete_on_another_replica_stops_the_turn_and_removes_the_session(&url).await;
    eprintln!("postgres: the owner's stream ended {took:?} after a delete sent to another replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_a_delete_sent_to_another_process_stops_the_turn_and_removes_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let took = a_delete_on_another_replica_stops_the_turn_and_removes_the_session(&url).await;
    eprintln!("sqlite: the owner's stream ended {took:?} after a delete sent to another process");
}

/// Sends `signal` (`STOP`, `CONT`) to the server's process.
fn signal(s: &Server, signal: &str) {
    let pid = s.process.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The cancel request is durable: a cancel for a turn whose process is frozen (alive, but not
/// running) answers `SESSION_BUSY` after its 10 s wait, and once the process runs again it finds
/// the request and ends the turn cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_a_frozen_owner_cancels_its_turn_once_it_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let (owner, other, _llms, id, rec) = a_turn_running_on_one_of_two_replicas(&url).await;
    signal(&owner, "STOP");
    let asked = Instant::now();
    let r = other
        .post(&format!("/sessions/{id}/cancel"), json!({}))
        .send()
        .await
        .unwrap();
    let waited = asked.elapsed();
    assert_eq!(error_of(r).await, (409, err_busy(&id)));
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(15)).contains(&waited),
        "the cancel waited {waited:?} for the frozen owner"
    );
    signal(&owner, "CONT");
    let reader = read_to_end(rec);
    let (events, _) = reader.await.unwrap();
    assert_eq!(
        kinds(&events),
        ["done:cancelled"],
        "the request outlived the wait\n{}",
        owner.logs()
    );
    assert_eq!(other.get_json(&format!("/sessions/{id}")).await["status"], "idle");
}
