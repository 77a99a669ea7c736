//! The embedded chunk index: Tantivy BM25 (English stemmer) over the chunk text, its
//! heading path and its document's title (the last two boosted), plus each chunk's
//! embedding kept in a fast field and mirrored in memory (`vectors`) for similarity
//! search. A search ranks by BM25, by vectors, or both fused by reciprocal rank,
//! collapses chunks whose text is the same, and returns snippets with the query terms
//! marked. Queries are built from analysed terms (user text is never query syntax) and
//! every ranking is restricted to the caller's collections inside the search itself.
//! Blocking calls: run them on `spawn_blocking`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, BoostQuery, ConstScoreQuery, Occur, Query, TermQuery};
use tantivy::schema::{BytesOptions, FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions, Value};
use tantivy::snippet::SnippetGenerator;
use tantivy::{DocAddress, Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, Term};

use common::wire::{Chunk, SearchHit, SearchMode};

use crate::embed::ModelId;
use crate::fusion::{Admission, snippet_of, without_stop_words};
use crate::vectors::{VectorRow, VectorTable};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index error: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("index directory: {0}")]
    Directory(String),
    #[error("index writer lock poisoned")]
    Poisoned,
    #[error(
        "the index holds vectors of {recorded}, but the configured embedding model is {configured}; run `echod reindex` to rebuild it with the new model"
    )]
    ModelMismatch { recorded: String, configured: String },
    #[error("a chunk's embedding is not {0} little-endian f32s")]
    BadEmbedding(usize),
    #[error("no index rebuild is under way")]
    NoRebuild,
    #[error("vectors cannot be stored: no embedding provider is configured")]
    NoModel,
    #[error("search database: {0}")]
    Database(String),
}

/// Bumped whenever the schema changes; an index of another version is set aside.
const SCHEMA_VERSION: u32 = 2;

struct Fields {
    chunk_id: Field,
    document_id: Field,
    collection_id: Field,
    collection: Field,
    classification: Field,
    text: Field,
    headings: Field,
    title: Field,
    page: Field,
    section: Field,
    ordinal: Field,
    vector: Field,
}

/// How a hybrid search weighs its lists.
#[derive(Clone, Copy, Debug)]
pub struct Fusion {
    pub rrf_k: f32,
    pub bm25_weight: f32,
    pub vector_weight: f32,
    /// How deep each list is read.
    pub candidates: usize,
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion { rrf_k: 60.0, bm25_weight: 1.0, vector_weight: 1.5, candidates: 50 }
    }
}

/// One search: the query, its vector when embeddings are on, what the caller may read.
pub struct SearchRequest<'a> {
    pub query: &'a str,
    pub vector: Option<&'a [f32]>,
    pub collections: &'a [String],
    pub restricted: &'a BTreeMap<String, Vec<String>>,
    pub k: usize,
    pub mode: SearchMode,
    pub fusion: Fusion,
    /// At most this many hits from one page of a document (one document, when it has
    /// no pages); 0: no limit.
    pub per_page: usize,
}

/// Boosts of the fields a query term is looked up in, beside the chunk's own text.
/// Tie-breakers, not leaders: a title or heading is short, so one matching word scores
/// high there, and at 1.5 every chunk of a page titled "wave — Read and write WAV
/// files" outranked the answer to "which files does bash read" (`echod bench quality`:
/// BM25 recall@10 29/79 at 1.5, 48/79 at 0.3, 47/79 at 0).
const HEADINGS_BOOST: f32 = 0.3;
const TITLE_BOOST: f32 = 0.3;

pub struct ChunkIndex {
    index: Index,
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    /// Changes whenever what a search sees may have changed (each commit, each change
    /// of vectors); unique across indexes in the process.
    version: std::sync::atomic::AtomicU64,
    /// Group commit: writers that arrive while a commit runs share the next one.
    commits: Mutex<CommitState>,
    committed: Condvar,
    fields: Fields,
    vectors: Arc<RwLock<VectorTable>>,
    /// Wakes the graph thread after vectors change (see `vectors`); it ends when the
    /// index is dropped.
    graph_wake: std::sync::mpsc::Sender<()>,
    /// Which model made the stored vectors (written with the first one).
    model_file: PathBuf,
    recorded_model: RwLock<Option<ModelId>>,
}

/// Where group commit stands. Every `replace_document` takes a number after adding its
/// documents (under the writer lock); one caller at a time commits everything added so
/// far and the others wait for a commit that covers their number.
#[derive(Default)]
struct CommitState {
    /// The last number handed out.
    added: u64,
    /// Every number up to this one has had its commit attempted…
    done_through: u64,
    /// …and up to this one, succeeded.
    committed_through: u64,
    committing: bool,
    /// Commits made (each covering one write or more).
    commits: u64,
    /// Recent failed commits: the writes each took with it, and why.
    failed: VecDeque<(std::ops::RangeInclusive<u64>, String)>,
    /// The number of the write whose vectors a document holds in memory, so that two
    /// writes of one document land in the order they were added.
    applied: HashMap<Box<str>, u64>,
}

/// Index versions, from one counter for the whole process.
fn next_version() -> u64 {
    static VERSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    VERSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let stemmed = TextFieldIndexing::default().set_tokenizer("en_stem").set_index_option(IndexRecordOption::WithFreqsAndPositions);
    let fields = Fields {
        chunk_id: builder.add_text_field("chunk_id", STRING | STORED | FAST),
        document_id: builder.add_text_field("document_id", STRING | STORED | FAST),
        collection_id: builder.add_text_field("collection_id", STRING),
        collection: builder.add_text_field("collection", STRING | STORED | FAST),
        classification: builder.add_text_field("classification", STRING | STORED | FAST),
        text: builder.add_text_field("text", TextOptions::default().set_indexing_options(stemmed.clone()).set_stored()),
        headings: builder.add_text_field("headings", TextOptions::default().set_indexing_options(stemmed.clone())),
        title: builder.add_text_field("title", TextOptions::default().set_indexing_options(stemmed).set_stored()),
        page: builder.add_u64_field("page", STORED),
        section: builder.add_text_field("section", TextOptions::default().set_stored()),
        ordinal: builder.add_u64_field("ordinal", STORED | INDEXED),
        vector: builder.add_bytes_field("vector", BytesOptions::default().set_fast()),
    };
    (builder.build(), fields)
}

