//! The writer's cache of session heads: each session as the writer's own connection last stored
//! it, with its lease owner, so that a commit needs no `SELECT` and no row parse to learn it.
//!
//! Only the writer thread holds one, and it is kept true by three rules (docs/PERFORMANCE.md,
//! "What changed the numbers", the head cache):
//!
//! - **Other connections.** Other processes (or other `SqliteStorage`s) may write the same file.
//!   `PRAGMA data_version` on the writer's connection changes exactly when another connection
//!   has committed since this one's last transaction; the writer reads it right after each
//!   `BEGIN IMMEDIATE` (the write lock then keeps everyone else out until its `COMMIT`) and, if it
//!   moved, drops every entry.
//! - **Its own writes.** Every writer job that changes a session row either leaves the fields
//!   kept here as they are (a lease renewed, a cancel requested), or takes the session's entry
//!   out before it writes and puts back the row as it wrote it. A job that fails midway has taken
//!   the entry out and put nothing back.
//! - **Rollbacks.** A batch rolled back (a write failed after writing, a panic, a failed
//!   `COMMIT`) drops every entry: what a write of it put back was never committed. Its writes
//!   replayed one by one start from an empty cache.
//!
//! It is bounded: two generations of at most [`GENERATION`] entries and [`GENERATION_BYTES`] of
//! JSON text each; when the newer is full, the older is dropped and the newer takes its place, so
//! a session not touched for two generations is forgotten (a server with 100k sessions keeps at
//! most the last few hundred it wrote). A session whose JSON text is over [`LARGEST`] is not
//! kept.

use std::collections::HashMap;

use crate::session::Session;

/// Entries of one generation.
pub(super) const GENERATION: usize = 512;

/// JSON text (metadata and turn state) of one generation's entries, in bytes.
pub(super) const GENERATION_BYTES: usize = 4 << 20;

/// A session whose metadata and turn state are longer than this is not kept.
pub(super) const LARGEST: usize = 64 << 10;

/// A session as stored, and who holds its lease (expired or not).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CachedHead {
    pub session: Session,
    pub lease_owner: Option<String>,
    /// The length of its metadata's stored text (the turn state's is known from the session).
    pub metadata_bytes: usize,
}

impl CachedHead {
    fn bytes(&self) -> usize {
        self.metadata_bytes + self.session.turn_state.as_ref().map_or(0, |t| t.as_str().len())
    }
}

/// The cache (see the module's doc).
#[derive(Debug, Default)]
pub(super) struct Heads {
    newer: HashMap<String, CachedHead>,
    newer_bytes: usize,
    older: HashMap<String, CachedHead>,
    /// `PRAGMA data_version` when the entries were last known good; `None` before the first look.
    data_version: Option<i64>,
}

impl Heads {
    /// Takes the session's entry out, if kept: the caller writes the row and puts it back.
    pub(super) fn take(&mut self, id: &str) -> Option<CachedHead> {
        if let Some(head) = self.newer.remove(id) {
            self.newer_bytes -= head.bytes();
            return Some(head);
        }
        self.older.remove(id)
    }

    /// The session's entry, if kept, to read or change fields the caller writes in place (the
    /// lease owner).
    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut CachedHead> {
        match self.newer.get_mut(id) {
            Some(head) => Some(head),
            None => self.older.get_mut(id),
        }
    }

    /// Keeps `head` as its session's entry (in the newer generation), unless it is too large.
    pub(super) fn put(&mut self, head: CachedHead) {
        let bytes = head.bytes();
        if let Some(old) = self.take(&head.session.id) {
            drop(old);
        }
        if bytes > LARGEST {
            return;
        }
        if self.newer.len() >= GENERATION || self.newer_bytes + bytes > GENERATION_BYTES {
            self.older = std::mem::take(&mut self.newer);
            self.newer_bytes = 0;
        }
        self.newer_bytes += bytes;
        self.newer.insert(head.session.id.clone(), head);
    }

