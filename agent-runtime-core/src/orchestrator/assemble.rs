//! One way to assemble a runtime from its settings alone, shared by the server and the Python
//! module: the model backend, the storage `DATABASE_URL` names, agents, tools and approval policy.

use std::sync::Arc;

use super::{Orchestrator, OrchestratorBuilder};
use crate::config::{LlmSettings, RuntimeConfig};
use crate::error::{Error, Result};
use crate::llm::{LlmBackend, OpenAiBackend, OpenAiConfig};
use crate::storage;

/// How often a started runtime looks for turns of dead processes sharing its database (a cheap
/// read of the running sessions): the bound on how long such a turn stays stranded.
pub const STOPPED_TURNS_POLL: std::time::Duration = std::time::Duration::from_millis(250);

impl Orchestrator {
    /// The runtime `config` describes: the OpenAI-compatible backend of the `LLM_*` settings
    /// (checked first, so a bad URL leaves no database file behind), the storage `DATABASE_URL`
    /// names (opened, migrations applied), the default agents plus `AGENT_RUNTIME__AGENTS_FILE`,
    /// the built-in tools and the HITL policy.
    ///
    /// Returns the builder, so an embedder can still wrap or replace a part;
    /// [`OrchestratorBuilder::start`] finishes. Errors start with the setting at fault and name
    /// the cause and the fix (`DATABASE_URL: database "x" does not exist — create it with
    /// createdb x`), never a password.
    pub async fn from_config(config: RuntimeConfig) -> Result<OrchestratorBuilder> {
        let llm =
            OpenAiBackend::new(openai_config(&config.llm)).map_err(|e| in_context("LLM_PROXY_URL", e))?;
        // Off (None) without an OTEL_EXPORTER_OTLP_ENDPOINT.
        let telemetry = crate::telemetry::Telemetry::start(&config.telemetry)?;
        let store = storage::open(&config.database_url)
            .await
            .map_err(|e| in_context("DATABASE_URL", e))?;
        Ok(Orchestrator::builder(store, Arc::new(llm))
            .telemetry(telemetry)
            .config(config)
            .discover_model_context()
            .await)
    }
}

impl OrchestratorBuilder {
    /// Replaces the model backend by `wrap` of it (e.g. a layer that counts calls).
    pub fn wrap_llm(mut self, wrap: impl FnOnce(Arc<dyn LlmBackend>) -> Arc<dyn LlmBackend>) -> Self {
        self.llm = wrap(self.llm);
        self
    }

    /// [`build`](OrchestratorBuilder::build)s the runtime, then takes over the turns a previous
    /// process left running (resumed, or closed with `TURN_RECOVERY=interrupt`), and from then on
    /// those of any process on the same database that dies ([`STOPPED_TURNS_POLL`]): the runtime
    /// is ready to serve. Needs a Tokio runtime.
    pub async fn start(self) -> Result<Orchestrator> {
        let rt = self.build()?;
        if let Some(mcp) = rt.mcp_servers() {
            // MCP tools are offered from the first turn on, unless a server is slow (bounded).
            mcp.wait_started(crate::tools::mcp::MCP_STARTUP_TIMEOUT).await;
        }
        match rt.recover_interrupted().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(turns = n, "took over the turns the previous stop left running"),
            Err(e) => return Err(in_context("cannot recover interrupted turns", e)),
        }
        rt.watch_for_stopped_turns(STOPPED_TURNS_POLL);
        Ok(rt)
    }
}

/// The backend configuration the `LLM_*` settings describe, with the default timeouts, retries
/// and breaker.
fn openai_config(settings: &LlmSettings) -> OpenAiConfig {
    OpenAiConfig {
        base_url: settings.proxy_url.clone(),
        model: settings.model.clone(),
        api_key: settings.api_key.clone(),
        capabilities: settings.capabilities,
        first_byte_timeout: settings.first_byte_timeout,
        ..OpenAiConfig::default()
    }
}

/// `e` with `prefix: ` in front of its message, keeping its code.
fn in_context(prefix: &str, e: Error) -> Error {
    match e {
        Error::Database(m) => Error::Database(format!("{prefix}: {m}")),
        Error::InvalidRequest(m) => Error::InvalidRequest(format!("{prefix}: {m}")),
        Error::Internal(m) => Error::Internal(format!("{prefix}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(database_url: &str) -> RuntimeConfig {
        RuntimeConfig {
            database_url: database_url.to_string(),
            ..RuntimeConfig::default()
        }
    }

    #[tokio::test]
    async fn a_store_that_cannot_open_names_the_setting_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let url = format!("sqlite://{}/x.db", missing.display());
        let err = Orchestrator::from_config(config(&url)).await.err().unwrap();
        assert_eq!(
            err,
            Error::Database(format!(
                "DATABASE_URL: directory {} does not exist — create it or choose another DATABASE_URL",
                missing.display()
            ))
        );
        assert_eq!(err.public_message(), "storage failed");
    }

    #[tokio::test]
    async fn a_bad_model_url_fails_before_a_database_file_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let mut c = config(&format!("sqlite://{}", db.display()));
        c.llm.proxy_url = "http://exa mple".into();
        let err = Orchestrator::from_config(c).await.err().unwrap();
        assert_eq!(err.code(), "INVALID_REQUEST");
        assert!(err.to_string().starts_with("LLM_PROXY_URL: "), "{err}");
        assert!(!db.exists());
    }

    #[tokio::test]
    async fn the_settings_give_a_runtime_with_their_agents_and_storage() {
        let mut c = config("memory://");
        c.default_agent = "coder".into();
        let rt = Orchestrator::from_config(c.clone())
            .await
            .unwrap()
            .start()
            .await
            .unwrap();
        assert_eq!(
            (rt.config(), rt.storage().backend(), rt.llm().model()),
            (&c, "memory", "gpt-4o-mini")
        );
    }
}
