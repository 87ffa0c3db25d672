//! The Orchestrator: the facade embedders, the server and the Python module use. It owns
//! sessions, picks agents, runs turns as tasks that outlive their clients, and streams their events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{Instrument, info_span};

use crate::agent::{AgentInfo, AgentRegistry};
use crate::approval::{Approval, ApprovalPolicy, DangerousToolsPolicy};
use crate::budget::{Budget, BudgetUsage, PriceTable};
use crate::config::{RuntimeConfig, ToolExecution};
use crate::context::{Tokenizer, default_tokenizer};
use crate::error::{Error, Result};
use crate::events::{BusEventKind, BusFilter, EventBus, Subscription};
use crate::llm::{LlmBackend, ModelContext};
use crate::protocol::ClientMessage;
use crate::session::{AgentSwitch, Message, NewSession, Session, Usage};
use crate::storage::{SessionPage, SessionQuery, Storage};
use crate::time::Timestamp;
use crate::tools::ToolRegistry;
use crate::tools::mcp::{McpLimits, McpServers, McpServersConfig};

mod assemble;
mod health;
mod preview;
mod recent;
pub mod routing;
mod stream;
/// One turn as a state machine. `turn/mod.rs`: Turn, TurnState and the run loop, with each
/// call's checks; `submit`: from a submission to a running turn (lease, checks, replays);
/// `start`: the first, stored part, one function per message kind; `decide`: decisions on tool
/// calls and plans; `model`: talking to the model; `plan`: plans; `guard`: loop guards;
/// `recover`: turns interrupted by a crash or cancelled while paused.
mod turn;

pub use health::{Health, ProcessInfo};
pub use preview::{ApprovalPreview, FileChange, MAX_PREVIEW_FILE_BYTES};
pub use stream::{EventStream, Follow};

/// What creating a session takes (every field optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
// The API has always called this body `CreateSessionRequest`; generated clients name their model so.
#[cfg_attr(feature = "schema", schemars(rename = "CreateSessionRequest"))]
pub struct CreateSession {
    /// The owner.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Free JSON object (`project_path`, `tool_execution`, ...).
    #[serde(default)]
    pub metadata: Option<Value>,
    /// A client-chosen id (1–128 chars of `[A-Za-z0-9_.:-]`).
    #[serde(default)]
    pub session_id: Option<String>,
    /// The session's budgets, over the settings' defaults (`null` for one: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Budget>"))]
    pub budget: Option<Value>,
}

/// A message sent into a session, with its optional idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// Same id again in the same session replays the original turn instead of running another.
    pub request_id: Option<String>,
    /// The message.
    pub message: ClientMessage,
}

impl Submission {
    /// A submission without a request id.
    pub fn new(message: ClientMessage) -> Self {
        Submission {
            request_id: None,
            message,
        }
    }

    /// A plain user message.
    pub fn user(content: impl Into<String>) -> Self {
        Submission::new(ClientMessage::UserMessage {
            content: content.into(),
            agent_type: None,
        })
    }
}

/// An agent as `GET /agents/{id}/current` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AgentRef {
    /// The agent type.
    #[serde(rename = "type")]
    pub agent_type: String,
    /// Display name.
    pub name: String,
    /// Emoji.
    pub emoji: String,
    /// When the session switched to it (current agent only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<Timestamp>,
}

/// The session's agent and how it got there (API.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CurrentAgent {
    /// The session.
    pub session_id: String,
    /// The agent now.
    pub current_agent: AgentRef,
    /// The agent before the last switch.
    pub previous_agent: Option<AgentRef>,
    /// Switches in the session.
    pub switch_count: usize,
    /// Every switch, oldest first.
    pub switch_history: Vec<AgentSwitch>,
}

/// A session's stored conversation with the session and its switches, as
/// `GET /sessions/{id}/history` serves them (API.md §9.22).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionHistory {
    /// The session as stored (its `message_count`, `current_agent`, `last_activity`).
    pub session: Session,
    /// Stored messages with seq > `after`, oldest first.
    pub messages: Vec<Message>,
    /// Every switch of the session's agent, oldest first.
    pub agent_history: Vec<AgentSwitch>,
}

/// What [`Orchestrator::drain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// Turns that stopped in time: handed over at a step boundary (or ended meanwhile).
    pub handed_over: usize,
    /// Turns still running when the time was up (resumed elsewhere once this process exits).
    pub still_running: usize,
}

/// What `cancel` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// A running or paused turn was cancelled.
    Cancelled,
    /// Nothing was running.
    Idle,
}

/// Builds an [`Orchestrator`].
pub struct OrchestratorBuilder {
    storage: Arc<dyn Storage>,
    llm: Arc<dyn LlmBackend>,
    config: RuntimeConfig,
    agents: AgentRegistry,
    tools: Option<Arc<ToolRegistry>>,
    mcp: Option<Arc<McpServers>>,
    policy: Option<Arc<dyn ApprovalPolicy>>,
    bus: Option<EventBus>,
    tokenizer: Option<Arc<dyn Tokenizer>>,
    model_context: Option<ModelContext>,
    telemetry: Option<crate::telemetry::Telemetry>,
}