fn vector_bytes(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vector_of(bytes: &[u8]) -> Option<Box<[f32]>> {
    (bytes.len().is_multiple_of(4) && !bytes.is_empty()).then(|| bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Rows the graph thread takes into the graph per step: the write lock that
/// publishes them is held for microseconds, and a search meanwhile scores at most
/// this many extra vectors exactly.
const GRAPH_BATCH: usize = 4096;

/// The thread that builds and grows the vector graph (`vectors::GraphWork`), so that
/// no write walks it: woken after each change, it works until nothing is left and
/// ends when the index is dropped (the table gone or the sender dropped).
fn spawn_graph_thread(table: std::sync::Weak<RwLock<VectorTable>>) -> Result<std::sync::mpsc::Sender<()>, IndexError> {
    let (wake, woken) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("echo-vector-graph".into())
        .spawn(move || {
            while woken.recv().is_ok() {
                while woken.try_recv().is_ok() {}
                loop {
                    let Some(vectors) = table.upgrade() else { return };
                    let (work, pending) = vectors.read().map(|t| (t.graph_work(GRAPH_BATCH), t.graph_pending())).unwrap_or((None, 0));
                    drop(vectors);
                    metrics::gauge!("echo_search_vector_graph_pending").set(pending as f64);
                    let Some(work) = work else { break };
                    let done = work.run();
                    let Some(vectors) = table.upgrade() else { return };
                    let Ok(mut t) = vectors.write() else { return };
                    t.apply(done);
                }
            }
        })
        .map_err(|e| IndexError::Directory(format!("could not start the vector graph thread: {e}")))?;
    Ok(wake)
}

impl ChunkIndex {
    /// Opens (or creates) the index in `dir`. An index of an older layout is moved
    /// aside to `dir.old` and a new one started (`echod reindex` fills it again).
    pub fn open(dir: &Path, writer_memory_mb: usize) -> Result<ChunkIndex, IndexError> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::Directory(e.to_string()))?;
        let version_file = dir.join("echo-schema-version");
        let version: Option<u32> = std::fs::read_to_string(&version_file).ok().and_then(|v| v.trim().parse().ok());
        let has_index = dir.join("meta.json").exists();
        if has_index && version != Some(SCHEMA_VERSION) {
            let aside = dir.with_extension("old");
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(dir, &aside).map_err(|e| IndexError::Directory(e.to_string()))?;
            std::fs::create_dir_all(dir).map_err(|e| IndexError::Directory(e.to_string()))?;
            tracing::warn!(old = %aside.display(), "the search index has an older layout; it was set aside and a new one started: run `echod reindex` to fill it");
        }
        std::fs::write(&version_file, SCHEMA_VERSION.to_string()).map_err(|e| IndexError::Directory(e.to_string()))?;
        let (schema, fields) = schema();
        let directory = tantivy::directory::MmapDirectory::open(dir).map_err(|e| IndexError::Directory(e.to_string()))?;
        let index = Index::open_or_create(directory, schema)?;
        // The same tokens as Tantivy's own `en_stem`, with stems remembered.
        index.tokenizers().register("en_stem", crate::stem::en_stem());
        // One indexing thread: each commit sets up a fresh arena per thread (a memset of
        // its share of the budget), and commits are many and small (one per document, or a
        // few documents with group commit); the other cores parse and embed meanwhile.
        let writer = index.writer_with_num_threads(1, writer_memory_mb.clamp(15, 1024) * 1024 * 1024)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        let model_file = dir.join("embedding-model.json");
        let recorded_model = std::fs::read(&model_file).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let vectors = Arc::new(RwLock::new(VectorTable::default()));
        let chunk_index = ChunkIndex {
            index,
            reader,
            writer: Mutex::new(writer),
            version: std::sync::atomic::AtomicU64::new(next_version()),
            commits: Mutex::new(CommitState::default()),
            committed: Condvar::new(),
            fields,
            graph_wake: spawn_graph_thread(Arc::downgrade(&vectors))?,
            vectors,
            model_file,
            recorded_model: RwLock::new(recorded_model),
        };
        chunk_index.load_vectors()?;
        Ok(chunk_index)
    }

    /// Rebuilds the in-memory vectors from the index's fast fields.
    fn load_vectors(&self) -> Result<(), IndexError> {
        let searcher = self.reader.searcher();
        let mut table = VectorTable::default();
        let mut bytes = Vec::new();
        let mut text = String::new();
        for segment in searcher.segment_readers() {
            let fast = segment.fast_fields();
            let (Some(vectors), Some(chunks), Some(documents), Some(collections), Some(classes)) =
                (fast.bytes("vector")?, fast.str("chunk_id")?, fast.str("document_id")?, fast.str("collection")?, fast.str("classification")?)
            else {
                continue;
            };
            let string_of = |column: &tantivy::columnar::StrColumn, doc: u32, text: &mut String| -> Option<std::sync::Arc<str>> {
                let ord = column.term_ords(doc).next()?;
                text.clear();
                column.ord_to_str(ord, text).ok()?;
                Some(std::sync::Arc::from(text.as_str()))
            };
            for doc in 0..segment.max_doc() {
                if segment.alive_bitset().is_some_and(|alive| !alive.is_alive(doc)) {
                    continue;
                }
                let Some(ord) = vectors.term_ords(doc).next() else { continue };
                bytes.clear();
                if !vectors.ord_to_bytes(ord, &mut bytes).unwrap_or(false) {
                    continue;
                }
                let (Some(vector), Some(chunk_id), Some(document_id), Some(collection), Some(classification)) = (
                    vector_of(&bytes),
                    string_of(&chunks, doc, &mut text),
                    string_of(&documents, doc, &mut text),
                    string_of(&collections, doc, &mut text),
                    string_of(&classes, doc, &mut text),
                ) else {
                    continue;
                };
                table.insert(VectorRow { chunk_id, document_id, collection, classification, vector: vector.into() });
            }
        }
        table.maintain();
        *self.vectors.write().map_err(|_| IndexError::Poisoned)? = table;
        let _ = self.graph_wake.send(());
        Ok(())
    }

    /// The model the stored vectors were made with, if any were stored.
    pub fn recorded_model(&self) -> Option<ModelId> {
        self.recorded_model.read().ok().and_then(|m| m.clone())
    }

    /// Whether the stored vectors (if any) are `model`'s, so a query vector of that
    /// model can be compared with them.
    pub fn holds_vectors_of(&self, model: &ModelId) -> bool {
        match self.recorded_model() {
            Some(known) => self.n_vectors() == 0 || (known.name == model.name && (known.dimension == model.dimension || model.dimension == 0)),
            None => true,
        }
    }

    /// Refuses vectors of another model than the one the index holds, and records
    /// the model with the first vectors.
    pub fn check_model(&self, model: &ModelId) -> Result<(), IndexError> {
        let mut recorded = self.recorded_model.write().map_err(|_| IndexError::Poisoned)?;
        match recorded.as_ref() {
            Some(known) if known.name == model.name && (known.dimension == model.dimension || model.dimension == 0) => Ok(()),
            Some(known) if self.n_vectors() == 0 => {
                tracing::info!(old = %known, new = %model, "the index has no vectors left; recording the new model");
                self.write_model(model)?;
                *recorded = Some(model.clone());
                Ok(())
            }
            Some(known) => Err(IndexError::ModelMismatch { recorded: known.to_string(), configured: model.to_string() }),
            None => {
                self.write_model(model)?;
                *recorded = Some(model.clone());
                Ok(())
            }
        }
    }

    fn write_model(&self, model: &ModelId) -> Result<(), IndexError> {
        let bytes = serde_json::to_vec(model).map_err(|e| IndexError::Directory(e.to_string()))?;
        std::fs::write(&self.model_file, bytes).map_err(|e| IndexError::Directory(e.to_string()))
    }

    /// Replaces every chunk of `document_id` with `chunks`, durably, and makes them
    /// searchable (text and vectors alike) before it returns. Concurrent callers share
    /// commits (group commit): one durable commit and reader reload covers every
    /// document added while the previous one ran.
    pub fn replace_document(&self, document_id: &str, chunks: &[Chunk]) -> Result<(), IndexError> {
        let mut decoded: Vec<Option<Box<[f32]>>> = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            match &chunk.embedding {
                Some(encoded) => {
                    let vector = common::wire::decode_vector(encoded).filter(|v| !v.is_empty()).ok_or(IndexError::BadEmbedding(0))?;
                    let dimension = self.vectors.read().map(|t| t.dimension()).unwrap_or(0);
                    if dimension != 0 && vector.len() != dimension {
                        return Err(IndexError::BadEmbedding(dimension));
                    }
                    decoded.push(Some(vector.into_boxed_slice()));
                }
                None => decoded.push(None),
            }
        }
        let writer = self.writer.lock().map_err(|_| IndexError::Poisoned)?;
        writer.delete_term(Term::from_field_text(self.fields.document_id, document_id));
        for (chunk, vector) in chunks.iter().zip(&decoded) {
            let mut doc = TantivyDocument::default();
            doc.add_text(self.fields.chunk_id, &chunk.chunk_id);
            doc.add_text(self.fields.document_id, document_id);
            // Two terms: the collection (found by those who may read it whatever the
            // classification) and `collection#classification` (found by those who may
            // read only some classifications there).
            doc.add_text(self.fields.collection_id, &chunk.collection_id);
            doc.add_text(self.fields.collection_id, classified(&chunk.collection_id, &chunk.classification));
            doc.add_text(self.fields.collection, &chunk.collection_id);
            doc.add_text(self.fields.classification, &chunk.classification);
            doc.add_text(self.fields.text, &chunk.text);
            if let Some(section) = &chunk.section {
                doc.add_text(self.fields.section, section);
                doc.add_text(self.fields.headings, section);
            }
            if let Some(title) = &chunk.title {
                doc.add_text(self.fields.title, title);
            }
            if let Some(page) = chunk.page {
                doc.add_u64(self.fields.page, page as u64);
            }
            doc.add_u64(self.fields.ordinal, chunk.ordinal as u64);
            if let Some(vector) = vector {
                doc.add_bytes(self.fields.vector, &vector_bytes(vector));
            }
            writer.add_document(doc)?;
        }
        let number = {
            let mut state = self.commits.lock().map_err(|_| IndexError::Poisoned)?;
            state.added += 1;
            state.added
        };
        drop(writer);
        self.commit_through(number)?;
        let mut state = self.commits.lock().map_err(|_| IndexError::Poisoned)?;
        let applied = state.applied.entry(document_id.into()).or_insert(0);
        if *applied > number {
            return Ok(()); // a later write of this document is already in memory
        }
        *applied = number;
        let mut table = self.vectors.write().map_err(|_| IndexError::Poisoned)?;
        table.remove_document(document_id);
        for (chunk, vector) in chunks.iter().zip(decoded) {
            if let Some(vector) = vector {
                table.insert(VectorRow {
                    chunk_id: chunk.chunk_id.as_str().into(),
                    document_id: document_id.into(),
                    collection: chunk.collection_id.as_str().into(),
                    classification: chunk.classification.as_str().into(),
                    vector: vector.into(),
                });
            }
        }
        table.maintain();
        drop(table);
        let _ = self.graph_wake.send(());
        self.version.store(next_version(), std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// What a search sees now: a cached answer is valid for this version only.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn delete_document(&self, document_id: &str) -> Result<(), IndexError> {
        self.replace_document(document_id, &[])
    }

    /// Returns once write `number` is committed (or its commit failed): the first
    /// caller to find no commit running commits everything added so far.
    fn commit_through(&self, number: u64) -> Result<(), IndexError> {
        let mut state = self.commits.lock().map_err(|_| IndexError::Poisoned)?;
        loop {
            if state.done_through >= number {
                return match state.failed.iter().find(|(writes, _)| writes.contains(&number)) {
                    Some((_, error)) => Err(IndexError::Directory(format!("the commit failed: {error}"))),
                    None if state.committed_through >= number => Ok(()),
                    None => Err(IndexError::Directory("the commit failed".into())),
                };
            }
            if state.committing {
                state = self.committed.wait(state).map_err(|_| IndexError::Poisoned)?;
                continue;
            }
            state.committing = true;
            drop(state);
            // Lock order: writer, then state (as in `replace_document`).
            let outcome = (|| -> Result<u64, (u64, IndexError)> {
                let mut writer = self.writer.lock().map_err(|_| (number, IndexError::Poisoned))?;
                let through = self.commits.lock().map_err(|_| (number, IndexError::Poisoned))?.added;
                if let Err(error) = writer.commit() {
                    // Everything added up to `through` goes with the failed commit.
                    let _ = writer.rollback();
                    return Err((through, error.into()));
                }
                drop(writer);
                self.reader.reload().map_err(|e| (through, e.into()))?;
                self.version.store(next_version(), std::sync::atomic::Ordering::Release);
                Ok(through)
            })();
            state = self.commits.lock().map_err(|_| IndexError::Poisoned)?;
            state.committing = false;
            match outcome {
                Ok(through) => {
                    state.commits += 1;
                    state.done_through = state.done_through.max(through);
                    state.committed_through = state.committed_through.max(through);
                }
                Err((through, error)) => {
                    let from = state.done_through + 1;
                    state.done_through = state.done_through.max(through);
                    if state.failed.len() >= 64 {
                        state.failed.pop_front();
                    }
                    state.failed.push_back((from..=through, error.to_string()));
                }
            }
            self.committed.notify_all();
        }
    }

    fn terms(&self, field: Field, text: &str) -> Result<Vec<Term>, IndexError> {
        let mut analyzer = self.index.tokenizer_for_field(self.fields.text)?;
        let mut stream = analyzer.token_stream(text);
        let mut terms = Vec::new();
        while stream.advance() {
            let term = Term::from_field_text(field, &stream.token().text);
            if !terms.contains(&term) {
                terms.push(term);
            }
            if terms.len() >= 64 {
                break;
            }
        }
        Ok(terms)
    }

    /// The permission filter as a query: the collections, and in those of
    /// `restricted`, only the listed classifications.
    fn filter_query(&self, collections: &[String], restricted: &BTreeMap<String, Vec<String>>) -> Option<Box<dyn Query>> {
        let term_clause = |value: &str| {
            let term = Term::from_field_text(self.fields.collection_id, value);
            (Occur::Should, Box::new(TermQuery::new(term, IndexRecordOption::Basic)) as Box<dyn Query>)
        };
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::with_capacity(collections.len());
        for collection in collections {
            match restricted.get(collection) {
                None => clauses.push(term_clause(collection)),
                Some(classes) => clauses.extend(classes.iter().map(|class| term_clause(&classified(collection, class)))),
            }
        }
        // A filter, not a ranking signal: scored, a rare collection's term would lift
        // every chunk of a small collection above better matches in a large one.
        (!clauses.is_empty()).then(|| Box::new(ConstScoreQuery::new(Box::new(BooleanQuery::new(clauses)), 0.0)) as Box<dyn Query>)
    }

    /// The BM25 part: each query term in the text, the heading path and the title.
    /// English stop words are left out of the query (unless it is nothing else): they
    /// hardly move a BM25 score, yet each matches nearly every chunk (scoring those
    /// matches was most of a search's time), and question words matched headings
    /// phrased as questions instead of the answer.
    fn text_query(&self, query: &str) -> Result<Option<TextQueries>, IndexError> {
        let content = without_stop_words(query);
        let text_terms = self.terms(self.fields.text, if content.trim().is_empty() { query } else { &content })?;
        if text_terms.is_empty() {
            return Ok(None);
        }
        let mut all: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let mut text_only: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for term in &text_terms {
            let word = term.value().as_str().unwrap_or_default().to_string();
            all.push((Occur::Should, Box::new(TermQuery::new(term.clone(), IndexRecordOption::WithFreqs))));
            text_only.push((Occur::Should, Box::new(TermQuery::new(term.clone(), IndexRecordOption::WithFreqs))));
            for (field, boost) in [(self.fields.headings, HEADINGS_BOOST), (self.fields.title, TITLE_BOOST)] {
                let term = Term::from_field_text(field, &word);
                all.push((Occur::Should, Box::new(BoostQuery::new(Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)), boost))));
            }
        }
        Ok(Some((Box::new(BooleanQuery::new(all)), Box::new(BooleanQuery::new(text_only)))))
    }

    /// Ranks the caller's chunks for `request`; never a chunk outside its collections.
    pub fn search(&self, request: &SearchRequest<'_>) -> Result<Vec<SearchHit>, IndexError> {
        let (collections, restricted, k) = (request.collections, request.restricted, request.k);
        if collections.is_empty() || k == 0 {
            return Ok(vec![]);
        }
        let Some(filter) = self.filter_query(collections, restricted) else { return Ok(vec![]) };
        let searcher = self.reader.searcher();
        let queries = self.text_query(request.query)?;
        let vector = request.vector.filter(|_| request.mode != SearchMode::Bm25);
        // Fusion reads each list deep, and so does a search that keeps few hits per page;
        // one ranking alone otherwise needs only a margin for the duplicates that collapse.
        let depth = if vector.is_some() || request.per_page > 0 { request.fusion.candidates.max(k) } else { (2 * k).min(request.fusion.candidates.max(k)) };
        // (chunk id) → fused score, what is known to fetch the hit, its cosine similarity.
        let mut fused: HashMap<String, (f32, Option<DocAddress>, Option<f32>)> = HashMap::new();
        // How many chunks BM25 matched, up to `depth`.
        let mut bm25_matches = 0;
        if request.mode != SearchMode::Vector
            && let Some((query, _)) = &queries
        {
            let combined = BooleanQuery::new(vec![(Occur::Must, query.box_clone()), (Occur::Must, filter.box_clone())]);
            let top = searcher.search(&combined, &TopDocs::with_limit(depth).order_by_score())?;
            bm25_matches = top.len();
            // Each segment's chunk-id column, opened once per search.
            let mut columns: HashMap<u32, Option<tantivy::columnar::StrColumn>> = HashMap::new();
            for (rank, (score, address)) in top.into_iter().enumerate() {
                // Only fusion needs the chunk id to meet the other list; alone, the
                // address is the key.
                let chunk_id = match vector {
                    Some(_) => {
                        let column = match columns.entry(address.segment_ord) {
                            std::collections::hash_map::Entry::Occupied(open) => open.into_mut(),
                            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(searcher.segment_reader(address.segment_ord).fast_fields().str("chunk_id")?),
                        };
                        self.chunk_id_of(&searcher, column.as_ref(), address)?
                    }
                    None => format!("{}:{}", address.segment_ord, address.doc_id),
                };
                let contribution = request.fusion.bm25_contribution(vector.is_some(), rank, score);
                let entry = fused.entry(chunk_id).or_insert((0.0, Some(address), None));
                entry.0 += contribution;
            }
        }
        if let Some(vector) = vector {
            let table = self.vectors.read().map_err(|_| IndexError::Poisoned)?;
            let specific = bm25_matches > 0 && bm25_matches < depth;
            for (rank, (similarity, row)) in table.nearest(vector, collections, restricted, depth).into_iter().enumerate() {
                let contribution = request.fusion.vector_contribution(request.mode, specific, rank, similarity);
                let entry = fused.entry(row.chunk_id.to_string()).or_insert((0.0, None, None));
                entry.0 += contribution;
                entry.2 = Some(similarity);
            }
        }
        let mut ranked: Vec<(String, f32, Option<DocAddress>, Option<f32>)> = fused.into_iter().map(|(id, (score, address, similarity))| (id, score, address, similarity)).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let snippets = match &queries {
            Some((_, text_only)) => {
                let mut generator = SnippetGenerator::create(&searcher, text_only.as_ref(), self.fields.text)?;
                generator.set_max_num_chars(240);
                Some(generator)
            }
            None => None,
        };
        let mut hits = Vec::with_capacity(k);
        let mut admission = Admission::new(request.per_page);
        for (chunk_id, score, address, similarity) in ranked {
            if hits.len() >= k {
                break;
            }
            let address = match address {
                Some(address) => address,
                None => match self.address_of(&searcher, &chunk_id)? {
                    Some(address) => address,
                    None => continue,
                },
            };
            let doc: TantivyDocument = searcher.doc(address)?;
            let field = |f: Field| doc.get_first(f).and_then(|v| v.as_str()).unwrap_or_default();
            // Defence in depth: the filter is in both rankings, and every hit is re-checked.
            let collection = field(self.fields.collection);
            let classification = doc.get_first(self.fields.classification).and_then(|v| v.as_str()).map_or_else(common::wire::default_classification, str::to_string);
            let allowed = collections.iter().any(|c| c == collection) && restricted.get(collection).is_none_or(|classes| classes.contains(&classification));
            // Decided before its snippet is made.
            let page = doc.get_first(self.fields.page).and_then(|v| v.as_u64());
            if !allowed || !admission.admit(field(self.fields.text), field(self.fields.document_id), page) {
                continue;
            }
            let mut hit = self.hit_of(&doc, score, snippets.as_ref());
            hit.similarity = similarity;
            hits.push(hit);
        }
        Ok(hits)
    }

    fn chunk_id_of(&self, searcher: &Searcher, column: Option<&tantivy::columnar::StrColumn>, address: DocAddress) -> Result<String, IndexError> {
        if let Some(column) = column
            && let Some(ord) = column.term_ords(address.doc_id).next()
        {
            let mut text = String::new();
            if column.ord_to_str(ord, &mut text).unwrap_or(false) {
                return Ok(text);
            }
        }
        let doc: TantivyDocument = searcher.doc(address)?;
        Ok(doc.get_first(self.fields.chunk_id).and_then(|v| v.as_str()).unwrap_or_default().to_string())
    }

    /// Where the live copy of `chunk_id` is: its postings read segment by segment (no
    /// query to weigh and score, for one term of one document).
    fn address_of(&self, searcher: &Searcher, chunk_id: &str) -> Result<Option<DocAddress>, IndexError> {
        use tantivy::DocSet;
        let term = Term::from_field_text(self.fields.chunk_id, chunk_id);
        for (ord, segment) in searcher.segment_readers().iter().enumerate() {
            let Some(mut postings) = segment.inverted_index(self.fields.chunk_id)?.read_postings(&term, IndexRecordOption::Basic).map_err(tantivy::TantivyError::from)? else { continue };
            let alive = segment.alive_bitset();
            let mut doc = postings.doc();
            while doc != tantivy::TERMINATED {
                if alive.is_none_or(|bits| bits.is_alive(doc)) {
                    return Ok(Some(DocAddress::new(ord as u32, doc)));
                }
                doc = postings.advance();
            }
        }
        Ok(None)
    }

    fn hit_of(&self, doc: &TantivyDocument, score: f32, snippets: Option<&SnippetGenerator>) -> SearchHit {
        let text_of = |field: Field| doc.get_first(field).and_then(|v| v.as_str().map(str::to_string));
        let text = text_of(self.fields.text).unwrap_or_default();
        let snippet = snippets.map(|generator| snippet_of(generator, &text));
        SearchHit {
            document_id: text_of(self.fields.document_id).unwrap_or_default(),
            chunk_id: text_of(self.fields.chunk_id).unwrap_or_default(),
            collection_id: text_of(self.fields.collection).unwrap_or_default(),
            score,
            page: doc.get_first(self.fields.page).and_then(|v| v.as_u64()).map(|p| p as u32),
            section: text_of(self.fields.section),
            classification: text_of(self.fields.classification).unwrap_or_else(common::wire::default_classification),
            title: text_of(self.fields.title),
            snippet,
            text,
            similarity: None,
        }
    }

    /// How many chunks of `document_id` the index holds.
    pub fn chunks_of(&self, document_id: &str) -> Result<usize, IndexError> {
        let query = TermQuery::new(Term::from_field_text(self.fields.document_id, document_id), IndexRecordOption::Basic);
        Ok(self.reader.searcher().search(&query, &tantivy::collector::Count)?)
    }

    /// The first `limit` chunks of `document_id` in reading order (looked up by their
    /// ids, `{document}-{n}`), and how many chunks it has in all.
    pub fn preview(&self, document_id: &str, limit: usize) -> Result<(usize, Vec<SearchHit>), IndexError> {
        let total = self.chunks_of(document_id)?;
        let searcher = self.reader.searcher();
        let mut chunks = Vec::new();
        for n in 0..total.min(limit) {
            if let Some(address) = self.address_of(&searcher, &format!("{document_id}-{n}"))? {
                let doc: TantivyDocument = searcher.doc(address)?;
                chunks.push(self.hit_of(&doc, 0.0, None));
            }
        }
        Ok((total, chunks))
    }

    pub fn n_chunks(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Vectors not in the graph yet (each search scores them exactly meanwhile); 0
    /// once the graph thread has caught up, or while no graph is warranted.
    pub fn vector_graph_pending(&self) -> usize {
        self.vectors.read().map(|t| t.graph_pending()).unwrap_or(0)
    }

    pub fn n_vectors(&self) -> usize {
        self.vectors.read().map(|t| t.len()).unwrap_or(0)
    }
}

