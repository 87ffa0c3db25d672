//! The MCP servers file (`MCP_SERVERS_FILE`): the editors' `{"mcpServers": {..}}` shape plus our
//! per-server keys `agents`, `tools`, `deny`, `approval` and `tool_approval`, parsed with precise errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Whether a server's tool calls wait for a human (`approval`, `tool_approval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum McpApproval {
    /// Every call is a pending approval first (the default: a server's own hints are untrusted).
    Always,
    /// Calls run without asking.
    Never,
}

/// How the runtime reaches a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum McpTransport {
    /// A child process speaking JSON-RPC on its stdin and stdout, started and killed with the runtime.
    Stdio {
        /// The program.
        command: String,
        /// Its arguments.
        args: Vec<String>,
        /// Variables added to the runtime's environment.
        env: BTreeMap<String, String>,
        /// Its working directory (default: the runtime's).
        cwd: Option<PathBuf>,
    },
    /// A Streamable HTTP endpoint.
    Http {
        /// The endpoint, e.g. `http://127.0.0.1:3001/mcp`.
        url: String,
        /// Headers sent with every request (e.g. `Authorization`).
        headers: BTreeMap<String, String>,
    },
}

/// One configured server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpServerConfig {
    /// Its name: the prefix of its tools (`<name>__<tool>`).
    pub name: String,
    /// How to reach it.
    pub transport: McpTransport,
    /// The agents offered its tools; `None` is every agent except the orchestrator.
    pub agents: Option<Vec<String>>,
    /// The server's tool names offered; `None` is all of them.
    pub tools: Option<Vec<String>>,
    /// Server tool names never offered (wins over `tools`).
    pub deny: Vec<String>,
    /// The default for its calls.
    pub approval: McpApproval,
    /// Per-tool overrides of `approval`, by the server's tool name.
    pub tool_approval: BTreeMap<String, McpApproval>,
}

impl McpServerConfig {
    /// Whether the server's tool `tool` (its own name) is offered at all.
    pub fn offers_tool(&self, tool: &str) -> bool {
        !self.deny.iter().any(|d| d == tool)
            && self.tools.as_ref().is_none_or(|t| t.iter().any(|n| n == tool))
    }

    /// Whether `agent_type` is given this server's tools.
    pub fn serves_agent(&self, agent_type: &str) -> bool {
        match &self.agents {
            Some(a) => a.iter().any(|n| n == agent_type),
            None => agent_type != "orchestrator",
        }
    }

    /// Whether a call of the server's tool `tool` waits for a human.
    pub fn approval_of(&self, tool: &str) -> McpApproval {
        self.tool_approval.get(tool).copied().unwrap_or(self.approval)
    }
}

/// Every configured server, in the file's order of names (sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpServersConfig {
    /// The servers.
    pub servers: Vec<McpServerConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(rename = "mcpServers")]
    mcp_servers: BTreeMap<String, RawServer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(rename = "type")]
    kind: Option<String>,
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    agents: Option<Vec<String>>,
    tools: Option<Vec<String>>,
    #[serde(default)]
    deny: Vec<String>,
    approval: Option<McpApproval>,
    #[serde(default)]
    tool_approval: BTreeMap<String, McpApproval>,
}

