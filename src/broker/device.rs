//! Hardware-bound enrollment: a Pi proves which board it is with the ECDSA
//! P-256 key in its OTP, which the firmware uses for it (`rpi-fw-crypto sign`)
//! and which no copy of its card carries. The card asks for a single-use
//! challenge, puts it in its activation request, and signs
//! `SIGNED_PREFIX || body`; the body names the challenge, the serial and the
//! machine-id, so the signature binds all of them to this one request.
//!
//! A token's device policy decides what a signature must show: `off` (none
//! needed, today's bearer-token behaviour), `tofu` (the first key seen for a
//! serial is recorded and must sign every later request for it), `known` (only
//! serials whose key was imported beforehand).

use std::fmt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ParsedPublicKey};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Domain separation: a signature made for piprov is no signature for anything
/// else the same OTP key signs (Raspberry Pi Connect uses it too).
pub const SIGNED_PREFIX: &[u8] = b"piprov-enrollment-v1\n";
/// The card's public key: hex of its DER SubjectPublicKeyInfo (`rpi-fw-crypto pubkey --outform hex`).
pub const KEY_HEADER: &str = "x-piprov-device-key";
/// The signature: hex of the DER ECDSA signature (`rpi-fw-crypto sign --outform hex`).
pub const SIGNATURE_HEADER: &str = "x-piprov-device-signature";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DevicePolicy {
    /// No device signature needed: the bearer token alone admits a card
    Off,
    /// Trust on first use: the first valid key seen for a serial is that Pi's
    Tofu,
    /// Only serials whose key was imported (`piprov broker device import`)
    Known,
}

impl DevicePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DevicePolicy::Off => "off",
            DevicePolicy::Tofu => "tofu",
            DevicePolicy::Known => "known",
        }
    }

    pub fn parse(s: &str) -> Option<DevicePolicy> {
        match s {
            "off" => Some(DevicePolicy::Off),
            "tofu" => Some(DevicePolicy::Tofu),
            "known" => Some(DevicePolicy::Known),
            _ => None,
        }
    }
}

impl fmt::Display for DevicePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device's public key, held as its canonical DER SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKey(Vec<u8>);

impl DeviceKey {
    /// A P-256 public key as DER SubjectPublicKeyInfo (what `rpi-fw-crypto pubkey` writes).
    pub fn from_der(der: &[u8]) -> Option<DeviceKey> {
        let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, der).ok()?;
        let canonical = parsed.as_der().ok()?;
        Some(DeviceKey(canonical.as_ref().to_vec()))
    }

    /// Hex or base64 of the DER, or a PEM "PUBLIC KEY" block.
    pub fn from_text(text: &str) -> Option<DeviceKey> {
        use base64::Engine;
        let text = text.trim();
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
            .split_whitespace()
            .collect();
        let der = crate::hex::decode(&body)
            .or_else(|| base64::engine::general_purpose::STANDARD.decode(&body).ok())?;
        DeviceKey::from_der(&der)
    }

    pub fn hex(&self) -> String {
        crate::hex::hex(&self.0)
    }

    /// Short name for logs and listings: the first 16 hex digits of the key's SHA-256.
    pub fn fingerprint(&self) -> String {
        crate::hex::hex(&Sha256::digest(&self.0))[..16].to_string()
    }

    /// Checks `signature` (DER ECDSA) over `SIGNED_PREFIX || body`.
    pub fn verifies(&self, body: &[u8], signature: &[u8]) -> bool {
        let mut message = Vec::with_capacity(SIGNED_PREFIX.len() + body.len());
        message.extend_from_slice(SIGNED_PREFIX);
        message.extend_from_slice(body);
        aws_lc_rs::signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.0)
            .verify(&message, signature)
            .is_ok()
    }
}

/// Why a request's device proof was refused: the status and message the card gets.
#[derive(Debug, PartialEq, Eq)]
pub enum ProofError {
    /// Malformed headers: 400.
    Malformed(String),
    /// A signature that does not verify: 401.
    BadSignature,
}

