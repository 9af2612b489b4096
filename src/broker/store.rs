//! The broker's SQLite database (WAL): enrollment tokens (only their SHA-256),
//! the activation issued to each Pi serial (its id, never its code),
//! registrations, and an audit log. Every change is one transaction, so a crash
//! leaves either all of it or none.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    token_id INTEGER,
    client TEXT,
    action TEXT NOT NULL,
    serial TEXT,
    detail TEXT
);
";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn token_hash(token: &str) -> String {
    crate::hex::hex(&Sha256::digest(token.as_bytes()))
}

#[derive(Debug, Clone, Serialize)]
pub struct Token {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub max_uses: Option<i64>,
    pub uses: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    /// Pi serials this token may enrol (`None`: any).
    pub serials: Option<Vec<String>>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct Issued {
    pub activation_id: String,
    pub hostname: Option<String>,
    pub image_sha256: Option<String>,
    pub expires_at: i64,
    pub used: bool,
}

pub struct NewIssue<'a> {
    pub serial: &'a str,
    pub activation_id: &'a str,
    pub token_id: i64,
    pub hostname: Option<&'a str>,
    pub machine_id: Option<&'a str>,
    pub image_sha256: Option<&'a str>,
    pub previous_instance_id: Option<&'a str>,
    pub expires_at: i64,
    pub client: &'a str,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the broker database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if mode != "wal" {
            bail!("{}: could not switch to WAL (got {mode})", path.display());
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the tables in {}", path.display()))?;
        Ok(Store { conn })
    }

    pub fn add_token(
        &self,
        name: &str,
        token: &str,
        max_uses: Option<i64>,
        expires_at: Option<i64>,
        serials: Option<&[String]>,
    ) -> Result<()> {
        let serials = serials.map(serde_json::to_string).transpose()?;
        self.conn
            .execute(
                "INSERT INTO tokens (name, sha256, max_uses, expires_at, serials, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    name,
                    token_hash(token),
                    max_uses,
                    expires_at,
                    serials,
                    now()
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    anyhow::anyhow!("a token named {name:?} exists already")
                }
                e => e.into(),
            })?;
        self.audit(None, "cli", "token-add", None, name)?;
        Ok(())
    }

    pub fn revoke_token(&self, name: &str) -> Result<()> {
        let changed = self.conn.execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
            params![name, now()],
        )?;
        if changed == 0 {
            bail!("no unrevoked token named {name:?}");
        }
        self.audit(None, "cli", "token-revoke", None, name)?;
        Ok(())
    }

    fn token_from_row(row: &rusqlite::Row) -> rusqlite::Result<Token> {
        let serials: Option<String> = row.get(7)?;
        Ok(Token {
            id: row.get(0)?,
            name: row.get(1)?,
            max_uses: row.get(2)?,
            uses: row.get(3)?,
            expires_at: row.get(4)?,
            revoked_at: row.get(5)?,
            created_at: row.get(6)?,
            serials: serials.and_then(|s| serde_json::from_str(&s).ok()),
        })
    }

    const TOKEN_COLUMNS: &str =
        "id, name, max_uses, uses, expires_at, revoked_at, created_at, serials";

    pub fn tokens(&self) -> Result<Vec<Token>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM tokens ORDER BY id",
            Self::TOKEN_COLUMNS
        ))?;
        let rows = stmt.query_map([], Self::token_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn token_by_secret(&self, token: &str) -> Result<Option<Token>> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {} FROM tokens WHERE sha256 = ?1",
                    Self::TOKEN_COLUMNS
                ),
                [token_hash(token)],
                Self::token_from_row,
            )
            .optional()?)
    }

    pub fn issued(&self, serial: &str) -> Result<Option<Issued>> {
        Ok(self
            .conn
            .query_row(
                "SELECT activation_id, hostname, image_sha256, expires_at, used
                 FROM activations WHERE serial = ?1",
                [serial],
                |r| {
                    Ok(Issued {
                        activation_id: r.get(0)?,
                        hostname: r.get(1)?,
                        image_sha256: r.get(2)?,
                        expires_at: r.get(3)?,
                        used: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Every activation id the database knows, current or replaced.
    pub fn known_activation_ids(&self) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT activation_id FROM activations UNION SELECT activation_id FROM registrations",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Counts one enrollment against the token if it has any left.
    pub fn reserve_use(&self, token: &Token) -> Result<bool> {
        let changed = self.conn.execute(
            "UPDATE tokens SET uses = uses + 1
             WHERE id = ?1 AND (max_uses IS NULL OR uses < max_uses)",
            [token.id],
        )?;
        Ok(changed == 1)
    }

    /// Gives back a reserved enrollment that did not result in an activation.
    pub fn release_use(&self, token: &Token) -> Result<()> {
        self.conn.execute(
            "UPDATE tokens SET uses = uses - 1 WHERE id = ?1 AND uses > 0",
            [token.id],
        )?;
        Ok(())
    }

    /// Records a new activation for a serial (replacing its previous one), in
    /// one transaction with its audit line.
    pub fn record_issue(&mut self, new: &NewIssue) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO activations (serial, activation_id, token_id, hostname, machine_id,
                 image_sha256, previous_instance_id, issued_at, expires_at, used)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0)
             ON CONFLICT(serial) DO UPDATE SET activation_id = excluded.activation_id,
                 token_id = excluded.token_id, hostname = excluded.hostname,
                 machine_id = excluded.machine_id, image_sha256 = excluded.image_sha256,
                 previous_instance_id = excluded.previous_instance_id,
                 issued_at = excluded.issued_at, expires_at = excluded.expires_at, used = 0",
            params![
                new.serial,
                new.activation_id,
                new.token_id,
                new.hostname,
                new.machine_id,
                new.image_sha256,
                new.previous_instance_id,
                now(),
                new.expires_at
            ],
        )?;
        tx.execute(
            "INSERT INTO audit (at, token_id, client, action, serial, detail)
             VALUES (?1, ?2, ?3, 'activation-issued', ?4, ?5)",
            params![
                now(),
                new.token_id,
                new.client,
                new.serial,
                new.activation_id
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_registration(
        &mut self,
        serial: &str,
        instance_id: &str,
        activation_id: &str,
        previous: Option<&str>,
        deregistered_previous: bool,
        token_id: i64,
        client: &str,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO registrations (serial, instance_id, activation_id, previous_instance_id,
                 deregistered_previous, token_id, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(instance_id) DO NOTHING",
            params![
                serial,
                instance_id,
                activation_id,
                previous,
                deregistered_previous,
                token_id,
                now()
            ],
        )?;
        tx.execute(
            "UPDATE activations SET used = 1 WHERE serial = ?1 AND activation_id = ?2",
            params![serial, activation_id],
        )?;
        tx.execute(
            "INSERT INTO audit (at, token_id, client, action, serial, detail)
             VALUES (?1, ?2, ?3, 'registered', ?4, ?5)",
            params![now(), token_id, client, serial, instance_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A refused or noteworthy request, for the audit log.
    pub fn audit(
        &self,
        token_id: Option<i64>,
        client: &str,
        action: &str,
        serial: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO audit (at, token_id, client, action, serial, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now(), token_id, client, action, serial, detail],
        )?;
        Ok(())
    }

    /// Writes the WAL back into the main file (on a clean shutdown).
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}
