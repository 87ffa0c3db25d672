//! The conversation's records: sessions, their messages and tool calls, agent switches, usage.
//! Plain data; storage persists them and the orchestrator produces them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::budget::Budget;
use crate::time::Timestamp;

/// What a session is doing right now (API.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// No turn is running; the session takes a new message.
    Idle,
    /// A turn is streaming or executing tools.
    Running,
    /// The turn paused until pending approvals are decided.
    AwaitingApproval,
    /// The turn paused until the client sends the result of a tool it executes.
    AwaitingToolResult,
}

impl SessionStatus {
    /// The wire name (`idle`, `running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Idle => "idle",
            SessionStatus::Running => "running",
            SessionStatus::AwaitingApproval => "awaiting_approval",
            SessionStatus::AwaitingToolResult => "awaiting_tool_result",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "idle" => SessionStatus::Idle,
            "running" => SessionStatus::Running,
            "awaiting_approval" => SessionStatus::AwaitingApproval,
            "awaiting_tool_result" => SessionStatus::AwaitingToolResult,
            _ => return None,
        })
    }
}

/// Prompt and completion tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens sent to the model.
    pub prompt_tokens: u64,
    /// Tokens the model produced.
    pub completion_tokens: u64,
    /// Of `prompt_tokens`, those the model server served from its prompt cache (priced apart).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_prompt_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Usage {
    /// Prompt and completion tokens together.
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;

    fn add(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens + other.cached_prompt_tokens,
        }
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        *self = *self + other;
    }
}

/// A conversation of one user in one project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The session id (client-chosen or `session_<uuid>`).
    pub id: String,
    /// The user the session belongs to, if given.
    pub user_id: Option<String>,
    /// Free JSON object, stored and returned as given (`project_path`, `tool_execution`, ...).
    pub metadata: Value,
    /// When the session was created.
    pub created_at: Timestamp,
    /// When anything last happened in it.
    pub last_activity: Timestamp,
    /// The agent type that answers next.
    pub current_agent: String,
    /// What the session is doing.
    pub status: SessionStatus,
    /// Stored user, assistant and tool messages.
    pub message_count: u64,
    /// The seq of the newest stored message (0 when none).
    pub last_message_seq: u64,
    /// The seq of the newest stored event (0 when none).
    pub last_event_seq: u64,
    /// Tokens used by every turn of the session.
    pub usage: Usage,
    /// State of the paused or running turn, owned by the orchestrator; opaque to storage, which
    /// keeps its JSON text as given.
    pub turn_state: Option<TurnStateJson>,
    /// The session's budgets (settings' defaults overlaid with the client's), unlimited if unset.
    pub budget: Budget,
    /// What every priced model call of the session cost (see `MODEL_PRICES_FILE`).
    pub cost: f64,
}

/// A session's turn state as stored: its JSON text, always valid JSON (checked when built from
/// text). The orchestrator writes it from its turn and reads its turn back from it; storage keeps
/// and returns the text as given, never as a [`Value`]. Two states are equal when their texts are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TurnStateJson(Box<RawValue>);

impl TurnStateJson {
    /// The JSON text `text`, if it is JSON.
    pub fn from_text(text: impl Into<String>) -> serde_json::Result<Self> {
        RawValue::from_string(text.into()).map(TurnStateJson)
    }

    /// `value` written as JSON text.
    pub fn from_value(value: &Value) -> Self {
        // A `Value` always serializes (its map keys are strings).
        Self::to_json(value).unwrap_or_else(|_| TurnStateJson(RawValue::NULL.to_owned()))
    }

    /// `value` serialized as JSON text (no parse of the text back).
    pub fn to_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Self> {
        serde_json::value::to_raw_value(value).map(TurnStateJson)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The text parsed as a [`Value`].
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.as_str()).unwrap_or(Value::Null)
    }
}

impl PartialEq for TurnStateJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// What creating a session needs; the rest starts at its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    /// The session id (already validated or generated by the caller).
    pub id: String,
    /// The owner, if any.
    pub user_id: Option<String>,
    /// Free JSON object.
    pub metadata: Value,
    /// The agent the session starts on.
    pub current_agent: String,
    /// Creation time (also the first `last_activity`).
    pub created_at: Timestamp,
    /// The session's budgets.
    pub budget: Budget,
}

