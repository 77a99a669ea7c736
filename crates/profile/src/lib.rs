//! profile — user profiles: display name and preferences, created on first sign-in.
//!
//! Public surface: `run`. Invariant: a profile is visible only to members of the same
//! org; a user edits only their own. (Avatars arrive with the profile issue.)

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Router, middleware};
use serde::{Deserialize, Serialize};
use sqlx::{Row, SqlitePool};
use tokio::net::TcpListener;

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::wire::Principal;
use common::{ApiError, ServiceContext, ServiceName};

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE profiles (
    user_id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    username TEXT NOT NULL,
    display_name TEXT NOT NULL,
    preferences TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
"#];

#[derive(Clone)]
struct AppState {
    pool: SqlitePool,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Profile {
    id: String,
    username: String,
    org: String,
    display_name: String,
    preferences: serde_json::Value,
}

/// Runs the profile service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let pool = common::db::open_migrated(&ctx.config.db_path(ServiceName::Profile), MIGRATIONS).await?;
    let ready = common::server::sqlite_ready(pool.clone(), vec![]);
    let routes = Router::new()
        .route("/v1/me", get(me).patch(update_me))
        .route("/v1/profiles/{id}", get(profile_of))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(AppState { pool });
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

async fn ensure(pool: &SqlitePool, principal: &Principal) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT OR IGNORE INTO profiles (user_id, org, username, display_name, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)")
        .bind(&principal.sub)
        .bind(&principal.org)
        .bind(&principal.username)
        .bind(&principal.username)
        .bind(common::now_unix())
        .bind(common::now_unix())
        .execute(pool)
        .await?;
    Ok(())
}

async fn load(pool: &SqlitePool, user_id: &str) -> Result<Option<Profile>, sqlx::Error> {
    let row = sqlx::query("SELECT * FROM profiles WHERE user_id = ?").bind(user_id).fetch_optional(pool).await?;
    row.map(|r| -> Result<Profile, sqlx::Error> {
        let preferences: String = r.try_get("preferences")?;
        Ok(Profile {
            id: r.try_get("user_id")?,
            username: r.try_get("username")?,
            org: r.try_get("org")?,
            display_name: r.try_get("display_name")?,
            preferences: serde_json::from_str(&preferences).unwrap_or_default(),
        })
    })
    .transpose()
}

async fn me(State(state): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<Profile>> {
    ensure(&state.pool, &principal).await?;
    load(&state.pool, &principal.sub).await?.map(Json).ok_or_else(|| ApiError::internal(anyhow::anyhow!("profile vanished")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfilePatch {
    display_name: Option<String>,
    preferences: Option<serde_json::Value>,
}

async fn update_me(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(patch): Json<ProfilePatch>) -> ApiResult<Json<Profile>> {
    ensure(&state.pool, &principal).await?;
    if let Some(name) = &patch.display_name {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request("profile.invalid_display_name", "display names are 1 to 100 printable characters"));
        }
        sqlx::query("UPDATE profiles SET display_name = ?, updated_at = ? WHERE user_id = ?")
            .bind(name)
            .bind(common::now_unix())
            .bind(&principal.sub)
            .execute(&state.pool)
            .await?;
    }
    if let Some(preferences) = &patch.preferences {
        let text = serde_json::to_string(preferences).unwrap_or_default();
        if !preferences.is_object() || text.len() > 16 * 1024 {
            return Err(ApiError::bad_request("profile.invalid_preferences", "preferences are a JSON object of at most 16 KiB"));
        }
        sqlx::query("UPDATE profiles SET preferences = ?, updated_at = ? WHERE user_id = ?")
            .bind(text)
            .bind(common::now_unix())
            .bind(&principal.sub)
            .execute(&state.pool)
            .await?;
    }
    me(State(state), ActingUser(principal)).await
}

async fn profile_of(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let profile = load(&state.pool, &id).await?.filter(|p| p.org == principal.org);
    let profile = profile.ok_or_else(|| ApiError::not_found("profile.not_found", "no such profile"))?;
    // Preferences are private to their owner.
    Ok(Json(serde_json::json!({"id": profile.id, "username": profile.username, "display_name": profile.display_name})))
}
