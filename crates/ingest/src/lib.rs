//! ingest — the document catalog, job status, the transactional outbox and the
//! worker pipeline (parse → chunk → embed → index), and rebuilds of the whole index
//! (`reindex`).
//!
//! Public surface: `run`, and `chunk_texts` (the chunker, for benchmarks). The HTTP API is internal (the gateway calls it after its
//! own authorization checks); the worker runs in the same process unless
//! `ingest.workers` is 0. Invariants: a document row never exists without its job and
//! its `uploaded` event in the outbox; deleted documents are invisible everywhere.

mod chunk;
mod reindex;
mod store;
mod worker;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::wire::{CreatedDocument, Document, DocumentDeleted, DocumentUploaded, Job, NewDocument, ReindexRun, events};
use common::{ApiError, ServiceContext};

use store::CatalogStore;

#[derive(Clone)]
struct AppState {
    ctx: ServiceContext,
    store: Arc<dyn CatalogStore>,
    wake_relay: Arc<Notify>,
    reindexer: reindex::Reindexer,
}

/// The texts the chunker makes of `blocks` with a budget of `chunk_chars` characters
/// and `overlap_chars` of overlap (what the worker embeds and indexes).
pub fn chunk_texts(blocks: &[common::wire::TextBlock], chunk_chars: usize, overlap_chars: usize) -> Vec<String> {
    chunk::chunk_blocks(blocks, chunk_chars, overlap_chars).into_iter().map(|draft| draft.text).collect()
}

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the ingest API, the outbox relay and (unless `ingest.workers` is 0) the workers.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let store = store::open(&ctx.config).await?;
    let wake_relay = Arc::new(Notify::new());
    worker::spawn_relay(ctx.clone(), store.clone(), wake_relay.clone());
    let worker_ready = common::server::ReadyFlag::default();
    if ctx.config.ingest.workers > 0 {
        worker::spawn_workers(ctx.clone(), store.clone(), worker_ready.clone());
    } else {
        worker_ready.set();
    }
    let ready: common::server::ReadyCheck = {
        let store = store.clone();
        Arc::new(move || {
            let (store, worker_ready) = (store.clone(), worker_ready.clone());
            Box::pin(async move {
                store.ready().await?;
                if worker_ready.is_set() { Ok(()) } else { Err("the ingest worker subscription is not declared yet".into()) }
            })
        })
    };
    let reindexer = reindex::Reindexer::new(ctx.clone(), store.clone());
    reindexer.resume_if_running().await;
    let state = AppState { ctx: ctx.clone(), store, wake_relay, reindexer };
    let routes = Router::new()
        .route("/v1/documents", post(create_document))
        .route("/v1/documents/query", post(list_documents))
        .route("/v1/documents/{id}", get(get_document).delete(delete_document))
        .route("/v1/collections/{id}/purge", post(purge_collection))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/retry", post(retry_job))
        .route("/v1/reindex", get(reindex_status).post(start_reindex))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

/// `echod serve ingest-worker`: the workers alone, apart from the ingest API — they take
/// `echo.document.uploaded` from the bus and run each document through parse → chunk →
/// embed → index — with `/healthz`, `/readyz` and `/metrics` on `ingest.worker_port` and
/// no API. Run as many as the load needs beside ingest API replicas with
/// `ingest.workers: 0`; the bus hands each document to one of them (competing
/// consumers), and one killed mid-document loses nothing (its lease expires and another
/// takes the document again).
pub async fn run_worker(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    anyhow::ensure!(ctx.config.ingest.workers > 0, "ingest.workers is 0 here: an ingest-worker would take no document (set ECHO__INGEST__WORKERS)");
    let store = store::open(&ctx.config).await?;
    let worker_ready = common::server::ReadyFlag::default();
    worker::spawn_workers(ctx.clone(), store.clone(), worker_ready.clone());
    let ready: common::server::ReadyCheck = Arc::new(move || {
        let (store, worker_ready) = (store.clone(), worker_ready.clone());
        Box::pin(async move {
            store.ready().await?;
            if worker_ready.is_set() { Ok(()) } else { Err("the ingest worker subscription is not declared yet".into()) }
        })
    });
    let router = common::server::service_router(&ctx, Router::new(), ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn sanitize_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !c.is_control()).take(255).collect();
    let cleaned = cleaned.trim().trim_start_matches('.').to_string();
    if cleaned.is_empty() { "upload".to_string() } else { cleaned }
}

