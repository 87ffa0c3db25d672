//! Tools the agents call (API.md §6): the [`Tool`] trait, the eight built-in tools confined to the
//! session's project root, the [`ToolRegistry`] and the runtime [`ToolExecutor`].
//!
//! Every call goes through two steps. [`Tool::check`] validates the arguments (by deserializing them
//! into the same type their JSON Schema is generated from, so schema and validation cannot drift) and
//! confines every path; it has no side effects, so the engine runs it before asking for approval.
//! [`Tool::run`] checks again (an edited approval may have changed the arguments) and executes.
//!
//! Failures are a [`ToolFailure`]: `Invalid` (`INVALID_TOOL`, refused before anything ran: unknown
//! tool, bad arguments, a path outside the project) or `Failed` (`TOOL_EXECUTION_FAILED`: the tool
//! ran and failed, e.g. a file inside the project that does not exist; API.md §9.19).
//!
//! Result shapes (one per tool):
//!
//! | tool | result |
//! |---|---|
//! | `read_file` | string: `"[path: lines S-E of N]\n"` then the lines (cut at `max_output_bytes`, with a note) |
//! | `write_file` | `{"path", "bytes_written"}` |
//! | `list_files` | `{"entries": [..]}` (directories end with `/`, sorted, relative to the project root), plus `"note"` when cut |
//! | `search_in_code` | `{"matches": ["file:line: text", ..]}`, plus `"note"` when cut |
//! | `execute_command` | `{"exit_code" (null when killed), "stdout", "stderr", "timed_out"}` |
//! | `git_diff` | string: the diff (empty when nothing changed) |
//! | `git_commit` | `{"commit": "<sha>"}` |
//! | `delete_file` | `{"deleted": "path"}` |

mod beneath;
mod command;
mod fs;
mod git;
pub mod isolation;
pub mod mcp;
pub mod sandbox;
mod search;
mod walk;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::protocol::{ToolError, ToolSpec};

pub use command::MAX_COMMAND_TIMEOUT_SECS;
pub use fs::MAX_LIST_ENTRIES;
pub use isolation::{CommandRights, CommandSandbox, SandboxMode, SandboxSettings, SandboxStatus};
pub use search::MAX_SEARCH_MATCHES;

/// Default `COMMAND_TIMEOUT_SECS` (API.md §6).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Default cap on the text a tool hands back per stream (`MAX_TOOL_OUTPUT_BYTES`, API.md §5.6).
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 32 * 1024;

/// Where and how a tool call runs: the session's project root and the limits of the runtime.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The session's `project_path`; every path a tool touches must resolve inside it.
    pub project_root: PathBuf,
    /// Default timeout of `execute_command` (and of the git tools).
    pub command_timeout: Duration,
    /// Cap on the bytes of text a tool keeps per output (a file's content, stdout, stderr, a diff).
    pub max_output_bytes: usize,
    /// Cancelled when the turn is cancelled: a running command is killed with its process group.
    pub cancel: CancellationToken,
    /// The sandbox of the processes the call starts (its agent's rights).
    pub sandbox: CommandSandbox,
}

impl ToolContext {
    /// A context for `project_root` with the default limits, a fresh cancellation token and the
    /// default sandbox (enforced, project writable, no network).
    pub fn new(project_root: impl Into<PathBuf>) -> Self {
        ToolContext {
            project_root: project_root.into(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            cancel: CancellationToken::new(),
            sandbox: CommandSandbox::default(),
        }
    }
}

/// Why a tool call did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolFailure {
    /// `INVALID_TOOL`: refused before anything ran (unknown tool, bad arguments, path outside the project).
    #[error("{0}")]
    Invalid(String),
    /// `TOOL_EXECUTION_FAILED`: the tool ran and failed.
    #[error("{0}")]
    Failed(String),
}

impl ToolFailure {
    /// The stable code: `INVALID_TOOL` or `TOOL_EXECUTION_FAILED`.
    pub fn code(&self) -> &'static str {
        match self {
            ToolFailure::Invalid(_) => "INVALID_TOOL",
            ToolFailure::Failed(_) => "TOOL_EXECUTION_FAILED",
        }
    }

    /// What went wrong, as the model reads it.
    pub fn message(&self) -> &str {
        match self {
            ToolFailure::Invalid(m) | ToolFailure::Failed(m) => m,
        }
    }

    /// The failure as streamed in a `tool_result` event (API.md §9.2).
    pub fn to_tool_error(&self) -> ToolError {
        ToolError {
            code: self.code().to_string(),
            message: self.message().to_string(),
        }
    }
}