/// A search's BM25 query over every field, and the same over the text alone (for snippets).
type TextQueries = (Box<dyn Query>, Box<dyn Query>);

/// The second collection term of a chunk: its collection and its classification.
fn classified(collection: &str, classification: &str) -> String {
    format!("{collection}#{classification}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn chunk(doc: &str, collection: &str, n: u32, text: &str) -> Chunk {
        Chunk {
            chunk_id: format!("{doc}:{n}"),
            document_id: doc.into(),
            collection_id: collection.into(),
            ordinal: n,
            text: text.into(),
            page: Some(n + 1),
            section: Some("Intro".into()),
            char_start: 0,
            char_end: text.len() as u64,
            classification: "internal".into(),
            title: None,
            embedding: None,
        }
    }

    fn bm25<'a>(query: &'a str, collections: &'a [String], restricted: &'a BTreeMap<String, Vec<String>>, k: usize) -> SearchRequest<'a> {
        SearchRequest { query, vector: None, collections, restricted, k, mode: SearchMode::Bm25, fusion: Fusion::default(), per_page: 0 }
    }

    fn search(index: &ChunkIndex, query: &str, collections: &[&str]) -> Vec<SearchHit> {
        let collections: Vec<String> = collections.iter().map(|c| c.to_string()).collect();
        index.search(&bm25(query, &collections, &BTreeMap::new(), 10)).unwrap()
    }

    #[test]
    fn concurrent_writers_share_commits_and_each_sees_its_own_write_on_return() {
        let dir = tempfile::tempdir().unwrap();
        let index = std::sync::Arc::new(ChunkIndex::open(dir.path(), 32).unwrap());
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let index = index.clone();
                std::thread::spawn(move || {
                    for d in 0..15 {
                        let word = format!("zq{w}x{d}");
                        index.replace_document(&format!("w{w}d{d}"), &[chunk(&format!("w{w}d{d}"), "c1", 0, &format!("shared words {word}"))]).unwrap();
                        let found = search(&index, &word, &["c1"]);
                        assert_eq!(found.len(), 1, "{word} is searchable as soon as its write returns");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(index.n_chunks(), 120);
        let commits = index.commits.lock().unwrap().commits;
        assert!(commits < 120, "concurrent writes shared commits ({commits} commits for 120 writes)");
        // A second write of a document replaces the first, text and all.
        index.replace_document("w0d0", &[chunk("w0d0", "c1", 0, "replacement")]).unwrap();
        assert!(search(&index, "zq0x0", &["c1"]).is_empty());
        assert_eq!(index.n_chunks(), 120);
    }

    #[test]
    fn the_collection_filter_does_not_rank() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        for n in 0..20 {
            index.replace_document(&format!("filler-{n}"), &[chunk(&format!("filler-{n}"), "big", 0, "quarterly budget review notes")]).unwrap();
        }
        index.replace_document("better", &[chunk("better", "big", 0, "turbine maintenance: turbine blades and turbine bearings")]).unwrap();
        index.replace_document("weaker", &[chunk("weaker", "small", 0, "turbine maintenance notes for the quarterly review")]).unwrap();
        let hits = search(&index, "turbine", &["big", "small"]);
        let order: Vec<&str> = hits.iter().map(|h| h.document_id.as_str()).collect();
        assert_eq!(order, ["better", "weaker"], "the better match leads whatever the size of its collection");
    }

    #[test]
    fn partial_access_finds_only_the_listed_classifications() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        let classified = |doc: &str, class: &str| Chunk { classification: class.into(), ..chunk(doc, "c1", 0, &format!("turbine maintenance schedule {doc}")) };
        index.replace_document("d-int", &[classified("d-int", "internal")]).unwrap();
        index.replace_document("d-res", &[classified("d-res", "restricted")]).unwrap();
        assert_eq!(search(&index, "turbine", &["c1"]).len(), 2, "full access sees both");
        let c1 = vec!["c1".to_string()];
        let restricted = BTreeMap::from([("c1".to_string(), vec!["public".to_string(), "internal".to_string()])]);
        let partial = index.search(&bm25("turbine", &c1, &restricted, 10)).unwrap();
        assert_eq!(partial.iter().map(|h| h.document_id.as_str()).collect::<Vec<_>>(), ["d-int"]);
        assert_eq!(partial[0].classification, "internal");
        let none = BTreeMap::from([("c1".to_string(), vec![])]);
        assert!(index.search(&bm25("turbine", &c1, &none, 10)).unwrap().is_empty(), "no classification, nothing");
        assert!(search(&index, "turbine", &["c1#restricted"]).is_empty(), "the hit is not in the listed collections");
    }

    #[test]
    fn search_ranks_stems_marks_terms_and_never_crosses_collections() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "The reactor cooling pumps were replaced in spring."), chunk("d1", "c1", 1, "Lunch menus.")]).unwrap();
        index.replace_document("d2", &[chunk("d2", "c2", 0, "Reactor pump secrets of another team.")]).unwrap();
        let hits = search(&index, "replacing reactor pump", &["c1"]);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].chunk_id, "d1:0");
        assert_eq!(hits[0].page, Some(1));
        let snippet = hits[0].snippet.clone().unwrap();
        assert!(snippet.contains("<mark>reactor</mark>") && snippet.contains("<mark>pumps</mark>"), "{snippet}");
        assert!(search(&index, "reactor", &[]).is_empty(), "no collections, no hits");
        assert_eq!(search(&index, "reactor", &["c1", "c2"]).len(), 2);
    }

    #[test]
    fn titles_and_headings_count_and_duplicates_collapse() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        // A title breaks the tie between equal matches in the text; it does not outvote
        // the text (see HEADINGS_BOOST).
        let titled = Chunk { title: Some("zipfile — Work with ZIP archives".into()), ..chunk("zip", "c1", 0, "Read the zip members of a file.") };
        let other = chunk("other", "c1", 0, "Read the zip entries of a file.");
        index.replace_document("zip", &[titled]).unwrap();
        index.replace_document("other", &[other]).unwrap();
        let hits = search(&index, "zip archives", &["c1"]);
        assert_eq!(hits[0].document_id, "zip", "the title breaks the tie: {hits:?}");
        let answering = chunk("answering", "c1", 0, "Zip archives: each archive member of the zip is read in turn.");
        index.replace_document("answering", &[answering]).unwrap();
        let hits = search(&index, "zip archives", &["c1"]);
        assert_eq!(hits[0].document_id, "answering", "the text that answers leads a title that only names the words: {hits:?}");
        index.replace_document("copy1", &[chunk("copy1", "c1", 0, "Identical boilerplate paragraph about licences.")]).unwrap();
        index.replace_document("copy2", &[chunk("copy2", "c1", 0, "identical   boilerplate paragraph about licences.")]).unwrap();
        assert_eq!(search(&index, "boilerplate licences", &["c1"]).len(), 1, "one of the two copies");
    }

    #[test]
    fn hits_per_page_are_limited_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        // One long page cut into three chunks, the next page, and another document.
        let mut long = vec![chunk("manual", "c1", 0, "Valve torque table for the valve."), chunk("manual", "c1", 1, "Valve seat and valve stem.")];
        long.push(Chunk { page: Some(1), ..chunk("manual", "c1", 2, "Valve gasket of the valve body.") });
        long.push(Chunk { page: Some(1), ..chunk("manual", "c1", 3, "Valve cover over the valve spring.") });
        index.replace_document("manual", &long).unwrap();
        index.replace_document("notes", &[Chunk { page: None, ..chunk("notes", "c1", 0, "A valve note.") }]).unwrap();
        let (collections, none) = (vec!["c1".to_string()], BTreeMap::new());
        let places = |per_page: usize| -> Vec<(String, Option<u32>)> {
            let request = SearchRequest { per_page, ..bm25("valve", &collections, &none, 10) };
            index.search(&request).unwrap().into_iter().map(|h| (h.document_id, h.page)).collect()
        };
        let all = places(0);
        assert_eq!(all.len(), 5, "no limit: every chunk {all:?}");
        let one = places(1);
        assert_eq!(one.len(), 3, "one hit per page: {one:?}");
        assert_eq!(one.iter().collect::<HashSet<_>>().len(), 3, "three places: {one:?}");
        let two = places(2);
        assert_eq!(two.iter().filter(|(d, p)| d == "manual" && *p == Some(1)).count(), 2, "{two:?}");
        assert_eq!(two.len(), 4, "{two:?}");
    }

    #[test]
    fn stop_words_leave_the_query_unless_it_has_nothing_else() {
        assert_eq!(without_stop_words("How is the size of a ZIP archive read?"), "size ZIP archive read");
        assert_eq!(without_stop_words("How do I make a bash script stop at the first command that fails?"), "make bash script stop first command fails");
        assert_eq!(without_stop_words("to be or not to be"), "");
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "To be or not to be.")]).unwrap();
        index.replace_document("d2", &[chunk("d2", "c1", 0, "The size of the archive.")]).unwrap();
        assert_eq!(search(&index, "to be or not to be", &["c1"])[0].document_id, "d1", "a query of stop words only still searches");
        assert_eq!(search(&index, "what is the archive size", &["c1"]).len(), 1, "the stop words match nothing by themselves");
    }

    #[test]
    fn query_syntax_is_just_text() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "collection_id c2 title")]).unwrap();
        assert_eq!(search(&index, "collection_id:c2 OR (title", &["c1"]).len(), 1, "operators and fields in user text are plain words");
    }

    #[test]
    fn replacing_and_deleting_a_document_removes_its_old_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "alpha")]).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "beta")]).unwrap();
        assert!(search(&index, "alpha", &["c1"]).is_empty());
        assert_eq!(search(&index, "beta", &["c1"]).len(), 1);
        index.delete_document("d1").unwrap();
        assert_eq!(index.n_chunks(), 0);
    }

    fn with_vector(mut chunk: Chunk, vector: &[f32]) -> Chunk {
        chunk.embedding = Some(common::wire::encode_vector(vector));
        chunk
    }

    #[test]
    fn vectors_persist_rank_within_the_filter_and_fuse_with_bm25() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = ChunkIndex::open(dir.path(), 15).unwrap();
            index.check_model(&ModelId { name: "test".into(), dimension: 3 }).unwrap();
            index.replace_document("d1", &[with_vector(chunk("d1", "c1", 0, "how to unpack an archive"), &[1.0, 0.0, 0.0])]).unwrap();
            index.replace_document("d2", &[with_vector(chunk("d2", "c1", 0, "holiday schedule"), &[0.0, 1.0, 0.0])]).unwrap();
            index.replace_document("d3", &[with_vector(chunk("d3", "c2", 0, "extracting compressed files"), &[0.99, 0.1, 0.0])]).unwrap();
        }
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        assert_eq!(index.n_vectors(), 3, "vectors come back after reopening");
        assert_eq!(index.recorded_model().unwrap().name, "test");
        let c1 = vec!["c1".to_string()];
        let none = BTreeMap::new();
        let query = [0.98, 0.05, 0.0];
        let request = SearchRequest { query: "decompress", vector: Some(&query), collections: &c1, restricted: &none, k: 10, mode: SearchMode::Vector, fusion: Fusion::default(), per_page: 0 };
        let hits = index.search(&request).unwrap();
        assert_eq!(hits.iter().map(|h| h.document_id.as_str()).collect::<Vec<_>>(), ["d1", "d2"], "nearest first, d3 is not in c1");
        let hybrid = SearchRequest { query: "holiday", mode: SearchMode::Hybrid, ..request };
        let hits = index.search(&hybrid).unwrap();
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].document_id, "d2", "in both lists beats first in one: {hits:?}");
        // With vectors weighing 1.5, an identifier only BM25 knows stays among the first
        // hits though three vector hits are ranked before it: because few chunks hold
        // the word (a specific query)…
        for i in 0..6 {
            index.replace_document(&format!("noise{i}"), &[with_vector(chunk(&format!("noise{i}"), "c1", 0, &format!("weekly notes of team {i}")), &[0.96, 0.0, 0.28])]).unwrap();
        }
        index.replace_document("marker", &[with_vector(chunk("marker", "c1", 0, "ticket mk42xyz closed"), &[1.0, 0.0, 0.0])]).unwrap();
        let narrow = Fusion { candidates: 3, vector_weight: 1.5, ..Fusion::default() };
        let related = [0.96, 0.0, 0.28];
        let exact = SearchRequest { query: "mk42xyz", vector: Some(&related), k: 3, mode: SearchMode::Hybrid, fusion: narrow, ..request };
        let first: Vec<String> = index.search(&exact).unwrap().into_iter().map(|h| h.document_id).collect();
        assert!(first.contains(&"marker".to_string()), "the exact match of a specific query is kept: {first:?}");
        // …and, where BM25's list is full (a common word beside it), because the vector
        // hits are unrelated (cosine < RELATED_SIMILARITY).
        for i in 0..3 {
            index.replace_document(&format!("filler{i}"), &[with_vector(chunk(&format!("filler{i}"), "c1", 0, &format!("ticket {i} opened")), &[0.0, 1.0, 0.0])]).unwrap();
        }
        let unrelated = [0.0, 0.0, 1.0];
        let common_word = SearchRequest { query: "ticket mk42xyz", vector: Some(&unrelated), ..exact };
        let first: Vec<String> = index.search(&common_word).unwrap().into_iter().map(|h| h.document_id).collect();
        assert!(first.contains(&"marker".to_string()), "the exact match is kept beside unrelated vector hits: {first:?}");
        // A query in plain words keeps the raised weight: the three related vector hits
        // come before BM25's only match.
        let plain = SearchRequest { query: "ticket", vector: Some(&related), fusion: Fusion { candidates: 3, vector_weight: 1.5, ..Fusion::default() }, ..exact };
        let first: Vec<String> = index.search(&plain).unwrap().into_iter().map(|h| h.document_id).collect();
        assert!(first.iter().all(|d| d.starts_with("noise")), "vectors weigh 1.5 where BM25's list is full: {first:?}");
        let mismatch = index.check_model(&ModelId { name: "other".into(), dimension: 5 }).unwrap_err().to_string();
        assert!(mismatch.contains("echod reindex"), "{mismatch}");
        let before = index.n_vectors();
        index.delete_document("d1").unwrap();
        assert_eq!(index.n_vectors(), before - 1);
    }
}
