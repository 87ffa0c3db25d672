//! The server's settings (docs/API.md, "Settings"): every variable also a command-line flag (its name
//! in kebab case without `AGENT_RUNTIME__`); a flag wins over the environment; bad values name the variable.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use agent_runtime_core::config::{RuntimeConfig, VARIABLES};

/// The documented sample token, refused on a non-loopback address.
pub const SAMPLE_TOKEN: &str = "change-me-internal-key";

/// Variables the server reads on top of the core's.
pub const SERVER_VARIABLES: &[&str] = &[
    "HOST",
    "PORT",
    "INTERNAL_API_KEY",
    "MAX_REQUEST_BYTES",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "SSE_KEEPALIVE_SECS",
    "DRAIN_TIMEOUT_SECS",
    "SHUTDOWN_GRACE_SECS",
    "REQUEST_TIMEOUT_SECS",
];

/// What each variable means and its default, as `--help` prints them: `(variable, meaning, default)`.
pub const SETTINGS_HELP: &[(&str, &str, &str)] = &[
    ("HOST", "listen address", "127.0.0.1"),
    ("PORT", "listen port; 0 picks a free one", "8001"),
    (
        "DATABASE_URL",
        "storage: sqlite://PATH, sqlite::memory: or postgresql://user:pass@host:5432/db",
        "sqlite://agent-runtime.db",
    ),
    (
        "LLM_PROXY_URL",
        "base URL of an OpenAI-compatible model server (/v1/chat/completions)",
        "http://localhost:8002",
    ),
    ("LLM_MODEL", "model name sent to the model server", "gpt-4o-mini"),
    (
        "LLM_API_KEY",
        "sent to the model server as Authorization: Bearer",
        "unset",
    ),
    (
        "LLM_TEMPERATURE",
        "sampling temperature, 0 to 2",
        "unset, the model's own",
    ),
    (
        "LLM_CAPABILITIES",
        "what the model server does: full, llama-cpp-python, or a comma list of auto_tool_choice, \
         named_tool_choice, parallel_tool_calls, usage_reporting",
        "full",
    ),
    (
        "LLM_MAX_TOKENS",
        "the most tokens one answer may have (also kept free in the window)",
        "unset",
    ),
    (
        "LLM_CONTEXT_TOKENS",
        "the model's context size; bounds MAX_CONTEXT_TOKENS to three quarters of it",
        "unset: asked of the model server at start-up",
    ),
    (
        "LLM_FIRST_BYTE_TIMEOUT_SECS",
        "seconds a model call waits for the first piece of the answer",
        "60",
    ),
    (
        "ROUTING_TIMEOUT_SECS",
        "seconds the routing call waits for the model's first byte before keywords decide",
        "5",
    ),
    (
        "SESSION_TOKEN_BUDGET",
        "default token budget of a session (prompt + completion); raising it is an approval",
        "unset: unlimited",
    ),
    (
        "SESSION_COST_BUDGET",
        "default cost budget of a session, in MODEL_PRICES_FILE's currency",
        "unset: unlimited",
    ),
    (
        "TURN_TOKEN_BUDGET",
        "default token budget of one turn",
        "unset: unlimited",
    ),
    (
        "TURN_COST_BUDGET",
        "default cost budget of one turn",
        "unset: unlimited",
    ),
    (
        "TURN_TIME_BUDGET_SECS",
        "default wall-time budget of one turn in seconds (paused time does not count)",
        "unset: unlimited",
    ),
    (
        "TURN_TOOL_CALL_BUDGET",
        "default tool calls one turn may make",
        "unset: unlimited",
    ),
    (
        "MODEL_PRICES_FILE",
        "JSON prices per million tokens by model: {\"model\": {\"input\", \"cached_input\", \"output\"}}",
        "unset: cost is not counted",
    ),
    (
        "LLM_FORCED_TOOL_STEPS",
        "for a model without auto tool choice: tool results gathered before it must answer",
        "1",
    ),
    (
        "INTERNAL_API_KEY",
        "the x-internal-auth token (alias AGENT_RUNTIME__INTERNAL_API_KEY); unset: no auth, loopback only",
        "unset",
    ),
    ("HITL_ENABLED", "ask a human before dangerous tools run", "true"),
    (
        "HITL_DANGEROUS_TOOLS",
        "comma list of the tools that need approval (run_command = execute_command)",
        "write_file,delete_file,execute_command",
    ),
    (
        "MAX_CONTEXT_TOKENS",
        "tokens sent to the model per call, system prompt included",
        "8000",
    ),
    (
        "MAX_CONTEXT_MESSAGES",
        "newest messages sent to the model per call",
        "50",
    ),
    (
        "AGENT_RUNTIME__MULTI_AGENT_ENABLED",
        "several agents; false: every session stays on the default agent, no routing",
        "true",
    ),
    (
        "AGENT_RUNTIME__DEFAULT_AGENT",
        "the agent a new session starts on",
        "orchestrator",
    ),
    (
        "AGENT_RUNTIME__AUTO_AGENT_SWITCHING",
        "the orchestrator routes each request and agents may hand over",
        "true",
    ),
    (
        "AGENT_RUNTIME__MAX_AGENT_SWITCHES",
        "automatic switches allowed in one turn; past it AGENT_SWITCH_LIMIT",
        "10",
    ),
    (
        "AGENT_RUNTIME__PLANS_ENABLED",
        "the orchestrator may propose a plan for a large request",
        "true",
    ),
    (
        "AGENT_RUNTIME__AGENTS_FILE",
        "a JSON file of agent definitions added to the five, replacing those of the same type",
        "unset",
    ),
    (
        "TOOL_EXECUTION",
        "where tools run: runtime (in the session's project_path) or client",
        "runtime",
    ),
    (
        "PROJECT_ROOTS",
        "comma list of absolute paths; when set, every project_path must be inside one after \
         symlinks are resolved (alias WORKSPACE_ROOTS)",
        "unset: any absolute folder",
    ),
    (
        "WORKSPACE_ROOTS",
        "the earlier name of PROJECT_ROOTS; PROJECT_ROOTS wins when both are set",
        "unset",
    ),
    (
        "SANDBOX",
        "enforce: every process a tool starts runs under Landlock and seccomp; off: with the \
         server's own rights",
        "enforce",
    ),
    (
        "SANDBOX_READ_PATHS",
        "comma list of absolute paths commands may also read (tool caches)",
        "unset",
    ),
    (
        "SANDBOX_WRITE_PATHS",
        "comma list of absolute paths commands may also write",
        "unset",
    ),
    (
        "SANDBOX_NETWORK_AGENTS",
        "comma list of agent types whose commands may open IP sockets",
        "unset: none",
    ),
    (
        "COMMAND_TIMEOUT_SECS",
        "execute_command's time limit; the command and its children are killed",
        "120",
    ),
    (
        "MCP_SERVERS_FILE",
        "a JSON file {\"mcpServers\": {..}} of MCP servers whose tools the agents get as \
         <server>__<tool> (README \"MCP servers\")",
        "unset: none",
    ),
    (
        "MCP_TOOL_TIMEOUT_SECS",
        "an MCP tool call's time limit; past it the call fails with TOOL_EXECUTION_FAILED",
        "60",
    ),
    ("MAX_TURN_ITERATIONS", "model calls in one turn", "25"),
    (
        "MAX_TOOL_OUTPUT_BYTES",
        "a longer tool result is cut, with a note",
        "32768",
    ),
    (
        "SESSION_LEASE_SECS",
        "a running turn's lease on its session; another process may take over once it expires",
        "30",
    ),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "base URL of an OTLP/HTTP collector (http://127.0.0.1:4318); traces go to /v1/traces, metrics to /v1/metrics; unset: telemetry off",
        "unset: off",
    ),
    (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "full URL for spans, over the base endpoint's /v1/traces",
        "unset",
    ),
    (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "only http/protobuf is supported",
        "http/protobuf",
    ),
    (
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "milliseconds one export may take; past it its spans count as dropped",
        "10000",
    ),
    (
        "OTEL_SERVICE_NAME",
        "service.name of the exported spans and metrics",
        "agent-runtime",
    ),
    (
        "OTEL_TRACES_SAMPLER",
        "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio",
        "parentbased_always_on",
    ),
    (
        "OTEL_TRACES_SAMPLER_ARG",
        "the ratio of the traceidratio samplers, 0 to 1",
        "1.0",
    ),
    (
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "spans waiting for export; past it new spans are dropped and counted",
        "2048",
    ),
    (
        "OTEL_BSP_SCHEDULE_DELAY",
        "milliseconds a finished span may wait before it is exported",
        "5000",
    ),
    (
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "spans per export request",
        "512",
    ),
    (
        "OTEL_METRIC_EXPORT_INTERVAL",
        "milliseconds between metric exports",
        "60000",
    ),
    (
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        "record prompts, answers, tool arguments and results on spans",
        "false",
    ),
    (
        "MAX_REQUEST_BYTES",
        "request body limit in bytes; over it: 413",
        "1048576",
    ),
    (
        "LOG_LEVEL",
        "a level or a tracing filter such as agent_runtime_core=debug (also RUST_LOG)",
        "INFO",
    ),
    ("LOG_FORMAT", "text, or json (one object per line)", "text"),
    (
        "SSE_KEEPALIVE_SECS",
        "idle time on a stream before a ': keep-alive' comment",
        "15",
    ),
    (
        "TURN_RECOVERY",
        "a turn whose process stopped: resume (continue it from its last stored step) or \
         interrupt (end it with an error)",
        "resume",
    ),
    (
        "DRAIN_TIMEOUT_SECS",
        "on SIGTERM/SIGINT, how long running turns get to reach a step boundary and be handed \
         over to another process before this one exits",
        "10",
    ),
    (
        "SHUTDOWN_GRACE_SECS",
        "the earlier name of DRAIN_TIMEOUT_SECS, which wins when both are set",
        "10",
    ),
    (
        "REQUEST_TIMEOUT_SECS",
        "time a client gets to send a request's head, and again its body",
        "30",
    ),
];

