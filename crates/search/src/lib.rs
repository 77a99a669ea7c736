//! search — the chunk index and retrieval.
//!
//! Embedded: a Tantivy BM25 index under `data_dir/index` (vectors and hybrid fusion
//! arrive with their own issue). Public surface: `run` and `ChunkIndex`.
//! Invariants: a query only ever sees the collections the caller passed (the gateway
//! or rag computed them with authz); an empty collection list finds nothing.

mod index;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Router, middleware};
use tokio::net::TcpListener;

use common::error::{ApiResult, Json};
use common::wire::{DocumentDeleted, IndexRequest, SearchQuery, SearchResults, events};
use common::{ApiError, ServiceContext};

pub use index::{ChunkIndex, IndexError};

#[derive(Clone)]
struct AppState {
    index: Arc<ChunkIndex>,
    max_k: usize,
}

impl From<IndexError> for ApiError {
    fn from(error: IndexError) -> Self {
        ApiError::internal(error)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, IndexError> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)?.map_err(ApiError::from)
}

/// Runs the search service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let dir = ctx.config.data_dir.join("index");
    let memory = ctx.config.search.writer_memory_mb;
    let index = Arc::new(tokio::task::spawn_blocking(move || ChunkIndex::open(&dir, memory)).await??);
    let state = AppState { index, max_k: ctx.config.search.max_k };
    spawn_deletion_consumer(&ctx, state.clone());
    // One request carries a whole document's chunks: as much text as the parser may
    // return (up to 4 bytes a character), again for the overlap, and JSON around it.
    let index_limit = ctx.config.parser.max_output_chars.saturating_mul(8).saturating_add(16 * 1024 * 1024);
    let routes = Router::new()
        .route("/v1/index", post(index_document).layer(axum::extract::DefaultBodyLimit::max(index_limit)))
        .route("/v1/search", post(search))
        .route("/v1/documents/{id}", delete(delete_document))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, common::server::always_ready()).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn spawn_deletion_consumer(ctx: &ServiceContext, state: AppState) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let spec = common::bus::SubscriptionSpec { topic: events::DOCUMENT_DELETED.into(), max_deliveries: None, lease_ms: None, ordered: None };
        if !ctx.bus.declare("search-deletions", &spec, &ctx.shutdown).await {
            return;
        }
        ctx.bus.spawn_consumer("search-deletions", 2, ctx.shutdown.clone(), move |event, _| {
            let state = state.clone();
            async move {
                let deleted: DocumentDeleted = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                let index = state.index.clone();
                blocking(move || index.delete_document(&deleted.document_id)).await.map_err(|e| e.to_string())
            }
        });
    });
}

async fn index_document(State(state): State<AppState>, Json(request): Json<IndexRequest>) -> ApiResult<Json<serde_json::Value>> {
    if request.chunks.iter().any(|c| c.document_id != request.document_id) {
        return Err(ApiError::bad_request("search.mismatched_document", "every chunk must belong to the document being indexed"));
    }
    let n_chunks = request.chunks.len();
    let index = state.index.clone();
    blocking(move || index.replace_document(&request.document_id, &request.chunks)).await?;
    metrics::counter!("echo_search_chunks_indexed_total").increment(n_chunks as u64);
    Ok(Json(serde_json::json!({"indexed": n_chunks})))
}

async fn search(State(state): State<AppState>, Json(query): Json<SearchQuery>) -> ApiResult<Json<SearchResults>> {
    if query.query.len() > 4096 {
        return Err(ApiError::bad_request("search.query_too_long", "queries are limited to 4096 bytes"));
    }
    let k = query.k.clamp(1, state.max_k);
    let index = state.index.clone();
    let hits = blocking(move || index.search(&query.query, &query.collections, &query.restricted, k)).await?;
    Ok(Json(SearchResults { hits }))
}

async fn delete_document(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let index = state.index.clone();
    blocking(move || index.delete_document(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}
