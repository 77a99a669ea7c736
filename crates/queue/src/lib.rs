//! queue — Echo's durable event bus with a REST API.
//!
//! Topics are CloudEvents types; every subscription of a topic receives every message
//! (fan-out) and hands each to one consumer at a time (competing consumers) under a
//! lease. Publish answers only after the transaction is durable. Public surface: `run`.
//! Invariants: a message is removed from a subscription only by an ack carrying its
//! current lease; after `max_deliveries` it is dead-lettered, never dropped.
//!
//! Where messages live is a `backend::Backend` chosen by `queue.url`: SQLite (the
//! embedded default), PostgreSQL or NATS JetStream. This file is the REST facade
//! over that trait and knows nothing of any backend.

pub mod backend;
mod nats;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use axum::{Router, middleware};
use serde::Deserialize;
use tokio::net::TcpListener;

use common::bus::{AckRequest, NackRequest, PublishBatch, PublishResult, PullRequest, PullResponse, SubscriptionSpec};
use common::error::{ApiResult, Json, Query};
use common::wire::events;
use common::{ApiError, ServiceContext, ServiceName};

use backend::{Backend, Declared, NewMessage, Subscription};

#[derive(Clone)]
struct AppState {
    backend: Arc<dyn Backend>,
    config: common::config::QueueConfig,
}

/// Opens the backend `config.queue.url` names (the embedded SQLite file by default).
pub async fn open_backend(config: &common::EchoConfig) -> anyhow::Result<Arc<dyn Backend>> {
    let options = backend::Options { idempotency_window: Duration::from_secs(config.queue.idempotency_window_secs.max(1)) };
    backend::open(config.queue.url.as_ref().map(|u| u.expose()), &config.db_path(ServiceName::Queue), options).await
}

/// Runs the queue service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let backend = open_backend(&ctx.config).await?;
    tracing::info!(backend = backend.kind(), "queue backend open");
    let state = AppState { backend: backend.clone(), config: ctx.config.queue.clone() };
    spawn_housekeeping(state.clone(), ctx.shutdown.clone());
    let ready: common::server::ReadyCheck = Arc::new(move || {
        let backend = backend.clone();
        Box::pin(async move { backend.ping().await.map_err(|e| format!("{} backend: {e}", backend.kind())) })
    });
    let routes = Router::new()
        .route("/v1/topics/{topic}/publish", post(publish))
        .route("/v1/subscriptions/{name}", put(declare))
        .route("/v1/subscriptions/{name}/pull", post(pull))
        .route("/v1/subscriptions/{name}/ack", post(ack))
        .route("/v1/subscriptions/{name}/nack", post(nack))
        .route("/v1/subscriptions/{name}/extend", post(extend))
        .route("/v1/subscriptions/{name}/dead-letters", get(dead_letters))
        .route("/v1/subscriptions/{name}/redrive", post(redrive))
        .route("/v1/stats", get(stats))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    // The API description is public (no token), like the service's health endpoints.
    let routes = routes.route("/v1/openapi.json", get(openapi));
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn spawn_housekeeping(state: AppState, shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Ok(stats) = state.backend.stats().await {
                for s in stats {
                    let labels = [("subscription", s.subscription.clone())];
                    metrics::gauge!("echo_queue_depth", &labels).set(s.depth as f64);
                    metrics::gauge!("echo_queue_in_flight", &labels).set(s.in_flight as f64);
                    metrics::gauge!("echo_queue_dead_letters", &labels).set(s.dead_letters as f64);
                    metrics::gauge!("echo_queue_oldest_age_seconds", &labels).set(s.oldest_age_ms.unwrap_or(0) as f64 / 1000.0);
                }
            }
            if common::now_unix() % 600 == 0
                && let Err(error) = state.backend.housekeeping().await
            {
                tracing::warn!(%error, "queue housekeeping failed");
            }
        }
    });
}

fn check_name(kind: &'static str, name: &str) -> ApiResult<()> {
    let valid = !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request("queue.invalid_name", format!("{kind} names are 1 to 128 letters, digits, '.', '-' or '_'")))
    }
}

async fn declare(State(state): State<AppState>, Path(name): Path<String>, Json(spec): Json<SubscriptionSpec>) -> ApiResult<Json<serde_json::Value>> {
    check_name("subscription", &name)?;
    check_name("topic", &spec.topic)?;
    let max_deliveries = spec.max_deliveries.unwrap_or(state.config.max_deliveries).clamp(1, 100);
    let lease_ms = spec.lease_ms.unwrap_or(state.config.lease_ms).clamp(100, 12 * 3600 * 1000);
    let ordered = spec.ordered.unwrap_or(false);
    let subscription = Subscription { name: name.clone(), topic: spec.topic.clone(), max_deliveries, lease_ms, ordered };
    if state.backend.declare(&subscription).await.map_err(ApiError::internal)? == Declared::Conflict {
        return Err(ApiError::conflict("queue.subscription_exists", format!("subscription `{name}` exists on another topic")));
    }
    Ok(Json(serde_json::json!({"subscription": name, "topic": spec.topic, "max_deliveries": max_deliveries, "lease_ms": lease_ms, "ordered": ordered})))
}

