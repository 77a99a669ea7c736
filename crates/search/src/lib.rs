//! search — the chunk index and retrieval.
//!
//! Embedded: a Tantivy index under `data_dir/index` (BM25 over text, headings and
//! titles; each chunk's embedding in a fast field, searched exactly in memory) and
//! hybrid ranking by reciprocal rank fusion. Embeddings come from `embed` (the local
//! model, an OpenAI-compatible endpoint, or none: BM25 only, said at start).
//! Public surface: `run`, `ChunkIndex`, `Embedder`.
//! Invariants: a query only ever sees the collections the caller passed (the gateway
//! or rag computed them with authz), in both rankings; an empty collection list finds
//! nothing; vectors of another model than the index's are refused.

mod embed;
mod index;
mod vectors;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Router, middleware};
use tokio::net::TcpListener;

use common::error::{ApiResult, Json};
use common::wire::{DocumentDeleted, EmbedRequest, EmbedResponse, IndexRequest, SearchMode, SearchQuery, SearchResults, events};
use common::{ApiError, ErrorKind, ServiceContext};

pub use embed::{EmbedError, Embedder, LocalModel, LocalModelError, ModelId, LOCAL_MODEL_NAME};
pub use index::{ChunkIndex, Fusion, IndexError, SearchRequest};

#[derive(Clone)]
struct AppState {
    index: Arc<ChunkIndex>,
    embedder: Arc<Embedder>,
    /// The embedder's model, when it is on and matches the index's vectors.
    model: Option<ModelId>,
    fusion: Fusion,
    max_k: usize,
}

impl From<IndexError> for ApiError {
    fn from(error: IndexError) -> Self {
        match error {
            IndexError::ModelMismatch { .. } => ApiError::new(ErrorKind::Conflict, "search.model_mismatch", error.to_string()),
            IndexError::BadEmbedding(_) => ApiError::bad_request("search.bad_embedding", error.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<embed::EmbedError> for ApiError {
    fn from(error: embed::EmbedError) -> Self {
        match error {
            embed::EmbedError::Disabled => ApiError::new(ErrorKind::Conflict, "search.embeddings_off", "no embedding provider is configured"),
            other => ApiError::unavailable("search.embeddings_failed", other.to_string()),
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, IndexError> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)?.map_err(ApiError::from)
}

/// The fusion settings of `config.search`.
pub fn fusion_of(config: &common::config::SearchConfig) -> Fusion {
    Fusion { rrf_k: config.rrf_k, bm25_weight: config.bm25_weight, vector_weight: config.vector_weight, candidates: config.candidates }
}

/// Runs the search service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let dir = ctx.config.data_dir.join("index");
    let memory = ctx.config.search.writer_memory_mb;
    let index = Arc::new(tokio::task::spawn_blocking(move || ChunkIndex::open(&dir, memory)).await??);
    let embedder = Arc::new(Embedder::from_config(&ctx.config));
    let mut model = embedder.model_id();
    tracing::info!(chunks = index.n_chunks(), vectors = index.n_vectors(), "search index open; {}", embedder.describe());
    if let (Some(configured), Some(recorded)) = (&model, index.recorded_model())
        && let Err(error) = index.check_model(configured)
    {
        tracing::error!(%recorded, %configured, "{error}; until then search is BM25 only");
        model = None;
    }
    let state = AppState { index, embedder, model, fusion: fusion_of(&ctx.config.search), max_k: ctx.config.search.max_k };
    spawn_deletion_consumer(&ctx, state.clone());
    // One request carries a whole document's chunks: as much text as the parser may
    // return (up to 4 bytes a character), again for the overlap, the vectors, and JSON.
    let index_limit = ctx.config.parser.max_output_chars.saturating_mul(8).saturating_add(64 * 1024 * 1024);
    let routes = Router::new()
        .route("/v1/index", post(index_document).layer(axum::extract::DefaultBodyLimit::max(index_limit)))
        .route("/v1/embed", post(embed_texts).layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024)))
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

/// `POST /v1/embed`: the ingest worker's embedding stage.
async fn embed_texts(State(state): State<AppState>, Json(request): Json<EmbedRequest>) -> ApiResult<Json<EmbedResponse>> {
    if request.texts.len() > 1024 {
        return Err(ApiError::bad_request("search.too_many_texts", "at most 1024 texts per call"));
    }
    let model = state.model.clone().ok_or_else(|| match state.embedder.enabled() {
        true => ApiError::new(ErrorKind::Conflict, "search.model_mismatch", "the index holds vectors of another model; run `echod reindex`"),
        false => ApiError::new(ErrorKind::Conflict, "search.embeddings_off", "no embedding provider is configured"),
    })?;
    let vectors = state.embedder.embed(request.texts).await?;
    let dimension = vectors.first().map(Vec::len).unwrap_or(model.dimension);
    Ok(Json(EmbedResponse { vectors: vectors.iter().map(|v| common::wire::encode_vector(v)).collect(), model: model.name, dimension }))
}

async fn index_document(State(state): State<AppState>, Json(request): Json<IndexRequest>) -> ApiResult<Json<serde_json::Value>> {
    if request.chunks.iter().any(|c| c.document_id != request.document_id) {
        return Err(ApiError::bad_request("search.mismatched_document", "every chunk must belong to the document being indexed"));
    }
    if request.chunks.iter().any(|c| c.embedding.is_some()) {
        let model = state.model.clone().ok_or_else(|| ApiError::new(ErrorKind::Conflict, "search.model_mismatch", "vectors cannot be stored: the index holds another model's, or embeddings are off"))?;
        let dimension = request.chunks.iter().find_map(|c| c.embedding.as_deref()).and_then(common::wire::decode_vector).map(|v| v.len()).unwrap_or(0);
        state.index.check_model(&ModelId { dimension: if model.dimension == 0 { dimension } else { model.dimension }, ..model })?;
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
    let wanted = query.mode.unwrap_or(SearchMode::Hybrid);
    let vector = match (&state.model, wanted) {
        (Some(_), SearchMode::Hybrid | SearchMode::Vector) => match state.embedder.embed_query(&query.query).await {
            Ok(vector) => Some(vector),
            Err(error) => {
                tracing::warn!(%error, "the query could not be embedded; answering with BM25 alone");
                None
            }
        },
        _ => None,
    };
    let mode = if vector.is_some() { wanted } else { SearchMode::Bm25 };
    let index = state.index.clone();
    let fusion = state.fusion;
    let hits = blocking(move || {
        let request = SearchRequest {
            query: &query.query,
            vector: vector.as_deref().map(Vec::as_slice),
            collections: &query.collections,
            restricted: &query.restricted,
            k,
            mode,
            fusion,
        };
        index.search(&request)
    })
    .await?;
    Ok(Json(SearchResults { hits }))
}

async fn delete_document(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let index = state.index.clone();
    blocking(move || index.delete_document(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}
