-- As SQLite's second migration: sealed codes and issues being made.
ALTER TABLE activations ADD COLUMN code_sealed TEXT;
CREATE TABLE pending_issues (
    issue_id TEXT PRIMARY KEY,
    serial TEXT NOT NULL,
    deadline BIGINT NOT NULL
);
CREATE INDEX registrations_serial ON registrations(serial, token_id);
-- SQLite's unixepoch(), so one SQL text reads the database's clock in both.
CREATE FUNCTION unixepoch() RETURNS BIGINT
    AS 'SELECT extract(epoch FROM now())::bigint' LANGUAGE SQL STABLE;
