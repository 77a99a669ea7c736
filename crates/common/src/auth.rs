//! Token verification (every service) and service tokens (every caller).
//!
//! `TokenVerifier` checks a JWT fully: `kid` against the issuer's JWKS, signature,
//! `alg` from an allow-list (RS256, ES256, EdDSA; never `none`, never HMAC) that must
//! also equal the `alg` the JWKS publishes for that `kid`, `iss`, `aud`,
//! `exp` and `nbf`. `ServiceTokens` mints client-credentials tokens whose audience
//! is the callee and caches them until shortly before they expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};

use crate::config::ServiceName;
use crate::error::{ApiError, ErrorKind};
use crate::wire::Principal;

/// Claims of an Echo access token (users and services alike).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: serde_json::Value,
    pub exp: i64,
    pub iat: i64,
    #[serde(default)]
    pub nbf: Option<i64>,
    pub jti: String,
    #[serde(default)]
    pub scope: String,
    pub client_id: String,
    #[serde(default)]
    pub preferred_username: Option<String>,
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
}

impl AccessClaims {
    /// The user this token speaks for; `None` for service tokens.
    pub fn principal(&self) -> Option<Principal> {
        Some(Principal {
            sub: self.sub.clone(),
            username: self.preferred_username.clone()?,
            org: self.org.clone()?,
            roles: self.roles.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm is not allowed")]
    Algorithm,
    #[error("token signing key is unknown")]
    UnknownKey,
    #[error("token is invalid: {0}")]
    Invalid(String),
    #[error("identity provider unreachable: {0}")]
    Unavailable(String),
}

impl From<TokenError> for ApiError {
    fn from(error: TokenError) -> Self {
        match error {
            TokenError::Unavailable(message) => ApiError::new(ErrorKind::Unavailable, "auth.idp_unavailable", message),
            other => ApiError::new(ErrorKind::Unauthenticated, "auth.invalid_token", other.to_string()),
        }
    }
}

/// The asymmetric algorithms identity signs with. Anything else is refused unread.
pub const ALLOWED_ALGS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

struct KeyCache {
    /// `kid` → key and the algorithm its JWK declares.
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
}

/// Verifies tokens against the issuer's JWKS, refetching when an unknown `kid`
/// appears (at most once every few seconds, so garbage cannot hammer identity).
#[derive(Clone)]
pub struct TokenVerifier {
    issuer: String,
    jwks_url: String,
    http: reqwest::Client,
    cache: Arc<RwLock<KeyCache>>,
    refetch: Arc<Mutex<()>>,
    verified: Arc<std::sync::Mutex<HashMap<[u8; 32], Verified>>>,
}

/// A token whose signature, issuer, audience and times checked out: the same bytes
/// check out the same way until the token expires, so the signature is not computed
/// again for each request that carries it (revocation is checked by the caller on
/// every request regardless).
struct Verified {
    claims: serde_json::Value,
    expires: u64,
}

/// Tokens remembered as verified before the memory starts over.
const MAX_VERIFIED: usize = 10_000;

const MIN_REFETCH: Duration = Duration::from_secs(5);

impl TokenVerifier {
    pub fn new(issuer: &str, identity_url: &str, http: reqwest::Client) -> TokenVerifier {
        TokenVerifier {
            issuer: issuer.trim_end_matches('/').to_string(),
            jwks_url: format!("{}/jwks", identity_url.trim_end_matches('/')),
            http,
            cache: Arc::new(RwLock::new(KeyCache { keys: HashMap::new(), fetched_at: None })),
            refetch: Arc::new(Mutex::new(())),
            verified: Arc::new(std::sync::Mutex::new(HashMap::new())),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies the access token `token` for `audience` and returns its claims. Access
    /// tokens are typed `at+jwt` (RFC 9068 §4): an ID token, or any other JWT identity
    /// signed, is not one however right its audience.
    pub async fn verify(&self, token: &str, audience: &str) -> Result<AccessClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let typ = header.typ.as_deref().unwrap_or_default().to_ascii_lowercase();
        if typ != "at+jwt" && typ != "application/at+jwt" {
            return Err(TokenError::Invalid("not an access token (typ must be at+jwt)".into()));
        }
        self.verify_as::<AccessClaims>(token, audience).await
    }

    /// Verifies any JWT identity signed (ID tokens included) for `audience`.
    pub async fn verify_as<T: serde::de::DeserializeOwned>(&self, token: &str, audience: &str) -> Result<T, TokenError> {
        if token.len() > 16 * 1024 {
            return Err(TokenError::Malformed);
        }
        let fingerprint: [u8; 32] = {
            use sha2::Digest;
            let mut hasher = sha2::Sha256::new();
            hasher.update(audience.as_bytes());
            hasher.update([0]);
            hasher.update(token.as_bytes());
            hasher.finalize().into()
        };
        let now = crate::now_unix() as u64;
        let remembered = self.verified.lock().ok().and_then(|verified| verified.get(&fingerprint).filter(|v| now < v.expires).map(|v| v.claims.clone()));
        if let Some(claims) = remembered {
            return serde_json::from_value(claims).map_err(|e| TokenError::Invalid(e.to_string()));
        }
        let claims: serde_json::Value = self.verify_signature(token, audience).await?;
        let expires = claims["exp"].as_u64().unwrap_or(0);
        let typed = serde_json::from_value(claims.clone()).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= MAX_VERIFIED {
                verified.retain(|_, v| now < v.expires);
                if verified.len() >= MAX_VERIFIED {
                    verified.clear();
                }
            }
            verified.insert(fingerprint, Verified { claims, expires });
        }
        Ok(typed)
    }

    /// The full check: algorithm, key, signature, issuer, audience, times.
    async fn verify_signature(&self, token: &str, audience: &str) -> Result<serde_json::Value, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !ALLOWED_ALGS.contains(&header.alg) {
            return Err(TokenError::Algorithm);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let (key, key_alg) = self.key(&kid).await?;
        // A key signs for one algorithm only: no switching an EC key to another family.
        if key_alg != header.alg {
            return Err(TokenError::Algorithm);
        }
        let mut validation = Validation::new(key_alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[audience]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| TokenError::Invalid(e.to_string()))?;
        Ok(data.claims)
    }

    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), TokenError> {
        if let Some(key) = self.cache.read().await.keys.get(kid) {
            return Ok(key.clone());
        }
        let _guard = self.refetch.lock().await;
        {
            let cache = self.cache.read().await;
            if let Some(key) = cache.keys.get(kid) {
                return Ok(key.clone());
            }
            if cache.fetched_at.is_some_and(|t| t.elapsed() < MIN_REFETCH) {
                return Err(TokenError::UnknownKey);
            }
        }
        let jwks: JwkSet = self
            .http
            .get(&self.jwks_url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| TokenError::Unavailable(e.to_string()))?
            .json()
            .await
            .map_err(|e| TokenError::Unavailable(e.to_string()))?;
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            // Only keys that name an allowed algorithm are usable.
            let alg = jwk.common.key_algorithm.and_then(|a| a.to_string().parse::<Algorithm>().ok()).filter(|a| ALLOWED_ALGS.contains(a));
            if let (Some(id), Some(alg), Ok(key)) = (jwk.common.key_id.clone(), alg, DecodingKey::from_jwk(jwk)) {
                keys.insert(id, (key, alg));
            }
        }
        let mut cache = self.cache.write().await;
        cache.keys = keys;
        cache.fetched_at = Some(Instant::now());
        cache.keys.get(kid).cloned().ok_or(TokenError::UnknownKey)
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: i64,
}

/// Client-credentials tokens for calling other services, cached per audience.
#[derive(Clone)]
pub struct ServiceTokens {
    client_id: String,
    secret: Arc<String>,
    token_url: String,
    http: reqwest::Client,
    cache: Arc<Mutex<HashMap<String, (String, Instant)>>>,
}

impl std::fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTokens").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

impl ServiceTokens {
    pub fn new(client_id: String, secret: String, identity_url: &str, http: reqwest::Client) -> ServiceTokens {
        ServiceTokens {
            client_id,
            secret: Arc::new(secret),
            token_url: format!("{}/token", identity_url.trim_end_matches('/')),
            http,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A valid access token for calling `callee`.
    pub async fn token_for(&self, callee: ServiceName) -> Result<String, ApiError> {
        let audience = callee.audience();
        let mut cache = self.cache.lock().await;
        if let Some((token, valid_until)) = cache.get(&audience)
            && Instant::now() < *valid_until {
                return Ok(token.clone());
            }
        let response = self
            .http
            .post(&self.token_url)
            .basic_auth(&self.client_id, Some(self.secret.as_str()))
            .form(&[("grant_type", "client_credentials"), ("audience", audience.as_str())])
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| ApiError::unavailable("auth.idp_unavailable", format!("identity unreachable: {e}")))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(ApiError::unavailable(
                "auth.service_token_refused",
                format!("identity refused a service token for {}: {status} {body}", self.client_id),
            ));
        }
        let token: TokenResponse = response.json().await.map_err(ApiError::internal)?;
        let lifetime = Duration::from_secs(token.expires_in.max(0) as u64);
        let valid_until = Instant::now() + lifetime.saturating_sub(Duration::from_secs(60)).max(Duration::from_secs(5));
        cache.insert(audience, (token.access_token.clone(), valid_until));
        Ok(token.access_token)
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }
}

/// Pulls a bearer token out of an `Authorization` header value.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use base64::Engine;
    use proptest::prelude::*;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn verifier() -> TokenVerifier {
        // Port 9 is closed: any attempt to fetch keys fails fast, so only structure is tested.
        TokenVerifier::new("http://127.0.0.1:9", "http://127.0.0.1:9", reqwest::Client::new())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_never_verifies(token in ".{0,400}") {
            prop_assert!(runtime().block_on(verifier().verify(&token, "echo-api")).is_err());
        }

        #[test]
        fn only_access_tokens_are_verified_as_access_tokens(typ in prop_oneof![Just("JWT".to_string()), Just("jwt".to_string()), Just(String::new()), Just("id+jwt".to_string()), ".{0,12}"]) {
            let header = serde_json::json!({"alg": "RS256", "typ": typ, "kid": "k"}).to_string();
            let token = format!("{}.{}.{}", b64(header.as_bytes()), b64(b"{}"), b64(b"sig"));
            let outcome = runtime().block_on(verifier().verify(&token, "echo-api"));
            let accepted_typ = typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt");
            prop_assert!(accepted_typ || matches!(outcome, Err(TokenError::Invalid(_))), "{:?}", outcome.err());
        }

        #[test]
        fn only_allowed_algorithms_get_as_far_as_key_lookup(
            alg in prop::sample::select(vec!["none", "None", "HS256", "HS384", "HS512", "ES384", "PS256", "RS384", "RS512", "rs256", ""]),
            kid in "[a-z0-9]{0,16}",
            payload in prop::collection::vec(any::<u8>(), 0..64),
            signature in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let header = serde_json::json!({"alg": alg, "typ": "at+jwt", "kid": kid}).to_string();
            let token = format!("{}.{}.{}", b64(header.as_bytes()), b64(&payload), b64(&signature));
            let outcome = runtime().block_on(verifier().verify(&token, "echo-api"));
            prop_assert!(matches!(outcome, Err(TokenError::Algorithm) | Err(TokenError::Malformed)), "{:?}", outcome.err());
        }

        #[test]
        fn allowed_algorithms_without_a_kid_are_refused_before_any_network(
            alg in prop::sample::select(vec!["RS256", "ES256", "EdDSA"]),
            payload in prop::collection::vec(any::<u8>(), 0..64),
            signature in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let header = serde_json::json!({"alg": alg, "typ": "at+jwt"}).to_string();
            let token = format!("{}.{}.{}", b64(header.as_bytes()), b64(&payload), b64(&signature));
            let outcome = runtime().block_on(verifier().verify(&token, "echo-api"));
            prop_assert!(matches!(outcome, Err(TokenError::UnknownKey)), "{:?}", outcome.err());
        }
    }
}
