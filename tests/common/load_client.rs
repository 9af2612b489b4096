//! The broker load test's cards, in this process on threads of their own
//! (named `load-client`): each of COUNT Pis does what a card does, over a new
//! HTTPS connection per request as a card's curl makes: (with device keys, a
//! challenge, then) ask for an activation, register it with SSM (the double),
//! report the node. A request that finds its broker down (refused, reset, 5xx)
//! is retried after 100 ms, as the card's register step retries; nothing else is.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use piprov::hex::hex;

use super::ssm_double::Registrar;

pub struct Load {
    /// host:port of each broker; Pi n asks broker n % len.
    pub brokers: Vec<String>,
    pub ca: PathBuf,
    pub token: String,
    pub count: usize,
    pub clients: usize,
    pub device_keys: bool,
    /// Finished enrollments so far, for the faults' timing.
    pub done: Arc<AtomicUsize>,
}

#[derive(Default)]
pub struct Outcome {
    /// serial → (activation id, node id) it ended with.
    pub enrolled: BTreeMap<String, (String, String)>,
    pub failed: Vec<(String, String)>,
    pub retries: usize,
    /// Seconds, of each successful activation request (and challenge request).
    pub activation_latencies: Vec<f64>,
    pub challenge_latencies: Vec<f64>,
    pub elapsed: f64,
    /// CPU seconds the cards' threads used.
    pub cpu_seconds: f64,
}

const DEADLINE: Duration = Duration::from_secs(300);

struct Client {
    tls: tokio_rustls::TlsConnector,
    token: String,
    outcome: Mutex<Outcome>,
    started: Instant,
}

impl Client {
    /// One request on a new connection: (status, JSON body), or None if the
    /// broker could not be reached or cut the connection.
    async fn post_once(
        &self,
        broker: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> Option<(u16, Value)> {
        let tcp = tokio::net::TcpStream::connect(broker).await.ok()?;
        tcp.set_nodelay(true).ok()?;
        let host = broker.rsplit_once(':').unwrap().0.to_string();
        let name = ServerName::try_from(host.clone()).ok()?;
        let mut tls = self.tls.connect(name, tcp).await.ok()?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
            self.token,
            body.len()
        );
        tls.write_all(&[head.as_bytes(), body].concat())
            .await
            .ok()?;
        let mut reply = Vec::new();
        // A close without TLS's close_notify still leaves a whole reply read.
        let _ = tls.read_to_end(&mut reply).await;
        let text = String::from_utf8_lossy(&reply);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
    }

