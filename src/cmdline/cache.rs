//! `piprov cache`'s arguments.

use std::time::Duration;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: CacheAction,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// List the decoded images, the archives that decode to each, and the space taken
    List {
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Remove decoded images (and what points at them); running decodes are left alone
    Clear {
        /// Only images not used for this long (e.g. 30d); without it, everything
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}
