//! Tools from MCP servers (issue 17): each configured server's tools reach the agents as
//! `<server>__<tool>`, validated against the server's schema, approved and bounded like ours.
//!
//! [`McpServers::start`] starts one supervisor task per server (stdio child or Streamable HTTP, on
//! the official `rmcp` client). A supervisor connects, lists the tools (a tool whose schema does not
//! compile, or whose name does not fit, is skipped and reported), and waits; a server that exits is
//! restarted with backoff (0.5 s doubling to 30 s) while its tools answer `TOOL_EXECUTION_FAILED`
//! saying so. `notifications/tools/list_changed` refreshes the list. Every call is bounded by
//! `MCP_TOOL_TIMEOUT_SECS` and by a cap on the size of one message from the server.
//!
//! Stdio servers are started as leaders of their own process group with `PR_SET_PDEATHSIG`
//! (SIGKILL), so they die with the runtime even when it is SIGKILLed; on shutdown the group is killed.

mod client;
pub mod config;
mod http;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::protocol::ToolSpec;
use crate::tools::{Tool, ToolContext, ToolFailure};

pub use config::{McpApproval, McpServerConfig, McpServersConfig, McpTransport};

/// Default `MCP_TOOL_TIMEOUT_SECS`.
pub const DEFAULT_MCP_TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to start and list its tools before the attempt counts as failed.
pub const MCP_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest message accepted from a server (a longer stdio line is dropped; a longer HTTP body
/// fails the request): the call then ends in its timeout or in an error, never in memory growth.
pub const MCP_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The limits every server runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McpLimits {
    /// Bound of one tool call (`MCP_TOOL_TIMEOUT_SECS`).
    pub tool_timeout: Duration,
    /// Bound of one start (connect, initialize, list tools).
    pub startup_timeout: Duration,
    /// Largest message accepted from a server.
    pub max_message_bytes: usize,
}

impl Default for McpLimits {
    fn default() -> Self {
        McpLimits {
            tool_timeout: DEFAULT_MCP_TOOL_TIMEOUT,
            startup_timeout: MCP_STARTUP_TIMEOUT,
            max_message_bytes: MCP_MAX_MESSAGE_BYTES,
        }
    }
}

/// A server's state, as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum McpServerState {
    /// Connecting and listing its tools.
    Starting,
    /// Connected; its tools answer.
    Running,
    /// Not connected (it failed to start or exited); the next attempt follows after a backoff.
    Restarting,
    /// The runtime shut it down.
    Stopped,
}

/// One server in `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct McpServerHealth {
    /// Its name.
    pub name: String,
    /// `stdio` or `http`.
    pub transport: &'static str,
    /// Its state.
    pub state: McpServerState,
    /// Why it is not running (the last start or exit error), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many tools it offers (after `tools`/`deny`).
    pub tools: usize,
    /// Tools it listed that were skipped, each with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_tools: Vec<String>,
    /// How many times it was restarted.
    pub restarts: u64,
}

/// Calls and failed calls of one server, for Prometheus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpServerCounts {
    /// The server.
    pub server: String,
    /// Tool calls sent to it (or refused because it was down).
    pub calls: u64,
    /// Calls that ended in `TOOL_EXECUTION_FAILED` (an `isError` result, a timeout, a lost server).
    pub errors: u64,
}

pub(crate) struct Slot {
    pub config: McpServerConfig,
    pub limits: McpLimits,
    pub state: RwLock<SlotState>,
    /// The roots offered to the server (`file://` URIs): the project root of the latest call,
    /// with a generation bumped on every change.
    pub roots: RwLock<(u64, Vec<String>)>,
    /// The roots generation the server last asked for (`roots/list`).
    pub roots_served: tokio::sync::watch::Sender<u64>,
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    /// Bumped on every state change, for [`McpServers::wait_started`].
    pub changed: tokio::sync::watch::Sender<u64>,
}

pub(crate) struct SlotState {
    pub state: McpServerState,
    pub error: Option<String>,
    pub tools: BTreeMap<String, Arc<McpTool>>,
    pub skipped: Vec<String>,
    pub peer: Option<rmcp::Peer<rmcp::RoleClient>>,
    pub restarts: u64,
}

