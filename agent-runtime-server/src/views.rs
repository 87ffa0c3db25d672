//! The API bodies that are not core types as they stand: what handlers parse and serialize, and
//! what `GET /openapi.json` describes (schemars), so the document cannot drift from the code.
//!
//! Core's wire types (`ClientMessage`, `HitlDecision`, `Message`, `AgentSwitch`, `CurrentAgent`,
//! `CreateSession`, ...) describe themselves (core's `schema` feature); a type lives here only when
//! the API reshapes core's: a session answers with `session_id` and without its internal seqs and
//! turn state, a list wraps its items, an approval leaves out its decision fields.

use agent_runtime_core::Session;
use agent_runtime_core::SessionStatus;
use agent_runtime_core::agent::AgentInfo;
use agent_runtime_core::approval::{Approval, RequestType};
use agent_runtime_core::budget::Budget;
use agent_runtime_core::orchestrator::SessionHistory;
use agent_runtime_core::protocol::{write_decimal, write_json_str};
use agent_runtime_core::session::{AgentSwitch, Message};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `201` answer of `POST /sessions`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CreatedSession {
    /// The session id.
    pub session_id: String,
    /// The same id (for clients of the earlier runtime).
    pub id: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// The agent that answers next.
    pub current_agent: String,
    /// Stored messages (0).
    pub message_count: u64,
}

impl From<&Session> for CreatedSession {
    fn from(s: &Session) -> Self {
        CreatedSession {
            session_id: s.id.clone(),
            id: s.id.clone(),
            created_at: s.created_at.to_rfc3339(),
            current_agent: s.current_agent.clone(),
            message_count: s.message_count,
        }
    }
}

/// `GET /sessions/{session_id}`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SessionView {
    /// The session id.
    pub session_id: String,
    /// The owner.
    pub user_id: Option<String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub last_activity: String,
    /// As given at creation.
    pub metadata: Value,
    /// The agent that answers next.
    pub current_agent: String,
    /// Stored user, assistant and tool messages.
    pub message_count: u64,
    /// `idle`, `running`, `awaiting_approval` or `awaiting_tool_result`.
    pub status: SessionStatus,
    /// The session's budgets; absent when unlimited.
    #[serde(default, skip_serializing_if = "Budget::is_unlimited")]
    pub budget: Budget,
}

impl From<&Session> for SessionView {
    fn from(s: &Session) -> Self {
        SessionView {
            session_id: s.id.clone(),
            user_id: s.user_id.clone(),
            created_at: s.created_at.to_rfc3339(),
            last_activity: s.last_activity.to_rfc3339(),
            metadata: s.metadata.clone(),
            current_agent: s.current_agent.clone(),
            message_count: s.message_count,
            status: s.status,
            budget: s.budget,
        }
    }
}

/// `GET /sessions`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SessionList {
    /// Newest activity first.
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
    /// Sessions matching the filter (`user_id`) across all pages.
    pub total: u64,
}

/// `GET /sessions/{session_id}/messages` (and `/history`).
#[derive(Debug, Serialize, JsonSchema)]
pub struct MessageList {
    /// The session.
    pub session_id: String,
    /// Oldest first.
    pub messages: Vec<Message>,
    /// Stored user, assistant and tool messages of the whole session.
    pub message_count: u64,
    /// The agent that answers next.
    pub current_agent: String,
    /// RFC 3339 UTC.
    pub last_activity: String,
    /// Every switch of the session's agent, oldest first.
    pub agent_history: Vec<AgentSwitch>,
}

impl MessageList {
    /// The answer for `h` as JSON: the bytes `serde_json::to_vec(&MessageList::from(h))` writes,
    /// written straight from the history (its messages are not copied into a `MessageList`, and
    /// each is written directly, see `Message::write_json`).
    pub fn json(h: &SessionHistory) -> Vec<u8> {
        let text: usize = h.messages.iter().map(|m| m.content.len() + 160).sum();
        let mut buf = Vec::with_capacity(256 + text);
        buf.extend_from_slice(br#"{"session_id":"#);
        write_json_str(&mut buf, &h.session.id);
        buf.extend_from_slice(br#","messages":["#);
        for (i, m) in h.messages.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            m.write_json(&mut buf);
        }
        buf.extend_from_slice(br#"],"message_count":"#);
        write_decimal(&mut buf, h.session.message_count);
        buf.extend_from_slice(br#","current_agent":"#);
        write_json_str(&mut buf, &h.session.current_agent);
        buf.extend_from_slice(br#","last_activity":"#);
        h.session.last_activity.write_json(&mut buf);
        buf.extend_from_slice(br#","agent_history":["#);
        for (i, s) in h.agent_history.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            s.write_json(&mut buf);
        }
        buf.extend_from_slice(b"]}");
        buf
    }
}

impl From<&SessionHistory> for MessageList {
    fn from(h: &SessionHistory) -> Self {
        MessageList {
            session_id: h.session.id.clone(),
            messages: h.messages.clone(),
            message_count: h.session.message_count,
            current_agent: h.session.current_agent.clone(),
            last_activity: h.session.last_activity.to_rfc3339(),
            agent_history: h.agent_history.clone(),
        }
    }
}

/// `GET /agents`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AgentList {
    /// In display order.
    pub agents: Vec<AgentInfo>,
}

/// A pending approval.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PendingApprovalView {
    /// The tool call id (or plan id).
    pub call_id: String,
    /// The tool (`propose_plan` for plans).
    pub tool_name: String,
    /// The proposed arguments.
    pub arguments: Value,
    /// Why approval is needed.
    pub reason: String,
    /// `tool`, `plan` or `budget`.
    pub request_type: RequestType,
    /// RFC 3339 UTC.
    pub created_at: String,
}

impl From<&Approval> for PendingApprovalView {
    fn from(a: &Approval) -> Self {
        PendingApprovalView {
            call_id: a.call_id.clone(),
            tool_name: a.tool_name.clone(),
            arguments: a.arguments.clone(),
            reason: a.reason.clone(),
            request_type: a.request_type,
            created_at: a.created_at.to_rfc3339(),
        }
    }
}

/// `PATCH /sessions/{session_id}`: what changes (only the budgets, for now).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionPatch {
    /// Budgets to set (`null` for one: unlimited); budgets not named stay.
    #[schemars(with = "Option<Budget>")]
    pub budget: Option<Value>,
}

/// `GET /sessions/{session_id}/pending-approvals`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PendingApprovals {
    /// Oldest first.
    pub pending_approvals: Vec<PendingApprovalView>,
}

