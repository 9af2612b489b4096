//! How many connections the broker holds, and what it does when the machine
//! has no descriptor left. Anyone who reaches the port can open sockets without
//! a token; without these limits idle sockets take every descriptor, `accept`
//! fails at once in a loop (a core burnt, a log line each time) and real cards
//! time out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept for everything but client connections: the listener, the
/// runtime, the database pool and its files, the connections to SSM.
const RESERVED_DESCRIPTORS: u64 = 48;

/// A single address never holds more than this many connections (nor more
/// than a quarter of all), so one client cannot take every slot.
const MAX_PER_ADDRESS: usize = 32;

/// The upper bound of all connections at once, whatever the descriptor limit.
const MAX_CONNECTIONS: u64 = 16_384;

/// A failed `accept` is retried after this, doubling up to `ACCEPT_BACKOFF_MAX`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The same trouble is logged at most once in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Raises the soft descriptor limit to the hard one (systemd and shells start
/// services at 1024) and returns it.
pub fn raise_descriptor_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("could not raise the descriptor limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("could not read the descriptor limit: {e}");
            1024
        }
    }
}

/// The connection limits for a descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total: usize,
    pub per_address: usize,
}

impl Limits {
    pub fn for_descriptors(descriptors: u64) -> Self {
        let total = descriptors
            .saturating_sub(RESERVED_DESCRIPTORS)
            .max(descriptors / 4)
            .clamp(1, MAX_CONNECTIONS) as usize;
        Self {
            total,
            per_address: (total / 4).clamp(1, MAX_PER_ADDRESS),
        }
    }
}

/// Connections held per client address; an entry goes when its last
/// connection does, so the map never outgrows the connections themselves.
#[derive(Clone, Default)]
pub struct PerAddress {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's place in `PerAddress`, given back when dropped.
pub struct Slot {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl PerAddress {
    /// A slot for one more connection from `address`, or None when it holds `limit`.
    pub fn admit(&self, address: IpAddr, limit: usize) -> Option<Slot> {
        let mut held = self.held.lock().expect("no panic holds this lock");
        let count = held.entry(address).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            held: self.held.clone(),
            address,
        })
    }

    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("no panic holds this lock");
        if let Some(count) = held.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

/// One kind of trouble, logged at most once per `LOG_INTERVAL` with how often
/// it happened since.
pub struct Quiet {
    what: &'static str,
    last: Option<Instant>,
    since: u64,
}

impl Quiet {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            last: None,
            since: 0,
        }
    }

    pub fn note(&mut self, detail: &dyn std::fmt::Display) {
        self.since += 1;
        if self.last.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
            tracing::warn!(
                "{}: {detail} ({} times in the last interval)",
                self.what,
                self.since
            );
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// The wait after a failed `accept`: doubling while it keeps failing (EMFILE
/// does until a connection ends), back to the start after a success.
pub struct AcceptBackoff(Duration);

impl AcceptBackoff {
    pub fn new() -> Self {
        Self(ACCEPT_BACKOFF_MIN)
    }

    pub fn failed(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(ACCEPT_BACKOFF_MAX);
        wait
    }

    pub fn succeeded(&mut self) {
        self.0 = ACCEPT_BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_descriptors_for_the_broker_and_share_among_addresses() {
        assert_eq!(
            Limits::for_descriptors(1024),
            Limits {
                total: 976,
                per_address: 32
            }
        );
        assert_eq!(
            Limits::for_descriptors(60),
            Limits {
                total: 15,
                per_address: 3
            }
        );
        assert_eq!(Limits::for_descriptors(1).total, 1);
        assert_eq!(Limits::for_descriptors(1 << 20).total, 16_384);
    }

    #[test]
    fn an_address_holds_its_limit_and_its_entry_goes_with_its_last_slot() {
        let per = PerAddress::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let first = per.admit(a, 2).unwrap();
        let second = per.admit(a, 2).unwrap();
        assert!(per.admit(a, 2).is_none());
        let other = per.admit(b, 2).unwrap();
        drop(first);
        let third = per.admit(a, 2).unwrap();
        drop((second, third, other));
        assert_eq!(per.addresses(), 0);
    }

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = AcceptBackoff::new();
        let waits: Vec<Duration> = (0..9).map(|_| backoff.failed()).collect();
        assert_eq!(waits[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(waits[1], ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(waits[8], ACCEPT_BACKOFF_MAX);
        backoff.succeeded();
        assert_eq!(backoff.failed(), ACCEPT_BACKOFF_MIN);
    }
}
