-- agent-runtime Postgres schema, version 3: cancel requests that reach another process.
-- A process asked to cancel a turn that another process runs marks the session here and notifies
-- the lease owner (channel `agent_runtime_cancels`); the owner cancels its turn. Taking or
-- releasing the lease clears the mark.

ALTER TABLE sessions ADD COLUMN cancel_requested_at BIGINT;
