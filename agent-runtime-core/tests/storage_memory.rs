//! The storage conformance suite on the in-memory backend.

use std::sync::Arc;

use agent_runtime_core::Storage;
use agent_runtime_core::storage::memory::MemoryStorage;

/// The memory store has no second connection: both handles are the same store.
async fn open_pair() -> (Arc<dyn Storage>, Arc<dyn Storage>) {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    (store.clone(), store)
}

agent_runtime_core::storage_conformance_suite!(open_pair);

#[tokio::test]
async fn open_memory_url_gives_the_memory_backend() {
    for url in ["memory://", "memory:"] {
        let store = agent_runtime_core::storage::open(url).await.unwrap();
        assert_eq!(store.backend(), "memory");
    }
}
