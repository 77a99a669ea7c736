//! Cryptographically secure random values (tokens, ids, secrets) from the system RNG.
//!
//! Every secret in Echo comes from here; nothing uses a seeded or thread-local PRNG.

use base64::Engine;

/// `n` random bytes from the operating system's CSPRNG.
pub fn bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    // The system RNG failing is not recoverable and never happens on Linux after boot.
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(&mut buf).expect("system random number generator failed");
    buf
}

/// A URL-safe random token carrying `n_bytes` of entropy.
pub fn token(n_bytes: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes(n_bytes))
}

/// Hex SHA-256 of a token, the form in which bearer secrets are stored.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Constant-time equality for secrets.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_and_url_safe() {
        let a = token(32);
        let b = token(32);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn constant_time_eq_compares_content_and_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
