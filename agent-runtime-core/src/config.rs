//! Runtime settings (API.md §8) as plain data. Only [`RuntimeConfig::from_env`] reads the
//! environment; [`RuntimeConfig::from_lookup`] parses any source (server flags, Python kwargs).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::budget::{Budget, BudgetKind};
use crate::error::{Error, Result};
use crate::llm::Capabilities;
use crate::tools::{SandboxMode, SandboxSettings};

/// Where tools run (API.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolExecution {
    /// The runtime executes tools inside the session's `project_path`.
    Runtime,
    /// The client executes tools and sends `tool_result`.
    Client,
}

impl ToolExecution {
    /// Parses `runtime` / `client`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "runtime" => Some(ToolExecution::Runtime),
            "client" => Some(ToolExecution::Client),
            _ => None,
        }
    }
}

/// What a live process does with a turn whose process stopped mid-turn (`TURN_RECOVERY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnRecovery {
    /// Continue it from its last committed step: a model call in flight is asked again, a
    /// read-only tool in flight runs again, one with side effects gets an "interrupted" result.
    Resume,
    /// End it at once: open calls get "interrupted", then `error` and `done`.
    Interrupt,
}

impl TurnRecovery {
    /// Parses `resume` / `interrupt`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "resume" => Some(TurnRecovery::Resume),
            "interrupt" => Some(TurnRecovery::Interrupt),
            _ => None,
        }
    }
}

/// The model endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmSettings {
    /// `LLM_PROXY_URL`: base URL of an OpenAI-compatible API.
    pub proxy_url: String,
    /// `LLM_MODEL`.
    pub model: String,
    /// `LLM_API_KEY`, sent as a bearer token.
    pub api_key: Option<String>,
    /// `LLM_CAPABILITIES`: what the model server really does (`full`, `llama-cpp-python`, or a
    /// comma list of `auto_tool_choice,named_tool_choice,parallel_tool_calls,usage_reporting`).
    pub capabilities: Capabilities,
    /// `LLM_MAX_TOKENS`: the most tokens one answer may have (also reserved in the window).
    pub max_tokens: Option<u32>,
    /// `LLM_FORCED_TOOL_STEPS`: for a model that cannot choose tools itself (no auto tool
    /// choice), how many tool results it may gather after the user's message before it must answer.
    pub forced_tool_steps: u32,
    /// `LLM_FIRST_BYTE_TIMEOUT_SECS`: how long a model call waits for the first piece of the
    /// answer (prompt processing included) before the turn ends with `LLM_ERROR`.
    pub first_byte_timeout: Duration,
    /// `LLM_CONTEXT_TOKENS`: the model's context size, when the model server does not tell it
    /// (llama.cpp's `/props`, vLLM's `/v1/models`, Ollama's `/api/show` do; this setting wins).
    pub context_tokens: Option<usize>,
}

