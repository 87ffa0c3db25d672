//! Postgres storage (placeholder until the real backend lands).
use crate::error::{Error, Result};
/// Postgres storage.
#[derive(Debug)]
pub struct PostgresStorage;
impl PostgresStorage {
    /// Connects to `postgres://...`.
    pub async fn connect(_url: &str) -> Result<Self> {
        Err(Error::Internal("postgres storage not built yet".into()))
    }
}
