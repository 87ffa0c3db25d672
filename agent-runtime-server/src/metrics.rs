//! Prometheus metrics in text format: requests by route, method and status with latency
//! histograms, turns by outcome, model calls and tokens, pending approvals, active streams.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agent_runtime_core::events::{BusError, BusEventKind, BusFilter};
use agent_runtime_core::llm::{Capabilities, ChatRequest, Chunk, ChunkStream, LlmBackend};
use agent_runtime_core::orchestrator::Orchestrator;
use async_trait::async_trait;
use futures::StreamExt;

/// Upper bounds (seconds) of the latency buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// The server's counters; shared by every request.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    turns: Mutex<BTreeMap<String, u64>>,
    /// Budgets reached and raised, by budget.
    budgets: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// Cost of the model calls of turns run here, in billionths (`MODEL_PRICES_FILE`'s currency).
    cost_nanos: AtomicU64,
    active_streams: AtomicI64,
    model_calls: AtomicU64,
    model_errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    approvals_requested: AtomicI64,
    approvals_resolved: AtomicI64,
    /// The runtime's OpenTelemetry exporter, whose dropped spans are counted here.
    telemetry: std::sync::OnceLock<agent_runtime_core::telemetry::Telemetry>,
}

/// Counts one open SSE stream while it lives.
#[derive(Debug)]
pub struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    /// Records one answered request.
    pub fn observe(&self, route: &'static str, method: &str, status: u16, elapsed: Duration) {
        *lock(&self.requests)
            .entry((route, method.to_string(), status))
            .or_default() += 1;
        lock(&self.latency)
            .entry(route)
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a stream as active until the guard drops.
    pub fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.active_streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// Follows the runtime's event bus for turns and approvals until the runtime goes away.
    pub fn follow_bus(self: &Arc<Self>, rt: &Orchestrator) {
        if let Some(t) = rt.telemetry() {
            let _ = self.telemetry.set(t.clone());
        }
        let mut sub = rt.subscribe(BusFilter::default());
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let e = match sub.recv().await {
                    Ok(e) => e,
                    // Lagging loses counts, not correctness.
                    Err(BusError::Lagged(_)) => continue,
                    Err(BusError::Closed) => return,
                };
                match e.kind {
                    BusEventKind::TurnCompleted | BusEventKind::TurnFailed => {
                        let outcome = e.data["stop_reason"].as_str().unwrap_or("unknown").to_string();
                        *lock(&me.turns).entry(outcome).or_default() += 1;
                        let cost = e.data["cost"].as_f64().unwrap_or(0.0);
                        me.cost_nanos
                            .fetch_add((cost * 1e9).round() as u64, Ordering::Relaxed);
                    }
                    BusEventKind::BudgetExceeded | BusEventKind::BudgetRaised => {
                        let what = if e.kind == BusEventKind::BudgetExceeded {
                            "exceeded"
                        } else {
                            "raised"
                        };
                        let budget = e.data["budget"].as_str().unwrap_or("unknown").to_string();
                        *lock(&me.budgets).entry((what, budget)).or_default() += 1;
                    }
                    BusEventKind::ApprovalRequested => {
                        me.approvals_requested.fetch_add(1, Ordering::Relaxed);
                    }
                    BusEventKind::ApprovalApproved
                    | BusEventKind::ApprovalRejected
                    | BusEventKind::ApprovalCancelled => {
                        me.approvals_resolved.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP http_requests_total HTTP requests answered, by route, method and status.\n");
        out.push_str("# TYPE http_requests_total counter\n");
        for ((route, method, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP http_request_duration_seconds Time to the response head, by route.\n");
        out.push_str("# TYPE http_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            for (le, n) in BUCKETS.iter().zip(h.counts.iter()) {
                let _ = writeln!(
                    out,
                    "http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        out.push_str("# HELP agent_turns_total Turns ended or paused, by stop reason.\n");
        out.push_str("# TYPE agent_turns_total counter\n");
        for (reason, n) in lock(&self.turns).iter() {
            let _ = writeln!(out, "agent_turns_total{{stop_reason=\"{reason}\"}} {n}");
        }
        out.push_str(
            "# HELP agent_budget_events_total Budgets reached (a turn paused) and raised, by budget.\n",
        );
        out.push_str("# TYPE agent_budget_events_total counter\n");
        for ((what, budget), n) in lock(&self.budgets).iter() {
            let _ = writeln!(
                out,
                "agent_budget_events_total{{event=\"{what}\",budget=\"{budget}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP llm_cost_total Cost of the model calls of turns run by this process (MODEL_PRICES_FILE).\n\
             # TYPE llm_cost_total counter\nllm_cost_total {}",
            self.cost_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let get = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        gauge(
            &mut out,
            "llm_calls_total",
            "Model calls started.",
            "counter",
            get(&self.model_calls),
        );
        gauge(
            &mut out,
            "llm_errors_total",
            "Model calls that failed.",
            "counter",
            get(&self.model_errors),
        );
        let _ = writeln!(
            out,
            "# HELP llm_tokens_total Tokens reported by the model server.\n# TYPE llm_tokens_total counter\n\
             llm_tokens_total{{kind=\"prompt\"}} {}\nllm_tokens_total{{kind=\"completion\"}} {}",
            get(&self.prompt_tokens),
            get(&self.completion_tokens)
        );
        let pending = self.approvals_requested.load(Ordering::Relaxed)
            - self.approvals_resolved.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "approvals_pending",
            "Approvals requested and not yet decided (since this process started).",
            "gauge",
            pending.max(0),
        );
        gauge(
            &mut out,
            "sse_streams_active",
            "Open SSE streams.",
            "gauge",
            self.active_streams.load(Ordering::Relaxed),
        );
        let dropped = self.telemetry.get().map_or(0, |t| t.dropped_spans());
        gauge(
            &mut out,
            "otel_spans_dropped_total",
            "OpenTelemetry spans not delivered: export queue full, export failed or timed out.",
            "counter",
            i64::try_from(dropped).unwrap_or(i64::MAX),
        );
        out
    }
}

/// A model backend that counts calls, failures and reported tokens for [`Metrics`].
#[derive(Debug)]
pub struct MeteredBackend {
    inner: Arc<dyn LlmBackend>,
    metrics: Arc<Metrics>,
}

impl MeteredBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn LlmBackend>, metrics: Arc<Metrics>) -> Self {
        MeteredBackend { inner, metrics }
    }
}

#[async_trait]
impl LlmBackend for MeteredBackend {
    async fn stream(&self, request: ChatRequest) -> agent_runtime_core::Result<ChunkStream> {
        self.metrics.model_calls.fetch_add(1, Ordering::Relaxed);
        let stream = match self.inner.stream(request).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.model_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let metrics = self.metrics.clone();
        Ok(Box::pin(stream.inspect(move |chunk| match chunk {
            Ok(Chunk::Usage(u)) => {
                metrics
                    .prompt_tokens
                    .fetch_add(u.prompt_tokens, Ordering::Relaxed);
                metrics
                    .completion_tokens
                    .fetch_add(u.completion_tokens, Ordering::Relaxed);
            }
            Err(_) => {
                metrics.model_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        })))
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    async fn health(&self) -> agent_runtime_core::Result<()> {
        self.inner.health().await
    }

    async fn context_size(
        &self,
    ) -> agent_runtime_core::Result<Option<agent_runtime_core::llm::ModelContext>> {
        self.inner.context_size().await
    }
}

/// The MCP servers' counters in Prometheus text: calls and failed calls per server.
pub fn render_mcp(rt: &agent_runtime_core::orchestrator::Orchestrator) -> String {
    let Some(mcp) = rt.mcp_servers() else {
        return String::new();
    };
    let counts = mcp.counts();
    let mut out = String::new();
    out.push_str(
        "# HELP mcp_tool_calls_total MCP tool calls, by server.\n# TYPE mcp_tool_calls_total counter\n",
    );
    for c in &counts {
        let _ = writeln!(out, "mcp_tool_calls_total{{server=\"{}\"}} {}", c.server, c.calls);
    }
    out.push_str(
        "# HELP mcp_tool_errors_total MCP tool calls that failed (isError, timeout, server down), by server.\n\
         # TYPE mcp_tool_errors_total counter\n",
    );
    for c in &counts {
        let _ = writeln!(
            out,
            "mcp_tool_errors_total{{server=\"{}\"}} {}",
            c.server, c.errors
        );
    }
    out
}
