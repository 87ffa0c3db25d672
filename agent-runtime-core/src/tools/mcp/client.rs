//! One MCP server's connection on the `rmcp` client: starting it (stdio child or Streamable HTTP),
//! supervising it (restart with backoff, tool list refresh, roots) and calling its tools with bounds.

// Roots are deprecated by the newest protocol revision (SEP-2577) but still the way servers of the
// current final revision (the reference filesystem server among them) learn their root.
#![allow(deprecated)]

use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation, ListRootsResult,
    RequestParamsMeta, Root,
};
use rmcp::service::{NotificationContext, RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ErrorData, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{McpServerState, McpTool, McpTransport, Slot, file_uri};
use crate::tools::{ToolContext, ToolFailure};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that lived this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Our side of the connection: roots and tool-list notifications.
struct Handler {
    slot: Weak<Slot>,
}

impl ClientHandler for Handler {
    fn get_info(&self) -> ClientConfig {
        // Roots are offered (the session's project root); nothing else the server could ask of us.
        let capabilities: ClientCapabilities =
            serde_json::from_value(json!({"roots": {"listChanged": true}})).unwrap_or_default();
        ClientConfig::new(
            capabilities,
            Implementation::new("agent-runtime", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn list_roots(&self, _context: RequestContext<RoleClient>) -> Result<ListRootsResult, ErrorData> {
        let roots = match self.slot.upgrade() {
            Some(slot) => {
                let (generation, uris) = slot.roots.read().map(|r| r.clone()).unwrap_or_default();
                slot.roots_served.send_if_modified(|g| {
                    let newer = generation > *g;
                    *g = (*g).max(generation);
                    newer
                });
                uris.into_iter().map(Root::new).collect()
            }
            None => Vec::new(),
        };
        Ok(ListRootsResult::new(roots))
    }

    async fn on_tool_list_changed(&self, context: NotificationContext<RoleClient>) {
        if let Some(slot) = self.slot.upgrade() {
            let peer = context.peer.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(slot.limits.startup_timeout, list_tools(&slot, &peer)).await {
                    Ok(Ok(())) => tracing::info!(server = %slot.config.name, "MCP tool list refreshed"),
                    Ok(Err(e)) => {
                        tracing::warn!(server = %slot.config.name, error = %e, "MCP tool list refresh failed")
                    }
                    Err(_) => tracing::warn!(server = %slot.config.name, "MCP tool list refresh timed out"),
                }
            });
        }
    }
}

/// A live connection and, for stdio, its child.
struct Connection {
    service: RunningService<RoleClient, Handler>,
    child: Option<tokio::process::Child>,
}

/// Keeps `slot`'s server connected until `shutdown`.
pub(super) async fn supervise(slot: Arc<Slot>, shutdown: CancellationToken) {
    let name = slot.config.name.clone();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            r = tokio::time::timeout(slot.limits.startup_timeout, connect(&slot)) => r,
            _ = shutdown.cancelled() => break,
        };
        let error = match attempt {
            Err(_) => format!(
                "did not start within {} s (connect, initialize, list tools)",
                slot.limits.startup_timeout.as_secs()
            ),
            Ok(Err(e)) => e,
            Ok(Ok(mut conn)) => {
                tracing::info!(server = %name, tools = slot.read().tools.len(), "MCP server running");
                let ct = conn.service.cancellation_token();
                let wait = conn.service.waiting();
                tokio::pin!(wait);
                let why = tokio::select! {
                    r = &mut wait => match r {
                        Ok(reason) => format!("the connection closed ({reason:?})"),
                        Err(e) => format!("the connection task ended: {e}"),
                    },
                    _ = shutdown.cancelled() => {
                        ct.cancel();
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut wait).await;
                        String::new()
                    }
                };
                let exit = stop_child(conn.child.take()).await;
                if shutdown.is_cancelled() {
                    break;
                }
                match exit {
                    Some(status) => format!("{why}; the process exited ({status})"),
                    None => why,
                }
            }
        };
        if shutdown.is_cancelled() {
            break;
        }
        tracing::warn!(server = %name, error = %error, retry_in_ms = backoff.as_millis() as u64, "MCP server is down");
        slot.update(|s| {
            s.state = McpServerState::Restarting;
            s.error = Some(error);
            s.peer = None;
        });
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        slot.update(|s| {
            s.state = McpServerState::Starting;
            s.restarts += 1;
        });
    }
    slot.update(|s| {
        s.state = McpServerState::Stopped;
        s.peer = None;
    });
}

