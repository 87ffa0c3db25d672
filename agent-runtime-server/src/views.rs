//! The request and response bodies of the API as Rust types: what handlers parse and serialize,
//! and what `GET /openapi.json` describes (schemars), so the document cannot drift from the code.

use agent_runtime_core::Session;
use agent_runtime_core::agent::AgentInfo;
use agent_runtime_core::approval::Approval;
use agent_runtime_core::orchestrator::{AgentRef, CurrentAgent, SessionHistory};
use agent_runtime_core::session::{AgentSwitch, Message};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /sessions` (every field optional; an empty body is valid).
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct CreateSessionRequest {
    /// The owner.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Free JSON object; `project_path` and `tool_execution` are read by the runtime.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// A client-chosen id (1–128 chars of `[A-Za-z0-9_.:-]`).
    #[serde(default)]
    pub session_id: Option<String>,
}

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

/// What a session is doing.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusView {
    /// Takes new messages.
    Idle,
    /// A turn is streaming.
    Running,
    /// Paused until approvals are decided.
    AwaitingApproval,
    /// Paused until the client sends tool results.
    AwaitingToolResult,
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
    pub status: StatusView,
}

impl From<&Session> for SessionView {
    fn from(s: &Session) -> Self {
        use agent_runtime_core::SessionStatus as S;
        SessionView {
            session_id: s.id.clone(),
            user_id: s.user_id.clone(),
            created_at: s.created_at.to_rfc3339(),
            last_activity: s.last_activity.to_rfc3339(),
            metadata: s.metadata.clone(),
            current_agent: s.current_agent.clone(),
            message_count: s.message_count,
            status: match s.status {
                S::Idle => StatusView::Idle,
                S::Running => StatusView::Running,
                S::AwaitingApproval => StatusView::AwaitingApproval,
                S::AwaitingToolResult => StatusView::AwaitingToolResult,
            },
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

/// A tool call in a stored assistant message.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ToolCallView {
    /// The call id.
    pub id: String,
    /// The tool.
    pub name: String,
    /// Its arguments.
    pub arguments: Value,
}

/// A stored message.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MessageView {
    /// Per-session sequence number.
    pub seq: u64,
    /// `user`, `assistant`, `tool` or `system`.
    pub role: String,
    /// The text.
    pub content: String,
    /// The agent that produced it (or was current).
    pub agent: Option<String>,
    /// Tool calls of an assistant message.
    // `default` marks it optional in the schema: it is left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallView>,
    /// The call a tool message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// RFC 3339 UTC.
    pub created_at: String,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> Self {
        MessageView {
            seq: m.seq,
            role: m.role.as_str().to_string(),
            content: m.content.clone(),
            agent: m.agent.clone(),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| ToolCallView {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                })
                .collect(),
            tool_call_id: m.tool_call_id.clone(),
            created_at: m.created_at.to_rfc3339(),
        }
    }
}

/// `GET /sessions/{session_id}/messages` (and `/history`).
#[derive(Debug, Serialize, JsonSchema)]
pub struct MessageList {
    /// The session.
    pub session_id: String,
    /// Oldest first.
    pub messages: Vec<MessageView>,
    /// Stored user, assistant and tool messages of the whole session.
    pub message_count: u64,
    /// The agent that answers next.
    pub current_agent: String,
    /// RFC 3339 UTC.
    pub last_activity: String,
    /// Every switch of the session's agent, oldest first.
    pub agent_history: Vec<SwitchView>,
}

impl From<&SessionHistory> for MessageList {
    fn from(h: &SessionHistory) -> Self {
        MessageList {
            session_id: h.session.id.clone(),
            messages: h.messages.iter().map(MessageView::from).collect(),
            message_count: h.session.message_count,
            current_agent: h.session.current_agent.clone(),
            last_activity: h.session.last_activity.to_rfc3339(),
            agent_history: h.agent_history.iter().map(SwitchView::from).collect(),
        }
    }
}

/// `GET /agents`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AgentList {
    /// In display order.
    pub agents: Vec<AgentInfo>,
}

/// An agent in `GET /agents/{session_id}/current`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AgentRefView {
    /// The agent type.
    #[serde(rename = "type")]
    pub agent_type: String,
    /// Display name.
    pub name: String,
    /// Emoji.
    pub emoji: String,
    /// When the session switched to it (current agent only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<String>,
}

impl From<&AgentRef> for AgentRefView {
    fn from(a: &AgentRef) -> Self {
        AgentRefView {
            agent_type: a.agent_type.clone(),
            name: a.name.clone(),
            emoji: a.emoji.clone(),
            switched_at: a.switched_at.map(|t| t.to_rfc3339()),
        }
    }
}

/// One switch of a session's agent.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SwitchView {
    /// The agent before.
    pub from_agent: String,
    /// The agent after.
    pub to_agent: String,
    /// Why.
    pub reason: String,
    /// RFC 3339 UTC.
    pub timestamp: String,
}

impl From<&AgentSwitch> for SwitchView {
    fn from(s: &AgentSwitch) -> Self {
        SwitchView {
            from_agent: s.from_agent.clone(),
            to_agent: s.to_agent.clone(),
            reason: s.reason.clone(),
            timestamp: s.timestamp.to_rfc3339(),
        }
    }
}

/// `GET /agents/{session_id}/current`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CurrentAgentView {
    /// The session.
    pub session_id: String,
    /// The agent now.
    pub current_agent: AgentRefView,
    /// The agent before the last switch (`null` if none).
    pub previous_agent: Option<AgentRefView>,
    /// Switches in the session.
    pub switch_count: usize,
    /// Every switch, oldest first.
    pub switch_history: Vec<SwitchView>,
}

impl From<&CurrentAgent> for CurrentAgentView {
    fn from(c: &CurrentAgent) -> Self {
        CurrentAgentView {
            session_id: c.session_id.clone(),
            current_agent: (&c.current_agent).into(),
            previous_agent: c.previous_agent.as_ref().map(Into::into),
            switch_count: c.switch_count,
            switch_history: c.switch_history.iter().map(Into::into).collect(),
        }
    }
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
    /// `tool` or `plan`.
    pub request_type: String,
    /// RFC 3339 UTC.
    pub created_at: String,
}

impl From<&Approval> for PendingApprovalView {
    fn from(a: &Approval) -> Self {
        use agent_runtime_core::approval::RequestType;
        PendingApprovalView {
            call_id: a.call_id.clone(),
            tool_name: a.tool_name.clone(),
            arguments: a.arguments.clone(),
            reason: a.reason.clone(),
            request_type: match a.request_type {
                RequestType::Tool => "tool",
                RequestType::Plan => "plan",
            }
            .to_string(),
            created_at: a.created_at.to_rfc3339(),
        }
    }
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

/// A message sent into a session (the `message` of `POST /agent/message/stream`).
///
/// Parsed by the core's `ClientMessage`; this type documents it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessageDoc {
    /// The user's message; runs a turn.
    UserMessage {
        /// Non-empty text.
        content: String,
        /// Switch to this agent first.
        #[serde(default)]
        agent_type: Option<String>,
    },
    /// An explicit switch; with `content`, runs a turn on the new agent.
    SwitchAgent {
        /// The agent to switch to.
        agent_type: String,
        /// A message for the new agent.
        #[serde(default)]
        content: Option<String>,
        /// Why.
        #[serde(default)]
        reason: Option<String>,
    },
    /// The result of a tool the client executed.
    ToolResult {
        /// The call it answers.
        call_id: String,
        /// The result.
        #[serde(default)]
        result: Option<Value>,
        /// Or the failure.
        #[serde(default)]
        error: Option<String>,
    },
    /// A decision on a pending approval.
    HitlDecision(HitlDecisionRequest),
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
    #[schemars(with = "ClientMessageDoc")]
    pub message: agent_runtime_core::protocol::ClientMessage,
}

/// `POST /sessions/{session_id}/hitl-decision`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct HitlDecisionRequest {
    /// The approval's call id (or plan id).
    pub call_id: String,
    /// `approve`, `edit` or `reject`.
    pub decision: String,
    /// For `edit`: the arguments to run with.
    #[serde(default)]
    pub modified_arguments: Option<Value>,
    /// The human's words to the model.
    #[serde(default)]
    pub feedback: Option<String>,
    /// Idempotency key.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// `POST /sessions/{session_id}/hitl-decision` as the handler parses it: core's decision (an
/// unknown verb or an edit without arguments fails here, as 400) and the idempotency key.
/// [`HitlDecisionRequest`] documents the same body.
#[derive(Debug, Deserialize)]
pub struct HitlDecisionBody {
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
