//! Where chunks live: the `ChunkStore` trait, with the embedded index (Tantivy and the
//! in-memory vector graph under `DATA_DIR/index`, one per search process: the default)
//! and PostgreSQL (full-text search and pgvector in schema `search`, shared by every
//! search replica: `search.url`). Both keep index generations for `echod reindex`,
//! number every write with a version (a cached answer is valid for one version only),
//! record the embedding model with the vectors and rank with the same fusion
//! (`fusion`). One conformance suite (below) runs against both.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use common::wire::{Chunk, RebuildStatus, SearchHit, SearchMode};
use common::EchoConfig;

use crate::embed::ModelId;
use crate::generations::Generations;
use crate::index::{Fusion, IndexError, SearchRequest};

/// What a search must know of the live index before it runs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct IndexState {
    /// Grows with every write: a cached answer is kept under the version it saw.
    pub(crate) version: u64,
    /// The model of the stored vectors, once some were stored.
    pub(crate) recorded: Option<ModelId>,
    pub(crate) vectors: u64,
}

impl IndexState {
    /// Whether the stored vectors (if any) are `model`'s, so a query vector of that
    /// model can be compared with them.
    pub(crate) fn holds_vectors_of(&self, model: &ModelId) -> bool {
        match &self.recorded {
            Some(known) => self.vectors == 0 || same_model(known, model),
            None => true,
        }
    }
}

/// A model's name, and its dimension unless one side does not know it yet (0).
pub(crate) fn same_model(known: &ModelId, model: &ModelId) -> bool {
    known.name == model.name && (known.dimension == model.dimension || model.dimension == 0)
}

/// One search, owned (it crosses to a blocking thread or a database call).
#[derive(Clone, Debug)]
pub(crate) struct Query {
    pub(crate) text: String,
    pub(crate) vector: Option<Vec<f32>>,
    pub(crate) collections: Vec<String>,
    pub(crate) restricted: BTreeMap<String, Vec<String>>,
    pub(crate) k: usize,
    pub(crate) mode: SearchMode,
    pub(crate) fusion: Fusion,
    pub(crate) per_page: usize,
}

#[async_trait]
pub(crate) trait ChunkStore: Send + Sync {
    async fn state(&self) -> Result<IndexState, IndexError>;
    /// Ranks the caller's chunks; never a chunk outside `collections` (and, in those of
    /// `restricted`, outside the listed classifications), in either ranking.
    async fn search(&self, query: Query) -> Result<Vec<SearchHit>, IndexError>;
    /// Replaces a document's chunks in the live generation and in the one being built;
    /// `rebuild`: in the one being built only. Vectors must be of `model`: the
    /// generation being built refuses others; the live one takes the chunks without.
    async fn replace_document(&self, document_id: &str, chunks: Vec<Chunk>, model: Option<ModelId>, rebuild: bool) -> Result<(), IndexError>;
    async fn delete_document(&self, document_id: &str) -> Result<(), IndexError>;
    async fn chunks_of(&self, document_id: &str) -> Result<usize, IndexError>;
    /// The first `limit` chunks of a document in reading order, and how many it has.
    async fn preview(&self, document_id: &str, limit: usize) -> Result<(usize, Vec<SearchHit>), IndexError>;
    async fn begin_rebuild(&self) -> Result<RebuildStatus, IndexError>;
    async fn finish_rebuild(&self) -> Result<RebuildStatus, IndexError>;
    async fn abandon_rebuild(&self) -> Result<RebuildStatus, IndexError>;
    async fn rebuild_status(&self) -> Result<RebuildStatus, IndexError>;
    /// What the start-up line says: where the chunks are.
    fn describe(&self) -> String;
}

/// The store `config` names: PostgreSQL when `search.url` is set, else the embedded index.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<Arc<dyn ChunkStore>> {
    let url = config.search.url.expose().trim();
    if !url.is_empty() {
        return Ok(Arc::new(crate::pg::PgChunkStore::open(url).await?));
    }
    let dir = config.data_dir.join("index");
    let memory = config.search.writer_memory_mb;
    let generations = tokio::task::spawn_blocking(move || Generations::open(&dir, memory)).await??;
    Ok(Arc::new(EmbeddedStore { generations: Arc::new(generations) }))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, IndexError> + Send + 'static) -> Result<T, IndexError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| IndexError::Directory(format!("a blocking index task failed: {e}")))?
}

