//! Budgets in the engine on the scripted model: the EventBus tells a budget's story (reached,
//! raised), a budget approval is cancelled by a new user message, and routing and plan calls are gated.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::Event;
use agent_runtime_core::approval::{ApprovalStatus, RequestType};
use agent_runtime_core::config::RuntimeConfig;
use agent_runtime_core::events::{BusEventKind, BusFilter};
use agent_runtime_core::llm::{Script, ScriptedBackend, ToolChoice};
use agent_runtime_core::orchestrator::{CreateSession, Orchestrator, Submission};
use agent_runtime_core::protocol::{ClientMessage, Decision, EventPayload, HitlDecision, StopReason};
use agent_runtime_core::session::{SessionStatus, Usage};
use agent_runtime_core::storage;
use futures::StreamExt;
use serde_json::{Value, json};

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

/// A runtime whose sessions start on the orchestrator, which routes each plain message (plans
/// on), over a SQLite file on the scripted model; and a session created with `budget`.
async fn routed(
    scripts: Vec<Script>,
    budget: Value,
) -> (Orchestrator, Arc<ScriptedBackend>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = storage::open(&format!("sqlite://{}", dir.path().join("rt.db").display()))
        .await
        .unwrap();
    let llm = Arc::new(ScriptedBackend::new(scripts));
    let rt = Orchestrator::builder(store, llm.clone())
        .config(RuntimeConfig::default())
        .build()
        .unwrap();
    let s = rt
        .create_session(CreateSession {
            metadata: Some(json!({"project_path": dir.path().to_str().unwrap()})),
            budget: (!budget.is_null()).then_some(budget),
            ..CreateSession::default()
        })
        .await
        .unwrap()
        .id;
    (rt, llm, s, dir)
}

async fn say(rt: &Orchestrator, s: &str, content: &str) -> Vec<Event> {
    collect(rt.submit(s, Submission::user(content)).await.unwrap()).await
}

async fn decide(rt: &Orchestrator, s: &str, call_id: &str, decision: Decision) -> Vec<Event> {
    let d = ClientMessage::HitlDecision(HitlDecision {
        call_id: call_id.into(),
        decision,
    });
    collect(rt.submit(s, Submission::new(d)).await.unwrap()).await
}

/// Back on the orchestrator, so the next plain message is routed.
async fn back_to_the_orchestrator(rt: &Orchestrator, s: &str) {
    let switch = ClientMessage::SwitchAgent {
        agent_type: "orchestrator".into(),
        content: None,
        reason: None,
    };
    let events = collect(rt.submit(s, Submission::new(switch)).await.unwrap()).await;
    assert_eq!(stop(&events), StopReason::Completed);
}

fn route(agent: &str) -> Script {
    Script::tool_call(
        "route",
        json!({"agent": agent, "reason": format!("{agent} fits")}),
    )
}

fn plan() -> Script {
    Script::tool_call(
        "propose_plan",
        json!({"goal": "Auth module", "subtasks": [
            {"description": "Design the auth flow", "agent": "architect"},
            {"description": "Implement it", "agent": "coder"}]}),
    )
}

fn tokens(prompt_tokens: u64, completion_tokens: u64) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        ..Usage::default()
    }
}

/// The stream's payloads as JSON, the turn's running time taken out of `done` (it depends on the
/// machine's pace).
fn shown(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(&e.payload).unwrap();
            if let Some(spent) = v.pointer_mut("/usage/spent").and_then(Value::as_object_mut) {
                spent.remove("turn_time_secs");
            }
            v
        })
        .collect()
}

/// The one pending approval: a budget's, with its id and reason.
async fn pending_budget(rt: &Orchestrator, s: &str) -> (String, String, Value) {
    let pending = rt.pending_approvals(s).await.unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|a| (a.request_type, a.status))
            .collect::<Vec<_>>(),
        [(RequestType::Budget, ApprovalStatus::Pending)]
    );
    let a = &pending[0];
    (a.call_id.clone(), a.reason.clone(), a.arguments.clone())
}

fn choices(llm: &ScriptedBackend) -> Vec<ToolChoice> {
    llm.requests().iter().map(|r| r.tool_choice.clone()).collect()
}

