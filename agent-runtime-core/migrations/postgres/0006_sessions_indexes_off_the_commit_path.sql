-- agent-runtime Postgres schema, version 6: fewer index entries written by every commit (issue 22).
-- Every commit sets last_activity, and each index that holds it gets a new entry on every commit:
-- three per commit. Only the unfiltered list needs its order from an index; a list by user or by
-- status finds that user's or status's sessions by an index whose key a commit never changes and
-- sorts those (LIMIT keeps the sort to one page). The status index is also where
-- orphaned_sessions finds running sessions.

DROP INDEX sessions_user_activity;
DROP INDEX sessions_status_activity;
CREATE INDEX sessions_by_user ON sessions (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX sessions_by_status ON sessions (status);
