//! Versioned migrations, run when the broker opens its database: each applied
//! once, in order, in one transaction with its entry in `schema_version`. Two
//! brokers starting at once on PostgreSQL take turns (an advisory lock).

use anyhow::{Context, Result, bail};

use super::db::{Pool, args};

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
async fn add_device_policy(tx: &mut super::db::Txn) -> Result<()> {
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
