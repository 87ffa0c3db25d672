//! Engine benchmark: one full turn — the routing call, one tool call (`read_file`), the answer —
//! on the scripted model (zero latency) and in-memory storage. What is measured is the
//! runtime's own work around three model calls: events, commits, context, checks, the tool.
//!
//! Run: `cargo bench -p agent-runtime-benches --bench turn`; a fixed number of turns for instruction
//! counts: `TURN_BENCH_TURNS=200 valgrind --tool=callgrind target/release/deps/turn-*` (see `main`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails loudly

use std::sync::Arc;

use agent_runtime_core::config::RuntimeConfig;
use agent_runtime_core::llm::{ChatRole, Script, ScriptedBackend, ToolChoice};
use agent_runtime_core::orchestrator::{CreateSession, Orchestrator, Submission};
use agent_runtime_core::storage::memory::MemoryStorage;
use criterion::{Criterion, criterion_group};
use futures::StreamExt;
use serde_json::json;

fn model() -> ScriptedBackend {
    ScriptedBackend::from_fn(|req| {
        if req.tool_choice == ToolChoice::Function("route".into()) {
            Script::tool_call("route", json!({"agent": "coder", "reason": "code"}))
        } else if req.messages.last().is_some_and(|m| m.role == ChatRole::Tool) {
            Script::text("The file defines the entry point of the program.")
        } else {
            Script::tool_call("read_file", json!({"path": "src/main.rs"}))
        }
    })
}

/// What every turn of the bench shares: the runtime, the project, the orchestrator, the metadata.
struct Setup {
    rt: tokio::runtime::Runtime,
    _project: tempfile::TempDir,
    orchestrator: Orchestrator,
    metadata: serde_json::Value,
}

fn setup() -> Setup {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let project = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(project.path().join("src")).expect("src");
    std::fs::write(
        project.path().join("src/main.rs"),
        "fn main() {\n    println!(\"hi\");\n}\n",
    )
    .expect("write");
    let config = RuntimeConfig {
        hitl_enabled: false,
        ..RuntimeConfig::default()
    };
    let orchestrator = Orchestrator::builder(Arc::new(MemoryStorage::new()), Arc::new(model()))
        .config(config)
        .build()
        .expect("orchestrator");
    let metadata = json!({"project_path": project.path().to_str().expect("utf-8 path")});
    Setup {
        rt,
        _project: project,
        orchestrator,
        metadata,
    }
}

/// One turn in a new session, read to its end.
async fn one_turn(orchestrator: &Orchestrator, metadata: &serde_json::Value) {
    let session = orchestrator
        .create_session(CreateSession {
            metadata: Some(metadata.clone()),
            ..CreateSession::default()
        })
        .await
        .expect("session");
    let events: Vec<_> = orchestrator
        .submit(&session.id, Submission::user("Explain main.rs"))
        .await
        .expect("submit")
        .collect()
        .await;
    assert!(events.len() > 5);
}

fn turn(c: &mut Criterion) {
    let s = setup();
    c.bench_function("turn/route+read_file+answer", |b| {
        b.to_async(&s.rt).iter(|| one_turn(&s.orchestrator, &s.metadata))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = turn
}

/// `TURN_BENCH_TURNS=N`: N turns one after another, outside criterion, then exit. For instruction
/// counts (`valgrind --tool=callgrind`), which do not drift with the machine's load: the count at
/// N turns minus the count at 0 turns, divided by N, is one turn's.
fn main() {
    if let Ok(n) = std::env::var("TURN_BENCH_TURNS") {
        let n: usize = n.parse().expect("TURN_BENCH_TURNS: a number of turns");
        let s = setup();
        s.rt.block_on(async {
            for _ in 0..n {
                one_turn(&s.orchestrator, &s.metadata).await;
            }
        });
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
