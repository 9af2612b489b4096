//! One SQL text for both databases. Statements use PostgreSQL's `$N`
//! placeholders (rewritten to SQLite's `?N`), values go in as [`Param`] and
//! rows come back as [`Row`]. Connections come from a deadpool pool either way,
//! so no database call blocks the runtime's threads: SQLite's run on tokio's
//! blocking pool, PostgreSQL's are async.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use deadpool::Runtime;
use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use deadpool_sync::SyncWrapper;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// How long a request waits for a free connection before it fails.
const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(10);

/// A value bound to a placeholder.
#[derive(Debug, Clone)]
pub enum Param {
    Int(Option<i64>),
    Text(Option<String>),
    Bool(bool),
}

impl From<i64> for Param {
    fn from(v: i64) -> Param {
        Param::Int(Some(v))
    }
}
impl From<Option<i64>> for Param {
    fn from(v: Option<i64>) -> Param {
        Param::Int(v)
    }
}
impl From<bool> for Param {
    fn from(v: bool) -> Param {
        Param::Bool(v)
    }
}
impl From<&str> for Param {
    fn from(v: &str) -> Param {
        Param::Text(Some(v.to_string()))
    }
}
impl From<String> for Param {
    fn from(v: String) -> Param {
        Param::Text(Some(v))
    }
}
impl From<&String> for Param {
    fn from(v: &String) -> Param {
        Param::Text(Some(v.clone()))
    }
}
impl From<Option<&str>> for Param {
    fn from(v: Option<&str>) -> Param {
        Param::Text(v.map(str::to_string))
    }
}
impl From<Option<String>> for Param {
    fn from(v: Option<String>) -> Param {
        Param::Text(v)
    }
}

/// The arguments of one statement, in placeholder order.
macro_rules! args {
    ($($value:expr),* $(,)?) => {
        vec![$($crate::sql::db::Param::from($value)),*]
    };
}
pub(crate) use args;

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Param::Int(v) => rusqlite::ToSql::to_sql(v),
            Param::Text(v) => rusqlite::ToSql::to_sql(v),
            Param::Bool(v) => rusqlite::ToSql::to_sql(v),
        }
    }
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // PostgreSQL infers each placeholder's type from the statement: a value
        // of another kind is an error here, never bytes misread there.
        match self {
            Param::Int(v) if *ty == Type::INT8 => v.to_sql(ty, out),
            Param::Int(v) if *ty == Type::INT4 => v.map(i32::try_from).transpose()?.to_sql(ty, out),
            Param::Text(v) if matches!(*ty, Type::TEXT | Type::VARCHAR) => v.to_sql(ty, out),
            Param::Bool(v) if *ty == Type::BOOL => v.to_sql(ty, out),
            other => Err(format!("{other:?} does not fit a parameter of type {ty}").into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8 | Type::INT4 | Type::TEXT | Type::VARCHAR | Type::BOOL
        )
    }

    to_sql_checked!();
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Null,
    Int(i64),
    Text(String),
    Bool(bool),
}

/// One result row, its columns by position.
#[derive(Debug)]
pub struct Row(Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value> {
        self.0.get(i).ok_or_else(|| anyhow!("no column {i}"))
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            Value::Bool(b) => Ok(Some(i64::from(*b))),
            Value::Text(_) => bail!("column {i} is text, not a number"),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?
            .ok_or_else(|| anyhow!("column {i} is NULL"))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(t) => Ok(Some(t.clone())),
            other => bail!("column {i} is {other:?}, not text"),
        }
    }

    pub fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?
            .ok_or_else(|| anyhow!("column {i} is NULL"))
    }

    /// SQLite keeps booleans as 0 and 1.
    pub fn bool(&self, i: usize) -> Result<bool> {
        Ok(self.int(i)? != 0)
    }

    fn from_sqlite(row: &rusqlite::Row, columns: usize) -> rusqlite::Result<Row> {
        use rusqlite::types::ValueRef;
        (0..columns)
            .map(|i| {
                Ok(match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Real(_) | ValueRef::Blob(_) => {
                        return Err(rusqlite::Error::InvalidColumnType(
                            i,
                            String::new(),
                            row.get_ref(i)?.data_type(),
                        ));
                    }
                })
            })
            .collect::<rusqlite::Result<_>>()
            .map(Row)
    }

    fn from_postgres(row: &tokio_postgres::Row) -> Result<Row> {
        (0..row.len())
            .map(|i| {
                let ty = row.columns()[i].type_();
                Ok(match *ty {
                    Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
                    Type::INT4 => row
                        .try_get::<_, Option<i32>>(i)?
                        .map(|v| Value::Int(v.into())),
                    Type::INT2 => row
                        .try_get::<_, Option<i16>>(i)?
                        .map(|v| Value::Int(v.into())),
                    Type::TEXT | Type::VARCHAR | Type::NAME => {
                        row.try_get::<_, Option<String>>(i)?.map(Value::Text)
                    }
                    Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(Value::Bool),
                    _ => bail!("column {i} has type {ty}, which the broker does not read"),
                }
                .unwrap_or(Value::Null))
            })
            .collect::<Result<_>>()
            .map(Row)
    }
}

