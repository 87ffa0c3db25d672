//! OpenTelemetry export through the real server to a real OTLP/HTTP receiver in the test (protobuf
//! decoded with the OpenTelemetry proto types): the span tree of a turn, metrics, a dead collector.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_core::session::Usage;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// What the receiver got: every span, and per metric name its histogram data points' counts.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    service_names: Arc<Mutex<BTreeSet<String>>>,
    histogram_counts: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Per request: its path and its `api-key` and `x-tenant` headers (empty when absent).
    headers: Arc<Mutex<BTreeSet<(String, String, String)>>>,
}

/// An OTLP/HTTP receiver on 127.0.0.1; `hang` answers nothing, ever (a stuck collector).
struct Collector {
    url: String,
    got: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn collector(hang: bool) -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got = Received::default();
    let shared = got.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let got = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let got = got.clone();
                    async move {
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        let path = req.uri().path().to_string();
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default()
                        };
                        let seen = (path.clone(), header("api-key"), header("x-tenant"));
                        got.headers.lock().unwrap().insert(seen);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        got.take(&path, &body);
                        let mut r = hyper::Response::new(Full::new(Bytes::new()));
                        r.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    Collector { url, got, task }
}

impl Received {
    fn take(&self, path: &str, body: &[u8]) {
        match path {
            "/v1/traces" => {
                let req = ExportTraceServiceRequest::decode(body).unwrap();
                for rs in req.resource_spans {
                    if let Some(r) = &rs.resource {
                        for kv in &r.attributes {
                            if kv.key == "service.name" {
                                let v = json_of(kv.value.as_ref());
                                self.service_names
                                    .lock()
                                    .unwrap()
                                    .insert(v.as_str().unwrap().into());
                            }
                        }
                    }
                    for ss in rs.scope_spans {
                        self.spans.lock().unwrap().extend(ss.spans);
                    }
                }
            }
            "/v1/metrics" => {
                let req = ExportMetricsServiceRequest::decode(body).unwrap();
                let mut counts = self.histogram_counts.lock().unwrap();
                for rm in req.resource_metrics {
                    for sm in rm.scope_metrics {
                        for m in sm.metrics {
                            if let Some(metric::Data::Histogram(h)) = m.data {
                                // Cumulative temporality: the newest export holds the totals.
                                let total = h.data_points.iter().map(|p| p.count).sum();
                                counts.insert(m.name, total);
                            }
                        }
                    }
                }
            }
            other => panic!("unexpected OTLP path {other}"),
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn json_of(v: Option<&AnyValue>) -> Value {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(|v| json_of(Some(v))).collect())
        }
        other => json!(format!("{other:?}")),
    }
}

fn attrs(span: &Span) -> BTreeMap<String, Value> {
    span.attributes
        .iter()
        .map(|kv| (kv.key.clone(), json_of(kv.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits (bounded) until `ready` holds for what the receiver got; the export runs on its own
/// schedule, so this waits for arrival, it does not time anything.
async fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    for _ in 0..600 {
        if let Some(v) = probe() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} never arrived");
}

fn scripted(script: Script) -> MockResponse {
    MockResponse::script(&script.usage(Usage {
        prompt_tokens: 10,
        completion_tokens: 3,
        cached_prompt_tokens: 0,
    }))
}

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";
const RESUME_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const RESUME_SPAN: &str = "00f067aa0ba902b7";

/// The spans of one trace as `(name, parent's name)` lines, sorted; the client's span is
/// `client`.
fn tree(spans: &[Span], trace: &str, client_span: &str) -> Vec<(String, String)> {
    let names: BTreeMap<String, String> = spans.iter().map(|s| (hex(&s.span_id), s.name.clone())).collect();
    let mut lines: Vec<(String, String)> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace)
        .map(|s| {
            let parent = hex(&s.parent_span_id);
            let parent = if parent == client_span {
                "client".to_string()
            } else {
                names
                    .get(&parent)
                    .cloned()
                    .unwrap_or_else(|| format!("? {parent}"))
            };
            (s.name.clone(), parent)
        })
        .collect();
    lines.sort();
    lines
}

fn named<'a>(spans: &'a [Span], trace: &str, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace && s.name == name)
        .collect()
}

