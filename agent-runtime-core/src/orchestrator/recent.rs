//! The newest messages of sessions whose turns ran in this process, kept so that the model call
//! of a later turn does not read them back from the store.
//!
//! Stored messages are never rewritten, so a session's newest messages are known exactly by its
//! id, its creation time and the seq of its last message: a cached tail is used only when all
//! three match the session the turn holds (read under its lease, updated by its own commits).
//! Anything else — another process's commit, a deleted and re-created session, a commit this cache
//! did not see — is a miss, and the turn reads the store as before.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::session::{Message, Session};
use crate::time::Timestamp;

/// Message content kept in all (bytes, approximately); past it the cache starts over.
const MAX_BYTES: usize = 8 << 20;
/// Sessions kept; past it the cache starts over.
const MAX_SESSIONS: usize = 4096;

/// One session's newest messages.
#[derive(Debug)]
struct Tail {
    created_at: Timestamp,
    /// The seq of the session's last message when this tail was last brought up to date.
    last_seq: u64,
    /// Oldest first, at most `keep`.
    messages: Vec<Message>,
    /// Every message of the session is in `messages`.
    complete: bool,
    keep: usize,
    bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    tails: HashMap<String, Tail>,
    bytes: usize,
}

impl State {
    fn remove(&mut self, id: &str) {
        if let Some(t) = self.tails.remove(id) {
            self.bytes = self.bytes.saturating_sub(t.bytes);
        }
    }
}

/// The cache (one per orchestrator).
#[derive(Debug, Default)]
pub(crate) struct RecentMessages {
    state: Mutex<State>,
}

fn size(m: &Message) -> usize {
    m.content.len() + 64 * (1 + m.tool_calls.len())
}

impl RecentMessages {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest `limit` messages of `session` as stored, oldest first, if known here.
    pub fn get(&self, session: &Session, limit: usize) -> Option<Vec<Message>> {
        let state = self.state();
        let t = state.tails.get(&session.id)?;
        if t.created_at != session.created_at || t.last_seq != session.last_message_seq {
            return None;
        }
        if t.messages.len() < limit && !t.complete {
            return None;
        }
        let from = t.messages.len().saturating_sub(limit);
        Some(t.messages[from..].to_vec())
    }

    /// Remembers what a read of the newest `limit` messages of `session` gave.
    pub fn put(&self, session: &Session, limit: usize, messages: &[Message]) {
        let mut state = self.state();
        state.remove(&session.id);
        // The read must be of the session as the turn holds it.
        if messages.last().map_or(0, |m| m.seq) != session.last_message_seq || limit == 0 {
            return;
        }
        let bytes: usize = messages.iter().map(size).sum();
        if state.tails.len() >= MAX_SESSIONS || state.bytes + bytes > MAX_BYTES {
            *state = State::default();
        }
        state.bytes += bytes;
        state.tails.insert(
            session.id.clone(),
            Tail {
                created_at: session.created_at,
                last_seq: session.last_message_seq,
                messages: messages.to_vec(),
                complete: messages.len() < limit,
                keep: limit,
                bytes,
            },
        );
    }

    /// A commit took the session's last message seq from `before` to `after.last_message_seq`,
    /// appending `added`: a cached tail follows it, or is dropped if it no longer matches.
    pub fn extend(&self, before: u64, after: &Session, added: &[Message]) {
        let mut state = self.state();
        let State { tails, bytes } = &mut *state;
        let Some(t) = tails.get_mut(&after.id) else { return };
        let follows = t.created_at == after.created_at
            && t.last_seq == before
            && before + added.len() as u64 == after.last_message_seq
            && added.first().is_none_or(|m| m.seq == before + 1);
        if !follows {
            *bytes = bytes.saturating_sub(t.bytes);
            tails.remove(&after.id);
            return;
        }
        let grown: usize = added.iter().map(size).sum();
        t.messages.extend_from_slice(added);
        t.last_seq = after.last_message_seq;
        t.bytes += grown;
        *bytes += grown;
        if t.messages.len() > t.keep {
            let dropped: usize = t
                .messages
                .drain(..t.messages.len() - t.keep)
                .map(|m| size(&m))
                .sum();
            t.bytes = t.bytes.saturating_sub(dropped);
            *bytes = bytes.saturating_sub(dropped);
            t.complete = false;
        }
        if *bytes > MAX_BYTES {
            *state = State::default();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::session::{Role, SessionStatus, Usage};

    fn session(id: &str, created: i64, last: u64) -> Session {
        Session {
            id: id.into(),
            user_id: None,
            metadata: serde_json::json!({}),
            created_at: Timestamp::from_millis(created),
            last_activity: Timestamp::from_millis(created),
            current_agent: "coder".into(),
            status: SessionStatus::Running,
            message_count: last,
            last_message_seq: last,
            last_event_seq: 0,
            usage: Usage::default(),
            budget: Default::default(),
            cost: 0.0,
            turn_state: None,
        }
    }

    fn msg(seq: u64) -> Message {
        Message {
            seq,
            role: if seq % 2 == 1 { Role::User } else { Role::Assistant },
            content: format!("message {seq}"),
            agent: None,
            tool_calls: vec![],
            tool_call_id: None,
            created_at: Timestamp::from_millis(seq as i64),
        }
    }

    fn msgs(seqs: std::ops::RangeInclusive<u64>) -> Vec<Message> {
        seqs.map(msg).collect()
    }

    #[test]
    fn a_tail_follows_its_sessions_commits_and_keeps_the_newest_messages() {
        let cache = RecentMessages::default();
        cache.put(&session("s", 1, 2), 3, &msgs(1..=2));
        // Fewer than asked: the whole history, so any limit is answered.
        assert_eq!(cache.get(&session("s", 1, 2), 50), Some(msgs(1..=2)));
        cache.extend(2, &session("s", 1, 4), &msgs(3..=4));
        assert_eq!(cache.get(&session("s", 1, 4), 3), Some(msgs(2..=4)));
        assert_eq!(cache.get(&session("s", 1, 4), 2), Some(msgs(3..=4)));
        // Trimmed to 3: no longer the whole history, so 4 cannot be answered.
        assert_eq!(cache.get(&session("s", 1, 4), 4), None);
        // A commit without messages changes nothing.
        cache.extend(4, &session("s", 1, 4), &[]);
        assert_eq!(cache.get(&session("s", 1, 4), 3), Some(msgs(2..=4)));
    }

    #[test]
    fn a_session_changed_elsewhere_or_recreated_is_a_miss() {
        let cache = RecentMessages::default();
        cache.put(&session("s", 1, 2), 50, &msgs(1..=2));
        // Another process appended a message: the seq no longer matches.
        assert_eq!(cache.get(&session("s", 1, 3), 50), None);
        // Deleted and re-created with as many messages: the creation time differs.
        assert_eq!(cache.get(&session("s", 9, 2), 50), None);
        // A commit that does not follow the cached tail drops it.
        cache.extend(5, &session("s", 1, 6), &[msg(6)]);
        assert_eq!(cache.get(&session("s", 1, 2), 50), None);
        // A read that does not end at the session's last message is not kept.
        cache.put(&session("t", 1, 3), 50, &msgs(1..=2));
        assert_eq!(cache.get(&session("t", 1, 3), 50), None);
        assert_eq!(cache.get(&session("t", 1, 2), 50), None);
    }
}
