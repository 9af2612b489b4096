//! Enrollment tokens: made here, shown once, stored only as their SHA-256.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::device::DevicePolicy;
use super::store::{Store, now};

pub struct NewToken<'a> {
    pub name: &'a str,
    pub max_uses: Option<u32>,
    pub expires: Option<Duration>,
    /// File with one Pi serial per line (`#` comments).
    pub serials_file: Option<&'a Path>,
    pub device_policy: DevicePolicy,
}

/// Adds a token and returns it: the only time it is seen.
pub async fn add(store: &Store, new: &NewToken<'_>) -> Result<String> {
    if new.name.is_empty()
        || !new
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!(
            "token name {:?}: letters, digits, '-' and '_' only",
            new.name
        );
    }
    let serials = match new.serials_file {
        Some(path) => Some(read_serials(path)?),
        None => None,
    };
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    let token = format!("pvt_{}", crate::hex::hex(&bytes));
    let expires_at = new.expires.map(|d| now() + d.as_secs() as i64);
    store
        .add_token(
            new.name,
            &token,
            new.max_uses.map(i64::from),
            expires_at,
            serials.as_deref(),
            new.device_policy,
        )
        .await?;
    Ok(token)
}

fn read_serials(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut serials = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let serial = line.split('#').next().unwrap_or_default().trim();
        if serial.is_empty() {
            continue;
        }
        if serial.len() > 32 || !serial.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!(
                "{} line {}: {serial:?} is not a Pi serial",
                path.display(),
                i + 1
            );
        }
        serials.push(serial.to_ascii_lowercase());
    }
    if serials.is_empty() {
        bail!("{} lists no serials", path.display());
    }
    Ok(serials)
}