#[tokio::test]
async fn a_routed_turn_with_a_tool_an_approval_and_its_resumption_is_exported_as_genai_span_trees() {
    let otlp = collector(false).await;
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp.url),
            ("OTEL_SERVICE_NAME", "agent-runtime-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
        ],
    )
    .await;
    let project = s.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("notes.txt"), "todo: widget").unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await;
    llm.push(scripted(Script::tool_call(
        "route",
        json!({"agent": "coder", "reason": "code work"}),
    )));
    llm.push(scripted(Script::tool_call(
        "read_file",
        json!({"path": "notes.txt"}),
    )));
    llm.push(scripted(Script::tool_call(
        "write_file",
        json!({"path": "widget.txt", "content": "widget"}),
    )));
    llm.push(scripted(Script::text("Widget written.")));

    let r = s
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "Write the widget"}}),
        )
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    let first = Sse::new(r).all().await;
    assert_eq!(
        kinds(&first),
        [
            "agent_switched",
            "tool_call",
            "tool_result",
            "tool_call",
            "done:awaiting_approval"
        ]
    );
    let call_id = first[first.len() - 2]["call_id"].as_str().unwrap().to_string();
    let r = s
        .post(
            &format!("/api/v1/sessions/{id}/hitl-decision"),
            json!({"call_id": call_id, "decision": "approve"}),
        )
        .header("traceparent", format!("00-{RESUME_TRACE}-{RESUME_SPAN}-01"))
        .send()
        .await
        .unwrap();
    let second = Sse::new(r).all().await;
    assert_eq!(
        kinds(&second),
        [
            "approval_resolved",
            "tool_result",
            "assistant_final",
            "done:completed"
        ]
    );

    let spans = wait_for("both traces", || {
        let spans = otlp.got.spans();
        let n = |t| spans.iter().filter(|s| hex(&s.trace_id) == t).count();
        (n(CLIENT_TRACE) >= 7 && n(RESUME_TRACE) >= 4).then_some(spans)
    })
    .await;
    let model = "chat gpt-4o-mini";
    let line = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        tree(&spans, CLIENT_TRACE, CLIENT_SPAN),
        [
            line("POST /agent/message/stream", "client"),
            line(model, "invoke_agent coder"),
            line(model, "invoke_agent coder"),
            line(model, "invoke_agent orchestrator"),
            line("execute_tool read_file", "invoke_agent coder"),
            line("invoke_agent coder", "POST /agent/message/stream"),
            line("invoke_agent orchestrator", "POST /agent/message/stream"),
        ]
    );
    assert_eq!(
        tree(&spans, RESUME_TRACE, RESUME_SPAN),
        [
            line("POST /sessions/{session_id}/hitl-decision", "client"),
            line(model, "invoke_agent coder"),
            line("execute_tool write_file", "invoke_agent coder"),
            line("invoke_agent coder", "POST /sessions/{session_id}/hitl-decision"),
        ]
    );
    assert_eq!(
        otlp.got.service_names.lock().unwrap().clone(),
        BTreeSet::from(["agent-runtime-under-test".to_string()])
    );

    // The routing call, whole.
    let route = named(&spans, CLIENT_TRACE, model)
        .into_iter()
        .find(|s| attrs(s)["agent_runtime.call"] == "route")
        .unwrap();
    let port = llm
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse::<i64>()
        .unwrap();
    assert_eq!(
        attrs(route),
        BTreeMap::from([
            ("agent_runtime.call".to_string(), json!("route")),
            ("gen_ai.conversation.id".to_string(), json!(id)),
            ("gen_ai.operation.name".to_string(), json!("chat")),
            ("gen_ai.provider.name".to_string(), json!("openai")),
            ("gen_ai.request.max_tokens".to_string(), json!(120)),
            ("gen_ai.request.model".to_string(), json!("gpt-4o-mini")),
            ("gen_ai.request.temperature".to_string(), json!(0.0)),
            (
                "gen_ai.response.finish_reasons".to_string(),
                json!(["tool_calls"])
            ),
            ("gen_ai.response.model".to_string(), json!("gpt-4o-mini")),
            ("gen_ai.usage.input_tokens".to_string(), json!(10)),
            ("gen_ai.usage.output_tokens".to_string(), json!(3)),
            ("server.address".to_string(), json!("127.0.0.1")),
            ("server.port".to_string(), json!(port)),
        ])
    );
    // The tool the runtime ran, whole; no content without the opt-in.
    let read = named(&spans, CLIENT_TRACE, "execute_tool read_file")[0];
    let read_call = first[1]["call_id"].as_str().unwrap();
    assert_eq!(
        attrs(read),
        BTreeMap::from([
            ("gen_ai.conversation.id".to_string(), json!(id)),
            ("gen_ai.operation.name".to_string(), json!("execute_tool")),
            ("gen_ai.tool.call.id".to_string(), json!(read_call)),
            ("gen_ai.tool.name".to_string(), json!("read_file")),
            ("gen_ai.tool.type".to_string(), json!("extension")),
        ])
    );
    // The approval: asked on the first turn's coder span, decided on the resumed one, which links
    // back to the span the turn first ran under.
    let events = |s: &Span| -> Vec<(String, BTreeMap<String, Value>)> {
        s.events
            .iter()
            .map(|e| {
                let a = e
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), json_of(kv.value.as_ref())));
                (e.name.clone(), a.collect())
            })
            .collect()
    };
    let asked = named(&spans, CLIENT_TRACE, "invoke_agent coder")[0];
    let mut asked_events = events(asked);
    asked_events[0].1.remove("agent_runtime.approval.reason");
    assert_eq!(
        asked_events,
        [(
            "agent_runtime.approval.requested".to_string(),
            BTreeMap::from([
                ("gen_ai.tool.call.id".to_string(), json!(call_id)),
                ("gen_ai.tool.name".to_string(), json!("write_file")),
            ])
        )]
    );
    let resumed = named(&spans, RESUME_TRACE, "invoke_agent coder")[0];
    assert_eq!(
        events(resumed),
        [(
            "agent_runtime.approval.decided".to_string(),
            BTreeMap::from([
                ("agent_runtime.approval.decision".to_string(), json!("approve")),
                ("gen_ai.tool.call.id".to_string(), json!(call_id)),
            ])
        )]
    );
    let origin = named(&spans, CLIENT_TRACE, "invoke_agent orchestrator")[0];
    let links: Vec<(String, String)> = resumed
        .links
        .iter()
        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
        .collect();
    assert_eq!(links, [(CLIENT_TRACE.to_string(), hex(&origin.span_id))]);
    assert_eq!(
        (
            attrs(resumed)["agent_runtime.stop_reason"].clone(),
            attrs(asked)["agent_runtime.stop_reason"].clone()
        ),
        (json!("completed"), json!("awaiting_approval"))
    );

    // The model server got each call's span as `traceparent`.
    let sent: Vec<String> = llm
        .recorded_requests()
        .iter()
        .map(|r| r.header("traceparent").unwrap_or("none").to_string())
        .collect();
    let mut chat_spans: Vec<String> = spans
        .iter()
        .filter(|s| s.name == model)
        .map(|s| format!("00-{}-{}-01", hex(&s.trace_id), hex(&s.span_id)))
        .collect();
    let mut sent_sorted = sent.clone();
    sent_sorted.sort();
    chat_spans.sort();
    assert_eq!(sent_sorted, chat_spans);
    assert_eq!(sent.len(), 4);

    // Metrics: one duration per model call, input and output token counts for each.
    let counts = wait_for("the GenAI metrics", || {
        let c = otlp.got.histogram_counts.lock().unwrap().clone();
        (c.get("gen_ai.client.operation.duration") == Some(&4)).then_some(c)
    })
    .await;
    assert_eq!(
        counts,
        BTreeMap::from([
            ("gen_ai.client.operation.duration".to_string(), 4),
            ("gen_ai.client.token.usage".to_string(), 8),
        ])
    );
}

