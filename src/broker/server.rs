//! `piprov broker serve`: HTTPS (rustls) on the configured address. On SIGTERM
//! or Ctrl-C it stops accepting, lets requests in flight finish, and checkpoints
//! the database.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::api::{self, Broker, Peer};
use super::config::Loaded;
use super::store::Store;

/// How long a TLS handshake and a request's headers may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long requests in flight may take to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(30);

pub fn serve(config: Loaded, ready_file: Option<&Path>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(config, ready_file))
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

async fn run(config: Loaded, ready_file: Option<&Path>) -> Result<()> {
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&config)?));
    let store = Store::open(&config.path(&config.config.database))?;
    let conn = crate::ssm::Connection {
        profile: config.config.profile.clone(),
        region: Some(config.config.region.clone()),
    };
    let client = crate::ssm::client(&conn).await?;
    let broker = Arc::new(Broker::new(config.clone(), store, client));
    match broker.forget_unrecorded().await {
        Ok(0) => {}
        Ok(n) => eprintln!("piprov broker: deleted {n} activations created but never recorded"),
        Err(e) => eprintln!("piprov broker: could not look for unrecorded activations: {e:#}"),
    }
    let router = api::router(broker.clone());
    let listener = TcpListener::bind(config.config.listen)
        .await
        .with_context(|| format!("listening on {}", config.config.listen))?;
    let address: SocketAddr = listener.local_addr()?;
    eprintln!("piprov broker: listening on https://{address}");
    if let Some(file) = ready_file {
        std::fs::write(file, format!("{address}\n"))
            .with_context(|| format!("writing {}", file.display()))?;
    }

    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("piprov broker: accept: {e}");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let tls = tls.clone();
        let service = TowerToHyperService::new(router.clone().layer(axum::Extension(Peer(peer))));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
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
    eprintln!("piprov broker: shutting down; finishing requests in flight");
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("piprov broker: some connections did not finish within {DRAIN:?}");
    }
    broker.db().checkpoint()?;
    eprintln!("piprov broker: stopped");
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
