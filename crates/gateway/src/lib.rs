//! gateway — the public edge: the web UI (server-rendered pages), the REST API
//! `/api/v1`, the OpenAI-compatible `/v1`, and browser sign-in through identity.
//!
//! Public surface: `run`. The gateway owns only browser sessions (`gateway.db`); every
//! other call goes to the owning service with the gateway's service token and the
//! verified user in `x-echo-principal`. Invariants: every document, job and search
//! result is checked with authz before it is returned; what the caller may not read
//! answers 404; cookie-authenticated writes need the CSRF token.

mod api;
mod auth;
mod limits;
mod pages;
mod revocation;
mod service;
mod session;
mod store;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::routing::{delete, get, post, put};
use tokio::net::TcpListener;
use tower_http::set_header::SetResponseHeaderLayer;

use common::{ServiceContext, ServiceName};

pub(crate) const OPENAPI: &str = include_str!("../openapi.json");

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) ctx: ServiceContext,
    pub(crate) store: Arc<dyn store::GatewayStore>,
    pub(crate) public_url: String,
    /// Access tokens and users identity announced as revoked or disabled.
    pub(crate) revocations: revocation::Revocations,
    pub(crate) limits: limits::RateLimits,
}

/// The per-address budget, spent by every request before anything else happens.
async fn limit_by_address(
    axum::extract::State(app): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let peer = request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    if let Some(peer) = peer {
        let ip = common::web::client_ip(peer, request.headers(), &app.ctx.config.trusted_proxies);
        if let Err(refused) = app.limits.check_ip(ip) {
            tokio::time::sleep(limits::REFUSAL_HOLD).await;
            let path = request.uri().path();
            return if path.starts_with("/api/") || path.starts_with("/v1/") { refused.into_response() } else { pages::error_page(&refused) };
        }
    }
    next.run(request).await
}

/// Every request's time limit: `gateway.request_timeout_secs`, or for an answer (which
/// waits on the model) the model's own limit (`service::answer_timeout`). Past it the
/// work is dropped and the client hears why: problem+json (504) for the API, a page in
/// the browser.
async fn time_limit(axum::extract::State(app): axum::extract::State<AppState>, request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = request.uri().path();
    let answering = matches!(path, "/api/v1/ask" | "/v1/chat/completions" | "/ask");
    let limit = if answering { service::answer_timeout(&app.ctx.config) } else { Duration::from_secs(app.ctx.config.gateway.request_timeout_secs) };
    let api = path.starts_with("/api/") || path.starts_with("/v1/");
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let error = common::ApiError::unavailable("gateway.timeout", format!("the request took longer than its limit of {} s; try again, or ask an administrator to raise it", limit.as_secs()));
            let mut response = if api { error.into_response() } else { pages::error_page(&error) };
            *response.status_mut() = axum::http::StatusCode::GATEWAY_TIMEOUT;
            response
        }
    }
}

