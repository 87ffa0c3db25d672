//! Concurrency (API.md §4, §5.4): 200 sessions driven at once, duplicate submissions with one
//! `request_id`, messages racing into one session, and two server processes on one Postgres.
//! Invariants: one turn at a time per session (`SESSION_BUSY` otherwise), no turn twice, no
//! interleaved turns, every stream equal to a contiguous run of the stored events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use fault_support::*;
use serde_json::{Value, json};

const SESSIONS: usize = 200;
const DUPLICATES: usize = 6;
const RACERS: usize = 8;

const ENV: &[(&str, &str)] = &[("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false")];

fn answer(words: usize) -> MockResponse {
    let text: String = (0..words).map(|w| format!("w{w} ")).collect();
    MockResponse::script(&Script::text(text.trim_end()))
        .split_every(40)
        .drip(Duration::from_millis(2))
}

async fn submit(s: &Server, id: &str, content: &str, request_id: Option<&str>) -> reqwest::Response {
    let mut body = json!({"session_id": id, "message": {"type": "user_message", "content": content}});
    if let Some(r) = request_id {
        body["request_id"] = json!(r);
    }
    s.post("/agent/message/stream", body).send().await.unwrap()
}

/// A stream received is a contiguous run of the stored events, and each turn in storage is whole:
/// its tokens add up to its final text, and it ends with `done` before the next turn starts.
fn assert_not_interleaved(streams: &[Vec<Value>], stored: &[Value], ctx: &str) {
    assert_received_are_stored(&streams.concat(), stored, ctx);
    for st in streams {
        let seqs: Vec<u64> = st.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{ctx}: stream {seqs:?}"
        );
    }
    let mut tokens = String::new();
    for e in stored {
        match (e["type"].as_str().unwrap(), e["is_final"] == true) {
            ("assistant_message", false) => tokens.push_str(e["token"].as_str().unwrap()),
            ("assistant_message", true) => {
                assert_eq!(
                    e["content"].as_str().unwrap(),
                    tokens,
                    "{ctx}: a turn's text is whole"
                );
                tokens.clear();
            }
            ("done", _) => assert_eq!(tokens, "", "{ctx}: a turn ended with text pending"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_sessions_at_once_each_get_one_whole_turn() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Arc::new(Server::start_with(&llm.url(), None, ENV).await);
    for _ in 0..SESSIONS {
        llm.push(answer(12));
    }
    let mut tasks = Vec::new();
    for n in 0..SESSIONS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = s.session(json!({"session_id": format!("many-{n}")})).await;
            let r = submit(&s, &id, &format!("question {n}"), None).await;
            assert_eq!(r.status(), 200);
            let events = EventStream::cut_tolerant(r)
                .rest_within(Duration::from_secs(120))
                .await;
            assert_eq!(kinds(&events), ["assistant_final", "done:completed"], "{id}");
            let stored = stored(&s, &id).await;
            assert_eq!(events, stored.events, "{id}");
            assert_not_interleaved(&[events], &stored.events, &id);
            let roles: Vec<&str> = stored
                .messages
                .iter()
                .map(|m| m["role"].as_str().unwrap())
                .collect();
            assert_eq!(roles, ["user", "assistant"], "{id}");
            assert_eq!(user_texts(&stored.messages), [format!("question {n}")]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(llm.request_count(), SESSIONS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_submissions_run_one_turn_and_all_get_its_events() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Arc::new(Server::start_with(&llm.url(), None, ENV).await);
    for round in 0..10 {
        let id = s.session(json!({})).await;
        llm.push(answer(30));
        let request_id = format!("req-{round}");
        let mut tasks = Vec::new();
        for _ in 0..DUPLICATES {
            let (s, id, request_id) = (s.clone(), id.clone(), request_id.clone());
            tasks.push(tokio::spawn(async move {
                let r = submit(&s, &id, "only once", Some(&request_id)).await;
                assert_eq!(r.status(), 200, "{:?}", r.text().await);
                EventStream::cut_tolerant(r)
                    .rest_within(Duration::from_secs(60))
                    .await
            }));
        }
        let mut streams = Vec::new();
        for t in tasks {
            streams.push(t.await.unwrap());
        }
        let stored = stored(&s, &id).await;
        for st in &streams {
            assert_eq!(
                st, &stored.events,
                "round {round}: every duplicate sees the one turn"
            );
        }
        assert_eq!(user_texts(&stored.messages), ["only once"], "round {round}");
        // Later, the same id still replays and starts nothing.
        let again = EventStream::cut_tolerant(submit(&s, &id, "only once", Some(&request_id)).await)
            .rest_within(Duration::from_secs(10))
            .await;
        assert_eq!(again, stored.events);
    }
    assert_eq!(llm.request_count(), 10, "one model call per request_id");
}

/// `RACERS` different messages fired at one session whose turn is held open by a hanging model:
/// exactly one runs, the others are `SESSION_BUSY`; then racing rounds with a model that answers,
/// where whatever wins, turns never interleave.
async fn racing(servers: &[Arc<Server>], llms: &[MockLlmServer], id: &str) {
    for llm in llms {
        llm.push(MockResponse::hang());
    }
    let mut tasks = Vec::new();
    for n in 0..RACERS {
        let at = n % servers.len();
        let s = servers[at].clone();
        let id = id.to_string();
        tasks.push(tokio::spawn(async move {
            let r = submit(&s, &id, &format!("racer {n}"), None).await;
            let status = r.status().as_u16();
            if status == 200 {
                (status, Some(r), at)
            } else {
                let (_, body) = error_of(r).await;
                assert_eq!(body["error"]["code"], "SESSION_BUSY");
                (status, None, at)
            }
        }));
    }
    let mut winners = Vec::new();
    let mut busy = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, Some(r), at) => winners.push((r, at)),
            (409, None, _) => busy += 1,
            other => panic!("unexpected {:?}", other.0),
        }
    }
    assert_eq!((winners.len(), busy), (1, RACERS - 1), "one turn at a time");
    let (r, at) = winners.pop().unwrap();
    let mut rec = EventStream::cut_tolerant(r);
    let cancel: Value = servers[at]
        .post(&format!("/sessions/{id}/cancel"), json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancel, json!({"status": "cancelled"}));
    while rec.next().await.is_some() {}
    assert_eq!(kinds(&rec.events), ["done:cancelled"]);
    let mut streams = vec![rec.events];
    // The losers' hangs are still queued: a throwaway turn on each such server takes them.
    for (s, llm) in servers.iter().zip(llms) {
        if llm.remaining() > 0 {
            let other = s.session(json!({})).await;
            let r = submit(s, &other, "drain", None).await;
            let mut rec = EventStream::cut_tolerant(r);
            while llm.remaining() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            s.post(&format!("/sessions/{other}/cancel"), json!({}))
                .send()
                .await
                .unwrap();
            while rec.next().await.is_some() {}
        }
    }

    // Rounds with answering models: any number may win (the turn may end before the next
    // arrives), but every win is one whole turn.
    for round in 0..5 {
        for llm in llms {
            for _ in 0..RACERS {
                llm.push(answer(20));
            }
        }
        let mut tasks = Vec::new();
        for n in 0..RACERS {
            let s = servers[n % servers.len()].clone();
            let id = id.to_string();
            tasks.push(tokio::spawn(async move {
                let r = submit(&s, &id, &format!("round {round} racer {n}"), None).await;
                if r.status() == 200 {
                    Some(
                        EventStream::cut_tolerant(r)
                            .rest_within(Duration::from_secs(60))
                            .await,
                    )
                } else {
                    let (status, body) = error_of(r).await;
                    assert_eq!(
                        (status, body["error"]["code"].as_str()),
                        (409, Some("SESSION_BUSY"))
                    );
                    None
                }
            }));
        }
        for t in tasks {
            if let Some(st) = t.await.unwrap() {
                assert_eq!(kinds(&st), ["assistant_final", "done:completed"]);
                streams.push(st);
            }
        }
    }
    let stored = stored(&servers[0], id).await;
    assert_not_interleaved(&streams, &stored.events, id);
    let dones = stored.events.iter().filter(|e| e["type"] == "done").count();
    assert_eq!(dones, streams.len(), "a stored turn for each 200, no more");
    assert_eq!(
        user_texts(&stored.messages).len(),
        streams.len(),
        "a user message for each 200, no more"
    );
    assert_history_valid(&stored.messages, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_messages_to_one_session_get_session_busy() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Arc::new(Server::start_with(&llm.url(), None, ENV).await);
    let id = s.session(json!({})).await;
    racing(std::slice::from_ref(&s), &[llm], &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn two_processes_on_one_postgres_keep_one_turn_per_session() {
    let (_guard, url) = postgres_url().await;
    let (la, lb) = (
        MockLlmServer::start().await.unwrap(),
        MockLlmServer::start().await.unwrap(),
    );
    let a = Arc::new(Server::start_with(&la.url(), Some(&url), ENV).await);
    let b = Arc::new(Server::start_with(&lb.url(), Some(&url), ENV).await);
    let id = a.session(json!({})).await;
    racing(&[a.clone(), b.clone()], &[la, lb], &id).await;

    // A request_id submitted on one process replays on the other.
    let (la, lb) = (
        MockLlmServer::start().await.unwrap(),
        MockLlmServer::start().await.unwrap(),
    );
    drop((a, b));
    let a = Server::start_with(&la.url(), Some(&url), ENV).await;
    let b = Server::start_with(&lb.url(), Some(&url), ENV).await;
    for round in 0..5 {
        let id = b.session(json!({})).await;
        la.push(answer(40));
        let first = EventStream::cut_tolerant(submit(&a, &id, "once", Some("shared-req")).await)
            .rest_within(Duration::from_secs(60))
            .await;
        let second = EventStream::cut_tolerant(submit(&b, &id, "once", Some("shared-req")).await)
            .rest_within(Duration::from_secs(60))
            .await;
        assert_eq!(first, second, "round {round}");
        let stored = stored(&b, &id).await;
        assert_eq!(first, stored.events);
        assert_eq!(user_texts(&stored.messages), ["once"]);
    }
    assert_eq!((la.request_count(), lb.request_count()), (5, 0));
}
