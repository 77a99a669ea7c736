//! Identity's HTTP surface: discovery, JWKS, `/authorize` with its login page,
//! `/token`, `/userinfo`, `/logout`, and the internal user directory for services.
//! Handlers only extract, call `service`, and render.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router, middleware};
use base64::Engine;
use serde::Deserialize;

use common::error::{Json, Query};
use common::server::ServiceContext;
use common::web::{cookie, html_security_headers, set_cookie};
use common::{ApiError, now_unix};

use crate::error::IdentityError;
use crate::service::{AuthorizeFailure, AuthorizeParams, Identity};

const SESSION_COOKIE: &str = "echo_idp";

pub(crate) fn router(identity: Identity, ctx: ServiceContext) -> Router {
    let internal = Router::new()
        .route("/internal/users/{id}", get(internal_user))
        .route("/internal/orgs/{org}/users", get(internal_org_users))
        .route("/internal/users", post(internal_create_user))
        .route("/internal/users/{id}/disable", post(internal_disable_user))
        .route("/internal/users/{id}/password", post(internal_change_password))
        .route("/internal/users/{id}/role", post(internal_set_role))
        .route("/internal/users/{id}/reset", post(internal_send_reset))
        .route("/internal/keys/rotate", post(internal_rotate_keys))
        .route("/internal/users/{id}/consents", get(internal_consents))
        .route("/internal/users/{id}/consents/{client}", axum::routing::delete(internal_withdraw_consent))
        .route_layer(middleware::from_fn_with_state(ctx, common::server::require_service_token))
        .with_state(identity.clone());
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/authorize", get(authorize).post(authorize_post))
        .route("/consent", post(consent))
        .route("/login", post(login))
        .route("/login/password", post(first_password))
        .route("/token", post(token))
        .route("/userinfo", get(userinfo).post(userinfo))
        .route("/revoke", post(revoke))
        .route("/introspect", post(introspect))
        .route("/logout", get(logout).post(logout))
        .route("/forgot", get(forgot_form).post(forgot))
        .route("/reset", get(reset_form).post(reset))
        .route("/signup", get(signup_form).post(signup))
        .layer(middleware::from_fn_with_state(identity.clone(), cors))
        .with_state(identity)
        .merge(internal)
}

/// The endpoints a browser app calls directly (CORS), and whether any origin may.
fn cors_policy(path: &str) -> Option<bool> {
    match path {
        "/.well-known/openid-configuration" | "/jwks" => Some(true),
        "/token" | "/userinfo" | "/revoke" => Some(false),
        _ => None,
    }
}

/// CORS for browser-based clients (single-page apps): discovery and JWKS for anyone;
/// token, userinfo and revocation for the origins of registered redirect URIs (a
/// loopback one on any port). Preflights are answered here; no cookies are involved
/// (no `Access-Control-Allow-Credentials`).
async fn cors(State(identity): State<Identity>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let Some(public) = cors_policy(request.uri().path()) else { return next.run(request).await };
    let Some(origin) = request.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return next.run(request).await;
    };
    let allowed = public || identity.origin_registered(&origin).await;
    let preflight = request.method() == axum::http::Method::OPTIONS;
    let mut response = if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(request).await };
    let headers = response.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if allowed {
        let value = if public { HeaderValue::from_static("*") } else { HeaderValue::from_str(&origin).unwrap_or(HeaderValue::from_static("null")) };
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("www-authenticate"));
        if preflight {
            headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type, dpop"));
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        }
    }
    response
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    action: &'a str,
    client_id: &'a str,
    params: &'a AuthorizeParams,
    form_token: String,
    username: &'a str,
    error: Option<&'a str>,
    /// Where "Create an account" leads, when open sign-up is on.
    signup_href: Option<String>,
}

#[derive(Template)]
#[template(path = "first_password.html")]
struct FirstPasswordPage<'a> {
    action: &'a str,
    params: &'a AuthorizeParams,
    form_token: String,
    change_token: String,
    username: &'a str,
    error: Option<&'a str>,
}

fn first_password_page(identity: &Identity, params: &AuthorizeParams, user: &crate::store::User, error: Option<&str>, status: StatusCode) -> Response {
    let expires_at = now_unix() + 600;
    let page_html = FirstPasswordPage {
        action: &format!("{}/login/password", identity.issuer),
        params,
        form_token: identity.form_token(params, expires_at),
        change_token: identity.change_token(&user.id, params, expires_at),
        username: &user.username,
        error,
    }
    .render();
    page(status, page_html)
}

#[derive(Template)]
#[template(path = "signup.html")]
struct SignupPage<'a> {
    action: &'a str,
    params: &'a AuthorizeParams,
    form_token: String,
    username: &'a str,
    email: &'a str,
    org: &'a str,
    error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    title: &'a str,
    message: &'a str,
}

fn page(status: StatusCode, html: Result<String, askama::Error>) -> Response {
    let mut response = match html {
        Ok(html) => (status, Html(html)).into_response(),
        Err(error) => ApiError::internal(error).into_response(),
    };
    html_security_headers(response.headers_mut());
    response
}

fn message(status: StatusCode, title: &str, text: &str) -> Response {
    page(status, MessagePage { title, message: text }.render())
}

fn secure(identity: &Identity) -> bool {
    identity.issuer.starts_with("https://")
}

