-- Schema version 1: sessions and everything that belongs to them.
-- Times are INTEGER milliseconds since the Unix epoch (UTC); JSON is TEXT.
-- Every child table cascades on session delete, so deleting a session removes all of it.

CREATE TABLE sessions (
    id                TEXT    NOT NULL PRIMARY KEY,
    user_id           TEXT,
    metadata          TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    last_activity     INTEGER NOT NULL,
    current_agent     TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    message_count     INTEGER NOT NULL DEFAULT 0,
    -- Seq counters: a commit reads and bumps them in its transaction, so appending never scans
    -- earlier rows and seqs stay gap-free.
    last_message_seq  INTEGER NOT NULL DEFAULT 0,
    last_event_seq    INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    turn_state        TEXT,
    -- The turn lease (one turn at a time per session, across processes).
    lease_owner       TEXT,
    lease_expires_at  INTEGER
);
-- Keyset pagination of list_sessions: (last_activity DESC, id DESC), optionally by user or status.
CREATE INDEX sessions_by_activity ON sessions (last_activity, id);
CREATE INDEX sessions_by_user_activity ON sessions (user_id, last_activity, id);
CREATE INDEX sessions_by_status_activity ON sessions (status, last_activity, id);

CREATE TABLE messages (
    session_id   TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    role         TEXT    NOT NULL,
    content      TEXT    NOT NULL,
    agent        TEXT,
    tool_calls   TEXT    NOT NULL,
    tool_call_id TEXT,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE events (
    session_id TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    payload    TEXT    NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE approvals (
    session_id         TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    call_id            TEXT    NOT NULL,
    tool_name          TEXT    NOT NULL,
    arguments          TEXT    NOT NULL,
    reason             TEXT    NOT NULL,
    request_type       TEXT    NOT NULL,
    status             TEXT    NOT NULL,
    created_at         INTEGER NOT NULL,
    decided_at         INTEGER,
    feedback           TEXT,
    modified_arguments TEXT,
    PRIMARY KEY (session_id, call_id)
);
CREATE INDEX approvals_by_status ON approvals (session_id, status, created_at);

CREATE TABLE agent_switches (
    id         INTEGER NOT NULL PRIMARY KEY,
    session_id TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    from_agent TEXT    NOT NULL,
    to_agent   TEXT    NOT NULL,
    reason     TEXT    NOT NULL,
    at         INTEGER NOT NULL
);
CREATE INDEX agent_switches_by_session ON agent_switches (session_id, id);

CREATE TABLE plans (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    plan_id    TEXT NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (session_id, plan_id)
);

-- request_id → seq of the first event of the turn it started (idempotent retries).
CREATE TABLE requests (
    session_id      TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    request_id      TEXT    NOT NULL,
    first_event_seq INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (session_id, request_id)
);
