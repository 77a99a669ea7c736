//! Browser sessions and the sign-in flow against identity (authorization code with
//! PKCE, state and nonce). The gateway owns only browser sessions: an opaque cookie
//! whose SHA-256 keys a row of the gateway's store (`store`) holding the verified
//! principal and a CSRF token.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use serde::Deserialize;
use sha2::Digest;

use common::auth::AccessClaims;
use common::config::{API_AUDIENCE, WEB_CLIENT_ID};
use common::web::{cookie, set_cookie};
use common::wire::Principal;
use common::{ApiError, ServiceName, now_unix};

use crate::AppState;
use crate::store::{GatewayStore, LoginRow, SessionRow};

pub(crate) const SESSION_COOKIE: &str = "echo_session";

/// The pre-sign-in cookie: binds a sign-in's `state` (and with it the PKCE verifier
/// and nonce kept beside it) to the browser that started it, so a callback URL opened
/// in another browser (login CSRF) completes nothing. Sent only to `/auth`.
pub(crate) const LOGIN_COOKIE: &str = "echo_login";

/// How long a started sign-in may take.
const LOGIN_TTL_SECS: i64 = 600;

#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub(crate) principal: Principal,
    pub(crate) csrf: String,
    /// The ID token of the sign-in, sent back to identity as `id_token_hint` at logout.
    pub(crate) id_token: Option<String>,
}

pub(crate) async fn load(store: &dyn GatewayStore, headers: &HeaderMap) -> Result<Option<Session>, sqlx::Error> {
    let Some(id) = cookie(headers, SESSION_COOKIE) else { return Ok(None) };
    if id.len() > 128 {
        return Ok(None);
    }
    let row = store.session(&common::rand::sha256_hex(id.as_bytes()), now_unix()).await?;
    Ok(row.map(|r| Session { principal: r.principal, csrf: r.csrf, id_token: r.id_token }))
}

fn secure(app: &AppState) -> bool {
    match app.ctx.config.gateway.secure_cookies.as_str() {
        "always" => true,
        "never" => false,
        _ => app.public_url.starts_with("https://"),
    }
}

/// Where sign-in lands when no (acceptable) `return_to` was given.
const DEFAULT_RETURN_TO: &str = "/documents";

/// Only a path on this site may be returned to after sign-in. The candidate is first
/// refused outright if it could mean something else to a browser than to us: not
/// starting with exactly one `/`, or holding a backslash, a control character (tab and
/// newline are dropped by browsers, so `/\t/evil` would become `//evil`) or any
/// whitespace. What is left is resolved by the WHATWG URL rules (the ones browsers
/// follow for `Location`) against a placeholder origin, must stay on that origin, and
/// is returned as the URL parser serialises it (path, query and fragment only).
pub(crate) fn safe_return_to(candidate: Option<&str>) -> String {
    let Some(path) = candidate else { return DEFAULT_RETURN_TO.into() };
    let suspicious = path.len() >= 2048
        || !path.starts_with('/')
        || path.starts_with("//")
        || path.chars().any(|c| c == '\\' || c.is_control() || c.is_whitespace());
    if suspicious {
        return DEFAULT_RETURN_TO.into();
    }
    let Ok(base) = url::Url::parse("http://echo.invalid/") else { return DEFAULT_RETURN_TO.into() };
    match base.join(path) {
        Ok(resolved) if resolved.origin() == base.origin() && resolved.username().is_empty() && resolved.password().is_none() => {
            let mut local = resolved.path().to_string();
            if let Some(query) = resolved.query() {
                local.push('?');
                local.push_str(query);
            }
            if let Some(fragment) = resolved.fragment() {
                local.push('#');
                local.push_str(fragment);
            }
            if local.starts_with("//") { DEFAULT_RETURN_TO.into() } else { local }
        }
        _ => DEFAULT_RETURN_TO.into(),
    }
}

#[derive(Deserialize)]
pub(crate) struct LoginParams {
    return_to: Option<String>,
}

pub(crate) async fn login(State(app): State<AppState>, headers: HeaderMap, Query(params): Query<LoginParams>) -> Result<Response, ApiError> {
    // Sign-ins started in several tabs of one browser share its binding.
    let binding = match cookie(&headers, LOGIN_COOKIE) {
        Some(value) if value.len() == 43 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => value.to_string(),
        _ => common::rand::token(32),
    };
    let state = common::rand::token(24);
    let verifier = common::rand::token(48);
    let nonce = common::rand::token(24);
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    let pending = LoginRow {
        state: state.clone(),
        verifier: verifier.clone(),
        nonce: nonce.clone(),
        return_to: safe_return_to(params.return_to.as_deref()),
        expires_at: now_unix() + LOGIN_TTL_SECS,
        binding_hash: common::rand::sha256_hex(binding.as_bytes()),
    };
    app.store.start_login(&pending, now_unix()).await?;
    let mut url = url::Url::parse(&format!("{}/authorize", app.ctx.config.issuer())).map_err(ApiError::internal)?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", WEB_CLIENT_ID)
        .append_pair("redirect_uri", &format!("{}/auth/callback", app.public_url))
        .append_pair("scope", "openid profile email echo")
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let mut response = Redirect::to(url.as_str()).into_response();
    response.headers_mut().append(header::SET_COOKIE, common::web::set_cookie_at(LOGIN_COOKIE, &binding, "/auth", LOGIN_TTL_SECS, secure(&app)));
    Ok(response)
}

