//! Which tool calls need a human's approval. `ApprovalPolicy` is replaceable; the default reads
//! `HITL_ENABLED` and `HITL_DANGEROUS_TOOLS` (with `run_command` as another name for `execute_command`).

use std::collections::BTreeSet;

use serde_json::Value;

/// A tool call the policy is asked about (already checked: the tool exists and the agent may use it).
#[derive(Debug, Clone, Copy)]
pub struct ToolRequest<'a> {
    /// The session.
    pub session_id: &'a str,
    /// The agent making the call.
    pub agent: &'a str,
    /// The tool (canonical name).
    pub tool_name: &'a str,
    /// Its validated arguments.
    pub arguments: &'a Value,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalRequirement {
    /// Run without asking.
    Run,
    /// Ask a human first, telling them why.
    Ask(String),
}

impl ApprovalRequirement {
    /// Ask, with this reason.
    pub fn ask(reason: impl Into<String>) -> Self {
        ApprovalRequirement::Ask(reason.into())
    }
}

/// Decides per call whether a human must approve it.
pub trait ApprovalPolicy: Send + Sync + std::fmt::Debug {
    /// The requirement for this call. It may be asked more than once about the same call (when
    /// the call's id is assigned and when it runs): answer from the request alone.
    fn evaluate(&self, request: &ToolRequest<'_>) -> ApprovalRequirement;
}

pub use crate::tools::canonical_tool_name;

/// The default policy: calls to the listed tools need approval while HITL is enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DangerousToolsPolicy {
    enabled: bool,
    tools: BTreeSet<String>,
}

impl Default for DangerousToolsPolicy {
    fn default() -> Self {
        DangerousToolsPolicy::new(true, ["write_file", "delete_file", "execute_command"])
    }
}

impl DangerousToolsPolicy {
    /// `enabled` is `HITL_ENABLED`; `tools` is `HITL_DANGEROUS_TOOLS` (aliases accepted).
    pub fn new<I, S>(enabled: bool, tools: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let tools = tools
            .into_iter()
            .map(|t| canonical_tool_name(t.as_ref().trim()).to_string())
            .filter(|t| !t.is_empty())
            .collect();
        DangerousToolsPolicy { enabled, tools }
    }

    /// The tools that need approval, canonical names.
    pub fn tools(&self) -> impl Iterator<Item = &str> {
        self.tools.iter().map(String::as_str)
    }
}

impl ApprovalPolicy for DangerousToolsPolicy {
    fn evaluate(&self, request: &ToolRequest<'_>) -> ApprovalRequirement {
        let tool = canonical_tool_name(request.tool_name);
        if !self.enabled || !self.tools.contains(tool) {
            return ApprovalRequirement::Run;
        }
        ApprovalRequirement::Ask(match tool {
            "write_file" | "delete_file" => "File modification requires approval".to_string(),
            "execute_command" => "Command execution requires approval".to_string(),
            other => format!("The tool '{other}' requires approval"),
        })
    }
}

/// A policy from a closure: per tool, per agent, or any predicate over the arguments.
pub struct FnPolicy<F>(pub F);

impl<F> std::fmt::Debug for FnPolicy<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnPolicy")
    }
}

impl<F> ApprovalPolicy for FnPolicy<F>
where
    F: Fn(&ToolRequest<'_>) -> ApprovalRequirement + Send + Sync,
{
    fn evaluate(&self, request: &ToolRequest<'_>) -> ApprovalRequirement {
        (self.0)(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req<'a>(tool: &'a str, args: &'a Value) -> ToolRequest<'a> {
        ToolRequest {
            session_id: "s",
            agent: "coder",
            tool_name: tool,
            arguments: args,
        }
    }

    #[test]
    fn default_policy_asks_for_the_dangerous_tools() {
        let p = DangerousToolsPolicy::default();
        let args = json!({});
        assert_eq!(
            p.evaluate(&req("write_file", &args)),
            ApprovalRequirement::ask("File modification requires approval")
        );
        assert_eq!(
            p.evaluate(&req("run_command", &args)),
            ApprovalRequirement::ask("Command execution requires approval")
        );
        assert_eq!(p.evaluate(&req("read_file", &args)), ApprovalRequirement::Run);
    }

    #[test]
    fn run_command_in_the_list_means_execute_command() {
        let p = DangerousToolsPolicy::new(true, ["write_file", " run_command"]);
        assert_eq!(p.tools().collect::<Vec<_>>(), ["execute_command", "write_file"]);
    }

    #[test]
    fn disabled_hitl_runs_everything() {
        let p = DangerousToolsPolicy::new(false, ["write_file"]);
        assert_eq!(
            p.evaluate(&req("write_file", &json!({}))),
            ApprovalRequirement::Run
        );
    }

    #[test]
    fn closures_decide_by_arguments() {
        let p = FnPolicy(|r: &ToolRequest<'_>| {
            if r.arguments["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("secrets/"))
            {
                ApprovalRequirement::ask("secrets")
            } else {
                ApprovalRequirement::Run
            }
        });
        assert_eq!(
            p.evaluate(&req("read_file", &json!({"path": "secrets/key"}))),
            ApprovalRequirement::ask("secrets")
        );
        assert_eq!(
            p.evaluate(&req("read_file", &json!({"path": "src/a.rs"}))),
            ApprovalRequirement::Run
        );
    }
}
