//! Wire types shared by the server and the Python module: the events a turn streams (API.md §4)
//! and the plans they carry. Every event carries its per-session `seq`.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::session::Usage;

/// Why a stream ended (the `done` event's `stop_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model answered without tool calls.
    Completed,
    /// The turn paused until approvals are decided.
    AwaitingApproval,
    /// The turn paused until the client sends tool results.
    AwaitingToolResult,
    /// The turn was cancelled.
    Cancelled,
    /// The turn failed (an `error` event precedes `done`).
    Error,
    /// `MAX_TURN_ITERATIONS` model calls were made.
    MaxIterations,
    /// A budget was reached: the turn paused on a `budget` approval (session `awaiting_approval`),
    /// or ended because raising it was rejected (session `idle`).
    BudgetExceeded,
}

/// A tool as offered to the model: its name, what it does, and the JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The tool's name (`read_file`, ...).
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// A tool failure as streamed in a `tool_result` event and told to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolError {
    /// `INVALID_TOOL` (refused before running) or `TOOL_EXECUTION_FAILED` (failed while running).
    pub code: String,
    /// What went wrong, as the model reads it.
    pub message: String,
}

/// A subtask of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subtask {
    /// Its id within the plan.
    pub id: String,
    /// What to do.
    pub description: String,
    /// The agent type that does it.
    pub agent: String,
    /// `pending`, `in_progress`, `completed`, `failed` or `skipped`.
    #[serde(default = "Subtask::default_status")]
    pub status: String,
}

impl Subtask {
    fn default_status() -> String {
        "pending".to_string()
    }
}

/// A plan proposed by the orchestrator (API.md §5.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The plan id (also the `call_id` of its approval).
    pub plan_id: String,
    /// What the plan achieves.
    pub goal: String,
    /// The steps, in order.
    pub subtasks: Vec<Subtask>,
}

/// The two shapes of an `assistant_message` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AssistantMessage {
    /// One streamed piece of text (`is_final: false`).
    Token {
        /// The piece.
        token: String,
    },
    /// The complete text of the message (`is_final: true`).
    Complete {
        /// The whole text.
        content: String,
    },
}

/// What happened, without its seq: the body of an [`Event`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventPayload {
    /// The session's agent changed.
    AgentSwitched {
        /// The agent before.
        from_agent: String,
        /// The agent after.
        to_agent: String,
        /// Why.
        reason: String,
    },
    /// A token or the complete text of an assistant message.
    AssistantMessage(AssistantMessage),
    /// The model asked for a tool.
    ToolCall {
        /// Unique within the session.
        call_id: String,
        /// The tool.
        tool_name: String,
        /// Its arguments.
        arguments: Value,
        /// The turn pauses until a human decides.
        requires_approval: bool,
        /// Why approval is needed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A tool executed by the runtime returned, or was refused, rejected or cancelled.
    ToolResult {
        /// The call answered.
        call_id: String,
        /// The tool.
        tool_name: String,
        /// The result on success.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// The failure otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ToolError>,
    },
    /// A pending approval was decided: `approve`, `edit`, `reject` or `cancel`.
    ApprovalResolved {
        /// The approval.
        call_id: String,
        /// The verb received.
        decision: String,
    },
    /// The orchestrator proposes a plan (a pending plan approval follows).
    PlanProposed(Plan),
    /// A plan's subtask started or ended.
    PlanUpdated(Plan),
    /// A budget was reached before the next step: a pending `budget` approval (this `call_id`)
    /// raises it; `done` with `stop_reason: "budget_exceeded"` follows.
    BudgetExceeded {
        /// The budget approval.
        call_id: String,
        /// Which budget (`turn_tool_calls`, `session_cost`, ...).
        budget: crate::budget::BudgetKind,
        /// What was spent.
        spent: Value,
        /// The limit reached.
        limit: Value,
        /// The limit `approve` sets.
        proposed_limit: Value,
        /// For humans.
        reason: String,
    },
    /// The turn failed; `done` follows. On the wire it also carries `content`, the same text as
    /// `message`, for clients of the earlier runtime.
    Error {
        /// A code of API.md §1.1.
        code: String,
        /// What went wrong.
        message: String,
    },
    /// Another process took the running turn over (its process stopped, or handed it over while
    /// shutting down) and continues it: `assistant_message` tokens with a seq greater than
    /// `after_seq` that precede this event are void (the model is asked again); the final
    /// `assistant_message` with `content` stays the truth.
    TurnResumed {
        /// Tokens streamed after this seq, and before this event, are void.
        after_seq: u64,
        /// `owner_stopped` (the process running it died) or `handed_over` (it was draining).
        reason: String,
    },
    /// The last event of every stream.
    Done {
        /// Why the stream ended.
        stop_reason: StopReason,
        /// Tokens of every model call of the turn; with prices or budgets also its cost, and
        /// what was spent and remains of each budget.
        usage: TurnUsage,
    },
}