async fn discovery(State(identity): State<Identity>) -> Response {
    let issuer = &identity.issuer;
    axum::Json(serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "userinfo_endpoint": format!("{issuer}/userinfo"),
        "jwks_uri": format!("{issuer}/jwks"),
        "end_session_endpoint": format!("{issuer}/logout"),
        "revocation_endpoint": format!("{issuer}/revoke"),
        "introspection_endpoint": format!("{issuer}/introspect"),
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": crate::service::SCOPES,
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "at_hash", "azp", "preferred_username", "name", "email", "email_verified", "org", "roles"],
        "prompt_values_supported": ["none", "login", "consent"],
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "authorization_response_iss_parameter_supported": true,
        "claims_parameter_supported": false,
    }))
    .into_response()
}

async fn jwks(State(identity): State<Identity>) -> Response {
    let keys = identity.keys.read().await;
    let mut response = axum::Json(crate::keys::jwks(&keys)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    response
}

fn redirect_with(redirect_uri: &str, pairs: &[(&str, &str)]) -> Response {
    let mut url = match url::Url::parse(redirect_uri) {
        Ok(url) => url,
        Err(_) => return message(StatusCode::BAD_REQUEST, "Sign-in failed", "The redirect URI is invalid."),
    };
    {
        let mut query = url.query_pairs_mut();
        for (key, value) in pairs {
            query.append_pair(key, value);
        }
    }
    let mut response = Redirect::to(url.as_str()).into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response
}

/// Our own page when the client or its redirect URI cannot be trusted; otherwise back
/// to the client with `error`, its `state` and our `iss` (RFC 9207).
fn failure_response(identity: &Identity, failure: AuthorizeFailure) -> Response {
    match failure {
        AuthorizeFailure::Page(text) => message(StatusCode::BAD_REQUEST, "Sign-in request refused", &text),
        AuthorizeFailure::Redirect { redirect_uri, error, description, state } => {
            let mut pairs = vec![("error", error), ("error_description", description.as_str())];
            if let Some(state) = state.as_deref() {
                pairs.push(("state", state));
            }
            pairs.push(("iss", identity.issuer.as_str()));
            redirect_with(&redirect_uri, &pairs)
        }
    }
}

fn redirect_error(params: &AuthorizeParams, error: &'static str, description: &str) -> AuthorizeFailure {
    AuthorizeFailure::Redirect { redirect_uri: params.redirect_uri.clone(), error, description: description.to_string(), state: params.state.clone() }
}

#[derive(Template)]
#[template(path = "consent.html")]
struct ConsentPage<'a> {
    action: &'a str,
    client_id: &'a str,
    username: &'a str,
    scopes: Vec<(&'a str, &'static str)>,
    params: &'a AuthorizeParams,
    form_token: String,
    consent_token: String,
}

/// Asks `user` (signed in at `auth_time`) whether the client may have what it asked for.
fn consent_page(identity: &Identity, params: &AuthorizeParams, user: &crate::store::User, auth_time: i64) -> Response {
    let expires_at = now_unix() + 600;
    let granted = crate::service::granted_scope(&params.scope);
    let page_html = ConsentPage {
        action: &format!("{}/consent", identity.issuer),
        client_id: &params.client_id,
        username: &user.username,
        scopes: granted.split_whitespace().map(|s| (s, crate::service::describe_scope(s))).collect(),
        params,
        form_token: identity.form_token(params, expires_at),
        consent_token: identity.consent_token(&user.id, auth_time, params, expires_at),
    }
    .render();
    page(StatusCode::OK, page_html)
}

/// After the password was checked: the identity session, then either the code back
/// to the client or, when the client needs this user's consent first, the question.
async fn finish_sign_in(identity: &Identity, client: &crate::store::Client, params: &AuthorizeParams, user: &crate::store::User, ip: &str) -> Response {
    metrics::counter!("echo_identity_sign_ins_total", "outcome" => "succeeded").increment(1);
    identity.audit(&user.id, "identity.login_succeeded", &format!("user:{}", user.id), "success", serde_json::json!({"client_id": params.client_id})).await;
    let needs_consent = match identity.needs_consent(client, user, params).await {
        Ok(needs) => needs,
        Err(error) => return ApiError::from(error).into_response(),
    };
    let (session_id, ttl, mut response) = if needs_consent {
        if let Err(error) = identity.record_login_outcome(&user.username, ip, true).await {
            tracing::warn!(%error, "could not record the sign-in");
        }
        let (session_id, ttl) = match identity.start_session(user).await {
            Ok(session) => session,
            Err(error) => return ApiError::from(error).into_response(),
        };
        (session_id, ttl, consent_page(identity, params, user, now_unix()))
    } else {
        // Failures forgotten, session and code stored: one transaction.
        match identity.complete_login(user, &user.username, ip, params).await {
            Ok((session_id, ttl, code)) => (session_id, ttl, redirect_with_code(identity, params, &code)),
            Err(error) => return ApiError::from(error).into_response(),
        }
    };
    response.headers_mut().append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, &session_id, ttl, secure(identity)));
    response
}

#[derive(Deserialize)]
struct ConsentForm {
    #[serde(flatten)]
    params: AuthorizeParams,
    #[serde(default)]
    form_token: String,
    #[serde(default)]
    consent_token: String,
    #[serde(default)]
    decision: String,
}

