-- agent-runtime Postgres schema, version 7: nothing to change (issue 22).
-- Schema version numbers are shared by both backends (storage::SCHEMA_VERSION); version 7 rebuilds
-- SQLite's messages and events tables WITHOUT ROWID, which Postgres tables never have.

SELECT 1;