/// Every setting the core reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// The model endpoint.
    pub llm: LlmSettings,
    /// `HITL_ENABLED`.
    pub hitl_enabled: bool,
    /// `HITL_DANGEROUS_TOOLS`.
    pub hitl_dangerous_tools: Vec<String>,
    /// `MAX_CONTEXT_TOKENS`: bounded at start-up by the model's context size (see
    /// [`LlmSettings::context_tokens`]).
    pub max_context_tokens: usize,
    /// `MAX_CONTEXT_MESSAGES`.
    pub max_context_messages: usize,
    /// `AGENT_RUNTIME__MULTI_AGENT_ENABLED`.
    pub multi_agent_enabled: bool,
    /// `AGENT_RUNTIME__DEFAULT_AGENT`.
    pub default_agent: String,
    /// `AGENT_RUNTIME__AUTO_AGENT_SWITCHING`.
    pub auto_agent_switching: bool,
    /// `AGENT_RUNTIME__MAX_AGENT_SWITCHES`: automatic switches allowed in one turn.
    pub max_agent_switches: u32,
    /// `AGENT_RUNTIME__PLANS_ENABLED`: the orchestrator may propose a plan (API.md §5.5).
    pub plans_enabled: bool,
    /// `AGENT_RUNTIME__AGENTS_FILE`: a JSON array of agent definitions (`type`, `name`,
    /// `description`, `emoji`, `tools`, `restrictions`, `path_rule`, `system_prompt`) added to the
    /// five default agents, replacing those of the same type.
    pub agents_file: Option<PathBuf>,
    /// `TOOL_EXECUTION`: the default for sessions that do not say.
    pub tool_execution: ToolExecution,
    /// `PROJECT_ROOTS` (alias `WORKSPACE_ROOTS`): if non-empty, every `project_path` must be inside
    /// one of these folders once symlinks are resolved.
    pub project_roots: Vec<PathBuf>,
    /// The process sandbox of tool commands (`SANDBOX`, `SANDBOX_READ_PATHS`, `SANDBOX_WRITE_PATHS`,
    /// `SANDBOX_NETWORK_AGENTS`).
    pub sandbox: SandboxSettings,
    /// `COMMAND_TIMEOUT_SECS`.
    pub command_timeout: Duration,
    /// `MCP_SERVERS_FILE`: the MCP servers whose tools the agents get (`{"mcpServers": {..}}`).
    pub mcp_servers_file: Option<PathBuf>,
    /// `MCP_TOOL_TIMEOUT_SECS`: the bound of one MCP tool call.
    pub mcp_tool_timeout: Duration,
    /// `MAX_TURN_ITERATIONS`: model calls per turn.
    pub max_turn_iterations: u32,
    /// `MAX_TOOL_OUTPUT_BYTES`.
    pub max_tool_output_bytes: usize,
    /// Sampling temperature sent to the model (`LLM_TEMPERATURE`), if any.
    pub temperature: Option<f32>,
    /// How long a turn's session lease lasts without renewal (`SESSION_LEASE_SECS`).
    pub lease_ttl: Duration,
    /// `ROUTING_TIMEOUT_SECS`: how long the orchestrator's routing call waits for the model's
    /// first byte before the keyword classifier decides instead.
    pub routing_timeout: Duration,
    /// `TURN_RECOVERY`: what happens to a turn whose process stopped (default: resume).
    pub turn_recovery: TurnRecovery,
    /// Default budgets of new sessions (`SESSION_TOKEN_BUDGET`, `SESSION_COST_BUDGET`,
    /// `TURN_TOKEN_BUDGET`, `TURN_COST_BUDGET`, `TURN_TIME_BUDGET_SECS`, `TURN_TOOL_CALL_BUDGET`);
    /// unset is unlimited.
    #[serde(default)]
    pub budget: Budget,
    /// `MODEL_PRICES_FILE`: prices per million tokens by model (see [`crate::budget::PriceTable`]).
    #[serde(default)]
    pub model_prices_file: Option<PathBuf>,
    /// OpenTelemetry export (the standard `OTEL_*` variables); off without an endpoint.
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

