//! The test kit (feature `test-utils`): what tests, examples and benches need to talk to a running
//! server — its process ([`ServerProcess`]) and its event streams ([`SseReader`], [`EventStream`]).
//!
//! The streams are read with [`SseDecoder`](crate::llm::sse::SseDecoder), the decoder the model
//! backend uses, so there is one SSE reading in the workspace.

mod process;
mod sse;

pub use process::ServerProcess;
pub use sse::{EventStream, SseEvent, SseReader};
