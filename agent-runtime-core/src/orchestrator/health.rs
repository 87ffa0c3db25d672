//! The runtime's health as `GET /health` reports it: does storage answer, does the model server
//! answer. The model check is remembered a few seconds, so a probe storm never hammers the model.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Orchestrator;

/// How long the storage ping may take before storage counts as disconnected.
const STORAGE_DEADLINE: Duration = Duration::from_secs(2);
/// How long the model check may take before the model counts as unavailable.
const MODEL_DEADLINE: Duration = Duration::from_secs(2);
/// How long a model check's answer is reused.
const MODEL_CHECK_REUSED_FOR: Duration = Duration::from_secs(5);

/// Whether the runtime's dependencies answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// The storage backend: `memory`, `sqlite` or `postgres`.
    pub storage_backend: &'static str,
    /// Storage answered a ping in time.
    pub storage_connected: bool,
    /// The model server answered its check in time (an answer up to a few seconds old).
    pub model_available: bool,
}

impl Health {
    /// Every dependency answers.
    pub fn healthy(&self) -> bool {
        self.storage_connected && self.model_available
    }
}

/// This process as `GET /health` shows it, to tell replicas apart behind a load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct ProcessInfo {
    /// The lease owner id of this runtime (`runtime_<hex>`), as stored on the sessions it runs.
    pub id: String,
    /// How many turns run in this process right now.
    pub turns: usize,
}

/// The last model check: when, and whether the model answered.
#[derive(Debug, Default)]
pub(crate) struct ModelCheck(Mutex<Option<(Instant, bool)>>);

impl Orchestrator {
    /// Pings storage and checks the model server, at once, each within a short deadline.
    pub async fn health(&self) -> Health {
        let storage = self.storage();
        let (storage_connected, model_available) = tokio::join!(
            async {
                matches!(
                    tokio::time::timeout(STORAGE_DEADLINE, storage.ping()).await,
                    Ok(Ok(()))
                )
            },
            self.model_available()
        );
        Health {
            storage_backend: storage.backend(),
            storage_connected,
            model_available,
        }
    }

    /// This process's lease owner id and how many turns it runs now.
    pub fn process(&self) -> ProcessInfo {
        ProcessInfo {
            id: self.inner.owner.clone(),
            turns: self.inner.hubs.all_running().len(),
        }
    }

    async fn model_available(&self) -> bool {
        let check = &self.inner.model_check.0;
        let last = *check.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, ok)) = last
            && at.elapsed() < MODEL_CHECK_REUSED_FOR
        {
            return ok;
        }
        let ok = matches!(
            tokio::time::timeout(MODEL_DEADLINE, self.llm().health()).await,
            Ok(Ok(()))
        );
        *check.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), ok));
        ok
    }
}