/// The consent page's answer: remembered and on to the client with a code, or back
/// to the client with `access_denied`.
async fn consent(State(identity): State<Identity>, headers: HeaderMap, Form(form): Form<ConsentForm>) -> Response {
    let params = form.params;
    if let Err(failure) = identity.validate_authorize(&params).await {
        return failure_response(&identity, failure);
    }
    let valid = !cross_site(&headers) && identity.check_form_token(&params, &form.form_token);
    let signed_in = valid.then(|| identity.check_consent_token(&params, &form.consent_token)).flatten();
    let user = match signed_in {
        Some((user_id, auth_time)) => identity.store.user_by_id(&user_id).await.ok().flatten().filter(|u| !u.disabled).map(|u| (u, auth_time)),
        None => None,
    };
    let Some((user, auth_time)) = user else {
        return login_page(&identity, &params, "", Some("This page expired. Please sign in again."), StatusCode::BAD_REQUEST);
    };
    if form.decision != "allow" {
        identity.audit(&user.id, "identity.consent_denied", &format!("client:{}", params.client_id), "denied", serde_json::json!({"scope": params.scope})).await;
        return failure_response(&identity, redirect_error(&params, "access_denied", "the user did not allow this application"));
    }
    let granted = crate::service::granted_scope(&params.scope);
    if let Err(error) = identity.store.grant_consent(&user.id, &params.client_id, &granted).await {
        return ApiError::from(IdentityError::from(error)).into_response();
    }
    identity.audit(&user.id, "identity.consent_granted", &format!("client:{}", params.client_id), "success", serde_json::json!({"scope": granted})).await;
    issue_and_redirect(&identity, &params, &user, auth_time).await
}

async fn issue_and_redirect(identity: &Identity, params: &AuthorizeParams, user: &crate::store::User, auth_time: i64) -> Response {
    match identity.issue_code(params, user, auth_time).await {
        Ok(code) => redirect_with_code(identity, params, &code),
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// Back to the client with the code, its `state` and our `iss` (RFC 9207).
fn redirect_with_code(identity: &Identity, params: &AuthorizeParams, code: &str) -> Response {
    let mut pairs = vec![("code", code)];
    if let Some(state) = params.state.as_deref() {
        pairs.push(("state", state));
    }
    pairs.push(("iss", identity.issuer.as_str()));
    redirect_with(&params.redirect_uri, &pairs)
}

fn login_page(identity: &Identity, params: &AuthorizeParams, username: &str, error: Option<&str>, status: StatusCode) -> Response {
    let form_token = identity.form_token(params, now_unix() + 600);
    let action = format!("{}/login", identity.issuer);
    let signup_href = identity
        .config
        .identity
        .open_signup
        .then(|| format!("{}/signup?{}", identity.issuer, serde_urlencoded::to_string(params).unwrap_or_default()));
    page(
        status,
        LoginPage { action: &action, client_id: &params.client_id, params, form_token, username, error, signup_href }.render(),
    )
}

fn signup_page(identity: &Identity, params: &AuthorizeParams, username: &str, email: &str, error: Option<&str>, status: StatusCode) -> Response {
    let form_token = identity.form_token(params, now_unix() + 600);
    let action = format!("{}/signup", identity.issuer);
    let org = &identity.config.identity.signup_org;
    page(status, SignupPage { action: &action, params, form_token, username, email, org, error }.render())
}

const SIGNUP_CLOSED: &str = "Accounts are created by your administrator. Ask them for one.";

async fn signup_form(State(identity): State<Identity>, Query(params): Query<AuthorizeParams>) -> Response {
    if !identity.config.identity.open_signup {
        return message(StatusCode::NOT_FOUND, "Sign-up is closed", SIGNUP_CLOSED);
    }
    if let Err(failure) = identity.validate_authorize(&params).await {
        return failure_response(&identity, failure);
    }
    signup_page(&identity, &params, "", "", None, StatusCode::OK)
}

#[derive(Deserialize)]
struct SignupForm {
    #[serde(flatten)]
    params: AuthorizeParams,
    #[serde(default)]
    username: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    form_token: String,
}

/// Creates the account, signs the new user in and continues the authorization
/// request they came with, as a successful sign-in does.
async fn signup(
    State(identity): State<Identity>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SignupForm>,
) -> Response {
    if !identity.config.identity.open_signup {
        return message(StatusCode::NOT_FOUND, "Sign-up is closed", SIGNUP_CLOSED);
    }
    let params = form.params;
    if let Err(failure) = identity.validate_authorize(&params).await {
        return failure_response(&identity, failure);
    }
    let username: String = form.username.chars().take(64).collect();
    let email: String = form.email.chars().take(254).collect();
    if cross_site(&headers) || !identity.check_form_token(&params, &form.form_token) {
        return signup_page(&identity, &params, &username, &email, Some("This form expired. Please try again."), StatusCode::BAD_REQUEST);
    }
    let ip = common::web::client_ip(peer.ip(), &headers, &identity.config.trusted_proxies).to_string();
    let user = match identity.sign_up(&username, Some(email.clone()), form.password, &ip).await {
        Ok(user) => user,
        Err(IdentityError::Throttled(wait)) => {
            let text = format!("Too many new accounts from your address. Try again in {wait} seconds.");
            let mut response = signup_page(&identity, &params, &username, &email, Some(&text), StatusCode::TOO_MANY_REQUESTS);
            if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
        Err(IdentityError::BadRequest(text)) => return signup_page(&identity, &params, &username, &email, Some(&text), StatusCode::BAD_REQUEST),
        Err(IdentityError::Conflict(_)) => {
            return signup_page(&identity, &params, &username, &email, Some("That username is taken."), StatusCode::CONFLICT);
        }
        Err(error) => return ApiError::from(error).into_response(),
    };
    let (session_id, ttl) = match identity.start_session(&user).await {
        Ok(session) => session,
        Err(error) => return ApiError::from(error).into_response(),
    };
    let mut response = issue_and_redirect(&identity, &params, &user, now_unix()).await;
    response.headers_mut().append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, &session_id, ttl, secure(&identity)));
    response
}

async fn authorize(State(identity): State<Identity>, headers: HeaderMap, Query(params): Query<AuthorizeParams>) -> Response {
    authorize_request(&identity, &headers, params).await
}

/// `POST /authorize` with the parameters form-encoded (Core §3.1.2.1: a MUST).
async fn authorize_post(State(identity): State<Identity>, headers: HeaderMap, Form(params): Form<AuthorizeParams>) -> Response {
    authorize_request(&identity, &headers, params).await
}

async fn authorize_request(identity: &Identity, headers: &HeaderMap, params: AuthorizeParams) -> Response {
    let client = match identity.validate_authorize(&params).await {
        Ok(client) => client,
        Err(failure) => return failure_response(identity, failure),
    };
    let session = match cookie(headers, SESSION_COOKIE) {
        Some(id) => identity.session_user(id).await.ok().flatten(),
        None => None,
    };
    let fresh_enough = |auth_time: i64| params.max_age.is_none_or(|max_age| now_unix() - auth_time <= max_age);
    match session {
        Some((user, auth_time)) if !params.prompts_for("login") && fresh_enough(auth_time) => match identity.needs_consent(&client, &user, &params).await {
            Ok(false) => issue_and_redirect(identity, &params, &user, auth_time).await,
            Ok(true) if params.prompts_for("none") => {
                failure_response(identity, redirect_error(&params, "consent_required", "the user has not allowed this application yet"))
            }
            Ok(true) => consent_page(identity, &params, &user, auth_time),
            Err(error) => ApiError::from(error).into_response(),
        },
        _ if params.prompts_for("none") => failure_response(identity, redirect_error(&params, "login_required", "the user is not signed in")),
        _ => login_page(identity, &params, "", None, StatusCode::OK),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(flatten)]
    params: AuthorizeParams,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    form_token: String,
}

fn cross_site(headers: &HeaderMap) -> bool {
    headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).is_some_and(|site| site == "cross-site")
}

