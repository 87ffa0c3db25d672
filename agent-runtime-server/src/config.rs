//! The server's settings (API.md §8): every variable also as a command-line flag (its name in
//! kebab case without `AGENT_RUNTIME__`); a flag wins over the environment; bad values name the variable.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use agent_runtime_core::config::{RuntimeConfig, VARIABLES};

/// The documented sample token, refused on a non-loopback address.
pub const SAMPLE_TOKEN: &str = "change-me-internal-key";

/// Variables the server reads on top of the core's, with what they mean.
pub const SERVER_VARIABLES: &[(&str, &str)] = &[
    ("HOST", "listen address (default 127.0.0.1)"),
    ("PORT", "listen port (default 8001; 0 picks a free one)"),
    (
        "INTERNAL_API_KEY",
        "the x-internal-auth token (alias AGENT_RUNTIME__INTERNAL_API_KEY)",
    ),
    (
        "MAX_REQUEST_BYTES",
        "request body limit in bytes (default 1048576)",
    ),
    (
        "LOG_LEVEL",
        "log filter, e.g. INFO or agent_runtime=debug (also RUST_LOG)",
    ),
    ("LOG_FORMAT", "text or json (default text)"),
    (
        "SSE_KEEPALIVE_SECS",
        "idle time before a ': keep-alive' comment (default 15)",
    ),
    (
        "SHUTDOWN_GRACE_SECS",
        "how long running turns get to stop on SIGTERM (default 10)",
    ),
    (
        "REQUEST_TIMEOUT_SECS",
        "time a client gets to send a request's head, and again its body (default 30)",
    ),
];

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
    /// Grace period for running turns at shutdown.
    pub shutdown_grace: Duration,
    /// Time a client gets to send a request's head, and again its body (slow clients hold a
    /// connection and a task; past this they get an error and the connection closes).
    pub request_timeout: Duration,
    /// The core's settings.
    pub runtime: RuntimeConfig,
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

fn all_variables() -> Vec<(&'static str, &'static str)> {
    let mut vars: Vec<(&str, &str)> = VARIABLES.iter().map(|v| (*v, "see API.md §8")).collect();
    vars.extend_from_slice(SERVER_VARIABLES);
    vars
}

/// The command line: one `--flag VALUE` per variable, built from the variable lists so they agree.
pub fn command() -> clap::Command {
    let mut cmd = clap::Command::new("agent-runtime-server")
        .version(env!("CARGO_PKG_VERSION"))
        .about("The agent runtime's HTTP API. Every flag overrides the environment variable it names.");
    for (var, help) in all_variables() {
        cmd = cmd.arg(
            clap::Arg::new(var)
                .long(flag_name(var))
                .value_name("VALUE")
                .allow_hyphen_values(true)
                .help(format!("{var}: {help}")),
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
    for (var, _) in all_variables() {
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
    parse_values(&values).map_err(|ConfigError(message)| {
        // The messages start with the variable's name: say it as the user gave it.
        let renamed = sources.iter().find_map(|(var, source)| {
            let rest = message.strip_prefix(var)?.strip_prefix(": ")?;
            Some(format!("{source}: {rest}"))
        });
        ConfigError(renamed.unwrap_or(message))
    })
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
    let shutdown_grace = Duration::from_secs(num("SHUTDOWN_GRACE_SECS", 10, 0)?);
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
        shutdown_grace,
        request_timeout,
        runtime,
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