impl Slot {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, SlotState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SlotState)) {
        {
            let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

/// The running MCP servers of one runtime and their tools. Cheap to share (`Arc`); dropping the
/// last handle does not stop them: call [`McpServers::shutdown`].
pub struct McpServers {
    slots: Vec<Arc<Slot>>,
    shutdown: CancellationToken,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for McpServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServers")
            .field(
                "servers",
                &self.slots.iter().map(|s| &s.config.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl McpServers {
    /// Starts a supervisor per server on the current Tokio runtime and returns at once; tools
    /// appear as servers come up ([`McpServers::wait_started`] waits for that).
    pub fn start(config: McpServersConfig, limits: McpLimits) -> Arc<Self> {
        let shutdown = CancellationToken::new();
        let slots: Vec<Arc<Slot>> = config
            .servers
            .into_iter()
            .map(|c| {
                Arc::new(Slot {
                    config: c,
                    limits,
                    state: RwLock::new(SlotState {
                        state: McpServerState::Starting,
                        error: None,
                        tools: BTreeMap::new(),
                        skipped: Vec::new(),
                        peer: None,
                        restarts: 0,
                    }),
                    roots: RwLock::new((0, Vec::new())),
                    roots_served: tokio::sync::watch::channel(0).0,
                    calls: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    changed: tokio::sync::watch::channel(0).0,
                })
            })
            .collect();
        let tasks = slots
            .iter()
            .map(|s| tokio::spawn(client::supervise(s.clone(), shutdown.clone())))
            .collect();
        Arc::new(McpServers {
            slots,
            shutdown,
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    /// Waits until no server is in its first start any more (each is running or restarting), at
    /// most `timeout`.
    pub async fn wait_started(&self, timeout: Duration) {
        let all = async {
            for slot in &self.slots {
                let mut rx = slot.changed.subscribe();
                loop {
                    let starting = {
                        let s = slot.read();
                        s.state == McpServerState::Starting && s.restarts == 0
                    };
                    if !starting || rx.changed().await.is_err() {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(timeout, all).await;
    }

    /// Stops every server (stdio children are killed with their process group) and waits for the
    /// supervisors, at most a few seconds.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// The configured servers.
    pub fn configs(&self) -> Vec<&McpServerConfig> {
        self.slots.iter().map(|s| &s.config).collect()
    }

    fn split<'a>(&self, name: &'a str) -> Option<(&Arc<Slot>, &'a str)> {
        let (server, tool) = name.split_once("__")?;
        let slot = self.slots.iter().find(|s| s.config.name == server)?;
        Some((slot, tool))
    }

    /// Whether `name` has the shape of a tool of a configured server (offered or not).
    pub fn owns(&self, name: &str) -> bool {
        self.split(name).is_some()
    }

    /// The offered tool called `name` (`<server>__<tool>`), if its server listed it.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Tool>> {
        let (slot, _) = self.split(name)?;
        let tool = slot.read().tools.get(name).cloned()?;
        Some(tool)
    }

    /// Whether `agent_type` may call the tool `name`.
    pub fn serves(&self, agent_type: &str, name: &str) -> bool {
        self.split(name)
            .is_some_and(|(slot, _)| slot.config.serves_agent(agent_type))
    }

    /// Whether a call of `name` waits for a human (per the server's `approval`/`tool_approval`).
    pub fn approval_of(&self, name: &str) -> Option<McpApproval> {
        let (slot, tool) = self.split(name)?;
        Some(slot.config.approval_of(tool))
    }

    /// The tool names offered to `agent_type`, sorted.
    pub fn tool_names(&self, agent_type: &str) -> Vec<String> {
        let mut names = Vec::new();
        for slot in self.slots.iter().filter(|s| s.config.serves_agent(agent_type)) {
            names.extend(slot.read().tools.keys().cloned());
        }
        names
    }

    /// The specs offered to `agent_type`, sorted by name.
    pub fn specs(&self, agent_type: &str) -> Vec<ToolSpec> {
        let mut specs = Vec::new();
        for slot in self.slots.iter().filter(|s| s.config.serves_agent(agent_type)) {
            specs.extend(slot.read().tools.values().map(|t| t.spec()));
        }
        specs
    }

    /// A number that changes whenever a server's tools or state change (for caches of offers).
    pub fn generation(&self) -> u64 {
        self.slots.iter().map(|s| *s.changed.borrow()).sum()
    }

    /// Every server's state, in name order.
    pub fn health(&self) -> Vec<McpServerHealth> {
        self.slots
            .iter()
            .map(|slot| {
                let s = slot.read();
                McpServerHealth {
                    name: slot.config.name.clone(),
                    transport: match slot.config.transport {
                        McpTransport::Stdio { .. } => "stdio",
                        McpTransport::Http { .. } => "http",
                    },
                    state: s.state.clone(),
                    error: s.error.clone(),
                    tools: s.tools.len(),
                    skipped_tools: s.skipped.clone(),
                    restarts: s.restarts,
                }
            })
            .collect()
    }

    /// Calls and errors per server, in name order.
    pub fn counts(&self) -> Vec<McpServerCounts> {
        self.slots
            .iter()
            .map(|s| McpServerCounts {
                server: s.config.name.clone(),
                calls: s.calls.load(Ordering::Relaxed),
                errors: s.errors.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl Drop for McpServers {
    fn drop(&mut self) {
        // Supervisors hold only their slot, so they would keep servers alive: stop them.
        self.shutdown.cancel();
    }
}

/// One tool of one server, as offered to the model.
pub(crate) struct McpTool {
    slot: std::sync::Weak<Slot>,
    server: String,
    /// The server's own name of the tool.
    tool: String,
    spec: ToolSpec,
    validator: jsonschema::Validator,
}

impl McpTool {
    /// The tool `listed` of `slot`'s server, or why it is skipped.
    pub(crate) fn new(slot: &Arc<Slot>, listed: &rmcp::model::Tool) -> Result<McpTool, String> {
        let tool = listed.name.to_string();
        let name = format!("{}__{tool}", slot.config.name);
        let fits = !tool.is_empty()
            && name.len() <= 64
            && tool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !fits {
            return Err(format!(
                "'{}': a tool name must be A-Z a-z 0-9 _ - and at most 64 characters with its server prefix",
                truncate(&tool, 80)
            ));
        }
        let schema = Value::Object((*listed.input_schema).clone());
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(format!("'{tool}': its input schema is not of type \"object\""));
        }
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| format!("'{tool}': its input schema is not a valid JSON Schema: {e}"))?;
        Ok(McpTool {
            slot: Arc::downgrade(slot),
            server: slot.config.name.clone(),
            tool,
            spec: ToolSpec {
                name,
                description: listed.description.as_deref().unwrap_or_default().to_string(),
                parameters: schema,
            },
            validator,
        })
    }
}

fn truncate(s: &str, max: usize) -> String {
    crate::context::truncate_output(s, max)
}

#[async_trait]
impl Tool for McpTool {
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }

    fn check(&self, _ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure> {
        if !arguments.is_object() {
            return Err(ToolFailure::Invalid(format!(
                "{}: arguments must be a JSON object",
                self.spec.name
            )));
        }
        let errors: Vec<String> = self
            .validator
            .iter_errors(arguments)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("at `{at}`: {e}")
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ToolFailure::Invalid(format!(
                "{}: invalid arguments: {}",
                self.spec.name,
                errors.join("; ")
            )))
        }
    }

    fn touched_paths(&self, _arguments: &Value) -> Vec<String> {
        // What a server's tool touches is its own business: approval is the guard.
        Vec::new()
    }

    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure> {
        self.check(ctx, &arguments)?;
        let Some(slot) = self.slot.upgrade() else {
            return Err(ToolFailure::Failed(format!(
                "{}: the MCP servers were shut down",
                self.spec.name
            )));
        };
        slot.calls.fetch_add(1, Ordering::Relaxed);
        let result = client::call(&slot, &self.tool, ctx, arguments).await;
        if matches!(result, Err(ToolFailure::Failed(_))) {
            slot.errors.fetch_add(1, Ordering::Relaxed);
        }
        result.map_err(|f| match f {
            ToolFailure::Failed(m) => {
                ToolFailure::Failed(format!("{} (MCP server '{}'): {m}", self.spec.name, self.server))
            }
            other => other,
        })
    }
}

/// `file://` URI of a directory.
pub(crate) fn file_uri(path: &Path) -> String {
    let mut uri = String::from("file://");
    for b in path.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}
