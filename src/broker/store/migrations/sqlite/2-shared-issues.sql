-- Several brokers (or a restarted one) answer a card's retry with the code it
-- was given: kept sealed with the broker's vend key, wiped once used.
ALTER TABLE activations ADD COLUMN code_sealed TEXT;
-- An activation being made: until its deadline (the database's clock) the
-- broker making it may still record it; after, it may not, and a clean-up may
-- delete the activation.
CREATE TABLE pending_issues (
    issue_id TEXT PRIMARY KEY,
    serial TEXT NOT NULL,
    deadline INTEGER NOT NULL
);
CREATE INDEX registrations_serial ON registrations(serial, token_id);
