//! What the station remembers: one row per card, so that the bench lead can
//! ask the next morning which cards were made, from what, with which
//! activation, and how each ended. In an SQLite file (WAL), or in PostgreSQL
//! (the broker's store layer, `crate::sql`), where several benches keep one
//! record.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::runtime::block_on;
use crate::sql::db::{self, Pool, args};
use crate::sql::{Location, is_postgres_url};

/// Where a record is: an SQLite file, or a `postgres://` URL. Shown without
/// the URL's password.
#[derive(Clone)]
pub enum Place {
    File(PathBuf),
    Postgres(String),
}

impl std::str::FromStr for Place {
    type Err = String;

    fn from_str(s: &str) -> Result<Place, String> {
        if is_postgres_url(s) {
            // Checked here, so a bad URL is refused before anything starts.
            Location::parse(s, Path::new("."), None, None).map_err(|e| format!("{e:#}"))?;
            return Ok(Place::Postgres(s.to_string()));
        }
        if s.contains("://") {
            return Err(format!(
                "{s:?}: a record is an SQLite file or a postgres:// URL"
            ));
        }
        Ok(Place::File(PathBuf::from(s)))
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::File(path) => write!(f, "{}", path.display()),
            Place::Postgres(url) => match Location::parse(url, Path::new("."), None, None) {
                Ok(Location::Postgres { shown, .. }) => f.write_str(&shown),
                _ => f.write_str("a PostgreSQL database"),
            },
        }
    }
}

impl fmt::Debug for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One card's row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// The row's key, once written.
    #[serde(skip)]
    pub id: Option<i64>,
    pub run: String,
    /// The card's number in this run; none for a card that was not written.
    pub number: Option<u32>,
    pub hostname: Option<String>,
    pub device: String,
    /// The reader's stable path (`/dev/disk/by-path/…`), where there is one.
    pub reader: Option<String>,
    /// The card's own identity: its CID on an SD host, else the reader's serial.
    pub identity: Option<String>,
    pub size: u64,
    pub image_sha256: String,
    pub recipe: Option<String>,
    pub activation_id: Option<String>,
    /// The card failed and its unused activation was deleted again.
    pub activation_withdrawn: bool,
    pub started: String,
    pub finished: Option<String>,
    pub bytes: u64,
    pub verified: bool,
    /// `done`, `failed`, `refused` or `already done`.
    pub result: String,
    pub reason: Option<String>,
}

pub struct Record {
    /// Taken only by `drop`.
    pool: Option<Pool>,
}

impl Drop for Record {
    /// An SQLite connection closes on the runtime's blocking threads: the pool
    /// is dropped inside the runtime.
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let _ = block_on(async move {
                drop(pool);
                Ok(())
            });
        }
    }
}

/// The table, in SQLite's words and PostgreSQL's; one name for both.
const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cards (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    number INTEGER,
    hostname TEXT,
    device TEXT NOT NULL,
    reader TEXT,
    identity TEXT,
    size INTEGER NOT NULL,
    image_sha256 TEXT NOT NULL,
    recipe TEXT,
    activation_id TEXT,
    started TEXT NOT NULL,
    finished TEXT,
    bytes INTEGER NOT NULL,
    verified INTEGER NOT NULL,
    result TEXT NOT NULL,
    reason TEXT,
    activation_withdrawn INTEGER NOT NULL DEFAULT 0
);";

const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cards (
    id BIGSERIAL PRIMARY KEY,
    run TEXT NOT NULL,
    number INTEGER,
    hostname TEXT,
    device TEXT NOT NULL,
    reader TEXT,
    identity TEXT,
    size BIGINT NOT NULL,
    image_sha256 TEXT NOT NULL,
    recipe TEXT,
    activation_id TEXT,
    started TEXT NOT NULL,
    finished TEXT,
    bytes BIGINT NOT NULL,
    verified BOOLEAN NOT NULL,
    result TEXT NOT NULL,
    reason TEXT,
    activation_withdrawn BOOLEAN NOT NULL DEFAULT FALSE
);";

