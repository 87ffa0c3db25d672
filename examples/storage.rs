//! Opens the default SQLite storage in memory and creates a session.
//!
//! Run: `cargo run -p agent-runtime-examples --example storage`

use agent_runtime_core::session::NewSession;
use agent_runtime_core::{Timestamp, storage};

#[tokio::main]
async fn main() -> agent_runtime_core::Result<()> {
    let store = storage::open("sqlite::memory:").await?;
    let session = store
        .create_session(NewSession {
            id: "session_demo".into(),
            user_id: Some("user_123".into()),
            metadata: serde_json::json!({}),
            current_agent: "orchestrator".into(),
            created_at: Timestamp::now(),
        })
        .await?;
    println!(
        "{} on {} ({})",
        session.id,
        store.backend(),
        session.current_agent
    );
    Ok(())
}
