//! `piprov broker`'s arguments.

use std::path::PathBuf;

use clap::Subcommand;

use crate::broker::device::DevicePolicy;

#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Create a broker: CA, server certificate, config and database in DIR
    Init {
        /// A new or empty directory
        dir: PathBuf,
        /// DNS name or IP address the cards reach the broker by (repeatable)
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Address to listen on
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// AWS region the broker creates activations in, e.g. eu-west-1
        #[arg(long)]
        region: String,
        /// IAM service role the registered nodes assume
        #[arg(long)]
        iam_role: String,
        /// Where the broker keeps its records: `sqlite` (a file in DIR, for one
        /// broker) or a PostgreSQL URL, postgres://USER@HOST/DATABASE, for any
        /// number of brokers (the password from PGPASSWORD or, later,
        /// database_password_file in broker.toml; never printed)
        #[arg(long, value_name = "sqlite|URL", value_parser = parse_database)]
        database: Option<String>,
        /// With `?sslmode=require` in the URL: the CA (PEM) the server's
        /// certificate must chain to, e.g. RDS's global-bundle.pem (default: the
        /// system's roots). Without sslmode=require the connection is plain TCP.
        #[arg(long, value_name = "FILE", requires = "database")]
        database_ca_file: Option<PathBuf>,
    },
    /// Enrollment tokens: add (shown once), list, revoke
    Token {
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Device keys of known Pis (for tokens with --device-policy known or tofu)
    Device {
        #[command(subcommand)]
        action: DeviceCommand,
    },
    /// Serve the card API over HTTPS until SIGTERM or Ctrl-C
    Serve {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// Write the address actually listened on to this file once ready
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
        /// Listen here instead of the config's address (several brokers from one
        /// config on one host, each on its own port)
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// The log on stderr: one line per request with its id, as text or JSON lines
        #[arg(long, value_enum, default_value = "text")]
        log_format: crate::broker::request_log::LogFormat,
    },
}

/// `sqlite` is the default file; anything else must be a PostgreSQL URL.
fn parse_database(text: &str) -> std::result::Result<String, String> {
    if text == "sqlite" || crate::broker::store::is_postgres_url(text) {
        return Ok(text.to_string());
    }
    Err("`sqlite`, or a URL postgres://USER@HOST[:PORT]/DATABASE".into())
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed (or written to --token-file) this once
    Add {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// The token's name (letters, digits, - and _), as `token list` shows it
        #[arg(long)]
        name: String,
        /// How many activations it may obtain (required, or --unlimited)
        #[arg(long, required_unless_present = "unlimited")]
        max_uses: Option<u32>,
        /// Lifetime, e.g. 30d (required, or --unlimited)
        #[arg(long, value_parser = humantime::parse_duration, required_unless_present = "unlimited")]
        expires: Option<std::time::Duration>,
        /// Let the limit left out (--max-uses or --expires, or both) be
        /// unlimited: a token anyone who copies it can use for ever, if both
        #[arg(long)]
        unlimited: bool,
        /// Only these Pi serials (one per line) may enrol with it
        #[arg(long, value_name = "FILE")]
        serials: Option<PathBuf>,
        /// Write the token to this new file (mode 0600) instead of printing it
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// What a card must prove with its Pi's device key (rpi-fw-crypto) to enrol
        #[arg(long, value_enum, default_value_t = DevicePolicy::Off)]
        device_policy: DevicePolicy,
    },
    /// List the tokens: name, uses, expiry, revoked, devices (never a token itself)
    List {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: cards that present it get no activation from then on
    Revoke {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// The token's name
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Import Pis' public keys from a CSV of `serial,public_key`
    #[command(
        long_about = "Import the public keys of Pis that may enrol under a token with \
        --device-policy known. FILE is CSV, one Pi per line: its serial and the public key \
        of its OTP device key (key 1) as hex or base64 of the DER SubjectPublicKeyInfo, as \
        `rpi-fw-crypto pubkey --key-id 1 --outform hex` prints it on that Pi. A header line \
        `serial,public_key` and `#` comments are allowed. All lines are imported or none: a \
        serial already recorded with another key stops the import unless --replace. \
        Importing a revoked serial admits it again.",
        after_help = "Examples:\n  piprov broker device import --config broker.toml pis.csv"
    )]
    Import {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// CSV of serial,public_key
        file: PathBuf,
        /// Replace the recorded key of a serial that has another one (a board swapped)
        #[arg(long)]
        replace: bool,
    },
    /// Recorded devices: serial, key fingerprint, imported or first use, last seen
    List {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Refuse a Pi from now on, under every device policy but off
    Revoke {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// The Pi's serial
        serial: String,
    },
}
