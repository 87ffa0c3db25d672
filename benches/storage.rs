//! Storage benchmark: append one message and its event to a session that holds 10 messages and
//! to one that holds 100,000, on SQLite (a file) and on Postgres (a fresh schema on the local
//! server). Appending must not depend on the session's length.
//!
//! Run: `cargo bench -p agent-runtime-benches --bench storage`
//! (Postgres at `TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; skipped
//! with a notice when unreachable.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails loudly

use std::sync::Arc;

use agent_runtime_core::Timestamp;
use agent_runtime_core::protocol::{AssistantMessage, EventPayload};
use agent_runtime_core::session::{NewMessage, NewSession};
use agent_runtime_core::storage::{self, Commit, Storage, pg_testing};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const SIZES: [usize; 2] = [10, 100_000];

async fn session_with(store: &Arc<dyn Storage>, id: &str, messages: usize) {
    store
        .create_session(NewSession {
            id: id.into(),
            user_id: None,
            metadata: serde_json::json!({}),
            current_agent: "orchestrator".into(),
            created_at: Timestamp::now(),
            budget: Default::default(),
        })
        .await
        .expect("create session");
    let mut left = messages;
    while left > 0 {
        let n = left.min(2000);
        let c = Commit {
            messages: (0..n)
                .map(|i| NewMessage::user(format!("message {i} of the history"), None))
                .collect(),
            events: (0..n)
                .map(|i| {
                    EventPayload::AssistantMessage(AssistantMessage::Token {
                        token: format!("t{i}"),
                    })
                })
                .collect(),
            ..Commit::now()
        };
        store.commit(id, c).await.expect("prefill");
        left -= n;
    }
}

fn append() -> Commit {
    Commit {
        messages: vec![NewMessage::assistant(
            "one more answer",
            Some("coder".into()),
            vec![],
        )],
        events: vec![EventPayload::AssistantMessage(AssistantMessage::Complete {
            content: "one more answer".into(),
        })],
        ..Commit::now()
    }
}

fn bench_backend(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, store: Arc<dyn Storage>) {
    let mut group = c.benchmark_group(format!("append_message_and_event/{name}"));
    for size in SIZES {
        let id = format!("bench_{size}");
        rt.block_on(session_with(&store, &id, size));
        group.bench_with_input(BenchmarkId::from_parameter(size), &id, |b, id| {
            b.to_async(rt)
                .iter(|| async { store.commit(id, append()).await.expect("append") })
        });
    }
    group.finish();
}

fn storage(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let sqlite = rt.block_on(storage::open(&url)).expect("sqlite");
    bench_backend(c, &rt, "sqlite", sqlite);

    // Postgres like the tests: only when asked for, and then a missing database fails loudly.
    if std::env::var_os("TEST_DATABASE_URL").is_some_and(|url| !url.is_empty()) {
        let guard = rt.block_on(pg_testing::fresh_schema());
        let pg = rt.block_on(pg_testing::guarded(&guard));
        bench_backend(c, &rt, "postgres", pg);
    } else {
        eprintln!(
            "postgres: not benched (set TEST_DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/test)"
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(5));
    targets = storage
}
criterion_main!(benches);
