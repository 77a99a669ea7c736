//! The search service over HTTP, started by its real `run` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::{Chunk, IndexRequest, SearchQuery, SearchResults};
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_chunks_are_found_only_within_the_given_collections() {
    let echo = TestEcho::start().await;
    let peers = echo.peers_as(ServiceName::Ingest);
    let chunk = |doc: &str, collection: &str, text: &str| Chunk {
        chunk_id: format!("{doc}-0"),
        document_id: doc.into(),
        collection_id: collection.into(),
        ordinal: 0,
        text: text.into(),
        page: None,
        section: None,
        char_start: 0,
        char_end: text.len() as u64,
        classification: "internal".into(),
        title: None,
        embedding: None,
    };
    for (doc, collection, text) in [("d1", "c1", "quarterly revenue grew"), ("d2", "c2", "quarterly revenue secrets")] {
        let request = IndexRequest { document_id: doc.into(), chunks: vec![chunk(doc, collection, text)] };
        let _: serde_json::Value = peers.post_json(ServiceName::Search, "/v1/index", None, &request).await.unwrap();
    }
    let query = |collections: Vec<String>| SearchQuery { query: "quarterly revenue".into(), k: 10, collections, restricted: Default::default(), mode: None };
    let results: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", None, &query(vec!["c1".into()])).await.unwrap();
    assert_eq!(results.hits.len(), 1);
    assert_eq!(results.hits[0].document_id, "d1");
    let none: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", None, &query(vec![])).await.unwrap();
    assert!(none.hits.is_empty());
    peers.delete(ServiceName::Search, "/v1/documents/d1", None).await.unwrap();
    let gone: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", None, &query(vec!["c1".into()])).await.unwrap();
    assert!(gone.hits.is_empty());
    echo.stop().await;
}
