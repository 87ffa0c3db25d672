-- agent-runtime SQLite schema, version 4: budgets and cost (issue 18).
-- A session's budgets (JSON object of limits, NULL = unlimited), what its priced model calls cost,
-- and the prompt tokens its model server served from cache (priced apart). Spent tokens are the
-- existing prompt_tokens + completion_tokens; a turn's own spending lives in its turn_state.

ALTER TABLE sessions ADD COLUMN budget TEXT;
ALTER TABLE sessions ADD COLUMN cost REAL NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN cached_prompt_tokens INTEGER NOT NULL DEFAULT 0;
