//! Crash safety (API.md §5.3, §5.4): the real server binary is SIGKILLed at seeded random points of
//! a turn (mid-stream, mid-tool, awaiting approval, mid-decision), restarted on the same database,
//! and checked: every event a client received is stored under the same seq, no user message is lost
//! or doubled, every tool call has exactly one result, pending approvals are listed and decidable,
//! and the session takes a new message. SQLite and Postgres, `KILLS` kills each, with
//! `TURN_RECOVERY=interrupt` (the interrupted turn ends with an error; resuming: takeover.rs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use fault_support::*;
use serde_json::{Value, json};

/// Kills per run (per storage backend). Each kill interrupts `SESSIONS_PER_KILL` sessions at
/// different points.
const KILLS: usize = 50;
const SESSIONS_PER_KILL: usize = 2;

const ENV: &[(&str, &str)] = &[
    ("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false"),
    ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
    // execute_command runs without approval (the "mid-tool" point); write_file needs one.
    ("HITL_DANGEROUS_TOOLS", "write_file,delete_file"),
    // The default 30 s lease: a restarted process must not wait for a dead one's leases to lapse.
    // The earlier outcome, which these checks expect: an interrupted turn is ended, not resumed
    // (resuming is proven in takeover.rs).
    ("TURN_RECOVERY", "interrupt"),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Point {
    MidStream,
    MidTool,
    AwaitingApproval,
    MidDecision,
}

/// What the client knows about one session.
struct Tracked {
    id: String,
    point: Point,
    /// Every event received on any stream of this session, in order.
    received: Vec<Value>,
    /// The user messages acknowledged (HTTP 200) so far.
    sent: Vec<String>,
    /// The complete assistant texts received.
    answers: Vec<String>,
}

fn slow_text(tag: &str, words: usize) -> MockResponse {
    let text: String = (0..words).map(|w| format!("{tag}-w{w} ")).collect();
    MockResponse::script(&Script::text(text.trim_end()))
        .split_every(24)
        .drip(Duration::from_millis(8))
}

/// The first message of a fresh session: never `SESSION_BUSY`. (It once was, under heavy load: the
/// 1 s lease had expired before the turn's first commit, which the fence then refused; an owner now
/// keeps an expired lease until someone else takes it.)
async fn open_stream(s: &Server, id: &str, content: &str) -> EventStream {
    let r = s
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": content}}),
        )
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{content}: {:?}\n{}", r.text().await, s.logs());
    EventStream::cut_tolerant(r)
}

fn note(t: &mut Tracked, events: Vec<Value>) {
    for e in &events {
        if e["type"] == "assistant_message" && e["is_final"] == true {
            t.answers.push(e["content"].as_str().unwrap().to_string());
        }
    }
    t.received.extend(events);
}

/// Drives one session to its kill point; returns once the server may be killed. Some points hand
/// back a stream still being read (by a task), finished after the kill.
async fn drive(
    s: &Server,
    llm: &MockLlmServer,
    rng: &mut fastrand::Rng,
    t: &mut Tracked,
    tag: &str,
) -> Option<tokio::task::JoinHandle<Vec<Value>>> {
    let content = format!("{tag}: please work");
    match t.point {
        Point::MidStream => {
            llm.push(slow_text(tag, 60));
            let mut rec = open_stream(s, &t.id, &content).await;
            t.sent.push(content);
            let k = rng.usize(0..25);
            for _ in 0..k {
                if rec.next().await.is_none() {
                    break;
                }
            }
            note(t, rec.events);
            None
        }
        Point::MidTool => {
            llm.push(MockResponse::script(&Script::tool_call(
                "execute_command",
                json!({"command": "sleep 4"}),
            )));
            let mut rec = open_stream(s, &t.id, &content).await;
            t.sent.push(content);
            rec.until("tool_call").await.expect("tool_call streamed");
            tokio::time::sleep(Duration::from_millis(rng.u64(0..200))).await;
            note(t, rec.events);
            None
        }
        Point::AwaitingApproval | Point::MidDecision => {
            llm.push(MockResponse::script(&Script::tool_call(
                "write_file",
                json!({"path": format!("{tag}.txt"), "content": tag}),
            )));
            let rec = open_stream(s, &t.id, &content).await;
            t.sent.push(content);
            let events = rec.rest_within(Duration::from_secs(20)).await;
            assert_eq!(
                kinds(&events).last().map(String::as_str),
                Some("done:awaiting_approval"),
                "{tag}: {events:#?}"
            );
            let call_id = find(&events, "tool_call")["call_id"]
                .as_str()
                .unwrap()
                .to_string();
            note(t, events);
            if t.point == Point::AwaitingApproval {
                return None;
            }
            llm.push(slow_text(tag, 40));
            let req = s.post(
                &format!("/sessions/{}/hitl-decision", t.id),
                json!({"call_id": call_id, "decision": "approve"}),
            );
            // The decision's stream is read by a task until the kill cuts it.
            let task = tokio::spawn(async move {
                match req.send().await {
                    Ok(r) if r.status() == 200 => EventStream::cut_tolerant(r).rest().await,
                    _ => Vec::new(),
                }
            });
            tokio::time::sleep(Duration::from_millis(rng.u64(0..60))).await;
            Some(task)
        }
    }
}

