//! `agent-runtime-server`: the documented HTTP API (docs/API.md) over `agent-runtime-core`, on hyper.
//! Handlers parse, make one call into the core's `Orchestrator`, and serialize; HTTP lives here.

pub mod app;
pub mod auth;
pub mod body;
pub mod config;
pub mod console;
pub mod error;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod server;
pub mod sse;
pub mod views;
