//! Embeds the runtime in a Rust program: an `Orchestrator` over a SQLite file, with the scripted
//! model standing in for a real one. One routed turn with one approval: the orchestrator routes
//! "Создай новый виджет профиля" to the coder, the coder asks to write a file, the turn pauses for
//! approval, the program approves, the file is written and the coder answers. Every event is printed
//! as its JSON line (the `data:` of the HTTP API's SSE stream).
//!
//! Run: `cargo run -p agent-runtime-examples --example embed`
//!
//! For a real model, replace `ScriptedBackend` with
//! `OpenAiBackend::new(OpenAiConfig::from_env()?)?` (see the README).

use std::sync::Arc;

use agent_runtime_core::llm::{Script, ScriptedBackend};
use agent_runtime_core::orchestrator::{CreateSession, EventStream, Orchestrator, Submission};
use agent_runtime_core::protocol::{ClientMessage, Decision, EventPayload, HitlDecision, StopReason};
use agent_runtime_core::{Error, Result, storage};
use futures::StreamExt;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| Error::Internal(format!("temp dir: {e}")))?;
    let project = dir.path().join("project");
    std::fs::create_dir(&project).map_err(|e| Error::Internal(format!("project dir: {e}")))?;

    // The model's three answers, in the order the runtime asks for them.
    let llm = Arc::new(ScriptedBackend::new(vec![
        // 1. The orchestrator's routing call (a forced `route` function call).
        Script::tool_call(
            "route",
            json!({"agent": "coder", "reason": "the user wants new code"}),
        ),
        // 2. The coder streams a sentence and asks to write a file (needs approval by default).
        Script::tool_call(
            "write_file",
            json!({"path": "src/ProfileWidget.tsx", "content": "export const ProfileWidget = () => null;\n"}),
        )
        .with_text("Создаю виджет профиля."),
        // 3. After the tool result, the coder's final answer.
        Script::text("Готово: виджет создан."),
    ]));

    let db_url = format!("sqlite://{}", dir.path().join("agent-runtime.db").display());
    let store = storage::open(&db_url).await?;
    let rt = Orchestrator::builder(store, llm).build()?;

    let session = rt
        .create_session(CreateSession {
            user_id: Some("user_123".into()),
            metadata: Some(json!({"project_path": project.display().to_string()})),
            session_id: None,
            budget: None,
        })
        .await?;
    println!("session {} on {}", session.id, db_url);

    println!("-- user: Создай новый виджет профиля");
    let events = rt
        .submit(&session.id, Submission::user("Создай новый виджет профиля"))
        .await?;
    let stop = print_events(events).await?;
    if stop != Some(StopReason::AwaitingApproval) {
        return Err(Error::Internal(format!(
            "expected a pause for approval, got {stop:?}"
        )));
    }

    for approval in rt.pending_approvals(&session.id).await? {
        println!(
            "-- approving {} {} ({})",
            approval.tool_name, approval.arguments, approval.reason
        );
        let decision = ClientMessage::HitlDecision(HitlDecision {
            call_id: approval.call_id.clone(),
            decision: Decision::Approve,
        });
        let events = rt.submit(&session.id, Submission::new(decision)).await?;
        print_events(events).await?;
    }

    let written = std::fs::read_to_string(project.join("src/ProfileWidget.tsx"))
        .map_err(|e| Error::Internal(format!("the approved write did not happen: {e}")))?;
    let agent = rt.current_agent(&session.id).await?;
    println!(
        "-- wrote src/ProfileWidget.tsx ({} bytes); agent now {} after {} switch(es)",
        written.len(),
        agent.current_agent.agent_type,
        agent.switch_count
    );
    Ok(())
}

/// Prints each event as its JSON line; returns the stream's `done.stop_reason`.
async fn print_events(mut events: EventStream) -> Result<Option<StopReason>> {
    let mut stop = None;
    while let Some(event) = events.next().await {
        let line =
            serde_json::to_string(&event).map_err(|e| Error::Internal(format!("event to JSON: {e}")))?;
        println!("{line}");
        if let EventPayload::Done { stop_reason, .. } = &event.payload {
            stop = Some(*stop_reason);
        }
    }
    Ok(stop)
}