impl From<ToolFailure> for crate::Error {
    fn from(f: ToolFailure) -> Self {
        match f {
            ToolFailure::Invalid(m) => crate::Error::InvalidTool(m),
            ToolFailure::Failed(m) => crate::Error::ToolExecutionFailed(m),
        }
    }
}

/// One tool the model can call.
#[async_trait]
pub trait Tool: Send + Sync {
    /// Name, description and the JSON Schema of the arguments (generated from the argument type).
    fn spec(&self) -> ToolSpec;

    /// Validates the arguments and confines every path, with no side effects. The engine calls it
    /// before asking for approval; `Err` is always [`ToolFailure::Invalid`] except when the project
    /// root itself cannot be read.
    fn check(&self, ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure>;

    /// The paths (as given, relative or not) this call writes or deletes, for the agents' path rules
    /// (e.g. the architect may only write `*.md`). Empty when the arguments do not parse.
    fn touched_paths(&self, arguments: &Value) -> Vec<String>;

    /// Checks again, then executes.
    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure>;

    /// Whether running it changes anything (files, the repository, the world): a call of such a
    /// tool that was in flight when its process stopped is never run again on takeover; a
    /// read-only one is. Tools that do not say are taken to have side effects.
    fn has_side_effects(&self) -> bool {
        true
    }
}

/// The name a tool is registered under: `run_command` (the earlier runtime's name, API.md §5.3) is
/// `execute_command`; every other name is itself.
pub fn canonical_tool_name(name: &str) -> &str {
    match name {
        "run_command" => "execute_command",
        other => other,
    }
}

/// Tools by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The eight built-in tools of API.md §6.
    pub fn builtin() -> Self {
        let mut r = Self::new();
        r.register(Arc::new(fs::ReadFile));
        r.register(Arc::new(fs::WriteFile));
        r.register(Arc::new(fs::ListFiles));
        r.register(Arc::new(search::SearchInCode));
        r.register(Arc::new(command::ExecuteCommand));
        r.register(Arc::new(git::GitDiff));
        r.register(Arc::new(git::GitCommit));
        r.register(Arc::new(fs::DeleteFile));
        r
    }

    /// Adds a tool under its spec's name, replacing any tool of that name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.spec().name, tool);
    }

    /// The tool called `name` (aliases such as `run_command` resolved).
    pub fn get(&self, name: &str) -> Option<Arc<dyn Tool>> {
        self.tools.get(canonical_tool_name(name)).cloned()
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tools.keys().map(String::as_str).collect()
    }

    /// The specs of the named tools, in the order given; unknown names are skipped.
    pub fn specs(&self, names: &[&str]) -> Vec<ToolSpec> {
        names
            .iter()
            .filter_map(|n| self.get(n))
            .map(|t| t.spec())
            .collect()
    }
}

/// Executes a tool call. In `runtime` mode this is [`RuntimeExecutor`]; embedders may supply their own.
#[async_trait]
pub trait ToolExecutor: Send + Sync {
    /// Runs `tool_name` with `arguments` in `ctx`.
    async fn execute(
        &self,
        ctx: &ToolContext,
        tool_name: &str,
        arguments: Value,
    ) -> Result<Value, ToolFailure>;
}

/// The `runtime` execution mode: tools from a registry, run inside the project root.
#[derive(Debug, Clone)]
pub struct RuntimeExecutor {
    registry: Arc<ToolRegistry>,
}

impl RuntimeExecutor {
    /// An executor over `registry`.
    pub fn new(registry: Arc<ToolRegistry>) -> Self {
        RuntimeExecutor { registry }
    }

    /// The registry it executes from.
    pub fn registry(&self) -> &Arc<ToolRegistry> {
        &self.registry
    }
}

impl Default for RuntimeExecutor {
    fn default() -> Self {
        Self::new(Arc::new(ToolRegistry::builtin()))
    }
}

#[async_trait]
impl ToolExecutor for RuntimeExecutor {
    #[tracing::instrument(skip(self, ctx, arguments), fields(root = %ctx.project_root.display()))]
    async fn execute(
        &self,
        ctx: &ToolContext,
        tool_name: &str,
        arguments: Value,
    ) -> Result<Value, ToolFailure> {
        let tool = self
            .registry
            .get(tool_name)
            .ok_or_else(|| ToolFailure::Invalid(format!("unknown tool '{tool_name}'")))?;
        let result = tool.run(ctx, arguments).await;
        if let Err(f) = &result {
            tracing::debug!(code = f.code(), message = f.message(), "tool call failed");
        }
        result
    }
}

/// The JSON Schema of `T` as sent to the model: an inline object schema without `$schema`, `title` or
/// the type's own doc comment (written for Rust readers; the tool's description speaks to the model).
pub(crate) fn schema_of<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.meta_schema = None;
            s.inline_subschemas = true;
        })
        .for_deserialize()
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    if let Value::Object(map) = &mut value {
        map.remove("title");
        map.remove("description");
    }
    value
}