/// A turn with a tool call through a server whose collector is `otlp_url`.
async fn turn_with_collector(otlp_url: &str, extra: &[(&str, &str)]) -> (Server, MockLlmServer) {
    let llm = MockLlmServer::start().await.unwrap();
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_url),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "300"),
        ("AGENT_RUNTIME__MULTI_AGENT_ENABLED", "false"),
    ];
    env.extend_from_slice(extra);
    let s = Server::start_with(&llm.url(), None, &env).await;
    let project = s.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("a.txt"), "a").unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await;
    for _ in 0..5 {
        llm.push(scripted(Script::tool_call("read_file", json!({"path": "a.txt"}))));
        llm.push(scripted(Script::text("Read.")));
        let events = s
            .send(&id, json!({"type": "user_message", "content": "read a.txt"}))
            .await;
        assert_eq!(
            kinds(&events),
            ["tool_call", "tool_result", "assistant_final", "done:completed"]
        );
    }
    (s, llm)
}

async fn dropped_spans(s: &Server) -> u64 {
    let text = s.get("/metrics").send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("otel_spans_dropped_total "))
        .unwrap()
        .parse()
        .unwrap()
}

/// `otel_spans_dropped_total` once it is above zero (the export thread counts on its own
/// schedule: this waits, bounded, for the count to show).
async fn counted_drops(s: &Server) -> u64 {
    for _ in 0..600 {
        let n = dropped_spans(s).await;
        if n > 0 {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    0
}

#[tokio::test]
async fn turns_complete_when_the_collector_is_down_and_the_lost_spans_are_counted() {
    // A port nobody listens on: bound, then closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (s, _llm) = turn_with_collector(&closed, &[]).await;
    let dropped = counted_drops(&s).await;
    assert!(dropped > 0, "no dropped span counted: {dropped}");
}

#[tokio::test]
async fn turns_complete_when_the_collector_hangs_and_a_full_queue_drops_spans() {
    let otlp = collector(true).await;
    let (s, _llm) = turn_with_collector(&otlp.url, &[("OTEL_BSP_MAX_QUEUE_SIZE", "4")]).await;
    let dropped = counted_drops(&s).await;
    assert!(dropped > 0, "no dropped span counted: {dropped}");
    assert_eq!(otlp.got.spans().len(), 0);
}

#[tokio::test]
async fn the_otlp_headers_variables_go_on_every_export_and_the_traces_one_wins_for_traces() {
    let otlp = collector(false).await;
    let (_s, _llm) = turn_with_collector(
        &otlp.url,
        &[
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=secret%20one, x-tenant=acme",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=traces%2Conly"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "50"),
        ],
    )
    .await;
    let seen = wait_for("exports of traces and metrics", || {
        let seen = otlp.got.headers.lock().unwrap().clone();
        let paths: BTreeSet<&str> = seen.iter().map(|(p, _, _)| p.as_str()).collect();
        (paths.len() == 2).then_some(seen)
    })
    .await;
    assert_eq!(
        seen,
        BTreeSet::from([
            ("/v1/metrics".into(), "secret one".into(), "acme".into()),
            ("/v1/traces".into(), "traces,only".into(), String::new()),
        ])
    );
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_and_no_drop_is_counted() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[("AGENT_RUNTIME__MULTI_AGENT_ENABLED", "false")],
    )
    .await;
    let id = s.session(json!({})).await;
    llm.push(scripted(Script::text("Hi.")));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "hi"}))
        .await;
    assert_eq!(kinds(&events), ["assistant_final", "done:completed"]);
    assert_eq!(dropped_spans(&s).await, 0);
    let sent: Vec<Option<String>> = llm
        .recorded_requests()
        .iter()
        .map(|r| r.header("traceparent").map(str::to_string))
        .collect();
    assert_eq!(sent, [None]);
}

