//! The search service's functions, between the HTTP handlers and the index. The one
//! authorized retrieval path of Echo lives here (the gateway's search and rag's
//! answers both call it): what the user may read (authz, cached by `access`) → a
//! search filtered to exactly that in both rankings → every hit re-checked against
//! the same answer before it leaves.

use std::sync::Arc;

use common::wire::{Chunk, Principal, RebuildStatus, SearchHit, SearchMode, SearchQuery};
use common::{ApiError, ErrorKind};

use crate::access::Access;
use crate::embed::{EmbedError, Embedder, ModelId};
use crate::generations::Generations;
use crate::index::{Fusion, IndexError, SearchRequest};
use crate::rerank::Reranker;

/// The longest query accepted, in bytes.
pub(crate) const MAX_QUERY_BYTES: usize = 4096;

#[derive(Clone)]
pub(crate) struct Retrieval {
    pub(crate) index: Arc<Generations>,
    pub(crate) embedder: Arc<Embedder>,
    /// The embedder's model, when embeddings are on.
    pub(crate) model: Option<ModelId>,
    pub(crate) fusion: Fusion,
    pub(crate) max_k: usize,
    pub(crate) access: Access,
    pub(crate) reranker: Option<Arc<Reranker>>,
}

impl From<IndexError> for ApiError {
    fn from(error: IndexError) -> Self {
        match error {
            IndexError::ModelMismatch { .. } => ApiError::new(ErrorKind::Conflict, "search.model_mismatch", error.to_string()),
            IndexError::BadEmbedding(_) => ApiError::bad_request("search.bad_embedding", error.to_string()),
            IndexError::NoRebuild => ApiError::new(ErrorKind::Conflict, "search.no_rebuild", error.to_string()),
            IndexError::NoModel => ApiError::new(ErrorKind::Conflict, "search.embeddings_off", error.to_string()),
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

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, IndexError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)?.map_err(ApiError::from)
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
    /// The chunks `principal` may read that best answer `query`, best first.
    pub(crate) async fn search(&self, principal: &Principal, query: SearchQuery) -> Result<Vec<SearchHit>, ApiError> {
        if query.query.trim().is_empty() || query.query.len() > MAX_QUERY_BYTES {
            return Err(ApiError::bad_request("search.invalid_query", format!("queries are 1 to {MAX_QUERY_BYTES} bytes")));
        }
        let readable = self.access.readable(principal).await?;
        let collections: Vec<String> = match &query.collections {
            Some(wanted) => readable.collections.iter().filter(|c| wanted.contains(c)).cloned().collect(),
            None => readable.collections.clone(),
        };
        if collections.is_empty() {
            return Ok(vec![]);
        }
        let restricted = readable.restricted.iter().filter(|(c, _)| collections.contains(c)).map(|(c, v)| (c.clone(), v.clone())).collect();
        let k = query.k.clamp(1, self.max_k);
        let reranker = self.reranker.clone().filter(|_| query.rerank != Some(false));
        // A reranker reorders a deeper list than is returned.
        let depth = reranker.as_ref().map_or(k, |r| r.candidates.max(k).min(self.max_k));
        let wanted = query.mode.unwrap_or(SearchMode::Hybrid);
        let index = self.index.live();
        // The live index's vectors are of the configured model, or searches are BM25
        // only until `echod reindex` has rebuilt it.
        let usable = self.model.as_ref().filter(|model| index.holds_vectors_of(model));
        if let (Some(configured), None, SearchMode::Vector) = (&self.model, usable, wanted) {
            let recorded = index.recorded_model().map(|m| m.to_string()).unwrap_or_default();
            return Err(IndexError::ModelMismatch { recorded, configured: configured.to_string() }.into());
        }
        let vector = match (usable, wanted) {
            (Some(_), SearchMode::Hybrid | SearchMode::Vector) => match self.embedder.embed_query(&query.query).await {
                Ok(vector) => Some(vector),
                Err(error) => {
                    tracing::warn!(%error, "the query could not be embedded; answering with BM25 alone");
                    None
                }
            },
            _ => None,
        };
        let mode = if vector.is_some() { wanted } else { SearchMode::Bm25 };
        let (fusion, text) = (self.fusion, query.query.clone());
        let mut hits = blocking(move || {
            let request =
                SearchRequest { query: &text, vector: vector.as_deref().map(Vec::as_slice), collections: &collections, restricted: &restricted, k: depth, mode, fusion };
            index.search(&request)
        })
        .await?;
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
        Ok(hits)
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
        let generations = self.index.clone();
        blocking(move || match rebuild {
            true => generations.replace_in_next(&document_id, &chunks, model.as_ref()),
            false => generations.replace_document(&document_id, &chunks, model.as_ref()),
        })
        .await?;
        metrics::counter!("echo_search_chunks_indexed_total").increment(n_chunks as u64);
        Ok(n_chunks)
    }

    pub(crate) async fn chunks_of(&self, document_id: String) -> Result<usize, ApiError> {
        let index = self.index.live();
        blocking(move || index.chunks_of(&document_id)).await
    }

    pub(crate) async fn preview(&self, document_id: String, limit: usize) -> Result<(usize, Vec<common::wire::SearchHit>), ApiError> {
        let index = self.index.live();
        blocking(move || index.preview(&document_id, limit)).await
    }

    pub(crate) async fn delete(&self, document_id: String) -> Result<(), ApiError> {
        let generations = self.index.clone();
        blocking(move || generations.delete_document(&document_id)).await
    }

    /// Starts (or goes on with) a rebuild of the index beside the live one.
    pub(crate) async fn begin_rebuild(&self) -> Result<RebuildStatus, ApiError> {
        let generations = self.index.clone();
        blocking(move || generations.begin()).await
    }

    pub(crate) async fn finish_rebuild(&self) -> Result<RebuildStatus, ApiError> {
        let generations = self.index.clone();
        blocking(move || generations.finish()).await
    }

    pub(crate) async fn abandon_rebuild(&self) -> Result<RebuildStatus, ApiError> {
        let generations = self.index.clone();
        blocking(move || generations.abandon()).await
    }

    pub(crate) fn rebuild_status(&self) -> RebuildStatus {
        self.index.status()
    }
}
