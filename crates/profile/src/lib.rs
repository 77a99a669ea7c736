//! profile — user profiles: display name and preferences, created on first sign-in.
//!
//! Handlers → a `ProfileStore` (`store.rs`: SQLite `profile.db` by default, PostgreSQL
//! with `profile.database_url` or `database.url`). Public surface: `run`. Invariant: a
//! profile is visible only to members of the same org; a user edits only their own.
//! (Avatars arrive with the profile issue.)

mod store;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Router, middleware};
use serde::Deserialize;
use tokio::net::TcpListener;

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::{ApiError, ServiceContext};

use store::{Profile, ProfileStore};

#[derive(Clone)]
struct AppState {
    store: Arc<dyn ProfileStore>,
}

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the profile service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let store = store::open(&ctx.config).await?;
    let ready: common::server::ReadyCheck = {
        let store = store.clone();
        Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.ready().await })
        })
    };
    let routes = Router::new()
        .route("/v1/me", get(me).patch(update_me))
        .route("/v1/profiles/{id}", get(profile_of))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(AppState { store });
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn unavailable(error: store::StoreError) -> ApiError {
    ApiError::internal(anyhow::anyhow!(error))
}

async fn me(State(state): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<Profile>> {
    state.store.ensure(&principal).await.map_err(unavailable)?;
    state.store.load(&principal.sub).await.map_err(unavailable)?.map(Json).ok_or_else(|| ApiError::internal(anyhow::anyhow!("profile vanished")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfilePatch {
    display_name: Option<String>,
    preferences: Option<serde_json::Value>,
}

async fn update_me(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(patch): Json<ProfilePatch>) -> ApiResult<Json<Profile>> {
    state.store.ensure(&principal).await.map_err(unavailable)?;
    if let Some(name) = &patch.display_name {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request("profile.invalid_display_name", "display names are 1 to 100 printable characters"));
        }
        state.store.set_display_name(&principal.sub, name).await.map_err(unavailable)?;
    }
    if let Some(preferences) = &patch.preferences {
        let text = serde_json::to_string(preferences).unwrap_or_default();
        if !preferences.is_object() || text.len() > 16 * 1024 {
            return Err(ApiError::bad_request("profile.invalid_preferences", "preferences are a JSON object of at most 16 KiB"));
        }
        state.store.set_preferences(&principal.sub, preferences).await.map_err(unavailable)?;
    }
    me(State(state), ActingUser(principal)).await
}

async fn profile_of(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let profile = state.store.load(&id).await.map_err(unavailable)?.filter(|p| p.org == principal.org);
    let profile = profile.ok_or_else(|| ApiError::not_found("profile.not_found", "no such profile"))?;
    // Preferences are private to their owner.
    Ok(Json(serde_json::json!({"id": profile.id, "username": profile.username, "display_name": profile.display_name})))
}