async fn create_document(
    State(state): State<AppState>,
    ActingUser(principal): ActingUser,
    Json(mut new): Json<NewDocument>,
) -> ApiResult<(StatusCode, Json<CreatedDocument>)> {
    new.filename = sanitize_filename(&new.filename);
    new.owner = principal.sub.clone();
    if !common::wire::is_classification(&new.classification) {
        return Err(ApiError::bad_request("document.invalid_classification", "classification is public, internal, confidential or restricted"));
    }
    if let Some(existing) = state.store.duplicate(&new.collection_id, &new.sha256).await? {
        return Ok((
            StatusCode::OK,
            Json(CreatedDocument { id: existing.id.clone(), job_id: existing.job_id, status: existing.status, duplicate_of: Some(existing.id) }),
        ));
    }
    let bus = state.ctx.bus.clone();
    let (id, job_id) = state
        .store
        .create(&new, &|document_id: &str, job_id: &str| {
            bus.event(
                events::DOCUMENT_UPLOADED,
                Some(format!("document:{document_id}")),
                DocumentUploaded {
                    document_id: document_id.to_string(),
                    job_id: job_id.to_string(),
                    collection_id: new.collection_id.clone(),
                    owner: new.owner.clone(),
                    blob_id: new.blob_id.clone(),
                    sha256: new.sha256.clone(),
                    content_type: new.content_type.clone(),
                    filename: new.filename.clone(),
                    version: 1,
                    classification: new.classification.clone(),
                },
            )
        })
        .await?;
    state.wake_relay.notify_one();
    Ok((StatusCode::CREATED, Json(CreatedDocument { id, job_id, status: "queued".into(), duplicate_of: None })))
}

#[derive(Deserialize)]
struct ListRequest {
    collections: Vec<String>,
    /// Collections where only these classifications may be listed.
    #[serde(default)]
    restricted: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    filter: common::wire::DocumentFilter,
}

#[derive(Serialize)]
struct DocumentPage {
    documents: Vec<Document>,
    total: i64,
}

async fn list_documents(State(state): State<AppState>, Json(request): Json<ListRequest>) -> ApiResult<Json<DocumentPage>> {
    let limit = request.limit.unwrap_or(50).clamp(1, 500);
    let offset = request.offset.unwrap_or(0).max(0);
    let (documents, total) = state.store.list(&request.collections, &request.restricted, &request.filter, limit, offset).await?;
    Ok(Json(DocumentPage { documents, total }))
}

fn document_not_found() -> ApiError {
    ApiError::not_found("document.not_found", "no such document")
}