impl OrchestratorBuilder {
    /// Asks the model server for its context size (briefly: see [`LlmBackend::context_size`]),
    /// unless `LLM_CONTEXT_TOKENS` already says it; [`OrchestratorBuilder::build`] then bounds
    /// `MAX_CONTEXT_TOKENS` by it. A server that does not say, or does not answer, changes
    /// nothing (logged).
    pub async fn discover_model_context(mut self) -> Self {
        if self.config.llm.context_tokens.is_some() {
            return self;
        }
        match self.llm.context_size().await {
            Ok(found) => self.model_context = found,
            Err(e) => {
                tracing::warn!(error = %e, "cannot learn the model's context size; set LLM_CONTEXT_TOKENS")
            }
        }
        self
    }

    /// The model's context size as known so far, for tests and embedders that learn it elsewhere.
    pub fn model_context(mut self, context: ModelContext) -> Self {
        self.model_context = Some(context);
        self
    }

    /// Settings (default: [`RuntimeConfig::default`]).
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    /// The agents (default: the product's five).
    pub fn agents(mut self, agents: AgentRegistry) -> Self {
        self.agents = agents;
        self
    }

    /// The tools (default: the eight built-in tools).
    pub fn tools(mut self, tools: Arc<ToolRegistry>) -> Self {
        self.tools = Some(tools);
        self
    }

    /// MCP servers already started (e.g. from [`McpServersConfig`] with [`McpServers::start`]);
    /// without it, `MCP_SERVERS_FILE` (if set) is read and its servers are started in `build`.
    pub fn mcp_servers(mut self, servers: Arc<McpServers>) -> Self {
        self.mcp = Some(servers);
        self
    }

