//! Chunks in PostgreSQL (`search.url`): full-text search and pgvector in schema
//! `search`, shared by every search replica (a replica keeps no index of its own, so
//! replicas are stateless and interchangeable).
//!
//! Tables: `chunks` (one row per chunk and index generation: the text, its heading path
//! and title in a weighted `tsvector` with a GIN index, the embedding as a `vector` with
//! an HNSW index per dimension), `generations` (each one's model, chunk and vector
//! counts) and `meta` (the live generation, the one being built, and the version every
//! write bumps). A write holds the `meta` row for its transaction, so writes, the switch
//! of generations and the version agree; a search reads one snapshot (repeatable read).
//!
//! Ranking is the embedded index's: a BM25-like list (each query word's `ts_rank` —
//! title and headings weighted as the embedded fields are boosted — times the word's
//! inverse document frequency), a vector list (cosine, HNSW with pgvector's iterative
//! scan so the permission filter never leaves fewer than asked), fused by `fusion`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use common::wire::{Chunk, RebuildStatus, SearchHit, SearchMode};

use crate::embed::ModelId;
use crate::fusion::{Admission, snippet_of, without_stop_words};
use crate::index::IndexError;
use crate::store::{ChunkStore, IndexState, Query, same_model};

impl From<sqlx::Error> for IndexError {
    fn from(error: sqlx::Error) -> Self {
        IndexError::Database(error.to_string())
    }
}

const SCHEMA: &str = r#"
CREATE SCHEMA IF NOT EXISTS search;
CREATE TABLE IF NOT EXISTS search.meta (
    id INT PRIMARY KEY CHECK (id = 1),
    live INT NOT NULL,
    next INT,
    version BIGINT NOT NULL
);
INSERT INTO search.meta (id, live, next, version) VALUES (1, 1, NULL, 1) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS search.generations (
    generation INT PRIMARY KEY,
    model TEXT,
    dimension INT,
    chunks BIGINT NOT NULL DEFAULT 0,
    vectors BIGINT NOT NULL DEFAULT 0
);
INSERT INTO search.generations (generation) VALUES (1) ON CONFLICT (generation) DO NOTHING;
CREATE TABLE IF NOT EXISTS search.chunks (
    generation INT NOT NULL,
    chunk_id TEXT COLLATE "C" NOT NULL,
    document_id TEXT COLLATE "C" NOT NULL,
    collection_id TEXT COLLATE "C" NOT NULL,
    classification TEXT COLLATE "C" NOT NULL,
    ordinal INT NOT NULL,
    page INT,
    section TEXT,
    title TEXT,
    text TEXT NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, coalesce(title, '')), 'A')
        || setweight(to_tsvector('english'::regconfig, coalesce(section, '')), 'B')
        || to_tsvector('english'::regconfig, text)
    ) STORED,
    embedding vector,
    PRIMARY KEY (generation, chunk_id)
);
CREATE INDEX IF NOT EXISTS chunks_document ON search.chunks (generation, document_id, ordinal);
CREATE INDEX IF NOT EXISTS chunks_collection ON search.chunks (generation, collection_id);
CREATE INDEX IF NOT EXISTS chunks_tsv ON search.chunks USING gin (tsv);
"#;

/// `ts_rank`'s weights, in its order {D, C, B, A}: the text (D) 1, headings (B) and
/// title (A) 0.3 — the embedded index's field boosts.
const RANK_WEIGHTS: &str = "{1.0,0.0,0.3,0.3}";

/// At most this many query words are looked up (as in the embedded index).
const MAX_TERMS: usize = 64;

/// The permission filter on `c`, with the collections in `$3`, the restricted ones in
/// `$4` and their allowed `collection#classification` pairs in `$5`.
const FILTER: &str = "c.collection_id = ANY($3) AND (NOT (c.collection_id = ANY($4)) OR (c.collection_id || '#' || c.classification) = ANY($5))";

