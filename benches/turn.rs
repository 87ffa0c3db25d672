//! Engine benchmark: one full turn — the routing call, one tool call (`read_file`), the answer —
//! on the scripted model (zero latency) and in-memory storage. What is measured is the
//! runtime's own work around three model calls: events, commits, context, checks, the tool.
//!
//! Run: `cargo bench -p agent-runtime-benches --bench turn`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails loudly

use std::sync::Arc;

use agent_runtime_core::config::RuntimeConfig;
use agent_runtime_core::llm::{ChatRole, Script, ScriptedBackend, ToolChoice};
use agent_runtime_core::orchestrator::{CreateSession, Orchestrator, Submission};
use agent_runtime_core::storage::memory::MemoryStorage;
use criterion::{Criterion, criterion_group, criterion_main};
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

fn turn(c: &mut Criterion) {
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
    c.bench_function("turn/route+read_file+answer", |b| {
        b.to_async(&rt).iter(|| async {
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
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = turn
}
criterion_main!(benches);
