//! queue — Echo's durable event bus with a REST API.
//!
//! Topics are CloudEvents types; every subscription of a topic receives every message
//! (fan-out) and hands each to one consumer at a time (competing consumers) under a
//! lease. Publish answers only after the transaction is durable. Public surface: `run`.
//! Invariants: a message is removed from a subscription only by an ack carrying its
//! current lease; after `max_deliveries` it is dead-lettered, never dropped.

mod store;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use axum::{Router, middleware};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use common::bus::{AckRequest, NackRequest, PublishBatch, PublishResult, PullRequest, PullResponse, SubscriptionSpec};
use common::error::{ApiResult, Json, Query};
use common::wire::events;
use common::{ApiError, ServiceContext, ServiceName};

use store::{NewMessage, QueueStore};

#[derive(Clone)]
struct AppState {
    store: QueueStore,
    wake: Arc<Notify>,
    config: common::config::QueueConfig,
}

/// Runs the queue service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let store = QueueStore::open(&ctx.config.db_path(ServiceName::Queue)).await?;
    let state = AppState { store: store.clone(), wake: Arc::new(Notify::new()), config: ctx.config.queue.clone() };
    spawn_housekeeping(state.clone(), ctx.shutdown.clone());
    let ready = common::server::sqlite_ready(store.pool.clone(), vec![]);
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
    let router = common::server::service_router(ServiceName::Queue, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn spawn_housekeeping(state: AppState, shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            // Delayed, backed-off and expired messages become available with time, not
            // with a publish: wake the long-polls once a second so they look again.
            state.wake.notify_waiters();
            if let Ok(stats) = state.store.stats().await {
                for s in stats {
                    let labels = [("subscription", s.subscription.clone())];
                    metrics::gauge!("echo_queue_depth", &labels).set(s.depth as f64);
                    metrics::gauge!("echo_queue_in_flight", &labels).set(s.in_flight as f64);
                    metrics::gauge!("echo_queue_dead_letters", &labels).set(s.dead_letters as f64);
                }
            }
            if common::now_unix() % 600 == 0 {
                let _ = state.store.collect_garbage().await;
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
    if !state.store.declare(&name, &spec.topic, max_deliveries, lease_ms).await? {
        return Err(ApiError::conflict("queue.subscription_exists", format!("subscription `{name}` exists on another topic")));
    }
    Ok(Json(serde_json::json!({"subscription": name, "topic": spec.topic, "max_deliveries": max_deliveries, "lease_ms": lease_ms})))
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
        messages.push(NewMessage { event, key: message.key, delay_ms: message.delay_ms.unwrap_or(0).clamp(0, 7 * 86_400_000) });
    }
    let ids = state.store.publish(&topic, messages).await?;
    metrics::counter!("echo_queue_published_total", "topic" => topic).increment(ids.len() as u64);
    state.wake.notify_waiters();
    Ok(Json(PublishResult { ids }))
}

async fn pull(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<PullRequest>) -> ApiResult<Json<PullResponse>> {
    let max = request.max.clamp(1, 100);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(request.wait_ms.min(30_000));
    loop {
        let notified = state.wake.notified();
        let leased = state
            .store
            .lease(&name, max)
            .await?
            .ok_or_else(|| ApiError::not_found("queue.subscription_not_found", format!("no subscription `{name}`")))?;
        if !leased.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(PullResponse { messages: leased }));
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

async fn ack(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<AckRequest>) -> ApiResult<Json<serde_json::Value>> {
    let acked = state.store.ack(&name, request.seq, &request.lease).await?;
    if !acked {
        return Err(ApiError::conflict("queue.lease_lost", "the lease expired or the message was already settled"));
    }
    Ok(Json(serde_json::json!({"acked": true})))
}

async fn nack(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<NackRequest>) -> ApiResult<Json<serde_json::Value>> {
    let error: String = request.error.chars().take(2000).collect();
    let nacked = state.store.nack(&name, request.seq, &request.lease, &error).await?;
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
    let extended = state.store.extend(&name, request.seq, &request.lease, request.lease_ms.clamp(100, 12 * 3600 * 1000)).await?;
    if !extended {
        return Err(ApiError::conflict("queue.lease_lost", "the lease expired or the message was already settled"));
    }
    Ok(Json(serde_json::json!({"extended": true})))
}

async fn stats(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(serde_json::json!({"subscriptions": state.store.stats().await?})))
}

#[derive(Deserialize)]
struct DeadLetterQuery {
    limit: Option<i64>,
}

async fn dead_letters(State(state): State<AppState>, Path(name): Path<String>, Query(query): Query<DeadLetterQuery>) -> ApiResult<Json<serde_json::Value>> {
    let letters = state.store.dead_letters(&name, query.limit.unwrap_or(100).clamp(1, 1000)).await?;
    Ok(Json(serde_json::json!({"dead_letters": letters})))
}

#[derive(Deserialize, Default)]
struct RedriveRequest {
    seq: Option<i64>,
}

async fn redrive(State(state): State<AppState>, Path(name): Path<String>, Json(request): Json<RedriveRequest>) -> ApiResult<Json<serde_json::Value>> {
    let n = state.store.redrive(&name, request.seq).await?;
    state.wake.notify_waiters();
    Ok(Json(serde_json::json!({"redriven": n})))
}
