//! The OpenAI-compatible backend against a real local HTTP server speaking the real wire (captured
//! fixtures with their quirks), and the scripted backend producing the same chunk shapes.

// Helpers outside #[test] fns are not covered by clippy's allow-*-in-tests settings.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use agent_runtime_core::Error;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_core::llm::wire::EMPTY_STREAM;
use agent_runtime_core::llm::{
    Capabilities, ChatMessage, ChatRequest, ChatToolCall, Chunk, Completion, FinishReason, LlmBackend,
    ModelContext, OpenAiBackend, OpenAiConfig, Script, ScriptedBackend, ToolChoice,
};
use agent_runtime_core::protocol::ToolSpec;
use agent_runtime_core::session::Usage;
use futures::StreamExt;
use serde_json::json;

const TEXT_LCP: &[u8] = include_bytes!("fixtures/llm-wire/llama-cpp-python-text.sse");
const TOOL_LCP: &[u8] = include_bytes!("fixtures/llm-wire/llama-cpp-python-named-tool.sse");
const TOOL_LCP_REQUEST: &str = include_str!("fixtures/llm-wire/llama-cpp-python-named-tool.request.json");
const TEXT_LLAMA_SERVER: &[u8] = include_bytes!("fixtures/llm-wire/llama-server-text-with-usage.sse");

/// Small timeouts and backoffs so failure paths run in milliseconds; breaker off unless a test
/// turns it on.
fn config(url: String) -> OpenAiConfig {
    OpenAiConfig {
        base_url: url,
        model: "smollm2-135m-instruct".to_string(),
        api_key: None,
        connect_timeout: Duration::from_secs(1),
        first_byte_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
        max_answer: Duration::from_secs(10),
        max_retries: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        breaker_threshold: 0,
        breaker_cooldown: Duration::from_millis(300),
        capabilities: Capabilities::default(),
    }
}

fn backend(url: String) -> OpenAiBackend {
    OpenAiBackend::new(config(url)).unwrap()
}

fn ask() -> ChatRequest {
    ChatRequest::new(vec![
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("What is the capital of France?"),
    ])
}

fn paris() -> Completion {
    Completion {
        text: "The capital of France is Paris.".to_string(),
        tool_calls: vec![],
        usage: None,
        finish: FinishReason::Stop,
    }
}

fn weather_call() -> Completion {
    Completion {
        text: String::new(),
        tool_calls: vec![ChatToolCall::new(
            "call__0_get_weather_cmpl-682b634e-d9c0-49bd-93e4-a90ae0ffbd49",
            "get_weather",
            r#"{ "city": "Paris" }"#,
        )],
        usage: None,
        finish: FinishReason::ToolCalls,
    }
}

fn llm_error(result: Result<Completion, Error>) -> String {
    match result {
        Err(Error::Llm(message)) => message,
        other => panic!("expected an Llm error, got {other:?}"),
    }
}

/// `message` with the seconds of its `(after N attempts, X s in all)` replaced by `N`.
fn mask_seconds(message: &str) -> (String, f64) {
    let at = message.rfind(" s in all").unwrap();
    let start = message[..at].rfind(' ').unwrap() + 1;
    let seconds: f64 = message[start..at].parse().unwrap();
    (format!("{}N{}", &message[..start], &message[at..]), seconds)
}

/// The fixture up to (not including) the event holding `marker`: a stream cut after some tokens.
fn cut_before(body: &[u8], marker: &str) -> Vec<u8> {
    let text = std::str::from_utf8(body).unwrap();
    let at = text.find(marker).unwrap();
    let event_start = text[..at].rfind("data:").unwrap();
    body[..event_start].to_vec()
}

/// In a module named `llm` so `cargo test --lib llm --test llm_openai` runs them too.
mod llm {
    use super::*;

