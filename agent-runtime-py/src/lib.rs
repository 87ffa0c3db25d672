//! Python bindings for the agent runtime: module `agent_runtime` (native part `_agent_runtime`),
//! a thin layer over `agent_runtime_core::orchestrator::Orchestrator`.
//!
//! One tokio runtime per process drives every core future; each blocking call releases the GIL
//! while Rust works, so Python threads can drive different sessions at once.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use agent_runtime_core::Session;
use agent_runtime_core::config::{self, RuntimeConfig};
use agent_runtime_core::events::{BusEventKind, BusFilter};
use agent_runtime_core::orchestrator::{CreateSession, Follow, Orchestrator, Submission};
use agent_runtime_core::protocol::{ClientMessage, Decision, HitlDecision};
use agent_runtime_core::storage::{self, SessionQuery};
use agent_runtime_core::tools::mcp::{McpLimits, McpServers, McpServersConfig};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple};
use serde_json::{Value, json};

mod convert;
mod errors;
mod server;
mod stream;

use errors::IntoPyResult;
use stream::{EventStream, Subscription};

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The process's tokio runtime, started on first use.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agent-runtime")
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the tokio runtime: {e}")))?;
    // Another thread may have won the race; its runtime is the one kept.
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Runs a core future to completion with the GIL released.
fn block_on<F, T>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: std::future::Future<Output = agent_runtime_core::Result<T>> + Send,
    T: Send,
{
    let rt = runtime()?;
    py.detach(|| rt.block_on(fut)).py()
}

/// Settings that only the HTTP server reads (API.md §8); kept for [`Runtime::environment`].
const SERVER_VARIABLES: &[&str] = &["INTERNAL_API_KEY", "MAX_REQUEST_BYTES", "LOG_LEVEL"];

/// The §8 variable a keyword argument stands for: `llm_url` → `LLM_PROXY_URL`,
/// `max_context_tokens` → `MAX_CONTEXT_TOKENS`, `multi_agent_enabled` →
/// `AGENT_RUNTIME__MULTI_AGENT_ENABLED`; the variable's own name is accepted too.
fn variable_for(key: &str) -> Option<String> {
    let upper = key.to_ascii_uppercase();
    let alias = match upper.as_str() {
        "LLM_URL" => Some("LLM_PROXY_URL"),
        "MODEL" => Some("LLM_MODEL"),
        "API_KEY" => Some("LLM_API_KEY"),
        "TEMPERATURE" => Some("LLM_TEMPERATURE"),
        "COMMAND_TIMEOUT" => Some("COMMAND_TIMEOUT_SECS"),
        _ => None,
    };
    if let Some(a) = alias {
        return Some(a.to_string());
    }
    let known = |name: &str| config::VARIABLES.contains(&name) || SERVER_VARIABLES.contains(&name);
    if known(&upper) {
        return Some(upper);
    }
    let prefixed = format!("AGENT_RUNTIME__{upper}");
    known(&prefixed).then_some(prefixed)
}

/// A keyword argument's value as the text of its variable: `True` → `true`, lists joined with
/// commas, paths through `os.fspath`.
fn setting_text(key: &str, value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(if b.is_true() { "true" } else { "false" }.into());
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(s.to_cow()?.into_owned());
    }
    if value.cast::<PyList>().is_ok() || value.cast::<PyTuple>().is_ok() {
        let parts = value
            .try_iter()?
            .map(|item| setting_text(key, &item?))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(parts.join(","));
    }
    if value.hasattr("__fspath__")? {
        let os = value.py().import("os")?;
        return os.call_method1("fsdecode", (value,))?.extract();
    }
    if value.is_instance_of::<pyo3::types::PyInt>() || value.is_instance_of::<pyo3::types::PyFloat>() {
        return Ok(value.str()?.to_cow()?.into_owned());
    }
    Err(PyTypeError::new_err(format!(
        "setting '{key}': expected str, int, float, bool, a path or a list, not {}",
        value.get_type().name()?
    )))
}