/// Deserializes a tool's arguments, with an error that names the tool and the bad field.
pub(crate) fn parse_args<T: DeserializeOwned>(tool: &str, arguments: &Value) -> Result<T, ToolFailure> {
    let kind = match arguments {
        Value::Object(_) => None,
        Value::Null => Some("null"),
        Value::Bool(_) => Some("a boolean"),
        Value::Number(_) => Some("a number"),
        Value::String(_) => Some("a string"),
        Value::Array(_) => Some("an array"),
    };
    if let Some(kind) = kind {
        return Err(ToolFailure::Invalid(format!(
            "{tool}: arguments must be a JSON object, got {kind}"
        )));
    }
    serde_path_to_error::deserialize(arguments).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ToolFailure::Invalid(format!("{tool}: invalid arguments: {}", e.inner()))
        } else {
            ToolFailure::Invalid(format!("{tool}: invalid argument `{path}`: {}", e.inner()))
        }
    })
}

/// Refuses NUL bytes in a string argument that reaches the OS (a path, a command, a message).
pub(crate) fn no_nul(field: &str, value: &str) -> Result<(), ToolFailure> {
    if value.contains('\0') {
        Err(ToolFailure::Invalid(format!(
            "`{field}` must not contain NUL bytes"
        )))
    } else {
        Ok(())
    }
}

/// `kept` as text, with a note of how many bytes of `total` were cut.
pub(crate) fn bounded_text(kept: &[u8], total: u64) -> String {
    let mut text = String::from_utf8_lossy(kept).into_owned();
    let cut = total.saturating_sub(kept.len() as u64);
    if cut > 0 {
        if !text.ends_with('\n') && !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!("[output cut: {cut} more bytes not shown]"));
    }
    text
}

/// A blocking task's panic or cancellation, as a tool failure.
pub(crate) fn join_failure(tool: &str, e: tokio::task::JoinError) -> ToolFailure {
    ToolFailure::Failed(format!("{tool}: the task ended unexpectedly: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_tool_name_maps_run_command_to_execute_command() {
        assert_eq!(canonical_tool_name("run_command"), "execute_command");
        assert_eq!(canonical_tool_name("read_file"), "read_file");
    }

    #[test]
    fn builtin_registry_holds_the_eight_tools() {
        let r = ToolRegistry::builtin();
        assert_eq!(
            r.names(),
            vec![
                "delete_file",
                "execute_command",
                "git_commit",
                "git_diff",
                "list_files",
                "read_file",
                "search_in_code",
                "write_file"
            ]
        );
        assert_eq!(
            r.get("run_command").map(|t| t.spec().name),
            Some("execute_command".into())
        );
    }

    #[test]
    fn only_the_read_only_built_in_tools_may_run_again_after_a_takeover() {
        let r = ToolRegistry::builtin();
        let with_side_effects: Vec<&str> = (r.names().into_iter())
            .filter(|n| r.get(n).is_some_and(|t| t.has_side_effects()))
            .collect();
        assert_eq!(
            with_side_effects,
            ["delete_file", "execute_command", "git_commit", "write_file"]
        );
    }

    #[test]
    fn tool_failure_maps_to_codes_and_errors() {
        let f = ToolFailure::Invalid("bad".into());
        assert_eq!(
            f.to_tool_error(),
            ToolError {
                code: "INVALID_TOOL".into(),
                message: "bad".into()
            }
        );
        assert_eq!(crate::Error::from(f).code(), "INVALID_TOOL");
        let f = ToolFailure::Failed("boom".into());
        assert_eq!(f.code(), "TOOL_EXECUTION_FAILED");
        assert_eq!(crate::Error::from(f).code(), "TOOL_EXECUTION_FAILED");
    }

    #[test]
    fn bounded_text_notes_the_cut() {
        assert_eq!(bounded_text(b"abc", 3), "abc");
        assert_eq!(
            bounded_text(b"abc", 10),
            "abc\n[output cut: 7 more bytes not shown]"
        );
    }

    #[test]
    fn parse_args_refuses_non_objects() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct A {
            x: u32,
        }
        let e = parse_args::<A>("t", &json!([1])).err();
        assert_eq!(
            e,
            Some(ToolFailure::Invalid(
                "t: arguments must be a JSON object, got an array".into()
            ))
        );
        let e = parse_args::<A>("t", &json!({"x": "no"})).err();
        assert_eq!(
            e,
            Some(ToolFailure::Invalid(
                "t: invalid argument `x`: invalid type: string \"no\", expected u32".into()
            ))
        );
    }
}