/// Any constant: benches preparing one PostgreSQL record at once take turns.
const RECORD_LOCK: i64 = 0x7069_7072_6f76_0002;

/// The columns after `id`, in the order `put` binds and `read` reads them.
const COLUMNS: &str = "run, number, hostname, device, reader, identity, size, image_sha256, \
recipe, activation_id, started, finished, bytes, verified, result, reason, activation_withdrawn";

impl Record {
    /// The record at `at`, made if it is not there yet.
    pub fn open(at: &Place) -> Result<Self> {
        block_on(async {
            let pool = match at {
                Place::File(path) => Pool::sqlite(path, 1).await?,
                Place::Postgres(url) => postgres(url)?,
            };
            prepare(&pool).await?;
            Ok(Self { pool: Some(pool) })
        })
        .with_context(|| format!("opening the station record {at}"))
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("taken only when dropped")
    }

    /// Writes a card's row, or its new state over the row written before.
    pub fn put(&self, row: &mut Row) -> Result<()> {
        let values = args![
            row.run.as_str(),
            row.number.map(i64::from),
            row.hostname.clone(),
            row.device.as_str(),
            row.reader.clone(),
            row.identity.clone(),
            row.size as i64,
            row.image_sha256.as_str(),
            row.recipe.clone(),
            row.activation_id.clone(),
            row.started.as_str(),
            row.finished.clone(),
            row.bytes as i64,
            row.verified,
            row.result.as_str(),
            row.reason.clone(),
            row.activation_withdrawn,
        ];
        block_on(async {
            match row.id {
                None => {
                    let sql = format!(
                        "INSERT INTO cards ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
                         $9, $10, $11, $12, $13, $14, $15, $16, $17) RETURNING id"
                    );
                    let made = self.pool().query_opt(&sql, values).await?;
                    row.id = Some(made.context("no id came back")?.int(0)?);
                }
                Some(id) => {
                    let sets: Vec<String> = COLUMNS
                        .split(", ")
                        .enumerate()
                        .map(|(i, column)| format!("{column} = ${}", i + 1))
                        .collect();
                    let sql = format!("UPDATE cards SET {} WHERE id = $18", sets.join(", "));
                    let mut values = values;
                    values.push(id.into());
                    self.pool().execute(&sql, values).await?;
                }
            }
            Ok(())
        })
        .context("writing the station record")
    }

    /// The identity (CID, reader serial) recorded for the card of `run` done
    /// as `hostname`: none when none was recorded, or no such card is done.
    pub fn identity_of(&self, run: &str, hostname: &str) -> Result<Option<String>> {
        block_on(async {
            let row = self
                .pool()
                .query_opt(
                    "SELECT identity FROM cards WHERE run = $1 AND hostname = $2 \
                     AND result = 'done' ORDER BY id DESC LIMIT 1",
                    args![run, hostname],
                )
                .await?;
            row.map(|r| r.opt_text(0)).transpose().map(Option::flatten)
        })
        .context("reading the station record")
    }

    /// The rows of the record at `at`. An SQLite file is opened read-only:
    /// printing or reconciling a record changes nothing in it (an older
    /// record is read as it is, its missing column as its default).
    pub fn read(at: &Place) -> Result<Vec<Row>> {
        if let Place::File(path) = at
            && !path.is_file()
        {
            bail!("no station record at {}", path.display());
        }
        block_on(async {
            let pool = match at {
                Place::File(path) => Pool::sqlite_read_only(path)?,
                Place::Postgres(url) => postgres(url)?,
            };
            let columns = if pool.is_postgres() || has_withdrawn_column(&pool).await? {
                COLUMNS.to_string()
            } else {
                COLUMNS.replace("activation_withdrawn", "0 AS activation_withdrawn")
            };
            let rows = pool
                .query(
                    &format!("SELECT id, {columns} FROM cards ORDER BY id"),
                    args![],
                )
                .await?;
            rows.iter().map(row_from).collect()
        })
        .with_context(|| format!("reading the station record {at}"))
    }
}

