//! # agent-runtime-core
//!
//! The engine behind an AI coding assistant: sessions, the five agents, the agent loop between a
//! streaming model and sandboxed tools, human approvals, and durable storage (SQLite or Postgres).
//! The HTTP server (`agent-runtime-server`) and the Python module (`agent_runtime`) are thin layers
//! over this crate.
//!
//! ```
//! use agent_runtime_core::storage;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> agent_runtime_core::Result<()> {
//! let store = storage::open("sqlite::memory:").await?;
//! assert_eq!(store.backend(), "sqlite");
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod approval;
pub mod budget;
pub mod config;
pub mod context;
pub mod error;
pub mod events;
pub mod llm;
pub mod orchestrator;
pub mod protocol;
pub mod session;
pub mod storage;
pub mod telemetry;
#[cfg(feature = "test-utils")]
pub mod test_kit;
pub mod time;
pub mod tools;

pub use error::{Error, Result};
pub use protocol::{Event, EventPayload};
pub use session::{Message, Session, SessionStatus};
pub use storage::Storage;
pub use time::Timestamp;