/// Readiness: every service the gateway depends on answers its own `/readyz`.
fn readiness(ctx: &ServiceContext, store: Arc<dyn store::GatewayStore>, consumer_ready: common::server::ReadyFlag) -> common::server::ReadyCheck {
    let http = ctx.peers.http().clone();
    let config = ctx.config.clone();
    Arc::new(move || {
        let http = http.clone();
        let config = config.clone();
        let store = store.clone();
        let consumer_ready = consumer_ready.clone();
        Box::pin(async move {
            store.ready().await?;
            if !consumer_ready.is_set() {
                return Err("the gateway's revocation subscriptions are not declared yet".into());
            }
            let checks = ServiceName::ALL.into_iter().filter(|s| *s != ServiceName::Gateway).map(|service| {
                let http = http.clone();
                let url = format!("{}/readyz", config.url(service));
                async move {
                    match http.get(&url).timeout(Duration::from_secs(2)).send().await {
                        Ok(response) if response.status().is_success() => Ok(()),
                        Ok(response) => Err(format!("{service} is not ready ({})", response.status())),
                        Err(_) => Err(format!("{service} is unreachable")),
                    }
                }
            });
            let results = futures_util::future::join_all(checks).await;
            let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
            if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) }
        })
    })
}

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the gateway on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let store = store::open(&ctx.config).await?;
    let revocations = revocation::Revocations::load(store.as_ref()).await?;
    let limits = limits::RateLimits::from_config(&ctx.config.gateway);
    limits.spawn_cleanup(ctx.shutdown.clone());
    let app = AppState { ctx: ctx.clone(), store: store.clone(), public_url: ctx.config.public_url(), revocations: revocations.clone(), limits };
    let consumer_ready = common::server::ReadyFlag::default();
    revocation::spawn_consumers(ctx.clone(), store.clone(), revocations, consumer_ready.clone());
    let config = &ctx.config.gateway;
    let upload_limit = DefaultBodyLimit::max(config.max_upload_bytes as usize + 64 * 1024);
    let api = Router::new()
        .route("/me", get(api::me).patch(api::patch_me))
        .route("/me/password", post(api::change_password))
        .route("/me/consents", get(api::my_consents))
        .route("/me/consents/{client_id}", delete(api::withdraw_consent))
        .route("/admin/users", get(api::admin_users).post(api::admin_create_user))
        .route("/admin/users/{id}", axum::routing::patch(api::admin_update_user))
        .route("/admin/users/{id}/disable", post(api::admin_disable_user))
        .route("/admin/users/{id}/reset", post(api::admin_reset_user))
        .route("/admin/keys/rotate", post(api::admin_rotate_keys))
        .route("/admin/policies/reload", post(api::admin_reload_policies))
        .route("/admin/queue", get(api::admin_queue))
        .route("/admin/queue/{name}/dead-letters", get(api::admin_dead_letters))
        .route("/admin/queue/{name}/redrive", post(api::admin_redrive))
        .route("/collections", get(api::list_collections).post(api::create_collection))
        .route("/collections/{id}", delete(api::delete_collection))
        .route("/collections/{id}/members", put(api::share_collection).get(api::collection_members))
        .route("/groups", get(api::groups).post(api::create_group))
        .route("/groups/{id}/members", put(api::set_group_members))
        .route("/documents", get(api::list_documents).post(api::upload).layer(upload_limit))
        .route("/documents/{id}", get(api::get_document).delete(api::delete_document))
        .route("/documents/{id}/content", get(api::content))
        .route("/documents/events", get(api::document_events))
        .route("/documents/{id}/cancel", post(api::cancel_document))
        .route("/documents/{id}/retry", post(api::retry_document))
        .route("/jobs/{id}", get(api::get_job))
        .route("/search", post(api::search))
        .route("/ask", post(api::ask))
        .route("/conversations", get(api::conversations))
        .route("/conversations/{id}", get(api::conversation).patch(api::rename_conversation).delete(api::delete_conversation))
        .route("/logs", get(api::logs))
        .route("/logs/tail", get(api::log_tail))
        .route("/audit", get(api::audit))
        .route("/audit/verify", get(api::audit_verify))
        .route("/rooms", get(api::rooms).post(api::create_room))
        .route("/rooms/{id}/messages", get(api::room_messages).post(api::post_room_message))
        .route("/rooms/{id}/members", get(api::room_members).put(api::set_room_members))
        .route("/openapi.json", get(api::openapi))
        .fallback(common::server::not_found);
    let openai = Router::new().route("/models", get(api::models)).route("/chat/completions", post(api::chat_completions));
    let pages = Router::new()
        .route("/", get(pages::index))
        .route("/documents", get(pages::documents))
        .route("/documents/upload", post(pages::upload).layer(upload_limit))
        .route("/documents/{id}", get(pages::document))
        .route("/documents/{id}/delete", post(pages::delete_document))
        .route("/ask", get(pages::ask_form).post(pages::ask))
        .route("/ask/{id}", get(pages::conversation))
        .route("/ask/{id}/rename", post(pages::rename_conversation))
        .route("/ask/{id}/delete", post(pages::delete_conversation))
        .route("/collections", get(pages::collections).post(pages::create_collection))
        .route("/collections/{id}/members", post(pages::collection_member))
        .route("/collections/{id}/delete", post(pages::delete_collection))
        .route("/admin/logs", get(pages::admin_logs))
        .route("/admin/audit", get(pages::admin_audit))
        .route("/admin/health", get(pages::admin_health))
        .route("/admin/queue", get(pages::admin_queue))
        .route("/admin/queue/{name}/redrive", post(pages::admin_redrive))
        .route("/admin/users", get(pages::admin_users).post(pages::admin_create_user))
        .route("/admin/users/{id}/disable", post(pages::admin_disable_user))
        .route("/profile", get(pages::profile))
        .route("/profile/password", post(pages::change_password))
        .route("/profile/consents/{client_id}/withdraw", post(pages::withdraw_consent))
        .route("/auth/login", get(session::login))
        .route("/auth/callback", get(session::callback))
        .route("/auth/logout", post(session::logout))
        .route("/signed-out", get(pages::signed_out));
    let routes = Router::new()
        .nest("/api/v1", api)
        .nest("/v1", openai)
        .merge(pages)
        .fallback(pages::page_not_found)
        .layer(DefaultBodyLimit::max(config.max_json_bytes))
        .layer(axum::middleware::from_fn_with_state(app.clone(), time_limit))
        .layer(SetResponseHeaderLayer::if_not_present(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::if_not_present(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .layer(axum::middleware::from_fn_with_state(app.clone(), limit_by_address))
        .with_state(app);
    let router = common::server::service_router(&ctx, routes, readiness(&ctx, store, consumer_ready));
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    /// (path, methods) of every `.route(…)` of the `/api/v1` router above, read from
    /// this file's source: what the gateway actually serves.
    fn served_api_routes() -> Vec<(String, Vec<String>)> {
        let source = include_str!("lib.rs");
        let start = source.find("let api = Router::new()").expect("the API router");
        let end = start + source[start..].find(".fallback(common::server::not_found);").expect("its end");
        let mut routes = Vec::new();
        for line in source[start..end].lines() {
            let Some(rest) = line.trim().strip_prefix(".route(\"") else { continue };
            let (path, chain) = rest.split_once('"').expect("a quoted path");
            let mut methods: Vec<String> = ["get", "post", "put", "patch", "delete"]
                .into_iter()
                .filter(|m| [format!(" {m}("), format!(".{m}("), format!("::{m}(")].iter().any(|call| chain.contains(call.as_str())))
                .map(str::to_string)
                .collect();
            methods.sort();
            routes.push((format!("/api/v1{path}"), methods));
        }
        routes
    }

    /// The published API description names every route the gateway serves, with each of
    /// its methods, and nothing it does not serve.
    #[test]
    fn openapi_names_every_served_route_and_method() {
        let spec: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("openapi.json parses");
        let paths = spec["paths"].as_object().expect("paths");
        let served = served_api_routes();
        assert!(served.len() > 30, "the router was read: {served:?}");
        let mut problems = Vec::new();
        for (path, methods) in &served {
            assert!(!methods.is_empty(), "{path}: no method read");
            for method in methods {
                if paths.get(path).and_then(|p| p.get(method)).is_none() {
                    problems.push(format!("{} {path} is served but not in openapi.json", method.to_uppercase()));
                }
            }
        }
        for (path, operations) in paths.iter().filter(|(p, _)| p.starts_with("/api/v1")) {
            for method in operations.as_object().expect("operations").keys().filter(|k| k.as_str() != "parameters") {
                if !served.iter().any(|(p, m)| p == path && m.contains(method)) {
                    problems.push(format!("{} {path} is in openapi.json but not served", method.to_uppercase()));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
