//! The vend key: a card's retry may reach another broker, or this one after a
//! restart, and must get the same activation back, so its code is kept in the
//! database until used, sealed with AES-256-GCM under a key from the broker's
//! config (`vend_key_file`, shared by every broker of one fleet). The sealed
//! text is bound to its serial and activation id: moved to another row, it does
//! not open. A database copied without the key holds no usable code.

use std::path::Path;

use anyhow::{Context, Result, bail};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

pub struct VendKey(LessSafeKey);

const KEY_LEN: usize = 32;

impl VendKey {
    /// A new key's file contents (hex), for `piprov broker init`.
    pub fn generate_hex() -> Result<String> {
        let mut key = [0u8; KEY_LEN];
        getrandom::getrandom(&mut key)?;
        Ok(format!("{}\n", crate::hex::hex(&key)))
    }

    pub fn read(path: &Path) -> Result<VendKey> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        match crate::hex::decode(text.trim()) {
            Some(bytes) if bytes.len() == KEY_LEN => VendKey::from_bytes(&bytes),
            _ => bail!(
                "{}: not a vend key (64 hex digits, as `piprov broker init` writes)",
                path.display()
            ),
        }
    }

    /// A key for this process only (a config without `vend_key_file`): a retry
    /// reaching the broker after a restart gets a new activation instead.
    pub fn ephemeral() -> Result<VendKey> {
        let mut key = [0u8; KEY_LEN];
        getrandom::getrandom(&mut key)?;
        VendKey::from_bytes(&key)
    }

    fn from_bytes(bytes: &[u8]) -> Result<VendKey> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| anyhow::anyhow!("the vend key is not an AES-256 key"))?;
        Ok(VendKey(LessSafeKey::new(key)))
    }

    fn aad(serial: &str, activation_id: &str) -> Vec<u8> {
        format!("piprov-vended-v1\n{serial}\n{activation_id}").into_bytes()
    }

    /// hex(nonce || ciphertext || tag).
    pub fn seal(&self, serial: &str, activation_id: &str, code: &str) -> Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce)?;
        let mut sealed = code.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(serial, activation_id)),
                &mut sealed,
            )
            .map_err(|_| anyhow::anyhow!("sealing a code failed"))?;
        Ok(crate::hex::hex(&[&nonce[..], &sealed].concat()))
    }

    /// The code, if it was sealed with this key for this serial and activation.
    pub fn open(&self, serial: &str, activation_id: &str, sealed: &str) -> Option<String> {
        let bytes = crate::hex::decode(sealed)?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let mut rest = rest.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self
            .0
            .open_in_place(
                nonce,
                Aad::from(Self::aad(serial, activation_id)),
                &mut rest,
            )
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_code_opens_only_with_its_key_serial_and_activation() {
        let key = VendKey::ephemeral().unwrap();
        let sealed = key.seal("10000000abcdef01", "act-1", "CODE-123").unwrap();
        assert!(!sealed.contains("CODE"));
        assert_eq!(
            key.open("10000000abcdef01", "act-1", &sealed).as_deref(),
            Some("CODE-123")
        );
        assert_eq!(key.open("10000000abcdef02", "act-1", &sealed), None);
        assert_eq!(key.open("10000000abcdef01", "act-2", &sealed), None);
        let other = VendKey::ephemeral().unwrap();
        assert_eq!(other.open("10000000abcdef01", "act-1", &sealed), None);
        let mut tampered = sealed.clone();
        tampered.replace_range(30..31, if &sealed[30..31] == "0" { "1" } else { "0" });
        assert_eq!(key.open("10000000abcdef01", "act-1", &tampered), None);
    }
}
