//! The search service's functions, between the HTTP handlers and the index. The one
//! authorized retrieval path of Echo lives here (the gateway's search and rag's
//! answers both call it): what the user may read (authz, cached by `access`) → a
//! search filtered to exactly that in both rankings → every hit re-checked against
//! the same answer before it leaves.

use std::sync::Arc;

use bytes::Bytes;

use common::wire::{Chunk, Principal, ReadableCollections, RebuildStatus, SearchHit, SearchMode, SearchQuery, SearchResults};
use common::{ApiError, ErrorKind};

use crate::access::Access;
use crate::embed::{EmbedError, Embedder, ModelId};
use crate::index::{Fusion, IndexError};
use crate::rerank::Reranker;
use crate::results::{KeyParts, ResultCache};
use crate::store::{ChunkStore, Query};

/// A search, decided: what the caller may read and how it will be ranked.
struct Plan {
    readable: Arc<ReadableCollections>,
    collections: Vec<String>,
    restricted: std::collections::BTreeMap<String, Vec<String>>,
    k: usize,
    reranker: Option<Arc<Reranker>>,
    wanted: SearchMode,
    version: u64,
    vectors_usable: bool,
}

/// The longest query accepted, in bytes.
pub(crate) const MAX_QUERY_BYTES: usize = 4096;

#[derive(Clone)]
pub(crate) struct Retrieval {
    pub(crate) index: Arc<dyn ChunkStore>,
    pub(crate) embedder: Arc<Embedder>,
    /// The embedder's model, when embeddings are on.
    pub(crate) model: Option<ModelId>,
    pub(crate) fusion: Fusion,
    pub(crate) max_k: usize,
    pub(crate) access: Access,
    pub(crate) reranker: Option<Arc<Reranker>>,
    pub(crate) results: Arc<ResultCache>,
}

