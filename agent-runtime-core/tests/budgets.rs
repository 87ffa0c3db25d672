//! Budgets in the engine on the scripted model: the EventBus tells a budget's story (reached,
//! raised) and a budget approval is cancelled by a new user message like any other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::Event;
use agent_runtime_core::approval::{ApprovalStatus, RequestType};
use agent_runtime_core::config::RuntimeConfig;
use agent_runtime_core::events::{BusEventKind, BusFilter};
use agent_runtime_core::llm::{Script, ScriptedBackend};
use agent_runtime_core::orchestrator::{CreateSession, Orchestrator, Submission};
use agent_runtime_core::protocol::{ClientMessage, Decision, EventPayload, HitlDecision, StopReason};
use agent_runtime_core::session::SessionStatus;
use agent_runtime_core::storage;
use futures::StreamExt;
use serde_json::json;

async fn collect(stream: agent_runtime_core::orchestrator::EventStream) -> Vec<Event> {
    tokio::time::timeout(Duration::from_secs(20), stream.collect::<Vec<Event>>())
        .await
        .expect("the stream ends")
}

fn stop(events: &[Event]) -> StopReason {
    match events.last().map(|e| &e.payload) {
        Some(EventPayload::Done { stop_reason, .. }) => *stop_reason,
        other => panic!("not done: {other:?}"),
    }
}

/// A runtime on the coder (no routing) over a SQLite file, a session with one tool call allowed
/// per turn, and a turn that stopped before its second call. Returns the budget approval's id.
async fn paused(scripts: Vec<Script>) -> (Orchestrator, String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "A").unwrap();
    let store = storage::open(&format!("sqlite://{}", dir.path().join("rt.db").display()))
        .await
        .unwrap();
    let config = RuntimeConfig {
        default_agent: "coder".into(),
        ..RuntimeConfig::default()
    };
    let rt = Orchestrator::builder(store, Arc::new(ScriptedBackend::new(scripts)))
        .config(config)
        .build()
        .unwrap();
    let s = rt
        .create_session(CreateSession {
            metadata: Some(json!({"project_path": dir.path().to_str().unwrap()})),
            budget: Some(json!({"turn_tool_calls": 1})),
            ..CreateSession::default()
        })
        .await
        .unwrap()
        .id;
    let events = collect(rt.submit(&s, Submission::user("read twice")).await.unwrap()).await;
    assert_eq!(stop(&events), StopReason::BudgetExceeded);
    let pending = rt.pending_approvals(&s).await.unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|a| (a.request_type, a.status, a.arguments.clone()))
            .collect::<Vec<_>>(),
        [(
            RequestType::Budget,
            ApprovalStatus::Pending,
            json!({"budget": "turn_tool_calls", "spent": 1, "limit": 1, "proposed_limit": 2})
        )]
    );
    let id = pending[0].call_id.clone();
    (rt, s, id, dir)
}

fn reads() -> Vec<Script> {
    vec![
        Script::tool_call("read_file", json!({"path": "a.txt"})),
        Script::tool_call("read_file", json!({"path": "a.txt", "offset": 1})),
        Script::text("Read."),
    ]
}

#[tokio::test]
async fn the_event_bus_tells_a_budget_reached_then_raised() {
    let (rt, s, id, _dir) = paused(reads()).await;
    let mut sub = rt.subscribe(BusFilter::default());
    let decided = rt
        .submit(
            &s,
            Submission::new(ClientMessage::HitlDecision(HitlDecision {
                call_id: id.clone(),
                decision: Decision::Edit {
                    arguments: json!({"limit": 5}),
                },
            })),
        )
        .await
        .unwrap();
    assert_eq!(stop(&collect(decided).await), StopReason::Completed);
    let mut seen = vec![];
    while let Some(Ok(e)) = sub.try_recv() {
        if matches!(
            e.kind,
            BusEventKind::BudgetRaised | BusEventKind::ApprovalApproved
        ) {
            seen.push((e.kind, e.data));
        }
    }
    assert_eq!(
        seen,
        [
            (
                BusEventKind::BudgetRaised,
                json!({"call_id": id, "budget": "turn_tool_calls", "limit": 5, "previous_limit": 1})
            ),
            (
                BusEventKind::ApprovalApproved,
                json!({"call_id": id, "decision": "edit", "request_type": "budget"})
            ),
        ]
    );
}

#[tokio::test]
async fn a_new_message_cancels_a_pending_budget_approval() {
    let mut scripts = reads();
    scripts.push(Script::text("Something else."));
    let (rt, s, id, _dir) = paused(scripts).await;
    let events = collect(rt.submit(&s, Submission::user("never mind")).await.unwrap()).await;
    // The unrun call gets its cancellation, then the budget approval is cancelled.
    let opening: Vec<(&str, String)> = events
        .iter()
        .take(2)
        .map(|e| match &e.payload {
            EventPayload::ToolResult { error, .. } => (
                "tool_result",
                error.as_ref().map(|e| e.code.clone()).unwrap_or_default(),
            ),
            EventPayload::ApprovalResolved { call_id, decision } => {
                ("approval_resolved", format!("{call_id} {decision}"))
            }
            other => (other.kind(), String::new()),
        })
        .collect();
    assert_eq!(
        opening,
        [
            ("tool_result", "CANCELLED".to_string()),
            ("approval_resolved", format!("{id} cancel"))
        ]
    );
    assert_eq!(stop(&events), StopReason::Completed);
    assert_eq!(rt.pending_approvals(&s).await.unwrap(), vec![]);
    assert_eq!(rt.get_session(&s).await.unwrap().status, SessionStatus::Idle);
}