/// `{"status": ...}` of cancel and delete.
#[derive(Debug, Serialize, JsonSchema)]
pub struct StatusReply {
    /// `cancelled`, `idle` or `deleted`.
    pub status: String,
}

/// `POST /agent/message/stream`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct StreamRequest {
    /// The session.
    pub session_id: String,
    /// Idempotency key: the same id again replays that turn.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The message.
    pub message: agent_runtime_core::protocol::ClientMessage,
}

/// `POST /sessions/{session_id}/hitl-decision`: core's decision (an unknown verb or an edit
/// without arguments fails at parsing, as 400) and the idempotency key.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct HitlDecisionRequest {
    /// The decision.
    #[serde(flatten)]
    pub decision: agent_runtime_core::protocol::HitlDecision,
    /// Idempotency key.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// `GET /health`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct HealthView {
    /// `healthy` or `degraded`.
    pub status: String,
    /// `agent-runtime`.
    pub service: String,
    /// The server's version.
    pub version: String,
    /// `{"<sqlite|postgres|memory>": "connected"|"disconnected", "llm_proxy": "available"|"unavailable"}`.
    pub dependencies: std::collections::BTreeMap<String, String>,
    /// Multi-agent settings.
    pub multi_agent: MultiAgentView,
    /// The process sandbox of tool commands: mode, the kernel's Landlock ABI, seccomp, and how the
    /// file tools open paths (`openat2` or `path_walk`).
    pub sandbox: agent_runtime_core::tools::SandboxStatus,
    /// This process: its lease owner id and how many turns it runs now.
    pub process: agent_runtime_core::orchestrator::ProcessInfo,
    /// Each MCP server (`MCP_SERVERS_FILE`): its state, tools, restarts and last error; absent
    /// when none is configured. A server that is down does not make the runtime degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp_servers: Vec<agent_runtime_core::tools::mcp::McpServerHealth>,
}

/// The `multi_agent` part of `GET /health`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MultiAgentView {
    /// `AGENT_RUNTIME__MULTI_AGENT_ENABLED`.
    pub enabled: bool,
    /// `AGENT_RUNTIME__DEFAULT_AGENT`.
    pub default_agent: String,
    /// Agents in the registry.
    pub agents_count: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_runtime_core::session::{NewSession, Role, ToolCall};
    use agent_runtime_core::time::Timestamp;
    use serde_json::json;

    fn history(messages: Vec<Message>, agent_history: Vec<AgentSwitch>) -> SessionHistory {
        let mut session = NewSession {
            id: "s \"1\" é".into(),
            user_id: Some("u".into()),
            metadata: json!({"project_path": "/tmp/p"}),
            current_agent: "coder\n".into(),
            created_at: Timestamp::from_millis(1_764_500_000_000),
            budget: Budget::default(),
        }
        .into_session();
        session.message_count = u64::MAX;
        session.last_activity = Timestamp::from_millis(1_764_500_000_123);
        SessionHistory {
            session,
            messages,
            agent_history,
        }
    }

    #[test]
    fn a_history_answer_written_directly_is_byte_identical_to_the_serialized_message_list() {
        let message = |seq: u64, role, content: &str| Message {
            seq,
            role,
            content: content.into(),
            agent: seq.is_multiple_of(2).then(|| "coder".into()),
            tool_calls: vec![],
            tool_call_id: None,
            created_at: Timestamp::from_millis(1_764_500_000_000 + seq as i64 * 7),
        };
        let mut with_call = message(2, Role::Assistant, "");
        with_call.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "read_file".into(),
            arguments: json!({"path": "README.md"}),
        }];
        let mut tool = message(3, Role::Tool, "# readme\n\"quoted\" \\ \u{1}");
        tool.tool_call_id = Some("call_1".into());
        let switch = AgentSwitch {
            from_agent: "orchestrator".into(),
            to_agent: "coder".into(),
            reason: "routing: \"code\"".into(),
            timestamp: Timestamp::from_millis(1_764_500_000_001),
        };
        let histories = [
            history(vec![], vec![]),
            history(vec![message(1, Role::User, "hello")], vec![]),
            history(
                vec![message(1, Role::User, "read it 🚀"), with_call, tool],
                vec![switch.clone(), switch],
            ),
        ];
        let direct: Vec<String> = histories
            .iter()
            .map(|h| String::from_utf8(MessageList::json(h)).unwrap())
            .collect();
        let serialized: Vec<String> = histories
            .iter()
            .map(|h| serde_json::to_string(&MessageList::from(h)).unwrap())
            .collect();
        assert_eq!(direct, serialized);
    }
}
