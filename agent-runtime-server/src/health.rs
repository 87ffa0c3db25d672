//! `GET /health`: a storage ping and a model-endpoint check (short timeout, cached a few seconds
//! so a probe storm never hammers the model server).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent_runtime_core::orchestrator::Orchestrator;

use crate::views::{HealthView, MultiAgentView};

const STORAGE_TIMEOUT: Duration = Duration::from_secs(2);
const LLM_TIMEOUT: Duration = Duration::from_secs(2);
const LLM_CACHE: Duration = Duration::from_secs(5);

/// The cached model check.
#[derive(Debug, Default)]
pub struct HealthCheck {
    llm: Mutex<Option<(Instant, bool)>>,
}

impl HealthCheck {
    async fn llm_available(&self, rt: &Orchestrator) -> bool {
        let cached = *self.llm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, ok)) = cached
            && at.elapsed() < LLM_CACHE
        {
            return ok;
        }
        let ok = matches!(
            tokio::time::timeout(LLM_TIMEOUT, rt.llm().health()).await,
            Ok(Ok(()))
        );
        *self.llm.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), ok));
        ok
    }

    /// The health document and whether storage answered (503 when it did not).
    pub async fn check(&self, rt: &Orchestrator) -> (HealthView, bool) {
        let storage = rt.storage();
        let (storage_ok, llm_ok) = tokio::join!(
            async {
                matches!(
                    tokio::time::timeout(STORAGE_TIMEOUT, storage.ping()).await,
                    Ok(Ok(()))
                )
            },
            self.llm_available(rt)
        );
        let mut dependencies = BTreeMap::new();
        dependencies.insert(
            storage.backend().to_string(),
            if storage_ok { "connected" } else { "disconnected" }.to_string(),
        );
        dependencies.insert(
            "llm_proxy".to_string(),
            if llm_ok { "available" } else { "unavailable" }.to_string(),
        );
        let c = rt.config();
        let view = HealthView {
            status: if storage_ok && llm_ok {
                "healthy"
            } else {
                "degraded"
            }
            .to_string(),
            service: "agent-runtime".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            dependencies,
            multi_agent: MultiAgentView {
                enabled: c.multi_agent_enabled,
                default_agent: c.default_agent.clone(),
                agents_count: rt.agents().len(),
            },
            sandbox: rt.sandbox_status(),
        };
        (view, storage_ok)
    }
}
