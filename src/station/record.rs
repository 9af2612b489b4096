//! What the station remembers: one row per card, in an SQLite file (WAL), so
//! that the bench lead can ask the next morning which cards were made, from
//! what, with which activation, and how each ended.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;

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
    db: Connection,
}

const SCHEMA: &str = "
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

/// The columns in the order `put` and `rows` use them, whatever order an
/// older record's table has them in.
const COLUMNS: &str = "id, run, number, hostname, device, reader, identity, size, image_sha256, \
recipe, activation_id, started, finished, bytes, verified, result, reason, activation_withdrawn";

impl Record {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path)
            .with_context(|| format!("opening the station record {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.execute_batch(SCHEMA)
            .with_context(|| format!("preparing the station record {}", path.display()))?;
        // A record begun by an earlier version lacks the newer columns.
        if !has_withdrawn_column(&db)? {
            db.execute_batch(
                "ALTER TABLE cards ADD COLUMN activation_withdrawn INTEGER NOT NULL DEFAULT 0",
            )
            .with_context(|| format!("updating the station record {}", path.display()))?;
        }
        Ok(Self { db })
    }

    /// Writes a card's row, or its new state over the row written before.
    pub fn put(&self, row: &mut Row) -> Result<()> {
        self.db
            .execute(
                &format!(
                    "INSERT OR REPLACE INTO cards ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, \
                     ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
                ),
                params![
                    row.id,
                    row.run,
                    row.number,
                    row.hostname,
                    row.device,
                    row.reader,
                    row.identity,
                    row.size as i64,
                    row.image_sha256,
                    row.recipe,
                    row.activation_id,
                    row.started,
                    row.finished,
                    row.bytes as i64,
                    row.verified,
                    row.result,
                    row.reason,
                    row.activation_withdrawn,
                ],
            )
            .context("writing the station record")?;
        row.id = Some(self.db.last_insert_rowid());
        Ok(())
    }

    /// The rows of the record at `path`, opened read-only: printing or
    /// reconciling a record changes nothing in it (an older record is read as
    /// it is, its missing columns as their defaults).
    pub fn read(path: &Path) -> Result<Vec<Row>> {
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening the station record {}", path.display()))?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        let columns = if has_withdrawn_column(&db)
            .with_context(|| format!("reading the station record {}", path.display()))?
        {
            COLUMNS.to_string()
        } else {
            COLUMNS.replace("activation_withdrawn", "0 AS activation_withdrawn")
        };
        Self { db }.select(&columns)
    }

    fn select(&self, columns: &str) -> Result<Vec<Row>> {
        let mut query = self
            .db
            .prepare(&format!("SELECT {columns} FROM cards ORDER BY id"))?;
        let rows = query.query_map([], |r| {
            Ok(Row {
                id: r.get(0)?,
                run: r.get(1)?,
                number: r.get(2)?,
                hostname: r.get(3)?,
                device: r.get(4)?,
                reader: r.get(5)?,
                identity: r.get(6)?,
                size: r.get::<_, i64>(7)? as u64,
                image_sha256: r.get(8)?,
                recipe: r.get(9)?,
                activation_id: r.get(10)?,
                started: r.get(11)?,
                finished: r.get(12)?,
                bytes: r.get::<_, i64>(13)? as u64,
                verified: r.get(14)?,
                result: r.get(15)?,
                reason: r.get(16)?,
                activation_withdrawn: r.get(17)?,
            })
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .context("reading the station record")
    }
}

fn has_withdrawn_column(db: &Connection) -> Result<bool> {
    let n: i64 = db.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('cards') WHERE name = 'activation_withdrawn'",
        [],
        |r| r.get(0),
    )?;
    Ok(n > 0)
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
            SCHEMA.replace(",\n    activation_withdrawn INTEGER NOT NULL DEFAULT 0", "");
        assert_ne!(old_schema, SCHEMA);
        let db = Connection::open(&path).unwrap();
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
        let rows = Record::read(&path).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].device, "/dev/sdb");
        assert!(!rows[0].activation_withdrawn);
        assert_eq!(digest(&path), before, "left as it was");
    }
}