/// A turn's usage as `done` reports it: its tokens (flattened), and the turn's `cost` when the
/// model has a price, `spent` and `remaining` when the session has budgets (fields absent otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TurnUsage {
    /// Prompt and completion tokens of the turn.
    #[serde(flatten)]
    pub tokens: Usage,
    /// What the turn's model calls cost (`MODEL_PRICES_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// Spent and remaining of each budget, when the session has any.
    #[serde(default, skip_serializing_if = "Option::is_none", flatten)]
    pub budget: Option<crate::budget::BudgetReport>,
}

impl From<Usage> for TurnUsage {
    fn from(tokens: Usage) -> Self {
        TurnUsage {
            tokens,
            ..TurnUsage::default()
        }
    }
}

impl EventPayload {
    /// `true` on the complete assistant message, on `error` and on `done` (API.md §9.7).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            EventPayload::AssistantMessage(AssistantMessage::Complete { .. })
                | EventPayload::Error { .. }
                | EventPayload::Done { .. }
        )
    }

    /// The wire `type` name.
    pub fn kind(&self) -> &'static str {
        match self {
            EventPayload::AgentSwitched { .. } => "agent_switched",
            EventPayload::AssistantMessage(_) => "assistant_message",
            EventPayload::ToolCall { .. } => "tool_call",
            EventPayload::ToolResult { .. } => "tool_result",
            EventPayload::ApprovalResolved { .. } => "approval_resolved",
            EventPayload::PlanProposed(_) => "plan_proposed",
            EventPayload::PlanUpdated(_) => "plan_updated",
            EventPayload::BudgetExceeded { .. } => "budget_exceeded",
            EventPayload::Error { .. } => "error",
            EventPayload::TurnResumed { .. } => "turn_resumed",
            EventPayload::Done { .. } => "done",
        }
    }
}

impl EventPayload {
    /// The payload's JSON text, exactly what its [`Serialize`] writes: the hot payloads (a token,
    /// a complete message, a tool call, `done` without cost or budgets) written directly, the
    /// others by `serde_json` (an internally tagged enum goes through serde's map serializer,
    /// which cost more than the text it wrote).
    pub fn to_json(&self) -> serde_json::Result<String> {
        let mut buf = Vec::with_capacity(64);
        self.write_json(&mut buf)?;
        // Only valid UTF-8 was written: JSON punctuation, numbers and whole `str`s.
        String::from_utf8(buf).map_err(|e| serde::ser::Error::custom(e.to_string()))
    }

