-- agent-runtime SQLite schema, version 2: instant liveness of lease owners.
-- Owners prove they are alive with lock files beside the database (`<database>-owners/`); this
-- index finds the sessions an owner holds and whether a dead owner's lock file can go.

CREATE INDEX sessions_lease_owner ON sessions (lease_owner) WHERE lease_owner IS NOT NULL;
