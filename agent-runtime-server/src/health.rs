//! `GET /health`: the core's [`Orchestrator::health`] (a storage ping and a model check, each with
//! a short deadline) with the multi-agent settings, as the documented JSON.

use std::collections::BTreeMap;

use agent_runtime_core::orchestrator::Orchestrator;

use crate::views::{HealthView, MultiAgentView};

/// The health document and whether storage answered (503 when it did not).
pub async fn check(rt: &Orchestrator) -> (HealthView, bool) {
    let health = rt.health().await;
    let dependencies = BTreeMap::from([
        (
            health.storage_backend.to_string(),
            if health.storage_connected {
                "connected"
            } else {
                "disconnected"
            }
            .to_string(),
        ),
        (
            "llm_proxy".to_string(),
            if health.model_available {
                "available"
            } else {
                "unavailable"
            }
            .to_string(),
        ),
    ]);
    let c = rt.config();
    let view = HealthView {
        status: if health.healthy() { "healthy" } else { "degraded" }.to_string(),
        service: "agent-runtime".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        dependencies,
        multi_agent: MultiAgentView {
            enabled: c.multi_agent_enabled,
            default_agent: c.default_agent.clone(),
            agents_count: rt.agents().len(),
        },
        sandbox: rt.sandbox_status(),
        process: rt.process(),
        mcp_servers: rt.mcp_servers().map(|m| m.health()).unwrap_or_default(),
    };
    (view, health.storage_connected)
}
