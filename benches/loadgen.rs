//! HTTP load generator: runs per virtual user create session → text turn → tool-call turn (client
//! mode) → tool_result turn → history read, and prints scenarios/s, p50/p95/p99 per step and CPU.
//!
//! ```text
//! cargo build --release -p agent-runtime-server -p agent-runtime-benches --bin agent-runtime-server --bin relay --bin loadgen
//! target/release/loadgen [--levels 1,8,64,512] [--secs 5] [--warmup 1] [--open-streams 1000]
//!                        [--database-url URL] [--no-relay] [--model-port PORT]
//! target/release/loadgen --target URL [--target-pid PID] [--model-port PORT] [--levels ...]
//! target/release/loadgen --target URL --target URL2 [--target-pid PID --target-pid PID2] ...
//! target/release/loadgen --replicas 2 --database-url postgres://… --no-relay [--levels ...]
//! ```
//! By default it starts a zero-latency mock model, the server binary (SQLite in a temporary
//! directory, or `--database-url`) and the bare relay (`benches/relay.rs`, the physical limit: the
//! same routes and stream with nothing stored), checks that both answer one scenario with the same
//! events, then runs each level on both, alternating which goes first, and prints per level our
//! scenarios/s and CPU per scenario as a ratio to the relay's. CPU is each process's utime + stime
//! from `/proc/<pid>/stat` over the measured window, per measured scenario; `drv ms/sc` is the load
//! generator's own (the mock model runs inside it).
//!
//! `--target URL` drives an already running server that speaks the compatibility routes (ours,
//! the relay, or another runtime) instead; point it at the mock model printed first (fix its port
//! with `--model-port`); `--target-pid` adds that server's CPU. Given several times, `--target`
//! names replicas of one service (processes on one database): every request of a scenario goes to
//! a random one of them, and the CPU column sums every `--target-pid`.
//!
//! `--replicas N` (with `--database-url`, for Postgres) starts N server processes on the one
//! database and measures, side by side at each level, the first process alone (`ours×1`) and all
//! N with requests spread over them (`ours×N`), alternating which goes first.
//!
//! Each level first runs `--warmup` seconds unmeasured (the users open their connections, the
//! server's pools fill), then `--secs` measured: only scenarios started in the measured window count.
//! `AGENT_RUNTIME_SERVER_BIN` and `AGENT_RUNTIME_RELAY_BIN` override the binaries (defaults
//! `target/release/agent-runtime-server`, `target/release/relay`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::process::Command;
use std::time::{Duration, Instant};

use agent_runtime_core::llm::Script;
use agent_runtime_core::test_kit::{EventStream, ServerProcess, create_session};
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

async fn start_model(port: u16) -> String {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
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

/// The shape of one scenario's answers: per stream, its events as `type[:detail]`; then the
/// history's roles. The relay must answer the same shape as the server.
type Shape = Vec<Vec<String>>;

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let kind = e["type"].as_str().unwrap_or("?");
            match kind {
                "assistant_message" if e["is_final"] == true => format!("{kind}:final"),
                "assistant_message" => format!("{kind}:token"),
                "done" => format!("done:{}", e["stop_reason"].as_str().unwrap_or("?")),
                _ => kind.to_string(),
            }
        })
        .collect()
}