/// `$1` → `?1`: SQLite numbers `$N` parameters by first appearance, not by N.
fn sqlite_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

/// SQLite connections for deadpool, each used on tokio's blocking threads.
/// Reuse checks only that no panic interrupted the last use: a connection never
/// goes back with a transaction open (see [`Txn`]), so no query is needed, where
/// deadpool-sqlite's manager runs one on every checkout.
pub struct SqliteManager {
    path: std::path::PathBuf,
    /// Opened read-only: nothing in the file changes.
    read_only: bool,
}

impl deadpool::managed::Manager for SqliteManager {
    type Type = SyncWrapper<rusqlite::Connection>;
    type Error = rusqlite::Error;

    async fn create(&self) -> Result<Self::Type, Self::Error> {
        let path = self.path.clone();
        let read_only = self.read_only;
        SyncWrapper::new(Runtime::Tokio1, move || {
            if read_only {
                let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
                let c = rusqlite::Connection::open_with_flags(path, flags)?;
                c.busy_timeout(Duration::from_secs(10))?;
                return Ok(c);
            }
            let c = rusqlite::Connection::open(path)?;
            c.busy_timeout(Duration::from_secs(10))?;
            // secure_delete: a used code's sealed bytes are overwritten, not
            // left in free pages.
            c.execute_batch(
                "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA secure_delete=ON;",
            )?;
            Ok(c)
        })
        .await
    }

    async fn recycle(&self, conn: &mut Self::Type, _: &Metrics) -> RecycleResult<Self::Error> {
        if conn.is_mutex_poisoned() {
            return Err(RecycleError::message("a panic interrupted its last use"));
        }
        Ok(())
    }
}

type SqlitePool = deadpool::managed::Pool<SqliteManager>;
type SqliteObject = deadpool::managed::Object<SqliteManager>;

/// Which database the broker keeps its records in.
#[derive(Clone)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(deadpool_postgres::Pool),
}

/// One pooled connection.
pub enum Conn {
    Sqlite(SqliteObject),
    Postgres(deadpool_postgres::Object),
}

/// One statement of a [`Pool::transaction`].
pub struct Step {
    sql: &'static str,
    args: Vec<Param>,
    /// The transaction stands only if this statement changes a row.
    must_change: bool,
}

impl Step {
    pub fn new(sql: &'static str, args: Vec<Param>) -> Step {
        Step {
            sql,
            args,
            must_change: false,
        }
    }

    pub fn must_change(sql: &'static str, args: Vec<Param>) -> Step {
        Step {
            sql,
            args,
            must_change: true,
        }
    }
}

/// The database holds token hashes, sealed codes, serials and client
/// addresses: the owner's alone. SQLite gives its -wal and -shm files the
/// database file's mode, so the file is made (or tightened) before it opens it.
fn restrict_to_owner(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the database {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))
}

/// A [`Step::must_change`] statement changed nothing: the transaction was rolled back.
#[derive(Debug, thiserror::Error)]
#[error("statement {0} of the transaction changed nothing")]
pub struct NothingChanged(pub usize);

impl Pool {
    /// SQLite in WAL mode; every connection waits out another's write lock.
    pub async fn sqlite(path: &Path, size: usize) -> Result<Pool> {
        restrict_to_owner(path)?;
        let opened = path.to_path_buf();
        let mode: String = tokio::task::spawn_blocking(move || {
            let conn = rusqlite::Connection::open(&opened)?;
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        })
        .await?
        .with_context(|| format!("opening the database {}", path.display()))?;
        if mode != "wal" {
            bail!("{}: could not switch to WAL (got {mode})", path.display());
        }
        let manager = SqliteManager {
            path: path.to_path_buf(),
            read_only: false,
        };
        Self::sqlite_pool(manager, size)
    }

    /// An existing SQLite file, read-only: reading it changes nothing in it,
    /// not even its journal mode.
    pub fn sqlite_read_only(path: &Path) -> Result<Pool> {
        if !path.is_file() {
            bail!("{} is not there", path.display());
        }
        let manager = SqliteManager {
            path: path.to_path_buf(),
            read_only: true,
        };
        Self::sqlite_pool(manager, 1)
    }

