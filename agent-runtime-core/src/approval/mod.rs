//! Human-in-the-loop approvals: the persisted approval record and its decisions (API.md §5.3).

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod policy;

pub use policy::{ApprovalPolicy, ApprovalRequirement, DangerousToolsPolicy, FnPolicy, ToolRequest};

use crate::time::Timestamp;

/// What is being approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RequestType {
    /// One tool call.
    Tool,
    /// A plan of subtasks (its `call_id` is the plan id).
    Plan,
    /// Raising a budget the turn reached (its `arguments`: `budget`, `spent`, `limit`, and the
    /// proposed new `limit` as `proposed_limit`).
    Budget,
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    /// Waiting for a human.
    Pending,
    /// Approved as proposed.
    Approved,
    /// Approved with modified arguments.
    Edited,
    /// Rejected; the tool did not run.
    Rejected,
    /// Cancelled (turn cancelled, or a new user message arrived).
    Cancelled,
}

impl ApprovalStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Edited => "edited",
            ApprovalStatus::Rejected => "rejected",
            ApprovalStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => ApprovalStatus::Pending,
            "approved" => ApprovalStatus::Approved,
            "edited" => ApprovalStatus::Edited,
            "rejected" => ApprovalStatus::Rejected,
            "cancelled" => ApprovalStatus::Cancelled,
            _ => return None,
        })
    }
}

/// A persisted request for a human decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// The tool call id (or plan id), unique within the session.
    pub call_id: String,
    /// The session it belongs to.
    pub session_id: String,
    /// The tool to run (`propose_plan` for plans).
    pub tool_name: String,
    /// The arguments as proposed (for a plan: the plan).
    pub arguments: Value,
    /// Why it needs approval.
    pub reason: String,
    /// Tool or plan.
    pub request_type: RequestType,
    /// Where it stands.
    pub status: ApprovalStatus,
    /// When it was requested.
    pub created_at: Timestamp,
    /// When it was decided.
    pub decided_at: Option<Timestamp>,
    /// The human's feedback with the decision.
    pub feedback: Option<String>,
    /// The arguments an `edit` decision replaced the proposal with.
    pub modified_arguments: Option<Value>,
}

/// A decision to record on a pending approval (compare-and-set: pending → `status`, once).
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalResolution {
    /// The approval's call id.
    pub call_id: String,
    /// The new status (anything but `Pending`).
    pub status: ApprovalStatus,
    /// The human's feedback.
    pub feedback: Option<String>,
    /// For `Edited`: the arguments to run with.
    pub modified_arguments: Option<Value>,
    /// When decided.
    pub decided_at: Timestamp,
}

impl ApprovalResolution {
    /// The resolution a human decision records: its feedback, and for an `edit` the arguments.
    pub fn of_decision(d: &crate::protocol::HitlDecision, status: ApprovalStatus) -> Self {
        ApprovalResolution {
            call_id: d.call_id.clone(),
            status,
            feedback: match &d.decision {
                crate::protocol::Decision::Reject { feedback } => feedback.clone(),
                _ => None,
            },
            modified_arguments: match &d.decision {
                crate::protocol::Decision::Edit { arguments } => Some(arguments.clone()),
                _ => None,
            },
            decided_at: Timestamp::now(),
        }
    }
}