/// The session as `GET /sessions/{id}` shows it (`budget` only when it has one).
fn session_json(s: &Session) -> Value {
    let mut v = json!({
        "session_id": s.id,
        "user_id": s.user_id,
        "created_at": s.created_at,
        "last_activity": s.last_activity,
        "metadata": s.metadata,
        "current_agent": s.current_agent,
        "message_count": s.message_count,
        "status": s.status,
    });
    if !s.budget.is_unlimited() {
        v["budget"] = json!(s.budget);
    }
    v
}

/// `mcp_servers=` as a servers config: `{"fs": {...}}` or the file's whole `{"mcpServers": {...}}`.
fn mcp_config(value: Value) -> agent_runtime_core::Result<McpServersConfig> {
    let whole = if value.get("mcpServers").is_some() {
        value
    } else {
        json!({"mcpServers": value})
    };
    McpServersConfig::parse(&whole.to_string())
        .map_err(|e| agent_runtime_core::Error::InvalidRequest(format!("mcp_servers: {e}")))
}

/// The settings in force, keyed like the keyword arguments; the API key is masked.
fn settings_json(c: &RuntimeConfig) -> Value {
    json!({
        "database_url": storage::redact_url(&c.database_url),
        "llm_url": c.llm.proxy_url,
        "model": c.llm.model,
        "api_key": c.llm.api_key.as_ref().map(|_| "***"),
        "temperature": c.temperature,
        "hitl_enabled": c.hitl_enabled,
        "hitl_dangerous_tools": c.hitl_dangerous_tools,
        "max_context_tokens": c.max_context_tokens,
        "max_context_messages": c.max_context_messages,
        "multi_agent_enabled": c.multi_agent_enabled,
        "default_agent": c.default_agent,
        "auto_agent_switching": c.auto_agent_switching,
        "max_agent_switches": c.max_agent_switches,
        "tool_execution": c.tool_execution,
        "project_roots": c.project_roots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "sandbox": c.sandbox.mode,
        "sandbox_read_paths": c.sandbox.read_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "sandbox_write_paths": c.sandbox.write_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "sandbox_network_agents": c.sandbox.network_agents,
        "command_timeout_secs": c.command_timeout.as_secs(),
        "mcp_servers_file": c.mcp_servers_file.as_ref().map(|p| p.display().to_string()),
        "mcp_tool_timeout_secs": c.mcp_tool_timeout.as_secs(),
        "max_turn_iterations": c.max_turn_iterations,
        "max_tool_output_bytes": c.max_tool_output_bytes,
        "session_lease_secs": c.lease_ttl.as_secs(),
        "routing_timeout_secs": c.routing_timeout.as_secs(),
        "llm_first_byte_timeout_secs": c.llm.first_byte_timeout.as_secs(),
        "llm_context_tokens": c.llm.context_tokens,
    })
}

/// The agent runtime: sessions, agents, turns and approvals over one store and one model.
///
/// `Runtime(database_url="sqlite:///path/agent-runtime.db", llm_url="http://localhost:8002",
/// model="gpt-4o-mini", api_key=None, **settings)` takes the settings of the HTTP server
/// (API.md §8) as keyword arguments, lower-cased and without the `AGENT_RUNTIME__` prefix
/// (`max_context_tokens=4000`, `multi_agent_enabled=False`, `hitl_dangerous_tools=["write_file"]`),
/// with the server's defaults and validation: a bad value raises `InvalidRequest` naming the
/// variable. The process environment is not read. `database_url` may also be a path object
/// (`pathlib.Path`), meaning a SQLite file. Opening the store also closes turns a previous
/// process left running (their open tool calls get an "interrupted" result). MCP servers come
/// from `mcp_servers_file="/path/mcp.json"` or `mcp_servers={"fs": {"command": ..., "args": [...]}}`.
#[pyclass(module = "agent_runtime", subclass, frozen)]
pub struct Runtime {
    orchestrator: Orchestrator,
    environment: BTreeMap<String, String>,
}

impl Runtime {
    fn stream(&self, py: Python<'_>, session_id: &str, submission: Submission) -> PyResult<EventStream> {
        let o = &self.orchestrator;
        let events = block_on(py, o.submit(session_id, submission))?;
        EventStream::new(events)
    }
}