async fn get_document(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Document>> {
    state.store.document(&id).await?.map(Json).ok_or_else(document_not_found)
}

async fn delete_document(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let document = state.store.document(&id).await?.ok_or_else(document_not_found)?;
    let event = state.ctx.bus.event(
        events::DOCUMENT_DELETED,
        Some(format!("document:{id}")),
        DocumentDeleted { document_id: id.clone(), collection_id: document.collection.clone(), blob_id: document.blob_id.clone() },
    );
    if !state.store.delete(&id, &event).await? {
        return Err(document_not_found());
    }
    state.wake_relay.notify_one();
    state.ctx.audit(&principal.sub, "document.deleted", &format!("document:{id}"), "success", serde_json::json!({"collection": document.collection})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes every document of a collection that is being deleted (the gateway has
/// checked `collection:delete`): each in its own transaction with its
/// `echo.document.deleted` event, so search and storage let go of it too.
async fn purge_collection(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let mut deleted = 0usize;
    loop {
        let batch = state.store.documents_in(&id, 500).await?;
        if batch.is_empty() {
            break;
        }
        for document in batch {
            let event = state.ctx.bus.event(
                events::DOCUMENT_DELETED,
                Some(format!("document:{}", document.id)),
                DocumentDeleted { document_id: document.id.clone(), collection_id: id.clone(), blob_id: document.blob_id.clone() },
            );
            if state.store.delete(&document.id, &event).await? {
                deleted += 1;
            }
        }
        state.wake_relay.notify_one();
    }
    state.ctx.audit(&principal.sub, "collection.purged", &format!("collection:{id}"), "success", serde_json::json!({"documents": deleted})).await;
    Ok(Json(serde_json::json!({"deleted": deleted})))
}

/// `POST /v1/reindex`: starts rebuilding the whole index, or resumes the rebuild
/// that was cut short (`echod reindex`).
async fn start_reindex(State(state): State<AppState>) -> ApiResult<(StatusCode, Json<ReindexRun>)> {
    Ok((StatusCode::ACCEPTED, Json(state.reindexer.start().await?)))
}

/// `GET /v1/reindex`: the newest rebuild and how far it got.
async fn reindex_status(State(state): State<AppState>) -> ApiResult<Json<ReindexRun>> {
    state.reindexer.status().await?.map(Json).ok_or_else(|| ApiError::not_found("reindex.none", "the index was never rebuilt"))
}

async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    state.store.job(&id).await?.map(Json).ok_or_else(|| ApiError::not_found("job.not_found", "no such job"))
}

/// `POST /v1/jobs/{id}/cancel`: stops a job that has not finished (its worker stops at
/// the next stage); 409 naming the status of one that has.
async fn cancel_job(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    match state.store.cancel(&id).await? {
        Ok(()) => {}
        Err(status) if status == "missing" => return Err(ApiError::not_found("job.not_found", "no such job")),
        Err(status) => return Err(ApiError::conflict("job.not_running", format!("the job is {status}; only a job in progress can be cancelled"))),
    }
    state.store.job(&id).await?.map(Json).ok_or_else(|| ApiError::not_found("job.not_found", "no such job"))
}

/// `POST /v1/jobs/{id}/retry`: queues a failed or cancelled job again from the start;
/// 409 naming the status of any other.
async fn retry_job(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    let job = state.store.job(&id).await?.ok_or_else(|| ApiError::not_found("job.not_found", "no such job"))?;
    let document = state.store.document(&job.document_id).await?.ok_or_else(|| ApiError::not_found("document.not_found", "the job's document was deleted"))?;
    let event = state.ctx.bus.event(
        events::DOCUMENT_UPLOADED,
        Some(format!("document:{}", document.id)),
        DocumentUploaded {
            document_id: document.id.clone(),
            job_id: document.job_id.clone(),
            collection_id: document.collection.clone(),
            owner: document.owner.clone(),
            blob_id: document.blob_id.clone(),
            sha256: document.sha256.clone(),
            content_type: document.content_type.clone(),
            filename: document.filename.clone(),
            version: document.version,
            classification: document.classification.clone(),
        },
    );
    match state.store.retry(&id, &event).await? {
        Ok(()) => state.wake_relay.notify_one(),
        Err(status) => return Err(ApiError::conflict("job.not_retryable", format!("the job is {status}; only a failed or cancelled job can be retried"))),
    }
    state.store.job(&id).await?.map(Json).ok_or_else(|| ApiError::not_found("job.not_found", "no such job"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn filenames_lose_paths_control_characters_and_leading_dots() {
        assert_eq!(sanitize_filename("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_filename("C:\\Users\\a\\report.pdf"), "report.pdf");
        assert_eq!(sanitize_filename("bad\u{0}name\n.md"), "badname.md");
        assert_eq!(sanitize_filename(".hidden"), "hidden");
        assert_eq!(sanitize_filename(""), "upload");
    }
}
