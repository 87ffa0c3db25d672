//! Shared pieces of the fault tests: a seeded RNG that prints its seed, an SSE reader that survives
//! a server being killed under it, Postgres URLs a server process can open, history invariants.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::storage::pg_testing::{self, SchemaGuard};
use futures::StreamExt;
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
    let url = format!(
        "{}&options=-csearch_path%3D{}",
        guard.tagged_url(),
        guard.schema()
    );
    (guard, url)
}

/// An SSE reader that records every complete event it received and treats a cut connection (the
/// server killed, the client leaving) as the end of the stream, never as a test failure.
pub struct Recorder {
    stream: Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    buf: Vec<u8>,
    /// Every complete event received, in order.
    pub events: Vec<Value>,
}

impl Recorder {
    pub fn new(r: reqwest::Response) -> Recorder {
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        Recorder {
            stream: Some(r.bytes_stream().boxed()),
            buf: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The next event; `None` when the stream ended or was cut.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame = String::from_utf8(self.buf[..end].to_vec()).expect("frames are UTF-8");
                self.buf.drain(..end + 2);
                if frame.starts_with(':') {
                    continue;
                }
                let mut lines = frame.lines();
                let id: u64 = lines
                    .next()
                    .unwrap()
                    .strip_prefix("id: ")
                    .unwrap()
                    .parse()
                    .unwrap();
                let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(v["seq"], id, "id line and seq differ");
                self.events.push(v.clone());
                return Some(v);
            }
            let stream = self.stream.as_mut()?;
            match stream.next().await {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                Some(Err(_)) | None => {
                    // A partial frame at a cut was never received as an event.
                    self.stream = None;
                    return None;
                }
            }
        }
    }

    /// Reads until an event of `kind` (returned) or the end.
    pub async fn until(&mut self, kind: &str) -> Option<Value> {
        while let Some(e) = self.next().await {
            if e["type"] == kind {
                return Some(e);
            }
        }
        None
    }

    /// Reads to the end; returns everything received.
    pub async fn rest(mut self) -> Vec<Value> {
        while self.next().await.is_some() {}
        self.events
    }

    /// Reads to the end, bounded: a stream that does not end in `limit` fails the test.
    pub async fn rest_within(self, limit: Duration) -> Vec<Value> {
        self.rest_within_ctx(limit, "").await
    }

    /// [`Recorder::rest_within`], naming `ctx` (and the events so far) when the stream hangs.
    pub async fn rest_within_ctx(mut self, limit: Duration, ctx: &str) -> Vec<Value> {
        let ended = tokio::time::timeout(limit, async { while self.next().await.is_some() {} }).await;
        assert!(
            ended.is_ok(),
            "{ctx}: the stream did not end within {limit:?}; received {:?}",
            self.events
        );
        self.events
    }
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
    let events = Recorder::new(r).rest_within(Duration::from_secs(20)).await;
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
