//! Password hashing with argon2id at OWASP parameters (m=19 MiB, t=2, p=1) on a
//! bounded blocking pool, and a dummy verification for unknown users so that both
//! kinds of failure take the same time.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, Some(32)).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn pool() -> &'static Arc<Semaphore> {
    static POOL: OnceLock<Arc<Semaphore>> = OnceLock::new();
    POOL.get_or_init(|| Arc::new(Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))))
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PasswordError {
    #[error("password must be between 8 and 1024 characters")]
    Policy,
    #[error("password hashing failed")]
    Hash,
}

pub(crate) fn check_policy(password: &str) -> Result<(), PasswordError> {
    let n = password.chars().count();
    if !(8..=1024).contains(&n) {
        return Err(PasswordError::Policy);
    }
    Ok(())
}

pub(crate) fn hash_blocking(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::encode_b64(&common::rand::bytes(16)).map_err(|_| PasswordError::Hash)?;
    hasher().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|_| PasswordError::Hash)
}

pub(crate) async fn hash(password: String) -> Result<String, PasswordError> {
    check_policy(&password)?;
    let _permit = pool().acquire().await.map_err(|_| PasswordError::Hash)?;
    tokio::task::spawn_blocking(move || hash_blocking(&password)).await.map_err(|_| PasswordError::Hash)?
}

/// Verifies `password` against `stored`, or against a dummy hash when the user is
/// unknown (`stored == None`), always doing the same work.
pub(crate) async fn verify(password: String, stored: Option<String>) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let known = stored.is_some();
    let stored = match stored {
        Some(stored) => stored,
        None => DUMMY.get_or_init(|| hash_blocking("dummy-password-for-timing").unwrap_or_default()).clone(),
    };
    let Ok(_permit) = pool().acquire().await else { return false };
    let matched = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&stored).is_ok_and(|parsed| hasher().verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await
    .unwrap_or(false);
    known && matched
}

/// Wall time of `n` verifications of a correct password at Echo's parameters on the
/// calling thread: the cost every sign-in pays, for `echod bench identity`.
pub(crate) fn time_verifications(n: usize) -> Vec<std::time::Duration> {
    let Ok(stored) = hash_blocking("bench-password-123") else { return Vec::new() };
    let Ok(parsed) = PasswordHash::new(&stored) else { return Vec::new() };
    (0..n)
        .map(|_| {
            let started = std::time::Instant::now();
            let ok = hasher().verify_password(b"bench-password-123", &parsed).is_ok();
            debug_assert!(ok);
            started.elapsed()
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_only_the_right_password() {
        let stored = hash("correct horse".into()).await.unwrap();
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify("correct horse".into(), Some(stored.clone())).await);
        assert!(!verify("wrong horse".into(), Some(stored)).await);
        assert!(!verify("dummy-password-for-timing".into(), None).await);
    }

    #[tokio::test]
    async fn short_passwords_are_refused() {
        assert!(matches!(hash("short".into()).await, Err(PasswordError::Policy)));
    }
}