impl From<IndexError> for ApiError {
    fn from(error: IndexError) -> Self {
        match error {
            IndexError::ModelMismatch { .. } => ApiError::new(ErrorKind::Conflict, "search.model_mismatch", error.to_string()),
            IndexError::BadEmbedding(_) => ApiError::bad_request("search.bad_embedding", error.to_string()),
            IndexError::NoRebuild => ApiError::new(ErrorKind::Conflict, "search.no_rebuild", error.to_string()),
            IndexError::NoModel => ApiError::new(ErrorKind::Conflict, "search.embeddings_off", error.to_string()),
            IndexError::Database(_) => ApiError::unavailable("search.database_unavailable", error.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<EmbedError> for ApiError {
    fn from(error: EmbedError) -> Self {
        match error {
            EmbedError::Disabled => ApiError::new(ErrorKind::Conflict, "search.embeddings_off", "no embedding provider is configured"),
            other => ApiError::unavailable("search.embeddings_failed", other.to_string()),
        }
    }
}

/// `hits` in the reranker's order (its scores as theirs), or as they came should the
/// reranker fail: a search never fails for it.
async fn reranked(reranker: &Reranker, query: &str, hits: Vec<SearchHit>) -> Vec<SearchHit> {
    if hits.len() < 2 {
        return hits;
    }
    let passages: Vec<&str> = hits.iter().map(|hit| hit.text.as_str()).collect();
    let started = std::time::Instant::now();
    let order = reranker.rank(query, &passages).await;
    metrics::histogram!("echo_search_rerank_seconds").record(started.elapsed().as_secs_f64());
    match order {
        Ok(order) => {
            let mut slots: Vec<Option<SearchHit>> = hits.into_iter().map(Some).collect();
            order
                .into_iter()
                .filter_map(|(index, score)| {
                    let mut hit = slots.get_mut(index)?.take()?;
                    hit.score = score;
                    Some(hit)
                })
                .collect()
        }
        Err(error) => {
            metrics::counter!("echo_search_rerank_failures_total").increment(1);
            tracing::warn!(%error, "reranking failed; the fused order stands");
            hits
        }
    }
}

/// A snippet's text without its marks and escapes.
fn plain_text(snippet: &str) -> String {
    snippet
        .replace("<mark>", "")
        .replace("</mark>", "")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

impl Retrieval {
    /// The chunks `principal` may read that best answer `query`, best first, serialized
    /// as `SearchResults` — from the result cache when this exact question was answered
    /// for exactly these permissions on this version of the index.
    pub(crate) async fn search_answer(&self, principal: &Principal, query: SearchQuery) -> Result<Bytes, ApiError> {
        let Some(plan) = self.plan(principal, &query).await? else {
            return Ok(Bytes::from_static(br#"{"hits":[]}"#));
        };
        let key = KeyParts {
            index_version: plan.version,
            query: &query.query,
            k: plan.k,
            per_page: query.per_page.unwrap_or(1),
            mode: plan.wanted,
            vectors_used: plan.vectors_usable,
            full_text: query.full_text,
            rerank: plan.reranker.is_some(),
            collections: &plan.collections,
            restricted: &plan.restricted,
        }
        .key();
        if let Some(answer) = self.results.get(&key) {
            return Ok(answer);
        }
        let (hits, complete) = self.run(plan, &query).await?;
        let answer = Bytes::from(serde_json::to_vec(&SearchResults { hits }).map_err(ApiError::internal)?);
        // An answer made without the vectors it should have had (the query could not
        // be embedded) is not kept.
        if complete {
            self.results.put(key, answer.clone());
        }
        Ok(answer)
    }

    /// What `principal` may search and how: `None` when nothing at all.
    async fn plan(&self, principal: &Principal, query: &SearchQuery) -> Result<Option<Plan>, ApiError> {
        if query.query.trim().is_empty() || query.query.len() > MAX_QUERY_BYTES {
            return Err(ApiError::bad_request("search.invalid_query", format!("queries are 1 to {MAX_QUERY_BYTES} bytes")));
        }
        let readable = self.access.readable(principal).await?;
        let collections: Vec<String> = match &query.collections {
            Some(wanted) => readable.collections.iter().filter(|c| wanted.contains(c)).cloned().collect(),
            None => readable.collections.clone(),
        };
        if collections.is_empty() {
            return Ok(None);
        }
        let restricted = readable.restricted.iter().filter(|(c, _)| collections.contains(c)).map(|(c, v)| (c.clone(), v.clone())).collect();
        let k = query.k.clamp(1, self.max_k);
        let reranker = self.reranker.clone().filter(|_| query.rerank != Some(false));
        let wanted = query.mode.unwrap_or(SearchMode::Hybrid);
        // Read before the search: a commit meanwhile makes a newer version, so an answer
        // is never kept under a version older than the index it saw… only newer.
        let state = self.index.state().await?;
        let version = state.version;
        // The live index's vectors are of the configured model, or searches are BM25
        // only until `echod reindex` has rebuilt it.
        let usable = self.model.as_ref().filter(|model| state.holds_vectors_of(model)).is_some();
        if let (Some(configured), false, SearchMode::Vector) = (&self.model, usable, wanted) {
            let recorded = state.recorded.map(|m| m.to_string()).unwrap_or_default();
            return Err(IndexError::ModelMismatch { recorded, configured: configured.to_string() }.into());
        }
        let vectors_usable = usable && matches!(wanted, SearchMode::Hybrid | SearchMode::Vector);
        Ok(Some(Plan { readable, collections, restricted, k, reranker, wanted, version, vectors_usable }))
    }

    /// Runs a plan: the hits, and whether they are as the plan meant them (false when
    /// the query could not be embedded and BM25 answered alone).
    async fn run(&self, plan: Plan, query: &SearchQuery) -> Result<(Vec<SearchHit>, bool), ApiError> {
        let Plan { readable, collections, restricted, k, reranker, wanted, vectors_usable, .. } = plan;
        // A reranker reorders a deeper list than is returned.
        let depth = reranker.as_ref().map_or(k, |r| r.candidates.max(k).min(self.max_k));
        let mut complete = true;
        let vector = match vectors_usable {
            true => match self.embedder.embed_query(&query.query).await {
                Ok(vector) => Some(vector),
                Err(error) => {
                    tracing::warn!(%error, "the query could not be embedded; answering with BM25 alone");
                    complete = false;
                    None
                }
            },
            false => None,
        };
        let mode = if vector.is_some() { wanted } else { SearchMode::Bm25 };
        let request = Query {
            text: query.query.clone(),
            vector: vector.map(|v| v.to_vec()),
            collections,
            restricted,
            k: depth,
            mode,
            fusion: self.fusion,
            per_page: query.per_page.unwrap_or(1),
        };
        let mut hits = self.index.search(request).await?;
        // Re-checked against the same answer: collection and classification.
        hits.retain(|hit| readable.allows(&hit.collection_id, &hit.classification));
        if let Some(reranker) = reranker {
            hits = reranked(&reranker, &query.query, hits).await;
        }
        hits.truncate(k);
        if !query.full_text {
            // Compact hits: the matching passage stands for the chunk's text.
            for hit in &mut hits {
                hit.text = hit.snippet.as_deref().map(plain_text).unwrap_or_default();
            }
        }
        Ok((hits, complete))
    }

    /// Vectors for chunk texts (the ingest worker's embedding stage and the rebuild).
    pub(crate) async fn embed(&self, texts: Vec<String>) -> Result<(Vec<Vec<f32>>, ModelId), ApiError> {
        let model = self.model.clone().ok_or_else(|| ApiError::from(EmbedError::Disabled))?;
        let vectors = self.embedder.embed(texts).await?;
        Ok((vectors, model))
    }

    /// Replaces a document's chunks (with their vectors, if any) in the index; while
    /// a rebuild runs, in the one being built too. `rebuild`: in that one only.
    pub(crate) async fn index(&self, document_id: String, chunks: Vec<Chunk>, rebuild: bool) -> Result<usize, ApiError> {
        if chunks.iter().any(|c| c.document_id != document_id) {
            return Err(ApiError::bad_request("search.mismatched_document", "every chunk must belong to the document being indexed"));
        }
        let model = self.model.clone().map(|model| {
            // A remote model's dimension is known from its first vectors.
            let dimension = chunks.iter().find_map(|c| c.embedding.as_deref()).and_then(common::wire::decode_vector).map_or(model.dimension, |v| v.len());
            ModelId { dimension: if model.dimension == 0 { dimension } else { model.dimension }, ..model }
        });
        let n_chunks = chunks.len();
        self.index.replace_document(&document_id, chunks, model, rebuild).await?;
        metrics::counter!("echo_search_chunks_indexed_total").increment(n_chunks as u64);
        Ok(n_chunks)
    }

    pub(crate) async fn chunks_of(&self, document_id: String) -> Result<usize, ApiError> {
        Ok(self.index.chunks_of(&document_id).await?)
    }

    pub(crate) async fn preview(&self, document_id: String, limit: usize) -> Result<(usize, Vec<common::wire::SearchHit>), ApiError> {
        Ok(self.index.preview(&document_id, limit).await?)
    }

    pub(crate) async fn delete(&self, document_id: String) -> Result<(), ApiError> {
        Ok(self.index.delete_document(&document_id).await?)
    }

    /// Starts (or goes on with) a rebuild of the index beside the live one.
    pub(crate) async fn begin_rebuild(&self) -> Result<RebuildStatus, ApiError> {
        Ok(self.index.begin_rebuild().await?)
    }

    pub(crate) async fn finish_rebuild(&self) -> Result<RebuildStatus, ApiError> {
        Ok(self.index.finish_rebuild().await?)
    }

    pub(crate) async fn abandon_rebuild(&self) -> Result<RebuildStatus, ApiError> {
        Ok(self.index.abandon_rebuild().await?)
    }

    pub(crate) async fn rebuild_status(&self) -> Result<RebuildStatus, ApiError> {
        Ok(self.index.rebuild_status().await?)
    }
}