#[derive(Deserialize)]
pub(crate) struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct IdClaims {
    sub: String,
    nonce: Option<String>,
}

pub(crate) async fn callback(State(app): State<AppState>, headers: HeaderMap, Query(params): Query<CallbackParams>) -> Response {
    let binding = cookie(&headers, LOGIN_COOKIE).map(str::to_string);
    match finish_login(&app, params, binding.as_deref()).await {
        Ok(response) => response,
        Err(error) => crate::pages::error_page(&error),
    }
}

async fn finish_login(app: &AppState, params: CallbackParams, binding: Option<&str>) -> Result<Response, ApiError> {
    if let Some(error) = params.error {
        let detail = params.error_description.unwrap_or_default();
        return Err(ApiError::bad_request("auth.sign_in_refused", format!("sign-in was refused: {error} {detail}")));
    }
    let (Some(code), Some(state)) = (params.code, params.state) else {
        return Err(ApiError::bad_request("auth.invalid_callback", "the sign-in response is incomplete"));
    };
    // The attempt is spent whatever happens next: a callback URL works at most once.
    let Some(pending) = app.store.take_login(&state, now_unix()).await? else {
        return Err(ApiError::bad_request("auth.unknown_state", "this sign-in attempt expired or was already used; please sign in again"));
    };
    let expected = pending.binding_hash;
    let presented = binding.map(|b| common::rand::sha256_hex(b.as_bytes())).unwrap_or_default();
    if expected.is_empty() || !common::rand::constant_time_eq(expected.as_bytes(), presented.as_bytes()) {
        tracing::warn!("sign-in callback refused: it does not belong to this browser");
        return Err(ApiError::bad_request(
            "auth.foreign_callback",
            "this sign-in was started in another browser, so it was not completed (if someone sent you this link, do not trust it). Sign in again from this browser",
        ));
    }
    let (verifier, nonce, return_to) = (pending.verifier, pending.nonce, pending.return_to);
    let redirect_uri = format!("{}/auth/callback", app.public_url);
    let response = app
        .ctx
        .peers
        .http()
        .post(format!("{}/token", app.ctx.config.url(ServiceName::Identity)))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect_uri.as_str()),
            ("client_id", WEB_CLIENT_ID),
            ("code_verifier", verifier.as_str()),
        ])
        .send()
        .await
        .map_err(|e| ApiError::unavailable("auth.idp_unavailable", e.to_string()))?;
    if !response.status().is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(ApiError::bad_request("auth.code_exchange_failed", format!("the sign-in could not be completed: {}", body.chars().take(300).collect::<String>())));
    }
    let tokens: TokenAnswer = response.json().await.map_err(ApiError::internal)?;
    let claims: AccessClaims = app.ctx.verifier.verify(&tokens.access_token, API_AUDIENCE).await?;
    let id_token = tokens.id_token.ok_or_else(|| ApiError::bad_request("auth.no_id_token", "identity sent no ID token"))?;
    let id_claims: IdClaims = app.ctx.verifier.verify_as(&id_token, WEB_CLIENT_ID).await?;
    if id_claims.nonce.as_deref() != Some(nonce.as_str()) || id_claims.sub != claims.sub {
        return Err(ApiError::bad_request("auth.nonce_mismatch", "the ID token does not belong to this sign-in"));
    }
    let principal = claims.principal().ok_or_else(|| ApiError::bad_request("auth.not_a_user", "the token does not name a user"))?;
    let session = NewSession::generate();
    let cookie = session.store(app, &principal, Some(&id_token)).await?;
    let mut response = Redirect::to(&return_to).into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().append(header::SET_COOKIE, cookie);
    Ok(response)
}

/// A browser session about to be opened: its cookie value, and the hash that keys it.
pub(crate) struct NewSession {
    id: String,
    pub(crate) id_hash: String,
}

impl NewSession {
    pub(crate) fn generate() -> NewSession {
        let id = common::rand::token(32);
        let id_hash = common::rand::sha256_hex(id.as_bytes());
        NewSession { id, id_hash }
    }

    /// Stores the session for `principal` and returns its `Set-Cookie`.
    pub(crate) async fn store(&self, app: &AppState, principal: &Principal, id_token: Option<&str>) -> Result<axum::http::HeaderValue, ApiError> {
        let ttl = app.ctx.config.gateway.session_ttl_hours * 3600;
        let now = now_unix();
        let row = SessionRow {
            id_hash: self.id_hash.clone(),
            principal: principal.clone(),
            csrf: common::rand::token(24),
            id_token: id_token.map(str::to_string),
            created_at: now,
            expires_at: now + ttl,
        };
        app.store.insert_session(&row).await?;
        Ok(set_cookie(SESSION_COOKIE, &self.id, ttl, secure(app)))
    }
}

