-- agent-runtime SQLite schema, version 7: messages and events clustered on their key (issue 22).
-- A table with rowids keeps each row twice over: in the rowid b-tree and in the index of its
-- primary key (session_id, seq), two b-tree inserts per row. WITHOUT ROWID, the row lives in the
-- primary key's b-tree alone: one insert, and a read by (session_id, seq) walks one tree.
-- Rebuilt in the migration's transaction: rows copied as they are, the tool-call index recreated.

CREATE TABLE messages_new (
    session_id   TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    role         TEXT    NOT NULL,
    content      TEXT    NOT NULL,
    agent        TEXT,
    tool_calls   TEXT    NOT NULL,
    tool_call_id TEXT,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
INSERT INTO messages_new (session_id, seq, role, content, agent, tool_calls, tool_call_id, created_at)
    SELECT session_id, seq, role, content, agent, tool_calls, tool_call_id, created_at FROM messages;
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
CREATE INDEX messages_by_tool_call_id ON messages (session_id, tool_call_id) WHERE tool_call_id IS NOT NULL;

CREATE TABLE events_new (
    session_id TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    payload    TEXT    NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
INSERT INTO events_new (session_id, seq, payload) SELECT session_id, seq, payload FROM events;
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