/// The `--help` line of a variable: `VAR: meaning (default: X)`.
pub fn help_line(var: &str) -> String {
    match SETTINGS_HELP.iter().find(|(v, ..)| *v == var) {
        Some((_, meaning, default)) => format!("{var}: {meaning} (default: {default})"),
        // A variable added to the core without a line here: still a flag, and a test fails.
        None => var.to_string(),
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The `x-internal-auth` token; `None` (loopback only) turns auth off.
    pub internal_api_key: Option<String>,
    /// Request body limit.
    pub max_request_bytes: usize,
    /// The tracing filter.
    pub log_filter: String,
    /// Log format.
    pub log_format: LogFormat,
    /// SSE keep-alive interval.
    pub keep_alive: Duration,
    /// How long running turns get to be handed over at shutdown (`DRAIN_TIMEOUT_SECS`, alias
    /// `SHUTDOWN_GRACE_SECS`).
    pub drain_timeout: Duration,
    /// Time a client gets to send a request's head, and again its body (slow clients hold a
    /// connection and a task; past this they get an error and the connection closes).
    pub request_timeout: Duration,
    /// The core's settings.
    pub runtime: RuntimeConfig,
    /// For each variable that was set, how the user set it: `--flag` or the variable's name.
    pub sources: Vec<(String, String)>,
}

impl ServerConfig {
    /// `message` (which starts with a variable's name, as every settings error does) with that
    /// name as the user gave it: a value found bad only at start-up (say, an unknown default
    /// agent) is reported under `--default-agent` when that flag set it.
    pub fn as_typed(&self, message: &str) -> String {
        as_typed(&self.sources, message)
    }
}

/// `message`, whose leading `VARIABLE: ` is replaced by how `sources` says the user set it.
fn as_typed(sources: &[(String, String)], message: &str) -> String {
    sources
        .iter()
        .find_map(|(var, source)| {
            let rest = message.strip_prefix(var.as_str())?.strip_prefix(": ")?;
            Some(format!("{source}: {rest}"))
        })
        .unwrap_or_else(|| message.to_string())
}

/// A start-up failure, its message naming the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The flag of a variable: `AGENT_RUNTIME__MAX_AGENT_SWITCHES` → `max-agent-switches`.
pub fn flag_name(var: &str) -> String {
    var.trim_start_matches("AGENT_RUNTIME__")
        .to_ascii_lowercase()
        .replace('_', "-")
}

fn all_variables() -> impl Iterator<Item = &'static str> {
    VARIABLES.iter().chain(SERVER_VARIABLES).copied()
}

