//! Shared pieces of the fault tests: a seeded RNG that prints its seed, the kit's event stream that
//! survives a server being killed under it, Postgres URLs a server process can open, history invariants.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::storage::pg_testing::{self, SchemaGuard};
pub use agent_runtime_core::test_kit::EventStream;
use serde_json::Value;

use crate::common::Server;

/// A seeded RNG: `FAULT_SEED` in the environment replays a failed run; the seed is printed first so
/// a failure's output always carries it.
pub fn rng(test: &str, default_seed: u64) -> fastrand::Rng {
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seed);
    eprintln!("{test}: seed {seed} (replay with FAULT_SEED={seed})");
    fastrand::Rng::with_seed(seed)
}

/// A fresh Postgres schema and a `DATABASE_URL` that makes a server process use it (fails the
/// test, naming the cause, when the test database is not there).
pub async fn postgres_url() -> (Arc<SchemaGuard>, String) {
    let guard = pg_testing::fresh_schema().await;
    // Opening it once creates the schema; the server's own `open` then uses the URL's search_path.
    drop(pg_testing::open_in(&guard).await);
    let url = guard.server_url();
    (guard, url)
}

/// Everything stored for a session: replayed events and messages.
pub struct Stored {
    pub events: Vec<Value>,
    pub messages: Vec<Value>,
}

pub async fn stored(s: &Server, id: &str) -> Stored {
    let r = s
        .get(&format!("/sessions/{id}/events?after=0"))
        .send()
        .await
        .unwrap();
    let events = EventStream::cut_tolerant(r)
        .rest_within(Duration::from_secs(20))
        .await;
    let messages: Value = s.get_json(&format!("/sessions/{id}/messages?limit=1000")).await;
    Stored {
        events,
        messages: messages["messages"].as_array().unwrap().clone(),
    }
}

/// Every event a client received is stored under the same seq with the same content, and the
/// stored seqs run 1, 2, 3, ... without gaps or repeats.
pub fn assert_received_are_stored(received: &[Value], stored: &[Value], ctx: &str) {
    let seqs: Vec<u64> = stored.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{ctx}: stored seqs"
    );
    let by_seq: BTreeMap<u64, &Value> = stored.iter().map(|e| (e["seq"].as_u64().unwrap(), e)).collect();
    for e in received {
        let seq = e["seq"].as_u64().unwrap();
        assert_eq!(
            by_seq.get(&seq),
            Some(&e),
            "{ctx}: received event {seq} differs from storage"
        );
    }
}

/// The history is valid for a model: every assistant tool call has exactly one tool result after
/// it, no tool result without its call, message seqs strictly increasing.
pub fn assert_history_valid(messages: &[Value], ctx: &str) {
    let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{ctx}: message seqs {seqs:?}"
    );
    let mut calls: BTreeSet<String> = BTreeSet::new();
    let mut results: BTreeMap<String, usize> = BTreeMap::new();
    for m in messages {
        if let Some(tc) = m.get("tool_calls").and_then(Value::as_array) {
            for c in tc {
                let id = c["id"].as_str().unwrap().to_string();
                assert!(calls.insert(id.clone()), "{ctx}: call id {id} twice");
            }
        }
        if m["role"] == "tool" {
            let id = m["tool_call_id"].as_str().unwrap().to_string();
            assert!(calls.contains(&id), "{ctx}: result for unknown call {id}");
            *results.entry(id).or_default() += 1;
        }
    }
    for id in &calls {
        assert_eq!(
            results.get(id),
            Some(&1),
            "{ctx}: tool call {id} must have exactly one result: {messages:#?}"
        );
    }
}

/// The user messages of a history, in order.
pub fn user_texts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}