async fn login(
    State(identity): State<Identity>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let params = form.params;
    let ip = common::web::client_ip(peer.ip(), &headers, &identity.config.trusted_proxies).to_string();
    let client = match identity.validate_authorize(&params).await {
        Ok(client) => client,
        Err(failure) => return failure_response(&identity, failure),
    };
    if cross_site(&headers) || !identity.check_form_token(&params, &form.form_token) {
        return login_page(&identity, &params, "", Some("This sign-in form expired. Please sign in again."), StatusCode::BAD_REQUEST);
    }
    match identity.throttled_for(&form.username, &ip).await {
        Ok(throttle) if throttle.retry_after_secs == 0 => {
            if throttle.hold_ms > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(throttle.hold_ms as u64)).await;
            }
        }
        Ok(throttle) => {
            let wait = throttle.retry_after_secs;
            metrics::counter!("echo_identity_sign_ins_total", "outcome" => "throttled").increment(1);
            let message = format!("Too many failed sign-in attempts from your address. Try again in {wait} seconds.");
            let mut response = login_page(&identity, &params, &form.username, Some(&message), StatusCode::TOO_MANY_REQUESTS);
            if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
        Err(error) => return ApiError::from(error).into_response(),
    }
    let outcome = identity.authenticate(&form.username, &form.password).await;
    if outcome.is_err()
        && let Err(error) = identity.record_login_outcome(&form.username, &ip, false).await
    {
        tracing::warn!(%error, "could not record the failed sign-in");
    }
    match outcome {
        Ok(user) if user.must_change_password => {
            // The right password, but one the user was given: no session and no code
            // until they choose their own.
            if let Err(error) = identity.record_login_outcome(&form.username, &ip, true).await {
                tracing::warn!(%error, "could not record the sign-in");
            }
            identity.audit(&user.id, "identity.password_change_required", &format!("user:{}", user.id), "success", serde_json::json!({"client_id": params.client_id})).await;
            first_password_page(&identity, &params, &user, None, StatusCode::OK)
        }
        Ok(user) => finish_sign_in(&identity, &client, &params, &user, &ip).await,
        Err(IdentityError::InvalidCredentials) => {
            metrics::counter!("echo_identity_sign_ins_total", "outcome" => "failed").increment(1);
            let username: String = form.username.chars().take(256).collect();
            identity.audit(&username, "identity.login_failed", &format!("username:{username}"), "denied", serde_json::json!({"client_id": params.client_id})).await;
            login_page(&identity, &params, &username, Some("Invalid username or password."), StatusCode::UNAUTHORIZED)
        }
        Err(error) => ApiError::from(error).into_response(),
    }
}