/// OpenTelemetry traces and metrics over OTLP/HTTP (protobuf), read from the standard `OTEL_*`
/// variables. Export is off when no endpoint is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetrySettings {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (the collector's base URL; `/v1/traces` and `/v1/metrics` are
    /// added) or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full traces URL, which wins for traces).
    pub endpoint: Option<String>,
    /// The full traces URL, when set apart from the base.
    pub traces_endpoint: Option<String>,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: String,
    /// `OTEL_TRACES_SAMPLER` (`always_on`, `always_off`, `traceidratio`, `parentbased_always_on`,
    /// `parentbased_always_off`, `parentbased_traceidratio`).
    pub sampler: String,
    /// `OTEL_TRACES_SAMPLER_ARG`: the ratio of the `traceidratio` samplers, 0 to 1.
    pub sampler_ratio: f64,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds): how long one export may take before it is
    /// given up and its spans counted as dropped.
    pub export_timeout: Duration,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans waiting for export; past it new spans are dropped and
    /// counted.
    pub max_queue_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY` (milliseconds): the longest a finished span waits for export.
    pub schedule_delay: Duration,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: spans per export request.
    pub max_export_batch_size: usize,
    /// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds): how often metrics are exported.
    pub metric_export_interval: Duration,
    /// `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`: record prompts, answers and tool
    /// arguments/results on the spans (off: only names, ids, counts).
    pub capture_content: bool,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            endpoint: None,
            traces_endpoint: None,
            service_name: "agent-runtime".into(),
            sampler: "parentbased_always_on".into(),
            sampler_ratio: 1.0,
            export_timeout: Duration::from_secs(10),
            max_queue_size: 2048,
            schedule_delay: Duration::from_secs(5),
            max_export_batch_size: 512,
            metric_export_interval: Duration::from_secs(60),
            capture_content: false,
        }
    }
}

impl TelemetrySettings {
    /// Whether anything is exported (an endpoint is set).
    pub fn enabled(&self) -> bool {
        self.endpoint.is_some() || self.traces_endpoint.is_some()
    }
}

/// The samplers `OTEL_TRACES_SAMPLER` may name.
const SAMPLERS: &[&str] = &[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            database_url: "sqlite://agent-runtime.db".into(),
            llm: LlmSettings {
                proxy_url: "http://localhost:8002".into(),
                model: "gpt-4o-mini".into(),
                api_key: None,
                capabilities: Capabilities::default(),
                max_tokens: None,
                forced_tool_steps: 1,
                first_byte_timeout: Duration::from_secs(60),
                context_tokens: None,
            },
            hitl_enabled: true,
            hitl_dangerous_tools: vec![
                "write_file".into(),
                "delete_file".into(),
                "execute_command".into(),
            ],
            max_context_tokens: 8000,
            max_context_messages: 50,
            multi_agent_enabled: true,
            default_agent: "orchestrator".into(),
            auto_agent_switching: true,
            max_agent_switches: 10,
            plans_enabled: true,
            agents_file: None,
            tool_execution: ToolExecution::Runtime,
            project_roots: vec![],
            sandbox: SandboxSettings::default(),
            command_timeout: Duration::from_secs(120),
            mcp_servers_file: None,
            mcp_tool_timeout: crate::tools::mcp::DEFAULT_MCP_TOOL_TIMEOUT,
            max_turn_iterations: 25,
            max_tool_output_bytes: 32 * 1024,
            temperature: None,
            lease_ttl: Duration::from_secs(30),
            routing_timeout: Duration::from_secs(5),
            turn_recovery: TurnRecovery::Resume,
            budget: Budget::default(),
            model_prices_file: None,
            telemetry: TelemetrySettings::default(),
        }
    }
}

/// The variables [`RuntimeConfig::from_lookup`] reads, for front-ends that list or map them.
pub const VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "LLM_PROXY_URL",
    "LLM_MODEL",
    "LLM_API_KEY",
    "LLM_TEMPERATURE",
    "LLM_CAPABILITIES",
    "LLM_MAX_TOKENS",
    "LLM_FORCED_TOOL_STEPS",
    "LLM_FIRST_BYTE_TIMEOUT_SECS",
    "LLM_CONTEXT_TOKENS",
    "HITL_ENABLED",
    "HITL_DANGEROUS_TOOLS",
    "MAX_CONTEXT_TOKENS",
    "MAX_CONTEXT_MESSAGES",
    "AGENT_RUNTIME__MULTI_AGENT_ENABLED",
    "AGENT_RUNTIME__DEFAULT_AGENT",
    "AGENT_RUNTIME__AUTO_AGENT_SWITCHING",
    "AGENT_RUNTIME__MAX_AGENT_SWITCHES",
    "AGENT_RUNTIME__PLANS_ENABLED",
    "AGENT_RUNTIME__AGENTS_FILE",
    "TOOL_EXECUTION",
    "PROJECT_ROOTS",
    "WORKSPACE_ROOTS",
    "SANDBOX",
    "SANDBOX_READ_PATHS",
    "SANDBOX_WRITE_PATHS",
    "SANDBOX_NETWORK_AGENTS",
    "COMMAND_TIMEOUT_SECS",
    "MCP_SERVERS_FILE",
    "MCP_TOOL_TIMEOUT_SECS",
    "MAX_TURN_ITERATIONS",
    "MAX_TOOL_OUTPUT_BYTES",
    "SESSION_LEASE_SECS",
    "ROUTING_TIMEOUT_SECS",
    "TURN_RECOVERY",
    "SESSION_TOKEN_BUDGET",
    "SESSION_COST_BUDGET",
    "TURN_TOKEN_BUDGET",
    "TURN_COST_BUDGET",
    "TURN_TIME_BUDGET_SECS",
    "TURN_TOOL_CALL_BUDGET",
    "MODEL_PRICES_FILE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
];

/// The settings of the default budgets and the budget each sets.
pub const BUDGET_VARIABLES: [(&str, BudgetKind); 6] = [
    ("SESSION_TOKEN_BUDGET", BudgetKind::SessionTokens),
    ("SESSION_COST_BUDGET", BudgetKind::SessionCost),
    ("TURN_TOKEN_BUDGET", BudgetKind::TurnTokens),
    ("TURN_COST_BUDGET", BudgetKind::TurnCost),
    ("TURN_TIME_BUDGET_SECS", BudgetKind::TurnTimeSecs),
    ("TURN_TOOL_CALL_BUDGET", BudgetKind::TurnToolCalls),
];

fn bad(var: &str, value: &str, expected: &str) -> Error {
    Error::InvalidRequest(format!("{var}: invalid value '{value}' ({expected})"))
}

fn parse_bool(var: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(bad(var, v, "expected true or false")),
    }
}

fn parse_num<T>(var: &str, v: &str, min: T) -> Result<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let n: T = v
        .trim()
        .parse()
        .map_err(|_| bad(var, v, "expected a whole number"))?;
    if n < min {
        return Err(bad(var, v, &format!("must be at least {min}")));
    }
    Ok(n)
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// A comma list of absolute paths.
fn absolute_paths(var: &str, v: &str) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = list(v).into_iter().map(PathBuf::from).collect();
    if let Some(rel) = paths.iter().find(|p| !p.is_absolute()) {
        return Err(bad(var, &rel.display().to_string(), "paths must be absolute"));
    }
    Ok(paths)
}

impl RuntimeConfig {
    /// Reads the variables of API.md §8 from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables of API.md §8 from `lookup` (missing → default). A bad value is an
    /// `INVALID_REQUEST` error whose message starts with the variable's name.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut c = RuntimeConfig::default();
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("DATABASE_URL") {
            let known = ["sqlite:", "memory:", "postgres://", "postgresql://"];
            if !known.iter().any(|p| v.starts_with(p)) {
                return Err(bad(
                    "DATABASE_URL",
                    &crate::storage::redact_url(&v),
                    "expected sqlite://PATH, sqlite::memory: or postgresql://...",
                ));
            }
            c.database_url = v;
        }
        c.read_llm(&get)?;
        c.read_agents(&get, &lookup)?;
        c.read_tools(&get)?;
        c.read_turns(&get)?;
        c.telemetry = telemetry_settings(&get)?;
        Ok(c)
    }

    /// The model server's settings (`LLM_*`).
    fn read_llm(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = get("LLM_PROXY_URL") {
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(bad("LLM_PROXY_URL", &v, "expected an http:// or https:// URL"));
            }
            self.llm.proxy_url = v;
        }
        if let Some(v) = get("LLM_MODEL") {
            self.llm.model = v;
        }
        self.llm.api_key = get("LLM_API_KEY");
        if let Some(v) = get("LLM_TEMPERATURE") {
            let t: f32 = v
                .trim()
                .parse()
                .map_err(|_| bad("LLM_TEMPERATURE", &v, "expected a number"))?;
            if !(0.0..=2.0).contains(&t) {
                return Err(bad("LLM_TEMPERATURE", &v, "must be between 0 and 2"));
            }
            self.temperature = Some(t);
        }
        if let Some(v) = get("LLM_CAPABILITIES") {
            self.llm.capabilities = Capabilities::parse(&v).ok_or_else(|| {
                bad(
                    "LLM_CAPABILITIES",
                    &v,
                    "expected full, llama-cpp-python, or a comma list of auto_tool_choice, named_tool_choice, parallel_tool_calls, usage_reporting",
                )
            })?;
        }
        if let Some(v) = get("LLM_MAX_TOKENS") {
            self.llm.max_tokens = Some(parse_num("LLM_MAX_TOKENS", &v, 1)?);
        }
        if let Some(v) = get("LLM_FORCED_TOOL_STEPS") {
            self.llm.forced_tool_steps = parse_num("LLM_FORCED_TOOL_STEPS", &v, 0)?;
        }
        if let Some(v) = get("LLM_FIRST_BYTE_TIMEOUT_SECS") {
            self.llm.first_byte_timeout =
                Duration::from_secs(parse_num("LLM_FIRST_BYTE_TIMEOUT_SECS", &v, 1)?);
        }
        if let Some(v) = get("LLM_CONTEXT_TOKENS") {
            self.llm.context_tokens = Some(parse_num("LLM_CONTEXT_TOKENS", &v, 256)?);
        }
        Ok(())
    }

    /// Approvals, the context window and the agents (`HITL_*`, `MAX_CONTEXT_*`, `AGENT_RUNTIME__*`).
    fn read_agents(
        &mut self,
        get: &dyn Fn(&str) -> Option<String>,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        if let Some(v) = get("HITL_ENABLED") {
            self.hitl_enabled = parse_bool("HITL_ENABLED", &v)?;
        }
        if let Some(v) = lookup("HITL_DANGEROUS_TOOLS") {
            self.hitl_dangerous_tools = list(&v);
        }
        if let Some(v) = get("MAX_CONTEXT_TOKENS") {
            self.max_context_tokens = parse_num("MAX_CONTEXT_TOKENS", &v, 1)?;
        }
        if let Some(v) = get("MAX_CONTEXT_MESSAGES") {
            self.max_context_messages = parse_num("MAX_CONTEXT_MESSAGES", &v, 1)?;
        }
        if let Some(v) = get("AGENT_RUNTIME__MULTI_AGENT_ENABLED") {
            self.multi_agent_enabled = parse_bool("AGENT_RUNTIME__MULTI_AGENT_ENABLED", &v)?;
        }
        if let Some(v) = get("AGENT_RUNTIME__DEFAULT_AGENT") {
            self.default_agent = v.trim().to_string();
        }
        if let Some(v) = get("AGENT_RUNTIME__AUTO_AGENT_SWITCHING") {
            self.auto_agent_switching = parse_bool("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", &v)?;
        }
        if let Some(v) = get("AGENT_RUNTIME__MAX_AGENT_SWITCHES") {
            self.max_agent_switches = parse_num("AGENT_RUNTIME__MAX_AGENT_SWITCHES", &v, 0)?;
        }
        if let Some(v) = get("AGENT_RUNTIME__PLANS_ENABLED") {
            self.plans_enabled = parse_bool("AGENT_RUNTIME__PLANS_ENABLED", &v)?;
        }
        if let Some(v) = get("AGENT_RUNTIME__AGENTS_FILE") {
            self.agents_file = Some(PathBuf::from(v.trim()));
        }
        Ok(())
    }

    /// Where and how tools run (`TOOL_EXECUTION`, project roots, the sandbox, commands, MCP servers, outputs).
    fn read_tools(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = get("TOOL_EXECUTION") {
            self.tool_execution = ToolExecution::parse(&v)
                .ok_or_else(|| bad("TOOL_EXECUTION", &v, "expected runtime or client"))?;
        }
        // `WORKSPACE_ROOTS` is the earlier name; `PROJECT_ROOTS` wins when both are set.
        for var in ["PROJECT_ROOTS", "WORKSPACE_ROOTS"] {
            if let Some(v) = get(var) {
                self.project_roots = absolute_paths(var, &v)?;
                break;
            }
        }
        if let Some(v) = get("SANDBOX") {
            self.sandbox.mode =
                SandboxMode::parse(&v).ok_or_else(|| bad("SANDBOX", &v, "expected enforce or off"))?;
        }
        if let Some(v) = get("SANDBOX_READ_PATHS") {
            self.sandbox.read_paths = absolute_paths("SANDBOX_READ_PATHS", &v)?;
        }
        if let Some(v) = get("SANDBOX_WRITE_PATHS") {
            self.sandbox.write_paths = absolute_paths("SANDBOX_WRITE_PATHS", &v)?;
        }
        if let Some(v) = get("SANDBOX_NETWORK_AGENTS") {
            self.sandbox.network_agents = list(&v);
        }
        if let Some(v) = get("COMMAND_TIMEOUT_SECS") {
            self.command_timeout = Duration::from_secs(parse_num("COMMAND_TIMEOUT_SECS", &v, 1)?);
        }
        if let Some(v) = get("MCP_SERVERS_FILE")
            && !v.trim().is_empty()
        {
            self.mcp_servers_file = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = get("MCP_TOOL_TIMEOUT_SECS") {
            self.mcp_tool_timeout = Duration::from_secs(parse_num("MCP_TOOL_TIMEOUT_SECS", &v, 1)?);
        }
        if let Some(v) = get("MAX_TURN_ITERATIONS") {
            self.max_turn_iterations = parse_num("MAX_TURN_ITERATIONS", &v, 1)?;
        }
        if let Some(v) = get("MAX_TOOL_OUTPUT_BYTES") {
            self.max_tool_output_bytes = parse_num("MAX_TOOL_OUTPUT_BYTES", &v, 64)?;
        }
        Ok(())
    }

    /// Turns: leases, routing, recovery, budgets and prices.
    fn read_turns(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = get("SESSION_LEASE_SECS") {
            self.lease_ttl = Duration::from_secs(parse_num("SESSION_LEASE_SECS", &v, 1)?);
        }
        if let Some(v) = get("ROUTING_TIMEOUT_SECS") {
            self.routing_timeout = Duration::from_secs(parse_num("ROUTING_TIMEOUT_SECS", &v, 1)?);
        }
        if let Some(v) = get("TURN_RECOVERY") {
            self.turn_recovery = TurnRecovery::parse(&v)
                .ok_or_else(|| bad("TURN_RECOVERY", &v, "expected resume or interrupt"))?;
        }
        for (var, kind) in BUDGET_VARIABLES {
            if let Some(v) = get(var) {
                let n = if kind.whole() {
                    parse_num::<u64>(var, &v, 0)? as f64
                } else {
                    v.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .ok_or_else(|| bad(var, &v, "expected a number ≥ 0"))?
                };
                self.budget.set(kind, n);
            }
        }
        if let Some(v) = get("MODEL_PRICES_FILE") {
            self.model_prices_file = Some(PathBuf::from(v.trim()));
        }
        Ok(())
    }
}

/// The `OTEL_*` variables (see [`TelemetrySettings`]).
fn telemetry_settings(get: &dyn Fn(&str) -> Option<String>) -> Result<TelemetrySettings> {
    let mut t = TelemetrySettings::default();
    let url = |var: &str| -> Result<Option<String>> {
        match get(var) {
            Some(v) if !(v.starts_with("http://") || v.starts_with("https://")) => Err(bad(
                var,
                &v,
                "expected an http:// or https:// URL of an OTLP/HTTP collector, such as http://127.0.0.1:4318",
            )),
            other => Ok(other.map(|v| v.trim().to_string())),
        }
    };
    t.endpoint = url("OTEL_EXPORTER_OTLP_ENDPOINT")?;
    t.traces_endpoint = url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?;
    if let Some(v) = get("OTEL_EXPORTER_OTLP_PROTOCOL")
        && v.trim() != "http/protobuf"
    {
        return Err(bad(
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            &v,
            "only http/protobuf is supported: point the endpoint at the collector's OTLP/HTTP port (4318)",
        ));
    }
    let millis = |var: &str, min: u64| -> Result<Option<Duration>> {
        get(var)
            .map(|v| parse_num(var, &v, min).map(Duration::from_millis))
            .transpose()
    };
    if let Some(d) = millis("OTEL_EXPORTER_OTLP_TIMEOUT", 1)? {
        t.export_timeout = d;
    }
    if let Some(d) = millis("OTEL_BSP_SCHEDULE_DELAY", 1)? {
        t.schedule_delay = d;
    }
    if let Some(d) = millis("OTEL_METRIC_EXPORT_INTERVAL", 1)? {
        t.metric_export_interval = d;
    }
    if let Some(v) = get("OTEL_BSP_MAX_QUEUE_SIZE") {
        t.max_queue_size = parse_num("OTEL_BSP_MAX_QUEUE_SIZE", &v, 1)?;
    }
    if let Some(v) = get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        t.max_export_batch_size = parse_num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &v, 1)?;
    }
    if let Some(v) = get("OTEL_SERVICE_NAME") {
        t.service_name = v.trim().to_string();
    }
    if let Some(v) = get("OTEL_TRACES_SAMPLER") {
        let name = v.trim().to_ascii_lowercase();
        if !SAMPLERS.contains(&name.as_str()) {
            return Err(bad(
                "OTEL_TRACES_SAMPLER",
                &v,
                &format!("expected one of {}", SAMPLERS.join(", ")),
            ));
        }
        t.sampler = name;
    }
    if let Some(v) = get("OTEL_TRACES_SAMPLER_ARG") {
        let r: f64 = v
            .trim()
            .parse()
            .map_err(|_| bad("OTEL_TRACES_SAMPLER_ARG", &v, "expected a number from 0 to 1"))?;
        if !(0.0..=1.0).contains(&r) {
            return Err(bad(
                "OTEL_TRACES_SAMPLER_ARG",
                &v,
                "expected a number from 0 to 1",
            ));
        }
        t.sampler_ratio = r;
    }
    if let Some(v) = get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT") {
        t.capture_content = parse_bool("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", &v)?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<RuntimeConfig> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RuntimeConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn nothing_set_gives_the_documented_defaults() {
        assert_eq!(from(&[]).unwrap(), RuntimeConfig::default());
    }

    #[test]
    fn values_are_parsed() {
        let c = from(&[
            ("HITL_DANGEROUS_TOOLS", "write_file, run_command"),
            ("AGENT_RUNTIME__MAX_AGENT_SWITCHES", "3"),
            ("TOOL_EXECUTION", "client"),
            ("HITL_ENABLED", "false"),
        ])
        .unwrap();
        assert_eq!(c.hitl_dangerous_tools, ["write_file", "run_command"]);
        assert_eq!(c.max_agent_switches, 3);
        assert_eq!(c.tool_execution, ToolExecution::Client);
        assert!(!c.hitl_enabled);
        let c = from(&[
            ("LLM_CAPABILITIES", "llama-cpp-python"),
            ("LLM_MAX_TOKENS", "256"),
        ])
        .unwrap();
        assert_eq!(
            (c.llm.capabilities, c.llm.max_tokens),
            (Capabilities::llama_cpp_python(), Some(256))
        );
    }

    #[test]
    fn model_deadlines_and_context_size_are_read() {
        let c = from(&[
            ("ROUTING_TIMEOUT_SECS", "2"),
            ("LLM_FIRST_BYTE_TIMEOUT_SECS", "30"),
            ("LLM_CONTEXT_TOKENS", "4096"),
        ])
        .unwrap();
        assert_eq!(
            (c.routing_timeout, c.llm.first_byte_timeout, c.llm.context_tokens),
            (Duration::from_secs(2), Duration::from_secs(30), Some(4096))
        );
    }

    #[test]
    fn turn_recovery_is_resume_unless_set_to_interrupt() {
        let read = |v: &str| from(&[("TURN_RECOVERY", v)]).map(|c| c.turn_recovery);
        assert_eq!(
            (
                from(&[]).unwrap().turn_recovery,
                read("interrupt"),
                read(" Resume ")
            ),
            (
                TurnRecovery::Resume,
                Ok(TurnRecovery::Interrupt),
                Ok(TurnRecovery::Resume)
            )
        );
        assert_eq!(
            read("retry"),
            Err(Error::InvalidRequest(
                "TURN_RECOVERY: invalid value 'retry' (expected resume or interrupt)".into()
            ))
        );
    }

    #[test]
    fn sandbox_and_project_roots_are_parsed_with_the_old_name_as_alias() {
        let c = from(&[
            ("WORKSPACE_ROOTS", "/srv/a, /srv/b"),
            ("SANDBOX", "off"),
            ("SANDBOX_READ_PATHS", "/opt/cache"),
            ("SANDBOX_WRITE_PATHS", "/var/cache/x"),
            ("SANDBOX_NETWORK_AGENTS", "coder, debug"),
        ])
        .unwrap();
        assert_eq!(
            (c.project_roots, c.sandbox),
            (
                vec![PathBuf::from("/srv/a"), PathBuf::from("/srv/b")],
                SandboxSettings {
                    mode: SandboxMode::Off,
                    read_paths: vec![PathBuf::from("/opt/cache")],
                    write_paths: vec![PathBuf::from("/var/cache/x")],
                    network_agents: vec!["coder".into(), "debug".into()],
                }
            )
        );
        let c = from(&[("WORKSPACE_ROOTS", "/old"), ("PROJECT_ROOTS", "/new")]).unwrap();
        assert_eq!(c.project_roots, [PathBuf::from("/new")]);
    }

    #[test]
    fn budget_settings_are_the_default_budget_of_new_sessions() {
        let c = from(&[
            ("SESSION_COST_BUDGET", "2.50"),
            ("TURN_TOOL_CALL_BUDGET", "0"),
            ("TURN_TIME_BUDGET_SECS", "300"),
            ("MODEL_PRICES_FILE", "/etc/prices.json"),
        ])
        .unwrap();
        assert_eq!(
            (c.budget, c.model_prices_file),
            (
                Budget {
                    session_cost: Some(2.5),
                    turn_tool_calls: Some(0),
                    turn_time_secs: Some(300),
                    ..Budget::default()
                },
                Some(PathBuf::from("/etc/prices.json"))
            )
        );
        for (var, value) in [
            ("SESSION_TOKEN_BUDGET", "-5"),
            ("SESSION_COST_BUDGET", "cheap"),
            ("TURN_TOOL_CALL_BUDGET", "1.5"),
        ] {
            let err = from(&[(var, value)]).unwrap_err();
            assert!(err.to_string().starts_with(&format!("{var}: ")), "{err}");
        }
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (var, value) in [
            ("MAX_CONTEXT_TOKENS", "lots"),
            ("HITL_ENABLED", "perhaps"),
            ("DATABASE_URL", "mysql://x"),
            ("TOOL_EXECUTION", "cloud"),
            ("LLM_CAPABILITIES", "telepathy"),
            ("LLM_MAX_TOKENS", "0"),
            ("MAX_TURN_ITERATIONS", "0"),
            ("ROUTING_TIMEOUT_SECS", "0"),
            ("LLM_FIRST_BYTE_TIMEOUT_SECS", "soon"),
            ("LLM_CONTEXT_TOKENS", "100"),
            ("PROJECT_ROOTS", "relative/dir"),
            ("SANDBOX", "maybe"),
            ("SANDBOX_READ_PATHS", "~/.cargo"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
            ("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "maybe"),
        ] {
            let err = from(&[(var, value)]).unwrap_err();
            assert!(err.to_string().starts_with(&format!("{var}: ")), "{err}");
        }
    }

    #[test]
    fn the_standard_otel_variables_set_telemetry_and_no_endpoint_leaves_it_off() {
        assert_eq!(from(&[]).unwrap().telemetry, TelemetrySettings::default());
        assert!(!TelemetrySettings::default().enabled());
        let c = from(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_SERVICE_NAME", "agents-prod"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "50"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
            ("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true"),
        ])
        .unwrap();
        assert_eq!(
            c.telemetry,
            TelemetrySettings {
                endpoint: Some("http://127.0.0.1:4318".into()),
                traces_endpoint: None,
                service_name: "agents-prod".into(),
                sampler: "parentbased_traceidratio".into(),
                sampler_ratio: 0.25,
                export_timeout: Duration::from_millis(2500),
                max_queue_size: 100,
                schedule_delay: Duration::from_millis(200),
                max_export_batch_size: 50,
                metric_export_interval: Duration::from_secs(1),
                capture_content: true,
            }
        );
        assert!(c.telemetry.enabled());
    }
}