#[tokio::test]
async fn a_spent_session_token_budget_pauses_a_new_message_before_its_routing_call_and_the_raise_routes_it_once()
 {
    let big = tokens(20_000, 400);
    let (rt, llm, s, _dir) = routed(
        vec![
            route("coder").usage(big),
            Script::text("Hi.").usage(big),
            route("coder").usage(big),
            Script::text("Done.").usage(big),
        ],
        Value::Null,
    )
    .await;
    assert_eq!(stop(&say(&rt, &s, "fix the bug").await), StopReason::Completed);
    back_to_the_orchestrator(&rt, &s).await;
    rt.set_budget(&s, &json!({"session_tokens": 40_000}))
        .await
        .unwrap();

    // 40 800 tokens spent of 40 000: the message pauses before the router is asked.
    let events = say(&rt, &s, "fix the bug").await;
    let (id, reason, arguments) = pending_budget(&rt, &s).await;
    assert_eq!(
        arguments,
        json!({"budget": "session_tokens", "spent": 40_800, "limit": 40_000, "proposed_limit": 80_000})
    );
    assert_eq!(
        shown(&events),
        [
            json!({"type": "budget_exceeded", "call_id": id, "budget": "session_tokens", "spent": 40_800,
                   "limit": 40_000, "proposed_limit": 80_000, "reason": reason}),
            json!({"type": "done", "stop_reason": "budget_exceeded", "usage": {
                "prompt_tokens": 0, "completion_tokens": 0,
                "spent": {"session_tokens": 40_800, "turn_tokens": 0, "turn_tool_calls": 0},
                "remaining": {"session_tokens": 0}}}),
        ]
    );
    assert_eq!(llm.requests().len(), 2, "no request for the paused message");
    assert_eq!(
        rt.get_session(&s).await.unwrap().status,
        SessionStatus::AwaitingApproval
    );

    // The raise approved, the message is routed (once) and the chosen agent answers.
    let events = decide(&rt, &s, &id, Decision::Approve).await;
    assert_eq!(
        shown(&events),
        [
            json!({"type": "approval_resolved", "call_id": id, "decision": "approve"}),
            json!({"type": "agent_switched", "from_agent": "orchestrator", "to_agent": "coder",
                   "reason": "coder fits"}),
            json!({"type": "assistant_message", "token": "Done."}),
            json!({"type": "assistant_message", "content": "Done."}),
            json!({"type": "done", "stop_reason": "completed", "usage": {
                "prompt_tokens": 40_000, "completion_tokens": 800,
                "spent": {"session_tokens": 81_600, "turn_tokens": 40_800, "turn_tool_calls": 0},
                "remaining": {"session_tokens": 0}}}),
        ]
    );
    assert_eq!(
        choices(&llm)[2..],
        [ToolChoice::Function("route".into()), ToolChoice::Auto]
    );
    assert_eq!(rt.current_agent(&s).await.unwrap().switch_count, 3);
}

#[tokio::test]
async fn a_declined_raise_before_routing_ends_the_turn_unrouted_with_a_closing_message() {
    let (rt, llm, s, _dir) = routed(vec![route("coder")], json!({"session_tokens": 1})).await;
    let events = say(&rt, &s, "fix the bug").await;
    assert_eq!(stop(&events), StopReason::BudgetExceeded);
    let (id, _, _) = pending_budget(&rt, &s).await;
    let events = decide(&rt, &s, &id, Decision::Reject { feedback: None }).await;
    let text =
        "I stopped here: this turn reached its session_tokens budget (0 of 1) and raising it was declined.";
    assert_eq!(
        shown(&events),
        [
            json!({"type": "approval_resolved", "call_id": id, "decision": "reject"}),
            json!({"type": "assistant_message", "content": text}),
            json!({"type": "done", "stop_reason": "budget_exceeded", "usage": {
                "prompt_tokens": 0, "completion_tokens": 0,
                "spent": {"session_tokens": 0, "turn_tokens": 0, "turn_tool_calls": 0},
                "remaining": {"session_tokens": 1}}}),
        ]
    );
    assert_eq!(llm.requests().len(), 0);
    assert_eq!(rt.get_session(&s).await.unwrap().current_agent, "orchestrator");
}