pub(crate) struct PgChunkStore {
    pool: PgPool,
    /// Dimensions whose HNSW index this process has made sure of.
    vector_indexes: Mutex<HashSet<usize>>,
}

type Row = (String, String, String, String, Option<i32>, Option<String>, Option<String>, String);

fn hit_of((chunk_id, document_id, collection_id, classification, page, section, title, text): Row, score: f32) -> SearchHit {
    SearchHit {
        document_id,
        chunk_id,
        collection_id,
        score,
        text,
        page: page.and_then(|p| u32::try_from(p).ok()),
        section,
        classification,
        snippet: None,
        title,
        similarity: None,
    }
}

/// A vector in pgvector's text form.
fn vector_text(vector: &[f32]) -> String {
    let mut text = String::with_capacity(vector.len() * 12 + 2);
    text.push('[');
    for (i, x) in vector.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        // Non-finite values are refused by pgvector; they never come from a model.
        text.push_str(&if x.is_finite() { x.to_string() } else { "0".to_string() });
    }
    text.push(']');
    text
}

/// The words of a query that are looked up: lower-cased runs of letters and digits,
/// stop words out (unless that leaves nothing), each once.
fn query_words(query: &str) -> Vec<String> {
    let content = without_stop_words(query);
    let source = if content.trim().is_empty() { query.to_string() } else { content };
    let mut words: Vec<String> = Vec::new();
    for word in source.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let word = word.to_lowercase();
        if !words.contains(&word) {
            words.push(word);
        }
        if words.len() >= MAX_TERMS {
            break;
        }
    }
    words
}

/// The permission filter's parameters: collections, restricted ones, allowed pairs.
fn filter_params(query: &Query) -> (Vec<String>, Vec<String>, Vec<String>) {
    let restricted: Vec<String> = query.restricted.keys().filter(|c| query.collections.contains(c)).cloned().collect();
    let pairs = query.restricted.iter().flat_map(|(c, classes)| classes.iter().map(move |class| format!("{c}#{class}"))).collect();
    (query.collections.clone(), restricted, pairs)
}

fn allowed(query: &Query, collection: &str, classification: &str) -> bool {
    query.collections.iter().any(|c| c == collection) && query.restricted.get(collection).is_none_or(|classes| classes.iter().any(|c| c == classification))
}

fn status_of(live: i32, next: Option<i32>, live_chunks: i64, next_chunks: Option<i64>) -> RebuildStatus {
    RebuildStatus {
        building: next.is_some(),
        live: format!("gen-{live}"),
        live_chunks: u64::try_from(live_chunks).unwrap_or(0),
        next: next.map(|n| format!("gen-{n}")),
        next_chunks: next_chunks.and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
    }
}