    /// [`EventPayload::to_json`] appended to `buf`.
    pub fn write_json(&self, buf: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            EventPayload::AssistantMessage(AssistantMessage::Token { token }) => {
                buf.extend_from_slice(br#"{"type":"assistant_message","token":"#);
                write_json_str(buf, token);
            }
            EventPayload::AssistantMessage(AssistantMessage::Complete { content }) => {
                buf.extend_from_slice(br#"{"type":"assistant_message","content":"#);
                write_json_str(buf, content);
            }
            EventPayload::ToolCall {
                call_id,
                tool_name,
                arguments,
                requires_approval,
                reason,
            } => {
                buf.extend_from_slice(br#"{"type":"tool_call","call_id":"#);
                write_json_str(buf, call_id);
                buf.extend_from_slice(br#","tool_name":"#);
                write_json_str(buf, tool_name);
                buf.extend_from_slice(br#","arguments":"#);
                serde_json::to_writer(&mut *buf, arguments)?;
                buf.extend_from_slice(if *requires_approval {
                    br#","requires_approval":true"#
                } else {
                    br#","requires_approval":false"#
                });
                if let Some(reason) = reason {
                    buf.extend_from_slice(br#","reason":"#);
                    write_json_str(buf, reason);
                }
            }
            EventPayload::Done { stop_reason, usage } => {
                buf.extend_from_slice(br#"{"type":"done","stop_reason":"#);
                serde_json::to_writer(&mut *buf, stop_reason)?;
                buf.extend_from_slice(br#","usage":"#);
                match usage {
                    TurnUsage {
                        tokens,
                        cost: None,
                        budget: None,
                    } => {
                        buf.extend_from_slice(br#"{"prompt_tokens":"#);
                        write_decimal(buf, tokens.prompt_tokens);
                        buf.extend_from_slice(br#","completion_tokens":"#);
                        write_decimal(buf, tokens.completion_tokens);
                        if tokens.cached_prompt_tokens != 0 {
                            buf.extend_from_slice(br#","cached_prompt_tokens":"#);
                            write_decimal(buf, tokens.cached_prompt_tokens);
                        }
                        buf.push(b'}');
                    }
                    usage => serde_json::to_writer(&mut *buf, usage)?,
                }
            }
            other => return serde_json::to_writer(buf, other),
        }
        buf.push(b'}');
        Ok(())
    }
}

/// `n` in decimal appended to `buf`: the bytes `write!(buf, "{n}")` writes, without the
/// formatting machinery (`core::fmt::write` cost about 300 instructions a number on the paths
/// that frame every event).
pub fn write_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        // A digit: `n % 10` is below 10.
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[start..]);
}

/// `s` as a JSON string: copied as it is when nothing in it needs escaping (no control
/// character, quote or backslash: most text), else escaped by `serde_json`, the same bytes.
pub fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.reserve(s.len() + 2);
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        // A string always serializes, and writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, s);
    }
}

/// A streamed event: its per-session sequence number and what happened.
///
/// Serializes flat, as the SSE `data` line: `{"type": ..., <fields>, "seq": 42, "is_final": false}`.
///
/// An event a commit stored keeps its payload's JSON text, the row it was stored as
/// ([`Event::encoded`]): its SSE frame is made from that text, so the payload is serialized once.
/// Its `payload` is not changed afterwards (nothing does; a changed one would still be framed from
/// the text). Equality compares `seq` and `payload` only.
#[derive(Debug, Clone)]
pub struct Event {
    /// Per-session, strictly increasing, gap-free; also the SSE `id`.
    pub seq: u64,
    /// What happened.
    pub payload: EventPayload,
    /// The payload's JSON text as stored, when this event was stored by this process.
    payload_json: Option<Arc<str>>,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq && self.payload == other.payload
    }
}

#[derive(Serialize)]
struct EventWire<'a> {
    #[serde(flatten)]
    payload: &'a EventPayload,
    seq: u64,
    is_final: bool,
    /// `error` events also carry their message as `content` (API.md §9.22).
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Deserialize)]
struct EventWireOwned {
    #[serde(flatten)]
    payload: EventPayload,
    seq: u64,
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        EventWire {
            payload: &self.payload,
            seq: self.seq,
            is_final: self.payload.is_final(),
            content: match &self.payload {
                EventPayload::Error { message, .. } => Some(message),
                _ => None,
            },
        }
        .serialize(s)
    }
}

impl Event {
    /// An event with no JSON text kept.
    pub fn new(seq: u64, payload: EventPayload) -> Event {
        Event {
            seq,
            payload,
            payload_json: None,
        }
    }

    /// An event about to be stored: its payload serialized now and kept, the text the store
    /// writes as its row and its SSE frame is made from.
    pub fn encoded(seq: u64, payload: EventPayload) -> serde_json::Result<Event> {
        let json = payload.to_json()?;
        Ok(Event::stored(seq, payload, Arc::from(json)))
    }

    /// An event with `json`, which is `payload` as [`serde_json`] writes it.
    pub(crate) fn stored(seq: u64, payload: EventPayload, json: Arc<str>) -> Event {
        Event {
            seq,
            payload,
            payload_json: Some(json),
        }
    }

    /// The payload's JSON text: the one kept, else serialized now.
    pub fn payload_json(&self) -> serde_json::Result<Cow<'_, str>> {
        match &self.payload_json {
            Some(json) => Ok(Cow::Borrowed(json)),
            None => self.payload.to_json().map(Cow::Owned),
        }
    }

    /// The wire JSON (what [`Serialize`] writes) appended to `buf`: from the payload's kept JSON
    /// text when there is one, else with the payload serialized directly (no `flatten`, whose
    /// map serializer costs more than the payload itself).
    pub fn write_wire_json(&self, buf: &mut Vec<u8>) -> serde_json::Result<()> {
        match &self.payload_json {
            Some(json) => buf.extend_from_slice(json.as_bytes()),
            None => self.payload.write_json(buf)?,
        }
        self.close_wire_json(buf);
        Ok(())
    }

    /// Turns the payload object that ends `buf` into the wire object: drops its closing brace and
    /// appends `seq`, `is_final` and, for `error`, `content` (the fields and order of `EventWire`).
    /// The payload always has `type`, so a comma always precedes the appended fields.
    fn close_wire_json(&self, buf: &mut Vec<u8>) {
        debug_assert_eq!(buf.last(), Some(&b'}'));
        buf.pop();
        buf.extend_from_slice(b",\"seq\":");
        write_decimal(buf, self.seq);
        let is_final: &[u8] = if self.payload.is_final() {
            b",\"is_final\":true"
        } else {
            b",\"is_final\":false"
        };
        buf.extend_from_slice(is_final);
        if let EventPayload::Error { message, .. } = &self.payload {
            buf.extend_from_slice(b",\"content\":");
            // A string always serializes.
            let _ = serde_json::to_writer(&mut *buf, message);
        }
        buf.push(b'}');
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = EventWireOwned::deserialize(d)?;
        Ok(Event::new(w.seq, w.payload))
    }
}

/// A message a client sends into a session (the `message` of `POST /agent/message/stream`).
/// Unknown fields are ignored (clients of the earlier runtime send extra ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// The user's message; runs a turn (after switching to `agent_type` if given).
    UserMessage {
        /// The text, non-empty.
        content: String,
        /// Switch to this agent first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_type: Option<String>,
    },
    /// An explicit switch; with `content`, runs a turn on the new agent.
    SwitchAgent {
        /// The agent to switch to.
        agent_type: String,
        /// A message for the new agent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        /// Why (default "User requested agent switch").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The result of a tool the client executed.
    ToolResult {
        /// The call it answers.
        call_id: String,
        /// The result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// Or the failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A human decision on a pending approval.
    HitlDecision(HitlDecision),
}

/// What a human decided on a pending approval (API.md §5.3). On the wire it is the verb
/// `approve`, `edit` or `reject` with `modified_arguments` (edit) and `feedback` (reject) beside it.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run the call (or plan) as proposed.
    Approve,
    /// Run it with these arguments (a JSON object), checked again against the agent's rules.
    Edit {
        /// The arguments to run with.
        arguments: Value,
    },
    /// Do not run it; the model is told, with the human's words if any.
    Reject {
        /// The human's words to the model.
        feedback: Option<String>,
    },
}

impl Decision {
    /// The wire verb, as `approval_resolved.decision` repeats it.
    pub fn verb(&self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Edit { .. } => "edit",
            Decision::Reject { .. } => "reject",
        }
    }

