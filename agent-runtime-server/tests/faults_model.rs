//! Model faults (API.md §1.1 `LLM_ERROR`, §9.1): a model server that hangs, resets the connection,
//! answers 429 with `Retry-After`, sends invalid JSON, or streams forever. Each call ends in
//! bounded time with `LLM_ERROR`, or succeeds after a retry; through the server, a failed turn is
//! an `error` event then `done: error`, and the session takes the next message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use std::time::Duration;

use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_core::llm::{
    ChatMessage, ChatRequest, Chunk, LlmBackend, OpenAiBackend, OpenAiConfig, Script,
};
use common::*;
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Far above every timeout below: a call still running then is a hang.
const BOUND: Duration = Duration::from_secs(20);

fn backend(url: &str) -> OpenAiBackend {
    OpenAiBackend::new(OpenAiConfig {
        base_url: url.to_string(),
        model: "mock-model".into(),
        first_byte_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        max_retries: 2,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        breaker_threshold: 0,
        ..OpenAiConfig::default()
    })
    .unwrap()
}

/// One call, read to the end: the text, or the error code and message.
async fn call(b: &OpenAiBackend) -> Result<String, (String, String)> {
    let run = async {
        let mut stream = b
            .stream(ChatRequest::new(vec![ChatMessage::user("hi")]))
            .await
            .map_err(|e| (e.code().to_string(), e.to_string()))?;
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            if let Chunk::Text(t) = chunk.map_err(|e| (e.code().to_string(), e.to_string()))? {
                text.push_str(&t);
            }
        }
        Ok(text)
    };
    tokio::time::timeout(BOUND, run)
        .await
        .expect("the call ends in bounded time")
}

/// The first half of a streamed answer: some tokens, no finish.
fn half_answer() -> Vec<u8> {
    let body = Script::text("a b c d e f g h i j k l").sse_body("m");
    let events: Vec<&str> = body.split_inclusive("\n\n").collect();
    events[..events.len() / 2].concat().into_bytes()
}

fn ok_answer() -> MockResponse {
    MockResponse::script(&Script::text("recovered fine"))
}

