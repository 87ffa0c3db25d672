-- agent-runtime Postgres schema, version 1.
-- Times are BIGINT milliseconds since the Unix epoch (exact round trip of `Timestamp`), except the
-- lease expiry, which is compared with the database's own clock. JSON values are stored as TEXT
-- (serde_json output): the exact text comes back, and Postgres JSONB cannot hold "\u0000".
-- Free text from tools and humans (message content, approval reason and feedback) is UTF-8 in
-- BYTEA, because a Postgres TEXT value cannot contain a NUL character and a tool's output can.

CREATE TABLE sessions (
    id                TEXT PRIMARY KEY,
    user_id           TEXT,
    metadata          TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    last_activity     BIGINT NOT NULL,
    current_agent     TEXT NOT NULL,
    status            TEXT NOT NULL,
    message_count     BIGINT NOT NULL DEFAULT 0,
    last_message_seq  BIGINT NOT NULL DEFAULT 0,
    last_event_seq    BIGINT NOT NULL DEFAULT 0,
    switch_count      BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    turn_state        TEXT,
    lease_owner       TEXT,
    lease_expires_at  TIMESTAMPTZ
);

-- list_sessions pages over (last_activity DESC, id DESC), optionally per user or per status.
CREATE INDEX sessions_activity ON sessions (last_activity DESC, id DESC);
CREATE INDEX sessions_user_activity ON sessions (user_id, last_activity DESC, id DESC);
CREATE INDEX sessions_status_activity ON sessions (status, last_activity DESC, id DESC);

CREATE TABLE messages (
    session_id   TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq          BIGINT NOT NULL,
    role         TEXT NOT NULL,
    content      BYTEA NOT NULL,
    agent        TEXT,
    tool_calls   TEXT,
    tool_call_id TEXT,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE events (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- request_id of a turn → the seq of its first event (idempotent retries of a turn).
CREATE TABLE requests (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    request_id TEXT NOT NULL,
    event_seq  BIGINT NOT NULL,
    PRIMARY KEY (session_id, request_id)
);

CREATE TABLE approvals (
    session_id         TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    call_id            TEXT NOT NULL,
    tool_name          TEXT NOT NULL,
    arguments          TEXT NOT NULL,
    reason             BYTEA NOT NULL,
    request_type       TEXT NOT NULL,
    status             TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    decided_at         BIGINT,
    feedback           BYTEA,
    modified_arguments TEXT,
    -- insertion order, to break ties between approvals created in the same millisecond
    ord                BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (session_id, call_id)
);

CREATE INDEX approvals_status ON approvals (session_id, status, created_at, ord);

CREATE TABLE switches (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    from_agent TEXT NOT NULL,
    to_agent   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    at         BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE plans (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    plan_id    TEXT NOT NULL,
    plan       TEXT NOT NULL,
    PRIMARY KEY (session_id, plan_id)
);
