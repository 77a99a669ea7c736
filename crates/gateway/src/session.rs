//! Browser sessions and the sign-in flow against identity (authorization code with
//! PKCE, state and nonce). The gateway owns only browser sessions: an opaque cookie
//! whose SHA-256 keys a row in `gateway.db` holding the verified principal and a CSRF token.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use serde::Deserialize;
use sha2::Digest;
use sqlx::{Row, SqlitePool};

use common::auth::AccessClaims;
use common::config::{API_AUDIENCE, WEB_CLIENT_ID};
use common::web::{cookie, set_cookie};
use common::wire::Principal;
use common::{ApiError, ServiceName, now_unix};

use crate::AppState;

pub(crate) const SESSION_COOKIE: &str = "echo_session";

pub(crate) const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    sub TEXT NOT NULL,
    username TEXT NOT NULL,
    org TEXT NOT NULL,
    roles TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE logins (
    state TEXT PRIMARY KEY,
    verifier TEXT NOT NULL,
    nonce TEXT NOT NULL,
    return_to TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
"#, r#"
CREATE TABLE disabled_users (sub TEXT PRIMARY KEY, disabled_at INTEGER NOT NULL);
"#];

#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub(crate) principal: Principal,
    pub(crate) csrf: String,
}

pub(crate) async fn load(pool: &SqlitePool, headers: &HeaderMap) -> Result<Option<Session>, sqlx::Error> {
    let Some(id) = cookie(headers, SESSION_COOKIE) else { return Ok(None) };
    if id.len() > 128 {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT * FROM sessions s WHERE id_hash = ? AND expires_at > ? AND NOT EXISTS (SELECT 1 FROM disabled_users d WHERE d.sub = s.sub)",
    )
        .bind(common::rand::sha256_hex(id.as_bytes()))
        .bind(now_unix())
        .fetch_optional(pool)
        .await?;
    row.map(|r| -> Result<Session, sqlx::Error> {
        let roles: String = r.try_get("roles")?;
        Ok(Session {
            principal: Principal {
                sub: r.try_get("sub")?,
                username: r.try_get("username")?,
                org: r.try_get("org")?,
                roles: serde_json::from_str(&roles).unwrap_or_default(),
            },
            csrf: r.try_get("csrf")?,
        })
    })
    .transpose()
}

fn secure(app: &AppState) -> bool {
    match app.ctx.config.gateway.secure_cookies.as_str() {
        "always" => true,
        "never" => false,
        _ => app.public_url.starts_with("https://"),
    }
}

/// Only same-site relative paths may be returned to after sign-in.
pub(crate) fn safe_return_to(candidate: Option<&str>) -> String {
    match candidate {
        Some(path) if path.starts_with('/') && !path.starts_with("//") && !path.contains('\\') && path.len() < 2048 => path.to_string(),
        _ => "/documents".to_string(),
    }
}

#[derive(Deserialize)]
pub(crate) struct LoginParams {
    return_to: Option<String>,
}

pub(crate) async fn login(State(app): State<AppState>, Query(params): Query<LoginParams>) -> Result<Response, ApiError> {
    let state = common::rand::token(24);
    let verifier = common::rand::token(48);
    let nonce = common::rand::token(24);
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    sqlx::query("DELETE FROM logins WHERE expires_at < ?").bind(now_unix()).execute(&app.pool).await?;
    sqlx::query("INSERT INTO logins (state, verifier, nonce, return_to, expires_at) VALUES (?, ?, ?, ?, ?)")
        .bind(&state)
        .bind(&verifier)
        .bind(&nonce)
        .bind(safe_return_to(params.return_to.as_deref()))
        .bind(now_unix() + 600)
        .execute(&app.pool)
        .await?;
    let mut url = url::Url::parse(&format!("{}/authorize", app.ctx.config.issuer())).map_err(ApiError::internal)?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", WEB_CLIENT_ID)
        .append_pair("redirect_uri", &format!("{}/auth/callback", app.public_url))
        .append_pair("scope", "openid profile email")
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    Ok(Redirect::to(url.as_str()).into_response())
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

pub(crate) async fn callback(State(app): State<AppState>, Query(params): Query<CallbackParams>) -> Response {
    match finish_login(&app, params).await {
        Ok(response) => response,
        Err(error) => crate::pages::error_page(&error),
    }
}

async fn finish_login(app: &AppState, params: CallbackParams) -> Result<Response, ApiError> {
    if let Some(error) = params.error {
        let detail = params.error_description.unwrap_or_default();
        return Err(ApiError::bad_request("auth.sign_in_refused", format!("sign-in was refused: {error} {detail}")));
    }
    let (Some(code), Some(state)) = (params.code, params.state) else {
        return Err(ApiError::bad_request("auth.invalid_callback", "the sign-in response is incomplete"));
    };
    let row = sqlx::query("DELETE FROM logins WHERE state = ? AND expires_at > ? RETURNING verifier, nonce, return_to")
        .bind(&state)
        .bind(now_unix())
        .fetch_optional(&app.pool)
        .await?;
    let Some(row) = row else {
        return Err(ApiError::bad_request("auth.unknown_state", "this sign-in attempt expired or was already used; please sign in again"));
    };
    let verifier: String = row.try_get("verifier")?;
    let nonce: String = row.try_get("nonce")?;
    let return_to: String = row.try_get("return_to")?;
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
    let session_id = common::rand::token(32);
    let ttl = app.ctx.config.gateway.session_ttl_hours * 3600;
    sqlx::query("INSERT INTO sessions (id_hash, sub, username, org, roles, csrf, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        .bind(common::rand::sha256_hex(session_id.as_bytes()))
        .bind(&principal.sub)
        .bind(&principal.username)
        .bind(&principal.org)
        .bind(serde_json::to_string(&principal.roles).unwrap_or_default())
        .bind(common::rand::token(24))
        .bind(now_unix())
        .bind(now_unix() + ttl)
        .execute(&app.pool)
        .await?;
    let mut response = Redirect::to(&return_to).into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, &session_id, ttl, secure(app)));
    Ok(response)
}

