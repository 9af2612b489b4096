//! `POST /v1/activations`: a card asks for its activation. In order: admit
//! (rate limit, token), check the request and the serial, check the device
//! proof; then, holding the serial's lock (on every broker of the database),
//! hand back an activation still unused, or reserve a use of the token, make a
//! new activation and record it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::api::{ApiError, Broker, Peer, admit, err, internal};
use super::device_check::DeviceCheck;
use super::request::{ActivationRequest, Checked, check_activation_request, non_empty};
use super::store::{Issued, LateIssue, NewIssue, Token, now};
use crate::ssm::{
    self, TAG_BROKER, TAG_HOSTNAME, TAG_IMAGE, TAG_ISSUE, TAG_NAME, TAG_SERIAL, TAG_VERSION,
};

pub(super) async fn issue(
    broker: Arc<Broker>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (token, client) = admit(&broker, peer, &headers).await?;
    let checked = check_activation_request(&body)?;
    broker
        .check_serial(&token, &checked.serial, &client)
        .await?;
    let device = broker
        .check_device(&token, &client, &checked, &headers, &body)
        .await?;
    // One request per serial at a time: a retry racing its original (on this
    // broker or another) gets the same activation, never a second one.
    let serial = checked.serial.clone();
    let held = broker.store.lock_serial(&serial).await.map_err(internal)?;
    let reply = broker.issue_locked(&token, &client, device, checked).await;
    held.release(&serial).await;
    reply
}

impl Broker {
    async fn issue_locked(
        &self,
        token: &Token,
        client: &str,
        device: DeviceCheck,
        checked: Checked,
    ) -> Result<Response, ApiError> {
        let Checked { request, serial } = checked;
        let current = self.store.issued(&serial).await.map_err(internal)?;
        if let Some(reply) = current.as_ref().and_then(|i| self.still_vended(&serial, i)) {
            return Ok(reply);
        }
        // The same Pi (its device key recorded) enrolling again under a token
        // that paid for it once, as after re-imaging its card: no second use.
        let repeat = device == DeviceCheck::KnownKey
            && self
                .store
                .enrolled_with(&serial, token.id)
                .await
                .map_err(internal)?;
        if !repeat {
            self.reserve_use(token, client, &serial).await?;
        }
        // An earlier activation this card never used (expired, or its code no
        // longer opens) is withdrawn before the new one is made.
        if let Some(old) = current.filter(|i| !i.used) {
            if let Err(e) = ssm::delete_activation(&self.ssm, &old.activation_id).await {
                tracing::warn!(
                    "withdrawing activation {} of {serial}: {e:#}",
                    old.activation_id
                );
            }
        }
        let (reply, activation_id) =
            match self.make_activation(token, client, &serial, &request).await {
                Ok(made) => made,
                Err(e) => {
                    if !repeat {
                        if let Err(e) = self.store.release_use(token).await {
                            tracing::warn!("giving back token {}'s use: {e:#}", token.name);
                        }
                    }
                    return Err(e);
                }
            };
        tracing::info!(
            "activation {activation_id} for Pi {serial} (token {}{})",
            token.name,
            match device {
                DeviceCheck::Unproved => "",
                DeviceCheck::KnownKey if repeat => ", device key known, enrolled again",
                DeviceCheck::KnownKey => ", device key known",
                DeviceCheck::NewKey => ", device key new",
            }
        );
        Ok(reply)
    }

    /// An activation already handed to this serial and not yet used: a retry
    /// gets it again, if its code opens with this broker's vend key.
    fn still_vended(&self, serial: &str, issued: &Issued) -> Option<Response> {
        if issued.used || issued.expires_at <= now() + 60 {
            return None;
        }
        let code = self.vend_key.open(
            serial,
            &issued.activation_id,
            issued.code_sealed.as_deref()?,
        )?;
        Some(
            axum::Json(json!({
                "activation_id": issued.activation_id, "activation_code": code,
                "region": self.config.config.region, "expires_at": issued.expires_at,
                "reused": true,
            }))
            .into_response(),
        )
    }

