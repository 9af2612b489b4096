//! The SQL store both servers keep their rows in: an SQLite file or a
//! PostgreSQL database, one statement text for both (`db`), and where the
//! database is (`location`: a path or a `postgres://` URL, its password and
//! TLS). The broker keeps its tokens and activations here; the station, its
//! record of the cards it made, so several benches can share one record.

pub mod db;
pub mod location;

pub use location::{Location, is_postgres_url};
