-- The broker's first tables. IF NOT EXISTS: a database made before versioned
-- migrations has them already.
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL UNIQUE,
    max_uses INTEGER,
    uses INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER,
    revoked_at INTEGER,
    serials TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS activations (
    serial TEXT PRIMARY KEY,
    activation_id TEXT NOT NULL UNIQUE,
    token_id INTEGER NOT NULL REFERENCES tokens(id),
    hostname TEXT,
    machine_id TEXT,
    image_sha256 TEXT,
    previous_instance_id TEXT,
    issued_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS registrations (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL,
    instance_id TEXT NOT NULL UNIQUE,
    activation_id TEXT NOT NULL,
    previous_instance_id TEXT,
    deregistered_previous INTEGER NOT NULL DEFAULT 0,
    token_id INTEGER NOT NULL REFERENCES tokens(id),
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    serial TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    source TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    last_seen_at INTEGER,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS challenges (
    nonce TEXT PRIMARY KEY,
    token_id INTEGER NOT NULL REFERENCES tokens(id),
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    token_id INTEGER,
    client TEXT,
    action TEXT NOT NULL,
    serial TEXT,
    detail TEXT
);