    /// Forgets the session (it was deleted).
    pub(super) fn forget(&mut self, id: &str) {
        drop(self.take(id));
    }

    /// Drops every entry (a rollback).
    pub(super) fn clear(&mut self) {
        self.newer.clear();
        self.older.clear();
        self.newer_bytes = 0;
    }

    /// Judges the entries by `data_version`, read inside the writer's transaction: unless it is
    /// the one they were known good at, another connection committed, and every entry goes.
    /// Whether they were kept.
    pub(super) fn validate(&mut self, data_version: i64) -> bool {
        let kept = self.data_version == Some(data_version);
        if !kept {
            self.clear();
            self.data_version = Some(data_version);
        }
        kept
    }

    /// Entries kept, both generations.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.newer.len() + self.older.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::session::{NewSession, TurnStateJson};
    use crate::time::Timestamp;

    fn head(id: &str, turn_state_bytes: usize) -> CachedHead {
        let mut session = NewSession {
            id: id.into(),
            user_id: None,
            metadata: serde_json::json!({}),
            current_agent: "orchestrator".into(),
            created_at: Timestamp::from_millis(1),
            budget: Default::default(),
        }
        .into_session();
        if turn_state_bytes > 0 {
            let text = format!("\"{}\"", "x".repeat(turn_state_bytes - 2));
            session.turn_state = Some(TurnStateJson::from_text(text).unwrap());
        }
        CachedHead {
            session,
            lease_owner: Some("me".into()),
            metadata_bytes: 2,
        }
    }

    #[test]
    fn a_kept_head_is_taken_out_whole_and_then_gone() {
        let mut heads = Heads::default();
        heads.put(head("s1", 0));
        assert_eq!(heads.take("s1"), Some(head("s1", 0)));
        assert_eq!(heads.take("s1"), None);
    }

    #[test]
    fn a_session_not_touched_for_two_generations_is_forgotten_and_the_count_stays_bounded() {
        let mut heads = Heads::default();
        heads.put(head("first", 0));
        for i in 0..10 * GENERATION {
            heads.put(head(&format!("s{i}"), 0));
            // Touched all along: it moves to the newer generation each time it is put back.
            if i % 100 == 0 {
                let kept = heads.take("kept").unwrap_or_else(|| head("kept", 0));
                heads.put(kept);
            }
            assert!(heads.len() <= 2 * GENERATION, "{} entries", heads.len());
        }
        assert_eq!(heads.take("first"), None);
        assert_eq!(heads.take("kept"), Some(head("kept", 0)));
    }

    #[test]
    fn the_text_kept_stays_bounded_and_a_session_too_large_is_not_kept() {
        let mut heads = Heads::default();
        heads.put(head("huge", LARGEST + 1));
        assert_eq!(heads.take("huge"), None);
        for i in 0..200 {
            heads.put(head(&format!("s{i}"), 60 << 10));
            assert!(
                heads.newer_bytes <= GENERATION_BYTES,
                "{} bytes",
                heads.newer_bytes
            );
        }
        assert!(
            heads.len() < 2 * GENERATION_BYTES / (60 << 10) + 2,
            "{} entries",
            heads.len()
        );
    }

    #[test]
    fn a_new_data_version_drops_every_entry_and_the_same_one_keeps_them() {
        let mut heads = Heads::default();
        assert!(!heads.validate(7));
        heads.put(head("s1", 0));
        assert!(heads.validate(7));
        assert_eq!(heads.len(), 1);
        assert!(!heads.validate(8));
        assert_eq!(heads.take("s1"), None);
    }

    #[test]
    fn a_cleared_cache_keeps_nothing() {
        let mut heads = Heads::default();
        heads.put(head("s1", 10));
        heads.put(head("s2", 0));
        heads.clear();
        assert_eq!(
            (heads.take("s1"), heads.take("s2"), heads.newer_bytes),
            (None, None, 0)
        );
    }
}