#[pymethods]
impl Runtime {
    #[new]
    #[pyo3(signature = (database_url=None, llm_url=None, model=None, api_key=None, **settings))]
    fn new(
        py: Python<'_>,
        database_url: Option<&Bound<'_, PyAny>>,
        llm_url: Option<String>,
        model: Option<String>,
        api_key: Option<String>,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let mut env = BTreeMap::new();
        let mut mcp_servers: Option<Value> = None;
        if let Some(url) = database_url.filter(|u| !u.is_none()) {
            let mut text = setting_text("database_url", url)?;
            if !url.is_instance_of::<PyString>() {
                // A path object names a SQLite file.
                text = format!("sqlite://{text}");
            }
            env.insert("DATABASE_URL".to_string(), text);
        }
        for (var, value) in [
            ("LLM_PROXY_URL", llm_url),
            ("LLM_MODEL", model),
            ("LLM_API_KEY", api_key),
        ] {
            if let Some(v) = value {
                env.insert(var.to_string(), v);
            }
        }
        if let Some(settings) = settings {
            for (key, value) in settings.iter() {
                let key: String = key.extract()?;
                if key == "mcp_servers" {
                    // The servers themselves (a dict), instead of a file: see `mcp_servers_file`.
                    if !value.is_none() {
                        mcp_servers = Some(convert::from_py(&value, "mcp_servers")?);
                    }
                    continue;
                }
                let var = variable_for(&key).ok_or_else(|| {
                    PyTypeError::new_err(format!("Runtime() got an unexpected setting '{key}'"))
                })?;
                if !value.is_none() {
                    env.insert(var, setting_text(&key, &value)?);
                }
            }
        }
        if let Some(v) = env.get("MAX_REQUEST_BYTES")
            && v.trim().parse::<u64>().map_or(true, |n| n == 0)
        {
            return Err(errors::to_py(agent_runtime_core::Error::InvalidRequest(format!(
                "MAX_REQUEST_BYTES: invalid value '{v}' (expected a whole number, at least 1)"
            ))));
        }
        let config = RuntimeConfig::from_lookup(|name| env.get(name).cloned()).py()?;
        let mcp = mcp_servers.map(mcp_config).transpose().py()?;
        let limits = McpLimits {
            tool_timeout: config.mcp_tool_timeout,
            ..McpLimits::default()
        };
        let orchestrator = block_on(py, async move {
            let mut builder = Orchestrator::from_config(config).await?;
            if let Some(servers) = mcp {
                builder = builder.mcp_servers(McpServers::start(servers, limits));
            }
            builder.start().await
        })?;
        Ok(Runtime {
            orchestrator,
            environment: env,
        })
    }

    /// The settings in force (defaults filled in), keyed like the keyword arguments.
    #[getter]
    fn settings(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        convert::to_py(py, &settings_json(self.orchestrator.config()))
    }

    /// The settings given to the constructor as API.md §8 environment variables (what `serve`
    /// passes to the server process). Contains the API keys as given.
    fn environment(&self) -> BTreeMap<String, String> {
        self.environment.clone()
    }

    /// Starts the HTTP server in this process with this runtime's settings (see `serve`).
    fn _start_server(&self, py: Python<'_>, host: &str, port: u16) -> PyResult<server::Server> {
        server::start(py, self.environment.clone(), host, port)
    }

    /// Creates a session on the default agent and returns it as a dict (`session_id`,
    /// `user_id`, `created_at`, `last_activity`, `metadata`, `current_agent`, `message_count`,
    /// `status`). `metadata` keys the runtime reads: `project_path` (an existing absolute
    /// directory), `tool_execution` (`"runtime"` or `"client"`). `budget`: the session's budgets
    /// over the settings' defaults (`session_tokens`, `session_cost`, `turn_tokens`, `turn_cost`,
    /// `turn_time_secs`, `turn_tool_calls`; `None` for one lifts its default).
    #[pyo3(signature = (user_id=None, metadata=None, session_id=None, budget=None))]
    fn create_session(
        &self,
        py: Python<'_>,
        user_id: Option<String>,
        metadata: Option<&Bound<'_, PyAny>>,
        session_id: Option<String>,
        budget: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let metadata = metadata.map(|m| convert::from_py(m, "metadata")).transpose()?;
        let budget = budget.map(|b| convert::from_py(b, "budget")).transpose()?;
        let req = CreateSession {
            user_id,
            metadata,
            session_id,
            budget,
        };
        let s = block_on(py, self.orchestrator.create_session(req))?;
        convert::to_py(py, &session_json(&s))
    }

