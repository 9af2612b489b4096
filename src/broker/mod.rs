//! `piprov broker`: holds the AWS credentials and hands each card that proves
//! membership (an enrollment token) a single-use, short-lived activation, so no
//! secret that matters lives on a card.
//!
//! config (broker.toml) → init (CA, certificate, vend key, database) → store
//! (SQLite or PostgreSQL) → api (the broker's state and the gate: rate limit,
//! token, serial) → request (what a card sends, checked) → device_check (what a
//! token's device policy asks; device: the proofs) → issue, register (the two
//! card steps; sealing: codes kept for retries) → routes (the HTTP API;
//! request_log: one line per request) → server (HTTPS, graceful shutdown;
//! connections: limits and descriptor exhaustion; cleanup: activations made
//! but never recorded) → tokens (made, shown once).

pub mod api;
mod cleanup;
pub mod config;
mod connections;
pub mod device;
mod device_check;
pub mod init;
mod issue;
mod rate;
mod register;
mod request;
pub mod request_log;
mod routes;
pub mod sealing;
pub mod server;
pub mod store;
pub mod tokens;

/// Runs one database job from a command-line verb (init, token, device).
pub fn block_on<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(work);
    // The SQLite pool closes its connections on blocking threads once the work
    // is done; dropping the runtime would wait for them without limit. What
    // they close is already committed.
    runtime.shutdown_timeout(BACKGROUND_CLOSE_WAIT);
    result
}

/// How long a command waits, once its work is done, for work left on blocking
/// threads (the pool's connection closes).
const BACKGROUND_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// A blocking task that goes on (a connection close held up) does not
    /// hold up the command: it returns once BACKGROUND_CLOSE_WAIT has passed.
    #[test]
    fn a_command_does_not_wait_without_limit_for_its_blocking_threads() {
        let started = Instant::now();
        let answer = super::block_on(async {
            // Long enough past the limit to tell the two apart.
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(30)));
            Ok(42)
        })
        .unwrap();
        assert_eq!(answer, 42);
        let took = started.elapsed();
        assert!(
            took < super::BACKGROUND_CLOSE_WAIT + Duration::from_secs(5),
            "the command took {took:?}"
        );
    }
}