#[derive(Deserialize)]
struct FirstPasswordForm {
    #[serde(flatten)]
    params: AuthorizeParams,
    #[serde(default)]
    form_token: String,
    #[serde(default)]
    change_token: String,
    #[serde(default)]
    new_password: String,
    #[serde(default)]
    new_password_again: String,
}

/// The "choose your password" page's answer: the given password is replaced, and the
/// sign-in continues as a normal one does (identity session, code back to the client).
async fn first_password(
    State(identity): State<Identity>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<FirstPasswordForm>,
) -> Response {
    let params = form.params;
    let client = match identity.validate_authorize(&params).await {
        Ok(client) => client,
        Err(failure) => return failure_response(&identity, failure),
    };
    let user_id = identity.check_change_token(&params, &form.change_token).filter(|_| !cross_site(&headers) && identity.check_form_token(&params, &form.form_token));
    let user = match user_id {
        Some(id) => identity.store.user_by_id(&id).await.ok().flatten().filter(|u| !u.disabled && u.must_change_password),
        None => None,
    };
    let Some(user) = user else {
        return login_page(&identity, &params, "", Some("This page expired. Please sign in again."), StatusCode::BAD_REQUEST);
    };
    if form.new_password != form.new_password_again {
        return first_password_page(&identity, &params, &user, Some("The two passwords differ."), StatusCode::BAD_REQUEST);
    }
    if let Err(error) = identity.replace_given_password(&user, form.new_password).await {
        return match error {
            IdentityError::BadRequest(text) => first_password_page(&identity, &params, &user, Some(&text), StatusCode::BAD_REQUEST),
            other => ApiError::from(other).into_response(),
        };
    }
    let ip = common::web::client_ip(peer.ip(), &headers, &identity.config.trusted_proxies).to_string();
    finish_sign_in(&identity, &client, &params, &user, &ip).await
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    scope: Option<String>,
}

fn oauth_error(error: IdentityError) -> Response {
    let status = match error {
        IdentityError::InvalidClient => StatusCode::UNAUTHORIZED,
        IdentityError::Internal(_) | IdentityError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    let description = match status {
        StatusCode::INTERNAL_SERVER_ERROR => {
            tracing::error!(%error, "token endpoint failed");
            "internal error".to_string()
        }
        _ => error.to_string(),
    };
    let mut response = (status, axum::Json(serde_json::json!({"error": error.oauth_code(), "error_description": description}))).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"echo\""));
    }
    response
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
    Some((unescape(id)?, unescape(secret)?))
}

