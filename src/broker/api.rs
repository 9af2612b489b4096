//! The card-facing HTTP API (JSON, versioned): `POST /v1/challenges`,
//! `POST /v1/activations`, `POST /v1/registrations`, `GET /healthz`.
//! Every refusal (bad or revoked token, serial not allowed, device proof
//! missing or wrong, quota spent, rate limit, malformed body) is answered
//! before any call to AWS. Tokens and codes never reach a log.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::config::Loaded;
use super::device::DevicePolicy;
use super::device_check::DeviceCheck;
use super::serial_locks::SerialLocks;
use super::store::{NewIssue, Store, Token, now};
use crate::ssm::{self, TAG_BROKER, TAG_HOSTNAME, TAG_IMAGE, TAG_NAME, TAG_SERIAL, TAG_VERSION};

/// The client's address, attached to each connection's requests.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// An activation code handed out and not yet used, kept only in memory so that
/// a card retrying within the expiry gets the same activation back.
struct Vended {
    activation_id: String,
    code: String,
}

pub struct Broker {
    pub config: Loaded,
    pub store: Mutex<Store>,
    ssm: aws_sdk_ssm::Client,
    vended: Mutex<HashMap<String, Vended>>,
    serial_locks: SerialLocks,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

pub(super) fn err(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

pub(super) fn internal(e: anyhow::Error) -> ApiError {
    eprintln!("piprov broker: {e:#}");
    err(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

#[derive(Debug, Deserialize)]
pub(super) struct ActivationRequest {
    /// Required when the request is signed with a device key: what binds the
    /// signature to this one request.
    #[serde(default)]
    pub(super) challenge: String,
    serial: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    machine_id: String,
    #[serde(default)]
    image_sha256: String,
    #[serde(default)]
    previous_instance_id: String,
}

#[derive(Debug, Deserialize)]
struct RegistrationRequest {
    serial: String,
    instance_id: String,
    #[serde(default)]
    previous_instance_id: String,
}

pub fn router(broker: Arc<Broker>) -> Router {
    let limit = broker.config.config.max_body_bytes;
    let timeout = broker.config.timeout;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/challenges", post(challenges))
        .route("/v1/activations", post(activations))
        .route("/v1/registrations", post(registrations))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(
            move |request, next: axum::middleware::Next| async move {
                match tokio::time::timeout(timeout, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => {
                        err(StatusCode::SERVICE_UNAVAILABLE, "request timed out").into_response()
                    }
                }
            },
        ))
        .with_state(broker)
}

impl Broker {
    pub fn new(config: Loaded, store: Store, ssm: aws_sdk_ssm::Client) -> Broker {
        Broker {
            config,
            store: Mutex::new(store),
            ssm,
            vended: Mutex::new(HashMap::new()),
            serial_locks: SerialLocks::default(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The database, held for one step (never across an await). A panic while
    /// it was held cannot have left a transaction half-done, so the lock is
    /// taken back rather than every later request failing.
    pub fn db(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes activations this broker created but never recorded (it stopped
    /// between creating one and writing it down): no card ever received their code.
    pub async fn forget_unrecorded(&self) -> anyhow::Result<usize> {
        let known = self.db().known_activation_ids()?;
        let mine = ssm::list_activations(&self.ssm).await?;
        let mut deleted = 0;
        for a in mine {
            let ours = a
                .tags
                .iter()
                .any(|(k, v)| k == TAG_BROKER && *v == self.config.config.broker_id);
            if ours && !known.contains(&a.id) {
                ssm::delete_activation(&self.ssm, &a.id).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    fn rate_limited(&self, ip: IpAddr) -> bool {
        let per_minute = f64::from(self.config.config.rate_limit_per_minute);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let (tokens, last) = buckets.entry(ip).or_insert((per_minute, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * per_minute / 60.0).min(per_minute);
        *last = now;
        if *tokens < 1.0 {
            return true;
        }
        *tokens -= 1.0;
        false
    }

    fn authorize(&self, headers: &HeaderMap, client: &str) -> Result<Token, ApiError> {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
        let store = self.db();
        let Some(token) = store.token_by_secret(presented).map_err(internal)? else {
            let _ = store.audit(None, client, "refused", None, "unknown token");
            return Err(err(StatusCode::UNAUTHORIZED, "unknown token"));
        };
        let refusal = if token.revoked_at.is_some() {
            Some("token revoked")
        } else if token.expires_at.is_some_and(|t| t <= now()) {
            Some("token expired")
        } else {
            None
        };
        if let Some(reason) = refusal {
            let _ = store.audit(Some(token.id), client, "refused", None, reason);
            return Err(err(StatusCode::UNAUTHORIZED, reason));
        }
        Ok(token)
    }

    fn check_serial(&self, token: &Token, serial: &str, client: &str) -> Result<(), ApiError> {
        if let Some(allowed) = &token.serials {
            if !allowed.iter().any(|s| s.eq_ignore_ascii_case(serial)) {
                let _ = self.db().audit(
                    Some(token.id),
                    client,
                    "refused",
                    Some(serial),
                    "serial not allowed",
                );
                return Err(err(
                    StatusCode::FORBIDDEN,
                    format!("serial {serial} is not allowed for token {}", token.name),
                ));
            }
        }
        Ok(())
    }
}

/// The gate every card request passes: rate limit, then token.
fn admit(broker: &Broker, peer: Peer, headers: &HeaderMap) -> Result<(Token, String), ApiError> {
    if broker.rate_limited(peer.0.ip()) {
        return Err(err(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests: slow down",
        ));
    }
    let client = peer.0.ip().to_string();
    let token = broker.authorize(headers, &client)?;
    Ok((token, client))
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {e}"),
        )
    })
}

fn check_field(name: &str, value: &str, ok: bool) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(err(
            StatusCode::BAD_REQUEST,
            format!("{name} {value:?} is not valid"),
        ))
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_serial(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn valid_instance(s: &str) -> bool {
    s.strip_prefix("mi-").is_some_and(|rest| is_hex(rest, 17))
}

/// A Pi serial (or MAC) as the broker keys it: lower case, checked.
fn checked_serial(raw: &str) -> Result<String, ApiError> {
    let serial = raw.to_ascii_lowercase();
    check_field("serial", raw, valid_serial(&serial))?;
    Ok(serial)
}

fn check_previous(previous: &str) -> Result<(), ApiError> {
    check_field(
        "previous_instance_id",
        previous,
        previous.is_empty() || valid_instance(previous),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"ok": true}))
}

/// Runs a request's work as its own task: if the client gives up or the request
/// times out, the work still finishes and is recorded, and a retry finds it.
async fn detached<F>(work: F) -> Result<Response, ApiError>
where
    F: std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
{
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(internal(anyhow::anyhow!("request task: {e}"))))
}

async fn activations(
    State(broker): State<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    detached(issue(broker, peer, headers, body)).await
}

async fn registrations(
    State(broker): State<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    detached(register(broker, peer, headers, body)).await
}

/// A fresh single-use challenge, for a card that signs its activation request.
async fn challenges(
    State(broker): State<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (token, _) = admit(&broker, peer, &headers)?;
    let (challenge, expires_at) = broker
        .db()
        .new_challenge(token.id, broker.config.challenge_lifetime.as_secs() as i64)
        .map_err(internal)?;
    Ok(axum::Json(json!({"challenge": challenge, "expires_at": expires_at})).into_response())
}

/// An activation request whose fields are checked, with its serial normalised.
pub(super) struct Checked {
    pub(super) request: ActivationRequest,
    pub(super) serial: String,
}

fn check_activation_request(body: &Bytes) -> Result<Checked, ApiError> {
    let request: ActivationRequest = parse(body)?;
    let serial = checked_serial(&request.serial)?;
    check_field(
        "hostname",
        &request.hostname,
        request.hostname.len() <= 63
            && request
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
    )?;
    check_field(
        "machine_id",
        &request.machine_id,
        request.machine_id.is_empty() || is_hex(&request.machine_id, 32),
    )?;
    check_field(
        "image_sha256",
        &request.image_sha256,
        request.image_sha256.is_empty() || is_hex(&request.image_sha256, 64),
    )?;
    check_field(
        "challenge",
        &request.challenge,
        request.challenge.is_empty() || is_hex(&request.challenge, 64),
    )?;
    check_previous(&request.previous_instance_id)?;
    Ok(Checked { request, serial })
}

impl Broker {
    /// An activation already handed to this serial and not yet used: a retry gets it again.
    fn still_vended(&self, serial: &str) -> Result<Option<Response>, ApiError> {
        let Some(issued) = self.db().issued(serial).map_err(internal)? else {
            return Ok(None);
        };
        let vended = self
            .vended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(vended.get(serial).and_then(|v| {
            (!issued.used
                && issued.expires_at > now() + 60
                && v.activation_id == issued.activation_id)
                .then(|| {
                    axum::Json(json!({
                        "activation_id": v.activation_id, "activation_code": v.code,
                        "region": self.config.config.region, "expires_at": issued.expires_at,
                        "reused": true,
                    }))
                    .into_response()
                })
        }))
    }

    /// Deregisters the node this Pi was before (if `deregister_previous`): the
    /// one its card names, and, when the token checks device keys, the one the
    /// broker recorded for this serial (a re-imaged card names none, or the
    /// golden's). Only a node tagged with this serial is touched. Returns the
    /// node retired (or named), whether it was deregistered, and a note.
    async fn retire_previous(
        &self,
        token: &Token,
        serial: &str,
        instance_id: &str,
        named: &str,
    ) -> anyhow::Result<(Option<String>, bool, Option<String>)> {
        let recorded = if token.device_policy == DevicePolicy::Off {
            None
        } else {
            self.db().last_instance(serial)?
        };
        let mut candidates: Vec<String> = [non_empty(named).map(str::to_string), recorded]
            .into_iter()
            .flatten()
            .filter(|p| p != instance_id)
            .collect();
        candidates.dedup();
        if !self.config.config.deregister_previous || candidates.is_empty() {
            return Ok((candidates.into_iter().next(), false, None));
        }
        let mut notes = Vec::new();
        for prev in &candidates {
            match ssm::describe_node(&self.ssm, prev).await? {
                Some(old) if old.serial() == Some(serial) => {
                    ssm::deregister(&self.ssm, prev).await?;
                    return Ok((Some(prev.clone()), true, None));
                }
                Some(_) => notes.push(format!("{prev} belongs to another Pi serial: left alone")),
                None => notes.push(format!("{prev} is not registered")),
            }
        }
        Ok((candidates.into_iter().next(), false, Some(notes.join("; "))))
    }

    fn activation_tags(
        &self,
        serial: &str,
        hostname: Option<&str>,
        image: &str,
    ) -> Vec<(String, String)> {
        let mut tags = vec![
            (TAG_SERIAL.to_string(), serial.to_string()),
            (TAG_BROKER.to_string(), self.config.config.broker_id.clone()),
            (
                TAG_VERSION.to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ];
        if let Some(h) = hostname {
            tags.push((TAG_HOSTNAME.to_string(), h.to_string()));
            tags.push((TAG_NAME.to_string(), h.to_string()));
        }
        if !image.is_empty() {
            tags.push((TAG_IMAGE.to_string(), image.to_ascii_lowercase()));
        }
        tags
    }
}

fn non_empty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

async fn issue(
    broker: Arc<Broker>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (token, client) = admit(&broker, peer, &headers)?;
    let checked = check_activation_request(&body)?;
    broker.check_serial(&token, &checked.serial, &client)?;
    let device = broker.check_device(&token, &client, &checked, &headers, &body)?;
    let Checked { request, serial } = checked;

    // One request per serial at a time: a retry racing its original gets the
    // same activation, never a second one.
    let lock = broker.serial_locks.get(&serial);
    let _held = lock.lock().await;
    if let Some(reply) = broker.still_vended(&serial)? {
        return Ok(reply);
    }
    let current = broker.db().issued(&serial).map_err(internal)?;

    // The same Pi (its device key recorded) enrolling again under a token that
    // paid for it once, as after re-imaging its card: no second use of the quota.
    let repeat = device == DeviceCheck::KnownKey
        && broker
            .db()
            .enrolled_with(&serial, token.id)
            .map_err(internal)?;
    if !repeat {
        let store = broker.db();
        if !store.reserve_use(&token).map_err(internal)? {
            let _ = store.audit(
                Some(token.id),
                &client,
                "refused",
                Some(&serial),
                "quota spent",
            );
            return Err(err(
                StatusCode::FORBIDDEN,
                format!("token {} has no enrollments left", token.name),
            ));
        }
    }
    // An earlier activation this card never used (expired, or its code lost in a
    // restart) is withdrawn before the new one is made.
    if let Some(old) = current.filter(|i| !i.used) {
        if let Err(e) = ssm::delete_activation(&broker.ssm, &old.activation_id).await {
            eprintln!(
                "piprov broker: withdrawing activation {} of {serial}: {e:#}",
                old.activation_id
            );
        }
    }
    let hostname = non_empty(&request.hostname).map(str::to_ascii_lowercase);
    let new = ssm::NewActivation {
        iam_role: broker.config.config.iam_role.clone(),
        registration_limit: 1,
        lifetime: broker.config.lifetime,
        default_instance_name: hostname.clone(),
        description: Some(format!("piprov broker: Pi {serial}")),
        tags: broker.activation_tags(&serial, hostname.as_deref(), &request.image_sha256),
    };
    let created = match ssm::create_activation(&broker.ssm, &new).await {
        Ok(created) => created,
        Err(e) => {
            let store = broker.db();
            if !repeat {
                let _ = store.release_use(&token);
            }
            let _ = store.audit(
                Some(token.id),
                &client,
                "ssm-error",
                Some(&serial),
                &format!("{e:#}"),
            );
            eprintln!("piprov broker: creating an activation for {serial}: {e:#}");
            return Err(err(
                StatusCode::BAD_GATEWAY,
                "SSM did not create the activation; retry later",
            ));
        }
    };
    let expires_at = now() + broker.config.lifetime.as_secs() as i64;
    broker
        .db()
        .record_issue(&NewIssue {
            serial: &serial,
            activation_id: &created.id,
            token_id: token.id,
            hostname: hostname.as_deref(),
            machine_id: non_empty(&request.machine_id),
            image_sha256: non_empty(&request.image_sha256),
            previous_instance_id: non_empty(&request.previous_instance_id),
            expires_at,
            client: &client,
        })
        .map_err(internal)?;
    eprintln!(
        "piprov broker: activation {} for Pi {serial} (token {}{})",
        created.id,
        token.name,
        match device {
            DeviceCheck::Unproved => "",
            DeviceCheck::KnownKey if repeat => ", device key known, enrolled again",
            DeviceCheck::KnownKey => ", device key known",
            DeviceCheck::NewKey => ", device key new",
        }
    );
    let reply = json!({
        "activation_id": created.id, "activation_code": created.code,
        "region": broker.config.config.region, "expires_at": expires_at, "reused": false,
    });
    broker
        .vended
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(
            serial,
            Vended {
                activation_id: created.id,
                code: created.code,
            },
        );
    Ok(axum::Json(reply).into_response())
}

async fn register(
    broker: Arc<Broker>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (token, client) = admit(&broker, peer, &headers)?;
    let request: RegistrationRequest = parse(&body)?;
    let serial = checked_serial(&request.serial)?;
    check_field(
        "instance_id",
        &request.instance_id,
        valid_instance(&request.instance_id),
    )?;
    check_previous(&request.previous_instance_id)?;
    broker.check_serial(&token, &serial, &client)?;
    let lock = broker.serial_locks.get(&serial);
    let _held = lock.lock().await;
    let Some(issued) = broker.db().issued(&serial).map_err(internal)? else {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("no activation was issued for serial {serial}"),
        ));
    };
    let ssm_error = |e: anyhow::Error| {
        eprintln!("piprov broker: registration of {serial}: {e:#}");
        err(StatusCode::BAD_GATEWAY, "SSM did not answer; retry later")
    };
    // Only the node made with this serial's activation may be tagged as it: a
    // token holder cannot claim (or get deregistered) someone else's node.
    let node = ssm::describe_node(&broker.ssm, &request.instance_id)
        .await
        .map_err(ssm_error)?;
    if node.as_ref().and_then(|n| n.activation_id.as_deref()) != Some(issued.activation_id.as_str())
    {
        let _ = broker.db().audit(
            Some(token.id),
            &client,
            "refused",
            Some(&serial),
            "node not made with this serial's activation",
        );
        return Err(err(
            StatusCode::FORBIDDEN,
            format!(
                "{} was not registered with serial {serial}'s activation",
                request.instance_id
            ),
        ));
    }
    let mut tags = vec![(TAG_SERIAL.to_string(), serial.clone())];
    if let Some(h) = &issued.hostname {
        tags.push((TAG_HOSTNAME.to_string(), h.clone()));
        tags.push((TAG_NAME.to_string(), h.clone()));
    }
    if let Some(i) = &issued.image_sha256 {
        tags.push((TAG_IMAGE.to_string(), i.clone()));
    }
    ssm::add_node_tags(&broker.ssm, &request.instance_id, &tags)
        .await
        .map_err(ssm_error)?;

    let (previous, deregistered, note) = broker
        .retire_previous(
            &token,
            &serial,
            &request.instance_id,
            &request.previous_instance_id,
        )
        .await
        .map_err(ssm_error)?;
    broker
        .db()
        .record_registration(
            &serial,
            &request.instance_id,
            &issued.activation_id,
            previous.as_deref(),
            deregistered,
            token.id,
            &client,
        )
        .map_err(internal)?;
    broker
        .vended
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&serial);
    eprintln!(
        "piprov broker: Pi {serial} registered as {}{}",
        request.instance_id,
        if deregistered {
            format!(", {} deregistered", previous.as_deref().unwrap_or_default())
        } else {
            String::new()
        }
    );
    Ok(axum::Json(json!({
        "instance_id": request.instance_id, "tagged": true,
        "deregistered_previous": deregistered, "note": note,
    }))
    .into_response())
}
