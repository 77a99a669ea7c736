//! The API error every service renders: RFC 9457 problem+json with a stable `code`.
//!
//! Each service crate has its own error enum and maps it into `ApiError`. Details of
//! internal (5xx) errors are logged with their cause chain and never sent.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    TooManyRequests,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn from_status(status: u16) -> ErrorKind {
        match status {
            400 | 422 => ErrorKind::BadRequest,
            401 => ErrorKind::Unauthenticated,
            403 => ErrorKind::Forbidden,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            413 => ErrorKind::PayloadTooLarge,
            415 => ErrorKind::UnsupportedMediaType,
            429 => ErrorKind::TooManyRequests,
            502..=504 => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

/// The RFC 9457 body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    pub code: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub code: Cow<'static, str>,
    pub detail: String,
    pub source: Option<anyhow::Error>,
    /// Seconds until a refused request may be tried again (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

impl ApiError {
    pub fn new(kind: ErrorKind, code: impl Into<Cow<'static, str>>, detail: impl Into<String>) -> Self {
        ApiError { kind, code: code.into(), detail: detail.into(), source: None, retry_after: None }
    }
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, code, detail)
    }
    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, code, detail)
    }
    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthenticated, "auth.unauthenticated", detail)
    }
    pub fn forbidden(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, code, detail)
    }
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, code, detail)
    }
    pub fn unavailable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, code, detail)
    }
    /// An internal failure: `source` is logged, never sent.
    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        ApiError {
            kind: ErrorKind::Internal,
            code: "internal".into(),
            detail: "an internal error occurred".into(),
            source: Some(source.into()),
            retry_after: None,
        }
    }

    /// A request refused by a rate limit, to be tried again after `retry_after_secs`.
    pub fn rate_limited(detail: impl Into<String>, retry_after_secs: u64) -> Self {
        ApiError { retry_after: Some(retry_after_secs.max(1)), ..Self::new(ErrorKind::TooManyRequests, "request.rate_limited", detail) }
    }

    pub fn title(&self) -> &'static str {
        match self.kind {
            ErrorKind::BadRequest => "Bad request",
            ErrorKind::Unauthenticated => "Authentication required",
            ErrorKind::Forbidden => "Forbidden",
            ErrorKind::NotFound => "Not found",
            ErrorKind::Conflict => "Conflict",
            ErrorKind::PayloadTooLarge => "Payload too large",
            ErrorKind::UnsupportedMediaType => "Unsupported media type",
            ErrorKind::TooManyRequests => "Too many requests",
            ErrorKind::Unavailable => "Service unavailable",
            ErrorKind::Internal => "Internal error",
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.kind.status().as_u16();
        Problem {
            type_: format!("https://echo.dev/problems/{}", self.code),
            title: self.title().to_string(),
            status,
            detail: self.detail.clone(),
            code: self.code.to_string(),
        }
    }

    /// Rebuilds the error a peer service answered with, so a 404 from a callee
    /// stays a 404 at the edge while 5xx details stay hidden.
    pub fn from_problem(problem: Problem) -> Self {
        let kind = ErrorKind::from_status(problem.status);
        if kind == ErrorKind::Internal {
            return ApiError::internal(anyhow::anyhow!("peer answered {}: {}", problem.code, problem.detail));
        }
        ApiError::new(kind, problem.code, problem.detail)
    }

    pub fn log(&self) {
        if self.kind == ErrorKind::Internal || self.kind == ErrorKind::Unavailable {
            match &self.source {
                Some(source) => tracing::error!(code = %self.code, error = %format!("{source:#}"), "request failed"),
                None => tracing::warn!(code = %self.code, detail = %self.detail, "request failed"),
            }
        }
    }
}

/// The code of a 403 whose token lacks a scope the route needs; `detail` names it.
pub const INSUFFICIENT_SCOPE: &str = "auth.insufficient_scope";

impl ApiError {
    /// The RFC 6750 §3 challenge: bare when no credentials came, `invalid_token` when
    /// the ones that came are refused, `insufficient_scope` (with the scope wanted)
    /// when the token may not do this.
    fn bearer_challenge(&self) -> Option<HeaderValue> {
        let quoted = |text: &str| -> String { text.chars().filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\').take(200).collect() };
        let value = match self.kind {
            ErrorKind::Unauthenticated if self.code == "auth.unauthenticated" => "Bearer realm=\"echo\"".to_string(),
            ErrorKind::Unauthenticated => format!("Bearer realm=\"echo\", error=\"invalid_token\", error_description=\"{}\"", quoted(&self.detail)),
            ErrorKind::Forbidden if self.code == INSUFFICIENT_SCOPE => {
                let scope = self.detail.split('`').nth(1).unwrap_or("echo");
                format!("Bearer realm=\"echo\", error=\"insufficient_scope\", scope=\"{}\", error_description=\"{}\"", quoted(scope), quoted(&self.detail))
            }
            _ => return None,
        };
        HeaderValue::from_str(&value).ok()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let problem = self.problem();
        let status = self.kind.status();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(challenge) = self.bearer_challenge() {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::internal(error)
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        let kind = ErrorKind::from_status(rejection.status().as_u16());
        let kind = if kind == ErrorKind::Internal { ErrorKind::BadRequest } else { kind };
        let code = if kind == ErrorKind::PayloadTooLarge { "request.too_large" } else { "request.invalid_json" };
        ApiError::new(kind, code, rejection.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::new(ErrorKind::BadRequest, "request.invalid_query", rejection.body_text())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON extractor whose rejections are problem+json.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// A query-string extractor whose rejections are problem+json.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_cause() {
        let error = ApiError::internal(anyhow::anyhow!("database file /secret/path is locked"));
        let problem = error.problem();
        assert_eq!(problem.status, 500);
        assert!(!problem.detail.contains("secret"));
    }

    #[test]
    fn peer_problems_keep_client_errors_and_hide_server_errors() {
        let not_found = Problem {
            type_: String::new(),
            title: String::new(),
            status: 404,
            detail: "no such document".into(),
            code: "ingest.document_not_found".into(),
        };
        let error = ApiError::from_problem(not_found);
        assert_eq!(error.kind, ErrorKind::NotFound);
        assert_eq!(error.code, "ingest.document_not_found");
        let broken = Problem { status: 500, ..error.problem() };
        assert_eq!(ApiError::from_problem(broken).problem().detail, "an internal error occurred");
    }
}