    /// The approval policy (default: HITL settings of the config).
    pub fn policy(mut self, policy: Arc<dyn ApprovalPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The event bus (default: a new one).
    pub fn bus(mut self, bus: EventBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// The tokenizer of the context window (default: `o200k_base`).
    pub fn tokenizer(mut self, tokenizer: Arc<dyn Tokenizer>) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    /// Exports the turns' spans and metrics through `telemetry` (see [`crate::telemetry`];
    /// [`crate::telemetry::Telemetry::start`] makes one from the `OTEL_*` settings). Without it,
    /// no span is built.
    pub fn telemetry(mut self, telemetry: Option<crate::telemetry::Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Checks the settings against the agents and builds the orchestrator.
    pub fn build(mut self) -> Result<Orchestrator> {
        let tools = self
            .tools
            .take()
            .unwrap_or_else(|| Arc::new(ToolRegistry::builtin()));
        self.load_agents_file(&tools)?;
        let mcp = self.take_mcp_servers()?;
        self.check_default_agent()?;
        let model_context = self.bound_window_by_model();
        let c = &self.config;
        let tokenizer = self.tokenizer.unwrap_or_else(default_tokenizer);
        // Loading the BPE ranks takes a moment: pay it here, not in the first turns.
        let _ = tokenizer.count("warm up");
        let policy = self.policy.unwrap_or_else(|| {
            Arc::new(DangerousToolsPolicy::new(
                c.hitl_enabled,
                c.hitl_dangerous_tools.iter(),
            ))
        });
        let prices = load_prices(&self.config)?;
        let mut inner = Inner {
            prices,
            storage: self.storage,
            llm: self.llm,
            agents: self.agents,
            tools,
            mcp,
            policy,
            bus: self.bus.unwrap_or_default(),
            tokenizer,
            owner: format!("runtime_{}", uuid::Uuid::new_v4().simple()),
            liveness: tokio::sync::OnceCell::new(),
            notices: tokio::sync::OnceCell::new(),
            cancel_watch: tokio::sync::OnceCell::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            hubs: Arc::new(stream::Hubs::default()),
            config: self.config,
            offers: HashMap::new(),
            model_context,
            model_check: health::ModelCheck::default(),
            telemetry: self.telemetry,
        };
        // Agents and tools are fixed from here on: what each agent's calls offer is too.
        inner.offers = (inner.agents.list().iter())
            .map(|a| (a.agent_type.clone(), Arc::new(inner.compute_offer(a))))
            .collect();
        Ok(Orchestrator {
            inner: Arc::new(inner),
        })
    }

    /// Adds the agents of `AGENT_RUNTIME__AGENTS_FILE` (if set), whose tools must be in `tools`.
    fn load_agents_file(&mut self, tools: &ToolRegistry) -> Result<()> {
        if let Some(path) = &self.config.agents_file {
            let known: Vec<&str> = tools.names();
            self.agents
                .load_file(path, &known)
                .map_err(|e| Error::InvalidRequest(format!("AGENT_RUNTIME__AGENTS_FILE: {e}")))?;
        }
        Ok(())
    }

    /// The MCP servers: those given to the builder, else those of `MCP_SERVERS_FILE` (started
    /// here), checked against the agents.
    fn take_mcp_servers(&mut self) -> Result<Option<Arc<McpServers>>> {
        let mcp = match (self.mcp.take(), &self.config.mcp_servers_file) {
            (Some(m), _) => Some(m),
            (None, Some(path)) => {
                let config = McpServersConfig::load(path)
                    .map_err(|e| Error::InvalidRequest(format!("MCP_SERVERS_FILE: {e}")))?;
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(Error::InvalidRequest(
                        "MCP_SERVERS_FILE: build the runtime inside a Tokio runtime to start MCP servers"
                            .into(),
                    ));
                }
                let limits = McpLimits {
                    tool_timeout: self.config.mcp_tool_timeout,
                    ..McpLimits::default()
                };
                Some(McpServers::start(config, limits))
            }
            (None, None) => None,
        };
        if let Some(m) = &mcp {
            let known = self.agents.types();
            let configs = McpServersConfig {
                servers: m.configs().into_iter().cloned().collect(),
            };
            configs
                .check_agents(&known)
                .map_err(|e| Error::InvalidRequest(format!("MCP_SERVERS_FILE: {e}")))?;
        }
        Ok(mcp)
    }

    /// `AGENT_RUNTIME__DEFAULT_AGENT` must name a registered agent.
    fn check_default_agent(&self) -> Result<()> {
        let c = &self.config;
        if !self.agents.contains(&c.default_agent) {
            return Err(Error::InvalidRequest(format!(
                "AGENT_RUNTIME__DEFAULT_AGENT: unknown agent '{}' (known: {})",
                c.default_agent,
                self.agents.types().join(", ")
            )));
        }
        Ok(())
    }

    /// The model's context size (`LLM_CONTEXT_TOKENS` over what the model server said), with
    /// `MAX_CONTEXT_TOKENS` bounded by it.
    fn bound_window_by_model(&mut self) -> Option<ModelContext> {
        let model_context = match self.config.llm.context_tokens {
            Some(n) => Some(ModelContext::new(n as u64, "LLM_CONTEXT_TOKENS")),
            None => self.model_context.take(),
        };
        self.config.max_context_tokens = bound_window(self.config.max_context_tokens, model_context.as_ref());
        model_context
    }
}

/// `MODEL_PRICES_FILE`'s table (empty when unset); a missing price for `LLM_MODEL` is logged.
fn load_prices(config: &RuntimeConfig) -> Result<PriceTable> {
    let prices = match &config.model_prices_file {
        Some(path) => PriceTable::load(path)?,
        None => PriceTable::default(),
    };
    if config.model_prices_file.is_some() && prices.get(&config.llm.model).is_none() {
        tracing::warn!(
            model = %config.llm.model,
            "MODEL_PRICES_FILE has no price for LLM_MODEL: tokens are counted, cost is not, and cost budgets do not apply"
        );
    }
    Ok(prices)
}

pub(crate) struct Inner {
    pub storage: Arc<dyn Storage>,
    pub llm: Arc<dyn LlmBackend>,
    pub agents: AgentRegistry,
    pub tools: Arc<ToolRegistry>,
    /// The MCP servers and their tools (changing while the runtime runs).
    pub mcp: Option<Arc<McpServers>>,
    pub policy: Arc<dyn ApprovalPolicy>,
    pub bus: EventBus,
    pub tokenizer: Arc<dyn Tokenizer>,
    pub config: RuntimeConfig,
    /// This instance's lease owner id.
    pub owner: String,
    /// Held from the first lease on: while it lives (and the process runs), other processes
    /// wait for this owner's leases to expire; once it is gone they take them at once.
    pub liveness: tokio::sync::OnceCell<crate::storage::Liveness>,
    /// Set once the store's commit notices (if it has any) wake this process's followers.
    pub notices: tokio::sync::OnceCell<()>,
    /// Set once this process watches for requests of other processes to cancel its turns.
    pub cancel_watch: tokio::sync::OnceCell<()>,
    /// Set by [`Orchestrator::drain`]: no new turn starts here, none is taken over.
    pub draining: std::sync::atomic::AtomicBool,
    pub hubs: Arc<stream::Hubs>,
    /// Per agent type, what its model calls offer (computed once in `build`).
    pub offers: HashMap<String, Arc<Offer>>,
    /// The model's context size, when known (`LLM_CONTEXT_TOKENS` or the model server).
    pub model_context: Option<ModelContext>,
    /// The last `/health` model check.
    pub model_check: health::ModelCheck,
    /// `MODEL_PRICES_FILE`, empty when unset.
    pub prices: PriceTable,
    /// Where spans and metrics go; `None`: telemetry off, nothing built.
    pub telemetry: Option<crate::telemetry::Telemetry>,
}

/// `MAX_CONTEXT_TOKENS` bounded by the model's context (see [`ModelContext::window_bound`]),
/// logged either way so an operator sees the window in force.
fn bound_window(configured: usize, model: Option<&ModelContext>) -> usize {
    let Some(model) = model else {
        tracing::info!(
            max_context_tokens = configured,
            "context window: MAX_CONTEXT_TOKENS; the model's context size is unknown (set LLM_CONTEXT_TOKENS)"
        );
        return configured;
    };
    let bound = model.window_bound().max(1);
    if configured > bound {
        tracing::warn!(
            max_context_tokens = bound,
            configured,
            model_context = model.tokens,
            source = %model.source,
            "context window lowered to three quarters of the model's context"
        );
        bound
    } else {
        tracing::info!(
            max_context_tokens = configured,
            model_context = model.tokens,
            source = %model.source,
            "context window: MAX_CONTEXT_TOKENS fits the model's context"
        );
        configured
    }
}

impl Inner {
    /// The sandbox of `agent_type`'s commands; an unknown agent gets a read-only project.
    pub(crate) fn command_sandbox(&self, agent_type: &str) -> crate::tools::CommandSandbox {
        let settings = &self.config.sandbox;
        match self.agents.get(agent_type) {
            Some(a) => settings.for_agent(a),
            None => crate::tools::CommandSandbox {
                mode: settings.mode,
                project_writable: false,
                network: false,
                read_paths: settings.read_paths.clone(),
                write_paths: settings.write_paths.clone(),
            },
        }
    }
}

/// What an agent's model calls offer: its tools' specs (shared by every request), the tokens
/// their descriptions and schemas count in a prompt, and the window those leave for history.
pub(crate) struct Offer {
    pub tools: Arc<[crate::protocol::ToolSpec]>,
    pub tool_tokens: usize,
    pub limits: crate::context::ContextLimits,
}

impl Inner {
    /// Whether [`Orchestrator::drain`] has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From the first follower on, wakes this process's followers when another process commits
    /// to their session (Postgres LISTEN/NOTIFY); without notices they poll the store.
    pub(crate) async fn listen_for_commits(&self) {
        self.notices
            .get_or_init(|| async {
                let notices = match self.storage.commit_notices().await {
                    Ok(Some(n)) => n,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for commits of other processes; followers poll");
                        return;
                    }
                };
                let (hubs, own) = (Arc::downgrade(&self.hubs), self.owner.clone());
                tokio::spawn(async move {
                    use futures::StreamExt;
                    let mut notices = notices;
                    while let Some(n) = notices.next().await {
                        let Some(hubs) = hubs.upgrade() else { return };
                        // This process's own commits reach its followers through the hub.
                        if n.owner != own {
                            hubs.wake(&n.session_id);
                        }
                    }
                });
            })
            .await;
    }

    /// From the first turn on, cancels this process's turns that another process asked to cancel
    /// ([`Storage::request_cancel`]): woken by the store's cancel notices (Postgres), and looking
    /// every [`CANCEL_POLL`] while turns run here (every [`CANCEL_POLL_NOTIFIED`] with notices,
    /// which cover a lost notice).
    pub(crate) async fn watch_cancel_requests(self: &Arc<Self>) {
        self.cancel_watch
            .get_or_init(|| async {
                let notices = match self.storage.cancel_notices().await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for cancel requests of other processes; polling for them");
                        None
                    }
                };
                let every = if notices.is_some() { CANCEL_POLL_NOTIFIED } else { CANCEL_POLL };
                let weak = Arc::downgrade(self);
                tokio::spawn(async move {
                    use futures::StreamExt;
                    let mut notices = notices;
                    loop {
                        let woken = async {
                            match notices.as_mut() {
                                Some(n) => n.next().await,
                                None => std::future::pending().await,
                            }
                        };
                        let notice = tokio::select! {
                            n = woken => match n {
                                Some(n) => Some(n),
                                None => {
                                    notices = None; // the listener is gone: poll from now on
                                    None
                                }
                            },
                            _ = tokio::time::sleep(every) => None,
                        };
                        let Some(rt) = weak.upgrade() else { return };
                        if notice.as_ref().is_some_and(|n| n.owner != rt.owner) {
                            continue;
                        }
                        if rt.hubs.all_running().is_empty() {
                            continue;
                        }
                        rt.cancel_requested_turns().await;
                    }
                });
            })
            .await;
    }

    /// Cancels the turns running here whose sessions carry a cancel request for this owner.
    async fn cancel_requested_turns(&self) {
        match self.storage.cancel_requests(&self.owner).await {
            Ok(ids) => {
                for id in ids {
                    if let Some(turn) = self.hubs.running(&id) {
                        if !turn.cancel.is_cancelled() {
                            tracing::info!(session_id = %id, "another process asked to cancel this turn");
                        }
                        turn.cancel.cancel();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for cancel requests failed"),
        }
    }

    /// Registers this owner as alive before it takes its first lease. A store that cannot
    /// register it (say, a read-only folder for SQLite's lock files) is logged and retried at the
    /// next lease: its leases are then judged by expiry alone, as before liveness existed.
    pub(crate) async fn prove_alive(&self) {
        if self.liveness.initialized() {
            return;
        }
        let held = self
            .liveness
            .get_or_try_init(|| self.storage.hold_liveness(&self.owner))
            .await;
        if let Err(e) = held {
            tracing::warn!(owner = %self.owner, error = %e, "cannot register this process as alive; \
                other processes will wait for its leases to expire if it dies");
        }
    }

    /// What `agent`'s model calls offer (tool schemas are generated and counted once, in `build`).
    pub(crate) fn offer(&self, agent: &crate::agent::AgentDefinition) -> Arc<Offer> {
        if let Some(mcp) = &self.mcp {
            let extra = mcp.specs(&agent.agent_type);
            if !extra.is_empty() {
                // MCP tools change while the runtime runs: their offer is computed per call.
                let mut tools = self.tool_specs(agent);
                tools.extend(extra);
                return Arc::new(self.offer_of(tools));
            }
        }
        match self.offers.get(&agent.agent_type) {
            Some(o) => o.clone(),
            None => Arc::new(self.compute_offer(agent)),
        }
    }

    fn compute_offer(&self, agent: &crate::agent::AgentDefinition) -> Offer {
        self.offer_of(self.tool_specs(agent))
    }

    fn offer_of(&self, tools: Vec<crate::protocol::ToolSpec>) -> Offer {
        let tool_tokens = self.tool_tokens(&tools);
        let limits = self.context_limits(tool_tokens + 8 * tools.len());
        Offer {
            tools: tools.into(),
            tool_tokens,
            limits,
        }
    }

    /// The tokens `tools` count in a prompt: an agent's offer knows its count (looked up by the
    /// shared list's address, no schema written out again); any other list is counted.
    pub(crate) fn offered_tool_tokens(&self, tools: &Arc<[crate::protocol::ToolSpec]>) -> usize {
        if tools.is_empty() {
            return 0;
        }
        (self.offers.values())
            .find(|o| Arc::ptr_eq(&o.tools, tools))
            .map_or_else(|| self.tool_tokens(tools), |o| o.tool_tokens)
    }

    /// The tokens `tools`' descriptions and schemas count in a prompt.
    pub(crate) fn tool_tokens(&self, tools: &[crate::protocol::ToolSpec]) -> usize {
        tools
            .iter()
            .map(|t| self.tokenizer.count(&t.description) + self.tokenizer.count(&t.parameters.to_string()))
            .sum()
    }

    /// The tools offered to `agent`'s model calls: its own, plus `switch_agent` while automatic
    /// switching is on.
    fn tool_specs(&self, agent: &crate::agent::AgentDefinition) -> Vec<crate::protocol::ToolSpec> {
        let names: Vec<&str> = agent.tools.iter().map(String::as_str).collect();
        let mut tools = self.tools.specs(&names);
        if self.auto_switching() {
            tools.push(routing::switch_spec(&self.agents.types()));
        }
        tools
    }

    /// The tool called `name`: a built-in one, else an offered MCP tool.
    pub(crate) fn tool(&self, name: &str) -> Option<Arc<dyn crate::tools::Tool>> {
        self.tools
            .get(name)
            .or_else(|| self.mcp.as_ref().and_then(|m| m.get(name)))
    }

    /// Whether `name` is an MCP tool (`<server>__<tool>` of a configured server, not a built-in).
    pub(crate) fn is_mcp(&self, name: &str) -> bool {
        self.tools.get(name).is_none() && self.mcp.as_ref().is_some_and(|m| m.owns(name))
    }

    /// Whether agents may switch on their own (routing and the `switch_agent` tool).
    pub(crate) fn auto_switching(&self) -> bool {
        self.config.multi_agent_enabled && self.config.auto_agent_switching
    }

    /// The window's limits for a call whose tools take `schemas` tokens: the token budget leaves
    /// room for them and for the answer (`LLM_MAX_TOKENS`).
    fn context_limits(&self, schemas: usize) -> crate::context::ContextLimits {
        let answer = self.config.llm.max_tokens.unwrap_or(0) as usize;
        crate::context::ContextLimits {
            max_messages: self.config.max_context_messages,
            max_tokens: self
                .config
                .max_context_tokens
                .saturating_sub(schemas + answer)
                .max(1),
        }
    }
}

/// The runtime's facade: sessions, agents, turns and their event streams, approvals.
///
/// Cheap to clone; every clone is the same runtime.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("owner", &self.inner.owner)
            .finish()
    }
}

