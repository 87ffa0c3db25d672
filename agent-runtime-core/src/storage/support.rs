//! Helpers every storage backend shares: the list cursor, and the input checks a commit passes
//! before any backend touches its store (so bad input fails the same way everywhere).

use crate::approval::ApprovalStatus;
use crate::error::{Error, Result};
use crate::session::Role;
use crate::time::Timestamp;

use super::Commit;

/// The largest page `list_sessions` serves.
pub(crate) const MAX_PAGE: usize = 1000;

/// The keyset position after the last session of a page: `(last_activity, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionCursor {
    /// The page's last `last_activity`, in milliseconds.
    pub last_activity: i64,
    /// The page's last id.
    pub id: String,
}

// The cursor is `c1.<millis>.<id>`: ids are `[A-Za-z0-9_.:-]`, so it needs no escaping in a query
// string, and the version prefix lets a later format reject old cursors cleanly.
const CURSOR_PREFIX: &str = "c1.";

impl SessionCursor {
    /// The cursor pointing after this session.
    pub fn after(last_activity: Timestamp, id: &str) -> Self {
        SessionCursor {
            last_activity: last_activity.as_millis(),
            id: id.to_string(),
        }
    }

    /// The opaque text handed to clients.
    pub fn encode(&self) -> String {
        format!("{CURSOR_PREFIX}{}.{}", self.last_activity, self.id)
    }

    /// Parses a cursor this module encoded; anything else is `InvalidRequest`.
    pub fn decode(s: &str) -> Result<Self> {
        let bad = || Error::InvalidRequest(format!("invalid cursor '{s}'"));
        let rest = s.strip_prefix(CURSOR_PREFIX).ok_or_else(bad)?;
        let (millis, id) = rest.split_once('.').ok_or_else(bad)?;
        let last_activity = millis.parse::<i64>().map_err(|_| bad())?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(SessionCursor {
            last_activity,
            id: id.to_string(),
        })
    }
}

/// `InvalidRequest` unless `limit` is within 1..=1000 (API.md §9.11).
pub(crate) fn check_page_limit(limit: usize) -> Result<()> {
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "limit must be between 1 and {MAX_PAGE}, got {limit}"
        )))
    }
}

/// Checks what a commit carries before anything is stored: approvals belong to this session and
/// resolutions decide something (pending → pending is not a decision).
pub(crate) fn check_commit(session_id: &str, commit: &Commit) -> Result<()> {
    for a in &commit.approvals {
        if a.session_id != session_id {
            return Err(Error::InvalidRequest(format!(
                "approval '{}' belongs to session '{}', not '{session_id}'",
                a.call_id, a.session_id
            )));
        }
    }
    for r in &commit.resolutions {
        if r.status == ApprovalStatus::Pending {
            return Err(Error::InvalidRequest(format!(
                "resolution of approval '{}' must decide it (status other than pending)",
                r.call_id
            )));
        }
    }
    Ok(())
}

/// How many of the commit's messages count in `message_count` (all but system notes).
pub(crate) fn counted_messages(commit: &Commit) -> u64 {
    commit.messages.iter().filter(|m| m.role != Role::System).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_ids_with_dots_and_colons() {
        let c = SessionCursor::after(Timestamp::from_millis(-5), "a.b:c-d_e");
        assert_eq!(SessionCursor::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn foreign_cursors_are_invalid_requests() {
        for s in ["", "c1.", "c1.12", "c1.x.id", "c2.1.id", "garbage", "c1.1."] {
            assert!(
                matches!(SessionCursor::decode(s), Err(Error::InvalidRequest(_))),
                "{s:?}"
            );
        }
    }
}