#[tokio::test]
async fn transient_faults_before_the_first_token_are_retried() {
    for (what, fault) in [
        ("reset", MockResponse::reset()),
        ("500", MockResponse::status(500, "oops")),
        ("503", MockResponse::status(503, "busy")),
        (
            "429 with Retry-After",
            MockResponse::status(429, r#"{"error":{"message":"slow down"}}"#).header("Retry-After", "1"),
        ),
    ] {
        let llm = MockLlmServer::start().await.unwrap();
        llm.push(fault);
        llm.push(ok_answer());
        let b = backend(&llm.url());
        assert_eq!(call(&b).await, Ok("recovered fine".to_string()), "{what}");
        assert_eq!(llm.request_count(), 2, "{what}: one retry");
    }
}

#[tokio::test]
async fn persistent_faults_end_with_llm_error() {
    let cases: Vec<(&str, Vec<MockResponse>)> = vec![
        ("always reset", vec![MockResponse::reset(); 3]),
        // A model that accepts the request and says nothing is not retried (it may be working on
        // a long prompt): the call fails at the first-byte timeout.
        ("hang", vec![MockResponse::hang()]),
        (
            "always 429",
            vec![MockResponse::status(429, "no").header("Retry-After", "0"); 3],
        ),
        (
            "Retry-After too long",
            vec![MockResponse::status(429, "no").header("Retry-After", "3600")],
        ),
        (
            "invalid JSON chunk",
            vec![MockResponse::sse("data: {not json\n\n")],
        ),
        (
            "JSON of the wrong shape",
            vec![MockResponse::sse("data: {\"choices\": 5}\n\n")],
        ),
        (
            "cut mid-answer",
            vec![MockResponse::sse(half_answer()).then_abort()],
        ),
        (
            "stalls mid-answer",
            vec![MockResponse::sse(half_answer()).then_stall()],
        ),
        ("400", vec![MockResponse::status(400, "bad request")]),
    ];
    for (what, responses) in cases {
        let llm = MockLlmServer::start().await.unwrap();
        let n = responses.len();
        for r in responses {
            llm.push(r);
        }
        let b = backend(&llm.url());
        let got = call(&b).await;
        assert_eq!(
            got.as_ref().map_err(|(code, _)| code.as_str()),
            Err("LLM_ERROR"),
            "{what}: {got:?}"
        );
        assert_eq!(llm.request_count(), n, "{what}: attempts");
    }
}

/// A model server that streams forever: a token, then tokens (or only SSE comments) every 20 ms,
/// never a finish.
async fn endless_server(comments_only: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let token = "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hm\"},\"finish_reason\":null}]}\n\n";
                let _ = sock
                    .write_all(format!("{:x}\r\n{token}\r\n", token.len()).as_bytes())
                    .await;
                loop {
                    let piece = if comments_only {
                        ": still thinking\n\n".to_string()
                    } else {
                        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"la \"},\"finish_reason\":null}]}\n\n".to_string()
                    };
                    let frame = format!("{:x}\r\n{piece}\r\n", piece.len());
                    if sock.write_all(frame.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_empty_200_is_read_as_a_prompt_longer_than_the_context() {
    let llm = MockLlmServer::start().await.unwrap();
    llm.push(MockResponse::empty());
    let b = backend(&llm.url());
    assert_eq!(
        call(&b).await,
        Err((
            "CONTEXT_TOO_LARGE".to_string(),
            agent_runtime_core::llm::wire::EMPTY_STREAM.to_string()
        ))
    );
    assert_eq!(llm.request_count(), 1, "not retried");
}

/// The events of a stream without what varies from run to run (`seq`, timestamps, usage).
fn steady(events: &[serde_json::Value]) -> Vec<serde_json::Value> {
    events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            if let Some(o) = e.as_object_mut() {
                for k in ["seq", "timestamp", "usage", "session_id", "event_id"] {
                    o.remove(k);
                }
            }
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_server_that_accepts_and_never_answers_costs_seconds_not_minutes_and_says_so() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[
            ("ROUTING_TIMEOUT_SECS", "1"),
            ("LLM_FIRST_BYTE_TIMEOUT_SECS", "2"),
        ],
    )
    .await;
    let id = s.session(json!({})).await;
    llm.push(MockResponse::hang());
    llm.push(MockResponse::hang());
    let started = std::time::Instant::now();
    let events = s
        .send(
            &id,
            json!({"type": "user_message", "content": "Implement a login form"}),
        )
        .await;
    let elapsed = started.elapsed();
    let mut got = steady(&events);
    let message = got[1]["message"].as_str().unwrap_or_default().to_string();
    let at = message.rfind(" s in all").unwrap_or(0);
    let start = message[..at].rfind(' ').map_or(0, |i| i + 1);
    let seconds: f64 = message[start..at].parse().unwrap_or(-1.0);
    got[1]["message"] = json!(format!("{}N{}", &message[..start], &message[at..]));
    assert_eq!(
        got[1]["content"],
        json!(message),
        "older clients read the same text as content"
    );
    got[1]["content"] = got[1]["message"].clone();
    assert_eq!(
        got,
        vec![
            json!({"type": "agent_switched", "from_agent": "orchestrator", "to_agent": "coder", "is_final": false,
                   "reason": "Keyword routing (router unreachable: no answer within 1 s): the request asks for code"}),
            json!({"type": "error", "code": "LLM_ERROR", "is_final": true,
                   "message": "the model server accepted the request but sent nothing within 2 s (LLM_FIRST_BYTE_TIMEOUT_SECS); the turn ran N s in all",
                   "content": "the model server accepted the request but sent nothing within 2 s (LLM_FIRST_BYTE_TIMEOUT_SECS); the turn ran N s in all"}),
            json!({"type": "done", "stop_reason": "error", "is_final": true}),
        ],
        "{events:#?}"
    );
    // The wait it states is the routing deadline plus the first-byte limit; the client's the same.
    assert!((3.0..BOUND.as_secs_f64()).contains(&seconds), "{seconds}");
    assert!(elapsed < BOUND, "{elapsed:?}");
    assert_eq!(llm.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_a_model_server_that_accepts_and_never_answers_within_about_two_seconds() {
    let llm = MockLlmServer::start().await.unwrap();
    llm.answer("GET", "/v1/models", MockResponse::hang());
    let s = Server::start(&llm.url()).await;
    // Serving for sure (start-up asked the same hanging server for its context size first).
    s.session(json!({})).await;
    let started = std::time::Instant::now();
    let health: serde_json::Value = s.get_json("/health").await;
    let elapsed = started.elapsed();
    // The sandbox's figures are the kernel's (http_api.rs checks them); the rest is this test's.
    assert_eq!(health["sandbox"]["mode"], "enforce");
    assert_eq!(
        health,
        json!({"status": "degraded", "service": "agent-runtime", "version": env!("CARGO_PKG_VERSION"),
               "dependencies": {"sqlite": "connected", "llm_proxy": "unavailable"},
               "multi_agent": {"enabled": true, "default_agent": "orchestrator", "agents_count": 5},
               "sandbox": health["sandbox"].clone(),
               "process": {"id": health["process"]["id"].clone(), "turns": 0}})
    );
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[tokio::test]
async fn a_model_that_sends_only_comments_after_a_token_times_out() {
    let b = backend(&endless_server(true).await);
    let got = call(&b).await;
    assert_eq!(got.map_err(|(c, _)| c), Err("LLM_ERROR".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_streaming_forever_is_stopped_by_cancel() {
    let url = endless_server(false).await;
    let s = Server::start_with(&url, None, &[("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false")]).await;
    let id = s.session(json!({})).await;
    let r = s
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "sing"}}),
        )
        .send()
        .await
        .unwrap();
    let mut rec = fault_support::EventStream::cut_tolerant(r);
    for _ in 0..20 {
        rec.next().await.unwrap();
    }
    let cancel = s
        .post(&format!("/sessions/{id}/cancel"), json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let events = rec.rest_within(BOUND).await;
    assert_eq!(kinds(&events).last().unwrap(), "done:cancelled");
    let session: serde_json::Value = s.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(session["status"], "idle");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_model_ends_the_turn_with_an_error_event_and_the_session_goes_on() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false")],
    )
    .await;
    let id = s.session(json!({})).await;
    // Invalid JSON mid-stream: the error arrives as an event after the stream started.
    llm.push(MockResponse::sse(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {oops\n\n",
    ));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "hi"}))
        .await;
    let k = kinds(&events);
    assert_eq!(&k[k.len() - 2..], ["error", "done:error"], "{events:#?}");
    assert_eq!(find(&events, "error")["code"], "LLM_ERROR");
    // 429 with Retry-After, then an answer: the turn succeeds after the wait.
    llm.push(MockResponse::status(429, "slow down").header("Retry-After", "1"));
    llm.push(MockResponse::script(&Script::text("after the wait")));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "again"}))
        .await;
    assert_eq!(kinds(&events), ["assistant_final", "done:completed"]);
    let stored = fault_support::stored(&s, &id).await;
    fault_support::assert_history_valid(&stored.messages, "model faults");
    assert_eq!(fault_support::user_texts(&stored.messages), ["hi", "again"]);
}