/// Checks a client-chosen session id: 1–128 chars of `[A-Za-z0-9_.:-]`.
pub fn validate_session_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(
            "session_id must be 1-128 characters of A-Z a-z 0-9 _ . : -".into(),
        ))
    }
}

impl Orchestrator {
    /// Starts building an orchestrator over a store and a model backend.
    pub fn builder(storage: Arc<dyn Storage>, llm: Arc<dyn LlmBackend>) -> OrchestratorBuilder {
        OrchestratorBuilder {
            storage,
            llm,
            config: RuntimeConfig::default(),
            agents: AgentRegistry::defaults(),
            tools: None,
            mcp: None,
            policy: None,
            bus: None,
            tokenizer: None,
            model_context: None,
            telemetry: None,
        }
    }

    /// The settings in force (`MAX_CONTEXT_TOKENS` as bounded by the model's context).
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The model's context size, when `LLM_CONTEXT_TOKENS` or the model server said it.
    pub fn model_context(&self) -> Option<&ModelContext> {
        self.inner.model_context.as_ref()
    }

    /// The store.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    /// The telemetry exporter, when telemetry is on.
    pub fn telemetry(&self) -> Option<&crate::telemetry::Telemetry> {
        self.inner.telemetry.as_ref()
    }

    /// The model backend.
    pub fn llm(&self) -> &Arc<dyn LlmBackend> {
        &self.inner.llm
    }

