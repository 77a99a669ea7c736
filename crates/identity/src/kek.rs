//! The key-encryption key: private signing keys are stored in `identity.db` only
//! sealed with AES-256-GCM under it (the key id as associated data, so a sealed key
//! cannot be moved to another row), and the login form's HMAC key is derived from it.
//! A copied `identity.db` alone therefore signs nothing and forges no form.
//!
//! Where it comes from, first match wins: the environment variable
//! `ECHO_IDENTITY_KEK` (base64 of 32 bytes, for containers), the file named by
//! `identity.kek_file` (a mounted secret), or `secrets/identity.kek` under the data
//! dir, created on first use. Never logged, never printed. No database access here.

use std::path::PathBuf;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;

/// Prefix of a sealed key: format version 1 (AES-256-GCM, 96-bit random nonce).
const SEALED_PREFIX: &[u8] = b"EKv1";

pub(crate) const KEK_ENV: &str = "ECHO_IDENTITY_KEK";

#[derive(Debug, thiserror::Error)]
pub(crate) enum KekError {
    #[error(
        "identity.db holds encrypted signing keys, but the key-encryption key is missing ({0}); restore it from your backup, \
         or start over with a new identity.db"
    )]
    Missing(String),
    #[error("the key-encryption key {0} is not 32 bytes of base64")]
    Malformed(String),
    #[error("cannot read or create the key-encryption key {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("a stored signing key does not open with this key-encryption key (wrong key, or the row was altered)")]
    WrongKey,
    #[error("sealing failed")]
    Seal,
}

pub(crate) struct KeyEncryptionKey {
    aead: LessSafeKey,
    /// For deriving other keys (HMAC-SHA256 with a label).
    derive: aws_lc_rs::hmac::Key,
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEncryptionKey(<redacted>)")
    }
}

fn decode(text: &str, origin: &str) -> Result<[u8; 32], KekError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim()))
        .map_err(|_| KekError::Malformed(origin.to_string()))?;
    bytes.try_into().map_err(|_| KekError::Malformed(origin.to_string()))
}

impl KeyEncryptionKey {
    fn from_bytes(raw: [u8; 32]) -> Result<KeyEncryptionKey, KekError> {
        let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| KekError::Seal)?;
        Ok(KeyEncryptionKey { aead: LessSafeKey::new(unbound), derive: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &raw) })
    }

    /// Finds the key (see the module doc). `may_create`: the database holds no sealed
    /// key yet, so a missing default file may be created; otherwise its absence is an
    /// error that says what to do.
    pub(crate) fn load(config: &common::EchoConfig, may_create: bool) -> Result<KeyEncryptionKey, KekError> {
        if let Ok(text) = std::env::var(KEK_ENV)
            && !text.trim().is_empty()
        {
            return KeyEncryptionKey::from_bytes(decode(&text, KEK_ENV)?);
        }
        let (path, default_location): (PathBuf, bool) = match &config.identity.kek_file {
            Some(path) => (path.clone(), false),
            None => (config.secrets_dir().join("identity.kek"), true),
        };
        let shown = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => KeyEncryptionKey::from_bytes(decode(&text, &shown)?),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && may_create && default_location => {
                let raw: [u8; 32] = common::rand::bytes(32).try_into().map_err(|_| KekError::Seal)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|error| KekError::Io { path: shown.clone(), error })?;
                }
                let text = base64::engine::general_purpose::STANDARD.encode(raw);
                match common::files::write_new_secret(&path, text.as_bytes()) {
                    Ok(()) => KeyEncryptionKey::from_bytes(raw),
                    // Another process (`echod user add` beside `up`) made it first: use theirs.
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                        let text = std::fs::read_to_string(&path).map_err(|error| KekError::Io { path: shown.clone(), error })?;
                        KeyEncryptionKey::from_bytes(decode(&text, &shown)?)
                    }
                    Err(error) => Err(KekError::Io { path: shown, error }),
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(KekError::Missing(shown)),
            Err(error) => Err(KekError::Io { path: shown, error }),
        }
    }

    /// Whether `stored` is already sealed (keys written before encryption existed are not).
    pub(crate) fn is_sealed(stored: &[u8]) -> bool {
        stored.starts_with(SEALED_PREFIX)
    }

    pub(crate) fn seal(&self, kid: &str, plaintext: &[u8]) -> Result<Vec<u8>, KekError> {
        let nonce_bytes: [u8; NONCE_LEN] = common::rand::bytes(NONCE_LEN).try_into().map_err(|_| KekError::Seal)?;
        let mut sealed = plaintext.to_vec();
        self.aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(kid.as_bytes()), &mut sealed)
            .map_err(|_| KekError::Seal)?;
        let mut out = Vec::with_capacity(SEALED_PREFIX.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(SEALED_PREFIX);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub(crate) fn open(&self, kid: &str, stored: &[u8]) -> Result<Vec<u8>, KekError> {
        let rest = stored.strip_prefix(SEALED_PREFIX).ok_or(KekError::WrongKey)?;
        if rest.len() < NONCE_LEN {
            return Err(KekError::WrongKey);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KekError::WrongKey)?;
        let mut buffer = sealed.to_vec();
        let plain = self.aead.open_in_place(nonce, Aad::from(kid.as_bytes()), &mut buffer).map_err(|_| KekError::WrongKey)?;
        Ok(plain.to_vec())
    }

    /// A 32-byte key for `label`, independent of every other label's.
    pub(crate) fn derive(&self, label: &str) -> Vec<u8> {
        aws_lc_rs::hmac::sign(&self.derive, label.as_bytes()).as_ref().to_vec()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn kek() -> KeyEncryptionKey {
        KeyEncryptionKey::from_bytes([7u8; 32]).unwrap()
    }

    #[test]
    fn sealed_keys_open_only_with_their_key_and_their_row() {
        let sealed = kek().seal("rs256-abc", b"private key bytes").unwrap();
        assert!(KeyEncryptionKey::is_sealed(&sealed));
        assert!(!sealed.windows(17).any(|w| w == b"private key bytes"), "the plaintext does not appear");
        assert_eq!(kek().open("rs256-abc", &sealed).unwrap(), b"private key bytes");
        assert!(matches!(kek().open("rs256-other", &sealed), Err(KekError::WrongKey)), "bound to its kid");
        let other = KeyEncryptionKey::from_bytes([8u8; 32]).unwrap();
        assert!(matches!(other.open("rs256-abc", &sealed), Err(KekError::WrongKey)));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(kek().open("rs256-abc", &flipped).is_err());
        assert!(kek().open("rs256-abc", b"EKv1").is_err());
        assert_ne!(kek().derive("a"), kek().derive("b"));
    }

    #[test]
    fn a_missing_key_is_created_only_when_nothing_was_sealed_yet() {
        let dir = tempfile::tempdir().unwrap();
        let config = common::EchoConfig::for_test(dir.path());
        let error = KeyEncryptionKey::load(&config, false).unwrap_err().to_string();
        assert!(error.contains("identity.kek") && error.contains("restore"), "{error}");
        let created = KeyEncryptionKey::load(&config, true).unwrap();
        let sealed = created.seal("k", b"x").unwrap();
        let again = KeyEncryptionKey::load(&config, false).unwrap();
        assert_eq!(again.open("k", &sealed).unwrap(), b"x", "the same key is read back");
        std::fs::write(config.secrets_dir().join("identity.kek"), "short").unwrap();
        assert!(matches!(KeyEncryptionKey::load(&config, false), Err(KekError::Malformed(_))));
    }
}
