//! The process sandbox's added cost per command: `execute_command` running `true`, sandboxed and not,
//! interleaved in one run; prints p50 and p99. Run: `cargo run --release -p agent-runtime-benches --bin sandbox_cost`.

use std::time::{Duration, Instant};

use agent_runtime_core::tools::{RuntimeExecutor, SandboxMode, ToolContext, ToolExecutor};
use serde_json::json;

const RUNS: usize = 300;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let exec = RuntimeExecutor::default();
    let enforced = ToolContext::new(dir.path());
    let mut off = ToolContext::new(dir.path());
    off.sandbox.mode = SandboxMode::Off;
    let (mut with, mut without) = (Vec::with_capacity(RUNS), Vec::with_capacity(RUNS));
    for i in 0..RUNS + 20 {
        for (ctx, out) in [(&enforced, &mut with), (&off, &mut without)] {
            let t = Instant::now();
            let r = exec
                .execute(ctx, "execute_command", json!({"command": "true"}))
                .await?;
            let took = t.elapsed();
            if r["exit_code"] != 0 {
                return Err(format!("the command failed: {r}").into());
            }
            // The first 20 rounds warm up the caches.
            if i >= 20 {
                out.push(took);
            }
        }
    }
    with.sort();
    without.sort();
    println!("execute_command `true`, {RUNS} runs each, interleaved");
    println!("{:<12} {:>10} {:>10}", "", "p50", "p99");
    for (name, v) in [("sandboxed", &with), ("unsandboxed", &without)] {
        println!(
            "{name:<12} {:>8.2}ms {:>8.2}ms",
            percentile(v, 0.5).as_secs_f64() * 1e3,
            percentile(v, 0.99).as_secs_f64() * 1e3
        );
    }
    println!(
        "added p50: {:.2} ms",
        (percentile(&with, 0.5).as_secs_f64() - percentile(&without, 0.5).as_secs_f64()) * 1e3
    );
    Ok(())
}
