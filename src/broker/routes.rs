//! The card-facing HTTP API (JSON, versioned): `POST /v1/challenges`,
//! `POST /v1/activations` (issue.rs), `POST /v1/registrations` (register.rs),
//! `GET /healthz`, behind a body limit, the request timeout and the request log.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tracing::Instrument;

use super::api::{ApiError, Broker, Peer, admit, err, internal};

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
        .layer(axum::middleware::from_fn(super::request_log::log_request))
        .with_state(broker)
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
    tokio::spawn(work.instrument(tracing::Span::current()))
        .await
        .unwrap_or_else(|e| Err(internal(anyhow::anyhow!("request task: {e}"))))
}

async fn activations(
    State(broker): State<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    detached(super::issue::issue(broker, peer, headers, body)).await
}

async fn registrations(
    State(broker): State<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    detached(super::register::register(broker, peer, headers, body)).await
}

/// A fresh single-use challenge, for a card that signs its activation request.
async fn challenges(
    State(broker): State<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (token, _) = admit(&broker, peer, &headers).await?;
    let (challenge, expires_at) = broker
        .store
        .new_challenge(token.id, broker.config.challenge_lifetime.as_secs() as i64)
        .await
        .map_err(internal)?;
    Ok(axum::Json(json!({"challenge": challenge, "expires_at": expires_at})).into_response())
}
