//! The broker's records, in SQLite (WAL, the default for one host) or in
//! PostgreSQL (any number of brokers on one database): enrollment tokens (only
//! their SHA-256), the activation issued to each Pi serial (its id, and its code
//! sealed with the vend key until it is used), activations being made,
//! registrations, device keys, single-use challenges and an audit log. Every
//! change is one statement or one transaction, so a crash leaves either all of it
//! or none.
//!
//! db (one SQL text for both) → migrate (versioned, at open) → locks (one
//! request per serial, across brokers) → this file (the records).

mod local_locks;
mod locks;
mod migrate;

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::device::{Device, DeviceKey, DevicePolicy};
use crate::sql::db::{self, Pool, Row, Step, args};
pub use crate::sql::{Location, is_postgres_url};
pub use locks::SerialGuard;

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
    /// The code, sealed (see sealing.rs); gone once used.
    pub code_sealed: Option<String>,
}

pub struct NewIssue<'a> {
    /// What [`Store::begin_issue`] returned.
    pub issue_id: &'a str,
    pub serial: &'a str,
    pub activation_id: &'a str,
    pub code_sealed: &'a str,
    pub token_id: i64,
    pub hostname: Option<&'a str>,
    pub machine_id: Option<&'a str>,
    pub image_sha256: Option<&'a str>,
    pub previous_instance_id: Option<&'a str>,
    pub expires_at: i64,
    pub client: &'a str,
}

/// Recording an issue came too late: its deadline passed, so a clean-up may
/// already be deleting the activation. The caller withdraws it itself.
#[derive(Debug, thiserror::Error)]
#[error("the activation was made after its deadline; it is not recorded")]
pub struct LateIssue;

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

/// What the database says of the activations a clean-up found in SSM.
pub struct Bookkeeping {
    /// Every activation id recorded, current or replaced.
    pub known: HashSet<String>,
    /// Issues being made, by id: true while their deadline has not passed.
    pub pending: HashMap<String, bool>,
}

pub struct Store {
    pool: Pool,
    /// PostgreSQL: the connections holding serials' advisory locks, apart from
    /// the pool queries use, so a request holding a lock never waits for a
    /// connection held by a request that waits for that lock.
    lock_pool: Option<Pool>,
    local_locks: local_locks::SerialLocks,
    location: Location,
}

