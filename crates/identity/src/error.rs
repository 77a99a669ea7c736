//! `IdentityError`: every way identity refuses, with its stable code. OAuth token
//! endpoint errors render as RFC 6749 JSON; everything else as problem+json.

use common::{ApiError, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("client authentication failed")]
    InvalidClient,
    #[error("{0}")]
    InvalidGrant(String),
    #[error("this client may not use this grant")]
    UnauthorizedClient,
    #[error("unsupported grant type")]
    UnsupportedGrantType,
    #[error("the requested audience is not an Echo service")]
    InvalidTarget,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the access token is invalid")]
    InvalidToken,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
    #[error("too many attempts; try again in {0} seconds")]
    Throttled(i64),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The key-encryption key is missing, malformed or wrong (`kek`).
    #[error("{0}")]
    KeyEncryption(String),
}

impl From<crate::kek::KekError> for IdentityError {
    fn from(error: crate::kek::KekError) -> Self {
        IdentityError::KeyEncryption(error.to_string())
    }
}

impl From<crate::keys::KeyError> for IdentityError {
    fn from(error: crate::keys::KeyError) -> Self {
        IdentityError::Internal(error.to_string())
    }
}

impl IdentityError {
    /// The OAuth 2.0 `error` value for the token endpoint.
    pub(crate) fn oauth_code(&self) -> &'static str {
        match self {
            IdentityError::InvalidClient => "invalid_client",
            IdentityError::InvalidGrant(_) | IdentityError::InvalidCredentials => "invalid_grant",
            IdentityError::UnauthorizedClient => "unauthorized_client",
            IdentityError::UnsupportedGrantType => "unsupported_grant_type",
            IdentityError::InvalidTarget => "invalid_target",
            IdentityError::InvalidToken => "invalid_token",
            IdentityError::InvalidRequest(_)
            | IdentityError::BadRequest(_)
            | IdentityError::Conflict(_)
            | IdentityError::NotFound
            | IdentityError::Throttled(_) => {
                "invalid_request"
            }
            IdentityError::Internal(_) | IdentityError::Database(_) | IdentityError::KeyEncryption(_) => "server_error",
        }
    }
}

impl From<IdentityError> for ApiError {
    fn from(error: IdentityError) -> Self {
        match error {
            IdentityError::InvalidCredentials => ApiError::new(ErrorKind::Unauthenticated, "identity.invalid_credentials", error.to_string()),
            IdentityError::InvalidToken => ApiError::new(ErrorKind::Unauthenticated, "identity.invalid_token", error.to_string()),
            IdentityError::BadRequest(message) => ApiError::new(ErrorKind::BadRequest, "identity.bad_request", message),
            IdentityError::Conflict(message) => ApiError::new(ErrorKind::Conflict, "identity.conflict", message),
            IdentityError::NotFound => ApiError::not_found("identity.not_found", "no such user"),
            IdentityError::Throttled(_) => ApiError::new(ErrorKind::TooManyRequests, "identity.throttled", error.to_string()),
            IdentityError::Internal(message) => ApiError::internal(anyhow::anyhow!(message)),
            IdentityError::Database(error) => ApiError::internal(error),
            IdentityError::KeyEncryption(message) => ApiError::internal(anyhow::anyhow!(message)),
            other => ApiError::new(ErrorKind::BadRequest, "identity.oauth_error", other.to_string()),
        }
    }
}