    async fn post(
        &self,
        broker: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> Result<(u16, Value, f64), String> {
        while self.started.elapsed() < DEADLINE {
            let started = Instant::now();
            match self.post_once(broker, path, headers, body).await {
                Some((status, reply)) if status < 500 => {
                    return Ok((status, reply, started.elapsed().as_secs_f64()));
                }
                _ => {
                    self.outcome.lock().unwrap().retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(format!("{path}: deadline passed"))
    }

    async fn ask_activation(
        &self,
        broker: &str,
        serial: &str,
        n: usize,
        key: Option<&EcdsaKeyPair>,
    ) -> Result<(u16, Value), String> {
        let fields = json!({"serial": serial, "hostname": format!("pi-{n}")});
        let (body, headers) = match key {
            None => (fields.to_string(), String::new()),
            Some(key) => self.signed(broker, fields, key).await?,
        };
        let (status, reply, seconds) = self
            .post(broker, "/v1/activations", &headers, body.as_bytes())
            .await?;
        if status == 200 {
            self.outcome
                .lock()
                .unwrap()
                .activation_latencies
                .push(seconds);
        }
        Ok((status, reply))
    }

    /// As a card with a device key: a fresh challenge in the body, and the body
    /// signed. Returns the body and the headers that carry the proof.
    async fn signed(
        &self,
        broker: &str,
        mut fields: Value,
        key: &EcdsaKeyPair,
    ) -> Result<(String, String), String> {
        let (status, reply, seconds) = self.post(broker, "/v1/challenges", "", b"{}").await?;
        if status != 200 {
            return Err(format!("challenge: {status} {reply}"));
        }
        self.outcome
            .lock()
            .unwrap()
            .challenge_latencies
            .push(seconds);
        fields["challenge"] = reply["challenge"].clone();
        let body = fields.to_string();
        let signed = [b"piprov-enrollment-v1\n".as_slice(), body.as_bytes()].concat();
        let signature = key
            .sign(&SystemRandom::new(), &signed)
            .map_err(|e| e.to_string())?;
        let public = key.public_key().as_der().map_err(|e| e.to_string())?;
        let headers = format!(
            "X-Piprov-Device-Key: {}\r\nX-Piprov-Device-Signature: {}\r\n",
            hex(public.as_ref()),
            hex(signature.as_ref())
        );
        Ok((body, headers))
    }

    async fn enrol(
        &self,
        broker: &str,
        n: usize,
        device_keys: bool,
        ssm: &Registrar,
    ) -> Result<(String, String, String), String> {
        let serial = format!("{:016x}", 0x1000_0000_0000_0000u64 + n as u64);
        let key = device_keys
            .then(|| EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("a P-256 key"));
        for _ in 0..5 {
            let (status, activation) = self
                .ask_activation(broker, &serial, n, key.as_ref())
                .await?;
            if status == 401
                && key.is_some()
                && activation["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("challenge")
            {
                // The challenge was spent by a request a fault cut short.
                self.outcome.lock().unwrap().retries += 1;
                continue;
            }
            if status != 200 {
                return Err(format!("activation: {status} {activation}"));
            }
            let id = activation["activation_id"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let code = activation["activation_code"].as_str().unwrap_or("");
            match ssm.register(&id, code) {
                Ok(instance) => {
                    let report = json!({"serial": serial, "instance_id": instance});
                    let (status, reply, _) = self
                        .post(
                            broker,
                            "/v1/registrations",
                            "",
                            report.to_string().as_bytes(),
                        )
                        .await?;
                    if status != 200 {
                        return Err(format!("registration: {status} {reply}"));
                    }
                    return Ok((serial, id, instance));
                }
                Err(_) => self.outcome.lock().unwrap().retries += 1,
            }
        }
        Err("SSM refused every activation".into())
    }
}

/// Runs the load to the end; the cards register through `ssm`.
pub fn run(load: &Load, ssm: &Registrar, threads: usize) -> Outcome {
    // As a card's curl (OpenSSL 3.0 on Bookworm) offers: no post-quantum hybrid.
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: vec![
            rustls::crypto::aws_lc_rs::kx_group::X25519,
            rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&load.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = Arc::new(Client {
        tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        token: load.token.clone(),
        outcome: Mutex::new(Outcome::default()),
        started: Instant::now(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("load-client")
        .enable_all()
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let mut workers = Vec::new();
        for _ in 0..load.clients {
            let client = client.clone();
            let next = next.clone();
            let done = load.done.clone();
            let brokers = load.brokers.clone();
            let (count, device_keys) = (load.count, load.device_keys);
            let ssm = ssm.clone();
            workers.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    let broker = &brokers[n % brokers.len()];
                    let result = client.enrol(broker, n, device_keys, &ssm).await;
                    let mut outcome = client.outcome.lock().unwrap();
                    match result {
                        Ok((serial, activation, instance)) => {
                            outcome.enrolled.insert(serial, (activation, instance));
                        }
                        Err(e) => outcome.failed.push((format!("{n}"), e)),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
    });
    let mut outcome = std::mem::take(&mut *client.outcome.lock().unwrap());
    outcome.elapsed = started.elapsed().as_secs_f64();
    // Read while the runtime's threads still exist.
    outcome.cpu_seconds = super::cpu::thread_cpu_seconds("load-client");
    outcome
}

/// The q-quantile of `xs` in milliseconds.
pub fn quantile_ms(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((q * sorted.len() as f64) as usize).min(sorted.len() - 1)] * 1000.0
}
