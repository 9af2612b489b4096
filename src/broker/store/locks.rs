//! One request per Pi serial at a time, across every broker on the database:
//! PostgreSQL's advisory locks (held by a connection, so a broker killed while
//! holding one loses it with its connection), or, on SQLite, where one broker
//! serves the file, a lock in this process.

use anyhow::Result;

use super::local_locks::{LocalGuard, SerialLocks};
use crate::sql::db::{Conn, Pool, args};

/// Held while a request works for one serial; [`SerialGuard::release`] ends it.
pub enum SerialGuard {
    Local(LocalGuard),
    Advisory(Option<Box<Conn>>),
}

/// The advisory lock's key: a 64-bit hash of the serial, in its own namespace.
const KEY: &str = "hashtextextended('piprov-serial:' || $1, 0)";

pub async fn lock(
    lock_pool: Option<&Pool>,
    local: &SerialLocks,
    serial: &str,
) -> Result<SerialGuard> {
    let Some(pool) = lock_pool else {
        return Ok(SerialGuard::Local(local.get(serial).lock_owned().await));
    };
    let mut conn = pool.get().await?;
    conn.execute(&format!("SELECT pg_advisory_lock({KEY})"), args![serial])
        .await?;
    Ok(SerialGuard::Advisory(Some(Box::new(conn))))
}

impl SerialGuard {
    pub async fn release(mut self, serial: &str) {
        if let SerialGuard::Advisory(conn) = &mut self {
            let mut conn = conn.take().expect("held");
            let unlocked = conn
                .execute(&format!("SELECT pg_advisory_unlock({KEY})"), args![serial])
                .await;
            if unlocked.is_err() {
                // The lock dies with the connection.
                conn.discard();
            }
        }
    }
}

impl Drop for SerialGuard {
    /// Not released (an early return, a panic): closing the connection is what
    /// frees the lock, rather than handing a locked connection to the pool.
    fn drop(&mut self) {
        if let SerialGuard::Advisory(conn) = self {
            if let Some(conn) = conn.take() {
                conn.discard();
            }
        }
    }
}