async fn publish(State(state): State<AppState>, Path(topic): Path<String>, Json(batch): Json<PublishBatch>) -> ApiResult<Json<PublishResult>> {
    if !events::ALL.contains(&topic.as_str()) {
        return Err(ApiError::bad_request("queue.unknown_event_type", format!("`{topic}` is not an Echo event type")));
    }
    if batch.messages.is_empty() || batch.messages.len() > 1000 {
        return Err(ApiError::bad_request("queue.batch_size", "a batch carries 1 to 1000 messages"));
    }
    let mut messages = Vec::with_capacity(batch.messages.len());
    for message in batch.messages {
        let event = message.event;
        if event.specversion != "1.0" || event.type_ != topic || event.id.is_empty() || event.source.is_empty() {
            return Err(ApiError::bad_request(
                "queue.invalid_event",
                "events must be CloudEvents 1.0 with an id, a source and the topic as type",
            ));
        }
        if let Err(reason) = common::wire::validate_event_data(&event.type_, &event.dataversion, &event.data) {
            return Err(ApiError::bad_request("queue.invalid_event_data", format!("{} data does not match its schema: {reason}", event.type_)));
        }
        let size = serde_json::to_vec(&event).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > state.config.max_message_bytes {
            return Err(ApiError::new(common::ErrorKind::PayloadTooLarge, "queue.message_too_large", "message exceeds max_message_bytes"));
        }
        for (field, value) in [("key", &message.key), ("ordering_key", &message.ordering_key)] {
            if value.as_ref().is_some_and(|v| v.is_empty() || v.len() > 256 || v.chars().any(char::is_control)) {
                return Err(ApiError::bad_request("queue.invalid_key", format!("`{field}` is 1 to 256 characters, none of them control characters")));
            }
        }
        messages.push(NewMessage {
            event,
            key: message.key,
            ordering_key: message.ordering_key,
            delay_ms: message.delay_ms.unwrap_or(0).clamp(0, 7 * 86_400_000),
        });
    }
    let ids = state.backend.publish(&topic, messages).await.map_err(ApiError::internal)?;
    metrics::counter!("echo_queue_published_total", "topic" => topic).increment(ids.len() as u64);
    Ok(Json(PublishResult { ids }))
}

async fn pull(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<PullRequest>) -> ApiResult<Json<PullResponse>> {
    let max = request.max.clamp(1, 100);
    let wait = Duration::from_millis(request.wait_ms.min(30_000));
    let leased = state
        .backend
        .pull(&name, max, wait)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("queue.subscription_not_found", format!("no subscription `{name}`")))?;
    Ok(Json(PullResponse { messages: leased }))
}

async fn ack(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<AckRequest>) -> ApiResult<Json<serde_json::Value>> {
    let acked = state.backend.ack(&name, request.seq, &request.lease).await.map_err(ApiError::internal)?;
    if !acked {
        return Err(ApiError::conflict("queue.lease_lost", "the lease expired or the message was already settled"));
    }
    Ok(Json(serde_json::json!({"acked": true})))
}

async fn nack(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<NackRequest>) -> ApiResult<Json<serde_json::Value>> {
    let error: String = request.error.chars().take(2000).collect();
    let nacked = state.backend.nack(&name, request.seq, &request.lease, &error).await.map_err(ApiError::internal)?;
    if !nacked {
        return Err(ApiError::conflict("queue.lease_lost", "the lease expired or the message was already settled"));
    }
    Ok(Json(serde_json::json!({"nacked": true})))
}

#[derive(Deserialize)]
struct ExtendRequest {
    seq: i64,
    lease: String,
    lease_ms: i64,
}

async fn extend(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<ExtendRequest>) -> ApiResult<Json<serde_json::Value>> {
    let lease_ms = request.lease_ms.clamp(100, 12 * 3600 * 1000);
    let extended = state.backend.extend(&name, request.seq, &request.lease, lease_ms).await.map_err(ApiError::internal)?;
    if !extended {
        return Err(ApiError::conflict("queue.lease_lost", "the lease expired or the message was already settled"));
    }
    Ok(Json(serde_json::json!({"extended": true})))
}

/// The REST API of the bus, OpenAPI 3.1.
const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> axum::response::Response {
    use axum::response::IntoResponse;
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn stats(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(serde_json::json!({"backend": state.backend.kind(), "subscriptions": state.backend.stats().await.map_err(ApiError::internal)?})))
}

#[derive(Deserialize)]
struct DeadLetterQuery {
    limit: Option<i64>,
}

async fn dead_letters(State(state): State<AppState>, Path(name): Path<String>, Query(query): Query<DeadLetterQuery>) -> ApiResult<Json<serde_json::Value>> {
    let letters = state.backend.dead_letters(&name, query.limit.unwrap_or(100).clamp(1, 1000)).await.map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({"dead_letters": letters})))
}

#[derive(Deserialize, Default)]
struct RedriveRequest {
    seq: Option<i64>,
}

async fn redrive(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<RedriveRequest>) -> ApiResult<Json<serde_json::Value>> {
    let n = state.backend.redrive(&name, request.seq).await.map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({"redriven": n})))
}