#[tokio::test]
async fn content_goes_on_the_spans_only_when_the_operator_opts_in() {
    let otlp = collector(false).await;
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp.url),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true"),
            ("AGENT_RUNTIME__MULTI_AGENT_ENABLED", "false"),
            ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
        ],
    )
    .await;
    let project = s.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("a.txt"), "alpha").unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await;
    llm.push(scripted(Script::tool_call("read_file", json!({"path": "a.txt"}))));
    llm.push(scripted(Script::text("It says alpha.")));
    let events = s
        .send(
            &id,
            json!({"type": "user_message", "content": "what is in a.txt?"}),
        )
        .await;
    assert_eq!(
        kinds(&events),
        ["tool_call", "tool_result", "assistant_final", "done:completed"]
    );
    let spans = wait_for("the turn's spans", || {
        let spans = otlp.got.spans();
        let answered = spans.iter().filter(|s| s.name.starts_with("chat ")).count();
        (answered == 2 && spans.iter().any(|s| s.name == "execute_tool read_file")).then_some(spans)
    })
    .await;
    let tool = spans.iter().find(|s| s.name == "execute_tool read_file").unwrap();
    let a = attrs(tool);
    let result: Value = serde_json::from_str(a["gen_ai.tool.call.result"].as_str().unwrap()).unwrap();
    assert_eq!(
        (
            a["gen_ai.tool.call.arguments"].clone(),
            result.as_str().map(|r| r.contains("alpha"))
        ),
        (json!(r#"{"path":"a.txt"}"#), Some(true))
    );
    let mut chats: Vec<BTreeMap<String, Value>> = spans
        .iter()
        .filter(|s| s.name.starts_with("chat "))
        .map(attrs)
        .collect();
    chats.sort_by_key(|a| a["gen_ai.response.finish_reasons"].to_string());
    let output = |a: &BTreeMap<String, Value>| -> Value {
        serde_json::from_str(a["gen_ai.output.messages"].as_str().unwrap()).unwrap()
    };
    let input = |a: &BTreeMap<String, Value>| -> Value {
        let v: Value = serde_json::from_str(a["gen_ai.input.messages"].as_str().unwrap()).unwrap();
        // The system prompt is long; its role is what matters here.
        Value::Array(
            v.as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    if m["role"] == "system" {
                        json!({"role": "system"})
                    } else {
                        m.clone()
                    }
                })
                .collect(),
        )
    };
    assert_eq!(
        (input(&chats[0]), output(&chats[0])),
        (
            json!([
                {"role": "system"},
                {"role": "user", "content": "what is in a.txt?"},
                {"role": "assistant", "content": ""},
                {"role": "tool", "content": "[a.txt: lines 1-1 of 1]\nalpha"},
            ]),
            json!([{"role": "assistant", "content": "It says alpha.", "tool_calls": []}])
        )
    );
    assert_eq!(output(&chats[1])[0]["tool_calls"][0]["name"], json!("read_file"));
}