/// Posts `body` once: after a crash and restart the session takes it at once, never
/// `SESSION_BUSY` (the dead process's leases are taken over without waiting for them to expire).
async fn at_once(s: &Server, path: &str, body: Value, ctx: &str) -> reqwest::Response {
    let r = s.post(path, body).send().await.unwrap();
    if r.status() == 409 {
        let (_, err) = error_of(r).await;
        panic!("{ctx}: {path} answered {err} after the restart\n{}", s.logs());
    }
    r
}

/// After a restart: pending approvals are listed and decided, the session takes a new message, and
/// storage agrees with everything the client saw.
async fn check_after_restart(s: &Server, llm: &MockLlmServer, t: &mut Tracked, tag: &str) {
    let ctx = format!("{tag} ({:?}, session {})", t.point, t.id);
    let pending: Value = s.get_json(&format!("/sessions/{}/pending-approvals", t.id)).await;
    let pending = pending["pending_approvals"].as_array().unwrap().clone();
    if t.point == Point::AwaitingApproval {
        assert_eq!(pending.len(), 1, "{ctx}: the approval survives the crash");
    }
    for p in &pending {
        assert_eq!(p["tool_name"], "write_file", "{ctx}");
        llm.push(MockResponse::script(&Script::text(format!("{tag} decided"))));
        let r = at_once(
            s,
            &format!("/sessions/{}/hitl-decision", t.id),
            json!({"call_id": p["call_id"], "decision": "approve"}),
            &ctx,
        )
        .await;
        assert_eq!(
            r.status(),
            200,
            "{ctx}: decide after restart: {:?}",
            r.text().await
        );
        let events = EventStream::cut_tolerant(r)
            .rest_within(Duration::from_secs(30))
            .await;
        assert_eq!(
            kinds(&events),
            [
                "approval_resolved",
                "tool_result",
                "assistant_final",
                "done:completed"
            ],
            "{ctx}"
        );
        note(t, events);
    }
    // The new message, at once.
    let content = format!("{tag}: after restart");
    llm.push(MockResponse::script(&Script::text(format!("{tag} fine"))));
    let r = at_once(
        s,
        "/agent/message/stream",
        json!({"session_id": t.id, "message": {"type": "user_message", "content": content}}),
        &ctx,
    )
    .await;
    assert_eq!(r.status(), 200, "{ctx}: new message: {:?}", r.text().await);
    let events = EventStream::cut_tolerant(r)
        .rest_within_ctx(Duration::from_secs(30), &format!("{ctx}: new message"))
        .await;
    t.sent.push(content);
    assert_eq!(
        kinds(&events),
        ["assistant_final", "done:completed"],
        "{ctx}: {events:#?}"
    );
    note(t, events);

    let stored = stored(s, &t.id).await;
    assert_received_are_stored(&t.received, &stored.events, &ctx);
    assert_history_valid(&stored.messages, &ctx);
    assert_eq!(user_texts(&stored.messages), t.sent, "{ctx}: user messages");
    let assistant: Vec<&str> = stored
        .messages
        .iter()
        .filter(|m| m["role"] == "assistant")
        .filter_map(|m| m["content"].as_str())
        .collect();
    for a in &t.answers {
        assert_eq!(
            assistant.iter().filter(|m| *m == a).count(),
            1,
            "{ctx}: answer {a:?} stored once: {assistant:#?}"
        );
    }
    let session: Value = s.get_json(&format!("/sessions/{}", t.id)).await;
    assert_eq!(session["status"], "idle", "{ctx}");
}

async fn crash_run(db: &str, test: &str, seed: u64) {
    let mut rng = rng(test, seed);
    let project = tempfile::tempdir().unwrap();
    let project_path = project.path().to_str().unwrap().to_string();
    let mut previous: Vec<Tracked> = Vec::new();
    let points = [
        Point::MidStream,
        Point::MidTool,
        Point::AwaitingApproval,
        Point::MidDecision,
    ];
    for kill in 0..=KILLS {
        let llm = MockLlmServer::start().await.unwrap();
        let s = Server::start_with(&llm.url(), Some(db), ENV).await;
        for (n, t) in previous.iter_mut().enumerate() {
            check_after_restart(&s, &llm, t, &format!("kill{}-s{n}", kill - 1)).await;
        }
        if kill == KILLS {
            break;
        }
        let mut now = Vec::new();
        let mut tasks = Vec::new();
        for n in 0..SESSIONS_PER_KILL {
            // The mock answers from one queue: the previous session's turn must have taken its
            // response before this session's is queued, or this turn could be served that one.
            for _ in 0..250 {
                if llm.remaining() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let id = s
                .session(json!({"metadata": {"project_path": project_path}}))
                .await;
            let mut t = Tracked {
                id,
                point: points[rng.usize(0..points.len())],
                received: Vec::new(),
                sent: Vec::new(),
                answers: Vec::new(),
            };
            tasks.push(drive(&s, &llm, &mut rng, &mut t, &format!("kill{kill}-s{n}")).await);
            now.push(t);
        }
        drop(s); // SIGKILL
        for (t, task) in now.iter_mut().zip(tasks) {
            if let Some(task) = task {
                let events = task.await.unwrap();
                note(t, events);
            }
        }
        previous = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_survives_sigkill_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("crash.db").display());
    crash_run(&db, "sqlite_survives_sigkill_at_random_points", 9001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn postgres_survives_sigkill_at_random_points() {
    let (_guard, url) = postgres_url().await;
    crash_run(&url, "postgres_survives_sigkill_at_random_points", 9002).await;
}
