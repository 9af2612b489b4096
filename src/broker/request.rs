//! What a card sends, checked before anything else happens: the JSON bodies'
//! shapes and every field's form (serial, hostname, machine-id, image hash,
//! challenge, instance ids).

use axum::body::Bytes;
use axum::http::StatusCode;
use serde::Deserialize;

use super::api::{ApiError, err};

#[derive(Debug, Deserialize)]
pub(super) struct ActivationRequest {
    /// Required when the request is signed with a device key: what binds the
    /// signature to this one request.
    #[serde(default)]
    pub(super) challenge: String,
    pub(super) serial: String,
    #[serde(default)]
    pub(super) hostname: String,
    #[serde(default)]
    pub(super) machine_id: String,
    #[serde(default)]
    pub(super) image_sha256: String,
    #[serde(default)]
    pub(super) previous_instance_id: String,
}

/// An activation request whose fields are checked, with its serial normalised.
pub(super) struct Checked {
    pub(super) request: ActivationRequest,
    pub(super) serial: String,
}

pub(super) fn check_activation_request(body: &Bytes) -> Result<Checked, ApiError> {
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

pub(super) fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {e}"),
        )
    })
}

pub(super) fn check_field(name: &str, value: &str, ok: bool) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(err(
            StatusCode::BAD_REQUEST,
            format!("{name} {value:?} is not valid"),
        ))
    }
}

pub(super) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_serial(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

pub(super) fn valid_instance(s: &str) -> bool {
    s.strip_prefix("mi-").is_some_and(|rest| is_hex(rest, 17))
}

/// A Pi serial (or MAC) as the broker keys it: lower case, checked.
pub(super) fn checked_serial(raw: &str) -> Result<String, ApiError> {
    let serial = raw.to_ascii_lowercase();
    check_field("serial", raw, valid_serial(&serial))?;
    Ok(serial)
}

pub(super) fn check_previous(previous: &str) -> Result<(), ApiError> {
    check_field(
        "previous_instance_id",
        previous,
        previous.is_empty() || valid_instance(previous),
    )
}

pub(super) fn non_empty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}
