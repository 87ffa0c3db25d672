//! SQLite storage (placeholder until the real backend lands).
use crate::error::{Error, Result};
/// SQLite storage.
#[derive(Debug)]
pub struct SqliteStorage;
impl SqliteStorage {
    /// Opens `sqlite://PATH` or `sqlite::memory:`.
    pub async fn open_url(_url: &str) -> Result<Self> {
        Err(Error::Internal("sqlite storage not built yet".into()))
    }
}
