//! storage — file blobs on the local filesystem under the data dir.
//!
//! Uploads stream to a temporary file with a size limit, hashing SHA-256 on the way,
//! and are renamed into place only when complete (a crash never leaves a partial blob
//! visible). Downloads stream with `Range`, `ETag` and conditional requests. Per-user
//! quotas are enforced from the blob ledger in `storage.db`. Public surface: `run`.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Router, middleware};
use futures_util::StreamExt;
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tower::ServiceExt;

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::wire::{BlobInfo, DocumentDeleted, events};
use common::{ApiError, ErrorKind, ServiceContext, ServiceName};

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE blobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX blobs_owner ON blobs(owner);
"#, r#"
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX reservations_owner ON reservations(owner);
"#];

/// How long a reservation holds quota for an upload that never finishes (the
/// process died mid-upload): after this it counts for nothing.
const RESERVATION_TTL_SECS: i64 = 3600;

#[derive(Clone)]
struct AppState {
    root: Arc<PathBuf>,
    pool: sqlx::SqlitePool,
    config: common::config::StorageConfig,
}

/// Runs the storage service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let root = ctx.config.data_dir.join("blobs");
    tokio::fs::create_dir_all(root.join("tmp")).await?;
    clean_temporaries(&root.join("tmp")).await;
    let pool = common::db::open_migrated(&ctx.config.db_path(ServiceName::Storage), MIGRATIONS).await?;
    // Uploads in flight when the last run ended will never finish.
    sqlx::query("DELETE FROM reservations").execute(&pool).await?;
    let state = AppState { root: Arc::new(root), pool, config: ctx.config.storage.clone() };
    spawn_deletion_consumer(&ctx, state.clone());
    let routes = Router::new()
        .route("/v1/reservations", axum::routing::post(reserve))
        .route("/v1/reservations/{id}", axum::routing::delete(release))
        .route("/v1/blobs", put(upload))
        .route("/v1/blobs/{id}", get(download).delete(remove))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, common::server::always_ready()).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

/// Removes upload leftovers of a previous run that died mid-upload.
async fn clean_temporaries(tmp: &FsPath) {
    if let Ok(mut entries) = tokio::fs::read_dir(tmp).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

fn spawn_deletion_consumer(ctx: &ServiceContext, state: AppState) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let spec = common::bus::SubscriptionSpec { topic: events::DOCUMENT_DELETED.into(), max_deliveries: None, lease_ms: None, ordered: None };
        if !ctx.bus.declare("storage-deletions", &spec, &ctx.shutdown).await {
            return;
        }
        ctx.bus.spawn_consumer("storage-deletions", 4, ctx.shutdown.clone(), move |event, _| {
            let state = state.clone();
            async move {
                let deleted: DocumentDeleted = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                delete_blob(&state, &deleted.blob_id).await.map_err(|e| e.to_string())
            }
        });
    });
}

fn valid_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok()
}

fn blob_path(root: &FsPath, id: &str) -> PathBuf {
    root.join(&id[..2]).join(id)
}

/// Sets aside `bytes` of `owner`'s quota, atomically with every other upload of the
/// owner: what is stored plus what is reserved never exceeds the quota. Returns the
/// reservation id; `storage.quota_exceeded` when it does not fit.
async fn reserve_quota(state: &AppState, owner: &str, bytes: u64) -> Result<String, ApiError> {
    let quota = state.config.quota_bytes_per_user;
    let now = common::now_unix();
    let mut tx = common::db::begin_write(&state.pool).await?;
    let used: i64 = sqlx::query_scalar(
        "SELECT (SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner = ?1) + (SELECT COALESCE(SUM(bytes), 0) FROM reservations WHERE owner = ?1 AND expires_at > ?2)",
    )
    .bind(owner)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let used = used.max(0) as u64;
    if used.saturating_add(bytes) > quota {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            "storage.quota_exceeded",
            format!("the upload needs up to {bytes} bytes but only {} of your {quota} bytes of storage are free", quota.saturating_sub(used)),
        ));
    }
    let id = uuid::Uuid::new_v4().to_string();
    sqlx::query("INSERT INTO reservations (id, owner, bytes, expires_at) VALUES (?, ?, ?, ?)")
        .bind(&id)
        .bind(owner)
        .bind(bytes as i64)
        .bind(now + RESERVATION_TTL_SECS)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

#[derive(serde::Deserialize)]
struct ReserveBody {
    bytes: u64,
}

/// `POST /v1/reservations {"bytes"}`: quota for an upload about to stream, so that
/// concurrent uploads cannot together exceed the quota and a refusal comes before
/// any byte is sent.
async fn reserve(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(body): Json<ReserveBody>) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if body.bytes > state.config.max_blob_bytes {
        return Err(too_large(&state));
    }
    let id = reserve_quota(&state, &principal.sub, body.bytes.max(1)).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"reservation": id, "bytes": body.bytes.max(1)}))))
}