    /// One session as a dict (see `create_session`). Raises `SessionNotFound`.
    fn get_session(&self, py: Python<'_>, session_id: &str) -> PyResult<Py<PyAny>> {
        let s = block_on(py, self.orchestrator.get_session(session_id))?;
        convert::to_py(py, &session_json(&s))
    }

    /// Sessions, newest activity first: `{"sessions": [...], "next_cursor": str | None, "total":
    /// int}` (`total`: the sessions matching `user_id` across all pages).
    /// `limit` must be 1–1000; pass `next_cursor` back as `cursor` for the next page.
    #[pyo3(signature = (user_id=None, limit=100, cursor=None))]
    fn list_sessions(
        &self,
        py: Python<'_>,
        user_id: Option<String>,
        limit: usize,
        cursor: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let query = SessionQuery {
            user_id,
            status: None,
            limit,
            cursor,
        };
        let page = block_on(py, self.orchestrator.list_sessions(query))?;
        let sessions: Vec<Value> = page.sessions.iter().map(session_json).collect();
        convert::to_py(
            py,
            &json!({"sessions": sessions, "next_cursor": page.next_cursor, "total": page.total}),
        )
    }

    /// Deletes a session and everything of it, cancelling its running turn first.
    fn delete_session(&self, py: Python<'_>, session_id: &str) -> PyResult<()> {
        block_on(py, self.orchestrator.delete_session(session_id))
    }

    /// The stored conversation: dicts `{"seq", "role", "content", "agent", "tool_calls"?,
    /// "tool_call_id"?, "created_at"}`, oldest first, with seq > `after`; every message when
    /// `limit` is None, else at most `limit` (1–1000).
    #[pyo3(signature = (session_id, after=0, limit=None))]
    fn messages(
        &self,
        py: Python<'_>,
        session_id: &str,
        after: u64,
        limit: Option<usize>,
    ) -> PyResult<Py<PyAny>> {
        let o = &self.orchestrator;
        let all = block_on(py, async move {
            if let Some(limit) = limit {
                return o.messages(session_id, after, limit).await;
            }
            let mut all = Vec::new();
            let mut after = after;
            loop {
                let page = o.messages(session_id, after, 1000).await?;
                let full = page.len() == 1000;
                after = page.last().map_or(after, |m| m.seq);
                all.extend(page);
                if !full {
                    return Ok(all);
                }
            }
        })?;
        convert::serialize_to_py(py, &all)
    }

    /// The agents, as `GET /agents` lists them: dicts `{"type", "name", "description", "emoji",
    /// "tools", "restrictions"}`.
    fn agents(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        convert::serialize_to_py(py, &self.orchestrator.agents())
    }

    /// The session's agent, the one before and every switch (`current_agent`,
    /// `previous_agent`, `switch_count`, `switch_history`), as API.md §3.
    fn current_agent(&self, py: Python<'_>, session_id: &str) -> PyResult<Py<PyAny>> {
        let current = block_on(py, self.orchestrator.current_agent(session_id))?;
        convert::serialize_to_py(py, &current)
    }

    /// Pending approvals of the session, oldest first: dicts with `call_id`, `tool_name`,
    /// `arguments`, `reason`, `request_type` (`tool` or `plan`), `created_at`, `status`, ...
    fn pending_approvals(&self, py: Python<'_>, session_id: &str) -> PyResult<Py<PyAny>> {
        let pending = block_on(py, self.orchestrator.pending_approvals(session_id))?;
        convert::serialize_to_py(py, &pending)
    }

    /// Tokens used by every turn of the session: `{"prompt_tokens", "completion_tokens"}`.
    fn usage(&self, py: Python<'_>, session_id: &str) -> PyResult<Py<PyAny>> {
        let usage = block_on(py, self.orchestrator.usage(session_id))?;
        convert::serialize_to_py(py, &usage)
    }

