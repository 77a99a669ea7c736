//! The search service's functions, between the HTTP handlers and the index. The one
//! authorized retrieval path of Echo lives here (the gateway's search and rag's
//! answers both call it): what the user may read (authz, cached by `access`) → a
//! search filtered to exactly that in both rankings → every hit re-checked against
//! the same answer before it leaves.

use std::sync::Arc;

use common::wire::{Chunk, Principal, SearchHit, SearchMode, SearchQuery};
use common::{ApiError, ErrorKind};

use crate::access::Access;
use crate::embed::{EmbedError, Embedder, ModelId};
use crate::index::{ChunkIndex, Fusion, IndexError, SearchRequest};

/// The longest query accepted, in bytes.
pub(crate) const MAX_QUERY_BYTES: usize = 4096;

#[derive(Clone)]
pub(crate) struct Retrieval {
    pub(crate) index: Arc<ChunkIndex>,
    pub(crate) embedder: Arc<Embedder>,
    /// The embedder's model, when it is on and matches the index's vectors.
    pub(crate) model: Option<ModelId>,
    pub(crate) fusion: Fusion,
    pub(crate) max_k: usize,
    pub(crate) access: Access,
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
        let wanted = query.mode.unwrap_or(SearchMode::Hybrid);
        let vector = match (&self.model, wanted) {
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
        let (index, fusion, text) = (self.index.clone(), self.fusion, query.query);
        let mut hits = blocking(move || {
            let request =
                SearchRequest { query: &text, vector: vector.as_deref().map(Vec::as_slice), collections: &collections, restricted: &restricted, k, mode, fusion };
            index.search(&request)
        })
        .await?;
        // Re-checked against the same answer: collection and classification.
        hits.retain(|hit| readable.allows(&hit.collection_id, &hit.classification));
        if !query.full_text {
            hits.iter_mut().for_each(|hit| hit.text.clear());
        }
        Ok(hits)
    }

    /// Vectors for chunk texts (the ingest worker's embedding stage).
    pub(crate) async fn embed(&self, texts: Vec<String>) -> Result<(Vec<Vec<f32>>, ModelId), ApiError> {
        let model = self.model.clone().ok_or_else(|| match self.embedder.enabled() {
            true => ApiError::new(ErrorKind::Conflict, "search.model_mismatch", "the index holds vectors of another model; run `echod reindex`"),
            false => ApiError::new(ErrorKind::Conflict, "search.embeddings_off", "no embedding provider is configured"),
        })?;
        let vectors = self.embedder.embed(texts).await?;
        Ok((vectors, model))
    }

    /// Replaces a document's chunks (with their vectors, if any) in the index.
    pub(crate) async fn index(&self, document_id: String, chunks: Vec<Chunk>) -> Result<usize, ApiError> {
        if chunks.iter().any(|c| c.document_id != document_id) {
            return Err(ApiError::bad_request("search.mismatched_document", "every chunk must belong to the document being indexed"));
        }
        if chunks.iter().any(|c| c.embedding.is_some()) {
            let model = self.model.clone().ok_or_else(|| {
                ApiError::new(ErrorKind::Conflict, "search.model_mismatch", "vectors cannot be stored: the index holds another model's, or embeddings are off")
            })?;
            let dimension = chunks.iter().find_map(|c| c.embedding.as_deref()).and_then(common::wire::decode_vector).map(|v| v.len()).unwrap_or(0);
            self.index.check_model(&ModelId { dimension: if model.dimension == 0 { dimension } else { model.dimension }, ..model })?;
        }
        let n_chunks = chunks.len();
        let index = self.index.clone();
        blocking(move || index.replace_document(&document_id, &chunks)).await?;
        metrics::counter!("echo_search_chunks_indexed_total").increment(n_chunks as u64);
        Ok(n_chunks)
    }

    pub(crate) async fn chunks_of(&self, document_id: String) -> Result<usize, ApiError> {
        let index = self.index.clone();
        blocking(move || index.chunks_of(&document_id)).await
    }

    pub(crate) async fn delete(&self, document_id: String) -> Result<(), ApiError> {
        let index = self.index.clone();
        blocking(move || index.delete_document(&document_id)).await
    }
}