impl PgChunkStore {
    pub(crate) async fn open(url: &str) -> anyhow::Result<PgChunkStore> {
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("search.url: {e}"))?;
        // A query of stop words only is answered by nothing, not by a notice in the log.
        let options = options.options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for search: {e}"))?;
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-search-migrate'))").execute(&mut *tx).await?;
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS vector").execute(&mut *tx).await.map_err(|e| {
            anyhow::anyhow!("search.url: the PostgreSQL there cannot provide pgvector's `vector` extension ({e}); install pgvector there, or leave search.url empty for the embedded index")
        })?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(PgChunkStore { pool, vector_indexes: Mutex::new(HashSet::new()) })
    }

    /// Makes sure of the HNSW index over vectors of `dimension` (pgvector indexes only
    /// vectors of one declared dimension: one partial index per dimension).
    async fn ensure_vector_index(&self, dimension: usize) -> Result<(), IndexError> {
        if self.vector_indexes.lock().map_err(|_| IndexError::Poisoned)?.contains(&dimension) {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-search-migrate'))").execute(&mut *tx).await?;
        // A number of ours: safe to splice.
        let statement = format!(
            "CREATE INDEX IF NOT EXISTS chunks_embedding_{dimension} ON search.chunks USING hnsw ((embedding::vector({dimension})) vector_cosine_ops) WHERE vector_dims(embedding) = {dimension}"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).execute(&mut *tx).await?;
        tx.commit().await?;
        self.vector_indexes.lock().map_err(|_| IndexError::Poisoned)?.insert(dimension);
        Ok(())
    }

    /// Writes a document's chunks into `generation` inside `tx`. Vectors of another
    /// model than the generation's are refused (`strict`) or left out.
    async fn write(
        tx: &mut Transaction<'static, Postgres>,
        generation: i32,
        document_id: &str,
        chunks: &[Chunk],
        vectors: &[Option<String>],
        model: Option<&ModelId>,
        strict: bool,
    ) -> Result<(), IndexError> {
        let mut keep_vectors = vectors.iter().any(Option::is_some);
        if keep_vectors {
            let Some(model) = model else { return Err(IndexError::NoModel) };
            let (name, dimension, stored): (Option<String>, Option<i32>, i64) =
                sqlx::query_as("SELECT model, dimension, vectors FROM search.generations WHERE generation = $1").bind(generation).fetch_one(&mut **tx).await?;
            let known = name.map(|name| ModelId { name, dimension: dimension.and_then(|d| usize::try_from(d).ok()).unwrap_or(0) });
            match known {
                Some(known) if same_model(&known, model) => {}
                Some(known) if stored > 0 => {
                    if strict {
                        return Err(IndexError::ModelMismatch { recorded: known.to_string(), configured: model.to_string() });
                    }
                    keep_vectors = false;
                }
                _ => {
                    sqlx::query("UPDATE search.generations SET model = $2, dimension = $3 WHERE generation = $1")
                        .bind(generation)
                        .bind(&model.name)
                        .bind(i32::try_from(model.dimension).unwrap_or(0))
                        .execute(&mut **tx)
                        .await?;
                }
            }
        }
        let removed: Vec<bool> = sqlx::query_scalar("DELETE FROM search.chunks WHERE generation = $1 AND document_id = $2 RETURNING embedding IS NOT NULL")
            .bind(generation)
            .bind(document_id)
            .fetch_all(&mut **tx)
            .await?;
        let removed_vectors = removed.iter().filter(|v| **v).count() as i64;
        let vectors: Vec<Option<String>> = if keep_vectors { vectors.to_vec() } else { vec![None; chunks.len()] };
        let added_vectors = vectors.iter().filter(|v| v.is_some()).count() as i64;
        if !chunks.is_empty() {
            sqlx::query(
                "INSERT INTO search.chunks (generation, chunk_id, document_id, collection_id, classification, ordinal, page, section, title, text, embedding)
                 SELECT $1, chunk_id, $2, collection_id, classification, ordinal, page, section, title, text, embedding::vector
                 FROM UNNEST($3::text[], $4::text[], $5::text[], $6::int[], $7::int[], $8::text[], $9::text[], $10::text[], $11::text[])
                      AS t(chunk_id, collection_id, classification, ordinal, page, section, title, text, embedding)",
            )
            .bind(generation)
            .bind(document_id)
            .bind(chunks.iter().map(|c| c.chunk_id.clone()).collect::<Vec<_>>())
            .bind(chunks.iter().map(|c| c.collection_id.clone()).collect::<Vec<_>>())
            .bind(chunks.iter().map(|c| c.classification.clone()).collect::<Vec<_>>())
            .bind(chunks.iter().map(|c| i32::try_from(c.ordinal).unwrap_or(i32::MAX)).collect::<Vec<_>>())
            .bind(chunks.iter().map(|c| c.page.and_then(|p| i32::try_from(p).ok())).collect::<Vec<_>>())
            .bind(chunks.iter().map(|c| c.section.clone()).collect::<Vec<_>>())
            .bind(chunks.iter().map(|c| c.title.clone()).collect::<Vec<_>>())
            // PostgreSQL text holds no NUL byte; a chunk's text may (a binary-ish file).
            .bind(chunks.iter().map(|c| c.text.replace('\0', " ")).collect::<Vec<_>>())
            .bind(vectors)
            .execute(&mut **tx)
            .await?;
        }
        sqlx::query("UPDATE search.generations SET chunks = chunks - $2 + $3, vectors = vectors - $4 + $5 WHERE generation = $1")
            .bind(generation)
            .bind(removed.len() as i64)
            .bind(chunks.len() as i64)
            .bind(removed_vectors)
            .bind(added_vectors)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn status_in(tx: &mut Transaction<'static, Postgres>) -> Result<RebuildStatus, IndexError> {
        let (live, next, live_chunks, next_chunks): (i32, Option<i32>, i64, Option<i64>) = sqlx::query_as(
            "SELECT m.live, m.next, l.chunks, n.chunks FROM search.meta m JOIN search.generations l ON l.generation = m.live
             LEFT JOIN search.generations n ON n.generation = m.next",
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(status_of(live, next, live_chunks, next_chunks))
    }

    /// Removes a generation's chunks and record (after it stopped being live or built).
    async fn drop_generation(&self, generation: i32) -> Result<(), IndexError> {
        sqlx::query("DELETE FROM search.chunks WHERE generation = $1").bind(generation).execute(&self.pool).await?;
        sqlx::query("DELETE FROM search.generations WHERE generation = $1").bind(generation).execute(&self.pool).await?;
        Ok(())
    }

    /// The BM25-like list: chunk ids and scores, best first, and how many matched.
    async fn text_list(tx: &mut Transaction<'static, Postgres>, query: &Query, depth: usize) -> Result<Vec<(String, f32)>, IndexError> {
        let words = query_words(&query.text);
        if words.is_empty() {
            return Ok(vec![]);
        }
        // Each word's query (stemmed; a word the parser splits — "foo_bar" — is its parts
        // together) and how many live chunks it matches.
        let terms: Vec<(String, i64)> = sqlx::query_as(
            "SELECT q::text, (SELECT count(*) FROM search.chunks c WHERE c.generation = (SELECT live FROM search.meta) AND c.tsv @@ q)
             FROM unnest($1::text[]) AS w, LATERAL plainto_tsquery('english', w) AS q WHERE numnode(q) > 0",
        )
        .bind(&words)
        .fetch_all(&mut **tx)
        .await?;
        let terms: Vec<(String, i64)> = terms.into_iter().filter(|(_, df)| *df > 0).collect();
        if terms.is_empty() {
            return Ok(vec![]);
        }
        let total: i64 = sqlx::query_scalar("SELECT g.chunks FROM search.meta m JOIN search.generations g ON g.generation = m.live").fetch_one(&mut **tx).await?;
        let n = total.max(1) as f64;
        // BM25's inverse document frequency.
        let weights: Vec<f32> = terms.iter().map(|(_, df)| (1.0 + (n - *df as f64 + 0.5) / (*df as f64 + 0.5)).ln() as f32).collect();
        let any = terms.iter().map(|(q, _)| format!("({q})")).collect::<Vec<_>>().join(" | ");
        let queries: Vec<String> = terms.into_iter().map(|(q, _)| q).collect();
        let (collections, restricted, pairs) = filter_params(query);
        let sql = format!(
            "SELECT c.chunk_id, (SELECT sum(x.w * ts_rank('{RANK_WEIGHTS}', c.tsv, x.q, 1)) FROM unnest($6::text[]::tsquery[], $7::float4[]) AS x(q, w))::float4 AS score
             FROM search.chunks c
             WHERE c.generation = (SELECT live FROM search.meta) AND c.tsv @@ $2::tsquery AND {FILTER}
             ORDER BY score DESC, c.chunk_id LIMIT $1"
        );
        let rows: Vec<(String, f32)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(depth as i64)
            .bind(any)
            .bind(collections)
            .bind(restricted)
            .bind(pairs)
            .bind(queries)
            .bind(weights)
            .fetch_all(&mut **tx)
            .await?;
        Ok(rows)
    }

    /// The vector list: chunk ids and cosine similarities, nearest first.
    async fn vector_list(tx: &mut Transaction<'static, Postgres>, query: &Query, vector: &[f32], depth: usize) -> Result<Vec<(String, f32)>, IndexError> {
        let dimension = vector.len();
        // pgvector's iterative scan goes on through the graph until `depth` rows pass the
        // permission filter (in order), instead of filtering a fixed candidate list down.
        // The candidate list is four times the depth: at 50, the vector list of `echod
        // bench quality` found 62 of 79 answers in its first ten; at 200, 65 (as exact
        // search does).
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET LOCAL hnsw.ef_search = {}; SET LOCAL hnsw.iterative_scan = strict_order", (4 * depth).clamp(100, 1000))))
            .execute(&mut **tx)
            .await?;
        let (collections, restricted, pairs) = filter_params(query);
        let sql = format!(
            "SELECT c.chunk_id, (1 - (c.embedding::vector({dimension}) <=> $2::vector({dimension})))::float4 AS similarity
             FROM search.chunks c
             WHERE c.generation = (SELECT live FROM search.meta) AND vector_dims(c.embedding) = {dimension} AND {FILTER}
             ORDER BY c.embedding::vector({dimension}) <=> $2::vector({dimension}), c.chunk_id LIMIT $1"
        );
        let rows: Vec<(String, f32)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(depth as i64)
            .bind(vector_text(vector))
            .bind(collections)
            .bind(restricted)
            .bind(pairs)
            .fetch_all(&mut **tx)
            .await?;
        Ok(rows)
    }
}

#[async_trait]
impl ChunkStore for PgChunkStore {
    async fn state(&self) -> Result<IndexState, IndexError> {
        let (version, model, dimension, vectors): (i64, Option<String>, Option<i32>, i64) =
            sqlx::query_as("SELECT m.version, g.model, g.dimension, g.vectors FROM search.meta m JOIN search.generations g ON g.generation = m.live")
                .fetch_one(&self.pool)
                .await?;
        Ok(IndexState {
            version: u64::try_from(version).unwrap_or(0),
            recorded: model.map(|name| ModelId { name, dimension: dimension.and_then(|d| usize::try_from(d).ok()).unwrap_or(0) }),
            vectors: u64::try_from(vectors).unwrap_or(0),
        })
    }

    async fn search(&self, query: Query) -> Result<Vec<SearchHit>, IndexError> {
        let k = query.k;
        if query.collections.is_empty() || k == 0 {
            return Ok(vec![]);
        }
        let vector = query.vector.as_deref().filter(|_| query.mode != SearchMode::Bm25);
        let depth = if vector.is_some() || query.per_page > 0 { query.fusion.candidates.max(k) } else { (2 * k).min(query.fusion.candidates.max(k)) };
        // One snapshot for every statement: a generation switched meanwhile is not seen
        // half-way.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let text_list = match query.mode {
            SearchMode::Vector => vec![],
            _ => Self::text_list(&mut tx, &query, depth).await?,
        };
        let vector_list = match vector {
            Some(vector) => Self::vector_list(&mut tx, &query, vector, depth).await?,
            None => vec![],
        };
        // (chunk id) → fused score, cosine similarity.
        let mut fused: HashMap<String, (f32, Option<f32>)> = HashMap::new();
        let bm25_matches = text_list.len();
        for (rank, (chunk_id, score)) in text_list.into_iter().enumerate() {
            fused.entry(chunk_id).or_insert((0.0, None)).0 += query.fusion.bm25_contribution(vector.is_some(), rank, score);
        }
        let specific = bm25_matches > 0 && bm25_matches < depth;
        for (rank, (chunk_id, similarity)) in vector_list.into_iter().enumerate() {
            let entry = fused.entry(chunk_id).or_insert((0.0, None));
            entry.0 += query.fusion.vector_contribution(query.mode, specific, rank, similarity);
            entry.1 = Some(similarity);
        }
        let mut ranked: Vec<(String, f32, Option<f32>)> = fused.into_iter().map(|(id, (score, similarity))| (id, score, similarity)).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        // Snippets mark the query's words as the embedded index's analyzer finds them.
        let stems: BTreeMap<String, f32> = {
            let mut analyzer = crate::stem::en_stem();
            let words = query_words(&query.text).join(" ");
            let mut stream = analyzer.token_stream(&words);
            let mut stems = BTreeMap::new();
            while stream.advance() {
                stems.insert(stream.token().text.clone(), 1.0);
            }
            stems
        };
        let snippets = (!stems.is_empty()).then(|| {
            let mut generator = tantivy::snippet::SnippetGenerator::new(stems, crate::stem::en_stem(), tantivy::schema::Field::from_field_id(0), 240);
            generator.set_max_num_chars(240);
            generator
        });
        let mut admission = Admission::new(query.per_page);
        let mut hits = Vec::with_capacity(k);
        // Rows are read in rank order, a batch at a time, until `k` hits are made.
        for batch in ranked.chunks((2 * k).max(20)) {
            if hits.len() >= k {
                break;
            }
            let ids: Vec<String> = batch.iter().map(|(id, _, _)| id.clone()).collect();
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT chunk_id, document_id, collection_id, classification, page, section, title, text FROM search.chunks
                 WHERE generation = (SELECT live FROM search.meta) AND chunk_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            let mut rows: HashMap<String, Row> = rows.into_iter().map(|row| (row.0.clone(), row)).collect();
            for (chunk_id, score, similarity) in batch {
                if hits.len() >= k {
                    break;
                }
                let Some(row) = rows.remove(chunk_id) else { continue };
                // Defence in depth: the filter is in both rankings, and every hit is re-checked.
                if !allowed(&query, &row.2, &row.3) || !admission.admit(&row.7, &row.1, row.4.and_then(|p| u64::try_from(p).ok())) {
                    continue;
                }
                let mut hit = hit_of(row, *score);
                hit.snippet = snippets.as_ref().map(|generator| snippet_of(generator, &hit.text));
                hit.similarity = *similarity;
                hits.push(hit);
            }
        }
        tx.commit().await?;
        Ok(hits)
    }

    async fn replace_document(&self, document_id: &str, chunks: Vec<Chunk>, model: Option<ModelId>, rebuild: bool) -> Result<(), IndexError> {
        // Vectors checked and put in pgvector's text form before anything is written.
        let mut dimension = None;
        let mut vectors = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            match &chunk.embedding {
                Some(encoded) => {
                    let vector = common::wire::decode_vector(encoded).filter(|v| !v.is_empty()).ok_or(IndexError::BadEmbedding(0))?;
                    if *dimension.get_or_insert(vector.len()) != vector.len() {
                        return Err(IndexError::BadEmbedding(dimension.unwrap_or(0)));
                    }
                    vectors.push(Some(vector_text(&vector)));
                }
                None => vectors.push(None),
            }
        }
        if let Some(dimension) = dimension {
            self.ensure_vector_index(dimension).await?;
        }
        let model = model.map(|model| ModelId { dimension: if model.dimension == 0 { dimension.unwrap_or(0) } else { model.dimension }, ..model });
        let mut tx = self.pool.begin().await?;
        // Writes, the switch of generations and the version go one at a time.
        let (live, next): (i32, Option<i32>) = sqlx::query_as("SELECT live, next FROM search.meta WHERE id = 1 FOR UPDATE").fetch_one(&mut *tx).await?;
        if rebuild {
            let next = next.ok_or(IndexError::NoRebuild)?;
            Self::write(&mut tx, next, document_id, &chunks, &vectors, model.as_ref(), true).await?;
        } else {
            Self::write(&mut tx, live, document_id, &chunks, &vectors, model.as_ref(), false).await?;
            if let Some(next) = next {
                Self::write(&mut tx, next, document_id, &chunks, &vectors, model.as_ref(), true).await?;
            }
        }
        sqlx::query("UPDATE search.meta SET version = version + 1 WHERE id = 1").execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_document(&self, document_id: &str) -> Result<(), IndexError> {
        self.replace_document(document_id, vec![], None, false).await
    }

    async fn chunks_of(&self, document_id: &str) -> Result<usize, IndexError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM search.chunks WHERE generation = (SELECT live FROM search.meta) AND document_id = $1")
            .bind(document_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn preview(&self, document_id: &str, limit: usize) -> Result<(usize, Vec<SearchHit>), IndexError> {
        let total = self.chunks_of(document_id).await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT chunk_id, document_id, collection_id, classification, page, section, title, text FROM search.chunks
             WHERE generation = (SELECT live FROM search.meta) AND document_id = $1 ORDER BY ordinal LIMIT $2",
        )
        .bind(document_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok((total, rows.into_iter().map(|row| hit_of(row, 0.0)).collect()))
    }

    async fn begin_rebuild(&self) -> Result<RebuildStatus, IndexError> {
        let mut tx = self.pool.begin().await?;
        let next: Option<i32> = sqlx::query_scalar("SELECT next FROM search.meta WHERE id = 1 FOR UPDATE").fetch_one(&mut *tx).await?;
        if next.is_none() {
            let newest: i32 = sqlx::query_scalar("SELECT coalesce(max(generation), 0) FROM search.generations").fetch_one(&mut *tx).await?;
            let generation = newest + 1;
            sqlx::query("DELETE FROM search.chunks WHERE generation = $1").bind(generation).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO search.generations (generation) VALUES ($1)").bind(generation).execute(&mut *tx).await?;
            sqlx::query("UPDATE search.meta SET next = $1 WHERE id = 1").bind(generation).execute(&mut *tx).await?;
            tracing::info!(generation = %format!("gen-{generation}"), "index rebuild started");
        }
        let status = Self::status_in(&mut tx).await?;
        tx.commit().await?;
        Ok(status)
    }

    async fn finish_rebuild(&self) -> Result<RebuildStatus, IndexError> {
        let mut tx = self.pool.begin().await?;
        let (live, next): (i32, Option<i32>) = sqlx::query_as("SELECT live, next FROM search.meta WHERE id = 1 FOR UPDATE").fetch_one(&mut *tx).await?;
        let next = next.ok_or(IndexError::NoRebuild)?;
        sqlx::query("UPDATE search.meta SET live = $1, next = NULL, version = version + 1 WHERE id = 1").bind(next).execute(&mut *tx).await?;
        let status = Self::status_in(&mut tx).await?;
        tx.commit().await?;
        tracing::info!(generation = %format!("gen-{next}"), "the rebuilt index is live");
        // Searches that began before the switch read their own snapshot.
        self.drop_generation(live).await?;
        Ok(status)
    }

    async fn abandon_rebuild(&self) -> Result<RebuildStatus, IndexError> {
        let mut tx = self.pool.begin().await?;
        let next: Option<i32> = sqlx::query_scalar("SELECT next FROM search.meta WHERE id = 1 FOR UPDATE").fetch_one(&mut *tx).await?;
        sqlx::query("UPDATE search.meta SET next = NULL WHERE id = 1").execute(&mut *tx).await?;
        let status = Self::status_in(&mut tx).await?;
        tx.commit().await?;
        if let Some(next) = next {
            tracing::info!(generation = %format!("gen-{next}"), "index rebuild abandoned");
            self.drop_generation(next).await?;
        }
        Ok(status)
    }

    async fn rebuild_status(&self) -> Result<RebuildStatus, IndexError> {
        let mut tx = self.pool.begin().await?;
        let status = Self::status_in(&mut tx).await?;
        tx.commit().await?;
        Ok(status)
    }

    fn describe(&self) -> String {
        "PostgreSQL full-text search and pgvector (search.url)".into()
    }
}