async fn token(State(identity): State<Identity>, headers: HeaderMap, Form(form): Form<TokenForm>) -> Response {
    // Some libraries send public clients as Basic with an empty secret: treated as none.
    let client = match client_from(&identity, &headers, form.client_id.clone(), form.client_secret.clone()).await {
        Ok(client) => client,
        Err(error) => return oauth_error(error),
    };
    let result = match form.grant_type.as_deref() {
        Some("authorization_code") => match (form.code.as_deref(), form.redirect_uri.as_deref()) {
            (Some(code), Some(redirect_uri)) if client.kind != "service" => {
                identity.exchange_code(&client, code, redirect_uri, form.code_verifier.as_deref()).await
            }
            (Some(_), Some(_)) => Err(IdentityError::UnauthorizedClient),
            _ => Err(IdentityError::InvalidRequest("code and redirect_uri are required".into())),
        },
        Some("refresh_token") => match form.refresh_token.as_deref() {
            Some(refresh_token) => identity.exchange_refresh(&client, refresh_token).await,
            None => Err(IdentityError::InvalidRequest("refresh_token is required".into())),
        },
        Some("client_credentials") => identity.client_credentials(&client, form.audience.as_deref().or(form.resource.as_deref()), form.scope.as_deref()).await,
        None => Err(IdentityError::InvalidRequest("grant_type is required".into())),
        Some(_) => Err(IdentityError::UnsupportedGrantType),
    };
    match result {
        Ok(tokens) => {
            let mut response = axum::Json(tokens).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => oauth_error(error),
    }
}

#[derive(Deserialize)]
struct TokenOnlyForm {
    token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// Client authentication shared by `/token`, `/revoke` and `/introspect`.
async fn client_from(identity: &Identity, headers: &HeaderMap, client_id: Option<String>, client_secret: Option<String>) -> Result<crate::store::Client, IdentityError> {
    let (client_id, secret) = match basic_credentials(headers) {
        Some((id, secret)) => (id, Some(secret).filter(|s| !s.is_empty())),
        None => match client_id {
            Some(id) => (id, client_secret.filter(|s| !s.is_empty())),
            None => return Err(IdentityError::InvalidClient),
        },
    };
    identity.authenticate_client(&client_id, secret.as_deref()).await
}

async fn revoke(State(identity): State<Identity>, headers: HeaderMap, Form(form): Form<TokenOnlyForm>) -> Response {
    let client = match client_from(&identity, &headers, form.client_id, form.client_secret).await {
        Ok(client) => client,
        Err(error) => return oauth_error(error),
    };
    let Some(token) = form.token.filter(|t| !t.is_empty() && t.len() <= 16 * 1024) else {
        return oauth_error(IdentityError::InvalidRequest("token is required".into()));
    };
    match identity.revoke(&client, &token).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(error) => oauth_error(error),
    }
}

async fn introspect(State(identity): State<Identity>, headers: HeaderMap, Form(form): Form<TokenOnlyForm>) -> Response {
    // Only confidential clients (and services) may introspect.
    match client_from(&identity, &headers, form.client_id, form.client_secret).await {
        Ok(client) if client.kind != "public" => {}
        Ok(_) => return oauth_error(IdentityError::UnauthorizedClient),
        Err(error) => return oauth_error(error),
    }
    let Some(token) = form.token.filter(|t| !t.is_empty() && t.len() <= 16 * 1024) else {
        return oauth_error(IdentityError::InvalidRequest("token is required".into()));
    };
    match identity.introspect(&token).await {
        Ok(answer) => {
            let mut response = axum::Json(answer).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => oauth_error(error),
    }
}

async fn userinfo(State(identity): State<Identity>, headers: HeaderMap) -> Result<Response, ApiError> {
    let token = common::auth::bearer(&headers).ok_or_else(|| ApiError::unauthenticated("a bearer token is required"))?;
    let claims = identity.verify_access(token).await?;
    let user = identity.store.user_by_id(&claims.sub).await?.filter(|u| !u.disabled).ok_or(IdentityError::InvalidToken)?;
    // Claims as the token's scope releases them (Core §5.4); `sub` always.
    let mut answer = serde_json::json!({"sub": user.id});
    let scopes: Vec<&str> = claims.scope.split_whitespace().collect();
    if scopes.contains(&"profile") {
        let profile = serde_json::to_value(crate::service::ProfileClaims::of(&user)).unwrap_or_default();
        merge(&mut answer, profile);
    }
    if scopes.contains(&"email")
        && let Some(email) = crate::service::EmailClaims::of(&user)
    {
        merge(&mut answer, serde_json::to_value(email).unwrap_or_default());
    }
    let mut response = axum::Json(answer).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

#[derive(Deserialize)]
struct LogoutParams {
    client_id: Option<String>,
    post_logout_redirect_uri: Option<String>,
    state: Option<String>,
    id_token_hint: Option<String>,
    /// The confirmation form's token (POST only).
    logout_token: Option<String>,
}

#[derive(Template)]
#[template(path = "logout.html")]
struct LogoutPage<'a> {
    action: &'a str,
    username: &'a str,
    logout_token: String,
    client_id: Option<&'a str>,
    post_logout_redirect_uri: Option<&'a str>,
    state: Option<&'a str>,
}

/// RP-initiated logout. A `GET` ends the identity session only when it carries an
/// `id_token_hint` we issued, to the client named, for the user of this session (an
/// application signing its own user out); otherwise it asks, with a form that posts
/// back a token bound to this session, so a cross-site link cannot sign anyone out.
/// A `post_logout_redirect_uri` is followed only when registered for the client.
async fn logout(State(identity): State<Identity>, method: axum::http::Method, headers: HeaderMap, Query(query): Query<LogoutParams>, body: axum::body::Bytes) -> Response {
    let params = if method == axum::http::Method::POST {
        match serde_urlencoded::from_bytes::<LogoutParams>(&body) {
            Ok(form) => form,
            Err(_) => return message(StatusCode::BAD_REQUEST, "Sign-out failed", "The sign-out request is malformed."),
        }
    } else {
        query
    };
    let hint = match params.id_token_hint.as_deref().filter(|h| !h.is_empty()) {
        Some(hint) => match identity.id_token_hint(hint).await {
            Some(claims) => Some(claims),
            None => return message(StatusCode::BAD_REQUEST, "Sign-out refused", "The id_token_hint is not an ID token issued here."),
        },
        None => None,
    };
    let client_id = params.client_id.clone().or_else(|| hint.as_ref().map(|h| h.aud.clone()));
    if let (Some(hint), Some(client_id)) = (&hint, &params.client_id)
        && &hint.aud != client_id
    {
        return message(StatusCode::BAD_REQUEST, "Sign-out refused", "The id_token_hint was issued to another application.");
    }
    let redirect = match (client_id.as_deref(), params.post_logout_redirect_uri.as_deref()) {
        (Some(client_id), Some(uri)) => match identity.store.client(client_id).await {
            Ok(Some(client)) if client.redirect_uris.iter().any(|u| u == uri) => Some(uri.to_string()),
            _ => return message(StatusCode::BAD_REQUEST, "Sign-out refused", "The application's return address is not registered."),
        },
        (None, Some(_)) => return message(StatusCode::BAD_REQUEST, "Sign-out refused", "A return address needs the application's client_id or an id_token_hint."),
        _ => None,
    };
    let session = match cookie(&headers, SESSION_COOKIE) {
        Some(id) => identity.session_user(id).await.ok().flatten().map(|(user, _)| (common::rand::sha256_hex(id.as_bytes()), user)),
        None => None,
    };
    if let Some((session_hash, user)) = &session {
        let confirmed = match method {
            axum::http::Method::POST => {
                !cross_site(&headers) && params.logout_token.as_deref().is_some_and(|t| identity.check_logout_token(session_hash, t))
            }
            _ => hint.as_ref().is_some_and(|h| h.sub == user.id),
        };
        if !confirmed {
            let action = format!("{}/logout", identity.issuer);
            let page_html = LogoutPage {
                action: &action,
                username: &user.username,
                logout_token: identity.logout_token(session_hash, now_unix() + 600),
                client_id: client_id.as_deref(),
                post_logout_redirect_uri: redirect.as_deref(),
                state: params.state.as_deref(),
            }
            .render();
            return page(StatusCode::OK, page_html);
        }
        identity.audit(&user.id, "identity.logout", &format!("user:{}", user.id), "success", serde_json::json!({"client_id": client_id})).await;
        let _ = identity.store.delete_session(session_hash).await;
    }
    let mut response = match redirect {
        Some(uri) => {
            let pairs: Vec<(&str, &str)> = params.state.as_deref().map(|s| vec![("state", s)]).unwrap_or_default();
            redirect_with(&uri, &pairs)
        }
        None => message(StatusCode::OK, "Signed out", "You are signed out of Echo."),
    };
    response.headers_mut().append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", 0, secure(&identity)));
    response
}

async fn internal_user(State(identity): State<Identity>, Path(id): Path<String>) -> Result<Json<common::wire::UserSummary>, ApiError> {
    let user = identity.store.user_by_id(&id).await?.ok_or(IdentityError::NotFound)?;
    Ok(Json(user.summary()))
}

async fn internal_org_users(State(identity): State<Identity>, Path(org): Path<String>) -> Result<Json<Vec<common::wire::UserSummary>>, ApiError> {
    let users = identity.store.users_in_org(&org).await?;
    Ok(Json(users.iter().map(|u| u.summary()).collect()))
}

#[derive(Deserialize)]
struct CreateUserBody {
    username: String,
    password: String,
    org: String,
    role: String,
    #[serde(default)]
    email: Option<String>,
    /// The admin chose the password: the user replaces it at first sign-in.
    #[serde(default)]
    temporary: bool,
}

async fn internal_create_user(
    State(identity): State<Identity>,
    common::server::ActingUser(actor): common::server::ActingUser,
    Json(body): Json<CreateUserBody>,
) -> Result<(StatusCode, Json<common::wire::UserSummary>), ApiError> {
    let user = identity
        .create_user(crate::service::NewUser { username: body.username, password: body.password, org: body.org, role: body.role, email: body.email, temporary: body.temporary })
        .await?;
    identity.audit(&actor.sub, "identity.user_created", &format!("user:{}", user.id), "success", serde_json::json!({"org": user.org})).await;
    identity.publish_user_event(common::wire::events::USER_CREATED, &user).await;
    Ok((StatusCode::CREATED, Json(user.summary())))
}

async fn internal_disable_user(
    State(identity): State<Identity>,
    common::server::ActingUser(actor): common::server::ActingUser,
    Path(id): Path<String>,
) -> Result<Json<common::wire::UserSummary>, ApiError> {
    identity.keep_an_owner(&id, None).await?;
    if !identity.store.set_disabled(&id, true).await? {
        return Err(IdentityError::NotFound.into());
    }
    identity.audit(&actor.sub, "identity.user_disabled", &format!("user:{id}"), "success", serde_json::json!({})).await;
    let user = identity.store.user_by_id(&id).await?.ok_or(IdentityError::NotFound)?;
    identity.publish_user_event(common::wire::events::USER_DISABLED, &user).await;
    Ok(Json(user.summary()))
}

/// The applications a user allowed to act for them (their own list only).
async fn internal_consents(
    State(identity): State<Identity>,
    common::server::ActingUser(actor): common::server::ActingUser,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if actor.sub != id {
        return Err(ApiError::forbidden("identity.not_yourself", "people see only their own consents"));
    }
    let consents: Vec<_> = identity
        .store
        .consents_of(&id)
        .await?
        .into_iter()
        .map(|(client_id, scope, granted_at)| serde_json::json!({"client_id": client_id, "scope": scope, "granted_at": common::rfc3339(granted_at)}))
        .collect();
    Ok(Json(serde_json::json!({"consents": consents})))
}

async fn internal_withdraw_consent(
    State(identity): State<Identity>,
    common::server::ActingUser(actor): common::server::ActingUser,
    Path((id, client)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    if actor.sub != id {
        return Err(ApiError::forbidden("identity.not_yourself", "people withdraw only their own consents"));
    }
    if identity.withdraw_consent(&id, &client).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("identity.consent_not_found", "you never allowed that application"))
    }
}

#[derive(Deserialize)]
struct RoleBody {
    role: String,
}

/// An org role change (the gateway has asked authz whether the actor may give it).
/// The account's sessions and tokens end, so the new role applies at once.
async fn internal_set_role(
    State(identity): State<Identity>,
    common::server::ActingUser(actor): common::server::ActingUser,
    Path(id): Path<String>,
    Json(body): Json<RoleBody>,
) -> Result<Json<common::wire::UserSummary>, ApiError> {
    let user = identity.set_org_role(&id, &body.role).await?;
    identity.audit(&actor.sub, "identity.role_changed", &format!("user:{id}"), "success", serde_json::json!({"role": body.role})).await;
    Ok(Json(user.summary()))
}

/// Sends the account's owner a reset link (the gateway has asked authz whether the
/// actor may). 409 when the account has no email address to send it to.
async fn internal_send_reset(
    State(identity): State<Identity>,
    common::server::ActingUser(actor): common::server::ActingUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let user = identity.store.user_by_id(&id).await?.ok_or(IdentityError::NotFound)?;
    if user.email.is_none() {
        return Err(IdentityError::Conflict(format!("{} has no email address to send a reset link to", user.username)).into());
    }
    identity.request_reset(&user.username).await?;
    identity.audit(&actor.sub, "identity.password_reset_sent", &format!("user:{id}"), "success", serde_json::json!({})).await;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize)]