/// The embedded index: Tantivy and the vector graph, in generations on local disk.
pub(crate) struct EmbeddedStore {
    generations: Arc<Generations>,
}

#[async_trait]
impl ChunkStore for EmbeddedStore {
    async fn state(&self) -> Result<IndexState, IndexError> {
        let live = self.generations.live();
        Ok(IndexState { version: live.version(), recorded: live.recorded_model(), vectors: live.n_vectors() as u64 })
    }

    async fn search(&self, query: Query) -> Result<Vec<SearchHit>, IndexError> {
        let index = self.generations.live();
        blocking(move || {
            let request = SearchRequest {
                query: &query.text,
                vector: query.vector.as_deref(),
                collections: &query.collections,
                restricted: &query.restricted,
                k: query.k,
                mode: query.mode,
                fusion: query.fusion,
                per_page: query.per_page,
            };
            index.search(&request)
        })
        .await
    }

    async fn replace_document(&self, document_id: &str, chunks: Vec<Chunk>, model: Option<ModelId>, rebuild: bool) -> Result<(), IndexError> {
        let (generations, document_id) = (self.generations.clone(), document_id.to_string());
        blocking(move || match rebuild {
            true => generations.replace_in_next(&document_id, &chunks, model.as_ref()),
            false => generations.replace_document(&document_id, &chunks, model.as_ref()),
        })
        .await
    }

    async fn delete_document(&self, document_id: &str) -> Result<(), IndexError> {
        let (generations, document_id) = (self.generations.clone(), document_id.to_string());
        blocking(move || generations.delete_document(&document_id)).await
    }

    async fn chunks_of(&self, document_id: &str) -> Result<usize, IndexError> {
        let (index, document_id) = (self.generations.live(), document_id.to_string());
        blocking(move || index.chunks_of(&document_id)).await
    }

    async fn preview(&self, document_id: &str, limit: usize) -> Result<(usize, Vec<SearchHit>), IndexError> {
        let (index, document_id) = (self.generations.live(), document_id.to_string());
        blocking(move || index.preview(&document_id, limit)).await
    }

    async fn begin_rebuild(&self) -> Result<RebuildStatus, IndexError> {
        let generations = self.generations.clone();
        blocking(move || generations.begin()).await
    }

    async fn finish_rebuild(&self) -> Result<RebuildStatus, IndexError> {
        let generations = self.generations.clone();
        blocking(move || generations.finish()).await
    }

    async fn abandon_rebuild(&self) -> Result<RebuildStatus, IndexError> {
        let generations = self.generations.clone();
        blocking(move || generations.abandon()).await
    }

    async fn rebuild_status(&self) -> Result<RebuildStatus, IndexError> {
        Ok(self.generations.status())
    }