    /// The decision a verb and its companions describe; the error names what is wrong.
    pub fn parse(
        verb: &str,
        modified_arguments: Option<Value>,
        feedback: Option<String>,
    ) -> Result<Decision, String> {
        match verb {
            "approve" => Ok(Decision::Approve),
            "edit" => match modified_arguments {
                Some(arguments @ Value::Object(_)) => Ok(Decision::Edit { arguments }),
                _ => Err("an edit needs modified_arguments as a JSON object".into()),
            },
            "reject" => Ok(Decision::Reject { feedback }),
            other => Err(format!("decision must be approve, edit or reject, not '{other}'")),
        }
    }
}

/// A decision on a pending approval (API.md §5.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(try_from = "HitlDecisionWire", into = "HitlDecisionWire")]
pub struct HitlDecision {
    /// The approval's call id (or plan id).
    pub call_id: String,
    /// What was decided.
    pub decision: Decision,
}

/// [`HitlDecision`] as the wire writes it (its schema is the one `HitlDecision` shows).
#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct HitlDecisionWire {
    /// The approval's call id (or plan id).
    call_id: String,
    /// `approve`, `edit` or `reject`.
    decision: String,
    /// For `edit`: the arguments to run with (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modified_arguments: Option<Value>,
    /// The human's words to the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    feedback: Option<String>,
}

