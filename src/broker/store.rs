//! The broker's SQLite database (WAL): enrollment tokens (only their SHA-256),
//! the activation issued to each Pi serial (its id, never its code),
//! registrations, device keys and single-use challenges, and an audit log. Every change is one transaction, so a crash
//! leaves either all of it or none.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::device::{Device, DeviceKey, DevicePolicy};

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
    /// What a card must prove with its device key (an unknown value in the
    /// database reads as the strictest).
    pub device_policy: DevicePolicy,
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

/// What spending a challenge found.
#[derive(Debug, PartialEq, Eq)]
pub enum ChallengeOutcome {
    Taken,
    /// Never issued, or issued to another token.
    Unknown,
    /// Spent already: a replay.
    Used,
    Expired,
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
        let store = Store { conn };
        store
            .migrate()
            .with_context(|| format!("updating the tables in {}", path.display()))?;
        Ok(store)
    }

    /// Columns added since the first release, for a database made by it.
    fn migrate(&self) -> Result<()> {
        let has_policy: bool = self.conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('tokens') WHERE name = 'device_policy'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_policy {
            self.conn.execute_batch(
                "ALTER TABLE tokens ADD COLUMN device_policy TEXT NOT NULL DEFAULT 'off'",
            )?;
        }
        Ok(())
    }

    pub fn add_token(
        &self,
        name: &str,
        token: &str,
        max_uses: Option<i64>,
        expires_at: Option<i64>,
        serials: Option<&[String]>,
        device_policy: DevicePolicy,
    ) -> Result<()> {
        let serials = serials.map(serde_json::to_string).transpose()?;
        self.conn
            .execute(
                "INSERT INTO tokens (name, sha256, max_uses, expires_at, serials, created_at,
                     device_policy)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    name,
                    token_hash(token),
                    max_uses,
                    expires_at,
                    serials,
                    now(),
                    device_policy.as_str()
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
        let policy: String = row.get(8)?;
        Ok(Token {
            device_policy: DevicePolicy::parse(&policy).unwrap_or(DevicePolicy::Known),
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
        "id, name, max_uses, uses, expires_at, revoked_at, created_at, serials, device_policy";

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

    /// A fresh single-use challenge for a card holding `token_id`; challenges
    /// gone stale a day ago are dropped on the way.
    pub fn new_challenge(&self, token_id: i64, lifetime_secs: i64) -> Result<(String, i64)> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)?;
        let nonce = crate::hex::hex(&bytes);
        let expires_at = now() + lifetime_secs;
        self.conn.execute(
            "DELETE FROM challenges WHERE expires_at < ?1",
            [now() - 86_400],
        )?;
        self.conn.execute(
            "INSERT INTO challenges (nonce, token_id, expires_at) VALUES (?1, ?2, ?3)",
            params![nonce, token_id, expires_at],
        )?;
        Ok((nonce, expires_at))
    }

    /// Spends a challenge: only once, only before it expires, only with the
    /// token it was given to.
    pub fn take_challenge(&self, nonce: &str, token_id: i64) -> Result<ChallengeOutcome> {
        let row: Option<(i64, i64)> = self
            .conn
            .query_row(
                "SELECT token_id, expires_at FROM challenges WHERE nonce = ?1",
                [nonce],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((owner, expires_at)) = row else {
            return Ok(ChallengeOutcome::Unknown);
        };
        // The conditional update is the single use, even with several writers.
        let taken = self.conn.execute(
            "UPDATE challenges SET used_at = ?2 WHERE nonce = ?1 AND used_at IS NULL",
            params![nonce, now()],
        )?;
        Ok(if taken == 0 {
            ChallengeOutcome::Used
        } else if owner != token_id {
            ChallengeOutcome::Unknown
        } else if expires_at <= now() {
            ChallengeOutcome::Expired
        } else {
            ChallengeOutcome::Taken
        })
    }

    fn device_from_row(row: &rusqlite::Row) -> rusqlite::Result<Device> {
        let hex: String = row.get(1)?;
        let key = crate::hex::decode(&hex)
            .and_then(|der| DeviceKey::from_der(&der))
            .ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    rusqlite::types::Type::Text,
                    "not a P-256 public key".into(),
                )
            })?;
        Ok(Device {
            serial: row.get(0)?,
            fingerprint: key.fingerprint(),
            public_key: hex,
            key,
            source: row.get(2)?,
            added_at: row.get(3)?,
            last_seen_at: row.get(4)?,
            revoked_at: row.get(5)?,
        })
    }

    const DEVICE_COLUMNS: &str = "serial, public_key, source, added_at, last_seen_at, revoked_at";

    pub fn device(&self, serial: &str) -> Result<Option<Device>> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {} FROM devices WHERE serial = ?1",
                    Self::DEVICE_COLUMNS
                ),
                [serial],
                Self::device_from_row,
            )
            .optional()?)
    }

    pub fn devices(&self) -> Result<Vec<Device>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM devices ORDER BY serial",
            Self::DEVICE_COLUMNS
        ))?;
        let rows = stmt.query_map([], Self::device_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records the first key seen for a serial (trust on first use). False if
    /// the serial has a key already (another request won the race).
    pub fn record_first_key(&self, serial: &str, key: &DeviceKey) -> Result<bool> {
        let added = self.conn.execute(
            "INSERT INTO devices (serial, public_key, source, added_at, last_seen_at)
             VALUES (?1, ?2, 'first-use', ?3, ?3) ON CONFLICT(serial) DO NOTHING",
            params![serial, key.hex(), now()],
        )?;
        Ok(added == 1)
    }

    pub fn device_seen(&self, serial: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE devices SET last_seen_at = ?2 WHERE serial = ?1",
            params![serial, now()],
        )?;
        Ok(())
    }

    /// Imports devices in one transaction: all or none. A serial already known
    /// with another key is refused unless `replace`; importing a revoked serial
    /// admits it again. Returns (added, replaced, unchanged).
    pub fn import_devices(
        &mut self,
        devices: &[(String, DeviceKey)],
        replace: bool,
    ) -> Result<(usize, usize, usize)> {
        let tx = self.conn.transaction()?;
        let (mut added, mut replaced, mut unchanged) = (0, 0, 0);
        for (serial, key) in devices {
            let current: Option<(String, Option<i64>)> = tx
                .query_row(
                    "SELECT public_key, revoked_at FROM devices WHERE serial = ?1",
                    [serial],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            match current {
                None => added += 1,
                Some((hex, revoked)) if hex == key.hex() => {
                    if revoked.is_none() {
                        unchanged += 1;
                        continue;
                    }
                    replaced += 1;
                }
                Some(_) if replace => replaced += 1,
                Some(_) => bail!(
                    "{serial} is recorded with another key: nothing imported (--replace to change it)"
                ),
            }
            tx.execute(
                "INSERT INTO devices (serial, public_key, source, added_at)
                 VALUES (?1, ?2, 'imported', ?3)
                 ON CONFLICT(serial) DO UPDATE SET public_key = excluded.public_key,
                     source = 'imported', added_at = excluded.added_at, revoked_at = NULL",
                params![serial, key.hex(), now()],
            )?;
        }
        tx.execute(
            "INSERT INTO audit (at, client, action, detail) VALUES (?1, 'cli', 'device-import', ?2)",
            params![now(), format!("{added} added, {replaced} replaced, {unchanged} unchanged")],
        )?;
        tx.commit()?;
        Ok((added, replaced, unchanged))
    }

    pub fn revoke_device(&self, serial: &str) -> Result<()> {
        let changed = self.conn.execute(
            "UPDATE devices SET revoked_at = ?2 WHERE serial = ?1 AND revoked_at IS NULL",
            params![serial, now()],
        )?;
        if changed == 0 {
            bail!("no unrevoked device with serial {serial:?}");
        }
        self.audit(None, "cli", "device-revoke", Some(serial), serial)?;
        Ok(())
    }

    /// Whether this token already paid for an enrollment of this serial (it registered).
    pub fn enrolled_with(&self, serial: &str, token_id: i64) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM registrations WHERE serial = ?1 AND token_id = ?2 LIMIT 1",
                params![serial, token_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// The node this serial registered as most recently, if any.
    pub fn last_instance(&self, serial: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT instance_id FROM registrations WHERE serial = ?1 ORDER BY id DESC LIMIT 1",
                [serial],
                |r| r.get(0),
            )
            .optional()?)
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