fn postgres(url: &str) -> Result<Pool> {
    let Location::Postgres {
        mut config, tls, ..
    } = Location::parse(url, Path::new("."), None, None)?
    else {
        bail!("not a PostgreSQL URL");
    };
    config.application_name("piprov-station");
    Pool::postgres(*config, &tls, 1)
}

/// The table made, or an older record's brought up to date.
async fn prepare(pool: &Pool) -> Result<()> {
    let mut tx = pool.begin().await?;
    if pool.is_postgres() {
        tx.execute("SELECT pg_advisory_xact_lock($1)", args![RECORD_LOCK])
            .await?;
        tx.batch(POSTGRES_SCHEMA).await?;
    } else {
        tx.batch(SQLITE_SCHEMA).await?;
        // A record begun by an earlier version lacks the newer column.
        let n = tx
            .query_opt(WITHDRAWN_COLUMN, args![])
            .await?
            .map(|r| r.int(0))
            .transpose()?
            .unwrap_or(0);
        if n == 0 {
            tx.batch(
                "ALTER TABLE cards ADD COLUMN activation_withdrawn INTEGER NOT NULL DEFAULT 0",
            )
            .await?;
        }
    }
    tx.commit().await
}

const WITHDRAWN_COLUMN: &str =
    "SELECT COUNT(*) FROM pragma_table_info('cards') WHERE name = 'activation_withdrawn'";

async fn has_withdrawn_column(pool: &Pool) -> Result<bool> {
    let n = pool
        .query_opt(WITHDRAWN_COLUMN, args![])
        .await?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or(0);
    Ok(n > 0)
}

fn row_from(r: &db::Row) -> Result<Row> {
    let number = r
        .opt_int(2)?
        .map(u32::try_from)
        .transpose()
        .context("a card number out of range")?;
    Ok(Row {
        id: Some(r.int(0)?),
        run: r.text(1)?,
        number,
        hostname: r.opt_text(3)?,
        device: r.text(4)?,
        reader: r.opt_text(5)?,
        identity: r.opt_text(6)?,
        size: r.int(7)? as u64,
        image_sha256: r.text(8)?,
        recipe: r.opt_text(9)?,
        activation_id: r.opt_text(10)?,
        started: r.text(11)?,
        finished: r.opt_text(12)?,
        bytes: r.int(13)? as u64,
        verified: r.bool(14)?,
        result: r.text(15)?,
        reason: r.opt_text(16)?,
        activation_withdrawn: r.bool(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record begun before `activation_withdrawn` existed is read as it is:
    /// the column reads false, and the file is left byte for byte.
    #[test]
    fn an_older_record_is_read_without_being_changed() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("old.db");
        let old_schema =
            SQLITE_SCHEMA.replace(",\n    activation_withdrawn INTEGER NOT NULL DEFAULT 0", "");
        assert_ne!(old_schema, SQLITE_SCHEMA);
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(&old_schema).unwrap();
        db.execute(
            "INSERT INTO cards (run, device, size, image_sha256, started, bytes, verified, result) \
             VALUES ('r', '/dev/sdb', 1, 'abc', 't', 0, 0, 'done')",
            [],
        )
        .unwrap();
        drop(db);
        let digest = |p: &Path| {
            use sha2::Digest;
            crate::hex::hex(&sha2::Sha256::digest(std::fs::read(p).unwrap()))
        };
        let before = digest(&path);
        let rows = Record::read(&Place::File(path.clone())).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].device, "/dev/sdb");
        assert!(!rows[0].activation_withdrawn);
        assert_eq!(digest(&path), before, "left as it was");
    }
}
