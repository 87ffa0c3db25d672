-- agent-runtime SQLite schema, version 3: cancel requests that reach another process.
-- A process asked to cancel a turn that another process runs marks the session here; the lease
-- owner looks for marks on its sessions and cancels its turn. Taking or releasing the lease clears it.

ALTER TABLE sessions ADD COLUMN cancel_requested_at INTEGER;