#[tokio::test]
async fn a_routing_call_gets_at_most_the_tokens_left_as_max_tokens() {
    let (rt, llm, s, _dir) = routed(
        vec![
            // Not reported: the runtime counts the routing call's tokens as the gate does.
            route("coder"),
            Script::text("Hi.").usage(Usage::default()),
            route("coder"),
            Script::text("Done.").usage(Usage::default()),
        ],
        Value::Null,
    )
    .await;
    assert_eq!(stop(&say(&rt, &s, "fix the bug").await), StopReason::Completed);
    let first = rt.usage(&s).await.unwrap();
    back_to_the_orchestrator(&rt, &s).await;
    // The same message again: the same routing prompt, leaving 50 tokens for the answer.
    let limit = first.total() + first.prompt_tokens + 50;
    rt.set_budget(&s, &json!({"session_tokens": limit}))
        .await
        .unwrap();
    say(&rt, &s, "fix the bug").await;
    let requests = llm.requests();
    assert_eq!(
        (requests[0].max_tokens, requests[2].max_tokens),
        (Some(120), Some(50))
    );
    assert_eq!(requests[2].tool_choice, ToolChoice::Function("route".into()));
}

#[tokio::test]
async fn a_plan_call_gets_at_most_the_tokens_left_as_max_tokens() {
    let content = "Build a whole auth module";
    let (rt, llm, s, _dir) = routed(
        vec![
            route("coder"),
            Script::text("Hi.").usage(Usage::default()),
            route("plan").usage(Usage::default()),
            plan(),
            route("plan").usage(Usage::default()),
            plan(),
        ],
        Value::Null,
    )
    .await;
    // The routing prompt's tokens, then the plan prompt's (the calls report none: counted).
    say(&rt, &s, content).await;
    let route_prompt = rt.usage(&s).await.unwrap().prompt_tokens;
    back_to_the_orchestrator(&rt, &s).await;
    assert_eq!(stop(&say(&rt, &s, content).await), StopReason::AwaitingApproval);
    let spent = rt.usage(&s).await.unwrap();
    let plan_prompt = spent.prompt_tokens - route_prompt;
    // Both calls fit, and the plan's leaves it 100 tokens more than the larger prompt.
    let limit = spent.total() + route_prompt.max(plan_prompt) + 100;
    rt.set_budget(&s, &json!({"session_tokens": limit}))
        .await
        .unwrap();
    let left = route_prompt.max(plan_prompt) + 100 - plan_prompt;
    assert!(left < 800, "the cap is below the plan call's own ({left})");
    // A new message cancels the proposed plan; its plan call is capped.
    assert_eq!(stop(&say(&rt, &s, content).await), StopReason::AwaitingApproval);
    let requests = llm.requests();
    assert_eq!(
        (
            requests[3].max_tokens,
            requests[5].tool_choice.clone(),
            requests[5].max_tokens
        ),
        (
            Some(800),
            ToolChoice::Function("propose_plan".into()),
            Some(u32::try_from(left).unwrap())
        )
    );
}

#[tokio::test]
async fn a_plan_call_past_the_budget_pauses_and_the_raise_asks_for_the_plan_without_routing_again() {
    let (rt, llm, s, _dir) = routed(
        vec![route("plan").usage(tokens(20_000, 0)), plan()],
        json!({"session_tokens": 10_000}),
    )
    .await;
    let events = say(&rt, &s, "Build a whole auth module").await;
    let (id, reason, _) = pending_budget(&rt, &s).await;
    assert_eq!(
        shown(&events),
        [
            json!({"type": "budget_exceeded", "call_id": id, "budget": "session_tokens", "spent": 20_000,
                   "limit": 10_000, "proposed_limit": 20_000, "reason": reason}),
            json!({"type": "done", "stop_reason": "budget_exceeded", "usage": {
                "prompt_tokens": 20_000, "completion_tokens": 0,
                "spent": {"session_tokens": 20_000, "turn_tokens": 20_000, "turn_tool_calls": 0},
                "remaining": {"session_tokens": 0}}}),
        ]
    );
    assert_eq!(choices(&llm), [ToolChoice::Function("route".into())]);

    let raise = Decision::Edit {
        arguments: json!({"limit": 100_000}),
    };
    let events = decide(&rt, &s, &id, raise).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.payload.kind()).collect();
    assert_eq!(kinds, ["approval_resolved", "plan_proposed", "done"]);
    assert_eq!(stop(&events), StopReason::AwaitingApproval);
    assert_eq!(
        choices(&llm),
        [
            ToolChoice::Function("route".into()),
            ToolChoice::Function("propose_plan".into())
        ]
    );
}
