//! The device proof a token's policy asks of an activation request (see
//! device.rs): the signature, the challenge it answers, and the key recorded
//! for the serial. Every refusal is audited and answered before any AWS call.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};

use super::api::{ApiError, Broker, err, internal};
use super::device::{self, DeviceKey, DevicePolicy, ProofError};
use super::request::Checked;
use super::store::{ChallengeOutcome, Token};

/// What the device check found out about the Pi asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeviceCheck {
    /// No proof asked for (policy off) and none given.
    Unproved,
    /// Signed with a key the broker had recorded for this serial before.
    KnownKey,
    /// Signed with a key seen for the first time (recorded now, or policy off).
    NewKey,
}

impl Broker {
    async fn refuse_device(
        &self,
        token: &Token,
        client: &str,
        serial: &str,
        status: StatusCode,
        audit: &str,
        message: String,
    ) -> ApiError {
        self.audit_refusal(Some(token), client, Some(serial), audit)
            .await;
        err(status, message)
    }

    /// The device proof a token's policy asks for: signature, challenge, key.
    pub(super) async fn check_device(
        &self,
        token: &Token,
        client: &str,
        checked: &Checked,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<DeviceCheck, ApiError> {
        let serial = checked.serial.as_str();
        let policy = token.device_policy;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let key = match device::proof(
            header(device::KEY_HEADER),
            header(device::SIGNATURE_HEADER),
            body,
        ) {
            Ok(key) => key,
            Err(ProofError::Malformed(message)) => {
                return Err(self
                    .refuse_device(
                        token,
                        client,
                        serial,
                        StatusCode::BAD_REQUEST,
                        "malformed device proof",
                        message,
                    )
                    .await);
            }
            Err(ProofError::BadSignature) => {
                return Err(self
                    .refuse_device(
                        token,
                        client,
                        serial,
                        StatusCode::UNAUTHORIZED,
                        "device signature does not verify",
                        "the device signature does not verify over this request".into(),
                    )
                    .await);
            }
        };
        let Some(key) = key else {
            if policy == DevicePolicy::Off {
                return Ok(DeviceCheck::Unproved);
            }
            return Err(self
                .refuse_device(
                    token,
                    client,
                    serial,
                    StatusCode::UNAUTHORIZED,
                    "unsigned request",
                    format!(
                        "token {} has device policy {policy}: the request must be signed with the \
                     Pi's device key (recipe: activation.device_key = true)",
                        token.name
                    ),
                )
                .await);
        };
        self.take_challenge(token, client, serial, &checked.request.challenge)
            .await?;
        let recorded = self.store.device(serial).await.map_err(internal)?;
        match (policy, recorded) {
            (_, Some(d)) if d.revoked_at.is_some() && policy != DevicePolicy::Off => Err(self
                .refuse_device(
                    token,
                    client,
                    serial,
                    StatusCode::FORBIDDEN,
                    "device revoked",
                    format!("device {serial} is revoked"),
                )
                .await),
            (_, Some(d)) if d.key == key => {
                self.store.device_seen(serial).await.map_err(internal)?;
                Ok(DeviceCheck::KnownKey)
            }
            (DevicePolicy::Off, _) => Ok(DeviceCheck::NewKey),
            (_, Some(d)) => Err(self.claimed(token, client, serial, &key, &d.key).await),
            (DevicePolicy::Known, None) => Err(self
                .refuse_device(
                    token,
                    client,
                    serial,
                    StatusCode::FORBIDDEN,
                    "unknown device",
                    format!(
                        "serial {serial} is not a known device: token {} admits only imported Pis \
                     (piprov broker device import)",
                        token.name
                    ),
                )
                .await),
            (DevicePolicy::Tofu, None) => {
                let store = &self.store;
                if store
                    .record_first_key(serial, &key)
                    .await
                    .map_err(internal)?
                {
                    let _ = store
                        .audit(
                            Some(token.id),
                            client,
                            "device-first-use",
                            Some(serial),
                            &key.fingerprint(),
                        )
                        .await;
                    return Ok(DeviceCheck::NewKey);
                }
                // Another request recorded a key for this serial just now.
                let now_recorded = store.device(serial).await.map_err(internal)?;
                match now_recorded {
                    Some(d) if d.key == key => Ok(DeviceCheck::NewKey),
                    Some(d) => Err(self.claimed(token, client, serial, &key, &d.key).await),
                    None => Err(internal(anyhow::anyhow!("device {serial} vanished"))),
                }
            }
        }
    }

    /// The serial's recorded key is another: a copy of its card on other hardware.
    async fn claimed(
        &self,
        token: &Token,
        client: &str,
        serial: &str,
        key: &DeviceKey,
        recorded: &DeviceKey,
    ) -> ApiError {
        self.refuse_device(
            token,
            client,
            serial,
            StatusCode::FORBIDDEN,
            &format!(
                "serial claimed by other hardware: key {} is not the recorded {}",
                key.fingerprint(),
                recorded.fingerprint()
            ),
            format!(
                "serial {serial} is claimed by other hardware: its device key is not the one recorded for it"
            ),
        )
        .await
    }

    async fn take_challenge(
        &self,
        token: &Token,
        client: &str,
        serial: &str,
        challenge: &str,
    ) -> Result<(), ApiError> {
        if challenge.is_empty() {
            return Err(self
                .refuse_device(
                    token,
                    client,
                    serial,
                    StatusCode::BAD_REQUEST,
                    "signed request without a challenge",
                    "a signed request names its challenge (POST /v1/challenges)".into(),
                )
                .await);
        }
        let refusal = match self
            .store
            .take_challenge(challenge, token.id)
            .await
            .map_err(internal)?
        {
            ChallengeOutcome::Taken => return Ok(()),
            ChallengeOutcome::Used => {
                "the challenge was used already (a replay): fetch a fresh one"
            }
            ChallengeOutcome::Expired => "the challenge has expired: fetch a fresh one",
            ChallengeOutcome::Unknown => "the challenge is not one this broker gave this token",
        };
        Err(self
            .refuse_device(
                token,
                client,
                serial,
                StatusCode::UNAUTHORIZED,
                refusal,
                refusal.into(),
            )
            .await)
    }
}