/// The command line: one `--flag VALUE` per variable, built from the variable lists so they agree.
pub fn command() -> clap::Command {
    let mut cmd = clap::Command::new("agent-runtime-server")
        .version(env!("CARGO_PKG_VERSION"))
        .about("The agent runtime's HTTP API. Every flag overrides the environment variable it names.");
    for var in all_variables() {
        cmd = cmd.arg(
            clap::Arg::new(var)
                .long(flag_name(var))
                .value_name("VALUE")
                .allow_hyphen_values(true)
                .help(help_line(var)),
        );
    }
    cmd
}

/// Parses flags over `env`; flags win. A bad value's error names it as the user gave it: the flag
/// (`--port: invalid value 'x' ...`) when it came from the command line, else the variable (or
/// the alias, e.g. `RUST_LOG`) it was read from.
pub fn load(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ServerConfig, ConfigError> {
    let matches = match command().try_get_matches_from(args) {
        Ok(m) => m,
        // `--help` and `--version` print and exit 0, as every command line tool does.
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => return Err(ConfigError(e.to_string())),
    };
    let mut values: HashMap<&str, String> = HashMap::new();
    // Where each value came from, as the user typed it: `--flag` or the variable's name.
    let mut sources: Vec<(&str, String)> = Vec::new();
    let aliases: &[(&str, &[&str])] = &[
        ("INTERNAL_API_KEY", &["AGENT_RUNTIME__INTERNAL_API_KEY"]),
        ("LOG_LEVEL", &["RUST_LOG"]),
    ];
    for var in all_variables() {
        let from_env = || {
            std::iter::once(var)
                .chain(
                    aliases
                        .iter()
                        .filter(|(v, _)| *v == var)
                        .flat_map(|(_, a)| a.iter().copied()),
                )
                .find_map(|name| env(name).map(|v| (name.to_string(), v)))
        };
        let flag = matches
            .get_one::<String>(var)
            .map(|v| (format!("--{}", flag_name(var)), v.clone()));
        if let Some((source, v)) = flag.or_else(from_env) {
            values.insert(var, v);
            sources.push((var, source));
        }
    }
    let typed: Vec<(String, String)> = sources.iter().map(|(v, s)| (v.to_string(), s.clone())).collect();
    // The messages start with the variable's name: say it as the user gave it.
    let mut config =
        parse_values(&values).map_err(|ConfigError(message)| ConfigError(as_typed(&typed, &message)))?;
    config.sources = typed;
    Ok(config)
}

/// The settings from their raw values (by variable); errors start with the variable's name.
fn parse_values(values: &HashMap<&str, String>) -> Result<ServerConfig, ConfigError> {
    let get = |k: &str| {
        values
            .get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let runtime =
        RuntimeConfig::from_lookup(|k| values.get(k).cloned()).map_err(|e| ConfigError(e.to_string()))?;
    let bad = |var: &str, v: &str, why: &str| ConfigError(format!("{var}: invalid value '{v}' ({why})"));
    let host: IpAddr = match get("HOST") {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(h) if h == "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(h) => h.parse().map_err(|_| bad("HOST", &h, "expected an IP address"))?,
    };
    let port: u16 = match get("PORT") {
        None => 8001,
        Some(p) => p.parse().map_err(|_| bad("PORT", &p, "expected 0-65535"))?,
    };
    let num = |var: &str, default: u64, min: u64| -> Result<u64, ConfigError> {
        match get(var) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(bad(
                    var,
                    &v,
                    &format!("expected a whole number of at least {min}"),
                )),
            },
        }
    };
    let max_request_bytes = usize::try_from(num("MAX_REQUEST_BYTES", 1024 * 1024, 1)?)
        .map_err(|_| ConfigError("MAX_REQUEST_BYTES: too large".into()))?;
    let keep_alive = Duration::from_secs(num("SSE_KEEPALIVE_SECS", 15, 1)?);
    // `SHUTDOWN_GRACE_SECS` is the earlier name; `DRAIN_TIMEOUT_SECS` wins when both are set.
    let drain_timeout = match get("DRAIN_TIMEOUT_SECS") {
        Some(_) => num("DRAIN_TIMEOUT_SECS", 10, 0)?,
        None => num("SHUTDOWN_GRACE_SECS", 10, 0)?,
    };
    let drain_timeout = Duration::from_secs(drain_timeout);
    let request_timeout = Duration::from_secs(num("REQUEST_TIMEOUT_SECS", 30, 1)?);
    let log_format = match get("LOG_FORMAT").map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => return Err(bad("LOG_FORMAT", other, "expected text or json")),
    };
    let log_filter = get("LOG_LEVEL").unwrap_or_else(|| "info".into());
    // `INFO` is how the earlier runtime wrote it; tracing's filter wants lower case levels.
    let log_filter = if log_filter.contains('=') {
        log_filter
    } else {
        log_filter.to_ascii_lowercase()
    };
    if tracing_subscriber::EnvFilter::try_new(&log_filter).is_err() {
        return Err(bad(
            "LOG_LEVEL",
            &log_filter,
            "expected a level or a tracing filter",
        ));
    }
    let internal_api_key = get("INTERNAL_API_KEY");
    let addr = SocketAddr::new(host, port);
    if !host.is_loopback() && internal_api_key.as_deref().is_none_or(|k| k == SAMPLE_TOKEN) {
        return Err(ConfigError(format!(
            "INTERNAL_API_KEY: refusing to listen on {addr} (not loopback) while the token is unset or the sample value"
        )));
    }
    Ok(ServerConfig {
        addr,
        internal_api_key,
        max_request_bytes,
        log_filter,
        log_format,
        keep_alive,
        drain_timeout,
        request_timeout,
        runtime,
        sources: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(args: &[&str], env: &[(&str, &str)]) -> Result<ServerConfig, ConfigError> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args =
            std::iter::once("agent-runtime-server".to_string()).chain(args.iter().map(|a| a.to_string()));
        load(args, |k| env.get(k).cloned())
    }

    #[test]
    fn the_drain_timeout_takes_its_earlier_name_which_it_overrides() {
        let secs = |env: &[(&str, &str)]| load_with(&[], env).unwrap().drain_timeout;
        assert_eq!(
            (
                secs(&[]),
                secs(&[("SHUTDOWN_GRACE_SECS", "4")]),
                secs(&[("SHUTDOWN_GRACE_SECS", "4"), ("DRAIN_TIMEOUT_SECS", "7")])
            ),
            (
                Duration::from_secs(10),
                Duration::from_secs(4),
                Duration::from_secs(7)
            )
        );
    }

    #[test]
    fn nothing_set_listens_on_loopback_8001_with_sqlite() {
        let c = load_with(&[], &[]).unwrap();
        assert_eq!(c.addr, "127.0.0.1:8001".parse().unwrap());
        assert_eq!(c.runtime.database_url, "sqlite://agent-runtime.db");
        assert_eq!(c.max_request_bytes, 1_048_576);
        assert_eq!(c.internal_api_key, None);
    }

    #[test]
    fn a_flag_wins_over_the_environment() {
        let c = load_with(
            &["--port", "9000", "--max-agent-switches", "3"],
            &[
                ("PORT", "9100"),
                ("AGENT_RUNTIME__MAX_AGENT_SWITCHES", "7"),
                ("MAX_CONTEXT_TOKENS", "99"),
            ],
        )
        .unwrap();
        assert_eq!(
            (
                c.addr.port(),
                c.runtime.max_agent_switches,
                c.runtime.max_context_tokens
            ),
            (9000, 3, 99)
        );
    }

    #[test]
    fn a_bad_flag_value_names_the_flag_the_user_typed() {
        let errors: Vec<String> = [
            vec!["--port", "eighty"],
            vec!["--max-context-tokens", "lots"],
            vec!["--database-url", "mysql://x"],
            vec!["--log-format", "xml"],
            vec!["--max-request-bytes", "-1"],
            vec!["--routing-timeout-secs", "0"],
            vec!["--llm-context-tokens", "many"],
        ]
        .iter()
        .map(|args| load_with(args, &[]).unwrap_err().0)
        .collect();
        assert_eq!(
            errors,
            [
                "--port: invalid value 'eighty' (expected 0-65535)".to_string(),
                "--max-context-tokens: invalid value 'lots' (expected a whole number)".into(),
                load_with(&[], &[("DATABASE_URL", "mysql://x")])
                    .unwrap_err()
                    .0
                    .replacen("DATABASE_URL", "--database-url", 1),
                "--log-format: invalid value 'xml' (expected text or json)".into(),
                "--max-request-bytes: invalid value '-1' (expected a whole number of at least 1)".into(),
                load_with(&[], &[("ROUTING_TIMEOUT_SECS", "0")])
                    .unwrap_err()
                    .0
                    .replacen("ROUTING_TIMEOUT_SECS", "--routing-timeout-secs", 1),
                load_with(&[], &[("LLM_CONTEXT_TOKENS", "many")])
                    .unwrap_err()
                    .0
                    .replacen("LLM_CONTEXT_TOKENS", "--llm-context-tokens", 1),
            ]
        );
    }

    #[test]
    fn a_bad_environment_value_names_the_variable_it_was_read_from() {
        let errors: Vec<String> = [
            ("PORT", "eighty"),
            ("MAX_CONTEXT_TOKENS", "lots"),
            ("LOG_FORMAT", "xml"),
            ("RUST_LOG", "[["),
        ]
        .iter()
        .map(|var| load_with(&[], &[*var]).unwrap_err().0)
        .collect();
        assert_eq!(
            errors,
            [
                "PORT: invalid value 'eighty' (expected 0-65535)",
                "MAX_CONTEXT_TOKENS: invalid value 'lots' (expected a whole number)",
                "LOG_FORMAT: invalid value 'xml' (expected text or json)",
                "RUST_LOG: invalid value '[[' (expected a level or a tracing filter)",
            ]
        );
    }

    #[test]
    fn every_flag_says_what_it_means_and_its_default() {
        let cmd = command();
        let vague: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| {
                a.get_long()
                    .map(|long| (long, a.get_help().map(|h| h.to_string())))
            })
            .filter(|(_, help)| {
                help.as_deref()
                    .is_none_or(|h| !h.contains(": ") || !h.contains("(default: ") || h.contains("API.md"))
            })
            .map(|(long, help)| format!("--{long}: {help:?}"))
            .collect();
        assert_eq!(vague, Vec::<String>::new());
        assert_eq!(
            help_line("PORT"),
            "PORT: listen port; 0 picks a free one (default: 8001)"
        );
    }

    #[test]
    fn every_help_line_belongs_to_a_variable() {
        let stray: Vec<&str> = SETTINGS_HELP
            .iter()
            .map(|(v, ..)| *v)
            .filter(|v| !all_variables().any(|known| known == *v))
            .collect();
        assert_eq!(stray, Vec::<&str>::new());
    }

    #[test]
    fn a_public_address_needs_a_real_token() {
        for env in [vec![], vec![("INTERNAL_API_KEY", SAMPLE_TOKEN)]] {
            let err = load_with(&["--host", "0.0.0.0"], &env).unwrap_err();
            assert!(err.0.starts_with("INTERNAL_API_KEY: refusing"), "{err}");
        }
        let c = load_with(
            &["--host", "0.0.0.0"],
            &[("AGENT_RUNTIME__INTERNAL_API_KEY", "s3cret")],
        )
        .unwrap();
        assert_eq!(c.internal_api_key.as_deref(), Some("s3cret"));
    }
}
