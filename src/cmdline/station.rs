//! `piprov station`'s arguments.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::AwsArgs;
use crate::station::record::Place;

#[derive(Debug, Subcommand)]
pub enum StationAction {
    /// Print the station's record: one row per card
    Record {
        /// The record: an SQLite file, or a postgres:// URL
        #[arg(long, value_name = "DB", default_value = "station.db")]
        record: Place,
        /// Print JSON
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print CSV
        #[arg(long)]
        csv: bool,
    },
}

/// What a station writes, to which cards, and where it shows and keeps them
/// (or, with `record`, what it remembers).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct StationConfig {
    #[command(subcommand)]
    pub action: Option<StationAction>,
    /// Image: .img, .img.xz, .gz, .zst, .bz2 or .zip (decoded once)
    #[arg(required = true)]
    pub image: Option<PathBuf>,
    /// Recipe to stamp each card with
    #[arg(long, short, required = true)]
    pub recipe: Option<PathBuf>,
    /// Hostname pattern ({number} = the card's number in this run, {serial}, {mac})
    #[arg(long)]
    pub hostname: Option<String>,
    /// Override a recipe setting (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Serve the bench's page and its JSON here (e.g. 127.0.0.1:8080); read-only
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The record, one row per card: an SQLite file, or a PostgreSQL database
    /// (postgres://USER@HOST/DB; the password from the URL or PGPASSWORD) that
    /// several benches share
    #[arg(long, value_name = "DB", default_value = "station.db")]
    pub record: Place,
    /// Only disks matching: a kernel name or /dev path glob (sd?, /dev/sd*), or a
    /// reader's stable path (/dev/disk/by-path/…); repeatable. A disk present at
    /// start is written only when named here
    #[arg(long = "match", value_name = "PATTERN")]
    pub matches: Vec<String>,
    /// Allow disks that do not report themselves removable
    #[arg(long)]
    pub allow_non_removable: bool,
    /// Write a card again that this run wrote already
    #[arg(long)]
    pub again: bool,
    /// One JSON line per card state change on stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

impl StationConfig {
    pub fn image(&self) -> &std::path::Path {
        self.image
            .as_deref()
            .expect("clap requires an image without a subcommand")
    }

    pub fn recipe(&self) -> &std::path::Path {
        self.recipe
            .as_deref()
            .expect("clap requires --recipe without a subcommand")
    }
}
