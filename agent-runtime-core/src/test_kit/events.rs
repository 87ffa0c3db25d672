//! Example events for tests: one payload of every wire type and shape, so a test of framing or
//! storage can cover them all.

use serde_json::json;

use crate::protocol::{AssistantMessage, EventPayload, Plan, StopReason, Subtask, ToolError, TurnUsage};
use crate::session::Usage;

/// One payload of every type and shape: optional fields present and absent, text to escape,
/// nested values, `done` with and without cost and budgets.
pub fn every_event_payload() -> Vec<EventPayload> {
    let plan = Plan {
        plan_id: "p1".into(),
        goal: "ship \"it\"".into(),
        subtasks: vec![Subtask {
            id: "s1".into(),
            description: "step\none".into(),
            agent: "coder".into(),
            status: "pending".into(),
        }],
    };
    let budget = crate::budget::Budget {
        turn_tool_calls: Some(3),
        session_cost: Some(0.25),
        ..Default::default()
    };
    vec![
        EventPayload::AgentSwitched {
            from_agent: "a".into(),
            to_agent: "b".into(),
            reason: "why\t\u{1}".into(),
        },
        EventPayload::AssistantMessage(AssistantMessage::Token {
            token: "Проект".into(),
        }),
        EventPayload::AssistantMessage(AssistantMessage::Complete {
            content: "done\n\"q\"".into(),
        }),
        EventPayload::ToolCall {
            call_id: "c1".into(),
            tool_name: "search".into(),
            arguments: json!({"q": "x", "n": [1, 2.5, null], "o": {}}),
            requires_approval: false,
            reason: None,
        },
        EventPayload::ToolCall {
            call_id: "c2".into(),
            tool_name: "rm".into(),
            arguments: json!({}),
            requires_approval: true,
            reason: Some("dangerous".into()),
        },
        EventPayload::ToolResult {
            call_id: "c1".into(),
            tool_name: "search".into(),
            result: Some(json!({"hits": ["a"]})),
            error: None,
        },
        EventPayload::ToolResult {
            call_id: "c2".into(),
            tool_name: "rm".into(),
            result: None,
            error: Some(ToolError {
                code: "TOOL_EXECUTION_FAILED".into(),
                message: "boom".into(),
            }),
        },
        EventPayload::ApprovalResolved {
            call_id: "c2".into(),
            decision: "reject".into(),
        },
        EventPayload::PlanProposed(plan.clone()),
        EventPayload::PlanUpdated(plan),
        EventPayload::BudgetExceeded {
            call_id: "b1".into(),
            budget: crate::budget::BudgetKind::TurnToolCalls,
            spent: json!(3),
            limit: json!(3),
            proposed_limit: json!(6),
            reason: "limit".into(),
        },
        EventPayload::Error {
            code: "INTERNAL".into(),
            message: "it \"broke\"\n".into(),
        },
        EventPayload::TurnResumed {
            after_seq: 4,
            reason: "owner_stopped".into(),
        },
        EventPayload::Done {
            stop_reason: StopReason::Completed,
            usage: TurnUsage::default(),
        },
        EventPayload::Done {
            stop_reason: StopReason::BudgetExceeded,
            usage: TurnUsage {
                tokens: Usage {
                    prompt_tokens: 10,
                    completion_tokens: 5,
                    cached_prompt_tokens: 2,
                },
                cost: Some(0.125),
                budget: Some(crate::budget::BudgetReport {
                    spent: budget,
                    remaining: budget,
                }),
            },
        },
    ]
}