    /// The agents.
    pub fn agent_registry(&self) -> &AgentRegistry {
        &self.inner.agents
    }

    /// The agents as `GET /agents` lists them, each with its command rights.
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.inner
            .agents
            .list()
            .iter()
            .map(|a| {
                let mut info = AgentInfo {
                    command_rights: Some(self.inner.config.sandbox.for_agent(a).rights()),
                    ..a.info()
                };
                if let Some(mcp) = &self.inner.mcp {
                    info.tools.extend(mcp.tool_names(&a.agent_type));
                }
                info
            })
            .collect()
    }

    /// The MCP servers, when any are configured (`/health`, `/metrics`).
    pub fn mcp_servers(&self) -> Option<&Arc<McpServers>> {
        self.inner.mcp.as_ref()
    }

    /// The process sandbox as the kernel allows it (`GET /health`).
    pub fn sandbox_status(&self) -> crate::tools::SandboxStatus {
        crate::tools::isolation::status(self.inner.config.sandbox.mode)
    }

    /// Subscribes to the EventBus.
    pub fn subscribe(&self, filter: BusFilter) -> Subscription {
        self.inner.bus.subscribe(filter)
    }

    /// The EventBus.
    pub fn bus(&self) -> &EventBus {
        &self.inner.bus
    }

    /// Creates a session on the default agent. `INVALID_REQUEST` for a bad id, a metadata value
    /// that is not an object, a `project_path` that is not an existing absolute directory (inside
    /// `PROJECT_ROOTS` when set, symlinks resolved), or an unknown `tool_execution`; `SESSION_EXISTS` for a taken id.
    #[tracing::instrument(skip_all)]
    pub async fn create_session(&self, req: CreateSession) -> Result<Session> {
        let id = match req.session_id {
            Some(id) => {
                validate_session_id(&id)?;
                id
            }
            None => format!("session_{}", uuid::Uuid::new_v4()),
        };
        let metadata = match req.metadata {
            None | Some(Value::Null) => json!({}),
            Some(Value::Object(m)) => Value::Object(m),
            Some(_) => return Err(Error::InvalidRequest("metadata must be a JSON object".into())),
        };
        if let Some(mode) = metadata.get("tool_execution")
            && mode.as_str().and_then(ToolExecution::parse).is_none()
        {
            return Err(Error::InvalidRequest(
                "metadata.tool_execution must be \"runtime\" or \"client\"".into(),
            ));
        }
        if let Some(p) = metadata.get("project_path") {
            let p = p
                .as_str()
                .ok_or_else(|| Error::InvalidRequest("metadata.project_path must be a string".into()))?;
            self.check_project_path(p)?;
        }
        let mut budget = self.inner.config.budget;
        if let Some(b) = req.budget.as_ref().filter(|b| !b.is_null()) {
            let (set, cleared) = Budget::parse_patch(b)?;
            budget = budget.patched(&set, &cleared);
        }
        let session = self
            .inner
            .storage
            .create_session(NewSession {
                id,
                user_id: req.user_id,
                metadata,
                current_agent: self.inner.config.default_agent.clone(),
                created_at: Timestamp::now(),
                budget,
            })
            .await?;
        self.inner.bus.publish(
            BusEventKind::SessionCreated,
            &session.id,
            json!({"user_id": session.user_id}),
        );
        Ok(session)
    }

    fn check_project_path(&self, p: &str) -> Result<PathBuf> {
        let path = Path::new(p);
        if !path.is_absolute() {
            return Err(Error::InvalidRequest(format!(
                "project_path '{p}' must be an absolute path"
            )));
        }
        let real = path.canonicalize().ok().filter(|r| r.is_dir()).ok_or_else(|| {
            Error::InvalidRequest(format!("project_path '{p}' is not an existing directory"))
        })?;
        let roots = &self.inner.config.project_roots;
        if !roots.is_empty()
            && !roots
                .iter()
                .any(|r| r.canonicalize().is_ok_and(|r| real.starts_with(r)))
        {
            return Err(Error::InvalidRequest(format!(
                "project_path '{p}' (real path '{}') is not inside any folder of PROJECT_ROOTS ({}); open a project under one of them or add its folder to PROJECT_ROOTS",
                real.display(),
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(real)
    }

    /// One session. `SESSION_NOT_FOUND` if absent.
    pub async fn get_session(&self, id: &str) -> Result<Session> {
        self.inner.storage.get_session(id).await
    }

    /// Sessions, newest activity first. `limit` must be 1–1000.
    pub async fn list_sessions(&self, query: SessionQuery) -> Result<SessionPage> {
        if !(1..=1000).contains(&query.limit) {
            return Err(Error::InvalidRequest("limit must be between 1 and 1000".into()));
        }
        self.inner.storage.list_sessions(query).await
    }

    /// Deletes a session and everything of it, cancelling its running turn first (wherever it
    /// runs: see [`Orchestrator::cancel`]).
    #[tracing::instrument(skip(self))]
    pub async fn delete_session(&self, id: &str) -> Result<()> {
        let session = self.inner.storage.get_session(id).await?;
        if let Some(turn) = self.inner.hubs.running(id) {
            stop_turn(&turn).await;
        } else if session.status == crate::session::SessionStatus::Running {
            // Running on another process: stopped there first, so it writes nothing after the
            // delete. If it does not stop in time, the delete goes ahead; its later commits fail.
            if let Err(e) = turn::cancel(self.inner.clone(), id).await {
                tracing::warn!(session_id = id, error = %e, "deleting a session whose turn did not stop");
            }
        }
        self.inner.storage.delete_session(id).await?;
        self.inner
            .bus
            .publish(BusEventKind::SessionDeleted, id, json!({}));
        Ok(())
    }

    /// Stored messages with seq > `after`, oldest first.
    pub async fn messages(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Message>> {
        if !(1..=1000).contains(&limit) {
            return Err(Error::InvalidRequest("limit must be between 1 and 1000".into()));
        }
        self.inner.storage.messages_after(session_id, after, limit).await
    }

    /// Stored messages with seq > `after` (at most `limit`, 1–1000), with the session and every
    /// switch of its agent. `SESSION_NOT_FOUND` if absent.
    pub async fn history(&self, session_id: &str, after: u64, limit: usize) -> Result<SessionHistory> {
        if !(1..=1000).contains(&limit) {
            return Err(Error::InvalidRequest("limit must be between 1 and 1000".into()));
        }
        let (session, messages, agent_history) = self
            .inner
            .storage
            .session_history(session_id, after, limit)
            .await?;
        Ok(SessionHistory {
            session,
            messages,
            agent_history,
        })
    }

    /// The session's agent, the one before, and every switch.
    pub async fn current_agent(&self, session_id: &str) -> Result<CurrentAgent> {
        let session = self.inner.storage.get_session(session_id).await?;
        let history = self.inner.storage.switch_history(session_id).await?;
        let agent_ref = |t: &str, at: Option<Timestamp>| {
            let (name, emoji) = match self.inner.agents.get(t) {
                Some(a) => (a.name.clone(), a.emoji.clone()),
                None => (t.to_string(), String::new()),
            };
            AgentRef {
                agent_type: t.to_string(),
                name,
                emoji,
                switched_at: at,
            }
        };
        let last = history.last();
        Ok(CurrentAgent {
            session_id: session.id.clone(),
            current_agent: agent_ref(
                &session.current_agent,
                Some(last.map_or(session.created_at, |s| s.timestamp)),
            ),
            previous_agent: last.map(|s| agent_ref(&s.from_agent, None)),
            switch_count: history.len(),
            switch_history: history,
        })
    }

    /// Pending approvals of the session, oldest first.
    pub async fn pending_approvals(&self, session_id: &str) -> Result<Vec<Approval>> {
        self.inner.storage.get_session(session_id).await?;
        self.inner.storage.pending_approvals(session_id).await
    }

    /// Tokens used by every turn of the session.
    pub async fn usage(&self, session_id: &str) -> Result<Usage> {
        Ok(self.inner.storage.get_session(session_id).await?.usage)
    }

    /// What the session spent and what remains of its budgets (`GET /sessions/{id}/usage`).
    pub async fn budget_usage(&self, session_id: &str) -> Result<BudgetUsage> {
        let session = self.inner.storage.get_session(session_id).await?;
        Ok(turn::budget_usage(&self.inner, &session))
    }

    /// Changes the session's budgets: `patch` is a `budget` object whose keys set a limit, or
    /// clear it with `null`; the others stay. Takes effect at the turn's next step, also in a
    /// running turn. `INVALID_REQUEST` for a bad key or value, nothing changed.
    pub async fn set_budget(&self, session_id: &str, patch: &Value) -> Result<Session> {
        let (set, cleared) = Budget::parse_patch(patch)?;
        let session = self.inner.storage.get_session(session_id).await?;
        let budget = session.budget.patched(&set, &cleared);
        let c = crate::storage::Commit {
            at: Some(Timestamp::now()),
            session: crate::storage::SessionUpdate {
                budget: Some(budget),
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(self.inner.storage.commit(session_id, c).await?.session)
    }

    /// Sends a message into a session and returns the stream of the turn's events.
    ///
    /// Errors detectable before the first event come back here (API.md §9.1): `SESSION_NOT_FOUND`,
    /// `INVALID_REQUEST`, `SESSION_BUSY`, `CONTEXT_TOO_LARGE`, `APPROVAL_NOT_FOUND`,
    /// `APPROVAL_ALREADY_DECIDED`, `INVALID_TOOL` (a bad edit), `TOOL_CALL_NOT_FOUND`. Later
    /// failures are `error` events. The turn runs on its own task: dropping the stream never
    /// cancels it.
    pub async fn submit(&self, session_id: &str, submission: Submission) -> Result<EventStream> {
        let span = info_span!("submit", session_id, kind = submission_kind(&submission.message));
        turn::submit(self.inner.clone(), session_id, submission)
            .instrument(span)
            .await
    }

    /// The session's events with seq > `after`: replayed, then followed as `follow` says.
    pub async fn events(&self, session_id: &str, after: u64, follow: Follow) -> Result<EventStream> {
        self.inner.storage.get_session(session_id).await?;
        self.inner.listen_for_commits().await;
        Ok(EventStream::new(
            self.inner.storage.clone(),
            self.inner.hubs.clone(),
            session_id,
            after,
            follow,
        ))
    }

    /// Cancels the running or paused turn of the session, wherever it runs: a turn running on
    /// another process sharing the store is asked to stop through the store, and this returns once
    /// it has stored its end (`SESSION_BUSY` if it has not within 10 s).
    pub async fn cancel(&self, session_id: &str) -> Result<CancelOutcome> {
        turn::cancel(self.inner.clone(), session_id).await
    }

    /// Takes over the turns whose process stopped (a crash, a kill, a lost connection, a drain):
    /// each is resumed here from its last stored step (`turn_resumed`), or with
    /// `TURN_RECOVERY=interrupt` marked interrupted (open tool calls get an "interrupted" result,
    /// the session takes new messages). A turn counts as stopped once its lease has expired or
    /// its owner is dead (see [`Storage::hold_liveness`]), so a restarted process recovers its
    /// predecessor's turns at once. Returns how many it took over.
    pub async fn recover_interrupted(&self) -> Result<usize> {
        turn::recover_interrupted(self.inner.clone()).await
    }

    /// Looks for stopped turns every `every` and recovers them ([`recover_interrupted`]), for as
    /// long as this orchestrator lives: with several processes on one database, whichever notices
    /// first recovers the turns of one that died. Needs a Tokio runtime.
    ///
    /// [`recover_interrupted`]: Orchestrator::recover_interrupted
    pub fn watch_for_stopped_turns(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                match turn::recover_interrupted(inner).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(turns = n, "took over the turns of a stopped process"),
                    Err(e) => tracing::warn!(error = %e, "looking for stopped turns failed"),
                }
            }
        })
    }

    /// Drains this process for a restart or a scale-down, losing nothing: from now on it starts
    /// no turn (`SHUTTING_DOWN`) and takes over none; each turn running here stops at its next
    /// step boundary (after its current commit: a tool that runs finishes, a streaming model
    /// answer is cut) and is handed over — its state stored, the session still `running`, its
    /// lease released — so another process on the same database (or this one restarted)
    /// resumes it at once (`turn_resumed` with reason `handed_over`). Then every event stream
    /// of this process ends without `done`, so clients reconnect elsewhere with
    /// `Last-Event-ID`. Waits at most `timeout` for the turns; a turn still running then (a
    /// long tool) is resumed elsewhere once this process exits, as if it had died.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let running = self.inner.hubs.all_running();
        let waits = running.iter().map(|t| async move {
            let finished = t.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            t.handover.cancel();
            finished.await;
        });
        let _ = tokio::time::timeout(timeout, futures::future::join_all(waits)).await;
        let still_running = self.inner.hubs.all_running().len();
        self.inner.hubs.close();
        DrainReport {
            handed_over: running.len().saturating_sub(still_running),
            still_running,
        }
    }

    /// Whether [`Orchestrator::drain`] has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.is_draining()
    }

    /// Stops every turn running in this process (graceful shutdown): each ends with `done`
    /// (`cancelled`) and its session takes new messages.
    pub async fn shutdown(&self, grace: Duration) {
        let running = self.inner.hubs.all_running();
        let waits = running.iter().map(|t| async move {
            let _ = tokio::time::timeout(grace, stop_turn(t)).await;
        });
        futures::future::join_all(waits).await;
        if let Some(mcp) = &self.inner.mcp {
            mcp.shutdown().await;
        }
    }
}

fn submission_kind(m: &ClientMessage) -> &'static str {
    match m {
        ClientMessage::UserMessage { .. } => "user_message",
        ClientMessage::SwitchAgent { .. } => "switch_agent",
        ClientMessage::ToolResult { .. } => "tool_result",
        ClientMessage::HitlDecision(_) => "hitl_decision",
    }
}

/// How often a process with running turns looks for requests to cancel them when the store
/// cannot notify it (SQLite): the bound on how late a cancel from another process arrives.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// The same when the store notifies (Postgres): it only covers a lost notice.
const CANCEL_POLL_NOTIFIED: Duration = Duration::from_millis(250);

/// Cancels a turn running here and waits (bounded) until it has committed its end.
async fn stop_turn(turn: &stream::RunningTurn) {
    let finished = turn.finished.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    turn.cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), finished).await;
}
