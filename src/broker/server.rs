//! `piprov broker serve`: HTTPS (rustls) on the configured address (or
//! `--listen`). On SIGTERM or Ctrl-C it stops accepting, lets requests in flight
//! finish, and checkpoints the database. One broker serves an SQLite file; any
//! number share a PostgreSQL database.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use nix::fcntl::{Flock, FlockArg};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::api::{Broker, Peer};
use super::config::Loaded;
use super::connections::{self, AcceptBackoff, Limits, PerAddress, Quiet};
use super::request_log::{self, LogFormat};
use super::routes;
use super::store::Location;

/// How long a TLS handshake and a request's headers may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long requests in flight may take to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(30);

pub struct ServeOptions<'a> {
    /// Written with the address listened on, once ready.
    pub ready_file: Option<&'a Path>,
    /// Overrides the config's `listen` (two brokers from one config on one host).
    pub listen: Option<SocketAddr>,
    pub log_format: LogFormat,
}

pub fn serve(config: Loaded, options: &ServeOptions) -> Result<()> {
    request_log::init(options.log_format);
    let descriptors = connections::raise_descriptor_limit();
    crate::runtime::block_on(run(config, options, Limits::for_descriptors(descriptors)))
}

/// SQLite keeps one broker per file: the serial locks and the clean-up of a
/// single process are only right when no other process serves it.
fn hold_sqlite(location: &Location) -> Result<Option<Flock<std::fs::File>>> {
    let Location::Sqlite(path) = location else {
        return Ok(None);
    };
    let lock_path = path.with_extension("db.serving");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(Some(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "another broker serves {}: an SQLite database serves one broker; for several, \
             give them one PostgreSQL database (database = \"postgres://…\")",
            path.display()
        ),
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", lock_path.display())),
    }
}

fn tls_config(config: &Loaded) -> Result<rustls::ServerConfig> {
    let cert_path = config.path(&config.config.cert_file);
    let key_path = config.path(&config.config.key_file);
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the certificate {}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading the key {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and key do not match")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

async fn run(config: Loaded, options: &ServeOptions<'_>, limits: Limits) -> Result<()> {
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&config)?));
    let _serving = hold_sqlite(&config.location)?;
    let store = config.open_store().await?;
    let (vend_key, configured) = config.vend_key()?;
    if !configured {
        tracing::warn!(
            "no vend_key_file in the config: a card's retry after a restart gets a new activation"
        );
    }
    let conn = crate::ssm::Connection {
        profile: config.config.profile.clone(),
        region: Some(config.config.region.clone()),
    };
    let client = crate::ssm::client(&conn).await?;
    let broker = Arc::new(Broker::new(config.clone(), store, client, vend_key));
    broker.tidy().await;
    let cleaner = tokio::spawn(broker.clone().clean_up_periodically());
    let router = routes::router(broker.clone());
    let listen = options.listen.unwrap_or(config.config.listen);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(
        "listening on https://{address} (database {}; at most {} connections, {} per address)",
        broker.store.location(),
        limits.total,
        limits.per_address
    );
    if let Some(file) = options.ready_file {
        std::fs::write(file, format!("{address}\n"))
            .with_context(|| format!("writing {}", file.display()))?;
    }

    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    // Past `limits.total` a client waits in the kernel's queue, using no
    // descriptor here; past `limits.per_address` it is closed at once.
    let open = Arc::new(tokio::sync::Semaphore::new(limits.total));
    let per_address = PerAddress::default();
    let mut backoff = AcceptBackoff::new();
    let mut accept_trouble = Quiet::new("accept");
    let mut crowded = Quiet::new("a client address holds its limit of connections; closing more");
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff.succeeded();
                    accepted
                }
                Err(e) => {
                    // EMFILE and ENFILE last until a connection ends: retrying at
                    // once would spin.
                    accept_trouble.note(&e);
                    tokio::select! {
                        () = tokio::time::sleep(backoff.failed()) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = per_address.admit(peer.ip(), limits.per_address) else {
            crowded.note(&peer.ip());
            drop(stream);
            continue;
        };
        let tls = tls.clone();
        let service = TowerToHyperService::new(router.clone().layer(axum::Extension(Peer(peer))));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await
            else {
                return;
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let _ = watcher.watch(connection).await;
        });
    }
    drop(listener);
    cleaner.abort();
    tracing::info!("shutting down; finishing requests in flight");
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within {DRAIN:?}");
    }
    broker.store.checkpoint().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
