//! `piprov broker`: holds the AWS credentials and hands each card that proves
//! membership (an enrollment token) a single-use, short-lived activation, so no
//! secret that matters lives on a card.
//!
//! config (broker.toml) → init (CA, certificate, database) → store (SQLite) →
//! api (the card-facing routes; device: hardware-bound proofs, device_check:
//! what each policy asks of a request) →
//! server (HTTPS, graceful shutdown) → tokens (made, shown once).

pub mod api;
pub mod config;
pub mod device;
mod device_check;
pub mod init;
mod serial_locks;
pub mod server;
pub mod store;
pub mod tokens;