/// The device key a request proved it holds, if it carried a proof.
pub fn proof(
    key_hex: Option<&str>,
    signature_hex: Option<&str>,
    body: &[u8],
) -> Result<Option<DeviceKey>, ProofError> {
    let (key_hex, signature_hex) = match (key_hex, signature_hex) {
        (None, None) => return Ok(None),
        (Some(k), Some(s)) => (k.trim(), s.trim()),
        _ => {
            return Err(ProofError::Malformed(format!(
                "{KEY_HEADER} and {SIGNATURE_HEADER} go together"
            )));
        }
    };
    let key = crate::hex::decode(key_hex)
        .and_then(|der| DeviceKey::from_der(&der))
        .ok_or_else(|| {
            ProofError::Malformed(format!(
                "{KEY_HEADER} is not the hex of a DER P-256 public key"
            ))
        })?;
    let signature = crate::hex::decode(signature_hex)
        .ok_or_else(|| ProofError::Malformed(format!("{SIGNATURE_HEADER} is not hex")))?;
    if !key.verifies(body, &signature) {
        return Err(ProofError::BadSignature);
    }
    Ok(Some(key))
}

/// A device as the broker records it.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    pub serial: String,
    #[serde(skip)]
    pub key: DeviceKey,
    pub public_key: String,
    pub fingerprint: String,
    /// `imported` or `first-use`.
    pub source: String,
    pub added_at: i64,
    pub last_seen_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// Reads `serial,public_key` lines (a header line and `#` comments allowed).
pub fn read_import(path: &Path) -> Result<Vec<(String, DeviceKey)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut devices: Vec<(String, DeviceKey)> = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} line {}", path.display(), i + 1))?;
        let line = record.position().map_or(i as u64 + 1, |p| p.line());
        let fields: Vec<&str> = record.iter().collect();
        if i == 0
            && fields
                .first()
                .is_some_and(|f| f.eq_ignore_ascii_case("serial"))
        {
            continue;
        }
        let [serial, key] = fields[..] else {
            bail!(
                "{} line {line}: expected `serial,public_key`, found {} field(s)",
                path.display(),
                fields.len()
            );
        };
        let serial = serial.to_ascii_lowercase();
        if !(1..=32).contains(&serial.len()) || !serial.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!(
                "{} line {line}: {serial:?} is not a Pi serial",
                path.display()
            );
        }
        let Some(key) = DeviceKey::from_text(key) else {
            bail!(
                "{} line {line}: the public key of {serial} is not a P-256 key (hex or base64 of DER, as `rpi-fw-crypto pubkey` writes)",
                path.display()
            );
        };
        if let Some((_, other)) = devices.iter().find(|(s, _)| *s == serial) {
            if *other != key {
                bail!(
                    "{} line {line}: {serial} is listed twice with different keys",
                    path.display()
                );
            }
            continue;
        }
        devices.push((serial, key));
    }
    if devices.is_empty() {
        bail!("{} lists no devices", path.display());
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn board() -> (EcdsaKeyPair, String) {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let der = pair.public_key().as_der().unwrap();
        let hex = crate::hex::hex(der.as_ref());
        (pair, hex)
    }

    fn sign(pair: &EcdsaKeyPair, body: &[u8]) -> String {
        let mut message = SIGNED_PREFIX.to_vec();
        message.extend_from_slice(body);
        crate::hex::hex(pair.sign(&SystemRandom::new(), &message).unwrap().as_ref())
    }

    #[test]
    fn a_signature_over_the_body_verifies_and_nothing_else_does() {
        let (pair, key) = board();
        let body = br#"{"challenge":"ab","serial":"1000"}"#;
        let signature = sign(&pair, body);
        let proved = proof(Some(&key), Some(&signature), body).unwrap().unwrap();
        assert_eq!(proved.hex(), key);
        assert_eq!(
            proof(
                Some(&key),
                Some(&signature),
                br#"{"challenge":"ab","serial":"1001"}"#
            ),
            Err(ProofError::BadSignature)
        );
        // Truncated DER.
        assert_eq!(
            proof(Some(&key), Some(&signature[..signature.len() - 8]), body),
            Err(ProofError::BadSignature)
        );
        // Another board's key.
        let (_, other) = board();
        assert_eq!(
            proof(Some(&other), Some(&signature), body),
            Err(ProofError::BadSignature)
        );
        // Signed without the prefix: not a piprov enrollment signature.
        let bare = crate::hex::hex(pair.sign(&SystemRandom::new(), body).unwrap().as_ref());
        assert_eq!(
            proof(Some(&key), Some(&bare), body),
            Err(ProofError::BadSignature)
        );
        assert_eq!(proof(None, None, body), Ok(None));
        assert!(matches!(
            proof(Some(&key), None, body),
            Err(ProofError::Malformed(_))
        ));
        assert!(matches!(
            proof(Some("zz"), Some(&signature), body),
            Err(ProofError::Malformed(_))
        ));
    }
}