struct PasswordBody {
    current_password: String,
    new_password: String,
    /// The id hash of the gateway session making the change, which survives it.
    #[serde(default)]
    keep_session: Option<String>,
}

/// A user changes their own password; the current one is required.
async fn internal_change_password(
    State(identity): State<Identity>,
    common::server::ActingUser(actor): common::server::ActingUser,
    Path(id): Path<String>,
    Json(body): Json<PasswordBody>,
) -> Result<StatusCode, ApiError> {
    if actor.sub != id {
        return Err(ApiError::forbidden("identity.not_yourself", "users change only their own password"));
    }
    let user = identity.store.user_by_id(&id).await?.ok_or(IdentityError::NotFound)?;
    if identity.authenticate(&user.username, &body.current_password).await.is_err() {
        identity.audit(&id, "identity.password_change_failed", &format!("user:{id}"), "denied", serde_json::json!({})).await;
        return Err(ApiError::forbidden("identity.wrong_password", "the current password is wrong"));
    }
    crate::password::check_policy(&body.new_password).map_err(|e| IdentityError::BadRequest(e.to_string()))?;
    let hash = crate::password::hash(body.new_password).await.map_err(|e| IdentityError::BadRequest(e.to_string()))?;
    identity.store.set_password(&id, &hash).await?;
    // As a reset does: every other session and token of the account ends.
    identity.end_everything_of(&id, "password_changed", body.keep_session.filter(|k| k.len() == 64)).await?;
    identity.audit(&id, "identity.password_changed", &format!("user:{id}"), "success", serde_json::json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Template)]
