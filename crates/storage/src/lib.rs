//! storage — file blobs: streamed in with a size limit and a SHA-256 computed on the way,
//! streamed out with `Range`, `ETag` and conditional requests, per-user quotas.
//!
//! Layers: thin HTTP handlers (here) → the service functions (`service`) → two stores:
//! `blobs::BlobStore` holds the bytes (files under the data dir, or an S3-compatible
//! bucket: `storage.url`) and `ledger::Ledger` what exists and the quota held by uploads in
//! flight (`storage.db`, or PostgreSQL: `storage.database_url` / `database.url`). With both
//! on shared engines, storage replicas are stateless and interchangeable.
//! Public surface: `run`.

mod blobs;
mod ledger;
mod range;
mod service;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Router, middleware};
use futures_util::StreamExt;
use tokio::net::TcpListener;

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::wire::{BlobInfo, DocumentDeleted, events};
use common::{ApiError, ServiceContext};

use crate::range::Wanted;
use crate::service::Storage;

/// For `echod migrate`: puts every blob the embedded ledger lists (`expected`: id →
/// SHA-256) from `data_dir/blobs` into the store `target` names, streamed, and checks
/// each one's SHA-256 as it goes. Returns (blobs, bytes).
pub async fn copy_local_blobs(data_dir: &std::path::Path, target: &common::config::StorageConfig, expected: &std::collections::HashMap<String, String>) -> anyhow::Result<(usize, u64)> {
    anyhow::ensure!(!target.url.trim().is_empty(), "the target storage.url is empty: the files are already local");
    let local = blobs::LocalBlobs::open(data_dir.join("blobs")).await?;
    let remote = blobs::open(target, data_dir).await?;
    remote.ready().await.map_err(|e| anyhow::anyhow!(e))?;
    let (mut n, mut bytes) = (0, 0);
    for (id, sha256) in expected {
        use blobs::BlobStore as _;
        let body = local.get(id, None).await.map_err(|e| anyhow::anyhow!("blob {id}: {e}"))?.map(|chunk| chunk.map_err(|e| e.to_string())).boxed();
        let stored = remote.put(id, body, u64::MAX).await.map_err(|e| anyhow::anyhow!("blob {id}: {e}"))?;
        anyhow::ensure!(&stored.sha256 == sha256, "blob {id}: its SHA-256 is {} but the ledger says {sha256}", stored.sha256);
        n += 1;
        bytes += stored.size;
    }
    Ok((n, bytes))
}

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    ledger::open(config).await.map(|_| ())
}

/// Runs the storage service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let blobs = blobs::open(&ctx.config.storage, &ctx.config.data_dir).await?;
    let ledger = ledger::open(&ctx.config).await?;
    ledger.forget_stale_reservations().await?;
    tracing::info!(blobs = %blobs.describe(), "storage ready");
    let storage = Storage { blobs, ledger, config: ctx.config.storage.clone() };
    spawn_deletion_consumer(&ctx, storage.clone());
    let ready: common::server::ReadyCheck = {
        let storage = storage.clone();
        std::sync::Arc::new(move || {
            let storage = storage.clone();
            Box::pin(async move { storage.ready().await })
        })
    };
    let routes = Router::new()
        .route("/v1/reservations", axum::routing::post(reserve))
        .route("/v1/reservations/{id}", axum::routing::delete(release))
        .route("/v1/blobs", put(upload))
        .route("/v1/blobs/{id}", get(download).delete(remove))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(storage);
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn spawn_deletion_consumer(ctx: &ServiceContext, storage: Storage) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let spec = common::bus::SubscriptionSpec { topic: events::DOCUMENT_DELETED.into(), max_deliveries: None, lease_ms: None, ordered: None };
        if !ctx.bus.declare("storage-deletions", &spec, &ctx.shutdown).await {
            return;
        }
        ctx.bus.spawn_consumer("storage-deletions", 4, ctx.shutdown.clone(), move |event, _| {
            let storage = storage.clone();
            async move {
                let deleted: DocumentDeleted = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                storage.delete(&deleted.blob_id).await.map_err(|e| e.to_string())
            }
        });
    });
}

#[derive(serde::Deserialize)]
struct ReserveBody {
    bytes: u64,
}

/// `POST /v1/reservations {"bytes"}`: quota for an upload about to stream, so that
/// concurrent uploads cannot together exceed the quota and a refusal comes before
/// any byte is sent.
async fn reserve(State(storage): State<Storage>, ActingUser(principal): ActingUser, Json(body): Json<ReserveBody>) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let bytes = body.bytes.max(1);
    let id = storage.reserve(&principal.sub, body.bytes).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"reservation": id, "bytes": bytes}))))
}

async fn release(State(storage): State<Storage>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<StatusCode> {
    storage.ledger.release(&id, Some(&principal.sub)).await.map_err(ApiError::internal)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
struct UploadParams {
    reservation: Option<String>,
}

/// `PUT /v1/blobs[?reservation=ID]`: streams the body into a new blob, at most as
/// large as the reservation (without one, as much of the owner's free quota as one
/// blob may take is reserved first).
async fn upload(
    State(storage): State<Storage>,
    ActingUser(principal): ActingUser,
    common::error::Query(params): common::error::Query<UploadParams>,
    request: Request,
) -> ApiResult<(StatusCode, Json<BlobInfo>)> {
    let body = request.into_body().into_data_stream().map(|chunk| chunk.map_err(|e| e.to_string())).boxed();
    let stored = storage.upload(&principal.sub, params.reservation.as_deref(), body).await?;
    Ok((StatusCode::CREATED, Json(stored)))
}

/// `GET /v1/blobs/{id}`: the bytes, whole or a range, with `ETag` (the SHA-256) and
/// `Last-Modified`.
async fn download(State(storage): State<Storage>, Path(id): Path<String>, request: Request) -> Response {
    let found = match storage.find(&id).await {
        Ok(found) => found,
        Err(error) => return error.into_response(),
    };
    let etag = format!("\"{}\"", found.sha256);
    let validators = range::Validators { etag: &etag, modified: range::unix_time(found.created_at) };
    let wanted = range::wanted(request.headers(), found.size, &validators);
    let mut response = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, validators.last_modified())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    let (status, part) = match wanted {
        Wanted::NotModified => return response.status(StatusCode::NOT_MODIFIED).body(Body::empty()).unwrap_or_default(),
        Wanted::Unsatisfiable => {
            return response
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{}", found.size))
                .body(Body::empty())
                .unwrap_or_default();
        }
        Wanted::Whole => (StatusCode::OK, None),
        Wanted::Part(part) => {
            response = response.header(header::CONTENT_RANGE, format!("bytes {}-{}/{}", part.start, part.end - 1, found.size));
            (StatusCode::PARTIAL_CONTENT, Some(part))
        }
    };
    let length = part.as_ref().map_or(found.size, |p| p.end - p.start);
    let stream = match storage.read(&id, part).await {
        Ok(stream) => stream,
        Err(error) => return error.into_response(),
    };
    let mut response = response.status(status).body(Body::from_stream(stream)).unwrap_or_default();
    if let Ok(value) = HeaderValue::from_str(&length.to_string()) {
        response.headers_mut().insert(header::CONTENT_LENGTH, value);
    }
    response
}

async fn remove(State(storage): State<Storage>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    storage.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