    #[tokio::test]
    async fn each_captured_stream_parses_to_its_exact_completion() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        let cases = [
            (TEXT_LCP, paris()),
            (TOOL_LCP, weather_call()),
            (
                TEXT_LLAMA_SERVER,
                Completion {
                    usage: Some(Usage {
                        prompt_tokens: 32,
                        completion_tokens: 8,
                        ..Default::default()
                    }),
                    ..paris()
                },
            ),
        ];
        for (body, expected) in cases {
            mock.push(MockResponse::sse(body));
            assert_eq!(backend.complete(ask()).await.unwrap(), expected);
        }
    }

    #[tokio::test]
    async fn streams_split_byte_by_byte_parse_like_whole_ones_even_inside_cyrillic() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        for (body, expected) in [(TEXT_LCP, paris()), (TOOL_LCP, weather_call())] {
            mock.push(MockResponse::sse(body).split_every(1));
            assert_eq!(backend.complete(ask()).await.unwrap(), expected);
        }
        let russian = Script::text("Привет, мир! Столица Франции — Париж.");
        let crlf_body = russian.sse_body("m").replace('\n', "\r\n");
        mock.push(MockResponse::sse(crlf_body).split_every(1));
        assert_eq!(
            backend.complete(ask()).await.unwrap(),
            Completion {
                text: "Привет, мир! Столица Франции — Париж.".to_string(),
                tool_calls: vec![],
                usage: None,
                finish: FinishReason::Stop,
            }
        );
    }

    #[tokio::test]
    async fn the_request_body_matches_what_the_real_server_was_sent() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(format!("{}/v1/", mock.url()));
        mock.push(MockResponse::sse(TOOL_LCP));
        let request = ChatRequest::new(vec![
            ChatMessage::system("You are a helpful assistant that can call tools."),
            ChatMessage::user("What is the weather in Paris right now?"),
        ])
        .with_tools(vec![ToolSpec {
            name: "get_weather".into(),
            description: "Get the current weather for a city".into(),
            parameters: json!({"type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"]}),
        }])
        .with_tool_choice(ToolChoice::Function("get_weather".into()))
        .with_temperature(0.0)
        .with_max_tokens(128);
        assert_eq!(backend.complete(request).await.unwrap(), weather_call());

        let mut expected: serde_json::Value = serde_json::from_str(TOOL_LCP_REQUEST).unwrap();
        expected["temperature"] = json!(0.0);
        assert_eq!(mock.requests(), vec![expected]);
        let recorded = mock.recorded_requests();
        assert_eq!(recorded[0].path, "/v1/chat/completions");
        assert_eq!(recorded[0].header("authorization"), None);
    }

    #[tokio::test]
    async fn tool_history_is_sent_with_empty_content_and_the_key_as_bearer() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = OpenAiBackend::new(OpenAiConfig {
            api_key: Some("sk-test".into()),
            ..config(mock.url())
        })
        .unwrap();
        mock.push(MockResponse::sse(TEXT_LCP));
        let request = ChatRequest::new(vec![
            ChatMessage::user("Weather in Paris?"),
            ChatMessage::assistant_with_tool_calls(
                "",
                vec![ChatToolCall::new("call_1", "get_weather", r#"{"city":"Paris"}"#)],
            ),
            ChatMessage::tool("call_1", "sunny, 21 °C"),
        ])
        .with_tools(vec![ToolSpec {
            name: "get_weather".into(),
            description: "Weather".into(),
            parameters: json!({"type": "object"}),
        }])
        .with_temperature(0.2);
        backend.complete(request).await.unwrap();
        assert_eq!(
            mock.requests(),
            vec![json!({
                "model": "smollm2-135m-instruct",
                "stream": true,
                "stream_options": {"include_usage": true},
                "temperature": 0.2,
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"},
                ],
                "tools": [{"type": "function", "function": {
                    "name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}}],
                "tool_choice": "auto",
            })]
        );
        assert_eq!(
            mock.recorded_requests()[0].header("Authorization"),
            Some("Bearer sk-test")
        );
    }

    #[tokio::test]
    async fn a_server_ignoring_include_usage_is_no_longer_asked() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        assert!(backend.capabilities().usage_reporting);
        mock.push(MockResponse::sse(TEXT_LCP));
        mock.push(MockResponse::sse(TEXT_LCP));
        backend.complete(ask()).await.unwrap();
        backend.complete(ask()).await.unwrap();
        assert!(!backend.capabilities().usage_reporting);
        let sent: Vec<bool> = mock
            .requests()
            .iter()
            .map(|r| r.get("stream_options").is_some())
            .collect();
        assert_eq!(sent, vec![true, false]);
    }

    #[tokio::test]
    async fn a_stream_cut_midway_is_an_error_not_a_short_answer() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        mock.push(MockResponse::sse(cut_before(TEXT_LCP, "\" France\"")));
        mock.push(MockResponse::sse(TEXT_LCP));
        let mut stream = backend.stream(ask()).await.unwrap();
        let mut items = Vec::new();
        while let Some(item) = stream.next().await {
            items.push(item);
        }
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Text("The".into())),
                Ok(Chunk::Text(" capital".into())),
                Ok(Chunk::Text(" of".into())),
                Err(Error::Llm("stream ended without [DONE] or finish_reason".into())),
            ]
        );
        assert_eq!(mock.request_count(), 1, "no retry once tokens were streamed");
    }

    #[tokio::test]
    async fn a_transfer_broken_after_the_first_token_is_not_retried() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        mock.push(MockResponse::sse(cut_before(TEXT_LCP, "\" France\"")).then_abort());
        mock.push(MockResponse::sse(TEXT_LCP));
        let message = llm_error(backend.complete(ask()).await);
        assert!(message.starts_with("model stream broke:"), "{message}");
        assert_eq!(mock.request_count(), 1);
        assert_eq!(mock.remaining(), 1);
    }

    #[tokio::test]
    async fn llama_cpp_pythons_empty_answer_to_a_long_prompt_is_context_too_large() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        let captured = include_str!("fixtures/llm-wire/llama-cpp-python-context-overflow.response");
        let head = captured.replace("connection: keep-alive", "connection: close");
        mock.push(MockResponse::raw(format!("{head}0\r\n\r\n")));
        mock.push(MockResponse::empty());
        for _ in 0..2 {
            assert_eq!(
                backend.complete(ask()).await,
                Err(Error::ContextTooLarge(EMPTY_STREAM.to_string()))
            );
        }
        assert_eq!(mock.request_count(), 2, "not retried");
    }

    #[tokio::test]
    async fn a_context_length_error_status_is_context_too_large_and_not_retried() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        let body = r#"{"error":{"message":"This model's maximum context length is 4096 tokens. However, you requested 5030 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        mock.push(MockResponse::status(400, body));
        assert_eq!(
            backend.complete(ask()).await,
            Err(Error::ContextTooLarge(format!(
                "the model server refused the prompt as longer than its context (400 Bad Request): {body}"
            )))
        );
        assert_eq!(mock.request_count(), 1);
    }

    #[tokio::test]
    async fn an_error_event_and_invalid_json_in_the_stream_are_errors() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        mock.push(MockResponse::sse(
            "data: {\"error\": {\"message\": \"Requested tokens exceed context window\"}}\n\n",
        ));
        mock.push(MockResponse::sse("data: {\"choices\": [{\"delta\": \n\n"));
        assert_eq!(
            backend.complete(ask()).await,
            Err(Error::ContextTooLarge(
                "the model server refused the prompt as longer than its context: Requested tokens exceed context window".into()
            ))
        );
        let message = llm_error(backend.complete(ask()).await);
        assert!(message.starts_with("invalid JSON in stream:"), "{message}");
        assert_eq!(mock.request_count(), 2);
    }

    #[tokio::test]
    async fn a_500_then_a_429_with_retry_after_then_success_is_one_completion() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        mock.push(MockResponse::status(500, r#"{"error":"boom"}"#));
        mock.push(MockResponse::status(429, r#"{"error":"slow down"}"#).header("Retry-After", "1"));
        mock.push(MockResponse::sse(TEXT_LLAMA_SERVER));
        let completion = backend.complete(ask()).await.unwrap();
        assert_eq!(completion.text, "The capital of France is Paris.");
        assert_eq!(mock.request_count(), 3);
    }

    #[tokio::test]
    async fn retries_give_up_with_the_last_status_and_body() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = OpenAiBackend::new(OpenAiConfig {
            max_retries: 1,
            ..config(mock.url())
        })
        .unwrap();
        mock.push(MockResponse::status(503, "loading model"));
        mock.push(MockResponse::status(502, "bad gateway"));
        let (message, seconds) = mask_seconds(&llm_error(backend.complete(ask()).await));
        assert_eq!(
            message,
            "model server answered 502 Bad Gateway: bad gateway (after 2 attempts, N s in all)"
        );
        assert!(seconds < 5.0, "{seconds}");
        mock.push(MockResponse::status(
            400,
            r#"{"error":{"message":"bad request"}}"#,
        ));
        assert_eq!(
            llm_error(backend.complete(ask()).await),
            r#"model server answered 400 Bad Request: {"error":{"message":"bad request"}}"#
        );
        assert_eq!(mock.request_count(), 3, "a 400 is not retried");
    }

    #[tokio::test]
    async fn connection_errors_are_retried_then_reported() {
        let mock = MockLlmServer::start().await.unwrap();
        let up = backend(mock.url());
        mock.push(MockResponse::reset());
        mock.push(MockResponse::sse(TEXT_LCP));
        assert_eq!(up.complete(ask()).await.unwrap(), paris());
        assert_eq!(mock.request_count(), 2);

        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let down = backend(format!("http://{closed}"));
        let (message, _) = mask_seconds(&llm_error(down.complete(ask()).await));
        assert!(
            message.starts_with("cannot connect to the model server: ")
                && message.ends_with("(after 4 attempts, N s in all)"),
            "{message}"
        );
        assert!(down.health().await.is_err());
        assert_eq!(up.health().await, Ok(()));
    }

    #[tokio::test]
    async fn a_stalled_stream_fails_on_the_idle_timeout() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = OpenAiBackend::new(OpenAiConfig {
            idle_timeout: Duration::from_millis(300),
            ..config(mock.url())
        })
        .unwrap();
        mock.push(MockResponse::sse(cut_before(TEXT_LCP, "\" of\"")).then_stall());
        let items: Vec<_> = backend.stream(ask()).await.unwrap().collect().await;
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Text("The".into())),
                Ok(Chunk::Text(" capital".into())),
                Err(Error::Llm("model stream idle for 0.3 s".into())),
            ]
        );
    }

    #[tokio::test]
    async fn a_finish_reason_followed_by_a_stall_is_a_complete_answer() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = OpenAiBackend::new(OpenAiConfig {
            idle_timeout: Duration::from_millis(300),
            ..config(mock.url())
        })
        .unwrap();
        mock.push(MockResponse::sse(cut_before(TEXT_LCP, "[DONE]")).then_stall());
        assert_eq!(backend.complete(ask()).await.unwrap(), paris());
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_on_the_first_byte_timeout() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = OpenAiBackend::new(OpenAiConfig {
            first_byte_timeout: Duration::from_millis(300),
            ..config(mock.url())
        })
        .unwrap();
        mock.push(MockResponse::hang());
        assert_eq!(
            llm_error(backend.complete(ask()).await),
            "the model server accepted the request but sent nothing within 0.3 s (LLM_FIRST_BYTE_TIMEOUT_SECS)"
        );
        assert_eq!(mock.request_count(), 1);
    }

    #[tokio::test]
    async fn health_gives_up_on_a_server_that_accepts_and_never_answers_within_its_own_deadline() {
        let mock = MockLlmServer::start().await.unwrap();
        mock.answer("GET", "/v1/models", MockResponse::hang());
        let backend = backend(mock.url());
        let started = std::time::Instant::now();
        assert_eq!(
            backend.health().await,
            Err(Error::Llm(
                "the model server did not answer GET /v1/models within 2 s".into()
            ))
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn the_context_size_is_read_where_each_kind_of_server_states_it() {
        let cases = [
            (
                "GET",
                "/props",
                r#"{"default_generation_settings":{"n_ctx":4096,"params":{}},"total_slots":1}"#,
                Some(ModelContext::new(4096, "llama.cpp server's /props n_ctx")),
            ),
            (
                "GET",
                "/v1/models",
                r#"{"object":"list","data":[{"id":"other","max_model_len":1024},{"id":"smollm2-135m-instruct","object":"model","max_model_len":32768}]}"#,
                Some(ModelContext::new(
                    32768,
                    "the model server's /v1/models max_model_len",
                )),
            ),
            (
                "POST",
                "/api/show",
                r#"{"parameters":"stop \"<|im_end|>\"\nnum_ctx 8192","model_info":{"qwen2.context_length":32768}}"#,
                Some(ModelContext::new(8192, "Ollama's /api/show num_ctx")),
            ),
            (
                "POST",
                "/api/show",
                r#"{"model_info":{"general.architecture":"qwen2","qwen2.context_length":32768}}"#,
                Some(ModelContext::new(32768, "Ollama's /api/show context_length")),
            ),
            // Not Ollama (no GET /api/version): /api/show is never asked.
            (
                "POST",
                "/api/show",
                r#"{"model_info":{"qwen2.context_length":32768}}"#,
                None,
            ),
            // llama-cpp-python's list says nothing of the context.
            (
                "GET",
                "/v1/models",
                r#"{"object":"list","data":[{"id":"smollm2-135m-instruct","object":"model","owned_by":"me","permissions":[]}]}"#,
                None,
            ),
        ];
        for (method, path, body, expected) in cases {
            let mock = MockLlmServer::start().await.unwrap();
            mock.answer(method, path, MockResponse::status(200, body));
            if path == "/api/show" && expected.is_some() {
                mock.answer(
                    "GET",
                    "/api/version",
                    MockResponse::status(200, r#"{"version":"0.5.7"}"#),
                );
            }
            let backend = backend(mock.url());
            assert_eq!(backend.context_size().await, Ok(expected), "{method} {path}");
        }
    }

    #[tokio::test]
    async fn a_server_that_hangs_when_asked_its_context_size_delays_start_up_only_briefly() {
        let mock = MockLlmServer::start().await.unwrap();
        mock.answer("GET", "/props", MockResponse::hang());
        let backend = backend(mock.url());
        let started = std::time::Instant::now();
        assert_eq!(
            backend.context_size().await,
            Err(Error::Llm(
                "the model server did not say its context size within 3 s".into()
            ))
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_slow_drip_within_the_idle_timeout_is_fine() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = backend(mock.url());
        mock.push(
            MockResponse::sse(TEXT_LLAMA_SERVER)
                .split_at(vec![100, 900, 1700])
                .drip(Duration::from_millis(30)),
        );
        assert_eq!(backend.complete(ask()).await.unwrap().text, paris().text);
    }

    #[tokio::test]
    async fn the_circuit_opens_after_repeated_failures_and_half_opens_after_the_cooldown() {
        let mock = MockLlmServer::start().await.unwrap();
        let backend = OpenAiBackend::new(OpenAiConfig {
            max_retries: 0,
            breaker_threshold: 2,
            breaker_cooldown: Duration::from_millis(300),
            ..config(mock.url())
        })
        .unwrap();
        mock.push(MockResponse::status(500, "down"));
        mock.push(MockResponse::status(500, "down"));
        llm_error(backend.complete(ask()).await);
        llm_error(backend.complete(ask()).await);
        let message = llm_error(backend.complete(ask()).await);
        assert!(
            message.starts_with("circuit open: backend failed 2 times, retry after"),
            "{message}"
        );
        assert_eq!(mock.request_count(), 2, "an open circuit sends nothing");

        // Half-open: one trial; it fails, so the circuit opens again at once.
        tokio::time::sleep(Duration::from_millis(350)).await;
        mock.push(MockResponse::status(503, "still down"));
        llm_error(backend.complete(ask()).await);
        assert!(llm_error(backend.complete(ask()).await).starts_with("circuit open"));
        assert_eq!(mock.request_count(), 3);

        // The next trial succeeds and closes it.
        tokio::time::sleep(Duration::from_millis(350)).await;
        mock.push(MockResponse::sse(TEXT_LCP));
        mock.push(MockResponse::sse(TEXT_LCP));
        assert_eq!(backend.complete(ask()).await.unwrap(), paris());
        assert_eq!(backend.complete(ask()).await.unwrap(), paris());
        assert_eq!(mock.request_count(), 5);
    }

    #[tokio::test]
    async fn the_scripted_backend_and_the_openai_backend_stream_the_same_chunks() {
        let script = Script::tool_call("read_file", json!({"path": "src/lib.rs", "limit": 200}))
            .and_raw_tool_call("write_file", "{not json")
            .with_text("Reading it now.")
            .usage(Usage {
                prompt_tokens: 40,
                completion_tokens: 12,
                ..Default::default()
            });
        let mock = MockLlmServer::start().await.unwrap();
        mock.push(MockResponse::script(&script));
        let over_http: Vec<Chunk> = backend(mock.url())
            .stream(ask())
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await;
        let scripted = ScriptedBackend::new(vec![script.clone()]);
        let replayed: Vec<Chunk> = scripted
            .stream(ask())
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert_eq!(over_http, replayed);
        assert_eq!(over_http, script.chunks());
        assert_eq!(scripted.requests(), vec![ask()]);

        let scripted = ScriptedBackend::new(vec![script]);
        assert_eq!(
            scripted.complete(ask()).await.unwrap(),
            Completion {
                text: "Reading it now.".into(),
                tool_calls: vec![
                    ChatToolCall::new("call_0", "read_file", r#"{"limit":200,"path":"src/lib.rs"}"#),
                    ChatToolCall::new("call_1", "write_file", "{not json"),
                ],
                usage: Some(Usage {
                    prompt_tokens: 40,
                    completion_tokens: 12,
                    ..Default::default()
                }),
                finish: FinishReason::ToolCalls,
            }
        );
    }
}