const THIRD_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
const THIRD_SPAN: &str = "10f067aa0ba902b8";

/// `message` to the session through `/agent/message/stream` as a client inside trace `trace`
/// (its span `span`, with `tracestate: rt=1`); the stream read to its end.
async fn send_traced(s: &Server, id: &str, message: Value, trace: &str, span: &str) -> Vec<Value> {
    let r = s
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": message}),
        )
        .header("traceparent", format!("00-{trace}-{span}-01"))
        .header("tracestate", "rt=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    Sse::new(r).all().await
}

/// A Streamable HTTP MCP server in the test: JSON answers only (no SSE stream, no session), one
/// tool `whoami` answering with the `traceparent`/`tracestate` headers and the `_meta` of the
/// `tools/call` request that reached it.
struct McpHttp {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for McpHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn mcp_http() -> McpHttp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map_or(Value::Null, |v| json!(v))
                    };
                    let headers =
                        json!({"traceparent": header("traceparent"), "tracestate": header("tracestate")});
                    let post = req.method() == hyper::Method::POST;
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let result = match msg["method"].as_str() {
                        Some("initialize") => Some(json!({
                            "protocolVersion": msg["params"]["protocolVersion"],
                            "capabilities": {"tools": {}},
                            "serverInfo": {"name": "trace-http", "version": "1"},
                        })),
                        Some("tools/list") => Some(json!({"tools": [{
                            "name": "whoami",
                            "description": "answers with the trace context of the call",
                            "inputSchema": {"type": "object", "properties": {}},
                        }]})),
                        Some("tools/call") => {
                            let seen = json!({"headers": headers, "meta": msg["params"]["_meta"]});
                            Some(json!({"content": [{"type": "text", "text": seen.to_string()}]}))
                        }
                        _ => None,
                    };
                    let response = match (post, result, msg.get("id")) {
                        (true, Some(result), Some(id)) => {
                            let body = json!({"jsonrpc": "2.0", "id": id, "result": result});
                            let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                            r.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/json"),
                            );
                            r
                        }
                        // A notification (or an answer) is accepted; GET and DELETE are not offered.
                        (true, _, _) => {
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::ACCEPTED;
                            r
                        }
                        (false, _, _) => {
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::METHOD_NOT_ALLOWED;
                            r
                        }
                    };
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    McpHttp { url, task }
}