/// Ends every browser session of `sub` except `keep` (after a password change).
pub(crate) async fn end_sessions_except(app: &AppState, sub: &str, keep: &str) -> Result<(), sqlx::Error> {
    app.store.end_sessions_except(sub, keep).await
}

#[derive(Deserialize)]
pub(crate) struct LogoutForm {
    csrf: String,
}

/// Ends the browser session, then sends the browser to identity's logout with the
/// sign-in's ID token as `id_token_hint`, so identity ends its session too without
/// asking again.
pub(crate) async fn logout(State(app): State<AppState>, headers: HeaderMap, axum::Form(form): axum::Form<LogoutForm>) -> Response {
    let mut id_token = None;
    if let Ok(Some(session)) = load(app.store.as_ref(), &headers).await {
        if !common::rand::constant_time_eq(session.csrf.as_bytes(), form.csrf.as_bytes()) {
            return crate::pages::error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
        }
        if let Some(id) = cookie(&headers, SESSION_COOKIE) {
            let _ = app.store.delete_session(&common::rand::sha256_hex(id.as_bytes())).await;
        }
        id_token = session.id_token;
    }
    let mut url = match url::Url::parse(&format!("{}/logout", app.ctx.config.issuer())) {
        Ok(url) => url,
        Err(error) => return ApiError::internal(error).into_response(),
    };
    url.query_pairs_mut().append_pair("client_id", WEB_CLIENT_ID).append_pair("post_logout_redirect_uri", &format!("{}/signed-out", app.public_url));
    if let Some(hint) = id_token {
        url.query_pairs_mut().append_pair("id_token_hint", &hint);
    }
    let mut response = Redirect::to(url.as_str()).into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", 0, secure(&app)));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn return_to_accepts_only_local_paths() {
        assert_eq!(safe_return_to(Some("/ask?q=1")), "/ask?q=1");
        assert_eq!(safe_return_to(Some("/documents/abc#page=2")), "/documents/abc#page=2");
        for hostile in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "\t//evil.example",
            " //evil.example",
            "/%09/evil.example/..",
            "javascript:alert(1)",
            "/\u{0}/evil",
            "",
        ] {
            let landed = safe_return_to(Some(hostile));
            assert!(stays_on_site(&landed), "{hostile:?} -> {landed:?}");
        }
        assert_eq!(safe_return_to(Some("/\t/evil.example")), "/documents");
        assert_eq!(safe_return_to(None), "/documents");
    }

    /// What a browser does with a `Location: <path>` sent by the gateway: WHATWG URL
    /// parsing (which drops tabs and newlines) against the gateway's origin.
    fn stays_on_site(location: &str) -> bool {
        let base = url::Url::parse("https://gateway.example/documents").unwrap();
        let browser_view: String = location.chars().filter(|c| !matches!(c, '\t' | '\n' | '\r')).collect();
        location.starts_with('/')
            && !location.starts_with("//")
            && base.join(location).is_ok_and(|u| u.origin() == base.origin())
            && base.join(&browser_view).is_ok_and(|u| u.origin() == base.origin())
    }

    /// Pieces attackers combine in open-redirect payloads.
    fn hostile_piece() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("/".to_string()), Just("\\".to_string()), Just("\t".to_string()), Just("\n".to_string()), Just("\r".to_string()),
            Just("%2F".to_string()), Just("%5C".to_string()), Just("%09".to_string()), Just("@".to_string()), Just(":".to_string()),
            Just("evil.example".to_string()), Just("..".to_string()), Just(".".to_string()), Just("?".to_string()), Just("#".to_string()),
            Just("http:".to_string()), Just("javascript:".to_string()), Just(" ".to_string()), Just("\u{3000}".to_string()),
            Just("\u{202e}".to_string()), Just("\u{0}".to_string()), "[a-z0-9]{1,4}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// Whatever `return_to` holds, the browser ends up on the gateway's own origin,
        /// and what we accept once we accept again unchanged.
        #[test]
        fn return_to_never_leaves_the_site(pieces in proptest::collection::vec(hostile_piece(), 0..8), raw in ".{0,24}") {
            for candidate in [pieces.concat(), raw.clone(), format!("/{}", pieces.concat()), format!("/{raw}")] {
                let landed = safe_return_to(Some(&candidate));
                proptest::prop_assert!(stays_on_site(&landed), "{:?} -> {:?}", candidate, landed);
                proptest::prop_assert_eq!(safe_return_to(Some(&landed)), landed.clone());
                proptest::prop_assert!(http::HeaderValue::from_str(&landed).is_ok(), "not a valid Location: {:?}", landed);
            }
        }
    }
}