/// Kills a stdio child's process group and reaps it; its exit status if it had exited by itself.
async fn stop_child(child: Option<tokio::process::Child>) -> Option<std::process::ExitStatus> {
    let mut child = child?;
    let exited = child.try_wait().ok().flatten();
    if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    exited
}

/// Starts or reaches the server, initializes and lists its tools.
async fn connect(slot: &Arc<Slot>) -> Result<Connection, String> {
    let handler = Handler {
        slot: Arc::downgrade(slot),
    };
    let max = slot.limits.max_message_bytes;
    let (service, child) = match &slot.config.transport {
        McpTransport::Stdio {
            command,
            args,
            env,
            cwd,
        } => {
            let mut cmd = tokio::process::Command::new(command);
            cmd.args(args)
                .envs(env)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .process_group(0);
            if let Some(dir) = cwd {
                cmd.current_dir(dir);
            }
            crate::tools::isolation::die_with_parent(&mut cmd);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start `{command}`: {e}"))?;
            let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
                return Err("the child has no stdin/stdout".into());
            };
            if let Some(stderr) = child.stderr.take() {
                tokio::spawn(log_stderr(slot.config.name.clone(), stderr));
            }
            let transport = AsyncRwTransport::new_client(stdout, stdin).with_max_line_length(max);
            let service = match handler.serve(transport).await {
                Ok(s) => s,
                Err(e) => {
                    let status = stop_child(Some(child)).await;
                    return Err(match status {
                        Some(st) => format!("initialize failed: {e}; the process exited ({st})"),
                        None => format!("initialize failed: {e}"),
                    });
                }
            };
            (service, Some(child))
        }
        McpTransport::Http { url, headers } => {
            let mut custom = std::collections::HashMap::new();
            for (k, v) in headers {
                let name = http::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|e| format!("header name '{k}': {e}"))?;
                let value = http::HeaderValue::from_str(v).map_err(|e| format!("header '{k}' value: {e}"))?;
                custom.insert(name, value);
            }
            let config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                .custom_headers(custom)
                .max_json_response_size(max)
                .max_sse_event_size(max);
            let client = super::http::TracingHttpClient(reqwest::Client::new());
            let transport = StreamableHttpClientTransport::with_client(client, config);
            let service = handler
                .serve(transport)
                .await
                .map_err(|e| format!("initialize failed at {url}: {e}"))?;
            (service, None)
        }
    };
    let peer = service.peer().clone();
    if let Err(e) = list_tools(slot, &peer).await {
        let mut conn = Connection { service, child };
        conn.service.cancellation_token().cancel();
        let _ = stop_child(conn.child.take()).await;
        return Err(e);
    }
    slot.update(|s| {
        s.state = McpServerState::Running;
        s.error = None;
        s.peer = Some(peer);
    });
    Ok(Connection { service, child })
}

/// Lists the server's tools into `slot` (offered ones only; unusable ones are skipped with why).
async fn list_tools(slot: &Arc<Slot>, peer: &rmcp::Peer<RoleClient>) -> Result<(), String> {
    let listed = peer
        .list_all_tools()
        .await
        .map_err(|e| format!("tools/list failed: {e}"))?;
    let mut tools = std::collections::BTreeMap::new();
    let mut skipped = Vec::new();
    for t in &listed {
        if !slot.config.offers_tool(&t.name) {
            continue;
        }
        match McpTool::new(slot, t) {
            Ok(tool) => {
                tools.insert(tool.spec.name.clone(), Arc::new(tool));
            }
            Err(why) => {
                tracing::warn!(server = %slot.config.name, skipped = %why, "MCP tool skipped");
                skipped.push(why);
            }
        }
    }
    slot.update(|s| {
        s.tools = tools;
        s.skipped = skipped;
    });
    Ok(())
}

/// Forwards a child's stderr to the log, a line at a time, each line cut at 2 KiB.
async fn log_stderr(server: String, stderr: tokio::process::ChildStderr) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stderr).split(b'\n');
    while let Ok(Some(line)) = lines.next_segment().await {
        let text = String::from_utf8_lossy(&line[..line.len().min(2048)]).into_owned();
        tracing::debug!(server = %server, stderr = %text, "MCP server");
    }
}

