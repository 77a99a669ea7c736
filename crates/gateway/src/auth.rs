//! Who is calling the public API: a bearer access token from identity (signature,
//! `alg`, `iss`, `aud`, `exp`, `nbf` all checked) or a browser session. Cookie-
//! authenticated writes must carry the session's CSRF token in `x-csrf-token`.

use axum::extract::FromRequestParts;
use axum::http::Method;
use axum::http::request::Parts;

use common::config::API_AUDIENCE;
use common::wire::Principal;
use common::{ApiError, ErrorKind};

use crate::AppState;
use crate::limits::Budget;
use crate::session::{self, Session};

/// An authenticated API caller.
pub(crate) struct Caller {
    pub(crate) principal: Principal,
    /// The browser session the request came with (`None` for bearer tokens).
    pub(crate) session: Option<Session>,
}

/// The path the client asked for (nested routers see it without their prefix).
fn original_path(parts: &Parts) -> String {
    parts.extensions.get::<axum::extract::OriginalUri>().map(|u| u.0.path().to_string()).unwrap_or_else(|| parts.uri.path().to_string())
}

/// Spends one request of the caller's budget for this kind of request; a refusal is
/// held a moment before it is answered (see `limits::REFUSAL_HOLD`).
async fn spend(app: &AppState, parts: &Parts, sub: &str) -> Result<(), ApiError> {
    let spent = app.limits.check_user(sub, Budget::of(&parts.method, &original_path(parts)));
    if spent.is_err() {
        tokio::time::sleep(crate::limits::REFUSAL_HOLD).await;
    }
    spent
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Self::Rejection> {
        let caller = authenticate(parts, app).await?;
        spend(app, parts, &caller.principal.sub).await?;
        Ok(caller)
    }
}

/// Whether a token of `scope` may make `method path`: `echo` may do anything;
/// `echo:read` reads (and searches and asks, which change no document); `echo:ask`
/// only asks (and reads who the caller is, and reads, renames and deletes their
/// conversations). `openid` and
/// the other identity scopes give no API access at all.
pub(crate) fn scope_allows(scope: &str, method: &Method, path: &str) -> bool {
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    if scopes.contains(&"echo") {
        return true;
    }
    let asks = matches!((method, path), (&Method::POST, "/api/v1/ask" | "/v1/chat/completions"));
    let reads = matches!(method, &Method::GET | &Method::HEAD) || asks || (method == Method::POST && path == "/api/v1/search");
    let ask_reads = matches!(method, &Method::GET | &Method::HEAD) && (path == "/api/v1/me" || path == "/v1/models" || path.starts_with("/api/v1/conversations"));
    // Renaming and deleting one's own conversations is part of asking.
    let own_conversations = matches!(method, &Method::PATCH | &Method::DELETE) && path.starts_with("/api/v1/conversations/");
    (scopes.contains(&"echo:read") && reads) || (scopes.contains(&"echo:ask") && (asks || ask_reads || own_conversations))
}

async fn authenticate(parts: &Parts, app: &AppState) -> Result<Caller, ApiError> {
    if let Some(token) = common::auth::bearer(&parts.headers) {
        let claims = app.ctx.verifier.verify(token, API_AUDIENCE).await?;
        if !scope_allows(&claims.scope, &parts.method, &original_path(parts)) {
            return Err(ApiError::forbidden(
                common::error::INSUFFICIENT_SCOPE,
                "this token lacks the scope `echo` this request needs (ask for it at sign-in; `openid` alone gives identity, not API access)",
            ));
        }
        let principal = claims
            .principal()
            .ok_or_else(|| ApiError::forbidden("auth.no_user", "this token acts for no user, and Echo's API answers people"))?;
        if app.revocations.token_revoked(&claims.jti) {
            return Err(ApiError::new(ErrorKind::Unauthenticated, "auth.invalid_token", "this token was revoked"));
        }
        if app.revocations.user_disabled(&principal.sub) {
            return Err(ApiError::new(ErrorKind::Unauthenticated, "auth.invalid_token", "this account is disabled"));
        }
        return Ok(Caller { principal, session: None });
    }
    let session = session::load(app.store.as_ref(), &parts.headers).await?.ok_or_else(|| ApiError::unauthenticated("sign in or send a bearer token"))?;
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let presented = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !common::rand::constant_time_eq(presented.as_bytes(), session.csrf.as_bytes()) {
            return Err(ApiError::new(ErrorKind::Forbidden, "auth.csrf", "cookie-authenticated writes need the x-csrf-token header"));
        }
    }
    Ok(Caller { principal: session.principal.clone(), session: Some(session) })
}

/// A signed-in browser user; pages redirect to sign-in when absent.
pub(crate) struct PageUser(pub(crate) Session);

pub(crate) struct SignInRedirect(String);

impl axum::response::IntoResponse for SignInRedirect {
    fn into_response(self) -> axum::response::Response {
        let target = format!("/auth/login?return_to={}", common::client::encode(&self.0));
        axum::response::Redirect::to(&target).into_response()
    }
}

impl FromRequestParts<AppState> for PageUser {
    type Rejection = axum::response::Response;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Self::Rejection> {
        use axum::response::IntoResponse;
        match session::load(app.store.as_ref(), &parts.headers).await {
            Ok(Some(session)) => match spend(app, parts, &session.principal.sub).await {
                Ok(()) => Ok(PageUser(session)),
                Err(refused) => Err(crate::pages::error_page(&refused)),
            },
            Ok(None) => {
                let path = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
                Err(SignInRedirect(path).into_response())
            }
            Err(error) => Err(crate::pages::error_page(&ApiError::from(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_open_only_their_routes() {
        let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
        assert!(scope_allows("openid echo", &delete, "/api/v1/documents/x"));
        assert!(!scope_allows("openid profile email offline_access", &get, "/api/v1/me"), "identity scopes give no API access");
        assert!(!scope_allows("", &get, "/api/v1/documents"));
        assert!(scope_allows("echo:read", &get, "/api/v1/documents"));
        assert!(scope_allows("echo:read", &post, "/api/v1/search"));
        assert!(scope_allows("echo:read", &post, "/api/v1/ask"));
        assert!(!scope_allows("echo:read", &post, "/api/v1/documents"));
        assert!(!scope_allows("echo:read", &delete, "/api/v1/documents/x"));
        assert!(scope_allows("echo:ask", &post, "/v1/chat/completions"));
        assert!(scope_allows("echo:ask", &get, "/api/v1/conversations/x"));
        assert!(scope_allows("echo:ask", &Method::DELETE, "/api/v1/conversations/x"));
        assert!(!scope_allows("echo:ask", &Method::DELETE, "/api/v1/documents/x"));
        assert!(!scope_allows("echo:ask", &get, "/api/v1/documents"));
        assert!(!scope_allows("echo:ask", &post, "/api/v1/search"));
        assert!(!scope_allows("echoes", &get, "/api/v1/me"));
    }
}
