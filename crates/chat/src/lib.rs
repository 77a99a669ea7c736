//! chat — rooms within an org and their message history.
//!
//! Layers: thin handlers (here) → the `store::ChatStore` trait (SQLite `chat.db`, or
//! PostgreSQL schema `chat` with `chat.database_url` / `database.url`).
//! Messages are persisted before they are announced on the bus
//! (`echo.chat.message.posted`). Who is in a room is a relationship owned by authz
//! (the creator is its owner; owners add members): every read and post is a Cedar
//! decision there. Public surface: `run`. Invariant: a room the caller is not in,
//! and any room of another org, is invisible (404). WebSocket delivery and `@echo`
//! arrive with the chat issue; this is the REST core they build on.

mod store;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Router, middleware};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use common::error::{ApiResult, Json, Query};
use common::server::ActingUser;
use common::wire::{Principal, events};
use common::{ApiError, ServiceContext, ServiceName, rfc3339};

use crate::store::{ChatStore, MessageRow, RoomRow};

#[derive(Clone)]
struct AppState {
    ctx: ServiceContext,
    store: Arc<dyn ChatStore>,
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

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the chat service on `listener` until the context's shutdown.
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
        .route("/v1/rooms", get(list_rooms).post(create_room))
        .route("/v1/rooms/{id}/messages", get(list_messages).post(post_message))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(AppState { ctx: ctx.clone(), store });
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
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
    let cap = state.ctx.config.chat.max_rooms_per_user;
    let created = state.store.rooms_created_by(&principal.sub).await.map_err(ApiError::internal)?;
    if created >= cap {
        return Err(ApiError::forbidden("chat.limit_reached", format!("you have created {cap} rooms, the most allowed (chat.max_rooms_per_user)")));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let now = common::now_unix();
    let row = RoomRow { id: id.clone(), org: principal.org.clone(), name: name.to_string(), created_by: principal.sub.clone(), created_at: now };
    state.store.create_room(&row).await.map_err(ApiError::internal)?;
    // Authz holds who is in the room; without that the room must not exist.
    let registered: Result<serde_json::Value, ApiError> = state.ctx.peers.post_json(ServiceName::Authz, "/v1/rooms", Some(&principal), &serde_json::json!({"id": id})).await;
    if let Err(error) = registered {
        let _ = state.store.delete_room(&id).await;
        return Err(error);
    }
    Ok((StatusCode::CREATED, Json(Room { id, name: name.to_string(), created_by: principal.sub, created_at: rfc3339(now) })))
}

#[derive(Deserialize)]
struct ReadableRooms {
    rooms: Vec<String>,
}

/// The rooms the caller is in (authz's exact answer), by name.
async fn list_rooms(State(state): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<Vec<Room>>> {
    let readable: ReadableRooms = state.ctx.peers.get_json(ServiceName::Authz, "/v1/rooms", Some(&principal)).await?;
    let rooms = state
        .store
        .rooms_among(&principal.org, &readable.rooms)
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|r| Room { id: r.id, name: r.name, created_by: r.created_by, created_at: rfc3339(r.created_at) })
        .collect();
    Ok(Json(rooms))
}

/// Whether `principal` may do `action` (`room:read`, `room:post`) in the room: asked
/// of authz every time. A room they may not read is reported as not existing.
async fn require_in_room(state: &AppState, principal: &Principal, room_id: &str, action: &str) -> ApiResult<()> {
    let not_found = || ApiError::not_found("chat.room_not_found", "no such room");
    uuid::Uuid::parse_str(room_id).map_err(|_| not_found())?;
    let request = common::wire::DecisionRequest { action: action.into(), resource_type: "Room".into(), resource_id: room_id.into(), classification: None, new_role: None };
    let decision: common::wire::Decision = state.ctx.peers.post_json(ServiceName::Authz, "/v1/decide", Some(principal), &request).await?;
    if decision.allowed {
        return Ok(());
    }
    if action != "room:read" {
        let read = common::wire::DecisionRequest { action: "room:read".into(), ..request };
        let may_read: common::wire::Decision = state.ctx.peers.post_json(ServiceName::Authz, "/v1/decide", Some(principal), &read).await?;
        if may_read.allowed {
            return Err(ApiError::forbidden("chat.read_only", "you may read this room but not post in it"));
        }
    }
    Err(not_found())
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
    require_in_room(&state, &principal, &room_id, "room:post").await?;
    let text = body.body.trim();
    if text.is_empty() || text.chars().count() > 8000 {
        return Err(ApiError::bad_request("chat.invalid_message", "messages are 1 to 8000 characters"));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let now = common::now_unix();
    let row = MessageRow { id: id.clone(), seq: 0, room_id: room_id.clone(), author: principal.sub.clone(), author_name: principal.username.clone(), body: text.to_string(), created_at: now };
    let seq = state.store.append(&row).await.map_err(ApiError::internal)?;
    let message = Message { id, seq, room_id, author: principal.sub.clone(), author_name: principal.username.clone(), body: text.to_string(), created_at: rfc3339(now) };
    let event = state.ctx.bus.event(events::CHAT_MESSAGE_POSTED, Some(format!("room:{}", message.room_id)), common::wire::ChatMessagePosted { room_id: message.room_id.clone(), message_id: message.id.clone(), seq });
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
    require_in_room(&state, &principal, &room_id, "room:read").await?;
    let messages = state
        .store
        .messages(&room_id, page.before.unwrap_or(i64::MAX), page.limit.unwrap_or(50).clamp(1, 200))
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|m| Message { id: m.id, seq: m.seq, room_id: m.room_id, author: m.author, author_name: m.author_name, body: m.body, created_at: rfc3339(m.created_at) })
        .collect();
    Ok(Json(messages))
}