    fn sqlite_pool(manager: SqliteManager, size: usize) -> Result<Pool> {
        let pool = SqlitePool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT_FOR_CONNECTION))
            .create_timeout(Some(WAIT_FOR_CONNECTION))
            .build()?;
        Ok(Pool::Sqlite(pool))
    }

    pub fn postgres(
        config: tokio_postgres::Config,
        tls: &rustls::ClientConfig,
        size: usize,
    ) -> Result<Pool> {
        let manager = Manager::from_config(
            config,
            tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone()),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT_FOR_CONNECTION))
            .create_timeout(Some(WAIT_FOR_CONNECTION))
            .build()?;
        Ok(Pool::Postgres(pool))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Pool::Postgres(_))
    }

    pub async fn get(&self) -> Result<Conn> {
        Ok(match self {
            Pool::Sqlite(p) => Conn::Sqlite(
                p.get()
                    .await
                    .map_err(|e| anyhow!("the SQLite database: {e}"))?,
            ),
            Pool::Postgres(p) => Conn::Postgres(p.get().await.map_err(|e| match e {
                // tokio-postgres shows the server's message only as its source.
                deadpool_postgres::PoolError::Backend(e) => match e.as_db_error() {
                    Some(db) => anyhow!("PostgreSQL: {}: {}", db.severity(), db.message()),
                    None => {
                        // The cause (a certificate refused, a connection refused) is
                        // in the source chain, not in the message.
                        let mut text = format!("PostgreSQL: {e}");
                        let mut cause = std::error::Error::source(&e);
                        while let Some(c) = cause {
                            text.push_str(&format!(": {c}"));
                            cause = c.source();
                        }
                        anyhow!(text)
                    }
                },
                e => anyhow!("the PostgreSQL database: {e}"),
            })?),
        })
    }

    pub async fn execute(&self, sql: &str, args: Vec<Param>) -> Result<u64> {
        self.get().await?.execute(sql, args).await
    }

    pub async fn query(&self, sql: &str, args: Vec<Param>) -> Result<Vec<Row>> {
        self.get().await?.query(sql, args).await
    }

    pub async fn query_opt(&self, sql: &str, args: Vec<Param>) -> Result<Option<Row>> {
        Ok(self.query(sql, args).await?.into_iter().next())
    }

    /// Runs `steps` as one transaction, in one trip to SQLite's thread (one
    /// connection's round trips on PostgreSQL); the rows each changed. If a
    /// [`Step::must_change`] changes nothing, all is rolled back: [`NothingChanged`].
    pub async fn transaction(&self, steps: Vec<Step>) -> Result<Vec<u64>> {
        match self.get().await? {
            Conn::Sqlite(c) => c
                .interact(move |c| -> Result<Vec<u64>> {
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let mut changed = Vec::with_capacity(steps.len());
                    for (i, step) in steps.into_iter().enumerate() {
                        let n = tx
                            .prepare_cached(&sqlite_placeholders(step.sql))?
                            .execute(rusqlite::params_from_iter(step.args))?;
                        if step.must_change && n == 0 {
                            return Err(NothingChanged(i).into());
                        }
                        changed.push(n as u64);
                    }
                    tx.commit()?;
                    Ok(changed)
                })
                .await
                .map_err(|e| anyhow!("SQLite: {e}"))?,
            Conn::Postgres(mut c) => {
                // Dropped without commit (an error), tokio-postgres rolls it back.
                let tx = c.transaction().await?;
                let mut statements = Vec::with_capacity(steps.len());
                for step in &steps {
                    statements.push(tx.prepare_cached(step.sql).await?);
                }
                let refs: Vec<Vec<&(dyn ToSql + Sync)>> = steps
                    .iter()
                    .map(|s| s.args.iter().map(|a| a as &(dyn ToSql + Sync)).collect())
                    .collect();
                // Sent together, answered together: one round trip, not one per
                // statement. A failure aborts the rest, and the rollback undoes all.
                let changed = futures_util::future::try_join_all(
                    statements
                        .iter()
                        .zip(&refs)
                        .map(|(statement, args)| tx.execute(statement, args)),
                )
                .await?;
                if let Some(i) = steps
                    .iter()
                    .zip(&changed)
                    .position(|(step, n)| step.must_change && *n == 0)
                {
                    return Err(NothingChanged(i).into());
                }
                tx.commit().await?;
                Ok(changed)
            }
        }
    }

    /// A transaction: committed by [`Txn::commit`], rolled back otherwise.
    pub async fn begin(&self) -> Result<Txn> {
        let mut conn = self.get().await?;
        conn.batch(match conn {
            // IMMEDIATE: take the write lock now, not on the first write (a
            // reader upgrading later can deadlock against another writer).
            Conn::Sqlite(_) => "BEGIN IMMEDIATE",
            Conn::Postgres(_) => "BEGIN",
        })
        .await?;
        Ok(Txn { conn: Some(conn) })
    }
}

