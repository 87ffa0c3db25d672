-- agent-runtime Postgres schema, version 5: tool results found by their call id (issue 15).
-- A tool call's id is unique in its session (API.md); the runtime answers every call before it asks
-- the model again, so the results are where an id the model reuses is found, however long the
-- session. Partial: only tool results carry a tool_call_id.

CREATE INDEX messages_by_tool_call_id ON messages (session_id, tool_call_id) WHERE tool_call_id IS NOT NULL;