    async fn reserve_use(&self, token: &Token, client: &str, serial: &str) -> Result<(), ApiError> {
        if self.store.reserve_use(token).await.map_err(internal)? {
            return Ok(());
        }
        self.audit_refusal(Some(token), client, Some(serial), "quota spent")
            .await;
        Err(err(
            StatusCode::FORBIDDEN,
            format!("token {} has no enrollments left", token.name),
        ))
    }

    /// Announces the issue, makes the activation, records it (with its code
    /// sealed) and answers. An activation that cannot be recorded in time is
    /// withdrawn here: no card gets a code the database does not know.
    async fn make_activation(
        &self,
        token: &Token,
        client: &str,
        serial: &str,
        request: &ActivationRequest,
    ) -> Result<(Response, String), ApiError> {
        let issue_id = self
            .store
            .begin_issue(serial, self.lease_secs())
            .await
            .map_err(internal)?;
        let hostname = non_empty(&request.hostname).map(str::to_ascii_lowercase);
        let new = ssm::NewActivation {
            iam_role: self.config.config.iam_role.clone(),
            registration_limit: 1,
            lifetime: self.config.lifetime,
            default_instance_name: hostname.clone(),
            description: Some(format!("piprov broker: Pi {serial}")),
            tags: self.activation_tags(
                serial,
                hostname.as_deref(),
                &request.image_sha256,
                &issue_id,
            ),
        };
        let created = match ssm::create_activation(&self.ssm, &new).await {
            Ok(created) => created,
            Err(e) => {
                let _ = self.store.abandon_issue(&issue_id).await;
                let _ = self
                    .store
                    .audit(
                        Some(token.id),
                        client,
                        "ssm-error",
                        Some(serial),
                        &format!("{e:#}"),
                    )
                    .await;
                tracing::warn!("creating an activation for {serial}: {e:#}");
                return Err(err(
                    StatusCode::BAD_GATEWAY,
                    "SSM did not create the activation; retry later",
                ));
            }
        };
        let expires_at = now() + self.config.lifetime.as_secs() as i64;
        let recorded = match self.vend_key.seal(serial, &created.id, &created.code) {
            Ok(code_sealed) => {
                self.store
                    .record_issue(&NewIssue {
                        issue_id: &issue_id,
                        serial,
                        activation_id: &created.id,
                        code_sealed: &code_sealed,
                        token_id: token.id,
                        hostname: hostname.as_deref(),
                        machine_id: non_empty(&request.machine_id),
                        image_sha256: non_empty(&request.image_sha256),
                        previous_instance_id: non_empty(&request.previous_instance_id),
                        expires_at,
                        client,
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = recorded {
            if let Err(withdraw) = ssm::delete_activation(&self.ssm, &created.id).await {
                tracing::warn!(
                    "withdrawing unrecorded activation {}: {withdraw:#} (a clean-up deletes it)",
                    created.id
                );
            }
            if e.is::<LateIssue>() {
                tracing::warn!("activation for {serial} came after its deadline: withdrawn");
                return Err(err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the activation took too long to make; retry",
                ));
            }
            return Err(internal(
                e.context(format!("recording {serial}'s activation")),
            ));
        }
        let reply = axum::Json(json!({
            "activation_id": created.id, "activation_code": created.code,
            "region": self.config.config.region, "expires_at": expires_at, "reused": false,
        }))
        .into_response();
        Ok((reply, created.id))
    }

    fn activation_tags(
        &self,
        serial: &str,
        hostname: Option<&str>,
        image: &str,
        issue_id: &str,
    ) -> Vec<(String, String)> {
        let mut tags = vec![
            (TAG_SERIAL.to_string(), serial.to_string()),
            (TAG_BROKER.to_string(), self.config.config.broker_id.clone()),
            (TAG_ISSUE.to_string(), issue_id.to_string()),
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