/// Calls the server's tool `tool`: the project root offered as root, bounded by the tool timeout
/// and the turn's cancellation.
pub(super) async fn call(
    slot: &Arc<Slot>,
    tool: &str,
    ctx: &ToolContext,
    arguments: Value,
) -> Result<Value, ToolFailure> {
    let (peer, state, error) = {
        let s = slot.read();
        (s.peer.clone(), s.state.clone(), s.error.clone())
    };
    let Some(peer) = peer else {
        let why = error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
        return Err(ToolFailure::Failed(format!(
            "the server is not running, state {}{why}; it is restarted with backoff, try again later",
            serde_json::to_value(&state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        )));
    };
    offer_root(slot, &peer, &ctx.project_root).await;
    let Value::Object(args) = arguments else {
        return Err(ToolFailure::Invalid("arguments must be a JSON object".into()));
    };
    let mut params = CallToolRequestParams::new(tool.to_string()).with_arguments(args);
    // The `execute_tool` span's W3C trace context, in `params._meta` as SEP-414 (MCP 2026-07-28:
    // "OpenTelemetry trace context propagation", keys `traceparent`/`tracestate`) has it, on every
    // transport; HTTP servers get it as headers too (`super::http`).
    for (field, value) in crate::telemetry::outgoing_trace_context() {
        match field {
            "traceparent" => params.set_traceparent(&value),
            _ => params.set_tracestate(&value),
        }
    }
    let timeout = slot.limits.tool_timeout;
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, peer.call_tool(params)) => r,
        _ = ctx.cancel.cancelled() => return Err(ToolFailure::Failed("cancelled".into())),
    };
    match result {
        Err(_) => Err(ToolFailure::Failed(format!(
            "no answer within {} s (MCP_TOOL_TIMEOUT_SECS; a message over {} bytes is dropped)",
            timeout.as_secs(),
            slot.limits.max_message_bytes
        ))),
        Ok(Err(e)) => Err(ToolFailure::Failed(format!("the call failed: {e}"))),
        Ok(Ok(r)) => map_result(r),
    }
}

/// Makes the session's project root the server's root. When that changed, the server is told
/// and given up to [`ROOTS_WAIT`] to ask for the new list (a server without roots never asks).
async fn offer_root(slot: &Arc<Slot>, peer: &rmcp::Peer<RoleClient>, root: &std::path::Path) {
    if root.as_os_str().is_empty() {
        return;
    }
    let uri = file_uri(root);
    let generation = {
        let mut roots = slot.roots.write().unwrap_or_else(|p| p.into_inner());
        if roots.1.len() == 1 && roots.1[0] == uri {
            return;
        }
        roots.0 += 1;
        roots.1 = vec![uri];
        roots.0
    };
    let mut served = slot.roots_served.subscribe();
    let _ = tokio::time::timeout(ROOTS_WAIT, async {
        if peer.notify_roots_list_changed().await.is_ok() {
            let _ = served.wait_for(|g| *g >= generation).await;
        }
    })
    .await;
}

/// How long a call waits for the server to fetch changed roots before it is sent.
const ROOTS_WAIT: Duration = Duration::from_secs(1);

/// A `tools/call` result as our `tool_result`: the text blocks joined (other blocks summarized);
/// with `structuredContent`, `{"text", "structured_content"}`. `isError` is a failure with the text.
pub(crate) fn map_result(r: CallToolResult) -> Result<Value, ToolFailure> {
    let mut parts = Vec::new();
    for block in &r.content {
        let v = serde_json::to_value(block).unwrap_or(Value::Null);
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("unknown");
        if let Some(text) = v.get("text").and_then(Value::as_str) {
            parts.push(text.to_string());
        } else if let Some(text) = v.pointer("/resource/text").and_then(Value::as_str) {
            parts.push(text.to_string());
        } else {
            let mime = v
                .get("mimeType")
                .or_else(|| v.pointer("/resource/mimeType"))
                .and_then(Value::as_str)
                .unwrap_or("no type");
            let uri = v
                .get("uri")
                .or_else(|| v.pointer("/resource/uri"))
                .and_then(Value::as_str)
                .map(|u| format!(" {u}"))
                .unwrap_or_default();
            parts.push(format!("[{kind} content{uri} ({mime}) not shown]"));
        }
    }
    let text = parts.join("\n");
    if r.is_error == Some(true) {
        let text = if text.is_empty() {
            "the tool reported an error without text".to_string()
        } else {
            text
        };
        return Err(ToolFailure::Failed(text));
    }
    Ok(match r.structured_content {
        Some(structured) => json!({"text": text, "structured_content": structured}),
        None => Value::String(text),
    })
}