/// One scenario: the five steps' times, and its shape when `record` is set.
async fn scenario(c: &reqwest::Client, bases: &[String], record: bool) -> ([Duration; 5], Option<Shape>) {
    let mut t = [Duration::ZERO; 5];
    let mut shape = Vec::new();
    // Each request to any of the target's processes.
    let base = || &bases[fastrand::usize(0..bases.len())];
    let post = |path: &str, body: Value| {
        c.post(format!("{}{path}", base()))
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
    // The three turns: each answer is read to its end; the tool result answers the call just made.
    let mut keep = |ev: &[Value]| {
        if record {
            shape.push(kinds(ev));
        }
    };
    let mut ev;
    (ev, t[1]) = turn(
        c,
        base(),
        &id,
        json!({"type": "user_message", "content": "hello"}),
    )
    .await;
    keep(&ev);
    (ev, t[2]) = turn(
        c,
        base(),
        &id,
        json!({"type": "user_message", "content": "read it"}),
    )
    .await;
    keep(&ev);
    let call = ev.iter().find(|e| e["type"] == "tool_call").expect("a tool call")["call_id"].clone();
    let result = json!({"type": "tool_result", "call_id": call, "result": "# readme"});
    (ev, t[3]) = turn(c, base(), &id, result).await;
    keep(&ev);
    let s = Instant::now();
    let h = c
        .get(format!("{}/sessions/{id}/history", base()))
        .header("x-internal-auth", "bench")
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    let body = h.bytes().await.unwrap();
    t[4] = s.elapsed();
    if record {
        let h: Value = serde_json::from_slice(&body).unwrap();
        let roles = h["messages"].as_array().into_iter().flatten();
        shape.push(
            roles
                .map(|m| m["role"].as_str().unwrap_or("?").to_string())
                .collect(),
        );
    }
    (t, record.then_some(shape))
}

/// Sends one message of session `id` and reads its event stream to the end: the events, and how
/// long the whole answer took.
async fn turn(c: &reqwest::Client, base: &str, id: &str, message: Value) -> (Vec<Value>, Duration) {
    let s = Instant::now();
    let response = c
        .post(format!("{base}/agent/message/stream"))
        .header("x-internal-auth", "bench")
        .json(&json!({"session_id": id, "message": message}))
        .send()
        .await
        .unwrap();
    let ev = events(response).await;
    (ev, s.elapsed())
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
async fn hold_open_streams(c: &reqwest::Client, base: &str, n: usize, server_pid: Option<u32>) {
    let rss = |pid: Option<u32>| pid.map_or(0, current_rss_kib);
    let before = rss(server_pid);
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let id = create_session(c, base, "bench", &json!({})).await.unwrap();
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
    let open = rss(server_pid);
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

/// CPU time the process has used so far (user + system, all threads), in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| {
        panic!("cannot read the CPU time of process {pid} ({e}): is it running? (check --target-pid)")
    });
    // The fields after the command name (which may hold spaces) start after its closing ')':
    // state is field 3, utime field 14 and stime field 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when it cannot be asked).
fn ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A server under load: what the table calls it, its base URLs (several: replicas of one service,
/// requests spread over them), its processes when known.
struct Target {
    name: String,
    bases: Vec<String>,
    pids: Vec<u32>,
}

impl Target {
    /// The CPU ticks of all its processes so far; `None` when they are not known.
    fn cpu_ticks(&self) -> Option<u64> {
        (!self.pids.is_empty()).then(|| self.pids.iter().map(|p| cpu_ticks(&p.to_string())).sum())
    }
}

/// One level's result on one target.
struct LevelResult {
    rate: f64,
    /// The target's CPU per scenario (ms) over the measured window; `None` without its pid.
    cpu_ms: Option<f64>,
    /// The load generator's own CPU per scenario (ms), the mock model included.
    driver_ms: f64,
}

/// Runs `vus` users against `target` for `warmup` + `secs`, prints the level's rows.
async fn run_level(
    client: &reqwest::Client,
    target: &Target,
    vus: usize,
    secs: u64,
    warmup: f64,
    tick: f64,
) -> LevelResult {
    let measured_from = Instant::now() + Duration::from_secs_f64(warmup);
    let deadline = measured_from + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..vus)
        .map(|_| {
            let (c, bases) = (client.clone(), target.bases.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let at = Instant::now();
                    if at >= deadline {
                        break out;
                    }
                    let (times, _) = scenario(&c, &bases, false).await;
                    if at >= measured_from {
                        out.push(times);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep_until(measured_from.into()).await;
    let target_from = target.cpu_ticks();
    let driver_from = cpu_ticks("self");
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let driver_ticks = cpu_ticks("self") - driver_from;
    let target_ticks = target.cpu_ticks().zip(target_from).map(|(now, from)| now - from);
    let elapsed = measured_from.elapsed().as_secs_f64();
    let n = all.len().max(1) as f64;
    let per_scenario = |ticks: u64| ticks as f64 / tick * 1000.0 / n;
    let result = LevelResult {
        rate: all.len() as f64 / elapsed,
        cpu_ms: target_ticks.map(per_scenario),
        driver_ms: per_scenario(driver_ticks),
    };
    let cpu = result.cpu_ms.map_or("n/a".to_string(), |c| format!("{c:.2}"));
    for (i, step) in STEPS.iter().enumerate() {
        let mut d: Vec<Duration> = all.iter().map(|t| t[i]).collect();
        d.sort();
        let head = if i == 0 {
            format!(
                "{:>8} {vus:>5} {:>12.1} {cpu:>9} {:>9.2}",
                target.name, result.rate, result.driver_ms
            )
        } else {
            format!("{:>8} {:>5} {:>12} {:>9} {:>9}", "", "", "", "", "")
        };
        println!(
            "{head} {step:>18} {:>8.2} {:>8.2} {:>8.2}",
            pct(&d, 0.5),
            pct(&d, 0.95),
            pct(&d, 0.99)
        );
    }
    result
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
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
    let flag = |name: &str| args.iter().any(|a| a == name);
    let levels: Vec<usize> = arg("--levels")
        .unwrap_or("1,8,64,512".into())
        .split(',')
        .map(|l| l.parse().unwrap())
        .collect();
    let secs: u64 = arg("--secs").map_or(5, |s| s.parse().unwrap());
    let warmup: f64 = arg("--warmup").map_or(1.0, |s| s.parse().unwrap());
    let tick = ticks_per_sec();
    let model_url = start_model(arg("--model-port").map_or(0, |p| p.parse().unwrap())).await;
    let dir = tempfile::tempdir().unwrap();
    // Kept alive for the whole run: dropping one stops its process.
    let mut processes = Vec::new();
    let mut targets = Vec::new();
    // Every value of a flag given several times.
    let all = |name: &str| -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].clone())
            .collect()
    };
    let urls = all("--target");
    if !urls.is_empty() {
        println!("mock model at {model_url}");
        targets.push(Target {
            name: "target".into(),
            bases: urls.iter().map(|u| u.trim_end_matches('/').to_string()).collect(),
            pids: all("--target-pid").iter().map(|p| p.parse().unwrap()).collect(),
        });
    } else {
        let bin =
            std::env::var("AGENT_RUNTIME_SERVER_BIN").unwrap_or("target/release/agent-runtime-server".into());
        let db = arg("--database-url")
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
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
        let replicas: usize = arg("--replicas").map_or(1, |n| n.parse().unwrap());
        let mut others = Vec::new();
        for _ in 1..replicas {
            let mut command = Command::new(&bin);
            command
                .args([
                    "--port",
                    "0",
                    "--database-url",
                    &db,
                    "--llm-proxy-url",
                    &model_url,
                ])
                .args(["--internal-api-key", "bench", "--auto-agent-switching", "false"])
                .args(["--log-level", "error"]);
            others.push(
                ServerProcess::start(command)
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        if !flag("--no-relay") {
            let relay_bin = std::env::var("AGENT_RUNTIME_RELAY_BIN").unwrap_or("target/release/relay".into());
            let mut command = Command::new(&relay_bin);
            command.args([
                "--port",
                "0",
                "--llm-proxy-url",
                &model_url,
                "--internal-api-key",
                "bench",
            ]);
            let relay = ServerProcess::start(command).await.unwrap_or_else(|e| {
                panic!("{e} (build it: cargo build --release -p agent-runtime-benches --bin relay)")
            });
            targets.push(Target {
                name: "relay".into(),
                bases: vec![relay.base.clone()],
                pids: vec![relay.child.id()],
            });
            processes.push(relay);
        }
        if others.is_empty() {
            targets.push(Target {
                name: "ours".into(),
                bases: vec![server.base.clone()],
                pids: vec![server.child.id()],
            });
        } else {
            targets.push(Target {
                name: "ours×1".into(),
                bases: vec![server.base.clone()],
                pids: vec![server.child.id()],
            });
            let all: Vec<&ServerProcess> = std::iter::once(&server).chain(&others).collect();
            targets.push(Target {
                name: format!("ours×{replicas}"),
                bases: all.iter().map(|p| p.base.clone()).collect(),
                pids: all.iter().map(|p| p.child.id()).collect(),
            });
        }
        processes.push(server);
        processes.extend(others);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap();
    // The same scenario must get the same answers from every target, or the comparison is void.
    let mut shapes = Vec::new();
    for target in &targets {
        let (_, shape) = scenario(&client, &target.bases, true).await;
        shapes.push(shape.unwrap());
    }
    println!("answers of one scenario (text turn | tool-call turn | tool-result turn | history roles):");
    println!(
        "  {}",
        shapes[0]
            .iter()
            .map(|s| s.join(" "))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for (target, shape) in targets.iter().zip(&shapes).skip(1) {
        assert_eq!(
            shape, &shapes[0],
            "{} answers the scenario differently from {}",
            target.name, targets[0].name
        );
    }
    println!("load average at start: {}", load_average());
    println!(
        "{:>8} {:>5} {:>12} {:>9} {:>9} {:>18} {:>8} {:>8} {:>8}",
        "target", "vus", "scenarios/s", "cpu ms/sc", "drv ms/sc", "step", "p50 ms", "p95 ms", "p99 ms"
    );
    for (li, &vus) in levels.iter().enumerate() {
        // Alternate which target goes first so that a drift of the machine's speed favours neither.
        let order: Vec<usize> = if li % 2 == 0 {
            (0..targets.len()).collect()
        } else {
            (0..targets.len()).rev().collect()
        };
        let mut results: Vec<Option<LevelResult>> = (0..targets.len()).map(|_| None).collect();
        for i in order {
            results[i] = Some(run_level(&client, &targets[i], vus, secs, warmup, tick).await);
        }
        if let [Some(relay), Some(ours)] = results.as_slice()
            && targets[0].name == "relay"
        {
            let cpu = match (ours.cpu_ms, relay.cpu_ms) {
                (Some(o), Some(r)) if r > 0.0 => format!("{:.2}x", o / r),
                _ => "n/a".into(),
            };
            println!(
                "{:>8} {vus:>5} ours/relay: scenarios/s {:.2}x, server CPU per scenario {cpu} (load average {})",
                "",
                ours.rate / relay.rate,
                load_average()
            );
        }
        if let [Some(one), Some(many)] = results.as_slice()
            && targets[0].name == "ours×1"
        {
            println!(
                "{:>8} {vus:>5} {}/ours×1: scenarios/s {:.2}x, server CPU per scenario {:.2}x (load average {})",
                "",
                targets[1].name,
                many.rate / one.rate,
                many.cpu_ms.unwrap_or(0.0) / one.cpu_ms.unwrap_or(f64::NAN),
                load_average()
            );
        }
    }
    let ours = targets.last().unwrap();
    if let Some(n) = arg("--open-streams").map(|n| n.parse::<usize>().unwrap()) {
        hold_open_streams(&client, &ours.bases[0], n, ours.pids.first().copied()).await;
    }
    for target in &targets {
        for pid in &target.pids {
            println!(
                "{} (pid {pid}) peak RSS: {:.1} MiB",
                target.name,
                peak_rss_kib(*pid) as f64 / 1024.0
            );
        }
    }
    drop(processes);
}
