//! The test kit (feature `test-utils`): what tests, examples and benches need to talk to a running
//! server: its process ([`ServerProcess`]), its streams ([`SseReader`], [`EventStream`]), [`create_session`].
//!
//! The streams are read with [`SseDecoder`](crate::llm::sse::SseDecoder), the decoder the model
//! backend uses, so there is one SSE reading in the workspace.

mod api;
mod events;
mod process;
mod sse;

pub use api::create_session;
pub use events::every_event_payload;
pub use process::ServerProcess;
pub use sse::{EventStream, SseEvent, SseReader};