    /// What the session spent and what remains of its budgets, as `GET /sessions/{id}/usage`:
    /// tokens, `cost` (`None` without a price, `cost_unavailable` says why), `budget`, `spent`,
    /// `remaining`.
    fn budget_usage(&self, py: Python<'_>, session_id: &str) -> PyResult<Py<PyAny>> {
        let usage = block_on(py, self.orchestrator.budget_usage(session_id))?;
        convert::serialize_to_py(py, &usage)
    }

    /// Changes the session's budgets: the keys of `budget` set a limit (`None`: unlimited), the
    /// others stay. Returns the session. Raises `InvalidRequest` naming a bad key or value
    /// (nothing changes), `SessionNotFound`.
    fn set_budget(&self, py: Python<'_>, session_id: &str, budget: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let patch = convert::from_py(budget, "budget")?;
        let s = block_on(py, self.orchestrator.set_budget(session_id, &patch))?;
        convert::to_py(py, &session_json(&s))
    }

    /// Sends the user's message and returns the turn's `EventStream` (switching to `agent_type`
    /// first if given). The same `request_id` again replays that turn instead of running another.
    /// Raises before any event for what can be known up front: `SessionNotFound`, `SessionBusy`,
    /// `InvalidRequest`, `ContextTooLarge`.
    #[pyo3(signature = (session_id, content, agent_type=None, request_id=None))]
    fn send_message(
        &self,
        py: Python<'_>,
        session_id: &str,
        content: String,
        agent_type: Option<String>,
        request_id: Option<String>,
    ) -> PyResult<EventStream> {
        let message = ClientMessage::UserMessage { content, agent_type };
        self.stream(py, session_id, Submission { request_id, message })
    }

    /// Switches the session to `agent_type` (an explicit switch). With `content`, runs a turn on
    /// the new agent with it as the user's message; without, the stream is `agent_switched`
    /// then `done`.
    #[pyo3(signature = (session_id, agent_type, content=None, reason=None, request_id=None))]
    fn switch_agent(
        &self,
        py: Python<'_>,
        session_id: &str,
        agent_type: String,
        content: Option<String>,
        reason: Option<String>,
        request_id: Option<String>,
    ) -> PyResult<EventStream> {
        let message = ClientMessage::SwitchAgent {
            agent_type,
            content,
            reason,
        };
        self.stream(py, session_id, Submission { request_id, message })
    }

