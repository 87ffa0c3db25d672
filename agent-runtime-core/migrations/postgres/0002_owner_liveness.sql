-- agent-runtime Postgres schema, version 2: instant liveness of lease owners.
-- Each live process holds a session-level advisory lock on `lock_key` on a connection of its own;
-- Postgres releases it when that connection ends, so a registered owner without its lock is dead
-- and its leases can be taken at once instead of after they expire.

CREATE TABLE runtime_owners (
    owner      TEXT PRIMARY KEY,
    lock_key   BIGINT NOT NULL,
    started_at BIGINT NOT NULL
);

-- Finding the sessions a (dead) owner holds, and whether an owner still holds any.
CREATE INDEX sessions_lease_owner ON sessions (lease_owner) WHERE lease_owner IS NOT NULL;