impl McpServersConfig {
    /// Reads and parses the file at `path`; errors name the file and, for bad JSON, line and column.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the file's text. An unknown key, a missing `command`/`url`, a server with both, a
    /// bad name or a JSON error are refused with what and where.
    pub fn parse(text: &str) -> Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let inner = e.inner();
            let path = e.path().to_string();
            let at = format!("line {} column {}", inner.line(), inner.column());
            let msg = strip_position(&inner.to_string());
            let syntax = matches!(
                inner.classify(),
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof
            );
            if path == "." || syntax {
                format!("{at}: {msg}")
            } else {
                format!("{at}: at `{path}`: {msg}")
            }
        })?;
        let mut servers = Vec::new();
        for (name, s) in raw.mcp_servers {
            servers.push(server(name, s)?);
        }
        Ok(McpServersConfig { servers })
    }

    /// Checks every `agents` entry against the runtime's agents.
    pub fn check_agents(&self, known: &[String]) -> Result<(), String> {
        for s in &self.servers {
            for a in s.agents.iter().flatten() {
                if !known.contains(a) {
                    return Err(format!(
                        "server '{}': unknown agent '{a}' in `agents` (known: {})",
                        s.name,
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// serde_json's message without its trailing " at line L column C" (we say it first).
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn server(name: String, s: RawServer) -> Result<McpServerConfig, String> {
    let valid_name = !name.is_empty()
        && name.len() <= 32
        && !name.contains("__")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid_name {
        return Err(format!(
            "server name '{name}': use 1-32 characters of A-Z a-z 0-9 _ - without \"__\" \
             (it prefixes the tools' names as <server>__<tool>)"
        ));
    }
    let transport = match (s.command, s.url) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "server '{name}': give either `command` (stdio) or `url` (Streamable HTTP), not both"
            ));
        }
        (None, None) => {
            return Err(format!(
                "server '{name}': missing `command` (stdio) or `url` (Streamable HTTP)"
            ));
        }
        (Some(command), None) => {
            if !s.headers.is_empty() {
                return Err(format!("server '{name}': `headers` is for `url` servers"));
            }
            if command.trim().is_empty() {
                return Err(format!("server '{name}': `command` is empty"));
            }
            McpTransport::Stdio {
                command,
                args: s.args,
                env: s.env,
                cwd: s.cwd,
            }
        }
        (None, Some(url)) => {
            if !s.args.is_empty() || !s.env.is_empty() || s.cwd.is_some() {
                return Err(format!(
                    "server '{name}': `args`, `env` and `cwd` are for `command` servers"
                ));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "server '{name}': `url` must start with http:// or https://, got '{url}'"
                ));
            }
            McpTransport::Http {
                url,
                headers: s.headers,
            }
        }
    };
    match (s.kind.as_deref(), &transport) {
        (None, _)
        | (Some("stdio"), McpTransport::Stdio { .. })
        | (Some("http" | "streamable-http" | "streamableHttp"), McpTransport::Http { .. }) => {}
        (Some(other), _) => {
            return Err(format!(
                "server '{name}': `type` '{other}' does not fit the server (stdio with `command`, \
                 http with `url`; SSE-only servers are not supported)"
            ));
        }
    }
    for t in s.tool_approval.keys() {
        if s.deny.contains(t) {
            return Err(format!(
                "server '{name}': `tool_approval` names '{t}', which `deny` removes"
            ));
        }
    }
    Ok(McpServerConfig {
        name,
        transport,
        agents: s.agents,
        tools: s.tools,
        deny: s.deny,
        approval: s.approval.unwrap_or(McpApproval::Always),
        tool_approval: s.tool_approval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_editors_shape_with_our_keys_parses_into_servers() {
        let c = McpServersConfig::parse(
            r#"{"mcpServers": {
                "fs": {"command": "npx", "args": ["-y", "x"], "env": {"A": "1"}, "cwd": "/tmp",
                       "agents": ["coder"], "deny": ["write_file"], "tool_approval": {"read_file": "never"}},
                "web": {"type": "http", "url": "http://127.0.0.1:1/mcp", "headers": {"X": "y"},
                        "tools": ["echo"], "approval": "never"}
            }}"#,
        );
        assert_eq!(
            c,
            Ok(McpServersConfig {
                servers: vec![
                    McpServerConfig {
                        name: "fs".into(),
                        transport: McpTransport::Stdio {
                            command: "npx".into(),
                            args: vec!["-y".into(), "x".into()],
                            env: BTreeMap::from([("A".into(), "1".into())]),
                            cwd: Some("/tmp".into()),
                        },
                        agents: Some(vec!["coder".into()]),
                        tools: None,
                        deny: vec!["write_file".into()],
                        approval: McpApproval::Always,
                        tool_approval: BTreeMap::from([("read_file".into(), McpApproval::Never)]),
                    },
                    McpServerConfig {
                        name: "web".into(),
                        transport: McpTransport::Http {
                            url: "http://127.0.0.1:1/mcp".into(),
                            headers: BTreeMap::from([("X".into(), "y".into())]),
                        },
                        agents: None,
                        tools: Some(vec!["echo".into()]),
                        deny: vec![],
                        approval: McpApproval::Never,
                        tool_approval: BTreeMap::new(),
                    },
                ]
            })
        );
    }

    #[test]
    fn an_unknown_key_is_refused_by_name_with_its_place() {
        let e = McpServersConfig::parse("{\"mcpServers\": {\"fs\": {\"command\": \"x\",\n \"agnets\": []}}}");
        assert_eq!(
            e,
            Err(
                "line 2 column 9: at `mcpServers.fs.agnets`: unknown field `agnets`, expected one of \
                 `type`, `command`, `args`, `env`, `cwd`, `url`, `headers`, `agents`, `tools`, \
                 `deny`, `approval`, `tool_approval`"
                    .into()
            )
        );
    }

    #[test]
    fn a_file_that_does_not_parse_names_line_and_column() {
        let e = McpServersConfig::parse("{\"mcpServers\": {\n  \"fs\": {\"command\": \"x\",}\n}}");
        assert_eq!(e, Err("line 2 column 25: trailing comma".into()));
    }

    #[test]
    fn servers_without_or_with_both_transports_and_bad_names_are_refused() {
        let cases = [
            (
                r#"{"mcpServers": {"a": {}}}"#,
                "server 'a': missing `command` (stdio) or `url` (Streamable HTTP)",
            ),
            (
                r#"{"mcpServers": {"a": {"command": "x", "url": "http://h"}}}"#,
                "server 'a': give either `command` (stdio) or `url` (Streamable HTTP), not both",
            ),
            (
                r#"{"mcpServers": {"a__b": {"command": "x"}}}"#,
                "server name 'a__b': use 1-32 characters of A-Z a-z 0-9 _ - without \"__\" \
                 (it prefixes the tools' names as <server>__<tool>)",
            ),
            (
                r#"{"mcpServers": {"a": {"url": "ftp://h"}}}"#,
                "server 'a': `url` must start with http:// or https://, got 'ftp://h'",
            ),
            (
                r#"{"mcpServers": {"a": {"command": "x", "approval": "sometimes"}}}"#,
                "line 1 column 61: at `mcpServers.a.approval`: unknown variant `sometimes`, expected `always` or `never`",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(McpServersConfig::parse(text), Err(want.to_string()), "{text}");
        }
    }

    #[test]
    fn offers_agents_and_approvals_follow_the_keys() {
        let c = McpServersConfig::parse(
            r#"{"mcpServers": {"a": {"command": "x", "tools": ["r", "w"], "deny": ["w"],
                "tool_approval": {"r": "never"}}}}"#,
        )
        .unwrap_or_default();
        let s = &c.servers[0];
        assert_eq!(
            (s.offers_tool("r"), s.offers_tool("w"), s.offers_tool("z")),
            (true, false, false)
        );
        assert_eq!(
            (s.serves_agent("coder"), s.serves_agent("orchestrator")),
            (true, false)
        );
        assert_eq!(
            (s.approval_of("r"), s.approval_of("other")),
            (McpApproval::Never, McpApproval::Always)
        );
        assert_eq!(c.check_agents(&["coder".into()]), Ok(()));
        let c2 = McpServersConfig::parse(r#"{"mcpServers": {"a": {"command": "x", "agents": ["nobody"]}}}"#)
            .unwrap_or_default();
        assert_eq!(
            c2.check_agents(&["coder".into()]),
            Err("server 'a': unknown agent 'nobody' in `agents` (known: coder)".into())
        );
    }
}
