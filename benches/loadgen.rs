//! HTTP load generator: starts the server binary and a zero-latency mock model server, then runs
//! per virtual user: create session → text turn → tool-call turn (client mode) → tool_result turn
//! → history read, at each concurrency level, and prints scenarios/s, p50/p95/p99 per step and
//! the server's peak RSS.
//!
//! ```text
//! cargo build --release -p agent-runtime-server
//! cargo run --release -p agent-runtime-benches --bin loadgen -- [--levels 1,8,64,512] [--secs 5] [--warmup 1] [--open-streams 1000]
//! ```
//! Each level first runs `--warmup` seconds unmeasured (the users open their connections, the
//! server's pools fill), then `--secs` measured: only scenarios started in the measured window count.
//! `AGENT_RUNTIME_SERVER_BIN` overrides the server binary (default `target/release/agent-runtime-server`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::process::Command;
use std::time::{Duration, Instant};

use agent_runtime_core::llm::Script;
use agent_runtime_core::test_kit::{EventStream, ServerProcess};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

const STEPS: [&str; 5] = [
    "create_session",
    "text_turn",
    "tool_call_turn",
    "tool_result_turn",
    "history_read",
];

/// The mock model: a tool call when the user asks for one, text otherwise; no delay.
async fn model(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == hyper::Method::GET {
        return Ok(Response::new(Full::new(Bytes::from_static(
            b"{\"object\":\"list\",\"data\":[]}",
        ))));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let last = v["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or(Value::Null);
    let script = if last["role"] == "user" && last["content"].as_str().unwrap_or("").contains("read it") {
        Script::tool_call("read_file", json!({"path": "README.md"}))
    } else {
        Script::text("Done: the answer has a few words in it.")
    };
    let mut r = Response::new(Full::new(Bytes::from(script.sse_body("mock"))));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    Ok(r)
}

async fn start_model() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service_fn(model))
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// Reads the runtime's event stream to the end; returns the events.
async fn events(r: reqwest::Response) -> Vec<Value> {
    EventStream::new(r).all().await
}

async fn scenario(c: &reqwest::Client, base: &str) -> [Duration; 5] {
    let mut t = [Duration::ZERO; 5];
    let post = |path: &str, body: Value| {
        c.post(format!("{base}{path}"))
            .header("x-internal-auth", "bench")
            .json(&body)
            .send()
    };
    let s = Instant::now();
    let created: Value = post("/sessions", json!({"metadata": {"tool_execution": "client"}}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["session_id"].as_str().unwrap().to_string();
    t[0] = s.elapsed();
    let s = Instant::now();
    events(
        post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "hello"}}),
        )
        .await
        .unwrap(),
    )
    .await;
    t[1] = s.elapsed();
    let s = Instant::now();
    let ev = events(
        post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "read it"}}),
        )
        .await
        .unwrap(),
    )
    .await;
    t[2] = s.elapsed();
    let call = ev.iter().find(|e| e["type"] == "tool_call").expect("a tool call")["call_id"].clone();
    let s = Instant::now();
    events(post("/agent/message/stream", json!({"session_id": id, "message": {"type": "tool_result", "call_id": call, "result": "# readme"}})).await.unwrap()).await;
    t[3] = s.elapsed();
    let s = Instant::now();
    let h = c
        .get(format!("{base}/sessions/{id}/history"))
        .header("x-internal-auth", "bench")
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    h.bytes().await.unwrap();
    t[4] = s.elapsed();
    t
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Opens `n` SSE streams (`GET /sessions/{id}/events?follow=true`, one session each), holds them
/// all open at once, and prints the server's RSS while they are open.
async fn hold_open_streams(c: &reqwest::Client, base: &str, n: usize, server_pid: u32) {
    let before = current_rss_kib(server_pid);
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let created: Value = c
            .post(format!("{base}/sessions"))
            .header("x-internal-auth", "bench")
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["session_id"].as_str().unwrap().to_string();
        let r = c
            .get(format!("{base}/sessions/{id}/events?follow=true"))
            .header("x-internal-auth", "bench")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open = current_rss_kib(server_pid);
    println!(
        "{n} open SSE streams: server RSS {:.1} MiB (before opening them: {:.1} MiB)",
        open as f64 / 1024.0,
        before as f64 / 1024.0
    );
    drop(streams);
}

/// The process's resident set now, from /proc (KiB).
fn current_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let levels: Vec<usize> = arg("--levels")
        .unwrap_or("1,8,64,512".into())
        .split(',')
        .map(|l| l.parse().unwrap())
        .collect();
    let secs: u64 = arg("--secs").map_or(5, |s| s.parse().unwrap());
    let warmup: f64 = arg("--warmup").map_or(1.0, |s| s.parse().unwrap());
    let bin =
        std::env::var("AGENT_RUNTIME_SERVER_BIN").unwrap_or("target/release/agent-runtime-server".into());
    let model_url = start_model().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("bench.db").display());
    let mut command = Command::new(&bin);
    command
        .args([
            "--port",
            "0",
            "--database-url",
            &db,
            "--llm-proxy-url",
            &model_url,
            "--internal-api-key",
            "bench",
        ])
        .args(["--auto-agent-switching", "false", "--log-level", "error"]);
    let server = ServerProcess::start(command)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let base = server.base.clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap();
    println!(
        "{:>5} {:>12} {:>18} {:>10} {:>10} {:>10}",
        "vus", "scenarios/s", "step", "p50 ms", "p95 ms", "p99 ms"
    );
    for &vus in &levels {
        let measured_from = Instant::now() + Duration::from_secs_f64(warmup);
        let deadline = measured_from + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..vus)
            .map(|_| {
                let (c, base) = (client.clone(), base.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let at = Instant::now();
                        if at >= deadline {
                            break out;
                        }
                        let times = scenario(&c, &base).await;
                        if at >= measured_from {
                            out.push(times);
                        }
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = measured_from.elapsed().as_secs_f64();
        let rate = all.len() as f64 / elapsed;
        for (i, step) in STEPS.iter().enumerate() {
            let mut d: Vec<Duration> = all.iter().map(|t| t[i]).collect();
            d.sort();
            let head = if i == 0 {
                format!("{vus:>5} {rate:>12.1}")
            } else {
                format!("{:>5} {:>12}", "", "")
            };
            println!(
                "{head} {step:>18} {:>10.2} {:>10.2} {:>10.2}",
                pct(&d, 0.5),
                pct(&d, 0.95),
                pct(&d, 0.99)
            );
        }
    }
    if let Some(n) = arg("--open-streams").map(|n| n.parse::<usize>().unwrap()) {
        hold_open_streams(&client, &base, n, server.child.id()).await;
    }
    println!(
        "server peak RSS: {:.1} MiB",
        peak_rss_kib(server.child.id()) as f64 / 1024.0
    );
}