#[derive(Deserialize)]
pub(crate) struct LogoutForm {
    csrf: String,
}

pub(crate) async fn logout(State(app): State<AppState>, headers: HeaderMap, axum::Form(form): axum::Form<LogoutForm>) -> Response {
    if let Ok(Some(session)) = load(&app.pool, &headers).await {
        if !common::rand::constant_time_eq(session.csrf.as_bytes(), form.csrf.as_bytes()) {
            return crate::pages::error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
        }
        if let Some(id) = cookie(&headers, SESSION_COOKIE) {
            let _ = sqlx::query("DELETE FROM sessions WHERE id_hash = ?").bind(common::rand::sha256_hex(id.as_bytes())).execute(&app.pool).await;
        }
    }
    let mut url = match url::Url::parse(&format!("{}/logout", app.ctx.config.issuer())) {
        Ok(url) => url,
        Err(error) => return ApiError::internal(error).into_response(),
    };
    url.query_pairs_mut().append_pair("client_id", WEB_CLIENT_ID).append_pair("post_logout_redirect_uri", &format!("{}/signed-out", app.public_url));
    let mut response = Redirect::to(url.as_str()).into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", 0, secure(&app)));
    response
}

/// Whether identity announced this user as disabled.
pub(crate) async fn is_disabled(pool: &SqlitePool, sub: &str) -> Result<bool, sqlx::Error> {
    let found: Option<String> = sqlx::query_scalar("SELECT sub FROM disabled_users WHERE sub = ?").bind(sub).fetch_optional(pool).await?;
    Ok(found.is_some())
}

/// Consumes `echo.user.disabled`: the user's sessions end and their unexpired access
/// tokens are refused from the next request on.
pub(crate) fn spawn_disabled_consumer(app: AppState, ready: common::server::ReadyFlag) {
    tokio::spawn(async move {
        let ctx = app.ctx.clone();
        let spec = common::bus::SubscriptionSpec { topic: common::wire::events::USER_DISABLED.into(), max_deliveries: None, lease_ms: None, ordered: None };
        if !ctx.bus.declare("gateway-user-disabled", &spec, &ctx.shutdown).await {
            return;
        }
        ready.set();
        let pool = app.pool.clone();
        ctx.bus.spawn_consumer("gateway-user-disabled", 1, ctx.shutdown.clone(), move |event, _| {
            let pool = pool.clone();
            async move {
                let user: common::wire::UserSummary = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                let mut tx = common::db::begin_write(&pool).await.map_err(|e| e.to_string())?;
                sqlx::query("INSERT OR IGNORE INTO disabled_users (sub, disabled_at) VALUES (?, ?)")
                    .bind(&user.id)
                    .bind(now_unix())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query("DELETE FROM sessions WHERE sub = ?").bind(&user.id).execute(&mut *tx).await.map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())
            }
        });
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn return_to_accepts_only_local_paths() {
        assert_eq!(safe_return_to(Some("/ask?q=1")), "/ask?q=1");
        assert_eq!(safe_return_to(Some("//evil.example/")), "/documents");
        assert_eq!(safe_return_to(Some("https://evil.example/")), "/documents");
        assert_eq!(safe_return_to(Some("/\\evil.example")), "/documents");
        assert_eq!(safe_return_to(None), "/documents");
    }
}