#[template(path = "forgot.html")]
struct ForgotPage<'a> {
    action: &'a str,
    sent: bool,
}

async fn forgot_form(State(identity): State<Identity>) -> Response {
    page(StatusCode::OK, ForgotPage { action: &format!("{}/forgot", identity.issuer), sent: false }.render())
}

#[derive(Deserialize)]
struct ForgotForm {
    #[serde(default)]
    username: String,
}

async fn forgot(State(identity): State<Identity>, headers: HeaderMap, Form(form): Form<ForgotForm>) -> Response {
    if cross_site(&headers) {
        return message(StatusCode::BAD_REQUEST, "Request refused", "Cross-site requests are not accepted.");
    }
    if let Err(error) = identity.request_reset(&form.username.chars().take(256).collect::<String>()).await {
        tracing::error!(%error, "password reset request failed");
    }
    page(StatusCode::OK, ForgotPage { action: &format!("{}/forgot", identity.issuer), sent: true }.render())
}

#[derive(Template)]
#[template(path = "reset.html")]
struct ResetPage<'a> {
    action: &'a str,
    token: &'a str,
    error: Option<&'a str>,
}

#[derive(Deserialize)]
struct ResetQuery {
    #[serde(default)]
    token: String,
}

async fn reset_form(State(identity): State<Identity>, Query(query): Query<ResetQuery>) -> Response {
    page(StatusCode::OK, ResetPage { action: &format!("{}/reset", identity.issuer), token: &query.token, error: None }.render())
}

#[derive(Deserialize)]
struct ResetForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    password: String,
}

async fn reset(State(identity): State<Identity>, headers: HeaderMap, Form(form): Form<ResetForm>) -> Response {
    if cross_site(&headers) {
        return message(StatusCode::BAD_REQUEST, "Request refused", "Cross-site requests are not accepted.");
    }
    match identity.reset_password(&form.token, form.password).await {
        Ok(()) => message(StatusCode::OK, "Password changed", "Your password is changed and your other sessions are signed out. You can sign in now."),
        Err(IdentityError::BadRequest(reason)) => {
            page(StatusCode::BAD_REQUEST, ResetPage { action: &format!("{}/reset", identity.issuer), token: &form.token, error: Some(&reason) }.render())
        }
        Err(error) => ApiError::from(error).into_response(),
    }
}

#[derive(Deserialize)]
struct RotateBody {
    #[serde(default = "default_lead_secs")]
    lead_secs: i64,
}

/// Long enough for every verifier to refetch the JWKS (they do on an unknown `kid`,
/// at most every 5 s) before the new keys sign.
fn default_lead_secs() -> i64 {
    60
}

/// Key rotation for the gateway's operator API (the gateway has checked the
/// operator's permission; the acting user is recorded in the audit event).
async fn internal_rotate_keys(
    State(identity): State<Identity>,
    common::server::ActingUser(actor): common::server::ActingUser,
    Json(body): Json<RotateBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !(10..=86_400).contains(&body.lead_secs) {
        return Err(ApiError::bad_request("identity.bad_lead", "lead_secs must be between 10 and 86400"));
    }
    let kids = identity.rotate_keys(body.lead_secs, &actor.sub).await?;
    Ok(Json(serde_json::json!({"kids": kids, "activate_at": now_unix() + body.lead_secs})))
}