impl NewSession {
    /// The session as it is created: what was given, everything else at its start value (idle,
    /// no messages or events, no usage, cost or turn state, `last_activity` = `created_at`).
    pub fn into_session(self) -> Session {
        Session {
            id: self.id,
            user_id: self.user_id,
            metadata: self.metadata,
            created_at: self.created_at,
            last_activity: self.created_at,
            current_agent: self.current_agent,
            status: SessionStatus::Idle,
            message_count: 0,
            last_message_seq: 0,
            last_event_seq: 0,
            usage: Usage::default(),
            turn_state: None,
            budget: self.budget,
            cost: 0.0,
        }
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The human.
    User,
    /// The model.
    Assistant,
    /// A tool's result, answering one tool call.
    Tool,
    /// Instructions (system prompts are not stored per turn, but embedders may store notes).
    System,
}

impl Role {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::System => "system",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            "system" => Role::System,
            _ => return None,
        })
    }
}

/// A tool call the model made, as it stands in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ToolCall {
    /// The call id, unique within the session.
    pub id: String,
    /// The tool's name as the model wrote it.
    pub name: String,
    /// The arguments: a JSON object when they parsed, else the model's raw text as a JSON string
    /// (never passed to a tool; the call gets an `INVALID_TOOL` result).
    pub arguments: Value,
}

/// A message of the conversation as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Message {
    /// Per-session sequence number, from 1, strictly increasing, gap-free.
    pub seq: u64,
    /// Who wrote it.
    pub role: Role,
    /// The text (for a tool message, the result as the model receives it).
    pub content: String,
    /// The agent that produced it (assistant and tool messages) or was current (user messages).
    pub agent: Option<String>,
    /// The tool calls of an assistant message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// When it was stored.
    pub created_at: Timestamp,
}

