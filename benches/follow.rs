//! Cross-replica follow latency: turns run on one server process, each followed on another process
//! on the same database; prints how long after the turn's own stream each event reached the follower.
//!
//! ```text
//! cargo build --release -p agent-runtime-server -p agent-runtime-benches --bin agent-runtime-server --bin follow
//! target/release/follow --database-url postgres://postgres@127.0.0.1:5432/test [--sessions 64] [--runs 3]
//! ```
//! Each of `--sessions` sessions gets one answer of 30 tokens dripped by the mock model (25 ms
//! apart), streamed by process A (`POST /agent/message/stream`) and followed on process B
//! (`GET /sessions/{id}/events?after=0`), all at once. Every follower must receive exactly the
//! turn's events. The delay of an event is its arrival on B's stream minus its arrival on A's
//! (both read here); the first four of each turn are left out (the follower is still connecting).
//! Prints p50/p99/max per run with the CPU both processes used. Give it a schema of its own
//! (`psql … -c 'create schema bench_follow'`, then `?options=-csearch_path%3Dbench_follow` on the
//! URL). `AGENT_RUNTIME_SERVER_BIN` overrides the binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_core::test_kit::{EventStream, ServerProcess, create_session};
use serde_json::json;

const TOKEN: &str = "bench";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// CPU time (user + system) the process used so far, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

async fn start(bin: &str, db: &str, model: &str) -> ServerProcess {
    let mut command = Command::new(bin);
    command
        .args(["--port", "0", "--database-url", db, "--llm-proxy-url", model])
        .args(["--internal-api-key", TOKEN, "--auto-agent-switching", "false"])
        .args(["--log-level", "error"]);
    ServerProcess::start(command)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The events of `rec` with the instant each arrived.
async fn timed(mut rec: EventStream) -> Vec<(u64, Instant)> {
    let mut out = Vec::new();
    while let Some(e) = rec.next().await {
        out.push((e["seq"].as_u64().unwrap(), Instant::now()));
    }
    out
}

/// One turn on `a` followed on `b`: the delays of its events (after the first four).
async fn one(c: reqwest::Client, a: String, b: String) -> Vec<Duration> {
    let id = create_session(&c, &a, TOKEN, &json!({})).await.unwrap();
    let r = c
        .post(format!("{a}/agent/message/stream"))
        .header("x-internal-auth", TOKEN)
        .json(&json!({"session_id": id, "message": {"type": "user_message", "content": "go"}}))
        .send()
        .await
        .unwrap();
    let mut own = EventStream::new(r);
    let first = own.next().await.expect("a first event");
    let first_at = Instant::now();
    let followed = EventStream::new(
        c.get(format!("{b}/sessions/{id}/events?after=0"))
            .header("x-internal-auth", TOKEN)
            .send()
            .await
            .unwrap(),
    );
    let (own_times, followed_times) = tokio::join!(
        async {
            let mut t = vec![(first["seq"].as_u64().unwrap(), first_at)];
            t.extend(timed(own).await);
            t
        },
        timed(followed)
    );
    assert_eq!(
        own_times.iter().map(|t| t.0).collect::<Vec<_>>(),
        followed_times.iter().map(|t| t.0).collect::<Vec<_>>(),
        "{id}: the follower got the turn's events"
    );
    own_times
        .iter()
        .zip(&followed_times)
        .skip(4)
        .map(|(o, f)| f.1.saturating_duration_since(o.1))
        .collect()
}

fn at(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() {
    let db = arg("--database-url").expect("--database-url postgres://… (a schema of its own)");
    let sessions: usize = arg("--sessions").map_or(64, |n| n.parse().unwrap());
    let runs: usize = arg("--runs").map_or(3, |n| n.parse().unwrap());
    let bin =
        std::env::var("AGENT_RUNTIME_SERVER_BIN").unwrap_or("target/release/agent-runtime-server".into());
    let llm = MockLlmServer::start().await.unwrap();
    let text: String = (0..30).map(|w| format!("w{w} ")).collect();
    llm.respond_with(move |_| {
        MockResponse::script(&Script::text(text.trim_end()))
            .split_every(160)
            .drip(Duration::from_millis(25))
    });
    let a = start(&bin, &db, &llm.url()).await;
    let b = start(&bin, &db, &llm.url()).await;
    let client = reqwest::Client::new();
    let (base_a, base_b) = (Arc::new(a.base.clone()), Arc::new(b.base.clone()));
    println!("{sessions} sessions running on A, each followed on B; delay of B's follower behind A's stream");
    for run in 1..=runs {
        let (ca, cb) = (cpu_ticks(a.child.id()), cpu_ticks(b.child.id()));
        let began = Instant::now();
        let tasks: Vec<_> = (0..sessions)
            .map(|_| {
                let (c, x, y) = (client.clone(), base_a.to_string(), base_b.to_string());
                tokio::spawn(one(c, x, y))
            })
            .collect();
        let mut delays = Vec::new();
        for t in tasks {
            delays.extend(t.await.unwrap());
        }
        delays.sort();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "run {run}: {} events in {:.1?}: p50 {:?}, p99 {:?}, max {:?}; CPU A {} ms, B {} ms; load {}",
            delays.len(),
            began.elapsed(),
            at(&delays, 0.5),
            at(&delays, 0.99),
            at(&delays, 1.0),
            (cpu_ticks(a.child.id()) - ca) * 10,
            (cpu_ticks(b.child.id()) - cb) * 10,
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
    }
}