impl TryFrom<HitlDecisionWire> for HitlDecision {
    type Error = String;
    fn try_from(w: HitlDecisionWire) -> Result<Self, String> {
        Ok(HitlDecision {
            call_id: w.call_id,
            decision: Decision::parse(&w.decision, w.modified_arguments, w.feedback)?,
        })
    }
}

impl From<HitlDecision> for HitlDecisionWire {
    fn from(d: HitlDecision) -> Self {
        let verb = d.decision.verb().to_string();
        let (modified_arguments, feedback) = match d.decision {
            Decision::Approve => (None, None),
            Decision::Edit { arguments } => (Some(arguments), None),
            Decision::Reject { feedback } => (None, feedback),
        };
        HitlDecisionWire {
            call_id: d.call_id,
            decision: verb,
            modified_arguments,
            feedback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(e: &Event) -> Event {
        serde_json::from_value(serde_json::to_value(e).unwrap()).unwrap()
    }

    #[test]
    fn a_number_written_in_decimal_reads_as_formatting_writes_it() {
        let mut numbers = vec![0, 1, 9, u64::MAX, u64::MAX - 1, u64::from(u32::MAX)];
        for power in 1..=19 {
            let p = 10u64.pow(power);
            numbers.extend([p - 1, p, p + 1]);
        }
        let direct: Vec<String> = numbers
            .iter()
            .map(|&n| {
                let mut buf = b"x".to_vec();
                write_decimal(&mut buf, n);
                String::from_utf8(buf).unwrap()
            })
            .collect();
        let formatted: Vec<String> = numbers.iter().map(|n| format!("x{n}")).collect();
        assert_eq!(direct, formatted);
    }

    #[test]
    fn a_payload_written_directly_is_byte_identical_to_its_serialized_json() {
        let texts = [
            "",
            "plain words",
            "Проект 🚀",
            "quote \" backslash \\ slash /",
            "controls \u{0}\u{1}\u{8}\t\n\u{c}\r\u{1f} del \u{7f}",
            "\u{2028}\u{2029}",
        ];
        let mut payloads = crate::test_kit::every_event_payload();
        for t in texts {
            payloads.extend([
                EventPayload::AssistantMessage(AssistantMessage::Token { token: t.into() }),
                EventPayload::AssistantMessage(AssistantMessage::Complete { content: t.into() }),
                EventPayload::ToolCall {
                    call_id: t.into(),
                    tool_name: t.into(),
                    arguments: json!({ "text": t, "n": u64::MAX, "f": -1.5e-7 }),
                    requires_approval: true,
                    reason: Some(t.into()),
                },
            ]);
        }
        for (stop_reason, cached) in [(StopReason::MaxIterations, 0), (StopReason::Error, 7)] {
            payloads.push(EventPayload::Done {
                stop_reason,
                usage: TurnUsage::from(Usage {
                    prompt_tokens: u64::MAX,
                    completion_tokens: 0,
                    cached_prompt_tokens: cached,
                }),
            });
        }
        payloads.push(EventPayload::Done {
            stop_reason: StopReason::Completed,
            usage: TurnUsage {
                cost: Some(0.5),
                ..TurnUsage::default()
            },
        });
        let direct: Vec<String> = payloads.iter().map(|p| p.to_json().unwrap()).collect();
        let serialized: Vec<String> = payloads
            .iter()
            .map(|p| serde_json::to_string(p).unwrap())
            .collect();
        assert_eq!(direct, serialized);
    }

    #[test]
    fn the_wire_json_written_from_the_payload_is_byte_identical_to_the_serialized_event() {
        let mut kinds = std::collections::BTreeSet::new();
        for (seq, payload) in (1..).zip(crate::test_kit::every_event_payload()) {
            kinds.insert(payload.kind());
            let e = Event::new(seq, payload.clone());
            let serialized = serde_json::to_vec(&e).unwrap();
            let mut direct = b"prefix".to_vec();
            e.write_wire_json(&mut direct).unwrap();
            let stored = Event::encoded(seq, payload).unwrap();
            let mut from_row = b"prefix".to_vec();
            stored.write_wire_json(&mut from_row).unwrap();
            let expected = [&b"prefix"[..], &serialized].concat();
            assert_eq!(
                (
                    String::from_utf8(direct).unwrap(),
                    String::from_utf8(from_row).unwrap()
                ),
                (
                    String::from_utf8(expected.clone()).unwrap(),
                    String::from_utf8(expected).unwrap()
                ),
                "{}",
                e.payload.kind()
            );
        }
        // Every type of the wire is covered.
        assert_eq!(kinds.len(), 11);
    }

    #[test]
    fn a_resumed_turn_says_after_which_seq_tokens_are_void() {
        let e = Event::new(
            9,
            EventPayload::TurnResumed {
                after_seq: 4,
                reason: "handed_over".into(),
            },
        );
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type": "turn_resumed", "after_seq": 4, "reason": "handed_over", "seq": 9, "is_final": false})
        );
    }

    #[test]
    fn token_event_serializes_as_the_documented_line() {
        let e = Event::new(
            42,
            EventPayload::AssistantMessage(AssistantMessage::Token {
                token: "Проектирую".into(),
            }),
        );
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type": "assistant_message", "token": "Проектирую", "is_final": false, "seq": 42})
        );
        assert_eq!(round_trip(&e), e);
    }

