//! `piprov broker init DIR`: a private CA, a server certificate it signs (the
//! cards pin the CA), a config file and an empty database.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::config::BrokerConfig;
use super::sealing::VendKey;
use super::store::{Location, Store};

pub struct InitOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// DNS names and IP addresses the cards reach the broker by.
    pub names: Vec<String>,
    pub region: String,
    pub iam_role: String,
    /// A postgres:// URL; None: an SQLite file in DIR.
    pub database: Option<String>,
    /// PostgreSQL over TLS: the CA its certificate chains to.
    pub database_ca_file: Option<PathBuf>,
}

pub struct Initialised {
    pub config: PathBuf,
    pub ca: PathBuf,
}

pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server.key";
const CONFIG_FILE: &str = "broker.toml";
const DATABASE_FILE: &str = "broker.db";
const VEND_KEY_FILE: &str = "vend.key";

pub fn init(options: &InitOptions) -> Result<Initialised> {
    let dir = &options.dir;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty: piprov will not overwrite a broker's keys",
            dir.display()
        );
    }
    if !crate::region::is_region_name(&options.region) {
        bail!("--region {:?} is not an AWS region name", options.region);
    }
    crate::region::warn_if_unknown(&options.region);
    let database = options
        .database
        .clone()
        .unwrap_or_else(|| DATABASE_FILE.to_string());
    // Checked before anything is written: a typo leaves no half-made broker.
    // Kept absolute: the config lives elsewhere than the command was run.
    let database_ca_file = options
        .database_ca_file
        .as_ref()
        .map(std::path::absolute)
        .transpose()?;
    let location = Location::parse(&database, dir, None, database_ca_file.as_deref())?;
    if options.names.is_empty() {
        bail!("give at least one --name the cards reach the broker by");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Keys, the config and the database live here: the broker's user alone.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))?;
    // The database first: one that cannot be reached fails before any key is made.
    // (Dropped inside the runtime: its connections close on its blocking pool.)
    crate::runtime::block_on(async { Store::open(&location, 1).await.map(drop) })?;

    let year = current_year();
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "piprov broker CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    ca.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let ca_cert = ca.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(options.names.clone())
        .context("a --name is neither a DNS name nor an IP address")?;
    server
        .distinguished_name
        .push(DnType::CommonName, options.names[0].clone());
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    server.not_after = rcgen::date_time_ymd(year + 3, 1, 1);
    let issuer = Issuer::new(ca, ca_key);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write_new(&dir.join(CA_FILE), ca_cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join(CA_KEY_FILE),
        issuer_key_pem(&issuer).as_bytes(),
        0o600,
    )?;
    write_new(&dir.join(CERT_FILE), server_cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join(KEY_FILE),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;

    let mut id = [0u8; 8];
    getrandom::getrandom(&mut id)?;
    let config = BrokerConfig {
        listen: options.listen,
        cert_file: CERT_FILE.into(),
        key_file: KEY_FILE.into(),
        database,
        database_password_file: None,
        database_ca_file,
        database_connections: 16,
        vend_key_file: Some(VEND_KEY_FILE.into()),
        broker_id: crate::hex::hex(&id),
        region: options.region.clone(),
        iam_role: options.iam_role.clone(),
        profile: None,
        activation_lifetime: "1h".into(),
        deregister_previous: false,
        rate_limit_per_minute: 30,
        token_rate_limit_per_minute: 600,
        max_body_bytes: 4096,
        request_timeout: "20s".into(),
        challenge_lifetime: "2m".into(),
        audit_keep: "90d".into(),
        audit_max_rows: 1_000_000,
    };
    let text = format!(
        "# piprov broker: `piprov broker serve --config {CONFIG_FILE}`.\n\
         # Cards pin {CA_FILE}; keep {CA_KEY_FILE} offline once the server certificate is made.\n\
         # deregister_previous = true deregisters a Pi's previous node when it registers\n\
         # again (nodes of the same Pi serial only). Brokers sharing one PostgreSQL\n\
         # database share this file's broker_id and {VEND_KEY_FILE}.\n{}",
        toml::to_string(&config)?
    );
    write_new(
        &dir.join(VEND_KEY_FILE),
        VendKey::generate_hex()?.as_bytes(),
        0o600,
    )?;
    write_new(&dir.join(CONFIG_FILE), text.as_bytes(), 0o600)?;
    Ok(Initialised {
        config: dir.join(CONFIG_FILE),
        ca: dir.join(CA_FILE),
    })
}

fn issuer_key_pem(issuer: &Issuer<'_, KeyPair>) -> String {
    issuer.key().serialize_pem()
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    crate::new_file::write_new(path, data, mode)
        .with_context(|| format!("creating {}", path.display()))
}

fn current_year() -> i32 {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..4]
        .parse()
        .unwrap_or(2026)
}