    fn describe(&self) -> String {
        let live = self.generations.live();
        format!("embedded index ({} chunks, {} vectors)", live.n_chunks(), live.n_vectors())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const DIM: usize = 4;

    fn model(name: &str) -> ModelId {
        ModelId { name: name.into(), dimension: DIM }
    }

    fn chunk(doc: &str, collection: &str, n: u32, text: &str, vector: Option<[f32; DIM]>) -> Chunk {
        Chunk {
            chunk_id: format!("{doc}-{n}"),
            document_id: doc.into(),
            collection_id: collection.into(),
            ordinal: n,
            text: text.into(),
            page: Some(n / 2 + 1),
            section: Some("Getting started".into()),
            char_start: 0,
            char_end: text.len() as u64,
            classification: "internal".into(),
            title: Some(format!("Manual {doc}")),
            embedding: vector.map(|v| common::wire::encode_vector(&v)),
        }
    }

    fn query(text: &str, vector: Option<[f32; DIM]>, collections: &[&str], mode: SearchMode, k: usize) -> Query {
        Query {
            text: text.into(),
            vector: vector.map(|v| v.to_vec()),
            collections: collections.iter().map(|c| c.to_string()).collect(),
            restricted: BTreeMap::new(),
            k,
            mode,
            fusion: Fusion::default(),
            per_page: 0,
        }
    }

    fn ids(hits: &[SearchHit]) -> Vec<&str> {
        hits.iter().map(|h| h.chunk_id.as_str()).collect()
    }

    /// A deterministic pseudo-random vector.
    fn pseudo_vector(seed: &mut u64) -> [f32; DIM] {
        let mut v = [0.0; DIM];
        for x in &mut v {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *x = ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
        }
        v
    }

    /// What every `ChunkStore` must do. `reopen` gives another handle on the same
    /// data (a restart, or another replica — `shared`: while the first is open).
    async fn conformance<F, Fut>(store: Arc<dyn ChunkStore>, reopen: F, shared: bool)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Arc<dyn ChunkStore>>,
    {
        let empty = store.state().await.unwrap();
        assert_eq!((empty.recorded.clone(), empty.vectors), (None, 0));
        assert!(store.search(query("pump", None, &["c1"], SearchMode::Bm25, 5)).await.unwrap().is_empty());

        // Two documents in c1, one in c2; vectors point each chunk a different way.
        let a = vec![
            chunk("doc-a", "c1", 0, "Install the centrifugal pump on a level concrete base.", Some([1.0, 0.0, 0.0, 0.0])),
            chunk("doc-a", "c1", 1, "Prime the pump with water before the first start.", Some([0.9, 0.1, 0.0, 0.0])),
            chunk("doc-a", "c1", 2, "Prime the pump with water before the first start.", Some([0.9, 0.1, 0.0, 0.0])),
            chunk("doc-a", "c1", 3, "Bearings need grease every 2000 hours of operation.", Some([0.0, 1.0, 0.0, 0.0])),
        ];
        store.replace_document("doc-a", a, Some(model("m1")), false).await.unwrap();
        let b = vec![chunk("doc-b", "c1", 0, "The valve opens when the handle turns left.", Some([0.0, 0.0, 1.0, 0.0]))];
        store.replace_document("doc-b", b, Some(model("m1")), false).await.unwrap();
        let secret = vec![chunk("doc-s", "c2", 0, "The pump password is swordfish; prime it at night.", Some([1.0, 0.0, 0.0, 0.0]))];
        store.replace_document("doc-s", secret, Some(model("m1")), false).await.unwrap();
        let state = store.state().await.unwrap();
        assert!(state.version > empty.version, "every write is a new version");
        assert_eq!(state.recorded, Some(model("m1")));
        assert_eq!(state.vectors, 6);
        assert!(state.holds_vectors_of(&model("m1")) && !state.holds_vectors_of(&model("m2")));

        // BM25: the chunk with the words first; another collection's never.
        let hits = store.search(query("how do I install a pump", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap();
        assert_eq!(hits.first().map(|h| h.chunk_id.as_str()), Some("doc-a-0"), "{:?}", ids(&hits));
        assert!(hits.iter().all(|h| h.collection_id == "c1"), "{:?}", ids(&hits));
        let hit = &hits[0];
        assert_eq!((hit.document_id.as_str(), hit.page, hit.section.as_deref(), hit.title.as_deref()), ("doc-a", Some(1), Some("Getting started"), Some("Manual doc-a")));
        assert_eq!(hit.classification, "internal");
        assert!(hit.snippet.as_deref().unwrap_or_default().contains("<mark>"), "{:?}", hit.snippet);
        assert!(hit.text.starts_with("Install the centrifugal pump"));
        // The same text twice is one hit.
        let primed = store.search(query("prime pump water", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap();
        assert_eq!(primed.iter().filter(|h| h.text.starts_with("Prime")).count(), 1, "{:?}", ids(&primed));
        // A title word finds the document's chunks too.
        assert!(!store.search(query("manual", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap().is_empty());
        // A word nowhere: nothing. Only stop words: still a query, and no error.
        assert!(store.search(query("zeppelin", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap().is_empty());
        store.search(query("the of and", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap();
        // Query syntax of either engine is only text.
        store.search(query("pump & | ! ( ) :* <-> 'x' \\ \" %", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap();
        // Both collections: the secret appears; the classification restriction hides it.
        let both = store.search(query("pump password", None, &["c1", "c2"], SearchMode::Bm25, 10)).await.unwrap();
        assert_eq!(both.first().map(|h| h.chunk_id.as_str()), Some("doc-s-0"));
        let mut restricted = query("pump password", None, &["c1", "c2"], SearchMode::Bm25, 10);
        restricted.restricted.insert("c2".into(), vec!["public".into()]);
        assert!(store.search(restricted.clone()).await.unwrap().iter().all(|h| h.collection_id == "c1"));
        restricted.restricted.insert("c2".into(), vec!["internal".into()]);
        assert!(store.search(restricted).await.unwrap().iter().any(|h| h.collection_id == "c2"));

        // Vectors: nearest first, within the filter, with their cosine.
        let near = store.search(query("", Some([0.0, 0.0, 1.0, 0.1]), &["c1"], SearchMode::Vector, 3)).await.unwrap();
        assert_eq!(near.first().map(|h| h.chunk_id.as_str()), Some("doc-b-0"), "{:?}", ids(&near));
        assert!(near[0].similarity.unwrap() > 0.99, "{:?}", near[0].similarity);
        let near = store.search(query("", Some([1.0, 0.0, 0.0, 0.0]), &["c1"], SearchMode::Vector, 10)).await.unwrap();
        assert!(near.iter().all(|h| h.collection_id == "c1") && near.len() == 4, "{:?}", ids(&near));
        // Hybrid: words and meaning together.
        let hybrid = store.search(query("grease bearings", Some([0.0, 1.0, 0.0, 0.0]), &["c1"], SearchMode::Hybrid, 3)).await.unwrap();
        assert_eq!(hybrid.first().map(|h| h.chunk_id.as_str()), Some("doc-a-3"));
        // At most one hit a page when asked.
        let mut paged = query("pump", Some([1.0, 0.0, 0.0, 0.0]), &["c1"], SearchMode::Hybrid, 10);
        paged.per_page = 1;
        let paged = store.search(paged).await.unwrap();
        let pages: Vec<(String, Option<u32>)> = paged.iter().map(|h| (h.document_id.clone(), h.page)).collect();
        assert_eq!(pages.len(), pages.iter().collect::<std::collections::HashSet<_>>().len(), "{pages:?}");

        // Counts and previews in reading order.
        assert_eq!(store.chunks_of("doc-a").await.unwrap(), 4);
        let (total, preview) = store.preview("doc-a", 2).await.unwrap();
        assert_eq!((total, ids(&preview)), (4, vec!["doc-a-0", "doc-a-1"]));

        // Replacing and deleting.
        let before = store.state().await.unwrap().version;
        store.replace_document("doc-b", vec![chunk("doc-b", "c1", 0, "The gate valve is shut by turning right.", None)], Some(model("m1")), false).await.unwrap();
        assert!(store.search(query("handle", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap().is_empty(), "the old text is gone");
        assert_eq!(store.search(query("gate", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap().len(), 1);
        assert_eq!(store.state().await.unwrap().vectors, 5, "the replaced chunk had no vector");
        store.delete_document("doc-s").await.unwrap();
        assert!(store.search(query("swordfish", None, &["c2"], SearchMode::Bm25, 10)).await.unwrap().is_empty());
        assert_eq!(store.chunks_of("doc-s").await.unwrap(), 0);
        assert!(store.state().await.unwrap().version > before);

        // Another model's vectors: the live generation takes the chunks without them.
        store.replace_document("doc-c", vec![chunk("doc-c", "c1", 0, "Drain the casing in winter.", Some([0.0, 0.0, 0.0, 1.0]))], Some(model("m2")), false).await.unwrap();
        assert_eq!(store.chunks_of("doc-c").await.unwrap(), 1);
        assert_eq!(store.state().await.unwrap().recorded, Some(model("m1")));
        assert_eq!(store.state().await.unwrap().vectors, 4, "doc-s's went with it; doc-c brought none");

        // A rebuild: built beside the live one, which answers until it is finished.
        assert!(matches!(store.finish_rebuild().await, Err(IndexError::NoRebuild)));
        assert!(matches!(store.replace_document("doc-a", vec![], None, true).await, Err(IndexError::NoRebuild)));
        let begun = store.begin_rebuild().await.unwrap();
        assert!(begun.building && begun.next.is_some() && begun.next_chunks == 0, "{begun:?}");
        assert_eq!(store.begin_rebuild().await.unwrap().next, begun.next, "begun twice is the same rebuild");
        store.replace_document("doc-a", vec![chunk("doc-a", "c1", 0, "Rebuilt: anchor the pump with four bolts.", Some([0.0, 0.0, 0.0, 1.0]))], Some(model("m2")), true).await.unwrap();
        assert!(matches!(
            store.replace_document("doc-x", vec![chunk("doc-x", "c1", 0, "old model", Some([1.0, 0.0, 0.0, 0.0]))], Some(model("m1")), true).await,
            Err(IndexError::ModelMismatch { .. })
        ));
        // An ordinary write meanwhile goes to both.
        store.replace_document("doc-d", vec![chunk("doc-d", "c1", 0, "Check the seals monthly.", None)], None, false).await.unwrap();
        assert!(store.search(query("bolts", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap().is_empty(), "not live before it is finished");
        assert_eq!(store.rebuild_status().await.unwrap().next, begun.next);
        if shared {
            let other = reopen().await;
            assert_eq!(other.rebuild_status().await.unwrap().next, begun.next, "every replica sees the rebuild");
            assert!(other.search(query("bolts", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap().is_empty());
        }
        let finished = store.finish_rebuild().await.unwrap();
        assert!(!finished.building && finished.live == begun.next.clone().unwrap() && finished.live_chunks == 2, "{finished:?}");
        assert_eq!(ids(&store.search(query("bolts", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap()), vec!["doc-a-0"]);
        assert_eq!(store.search(query("seals", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap().len(), 1);
        assert!(store.search(query("grease", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap().is_empty(), "what was not rebuilt is gone");
        assert_eq!(store.state().await.unwrap().recorded, Some(model("m2")));
        store.begin_rebuild().await.unwrap();
        let abandoned = store.abandon_rebuild().await.unwrap();
        assert!(!abandoned.building && abandoned.live == finished.live);

        // The filter is in the vector ranking itself: with many chunks of other
        // collections nearer, a search still gets k of its own.
        let mut seed = 7;
        for d in 0..20 {
            let collection = if d % 5 == 0 { "mine" } else { "theirs" };
            let chunks: Vec<Chunk> = (0..10).map(|n| chunk(&format!("bulk-{d}"), collection, n, &format!("bulk text {d} {n}"), Some(pseudo_vector(&mut seed)))).collect();
            store.replace_document(&format!("bulk-{d}"), chunks, Some(model("m2")), false).await.unwrap();
        }
        for _ in 0..10 {
            let probe = pseudo_vector(&mut seed);
            let hits = store.search(query("", Some(probe), &["mine"], SearchMode::Vector, 10)).await.unwrap();
            assert_eq!(hits.len(), 10, "never filtered down to fewer than k");
            assert!(hits.iter().all(|h| h.collection_id == "mine"));
            let sims: Vec<f32> = hits.iter().map(|h| h.similarity.unwrap()).collect();
            assert!(sims.windows(2).all(|w| w[0] >= w[1] - 1e-6), "nearest first: {sims:?}");
        }

        // Another handle (a restart, another replica) sees the same index.
        let version = store.state().await.unwrap().version;
        drop(store);
        let again = reopen().await;
        assert!(again.state().await.unwrap().version >= version, "never an older version: a cached answer would pass for current");
        assert_eq!(ids(&again.search(query("bolts", None, &["c1"], SearchMode::Bm25, 10)).await.unwrap()), vec!["doc-a-0"]);
        let near = again.search(query("", Some([0.0, 0.0, 0.0, 1.0]), &["c1"], SearchMode::Vector, 1)).await.unwrap();
        assert_eq!(ids(&near), vec!["doc-a-0"], "vectors persisted");
    }

    #[tokio::test]
    async fn the_embedded_index_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let open = move || {
            let path = path.clone();
            async move {
                let generations = tokio::task::spawn_blocking(move || Generations::open(&path, 32)).await.unwrap().unwrap();
                Arc::new(EmbeddedStore { generations: Arc::new(generations) }) as Arc<dyn ChunkStore>
            }
        };
        let first = open().await;
        // One process's index: reopened only once the first handle is gone.
        conformance(first, open, false).await;
    }

    /// On a scratch PostgreSQL with pgvector (skipped with a reason when it is not
    /// installed, failed under CI).
    #[tokio::test]
    async fn postgresql_with_pgvector_conforms() {
        let Some(server) = echod::testing::ScratchPgvector::start().await else { return };
        let url = server.url.clone();
        let open = move || {
            let url = url.clone();
            async move { Arc::new(crate::pg::PgChunkStore::open(&url).await.unwrap()) as Arc<dyn ChunkStore> }
        };
        let first = open().await;
        conformance(first, open, true).await;
        drop(server);
    }
}