async fn release(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<StatusCode> {
    sqlx::query("DELETE FROM reservations WHERE id = ? AND owner = ?").bind(&id).bind(&principal.sub).execute(&state.pool).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn too_large(state: &AppState) -> ApiError {
    ApiError::new(ErrorKind::PayloadTooLarge, "storage.too_large", format!("files are limited to {} bytes", state.config.max_blob_bytes))
}

#[derive(serde::Deserialize)]
struct UploadParams {
    reservation: Option<String>,
}

/// `PUT /v1/blobs[?reservation=ID]`: streams the body into a new blob, at most as
/// large as the reservation (without one, as much of the owner's free quota as one
/// blob may take is reserved first). The reservation becomes the blob's size on
/// success and is released on failure.
async fn upload(
    State(state): State<AppState>,
    ActingUser(principal): ActingUser,
    common::error::Query(params): common::error::Query<UploadParams>,
    request: Request,
) -> ApiResult<(StatusCode, Json<BlobInfo>)> {
    let now = common::now_unix();
    let (reservation, limit) = match params.reservation {
        Some(id) => {
            let bytes: Option<i64> = sqlx::query_scalar("SELECT bytes FROM reservations WHERE id = ? AND owner = ? AND expires_at > ?")
                .bind(&id)
                .bind(&principal.sub)
                .bind(now)
                .fetch_optional(&state.pool)
                .await?;
            let bytes = bytes.ok_or_else(|| ApiError::bad_request("storage.unknown_reservation", "no such reservation (it expired or was used)"))?;
            (id, bytes.max(0) as u64)
        }
        None => {
            let used: i64 = sqlx::query_scalar(
                "SELECT (SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner = ?1) + (SELECT COALESCE(SUM(bytes), 0) FROM reservations WHERE owner = ?1 AND expires_at > ?2)",
            )
            .bind(&principal.sub)
            .bind(now)
            .fetch_one(&state.pool)
            .await?;
            let free = state.config.quota_bytes_per_user.saturating_sub(used.max(0) as u64);
            let bytes = state.config.max_blob_bytes.min(free);
            if bytes == 0 {
                return Err(ApiError::new(ErrorKind::PayloadTooLarge, "storage.quota_exceeded", "your storage quota is used up"));
            }
            (reserve_quota(&state, &principal.sub, bytes).await?, bytes)
        }
    };
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = state.root.join("tmp").join(&id);
    let stored = match write_stream(&tmp, request.into_body(), limit).await {
        Ok((size, sha256)) => commit_blob(&state, &principal.sub, &reservation, &id, &tmp, size, &sha256).await.map(|()| (size, sha256)),
        Err(error) => Err(match error {
            WriteError::TooLarge if limit < state.config.max_blob_bytes => {
                ApiError::new(ErrorKind::PayloadTooLarge, "storage.quota_exceeded", "the upload is larger than the quota it reserved")
            }
            WriteError::TooLarge => too_large(&state),
            WriteError::Io(error) => ApiError::internal(error),
            WriteError::Body(error) => ApiError::bad_request("storage.upload_interrupted", format!("the upload was interrupted: {error}")),
        }),
    };
    let (size, sha256) = match stored {
        Ok(done) => done,
        Err(error) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            let _ = sqlx::query("DELETE FROM reservations WHERE id = ?").bind(&reservation).execute(&state.pool).await;
            return Err(error);
        }
    };
    metrics::counter!("echo_storage_bytes_written_total").increment(size);
    Ok((StatusCode::CREATED, Json(BlobInfo { blob_id: id, sha256, size })))
}

/// Moves a complete upload into place and turns its reservation into the blob's row.
async fn commit_blob(state: &AppState, owner: &str, reservation: &str, id: &str, tmp: &FsPath, size: u64, sha256: &str) -> Result<(), ApiError> {
    let path = blob_path(&state.root, id);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(ApiError::internal)?;
    }
    tokio::fs::rename(tmp, &path).await.map_err(ApiError::internal)?;
    let mut tx = common::db::begin_write(&state.pool).await?;
    sqlx::query("DELETE FROM reservations WHERE id = ?").bind(reservation).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO blobs (id, owner, size, sha256, created_at) VALUES (?, ?, ?, ?, ?)")
        .bind(id)
        .bind(owner)
        .bind(size as i64)
        .bind(sha256)
        .bind(common::now_unix())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

enum WriteError {
    TooLarge,
    Io(std::io::Error),
    Body(String),
}

/// Streams `body` into `path`, fsyncs it, and returns (size, sha256).
async fn write_stream(path: &FsPath, body: Body, limit: u64) -> Result<(u64, String), WriteError> {
    let mut file = tokio::fs::File::create(path).await.map_err(WriteError::Io)?;
    let mut hasher = sha2::Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(WriteError::TooLarge);
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(WriteError::Io)?;
    }
    file.sync_all().await.map_err(WriteError::Io)?;
    Ok((size, hex::encode(hasher.finalize())))
}

async fn download(State(state): State<AppState>, Path(id): Path<String>, request: Request) -> Response {
    if !valid_id(&id) {
        return ApiError::not_found("storage.blob_not_found", "no such blob").into_response();
    }
    let sha: Option<String> = match sqlx::query_scalar("SELECT sha256 FROM blobs WHERE id = ?").bind(&id).fetch_optional(&state.pool).await {
        Ok(sha) => sha,
        Err(error) => return ApiError::from(error).into_response(),
    };
    let Some(sha) = sha else {
        return ApiError::not_found("storage.blob_not_found", "no such blob").into_response();
    };
    let path = blob_path(&state.root, &id);
    let etag = format!("\"{sha}\"");
    if request.headers().get(axum::http::header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    match tower_http::services::ServeFile::new(path).oneshot(request).await {
        Ok(response) => {
            let mut response = response.map(Body::new);
            if let Ok(value) = axum::http::HeaderValue::from_str(&etag) {
                response.headers_mut().insert(axum::http::header::ETAG, value);
            }
            response
        }
        Err(error) => ApiError::internal(error).into_response(),
    }
}

async fn delete_blob(state: &AppState, id: &str) -> Result<(), ApiError> {
    if !valid_id(id) {
        return Ok(());
    }
    match tokio::fs::remove_file(blob_path(&state.root, id)).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(ApiError::internal(error)),
    }
    sqlx::query("DELETE FROM blobs WHERE id = ?").bind(id).execute(&state.pool).await?;
    Ok(())
}

async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    delete_blob(&state, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