    #[test]
    fn final_assistant_message_error_and_done_are_final() {
        let complete = EventPayload::AssistantMessage(AssistantMessage::Complete { content: "hi".into() });
        let done = EventPayload::Done {
            stop_reason: StopReason::AwaitingApproval,
            usage: Usage::default().into(),
        };
        assert_eq!(
            serde_json::to_value(Event::new(3, done.clone())).unwrap(),
            json!({"type": "done", "stop_reason": "awaiting_approval",
                   "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "seq": 3, "is_final": true})
        );
        for p in [
            complete,
            done,
            EventPayload::Error {
                code: "LLM_ERROR".into(),
                message: "x".into(),
            },
        ] {
            assert!(p.is_final(), "{p:?}");
            let e = Event::new(1, p);
            assert_eq!(round_trip(&e), e);
        }
    }

    #[test]
    fn an_error_event_carries_its_message_also_as_content() {
        let e = Event::new(
            5,
            EventPayload::Error {
                code: "LLM_ERROR".into(),
                message: "the model server did not answer".into(),
            },
        );
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type": "error", "code": "LLM_ERROR", "message": "the model server did not answer",
                   "content": "the model server did not answer", "seq": 5, "is_final": true})
        );
        assert_eq!(round_trip(&e), e);
    }

    #[test]
    fn client_messages_parse_and_ignore_unknown_fields() {
        let m: ClientMessage =
            serde_json::from_value(json!({"type": "user_message", "content": "hi", "role": "user"})).unwrap();
        assert_eq!(
            m,
            ClientMessage::UserMessage {
                content: "hi".into(),
                agent_type: None
            }
        );
        let m: ClientMessage = serde_json::from_value(
            json!({"type": "hitl_decision", "call_id": "c1", "decision": "reject", "feedback": "no"}),
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::HitlDecision(HitlDecision {
                call_id: "c1".into(),
                decision: Decision::Reject {
                    feedback: Some("no".into())
                },
            })
        );
        assert!(serde_json::from_value::<ClientMessage>(json!({"type": "dance"})).is_err());
        assert!(
            serde_json::from_value::<ClientMessage>(json!({"type": "user_message", "content": 5})).is_err()
        );
    }

    #[test]
    fn decisions_keep_their_wire_verbs_and_an_unknown_verb_does_not_parse() {
        let cases = [
            (json!({"call_id": "c1", "decision": "approve"}), Decision::Approve),
            (
                json!({"call_id": "c1", "decision": "edit", "modified_arguments": {"path": "a.md"}}),
                Decision::Edit {
                    arguments: json!({"path": "a.md"}),
                },
            ),
            (
                json!({"call_id": "c1", "decision": "reject", "feedback": "not now"}),
                Decision::Reject {
                    feedback: Some("not now".into()),
                },
            ),
        ];
        for (wire, decision) in cases {
            let parsed: HitlDecision = serde_json::from_value(wire.clone()).unwrap();
            assert_eq!(
                parsed,
                HitlDecision {
                    call_id: "c1".into(),
                    decision
                }
            );
            assert_eq!(serde_json::to_value(&parsed).unwrap(), wire);
        }
        let refused = [
            (
                json!({"call_id": "c1", "decision": "maybe"}),
                "decision must be approve, edit or reject, not 'maybe'",
            ),
            (
                json!({"call_id": "c1", "decision": "edit"}),
                "an edit needs modified_arguments as a JSON object",
            ),
            (
                json!({"call_id": "c1", "decision": "edit", "modified_arguments": [1]}),
                "an edit needs modified_arguments as a JSON object",
            ),
        ];
        for (wire, why) in refused {
            let err = serde_json::from_value::<HitlDecision>(wire).unwrap_err();
            assert_eq!(err.to_string(), why);
        }
    }

    #[test]
    fn every_payload_round_trips() {
        let plan = Plan {
            plan_id: "plan_1".into(),
            goal: "g".into(),
            subtasks: vec![Subtask {
                id: "1".into(),
                description: "d".into(),
                agent: "coder".into(),
                status: "pending".into(),
            }],
        };
        let payloads = vec![
            EventPayload::AgentSwitched {
                from_agent: "orchestrator".into(),
                to_agent: "coder".into(),
                reason: "r".into(),
            },
            EventPayload::ToolCall {
                call_id: "c1".into(),
                tool_name: "write_file".into(),
                arguments: json!({"path": "a.md", "content": "x"}),
                requires_approval: true,
                reason: Some("File modification requires approval".into()),
            },
            EventPayload::ToolResult {
                call_id: "c1".into(),
                tool_name: "read_file".into(),
                result: Some(json!("text")),
                error: None,
            },
            EventPayload::ToolResult {
                call_id: "c2".into(),
                tool_name: "write_file".into(),
                result: None,
                error: Some(ToolError {
                    code: "INVALID_TOOL".into(),
                    message: "no".into(),
                }),
            },
            EventPayload::ApprovalResolved {
                call_id: "c1".into(),
                decision: "approve".into(),
            },
            EventPayload::PlanProposed(plan.clone()),
            EventPayload::PlanUpdated(plan),
            EventPayload::TurnResumed {
                after_seq: 4,
                reason: "owner_stopped".into(),
            },
        ];
        for p in payloads {
            assert!(!p.is_final());
            let e = Event::new(7, p);
            let v = serde_json::to_value(&e).unwrap();
            assert_eq!(v["type"], e.payload.kind());
            assert_eq!(v["is_final"], false);
            assert_eq!(round_trip(&e), e);
        }
    }
}