impl Message {
    /// The message's JSON, the bytes its `Serialize` writes, appended to `buf`: written directly
    /// (a history answer writes every message; serde's map of seven members, the timestamp made
    /// into a `String` first, cost some 3,000 instructions a message). Tool calls, whose
    /// arguments are any JSON, still go through `serde_json`.
    pub fn write_json(&self, buf: &mut Vec<u8>) {
        use crate::protocol::{write_decimal, write_json_str};
        buf.extend_from_slice(br#"{"seq":"#);
        write_decimal(buf, self.seq);
        buf.extend_from_slice(br#","role":""#);
        buf.extend_from_slice(self.role.as_str().as_bytes());
        buf.extend_from_slice(br#"","content":"#);
        write_json_str(buf, &self.content);
        buf.extend_from_slice(br#","agent":"#);
        match &self.agent {
            Some(agent) => write_json_str(buf, agent),
            None => buf.extend_from_slice(b"null"),
        }
        if !self.tool_calls.is_empty() {
            buf.extend_from_slice(br#","tool_calls":"#);
            // Strings and JSON values always serialize, and writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *buf, &self.tool_calls);
        }
        if let Some(id) = &self.tool_call_id {
            buf.extend_from_slice(br#","tool_call_id":"#);
            write_json_str(buf, id);
        }
        buf.extend_from_slice(br#","created_at":"#);
        self.created_at.write_json(buf);
        buf.push(b'}');
    }
}

/// A message before storage gives it its seq.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
    /// The agent that produced it.
    pub agent: Option<String>,
    /// Tool calls of an assistant message.
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool message answers.
    pub tool_call_id: Option<String>,
}

impl NewMessage {
    /// A user message.
    pub fn user(content: impl Into<String>, agent: Option<String>) -> Self {
        NewMessage {
            role: Role::User,
            content: content.into(),
            agent,
            tool_calls: vec![],
            tool_call_id: None,
        }
    }

    /// An assistant message, with its tool calls if any.
    pub fn assistant(content: impl Into<String>, agent: Option<String>, tool_calls: Vec<ToolCall>) -> Self {
        NewMessage {
            role: Role::Assistant,
            content: content.into(),
            agent,
            tool_calls,
            tool_call_id: None,
        }
    }

    /// A tool result answering `call_id`.
    pub fn tool(call_id: impl Into<String>, content: impl Into<String>, agent: Option<String>) -> Self {
        NewMessage {
            role: Role::Tool,
            content: content.into(),
            agent,
            tool_calls: vec![],
            tool_call_id: Some(call_id.into()),
        }
    }
}

/// One change of a session's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AgentSwitch {
    /// The agent before.
    pub from_agent: String,
    /// The agent after.
    pub to_agent: String,
    /// Why (user request, routing decision, hand-over).
    pub reason: String,
    /// When.
    pub timestamp: Timestamp,
}

impl AgentSwitch {
    /// The switch's JSON, the bytes its `Serialize` writes, appended to `buf` (written directly,
    /// as [`Message::write_json`]).
    pub fn write_json(&self, buf: &mut Vec<u8>) {
        use crate::protocol::write_json_str;
        buf.extend_from_slice(br#"{"from_agent":"#);
        write_json_str(buf, &self.from_agent);
        buf.extend_from_slice(br#","to_agent":"#);
        write_json_str(buf, &self.to_agent);
        buf.extend_from_slice(br#","reason":"#);
        write_json_str(buf, &self.reason);
        buf.extend_from_slice(br#","timestamp":"#);
        self.timestamp.write_json(buf);
        buf.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Texts of every escape class: plain, empty, non-ASCII, quotes, backslashes, controls.
    const TEXTS: [&str; 6] = [
        "plain words",
        "",
        "Проект 🚀 \u{2028}\u{2029}",
        "quote \" backslash \\ slash /",
        "controls \u{0}\u{1}\u{8}\t\n\u{c}\r\u{1f} del \u{7f}",
        "# readme\n\nline two",
    ];

    #[test]
    fn a_message_written_directly_is_byte_identical_to_its_serialized_json() {
        let mut messages = Vec::new();
        for (i, text) in TEXTS.iter().enumerate() {
            let when = Timestamp::from_millis(1_764_500_000_000 + i as i64 * 333);
            let calls = vec![ToolCall {
                id: format!("call_{text}"),
                name: "read_file".into(),
                arguments: json!({"path": text, "n": u64::MAX, "f": -1.5e-7}),
            }];
            for role in [Role::User, Role::Assistant, Role::Tool, Role::System] {
                for (agent, tool_calls, tool_call_id) in [
                    (None, vec![], None),
                    (Some(text.to_string()), calls.clone(), None),
                    (Some("coder".to_string()), vec![], Some(text.to_string())),
                    (None, calls.clone(), Some("call_1".to_string())),
                ] {
                    messages.push(Message {
                        seq: u64::MAX - i as u64,
                        role,
                        content: text.to_string(),
                        agent,
                        tool_calls,
                        tool_call_id,
                        created_at: when,
                    });
                }
            }
        }
        let direct: Vec<String> = messages
            .iter()
            .map(|m| {
                let mut buf = Vec::new();
                m.write_json(&mut buf);
                String::from_utf8(buf).unwrap()
            })
            .collect();
        let serialized: Vec<String> = messages
            .iter()
            .map(|m| serde_json::to_string(m).unwrap())
            .collect();
        assert_eq!(direct, serialized);
    }

    #[test]
    fn an_agent_switch_written_directly_is_byte_identical_to_its_serialized_json() {
        let switches: Vec<AgentSwitch> = (0..)
            .zip(TEXTS)
            .map(|(i, text)| AgentSwitch {
                from_agent: text.into(),
                to_agent: "coder".into(),
                reason: format!("{text}{text}"),
                timestamp: Timestamp::from_millis(1_764_500_000_000 + i * 1000),
            })
            .collect();
        let direct: Vec<String> = switches
            .iter()
            .map(|s| {
                let mut buf = Vec::new();
                s.write_json(&mut buf);
                String::from_utf8(buf).unwrap()
            })
            .collect();
        let serialized: Vec<String> = switches
            .iter()
            .map(|s| serde_json::to_string(s).unwrap())
            .collect();
        assert_eq!(direct, serialized);
    }
}
