//! The broker's state, its errors, and the gate every card request passes (rate
//! limit, token, serial allowlist). Every refusal is audited and answered
//! before any call to AWS. Tokens and codes never reach a log.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::config::Loaded;
use super::rate::RateLimiter;
use super::sealing::VendKey;
use super::store::{Store, Token, now};

/// The client's address, attached to each connection's requests.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

pub struct Broker {
    pub config: Loaded,
    pub store: Store,
    pub(super) ssm: aws_sdk_ssm::Client,
    pub(super) vend_key: VendKey,
    /// Per process: each broker limits what reaches it. Requests refused at the
    /// token count against their address; a token's requests against the token,
    /// so cards behind one NAT do not share one address's allowance.
    by_address: RateLimiter<IpAddr>,
    by_token: RateLimiter<i64>,
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
    tracing::error!("{e:#}");
    err(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

impl Broker {
    pub fn new(
        config: Loaded,
        store: Store,
        ssm: aws_sdk_ssm::Client,
        vend_key: VendKey,
    ) -> Broker {
        Broker {
            store,
            ssm,
            by_address: RateLimiter::new(config.config.rate_limit_per_minute),
            by_token: RateLimiter::new(config.config.token_rate_limit_per_minute),
            vend_key,
            config,
        }
    }

    /// How long an issue may take to be recorded (the database's clock): past
    /// it, a clean-up may delete the activation, and recording it fails.
    pub fn lease_secs(&self) -> i64 {
        self.config.timeout.as_secs() as i64 + 10
    }

    /// A refusal worth auditing; the audit's own failure does not change the answer.
    pub(super) async fn audit_refusal(
        &self,
        token: Option<&Token>,
        client: &str,
        serial: Option<&str>,
        reason: &str,
    ) {
        if let Err(e) = self
            .store
            .audit(token.map(|t| t.id), client, "refused", serial, reason)
            .await
        {
            tracing::warn!("auditing a refusal: {e:#}");
        }
    }

    async fn authorize(&self, headers: &HeaderMap, client: &str) -> Result<Token, ApiError> {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
        let Some(token) = self
            .store
            .token_by_secret(presented)
            .await
            .map_err(internal)?
        else {
            self.audit_refusal(None, client, None, "unknown token")
                .await;
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
            self.audit_refusal(Some(&token), client, None, reason).await;
            return Err(err(StatusCode::UNAUTHORIZED, reason));
        }
        Ok(token)
    }

    pub(super) async fn check_serial(
        &self,
        token: &Token,
        serial: &str,
        client: &str,
    ) -> Result<(), ApiError> {
        if let Some(allowed) = &token.serials {
            if !allowed.iter().any(|s| s.eq_ignore_ascii_case(serial)) {
                self.audit_refusal(Some(token), client, Some(serial), "serial not allowed")
                    .await;
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
pub(super) async fn admit(
    broker: &Broker,
    peer: Peer,
    headers: &HeaderMap,
) -> Result<(Token, String), ApiError> {
    let address = peer.0.ip();
    if !broker.by_address.has_room(&address) {
        return Err(err(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests: slow down",
        ));
    }
    let client = address.to_string();
    let token = match broker.authorize(headers, &client).await {
        Ok(token) => token,
        Err(refused) => {
            broker.by_address.spend(&address);
            return Err(refused);
        }
    };
    if !broker.by_token.spend(&token.id) {
        return Err(err(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many requests with token {}: slow down", token.name),
        ));
    }
    Ok((token, client))
}