impl Store {
    /// Opens (and creates or migrates) the database; `connections` bounds the
    /// pool (twice that on PostgreSQL, with the lock connections).
    pub async fn open(location: &Location, connections: usize) -> Result<Store> {
        let (pool, lock_pool) = match location {
            Location::Sqlite(path) => (Pool::sqlite(path, connections).await?, None),
            Location::Postgres { config, tls, .. } => (
                Pool::postgres((**config).clone(), tls, connections)?,
                Some(Pool::postgres((**config).clone(), tls, connections)?),
            ),
        };
        migrate::run(&pool)
            .await
            .map_err(|e| e.context(format!("preparing the broker database {location}")))?;
        Ok(Store {
            pool,
            lock_pool,
            local_locks: Default::default(),
            location: location.clone(),
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub async fn add_token(
        &self,
        name: &str,
        token: &str,
        max_uses: Option<i64>,
        expires_at: Option<i64>,
        serials: Option<&[String]>,
        device_policy: DevicePolicy,
    ) -> Result<()> {
        let serials = serials.map(serde_json::to_string).transpose()?;
        let added = self
            .pool
            .execute(
                "INSERT INTO tokens (name, sha256, max_uses, expires_at, serials, created_at,
                     device_policy)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                args![
                    name,
                    token_hash(token),
                    max_uses,
                    expires_at,
                    serials,
                    now(),
                    device_policy.as_str()
                ],
            )
            .await;
        match added {
            Err(e) if db::is_unique_violation(&e) => {
                bail!("a token named {name:?} exists already")
            }
            other => other?,
        };
        self.audit(None, "cli", "token-add", None, name).await
    }

    pub async fn revoke_token(&self, name: &str) -> Result<()> {
        let changed = self
            .pool
            .execute(
                "UPDATE tokens SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
                args![name, now()],
            )
            .await?;
        if changed == 0 {
            bail!("no unrevoked token named {name:?}");
        }
        self.audit(None, "cli", "token-revoke", None, name).await
    }

    fn token_from_row(row: &Row) -> Result<Token> {
        let serials = row.opt_text(7)?;
        Ok(Token {
            device_policy: DevicePolicy::parse(&row.text(8)?).unwrap_or(DevicePolicy::Known),
            id: row.int(0)?,
            name: row.text(1)?,
            max_uses: row.opt_int(2)?,
            uses: row.int(3)?,
            expires_at: row.opt_int(4)?,
            revoked_at: row.opt_int(5)?,
            created_at: row.int(6)?,
            serials: serials.and_then(|s| serde_json::from_str(&s).ok()),
        })
    }

    const TOKEN_COLUMNS: &str =
        "id, name, max_uses, uses, expires_at, revoked_at, created_at, serials, device_policy";

    pub async fn tokens(&self) -> Result<Vec<Token>> {
        let sql = format!("SELECT {} FROM tokens ORDER BY id", Self::TOKEN_COLUMNS);
        self.pool
            .query(&sql, args![])
            .await?
            .iter()
            .map(Self::token_from_row)
            .collect()
    }

    pub async fn token_by_secret(&self, token: &str) -> Result<Option<Token>> {
        let sql = format!(
            "SELECT {} FROM tokens WHERE sha256 = $1",
            Self::TOKEN_COLUMNS
        );
        self.pool
            .query_opt(&sql, args![token_hash(token)])
            .await?
            .as_ref()
            .map(Self::token_from_row)
            .transpose()
    }

    pub async fn issued(&self, serial: &str) -> Result<Option<Issued>> {
        let row = self
            .pool
            .query_opt(
                "SELECT activation_id, hostname, image_sha256, expires_at, used, code_sealed
                 FROM activations WHERE serial = $1",
                args![serial],
            )
            .await?;
        row.map(|r| {
            Ok(Issued {
                activation_id: r.text(0)?,
                hostname: r.opt_text(1)?,
                image_sha256: r.opt_text(2)?,
                expires_at: r.int(3)?,
                used: r.bool(4)?,
                code_sealed: r.opt_text(5)?,
            })
        })
        .transpose()
    }

    /// One request per serial at a time, on every broker sharing the database.
    pub async fn lock_serial(&self, serial: &str) -> Result<SerialGuard> {
        locks::lock(self.lock_pool.as_ref(), &self.local_locks, serial).await
    }

    /// Counts one enrollment against the token if it has any left: one
    /// conditional UPDATE, so two brokers cannot both take the last one.
    pub async fn reserve_use(&self, token: &Token) -> Result<bool> {
        let changed = self
            .pool
            .execute(
                "UPDATE tokens SET uses = uses + 1
                 WHERE id = $1 AND (max_uses IS NULL OR uses < max_uses)",
                args![token.id],
            )
            .await?;
        Ok(changed == 1)
    }

    /// Gives back a reserved enrollment that did not result in an activation.
    pub async fn release_use(&self, token: &Token) -> Result<()> {
        self.pool
            .execute(
                "UPDATE tokens SET uses = uses - 1 WHERE id = $1 AND uses > 0",
                args![token.id],
            )
            .await?;
        Ok(())
    }

    /// Announces an activation about to be made for `serial`: it may be
    /// recorded until `lease_secs` from now on the database's clock, and a
    /// clean-up leaves it alone until then. Returns the issue's id (the
    /// activation carries it as a tag).
    pub async fn begin_issue(&self, serial: &str, lease_secs: i64) -> Result<String> {
        let issue_id = uuid::Uuid::new_v4().to_string();
        self.pool
            .execute(
                "INSERT INTO pending_issues (issue_id, serial, deadline)
                 VALUES ($1, $2, unixepoch() + $3)",
                args![issue_id.as_str(), serial, lease_secs],
            )
            .await?;
        Ok(issue_id)
    }

    /// Forgets an issue whose activation was not made.
    pub async fn abandon_issue(&self, issue_id: &str) -> Result<()> {
        self.pool
            .execute(
                "DELETE FROM pending_issues WHERE issue_id = $1",
                args![issue_id],
            )
            .await?;
        Ok(())
    }

    /// Records a new activation for a serial (replacing its previous one), in
    /// one transaction with its audit line, if its issue's deadline has not
    /// passed ([`LateIssue`] otherwise).
    pub async fn record_issue(&self, new: &NewIssue<'_>) -> Result<()> {
        let steps = vec![
            Step::must_change(
                "DELETE FROM pending_issues WHERE issue_id = $1 AND deadline > unixepoch()",
                args![new.issue_id],
            ),
            Step::new(
                "INSERT INTO activations (serial, activation_id, token_id, hostname, machine_id,
                     image_sha256, previous_instance_id, issued_at, expires_at, used, code_sealed)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, FALSE, $10)
                 ON CONFLICT(serial) DO UPDATE SET activation_id = excluded.activation_id,
                     token_id = excluded.token_id, hostname = excluded.hostname,
                     machine_id = excluded.machine_id, image_sha256 = excluded.image_sha256,
                     previous_instance_id = excluded.previous_instance_id,
                     issued_at = excluded.issued_at, expires_at = excluded.expires_at,
                     used = FALSE, code_sealed = excluded.code_sealed",
                args![
                    new.serial,
                    new.activation_id,
                    new.token_id,
                    new.hostname,
                    new.machine_id,
                    new.image_sha256,
                    new.previous_instance_id,
                    now(),
                    new.expires_at,
                    new.code_sealed
                ],
            ),
            Step::new(
                "INSERT INTO audit (at, token_id, client, action, serial, detail)
                 VALUES ($1, $2, $3, 'activation-issued', $4, $5)",
                args![
                    now(),
                    new.token_id,
                    new.client,
                    new.serial,
                    new.activation_id
                ],
            ),
        ];
        match self.pool.transaction(steps).await {
            Err(e) if e.is::<db::NothingChanged>() => Err(LateIssue.into()),
            other => other.map(drop),
        }
    }

