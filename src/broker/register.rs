//! `POST /v1/registrations`: a card reports the node its activation made. The
//! node must have been made with that serial's activation; it is tagged as the
//! Pi, the Pi's previous node may be retired, and the code is wiped.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::api::{ApiError, Broker, Peer, admit, err, internal};
use super::device::DevicePolicy;
use super::request::{
    check_field, check_previous, checked_serial, non_empty, parse, valid_instance,
};
use super::store::{Issued, Token};
use crate::ssm::{self, TAG_HOSTNAME, TAG_IMAGE, TAG_NAME, TAG_SERIAL};

#[derive(Debug, Deserialize)]
struct RegistrationRequest {
    serial: String,
    instance_id: String,
    #[serde(default)]
    previous_instance_id: String,
}

pub(super) async fn register(
    broker: Arc<Broker>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (token, client) = admit(&broker, peer, &headers).await?;
    let request: RegistrationRequest = parse(&body)?;
    let serial = checked_serial(&request.serial)?;
    check_field(
        "instance_id",
        &request.instance_id,
        valid_instance(&request.instance_id),
    )?;
    check_previous(&request.previous_instance_id)?;
    broker.check_serial(&token, &serial, &client).await?;
    let held = broker.store.lock_serial(&serial).await.map_err(internal)?;
    let reply = broker
        .register_locked(&token, &client, &serial, &request)
        .await;
    held.release(&serial).await;
    reply
}

fn ssm_error(serial: &str, e: anyhow::Error) -> ApiError {
    tracing::warn!("registration of {serial}: {e:#}");
    err(StatusCode::BAD_GATEWAY, "SSM did not answer; retry later")
}

impl Broker {
    async fn register_locked(
        &self,
        token: &Token,
        client: &str,
        serial: &str,
        request: &RegistrationRequest,
    ) -> Result<Response, ApiError> {
        let Some(issued) = self.store.issued(serial).await.map_err(internal)? else {
            return Err(err(
                StatusCode::NOT_FOUND,
                format!("no activation was issued for serial {serial}"),
            ));
        };
        self.check_node(token, client, serial, &request.instance_id, &issued)
            .await?;
        let mut tags = vec![(TAG_SERIAL.to_string(), serial.to_string())];
        if let Some(h) = &issued.hostname {
            tags.push((TAG_HOSTNAME.to_string(), h.clone()));
            tags.push((TAG_NAME.to_string(), h.clone()));
        }
        if let Some(i) = &issued.image_sha256 {
            tags.push((TAG_IMAGE.to_string(), i.clone()));
        }
        ssm::add_node_tags(&self.ssm, &request.instance_id, &tags)
            .await
            .map_err(|e| ssm_error(serial, e))?;

        let (previous, deregistered, note) = self
            .retire_previous(
                token,
                serial,
                &request.instance_id,
                &request.previous_instance_id,
            )
            .await
            .map_err(|e| ssm_error(serial, e))?;
        self.store
            .record_registration(
                serial,
                &request.instance_id,
                &issued.activation_id,
                previous.as_deref(),
                deregistered,
                token.id,
                client,
            )
            .await
            .map_err(internal)?;
        tracing::info!(
            "Pi {serial} registered as {}{}",
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

    /// Only the node made with this serial's activation may be tagged as it: a
    /// token holder cannot claim (or get deregistered) someone else's node.
    async fn check_node(
        &self,
        token: &Token,
        client: &str,
        serial: &str,
        instance_id: &str,
        issued: &Issued,
    ) -> Result<(), ApiError> {
        let made_with = ssm::node_activation(&self.ssm, instance_id)
            .await
            .map_err(|e| ssm_error(serial, e))?;
        if made_with.as_deref() == Some(issued.activation_id.as_str()) {
            return Ok(());
        }
        self.audit_refusal(
            Some(token),
            client,
            Some(serial),
            "node not made with this serial's activation",
        )
        .await;
        Err(err(
            StatusCode::FORBIDDEN,
            format!("{instance_id} was not registered with serial {serial}'s activation"),
        ))
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
            self.store.last_instance(serial).await?
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
}