    /// Decides a pending approval (`"approve"`, `"edit"` with `modified_arguments`, or
    /// `"reject"` with optional `feedback` for the model) and returns the stream that continues
    /// the turn. Raises `ApprovalNotFound`, `ApprovalAlreadyDecided`, or `InvalidTool` for an
    /// edit the agent may not make (the approval stays pending).
    #[pyo3(signature = (session_id, call_id, decision, modified_arguments=None, feedback=None, request_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        py: Python<'_>,
        session_id: &str,
        call_id: String,
        decision: String,
        modified_arguments: Option<&Bound<'_, PyAny>>,
        feedback: Option<String>,
        request_id: Option<String>,
    ) -> PyResult<EventStream> {
        let modified_arguments = modified_arguments
            .filter(|a| !a.is_none())
            .map(|a| convert::from_py(a, "modified_arguments"))
            .transpose()?;
        let decision = Decision::parse(&decision, modified_arguments, feedback)
            .map_err(|e| errors::to_py(agent_runtime_core::Error::InvalidRequest(e)))?;
        let message = ClientMessage::HitlDecision(HitlDecision { call_id, decision });
        self.stream(py, session_id, Submission { request_id, message })
    }

    /// The result of a tool the client executed (client execution mode): `result` (any JSON) or
    /// `error` (a string). Continues the turn; raises `ToolCallNotFound` for a call not open.
    #[pyo3(signature = (session_id, call_id, result=None, error=None, request_id=None))]
    fn submit_tool_result(
        &self,
        py: Python<'_>,
        session_id: &str,
        call_id: String,
        result: Option<&Bound<'_, PyAny>>,
        error: Option<String>,
        request_id: Option<String>,
    ) -> PyResult<EventStream> {
        let result = result
            .filter(|r| !r.is_none())
            .map(|r| convert::from_py(r, "result"))
            .transpose()?;
        let message = ClientMessage::ToolResult {
            call_id,
            result,
            error,
        };
        self.stream(py, session_id, Submission { request_id, message })
    }

    /// The session's persisted events with seq > `after` (replay), then the running turn's live
    /// events until it ends; with `follow=True`, live events until the stream is closed.
    #[pyo3(signature = (session_id, after=None, follow=false))]
    fn events(
        &self,
        py: Python<'_>,
        session_id: &str,
        after: Option<u64>,
        follow: bool,
    ) -> PyResult<EventStream> {
        let mode = if follow {
            Follow::Forever
        } else {
            Follow::UntilIdle
        };
        let events = block_on(py, self.orchestrator.events(session_id, after.unwrap_or(0), mode))?;
        EventStream::new(events)
    }

    /// Cancels the session's running or paused turn: `"cancelled"`, or `"idle"` if nothing ran.
    fn cancel(&self, py: Python<'_>, session_id: &str) -> PyResult<String> {
        let outcome = block_on(py, self.orchestrator.cancel(session_id))?;
        match serde_json::to_value(outcome) {
            Ok(Value::String(s)) => Ok(s),
            _ => Err(PyRuntimeError::new_err("cannot name the cancel outcome")),
        }
    }

    /// Subscribes to the EventBus: `kinds` such as `["approval.requested", "turn.completed"]`
    /// (None: all), `session_id` (None: every session). Only events after this call arrive.
    #[pyo3(signature = (kinds=None, session_id=None))]
    fn subscribe(&self, kinds: Option<Vec<String>>, session_id: Option<String>) -> PyResult<Subscription> {
        let kinds = kinds
            .map(|ks| {
                ks.iter()
                    .map(|k| {
                        BusEventKind::parse(k).ok_or_else(|| {
                            let known: Vec<&str> = BusEventKind::ALL.iter().map(|k| k.as_str()).collect();
                            errors::to_py(agent_runtime_core::Error::InvalidRequest(format!(
                                "unknown event kind '{k}' (known: {})",
                                known.join(", ")
                            )))
                        })
                    })
                    .collect::<PyResult<Vec<_>>>()
            })
            .transpose()?;
        Subscription::new(self.orchestrator.subscribe(BusFilter { kinds, session_id }))
    }

    /// Stops every turn running in this process (each ends with `done`, `cancelled`), waiting up
    /// to `grace` seconds for each.
    #[pyo3(signature = (grace=10.0))]
    fn shutdown(&self, py: Python<'_>, grace: f64) -> PyResult<()> {
        let grace = std::time::Duration::from_secs_f64(grace.max(0.0));
        let o = &self.orchestrator;
        let rt = runtime()?;
        py.detach(|| rt.block_on(o.shutdown(grace)));
        Ok(())
    }

    /// Drains this runtime for a restart (see the core's `Orchestrator::drain`): no new turn
    /// starts (`ShuttingDown`), running turns are handed over at their next step boundary for
    /// another runtime on the same database to resume, streams end. Waits up to `timeout`
    /// seconds; returns `{"handed_over": n, "still_running": m}`.
    #[pyo3(signature = (timeout=10.0))]
    fn drain(&self, py: Python<'_>, timeout: f64) -> PyResult<Py<PyAny>> {
        let timeout = std::time::Duration::from_secs_f64(timeout.max(0.0));
        let o = &self.orchestrator;
        let rt = runtime()?;
        let report = py.detach(|| rt.block_on(o.drain(timeout)));
        convert::serialize_to_py(py, &report)
    }

    fn __repr__(&self) -> String {
        let c = self.orchestrator.config();
        format!(
            "Runtime(database_url={:?}, llm_url={:?}, model={:?})",
            storage::redact_url(&c.database_url),
            c.llm.proxy_url,
            c.llm.model
        )
    }
}

/// The native module behind `agent_runtime`.
#[pymodule]
fn _agent_runtime(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Runtime>()?;
    m.add_class::<EventStream>()?;
    m.add_class::<Subscription>()?;
    m.add_class::<server::Server>()?;
    errors::register(m)?;
    Ok(())
}
