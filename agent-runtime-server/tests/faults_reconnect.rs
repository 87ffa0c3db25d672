//! Reconnecting (API.md §4.1): clients drop their SSE connection at seeded random points of a slow
//! turn and come back on `GET /sessions/{id}/events` with `Last-Event-ID` (or `?after=`); together
//! the pieces are exactly the stored events, in order, none twice, and the turn was not cancelled.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use fault_support::*;
use serde_json::json;

/// Sessions driven at once, each dropping its connection several times.
const SESSIONS: usize = 24;
/// Model tokens per answer (each an `assistant_message` event).
const WORDS: usize = 80;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnecting_clients_receive_exactly_the_missing_events_in_order() {
    let mut rng = rng(
        "reconnecting_clients_receive_exactly_the_missing_events_in_order",
        4242,
    );
    let llm = MockLlmServer::start().await.unwrap();
    let s = std::sync::Arc::new(
        Server::start_with(
            &llm.url(),
            None,
            &[("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false")],
        )
        .await,
    );
    // One answer per session, queued up front; each is dripped so the turn outlives the drops.
    for n in 0..SESSIONS {
        let text: String = (0..WORDS).map(|w| format!("s{n}w{w} ")).collect();
        llm.push(
            MockResponse::script(&Script::text(text.trim_end()))
                .split_every(32)
                .drip(Duration::from_millis(5)),
        );
    }
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        ids.push(s.session(json!({})).await);
    }
    let mut tasks = Vec::new();
    for (n, id) in ids.into_iter().enumerate() {
        let s = s.clone();
        // Each client drops after these many events (a few drops per turn; 0 = right away).
        let drops: Vec<usize> = (0..rng.usize(1..5)).map(|_| rng.usize(0..30)).collect();
        let by_header: Vec<bool> = drops.iter().map(|_| rng.bool()).collect();
        let pause_ms: Vec<u64> = drops.iter().map(|_| rng.u64(0..150)).collect();
        tasks.push(tokio::spawn(async move {
            let r = s
                .post(
                    "/agent/message/stream",
                    json!({"session_id": id, "message": {"type": "user_message", "content": format!("q{n}")}}),
                )
                .send()
                .await
                .unwrap();
            let mut rec = EventStream::cut_tolerant(r);
            let mut got = Vec::new();
            let mut reconnects = 0;
            for (i, k) in drops.iter().enumerate() {
                for _ in 0..*k {
                    if rec.next().await.is_none() {
                        break;
                    }
                }
                got.extend(std::mem::take(&mut rec.events));
                drop(rec); // the client leaves mid-stream
                tokio::time::sleep(Duration::from_millis(pause_ms[i])).await;
                let last = got.last().map_or(0, |e| e["seq"].as_u64().unwrap());
                let req = if by_header[i] {
                    s.get(&format!("/sessions/{id}/events"))
                        .header("last-event-id", last.to_string())
                } else {
                    s.get(&format!("/sessions/{id}/events?after={last}"))
                };
                rec = EventStream::cut_tolerant(req.send().await.unwrap());
                reconnects += 1;
            }
            got.extend(rec.rest_within(Duration::from_secs(60)).await);
            let stored = stored(&s, &id).await;
            assert_eq!(got, stored.events, "session {n} ({id}): pieces = storage");
            assert_eq!(
                kinds(&got),
                ["assistant_final", "done:completed"],
                "session {n}: the turn was not cancelled by the drops"
            );
            // Answers are handed out in arrival order, so any session may get any of them: the
            // tokens received must add up to the final text, which has all its words.
            let tokens: String = got
                .iter()
                .filter(|e| e["type"] == "assistant_message" && e["is_final"] == false)
                .map(|e| e["token"].as_str().unwrap())
                .collect();
            let fin = find(&got, "assistant_message");
            let fin = got
                .iter()
                .find(|e| e["type"] == "assistant_message" && e["is_final"] == true)
                .unwrap_or(fin);
            assert_eq!(fin["content"].as_str(), Some(tokens.as_str()), "session {n}");
            assert_eq!(tokens.split(' ').count(), WORDS, "session {n}");
            reconnects
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    eprintln!("{SESSIONS} sessions, {total} reconnects");
    assert!(total >= SESSIONS);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_last_event_id_is_invalid_request_and_one_past_the_end_gets_nothing() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false")],
    )
    .await;
    let id = s.session(json!({})).await;
    llm.push(MockResponse::script(&Script::text("hello there")));
    let all = s
        .send(&id, json!({"type": "user_message", "content": "hi"}))
        .await;
    for bad in ["abc", "-1", "1.5", ""] {
        let (status, body) = error_of(
            s.get(&format!("/sessions/{id}/events"))
                .header("last-event-id", bad)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{bad:?}"
        );
    }
    let last = all.last().unwrap()["seq"].as_u64().unwrap();
    for after in [last, last + 100] {
        let r = s
            .get(&format!("/sessions/{id}/events"))
            .header("last-event-id", after.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(
            EventStream::cut_tolerant(r)
                .rest_within(Duration::from_secs(10))
                .await,
            Vec::<serde_json::Value>::new()
        );
    }
}