    /// What a clean-up needs, read in one statement so it is one snapshot.
    pub async fn bookkeeping(&self) -> Result<Bookkeeping> {
        let rows = self
            .pool
            .query(
                "SELECT 'known', activation_id, 0 FROM activations
                 UNION ALL SELECT 'known', activation_id, 0 FROM registrations
                 UNION ALL SELECT 'pending', issue_id,
                     CASE WHEN deadline > unixepoch() THEN 1 ELSE 0 END FROM pending_issues",
                args![],
            )
            .await?;
        let mut books = Bookkeeping {
            known: HashSet::new(),
            pending: HashMap::new(),
        };
        for row in rows {
            if row.text(0)? == "known" {
                books.known.insert(row.text(1)?);
            } else {
                books.pending.insert(row.text(1)?, row.bool(2)?);
            }
        }
        Ok(books)
    }

    /// Drops issues past their deadline: they can no longer be recorded.
    pub async fn drop_late_issues(&self) -> Result<u64> {
        self.pool
            .execute(
                "DELETE FROM pending_issues WHERE deadline <= unixepoch()",
                args![],
            )
            .await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn record_registration(
        &self,
        serial: &str,
        instance_id: &str,
        activation_id: &str,
        previous: Option<&str>,
        deregistered_previous: bool,
        token_id: i64,
        client: &str,
    ) -> Result<()> {
        let steps = vec![
            Step::new(
                "INSERT INTO registrations (serial, instance_id, activation_id,
                     previous_instance_id, deregistered_previous, token_id, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT(instance_id) DO NOTHING",
                args![
                    serial,
                    instance_id,
                    activation_id,
                    previous,
                    deregistered_previous,
                    token_id,
                    now()
                ],
            ),
            // Used: the code has done its one job and leaves the database.
            Step::new(
                "UPDATE activations SET used = TRUE, code_sealed = NULL
                 WHERE serial = $1 AND activation_id = $2",
                args![serial, activation_id],
            ),
            Step::new(
                "INSERT INTO audit (at, token_id, client, action, serial, detail)
                 VALUES ($1, $2, $3, 'registered', $4, $5)",
                args![now(), token_id, client, serial, instance_id],
            ),
        ];
        self.pool.transaction(steps).await.map(drop)
    }

    /// A fresh single-use challenge for a card holding `token_id`; challenges
    /// gone stale a day ago are dropped on the way.
    pub async fn new_challenge(&self, token_id: i64, lifetime_secs: i64) -> Result<(String, i64)> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)?;
        let nonce = crate::hex::hex(&bytes);
        let expires_at = now() + lifetime_secs;
        self.pool
            .execute(
                "DELETE FROM challenges WHERE expires_at < $1",
                args![now() - 86_400],
            )
            .await?;
        self.pool
            .execute(
                "INSERT INTO challenges (nonce, token_id, expires_at) VALUES ($1, $2, $3)",
                args![nonce.as_str(), token_id, expires_at],
            )
            .await?;
        Ok((nonce, expires_at))
    }

    /// Spends a challenge: only once, only before it expires, only with the
    /// token it was given to.
    pub async fn take_challenge(&self, nonce: &str, token_id: i64) -> Result<ChallengeOutcome> {
        let row = self
            .pool
            .query_opt(
                "SELECT token_id, expires_at FROM challenges WHERE nonce = $1",
                args![nonce],
            )
            .await?;
        let Some(row) = row else {
            return Ok(ChallengeOutcome::Unknown);
        };
        let (owner, expires_at) = (row.int(0)?, row.int(1)?);
        // The conditional update is the single use, even with several writers.
        let taken = self
            .pool
            .execute(
                "UPDATE challenges SET used_at = $2 WHERE nonce = $1 AND used_at IS NULL",
                args![nonce, now()],
            )
            .await?;
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

    fn device_from_row(row: &Row) -> Result<Device> {
        let hex = row.text(1)?;
        let Some(key) = crate::hex::decode(&hex).and_then(|der| DeviceKey::from_der(&der)) else {
            bail!(
                "the key recorded for {} is not a P-256 public key",
                row.text(0)?
            );
        };
        Ok(Device {
            serial: row.text(0)?,
            fingerprint: key.fingerprint(),
            public_key: hex,
            key,
            source: row.text(2)?,
            added_at: row.int(3)?,
            last_seen_at: row.opt_int(4)?,
            revoked_at: row.opt_int(5)?,
        })
    }

    const DEVICE_COLUMNS: &str = "serial, public_key, source, added_at, last_seen_at, revoked_at";

    pub async fn device(&self, serial: &str) -> Result<Option<Device>> {
        let sql = format!(
            "SELECT {} FROM devices WHERE serial = $1",
            Self::DEVICE_COLUMNS
        );
        self.pool
            .query_opt(&sql, args![serial])
            .await?
            .as_ref()
            .map(Self::device_from_row)
            .transpose()
    }

    pub async fn devices(&self) -> Result<Vec<Device>> {
        let sql = format!(
            "SELECT {} FROM devices ORDER BY serial",
            Self::DEVICE_COLUMNS
        );
        self.pool
            .query(&sql, args![])
            .await?
            .iter()
            .map(Self::device_from_row)
            .collect()
    }

    /// Records the first key seen for a serial (trust on first use). False if
    /// the serial has a key already (another request won the race).
    pub async fn record_first_key(&self, serial: &str, key: &DeviceKey) -> Result<bool> {
        let added = self
            .pool
            .execute(
                "INSERT INTO devices (serial, public_key, source, added_at, last_seen_at)
                 VALUES ($1, $2, 'first-use', $3, $3) ON CONFLICT(serial) DO NOTHING",
                args![serial, key.hex(), now()],
            )
            .await?;
        Ok(added == 1)
    }

    pub async fn device_seen(&self, serial: &str) -> Result<()> {
        self.pool
            .execute(
                "UPDATE devices SET last_seen_at = $2 WHERE serial = $1",
                args![serial, now()],
            )
            .await?;
        Ok(())
    }

    /// Imports devices in one transaction: all or none. A serial already known
    /// with another key is refused unless `replace`; importing a revoked serial
    /// admits it again. Returns (added, replaced, unchanged).
    pub async fn import_devices(
        &self,
        devices: &[(String, DeviceKey)],
        replace: bool,
    ) -> Result<(usize, usize, usize)> {
        let mut tx = self.pool.begin().await?;
        let (mut added, mut replaced, mut unchanged) = (0, 0, 0);
        for (serial, key) in devices {
            let current = tx
                .query_opt(
                    "SELECT public_key, revoked_at FROM devices WHERE serial = $1",
                    args![serial],
                )
                .await?
                .map(|r| Ok::<_, anyhow::Error>((r.text(0)?, r.opt_int(1)?)))
                .transpose()?;
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
                 VALUES ($1, $2, 'imported', $3)
                 ON CONFLICT(serial) DO UPDATE SET public_key = excluded.public_key,
                     source = 'imported', added_at = excluded.added_at, revoked_at = NULL",
                args![serial, key.hex(), now()],
            )
            .await?;
        }
        tx.execute(
            "INSERT INTO audit (at, client, action, detail) VALUES ($1, 'cli', 'device-import', $2)",
            args![
                now(),
                format!("{added} added, {replaced} replaced, {unchanged} unchanged")
            ],
        )
        .await?;
        tx.commit().await?;
        Ok((added, replaced, unchanged))
    }

    pub async fn revoke_device(&self, serial: &str) -> Result<()> {
        let changed = self
            .pool
            .execute(
                "UPDATE devices SET revoked_at = $2 WHERE serial = $1 AND revoked_at IS NULL",
                args![serial, now()],
            )
            .await?;
        if changed == 0 {
            bail!("no unrevoked device with serial {serial:?}");
        }
        self.audit(None, "cli", "device-revoke", Some(serial), serial)
            .await
    }

    /// Whether this token already paid for an enrollment of this serial (it registered).
    pub async fn enrolled_with(&self, serial: &str, token_id: i64) -> Result<bool> {
        Ok(self
            .pool
            .query_opt(
                "SELECT 1 FROM registrations WHERE serial = $1 AND token_id = $2 LIMIT 1",
                args![serial, token_id],
            )
            .await?
            .is_some())
    }

    /// The node this serial registered as most recently, if any.
    pub async fn last_instance(&self, serial: &str) -> Result<Option<String>> {
        self.pool
            .query_opt(
                "SELECT instance_id FROM registrations WHERE serial = $1 ORDER BY id DESC LIMIT 1",
                args![serial],
            )
            .await?
            .map(|r| r.text(0))
            .transpose()
    }

    /// A refused or noteworthy request, for the audit log.
    pub async fn audit(
        &self,
        token_id: Option<i64>,
        client: &str,
        action: &str,
        serial: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        self.pool
            .execute(
                "INSERT INTO audit (at, token_id, client, action, serial, detail)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                args![now(), token_id, client, action, serial, detail],
            )
            .await?;
        Ok(())
    }

    /// Drops audit lines written before `before` (unix seconds), then all but
    /// the newest `keep_rows`; returns how many went.
    pub async fn prune_audit(&self, before: i64, keep_rows: u64) -> Result<u64> {
        let old = self
            .pool
            .execute("DELETE FROM audit WHERE at < $1", args![before])
            .await?;
        let over = self
            .pool
            .execute(
                "DELETE FROM audit WHERE id <= \
                 (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET $1)",
                args![i64::try_from(keep_rows).unwrap_or(i64::MAX)],
            )
            .await?;
        Ok(old + over)
    }

    /// SQLite: writes the WAL back into the main file (on a clean shutdown).
    pub async fn checkpoint(&self) -> Result<()> {
        if !self.pool.is_postgres() {
            self.pool
                .query("PRAGMA wal_checkpoint(TRUNCATE)", args![])
                .await?;
        }
        Ok(())
    }
}