impl Conn {
    pub async fn execute(&mut self, sql: &str, args: Vec<Param>) -> Result<u64> {
        match self {
            Conn::Sqlite(c) => {
                let sql = sqlite_placeholders(sql);
                let changed = c
                    .interact(move |c| {
                        c.prepare_cached(&sql)?
                            .execute(rusqlite::params_from_iter(args))
                    })
                    .await
                    .map_err(|e| anyhow!("SQLite: {e}"))??;
                Ok(changed as u64)
            }
            Conn::Postgres(c) => {
                let statement = c.prepare_cached(sql).await?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                Ok(c.execute(&statement, &refs).await?)
            }
        }
    }

    pub async fn query(&mut self, sql: &str, args: Vec<Param>) -> Result<Vec<Row>> {
        match self {
            Conn::Sqlite(c) => {
                let sql = sqlite_placeholders(sql);
                c.interact(move |c| {
                    let mut statement = c.prepare_cached(&sql)?;
                    let columns = statement.column_count();
                    statement
                        .query_map(rusqlite::params_from_iter(args), |row| {
                            Row::from_sqlite(row, columns)
                        })?
                        .collect::<rusqlite::Result<Vec<Row>>>()
                })
                .await
                .map_err(|e| anyhow!("SQLite: {e}"))?
                .map_err(Into::into)
            }
            Conn::Postgres(c) => {
                let statement = c.prepare_cached(sql).await?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                c.query(&statement, &refs)
                    .await?
                    .iter()
                    .map(Row::from_postgres)
                    .collect()
            }
        }
    }

    /// Statements without parameters, as one batch (migrations, BEGIN, COMMIT).
    pub async fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Conn::Sqlite(c) => {
                let sql = sql.to_string();
                c.interact(move |c| c.execute_batch(&sql))
                    .await
                    .map_err(|e| anyhow!("SQLite: {e}"))??;
            }
            Conn::Postgres(c) => c.batch_execute(sql).await?,
        }
        Ok(())
    }

    /// Closes the connection instead of giving it back: whatever it held (a
    /// transaction left open, an advisory lock) ends with it.
    pub fn discard(self) {
        match self {
            Conn::Sqlite(c) => drop(SqliteObject::take(c)),
            Conn::Postgres(c) => drop(deadpool_postgres::Object::take(c)),
        }
    }
}

/// An open transaction. Dropped without [`Txn::commit`] (an error, a panic), its
/// connection is closed, which rolls it back: none of it lands.
pub struct Txn {
    conn: Option<Conn>,
}

impl Txn {
    fn conn_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a transaction not yet ended")
    }

    pub async fn execute(&mut self, sql: &str, args: Vec<Param>) -> Result<u64> {
        self.conn_mut().execute(sql, args).await
    }

    pub async fn query(&mut self, sql: &str, args: Vec<Param>) -> Result<Vec<Row>> {
        self.conn_mut().query(sql, args).await
    }

    pub async fn query_opt(&mut self, sql: &str, args: Vec<Param>) -> Result<Option<Row>> {
        Ok(self.query(sql, args).await?.into_iter().next())
    }

    pub async fn batch(&mut self, sql: &str) -> Result<()> {
        self.conn_mut().batch(sql).await
    }

    pub async fn commit(mut self) -> Result<()> {
        let mut conn = self.conn.take().expect("a transaction not yet ended");
        match conn.batch("COMMIT").await {
            Ok(()) => Ok(()),
            Err(e) => {
                conn.discard();
                Err(e)
            }
        }
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.discard();
        }
    }
}

/// Whether a statement failed on a UNIQUE constraint.
pub fn is_unique_violation(e: &anyhow::Error) -> bool {
    if let Some(rusqlite::Error::SqliteFailure(f, _)) = e.downcast_ref::<rusqlite::Error>() {
        return f.code == rusqlite::ErrorCode::ConstraintViolation;
    }
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|c| *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_for_sqlite() {
        assert_eq!(
            sqlite_placeholders("UPDATE t SET a = $2 WHERE b = $1 AND c = $10"),
            "UPDATE t SET a = ?2 WHERE b = ?1 AND c = ?10"
        );
        assert_eq!(sqlite_placeholders("SELECT '$x'"), "SELECT '$x'");
    }
}
