//! The reader of `text/event-stream` bodies the HTTP examples use: the one of core's test kit
//! (`id:`, `data:`, `: keep-alive` comments, decoded by the same decoder the model backend uses).

pub use agent_runtime_core::test_kit::SseReader;
