//! The embedded chunk index: Tantivy BM25 with an English stemmer. Queries are built
//! from analysed terms (user text is never parsed as query syntax) and are always
//! restricted to the caller's collections inside the query, before ranking.
//! Blocking calls: run them on `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions, Value};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use common::wire::{Chunk, SearchHit};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index error: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("index directory: {0}")]
    Directory(String),
    #[error("index writer lock poisoned")]
    Poisoned,
}

struct Fields {
    chunk_id: Field,
    document_id: Field,
    collection_id: Field,
    text: Field,
    page: Field,
    section: Field,
    ordinal: Field,
}

pub struct ChunkIndex {
    index: Index,
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    fields: Fields,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let text_options = TextOptions::default()
        .set_indexing_options(TextFieldIndexing::default().set_tokenizer("en_stem").set_index_option(IndexRecordOption::WithFreqsAndPositions))
        .set_stored();
    let fields = Fields {
        chunk_id: builder.add_text_field("chunk_id", STRING | STORED),
        document_id: builder.add_text_field("document_id", STRING | STORED),
        collection_id: builder.add_text_field("collection_id", STRING | STORED),
        text: builder.add_text_field("text", text_options),
        page: builder.add_u64_field("page", STORED),
        section: builder.add_text_field("section", TextOptions::default().set_stored()),
        ordinal: builder.add_u64_field("ordinal", STORED | INDEXED),
    };
    (builder.build(), fields)
}

impl ChunkIndex {
    pub fn open(dir: &Path, writer_memory_mb: usize) -> Result<ChunkIndex, IndexError> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::Directory(e.to_string()))?;
        let (schema, fields) = schema();
        let directory = tantivy::directory::MmapDirectory::open(dir).map_err(|e| IndexError::Directory(e.to_string()))?;
        let index = Index::open_or_create(directory, schema)?;
        let writer = index.writer(writer_memory_mb.clamp(15, 1024) * 1024 * 1024)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(ChunkIndex { index, reader, writer: Mutex::new(writer), fields })
    }

    /// Replaces every chunk of `document_id` with `chunks`, durably, and makes them searchable.
    pub fn replace_document(&self, document_id: &str, chunks: &[Chunk]) -> Result<(), IndexError> {
        let mut writer = self.writer.lock().map_err(|_| IndexError::Poisoned)?;
        writer.delete_term(Term::from_field_text(self.fields.document_id, document_id));
        for chunk in chunks {
            let mut doc = TantivyDocument::default();
            doc.add_text(self.fields.chunk_id, &chunk.chunk_id);
            doc.add_text(self.fields.document_id, document_id);
            // Two terms: the collection (found by those who may read it whatever the
            // classification) and `collection#classification` (found by those who may
            // read only some classifications there). Chunks indexed before
            // classifications existed have only the first, so partial access never finds
            // them: it fails closed.
            doc.add_text(self.fields.collection_id, &chunk.collection_id);
            doc.add_text(self.fields.collection_id, classified(&chunk.collection_id, &chunk.classification));
            doc.add_text(self.fields.text, &chunk.text);
            if let Some(page) = chunk.page {
                doc.add_u64(self.fields.page, page as u64);
            }
            if let Some(section) = &chunk.section {
                doc.add_text(self.fields.section, section);
            }
            doc.add_u64(self.fields.ordinal, chunk.ordinal as u64);
            writer.add_document(doc)?;
        }
        writer.commit()?;
        drop(writer);
        self.reader.reload()?;
        Ok(())
    }

    pub fn delete_document(&self, document_id: &str) -> Result<(), IndexError> {
        self.replace_document(document_id, &[])
    }

    fn terms(&self, text: &str) -> Result<Vec<Term>, IndexError> {
        let mut analyzer = self.index.tokenizer_for_field(self.fields.text)?;
        let mut stream = analyzer.token_stream(text);
        let mut terms = Vec::new();
        while stream.advance() {
            let term = Term::from_field_text(self.fields.text, &stream.token().text);
            if !terms.contains(&term) {
                terms.push(term);
            }
            if terms.len() >= 64 {
                break;
            }
        }
        Ok(terms)
    }

    /// BM25 top-`k` over the given collections only, and in those of `restricted` only
    /// over the classifications listed there.
    pub fn search(&self, query: &str, collections: &[String], restricted: &BTreeMap<String, Vec<String>>, k: usize) -> Result<Vec<SearchHit>, IndexError> {
        let terms = self.terms(query)?;
        if terms.is_empty() || collections.is_empty() || k == 0 {
            return Ok(vec![]);
        }
        let text_clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .into_iter()
            .map(|term| (Occur::Should, Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)) as Box<dyn Query>))
            .collect();
        let term_clause = |value: &str| {
            let term = Term::from_field_text(self.fields.collection_id, value);
            (Occur::Should, Box::new(TermQuery::new(term, IndexRecordOption::Basic)) as Box<dyn Query>)
        };
        let mut collection_clauses: Vec<(Occur, Box<dyn Query>)> = Vec::with_capacity(collections.len());
        for collection in collections {
            match restricted.get(collection) {
                None => collection_clauses.push(term_clause(collection)),
                Some(classes) => collection_clauses.extend(classes.iter().map(|class| term_clause(&classified(collection, class)))),
            }
        }
        if collection_clauses.is_empty() {
            return Ok(vec![]);
        }
        let query = BooleanQuery::new(vec![
            (Occur::Must, Box::new(BooleanQuery::new(text_clauses)) as Box<dyn Query>),
            (Occur::Must, Box::new(BooleanQuery::new(collection_clauses)) as Box<dyn Query>),
        ]);
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(k).order_by_score())?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, address) in top {
            let doc: TantivyDocument = searcher.doc(address)?;
            let text_of = |field: Field| doc.get_first(field).and_then(|v| v.as_str().map(str::to_string));
            let collection_id = text_of(self.fields.collection_id).unwrap_or_default();
            let prefix = format!("{collection_id}#");
            let classification = doc
                .get_all(self.fields.collection_id)
                .filter_map(|v| v.as_str())
                .find_map(|v| v.strip_prefix(prefix.as_str()).map(str::to_string))
                .unwrap_or_else(common::wire::default_classification);
            let hit = SearchHit {
                document_id: text_of(self.fields.document_id).unwrap_or_default(),
                chunk_id: text_of(self.fields.chunk_id).unwrap_or_default(),
                collection_id,
                score,
                text: text_of(self.fields.text).unwrap_or_default(),
                page: doc.get_first(self.fields.page).and_then(|v| v.as_u64()).map(|p| p as u32),
                section: text_of(self.fields.section),
                classification,
            };
            // Defence in depth: the filter is in the query, and every hit is re-checked.
            let allowed = collections.contains(&hit.collection_id)
                && restricted.get(&hit.collection_id).is_none_or(|classes| classes.contains(&hit.classification));
            if allowed {
                hits.push(hit);
            }
        }
        Ok(hits)
    }

    pub fn n_chunks(&self) -> u64 {
        self.reader.searcher().num_docs()
    }
}

