//! Versioned migrations, run when the broker opens its database: each applied
//! once, in order, in one transaction with its entry in `schema_version`. Two
//! brokers starting at once on PostgreSQL take turns (an advisory lock).

use anyhow::{Context, Result, bail};

use crate::sql::db::{Pool, args};

/// (version, SQL) in order; SQLite's and PostgreSQL's lists keep step.
const SQLITE: &[(i64, &str)] = &[
    (1, include_str!("migrations/sqlite/1-initial.sql")),
    (2, include_str!("migrations/sqlite/2-shared-issues.sql")),
];
const POSTGRES: &[(i64, &str)] = &[
    (1, include_str!("migrations/postgres/1-initial.sql")),
    (2, include_str!("migrations/postgres/2-shared-issues.sql")),
];

/// Any constant: the key PostgreSQL's advisory lock for migrations is taken on.
const MIGRATION_LOCK: i64 = 0x7069_7072_6f76_0001;

pub async fn run(pool: &Pool) -> Result<()> {
    let steps = if pool.is_postgres() { POSTGRES } else { SQLITE };
    let mut tx = pool.begin().await?;
    if pool.is_postgres() {
        tx.execute("SELECT pg_advisory_xact_lock($1)", args![MIGRATION_LOCK])
            .await?;
    }
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        args![],
    )
    .await?;
    let current = tx
        .query_opt("SELECT MAX(version) FROM schema_version", args![])
        .await?
        .map(|r| r.opt_int(0))
        .transpose()?
        .flatten()
        .unwrap_or(0);
    let newest = steps.last().map_or(0, |s| s.0);
    if current > newest {
        bail!(
            "the database is at schema version {current}, made by a newer piprov (this one knows {newest})"
        );
    }
    for (version, sql) in steps.iter().filter(|(v, _)| *v > current) {
        tx.batch(sql)
            .await
            .with_context(|| format!("schema migration {version}"))?;
        if *version == 1 && !pool.is_postgres() {
            add_device_policy(&mut tx).await?;
        }
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
            args![*version, super::now()],
        )
        .await?;
    }
    tx.commit().await
}

/// A database from the first release has no device_policy column; later ones
/// made before versioned migrations have it.
async fn add_device_policy(tx: &mut crate::sql::db::Txn) -> Result<()> {
    let has = tx
        .query_opt(
            "SELECT COUNT(*) FROM pragma_table_info('tokens') WHERE name = 'device_policy'",
            args![],
        )
        .await?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or(0)
        > 0;
    if !has {
        tx.batch("ALTER TABLE tokens ADD COLUMN device_policy TEXT NOT NULL DEFAULT 'off'")
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Location, Store};
    use crate::broker::device::DevicePolicy;

    /// The first release's tables, as a broker made then left them.
    const FIRST_RELEASE: &str = "
        CREATE TABLE tokens (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            sha256 TEXT NOT NULL UNIQUE, max_uses INTEGER, uses INTEGER NOT NULL DEFAULT 0,
            expires_at INTEGER, revoked_at INTEGER, serials TEXT, created_at INTEGER NOT NULL);
        CREATE TABLE activations (serial TEXT PRIMARY KEY, activation_id TEXT NOT NULL UNIQUE,
            token_id INTEGER NOT NULL REFERENCES tokens(id), hostname TEXT, machine_id TEXT,
            image_sha256 TEXT, previous_instance_id TEXT, issued_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0);
        INSERT INTO tokens (name, sha256, uses, created_at) VALUES ('site-a', 'ab', 2, 1);
        INSERT INTO activations (serial, activation_id, token_id, issued_at, expires_at, used)
            VALUES ('10000000abcdef01', 'act-1', 1, 1, 2, 1);";

    #[test]
    fn a_database_from_the_first_release_is_brought_up_to_date_and_keeps_its_records() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("broker.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(FIRST_RELEASE)
            .unwrap();
        let location = Location::Sqlite(path.clone());
        crate::runtime::block_on(async {
            let store = Store::open(&location, 2).await?;
            let tokens = store.tokens().await?;
            assert_eq!(tokens.len(), 1);
            assert_eq!((tokens[0].name.as_str(), tokens[0].uses), ("site-a", 2));
            assert_eq!(tokens[0].device_policy, DevicePolicy::Off);
            let issued = store.issued("10000000abcdef01").await?.unwrap();
            assert!(issued.used && issued.code_sealed.is_none());
            assert!(store.begin_issue("10000000abcdef02", 30).await?.len() > 30);
            Ok(())
        })
        .unwrap();
        // Opened again, as the next command would: nothing to do, nothing lost.
        crate::runtime::block_on(async {
            let again = Store::open(&location, 1).await?;
            assert_eq!(again.tokens().await?.len(), 1);
            Ok(())
        })
        .unwrap();
        let versions: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(versions, 2);
    }
}
