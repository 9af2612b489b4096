//! `broker.toml`: where the broker listens, its certificate, its database, and
//! the activations it vends. Written by `piprov broker init`; unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::sealing::VendKey;
use super::store::{Location, Store};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address and port to listen on, e.g. "0.0.0.0:8443".
    pub listen: SocketAddr,
    /// Server certificate chain and key (PEM), relative to this file.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The records: an SQLite file relative to this file (one broker), or a
    /// `postgres://USER@HOST/DATABASE` URL (any number of brokers).
    pub database: String,
    /// PostgreSQL: a file holding the password (else the URL's, or PGPASSWORD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_password_file: Option<PathBuf>,
    /// PostgreSQL with `sslmode=require`: the CA (PEM) its certificate must
    /// chain to, e.g. RDS's global-bundle.pem (else the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_ca_file: Option<PathBuf>,
    /// Most database connections this broker opens for queries (PostgreSQL:
    /// as many again hold serials' locks).
    #[serde(default = "default_connections")]
    pub database_connections: usize,
    /// Seals the activation codes kept for cards' retries (see sealing.rs);
    /// every broker sharing a database needs the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vend_key_file: Option<PathBuf>,
    /// Tags every activation this broker creates (`piprov:broker`), so that
    /// activations it created but never recorded can be found and deleted.
    pub broker_id: String,
    pub region: String,
    /// IAM service role the registered nodes assume.
    pub iam_role: String,
    #[serde(default)]
    pub profile: Option<String>,
    /// Lifetime of each activation, e.g. "1h".
    #[serde(default = "default_lifetime")]
    pub activation_lifetime: String,
    /// When a Pi registers again, deregister its previous node (same serial only).
    #[serde(default)]
    pub deregister_previous: bool,
    /// Requests per minute from one client address that fail the token check.
    #[serde(default = "default_rate")]
    pub rate_limit_per_minute: u32,
    /// Requests per minute with one enrollment token (a site's cards, perhaps
    /// behind one NAT, share it).
    #[serde(default = "default_token_rate")]
    pub token_rate_limit_per_minute: u32,
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Longest a request may take, e.g. "20s".
    #[serde(default = "default_timeout")]
    pub request_timeout: String,
    /// How long a device-key challenge may be answered, e.g. "2m".
    #[serde(default = "default_challenge")]
    pub challenge_lifetime: String,
    /// How long audit lines are kept, e.g. "90d": a flood of refused requests
    /// must not grow the database without end.
    #[serde(default = "default_audit_keep")]
    pub audit_keep: String,
    /// The most audit lines kept; the oldest go first.
    #[serde(default = "default_audit_rows")]
    pub audit_max_rows: u64,
}

fn default_lifetime() -> String {
    "1h".into()
}
fn default_connections() -> usize {
    16
}
fn default_rate() -> u32 {
    30
}
fn default_token_rate() -> u32 {
    600
}
fn default_body() -> usize {
    4096
}
fn default_timeout() -> String {
    "20s".into()
}
fn default_challenge() -> String {
    "2m".into()
}
fn default_audit_keep() -> String {
    "90d".into()
}
fn default_audit_rows() -> u64 {
    1_000_000
}

/// A loaded config with its durations parsed and paths resolved.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: BrokerConfig,
    pub dir: PathBuf,
    pub lifetime: Duration,
    pub timeout: Duration,
    pub challenge_lifetime: Duration,
    pub audit_keep: Duration,
    pub location: Location,
}

impl Loaded {
    pub fn path(&self, file: &Path) -> PathBuf {
        self.dir.join(file)
    }

    pub async fn open_store(&self) -> Result<Store> {
        Store::open(&self.location, self.config.database_connections).await
    }

    /// The configured vend key, or (without one) a key for this process only.
    pub fn vend_key(&self) -> Result<(VendKey, bool)> {
        match &self.config.vend_key_file {
            Some(file) => Ok((VendKey::read(&self.path(file))?, true)),
            None => Ok((VendKey::ephemeral()?, false)),
        }
    }
}

pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the broker config {}", path.display()))?;
    let config: BrokerConfig = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let duration = |key: &str, text: &str| {
        humantime::parse_duration(text)
            .with_context(|| format!("{}: {key} {text:?} is not a duration", path.display()))
    };
    let lifetime = duration("activation_lifetime", &config.activation_lifetime)?;
    if lifetime < Duration::from_secs(60) || lifetime > crate::ssm::MAX_LIFETIME {
        bail!(
            "{}: activation_lifetime must be between a minute and 30 days",
            path.display()
        );
    }
    let timeout = duration("request_timeout", &config.request_timeout)?;
    let challenge_lifetime = duration("challenge_lifetime", &config.challenge_lifetime)?;
    let audit_keep = duration("audit_keep", &config.audit_keep)?;
    if audit_keep.is_zero() || config.audit_max_rows == 0 {
        bail!(
            "{}: audit_keep and audit_max_rows must be more than zero",
            path.display()
        );
    }
    if challenge_lifetime < Duration::from_secs(1) || challenge_lifetime > Duration::from_secs(3600)
    {
        bail!(
            "{}: challenge_lifetime must be between a second and an hour",
            path.display()
        );
    }
    if !crate::region::is_region_name(&config.region) {
        bail!(
            "{}: region {:?} is not an AWS region name",
            path.display(),
            config.region
        );
    }
    crate::region::warn_if_unknown(&config.region);
    if config.rate_limit_per_minute == 0 || config.token_rate_limit_per_minute == 0 {
        bail!(
            "{}: rate_limit_per_minute and token_rate_limit_per_minute must be at least 1",
            path.display()
        );
    }
    if !(1..=256).contains(&config.database_connections) {
        bail!(
            "{}: database_connections must be between 1 and 256",
            path.display()
        );
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let location = Location::parse(
        &config.database,
        &dir,
        config.database_password_file.as_deref(),
        config.database_ca_file.as_deref(),
    )
    .with_context(|| format!("{}", path.display()))?;
    Ok(Loaded {
        location,
        config,
        dir,
        lifetime,
        timeout,
        challenge_lifetime,
        audit_keep,
    })
}
