//! In-memory storage (placeholder until the real backend lands).
/// In-memory storage.
#[derive(Debug, Default)]
pub struct MemoryStorage;
impl MemoryStorage {
    /// A new, empty store.
    pub fn new() -> Self {
        MemoryStorage
    }
}