/// The second collection term of a chunk: its collection and its classification.
fn classified(collection: &str, classification: &str) -> String {
    format!("{collection}#{classification}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
        }
    }

    #[test]
    fn partial_access_finds_only_the_listed_classifications_and_old_chunks_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        let classified = |doc: &str, class: &str| Chunk { classification: class.into(), ..chunk(doc, "c1", 0, "turbine maintenance schedule") };
        index.replace_document("d-int", &[classified("d-int", "internal")]).unwrap();
        index.replace_document("d-res", &[classified("d-res", "restricted")]).unwrap();
        let everything = index.search("turbine", &["c1".into()], &BTreeMap::new(), 10).unwrap();
        assert_eq!(everything.len(), 2, "full access sees both");
        let restricted = BTreeMap::from([("c1".to_string(), vec!["public".to_string(), "internal".to_string()])]);
        let partial = index.search("turbine", &["c1".into()], &restricted, 10).unwrap();
        assert_eq!(partial.iter().map(|h| h.document_id.as_str()).collect::<Vec<_>>(), ["d-int"]);
        assert_eq!(partial[0].classification, "internal");
        let none = BTreeMap::from([("c1".to_string(), vec![])]);
        assert!(index.search("turbine", &["c1".into()], &none, 10).unwrap().is_empty(), "no classification, nothing");
        // A term that looks like a classified collection is just text to the query.
        assert!(index.search("turbine", &["c1#restricted".into()], &BTreeMap::new(), 10).unwrap().is_empty(), "the hit is not in the listed collections");
    }

    #[test]
    fn search_ranks_stems_and_never_crosses_collections() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "The reactor cooling pumps were replaced in spring."), chunk("d1", "c1", 1, "Lunch menus.")]).unwrap();
        index.replace_document("d2", &[chunk("d2", "c2", 0, "Reactor pump secrets of another team.")]).unwrap();
        let hits = index.search("replacing reactor pump", &["c1".into()], &BTreeMap::new(), 10).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].chunk_id, "d1:0");
        assert_eq!(hits[0].page, Some(1));
        assert!(index.search("reactor", &[], &BTreeMap::new(), 10).unwrap().is_empty(), "no collections, no hits");
        let both = index.search("reactor", &["c1".into(), "c2".into()], &BTreeMap::new(), 10).unwrap();
        assert_eq!(both.len(), 2);
    }

    #[test]
    fn query_syntax_is_just_text() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "collection_id c2 title")]).unwrap();
        let hits = index.search("collection_id:c2 OR (title", &["c1".into()], &BTreeMap::new(), 10).unwrap();
        assert_eq!(hits.len(), 1, "operators and fields in user text are plain words");
    }

    #[test]
    fn replacing_and_deleting_a_document_removes_its_old_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let index = ChunkIndex::open(dir.path(), 15).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "alpha")]).unwrap();
        index.replace_document("d1", &[chunk("d1", "c1", 0, "beta")]).unwrap();
        assert!(index.search("alpha", &["c1".into()], &BTreeMap::new(), 10).unwrap().is_empty());
        assert_eq!(index.search("beta", &["c1".into()], &BTreeMap::new(), 10).unwrap().len(), 1);
        index.delete_document("d1").unwrap();
        assert_eq!(index.n_chunks(), 0);
    }
}
