//! Where the records are: `database` in broker.toml is an SQLite file (relative
//! to the config) or a `postgres://` URL. A PostgreSQL password comes from the
//! URL, `database_password_file`, or `PGPASSWORD`, and is never shown.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;

#[derive(Clone)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres {
        config: Box<tokio_postgres::Config>,
        /// How TLS is checked, when the URL asks for it.
        tls: Arc<rustls::ClientConfig>,
        /// user@host:port/database, for messages.
        shown: String,
    },
}

pub fn is_postgres_url(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

impl Location {
    /// `database` with the config's `database_password_file` and
    /// `database_ca_file` (relative to `dir`).
    pub fn parse(
        database: &str,
        dir: &Path,
        password_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<Location> {
        if !is_postgres_url(database) {
            if database.contains("://") {
                bail!("database {database:?}: a file for SQLite, or a postgres:// URL");
            }
            if password_file.is_some() || ca_file.is_some() {
                bail!("database_password_file and database_ca_file are for a PostgreSQL database");
            }
            return Ok(Location::Sqlite(dir.join(database)));
        }
        // The URL's own text stays out of errors: it may hold a password.
        let mut config: tokio_postgres::Config = database.parse().map_err(|e| {
            anyhow::anyhow!(
                "database: not a PostgreSQL URL ({e}); e.g. postgres://piprov@db.example.net/piprov"
            )
        })?;
        if let Some(file) = password_file {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading database_password_file {}", path.display()))?;
            config.password(text.trim_end_matches(['\r', '\n']));
        } else if config.get_password().is_none() {
            if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        if config.get_user().is_none() {
            bail!("database: the PostgreSQL URL names no user (postgres://USER@HOST/DATABASE)");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("piprov-broker");
        if config.get_ssl_mode() == SslMode::Prefer {
            config.ssl_mode(SslMode::Disable);
        }
        let tls = if config.get_ssl_mode() == SslMode::Require {
            tls_config(dir, ca_file)?
        } else if ca_file.is_some() {
            bail!("database_ca_file is for TLS: add ?sslmode=require to the database URL");
        } else {
            // Never used: the connection is plain. No system roots are read.
            tls_client(rustls::RootCertStore::empty())?
        };
        let tls = Arc::new(tls);
        let shown = shown(&config);
        Ok(Location::Postgres {
            config: Box::new(config),
            tls,
            shown,
        })
    }
}

/// The roots a PostgreSQL server's certificate must chain to: the CA file
/// (e.g. RDS's global-bundle.pem), or the system's.
fn tls_config(dir: &Path, ca_file: Option<&Path>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            let path = dir.join(file);
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading database_ca_file {}", path.display()))?;
            if certs.is_empty() {
                bail!("database_ca_file {} holds no certificate", path.display());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("a certificate in {}", path.display()))?;
            }
        }
        None => {
            // Unreadable system roots leave none: a TLS connection then fails, named.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    tls_client(roots)
}

fn tls_client(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn shown(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or_default(),
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or_default()
    )
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Postgres { shown, .. } => f.write_str(shown),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_reaches_a_message() {
        let at = Path::new("/etc/piprov-broker");
        let url = "postgres://piprov:s3cret-pw@db.example.net:6432/fleet";
        let location = Location::parse(url, at, None, None).unwrap();
        assert_eq!(
            location.to_string(),
            "postgres://piprov@db.example.net:6432/fleet"
        );
        assert!(!format!("{location:?}").contains("s3cret"));
        let bad = Location::parse("postgres://piprov:s3cret-pw@[::1", at, None, None)
            .err()
            .unwrap();
        assert!(!format!("{bad:#}").contains("s3cret"), "{bad:#}");
        assert!(matches!(
            Location::parse("broker.db", at, None, None).unwrap(),
            Location::Sqlite(p) if p == at.join("broker.db")
        ));
        assert!(Location::parse("mysql://x@y/z", at, None, None).is_err());
        // A CA without sslmode=require would be read and never used: said so.
        let unused = Location::parse(url, at, None, Some(Path::new("ca.pem")))
            .err()
            .unwrap();
        assert!(
            format!("{unused:#}").contains("sslmode=require"),
            "{unused:#}"
        );
    }
}
