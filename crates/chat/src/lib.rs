//! chat — rooms within an org and their message history.
//!
//! Messages are persisted before they are announced on the bus
//! (`echo.chat.message.posted`). Public surface: `run`. Invariant: rooms and messages
//! of another org are invisible (404). WebSocket delivery and `@echo` arrive with the
//! chat issue; this is the REST core they build on.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Router, middleware};
use serde::{Deserialize, Serialize};
use sqlx::{Row, SqlitePool};
use tokio::net::TcpListener;

use common::error::{ApiResult, Json, Query};
use common::server::ActingUser;
use common::wire::{Principal, events};
use common::{ApiError, ServiceContext, ServiceName, rfc3339};

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE rooms (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX rooms_org ON rooms(org);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    author TEXT NOT NULL,
    author_name TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX messages_room ON messages(room_id, seq);
"#];

#[derive(Clone)]
struct AppState {
    ctx: ServiceContext,
    pool: SqlitePool,
}

#[derive(Serialize)]
struct Room {
    id: String,
    name: String,
    created_by: String,
    created_at: String,
}

#[derive(Serialize)]
struct Message {
    id: String,
    seq: i64,
    room_id: String,
    author: String,
    author_name: String,
    body: String,
    created_at: String,
}

/// Runs the chat service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let pool = common::db::open_migrated(&ctx.config.db_path(ServiceName::Chat), MIGRATIONS).await?;
    let ready = common::server::sqlite_ready(pool.clone(), vec![]);
    let routes = Router::new()
        .route("/v1/rooms", get(list_rooms).post(create_room))
        .route("/v1/rooms/{id}/messages", get(list_messages).post(post_message))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(AppState { ctx: ctx.clone(), pool });
    let router = common::server::service_router(ServiceName::Chat, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

#[derive(Deserialize)]
struct NewRoom {
    name: String,
}

async fn create_room(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(body): Json<NewRoom>) -> ApiResult<(StatusCode, Json<Room>)> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::bad_request("chat.invalid_name", "room names are 1 to 100 characters"));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let now = common::now_unix();
    sqlx::query("INSERT INTO rooms (id, org, name, created_by, created_at) VALUES (?, ?, ?, ?, ?)")
        .bind(&id)
        .bind(&principal.org)
        .bind(name)
        .bind(&principal.sub)
        .bind(now)
        .execute(&state.pool)
        .await?;
    Ok((StatusCode::CREATED, Json(Room { id, name: name.to_string(), created_by: principal.sub, created_at: rfc3339(now) })))
}

async fn list_rooms(State(state): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<Vec<Room>>> {
    let rows = sqlx::query("SELECT * FROM rooms WHERE org = ? ORDER BY name").bind(&principal.org).fetch_all(&state.pool).await?;
    let rooms = rows
        .iter()
        .map(|r| Ok(Room { id: r.try_get("id")?, name: r.try_get("name")?, created_by: r.try_get("created_by")?, created_at: rfc3339(r.try_get("created_at")?) }))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(rooms))
}

async fn room_in_org(state: &AppState, principal: &Principal, room_id: &str) -> ApiResult<()> {
    let org: Option<String> = sqlx::query_scalar("SELECT org FROM rooms WHERE id = ?").bind(room_id).fetch_optional(&state.pool).await?;
    match org {
        Some(org) if org == principal.org => Ok(()),
        _ => Err(ApiError::not_found("chat.room_not_found", "no such room")),
    }
}

#[derive(Deserialize)]
struct NewMessage {
    body: String,
}

async fn post_message(
    State(state): State<AppState>,
    ActingUser(principal): ActingUser,
    Path(room_id): Path<String>,
    Json(body): Json<NewMessage>,
) -> ApiResult<(StatusCode, Json<Message>)> {
    room_in_org(&state, &principal, &room_id).await?;
    let text = body.body.trim();
    if text.is_empty() || text.chars().count() > 8000 {
        return Err(ApiError::bad_request("chat.invalid_message", "messages are 1 to 8000 characters"));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let now = common::now_unix();
    let seq: i64 = sqlx::query_scalar("INSERT INTO messages (id, room_id, author, author_name, body, created_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING seq")
        .bind(&id)
        .bind(&room_id)
        .bind(&principal.sub)
        .bind(&principal.username)
        .bind(text)
        .bind(now)
        .fetch_one(&state.pool)
        .await?;
    let message = Message { id, seq, room_id, author: principal.sub.clone(), author_name: principal.username.clone(), body: text.to_string(), created_at: rfc3339(now) };
    let event = state.ctx.bus.event(events::CHAT_MESSAGE_POSTED, Some(format!("room:{}", message.room_id)), serde_json::json!({"room_id": message.room_id, "message_id": message.id, "seq": seq}));
    if let Err(error) = state.ctx.bus.publish_one(event).await {
        tracing::warn!(%error, "chat message stored but not announced");
    }
    Ok((StatusCode::CREATED, Json(message)))
}

#[derive(Deserialize)]
struct Page {
    before: Option<i64>,
    limit: Option<i64>,
}

async fn list_messages(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(room_id): Path<String>, Query(page): Query<Page>) -> ApiResult<Json<Vec<Message>>> {
    room_in_org(&state, &principal, &room_id).await?;
    let rows = sqlx::query("SELECT * FROM messages WHERE room_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?")
        .bind(&room_id)
        .bind(page.before.unwrap_or(i64::MAX))
        .bind(page.limit.unwrap_or(50).clamp(1, 200))
        .fetch_all(&state.pool)
        .await?;
    let mut messages = rows
        .iter()
        .map(|r| {
            Ok(Message {
                id: r.try_get("id")?,
                seq: r.try_get("seq")?,
                room_id: r.try_get("room_id")?,
                author: r.try_get("author")?,
                author_name: r.try_get("author_name")?,
                body: r.try_get("body")?,
                created_at: rfc3339(r.try_get("created_at")?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    messages.reverse();
    Ok(Json(messages))
}
