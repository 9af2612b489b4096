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
