//! Token buckets: so many requests a minute per key (a client address, an
//! enrollment token), refilled continuously. Buckets idle for a minute are full
//! again and are dropped, so the map holds only the keys seen in the last minute.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bucket idle this long has refilled whole: dropping it changes nothing.
const REFILL: Duration = Duration::from_secs(60);

pub struct RateLimiter<K> {
    per_minute: f64,
    state: Mutex<State<K>>,
}

struct State<K> {
    buckets: HashMap<K, (f64, Instant)>,
    pruned: Instant,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: f64::from(per_minute),
            state: Mutex::new(State {
                buckets: HashMap::new(),
                pruned: Instant::now(),
            }),
        }
    }

    /// Whether `key` has a request left, without spending it.
    pub fn has_room(&self, key: &K) -> bool {
        self.level(key, 0.0) >= 1.0
    }

    /// Spends one request of `key`'s; false when there was none left.
    pub fn spend(&self, key: &K) -> bool {
        self.level(key, 1.0) >= 0.0
    }

    /// Refills `key`'s bucket to now, takes `cost` when it holds that much,
    /// and returns what is left (negative: there was not enough).
    fn level(&self, key: &K, cost: f64) -> f64 {
        // Held for arithmetic only, never across an await or a call that can
        // panic: a poisoned lock is taken back.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(state.pruned) >= REFILL {
            state
                .buckets
                .retain(|_, (_, last)| now.duration_since(*last) < REFILL);
            state.pruned = now;
        }
        let per_minute = self.per_minute;
        let (tokens, last) = state
            .buckets
            .entry(key.clone())
            .or_insert((per_minute, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * per_minute / 60.0).min(per_minute);
        *last = now;
        if *tokens < cost {
            return -1.0;
        }
        *tokens -= cost;
        *tokens
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.state.lock().unwrap().buckets.len()
    }

    #[cfg(test)]
    fn age(&self, by: Duration) {
        let mut state = self.state.lock().unwrap();
        state.pruned -= by;
        for (_, last) in state.buckets.values_mut() {
            *last -= by;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_its_rate_and_others_are_not_touched() {
        let limiter = RateLimiter::new(3);
        for _ in 0..3 {
            assert!(limiter.spend(&"a"));
        }
        assert!(!limiter.spend(&"a"));
        assert!(!limiter.has_room(&"a"));
        assert!(limiter.has_room(&"b") && limiter.spend(&"b"));
    }

    #[test]
    fn idle_buckets_are_dropped_and_come_back_full() {
        let limiter = RateLimiter::new(2);
        for key in 0..1000 {
            limiter.spend(&key);
        }
        assert_eq!(limiter.keys(), 1000);
        limiter.age(REFILL);
        assert!(limiter.spend(&7), "a dropped bucket is full");
        assert_eq!(limiter.keys(), 1, "only the key seen since");
    }
}
