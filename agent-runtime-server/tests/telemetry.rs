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
            ("gen_ai.tool.type".to_string(), json!("function")),
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