fn trace_server_py() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mcp_support/trace_server.py")
        .to_string_lossy()
        .into_owned()
}

/// The `traceparent` of an exported span.
fn traceparent_of(span: &Span) -> String {
    format!("00-{}-{}-01", hex(&span.trace_id), hex(&span.span_id))
}

#[tokio::test]
async fn mcp_calls_carry_their_execute_tool_span_as_meta_over_stdio_and_as_headers_over_http() {
    let otlp = collector(false).await;
    let web = mcp_http().await;
    let llm = MockLlmServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let servers = dir.path().join("mcp.json");
    let config = json!({"mcpServers": {
        "st": {"command": "python3", "args": [trace_server_py()], "approval": "never"},
        "web": {"url": web.url, "approval": "never"},
    }});
    std::fs::write(&servers, config.to_string()).unwrap();
    let s = Server::start_with(
        &llm.url(),
        None,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp.url),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("AGENT_RUNTIME__MULTI_AGENT_ENABLED", "false"),
            ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
            ("MCP_SERVERS_FILE", servers.to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(
        s.get_json("/health").await["mcp_servers"],
        json!([
            {"name": "st", "transport": "stdio", "state": "running", "tools": 1, "restarts": 0},
            {"name": "web", "transport": "http", "state": "running", "tools": 1, "restarts": 0},
        ])
    );
    let id = s.session(json!({})).await;
    llm.push(scripted(Script::tool_call("st__whoami", json!({}))));
    llm.push(scripted(Script::tool_call("web__whoami", json!({}))));
    llm.push(scripted(Script::text("Both answered.")));
    let events = send_traced(
        &s,
        &id,
        json!({"type": "user_message", "content": "who are you?"}),
        CLIENT_TRACE,
        CLIENT_SPAN,
    )
    .await;
    assert_eq!(
        kinds(&events),
        [
            "tool_call",
            "tool_result",
            "tool_call",
            "tool_result",
            "assistant_final",
            "done:completed"
        ]
    );
    let seen = |tool: &str| -> Value {
        let r = events
            .iter()
            .find(|e| e["type"] == "tool_result" && e["tool_name"] == tool)
            .unwrap();
        serde_json::from_str(r["result"].as_str().unwrap()).unwrap()
    };
    let (st, web_seen) = (seen("st__whoami"), seen("web__whoami"));

    // The agent span ends after the tools' and may come in a later export: wait for it too.
    let spans = wait_for("both MCP calls' spans and their agent's", || {
        let spans = otlp.got.spans();
        let done = ["execute_tool st__whoami", "execute_tool web__whoami"]
            .iter()
            .all(|n| named(&spans, CLIENT_TRACE, n).len() == 1)
            && !named(&spans, CLIENT_TRACE, "invoke_agent coder").is_empty();
        done.then_some(spans)
    })
    .await;
    let line = |a: &str, b: &str| (a.to_string(), b.to_string());
    let tools: Vec<(String, String)> = tree(&spans, CLIENT_TRACE, CLIENT_SPAN)
        .into_iter()
        .filter(|(name, _)| name.starts_with("execute_tool"))
        .collect();
    assert_eq!(
        tools,
        [
            line("execute_tool st__whoami", "invoke_agent coder"),
            line("execute_tool web__whoami", "invoke_agent coder"),
        ]
    );
    let tp = |name: &str| traceparent_of(named(&spans, CLIENT_TRACE, name)[0]);
    let (st_tp, web_tp) = (tp("execute_tool st__whoami"), tp("execute_tool web__whoami"));
    // stdio: `params._meta` (SEP-414), with the client's tracestate carried along.
    assert_eq!(
        (
            st["meta"]["traceparent"].clone(),
            st["meta"]["tracestate"].clone()
        ),
        (json!(st_tp), json!("rt=1"))
    );
    // Streamable HTTP: the headers of the `tools/call` request, and `_meta` as well.
    assert_eq!(
        (
            web_seen["headers"].clone(),
            web_seen["meta"]["traceparent"].clone(),
            web_seen["meta"]["tracestate"].clone()
        ),
        (
            json!({"traceparent": web_tp, "tracestate": "rt=1"}),
            json!(web_tp),
            json!("rt=1")
        )
    );
}

#[tokio::test]
async fn a_client_run_tool_is_an_execute_tool_span_from_its_offer_to_its_result_or_cancellation() {
    let otlp = collector(false).await;
    let llm = MockLlmServer::start().await.unwrap();
    // One database for two processes: the result arrives after a restart.
    let data = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", data.path().join("rt.db").display());
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("AGENT_RUNTIME__MULTI_AGENT_ENABLED", "false"),
        ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
    ];
    let mut s = Server::start_with(&llm.url(), Some(&db), &env).await;
    let id = s.session(json!({"metadata": {"tool_execution": "client"}})).await;
    llm.push(scripted(Script::tool_call("read_file", json!({"path": "a.txt"}))));
    llm.push(scripted(Script::tool_call("read_file", json!({"path": "b.txt"}))));
    llm.push(scripted(Script::text("Stopped.")));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };

    // Offered in the first request; the client runs it (300 ms, while the server restarts) and
    // answers in a second one.
    let before_offer = now_ms();
    let first = send_traced(
        &s,
        &id,
        json!({"type": "user_message", "content": "read a.txt"}),
        CLIENT_TRACE,
        CLIENT_SPAN,
    )
    .await;
    let after_offer = now_ms();
    assert_eq!(kinds(&first), ["tool_call", "done:awaiting_tool_result"]);
    let ran = first[0]["call_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.terminate(), "the first process exits cleanly");
    let s = Server::start_with(&llm.url(), Some(&db), &env).await;
    let second = send_traced(
        &s,
        &id,
        json!({"type": "tool_result", "call_id": ran, "result": "alpha"}),
        RESUME_TRACE,
        RESUME_SPAN,
    )
    .await;
    assert_eq!(
        kinds(&second),
        ["tool_result", "tool_call", "done:awaiting_tool_result"]
    );
    let cancelled = second[1]["call_id"].as_str().unwrap().to_string();
    // The second call is never answered: a new message cancels it.
    let third = send_traced(
        &s,
        &id,
        json!({"type": "user_message", "content": "never mind"}),
        THIRD_TRACE,
        THIRD_SPAN,
    )
    .await;
    assert_eq!(
        kinds(&third),
        ["tool_result", "assistant_final", "done:completed"]
    );

    let spans = wait_for("the client tools' spans", || {
        let spans = otlp.got.spans();
        let tools = spans
            .iter()
            .filter(|s| s.name == "execute_tool read_file")
            .count();
        let sent = (spans.iter())
            .filter(|s| s.name == "POST /agent/message/stream")
            .count();
        (tools == 2 && sent == 3).then_some(spans)
    })
    .await;
    let line = |a: &str, b: &str| (a.to_string(), b.to_string());
    let model = "chat gpt-4o-mini";
    // Each call's span is a child of the agent span that offered it, in that request's trace.
    assert_eq!(
        tree(&spans, CLIENT_TRACE, CLIENT_SPAN),
        [
            line("POST /agent/message/stream", "client"),
            line(model, "invoke_agent coder"),
            line("execute_tool read_file", "invoke_agent coder"),
            line("invoke_agent coder", "POST /agent/message/stream"),
        ]
    );
    assert_eq!(
        tree(&spans, RESUME_TRACE, RESUME_SPAN),
        [
            line("POST /agent/message/stream", "client"),
            line(model, "invoke_agent coder"),
            line("execute_tool read_file", "invoke_agent coder"),
            line("invoke_agent coder", "POST /agent/message/stream"),
        ]
    );
    let request_in = |trace: &str| named(&spans, trace, "POST /agent/message/stream")[0];
    let tool_in = |trace: &str| named(&spans, trace, "execute_tool read_file")[0];
    let links = |s: &Span| -> Vec<(String, String)> {
        s.links
            .iter()
            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
            .collect()
    };
    let attrs_of = |call: &str, error: Option<&str>| {
        let mut a = BTreeMap::from([
            ("gen_ai.conversation.id".to_string(), json!(id)),
            ("gen_ai.operation.name".to_string(), json!("execute_tool")),
            ("gen_ai.tool.call.id".to_string(), json!(call)),
            ("gen_ai.tool.name".to_string(), json!("read_file")),
            ("gen_ai.tool.type".to_string(), json!("function")),
        ]);
        if let Some(code) = error {
            a.insert("error.type".to_string(), json!(code));
        }
        a
    };
    // The answered call: linked to the request that brought its result; it covers the wait.
    let answered = tool_in(CLIENT_TRACE);
    assert_eq!(
        (attrs(answered), links(answered)),
        (
            attrs_of(&ran, None),
            vec![(RESUME_TRACE.to_string(), hex(&request_in(RESUME_TRACE).span_id))]
        )
    );
    let start_ms = answered.start_time_unix_nano / 1_000_000;
    let took_ms = (answered.end_time_unix_nano - answered.start_time_unix_nano) / 1_000_000;
    assert!(
        (before_offer..=after_offer).contains(&start_ms) && took_ms >= 300,
        "the span starts at the offer ({before_offer}..={after_offer}: {start_ms}) and covers \
         the client's 300 ms run ({took_ms} ms)"
    );
    // The cancelled call: an error, linked to the request that cancelled it.
    let dropped = tool_in(RESUME_TRACE);
    assert_eq!(
        (
            attrs(dropped),
            links(dropped),
            dropped.status.as_ref().map(|s| s.code)
        ),
        (
            attrs_of(&cancelled, Some("CANCELLED")),
            vec![(THIRD_TRACE.to_string(), hex(&request_in(THIRD_TRACE).span_id))],
            Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
        )
    );
}
