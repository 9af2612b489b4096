//! One lock per Pi serial in this process (SQLite: one broker serves the file),
//! so that a card's retry racing its original request gets the same activation,
//! never a second one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Past this many serials the map drops the locks nobody holds or waits for;
/// without it, it kept one entry for every serial the broker had ever seen.
const PRUNE_AT: usize = 1024;

type SerialLock = Arc<tokio::sync::Mutex<()>>;
pub type LocalGuard = tokio::sync::OwnedMutexGuard<()>;

#[derive(Default)]
pub struct SerialLocks(Mutex<HashMap<String, SerialLock>>);

impl SerialLocks {
    /// The lock for `serial`: the same one for every request that holds or
    /// awaits it at the same time. The map is only touched here, never across
    /// an await or a call that can panic, so a poisoned lock is taken back.
    pub fn get(&self, serial: &str) -> SerialLock {
        let mut locks = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if locks.len() >= PRUNE_AT {
            // The map's own reference is the only one left: no request has it.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks.entry(serial.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(locks: &SerialLocks) -> usize {
        locks
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    #[test]
    fn locks_in_use_are_kept_and_the_rest_do_not_pile_up() {
        let locks = SerialLocks::default();
        let held = locks.get("10000000abcdef01");
        for n in 0..5 * PRUNE_AT {
            drop(locks.get(&format!("{n:016x}")));
        }
        assert!(kept(&locks) <= PRUNE_AT, "{} locks kept", kept(&locks));
        assert!(Arc::ptr_eq(&held, &locks.get("10000000abcdef01")));
        let other = locks.get("10000000abcdef02");
        assert!(!Arc::ptr_eq(&held, &other));
    }
}
