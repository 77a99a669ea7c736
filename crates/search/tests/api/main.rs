//! The search service over HTTP, started by its real `run` (with authz beside it) on
//! free ports: searches see only what authz says the acting user may read, and a
//! change of access reaches search's cache of those answers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use common::ServiceName;
use common::wire::{Chunk, Collection, IndexRequest, Principal, ReadableCollections, SearchQuery, SearchResults};
use echod::testing::TestEcho;

fn principal(sub: &str, org: &str) -> Principal {
    Principal { sub: sub.into(), username: sub.into(), org: org.into(), roles: vec!["member".into()] }
}

fn chunk(doc: &str, collection: &str, text: &str) -> Chunk {
    Chunk {
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
    }
}

fn query(text: &str, collections: Option<Vec<String>>) -> SearchQuery {
    SearchQuery { query: text.into(), k: 10, collections, mode: None, full_text: true }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_see_only_what_authz_allows_and_follow_changes_of_access() {
    let echo = TestEcho::start().await;
    let peers = echo.peers_as(ServiceName::Gateway);
    let mut people = Vec::new();
    for (name, org) in [("ann", "acme"), ("bob", "acme"), ("eve", "other")] {
        let user = identity::add_user(&echo.config, name, "a-long-password-1", org, "member", None).await.unwrap();
        people.push(principal(&user.id, org));
    }
    let (ann, bob, eve) = (people[0].clone(), people[1].clone(), people[2].clone());
    let readable: ReadableCollections = peers.post_json(ServiceName::Authz, "/v1/readable", Some(&ann), &serde_json::json!({})).await.unwrap();
    let personal = readable.collections[0].clone();
    let shared: Collection = peers.post_json(ServiceName::Authz, "/v1/collections", Some(&ann), &serde_json::json!({"name": "Plans"})).await.unwrap();
    let indexer = echo.peers_as(ServiceName::Ingest);
    for (doc, collection, text) in [("d1", personal.as_str(), "quarterly revenue grew"), ("d2", shared.id.as_str(), "quarterly revenue plans"), ("d3", "c-nobody", "quarterly revenue secrets")] {
        let request = IndexRequest { document_id: doc.into(), chunks: vec![chunk(doc, collection, text)] };
        let _: serde_json::Value = indexer.post_json(ServiceName::Search, "/v1/index", None, &request).await.unwrap();
    }
    let search = |who: &Principal, collections: Option<Vec<String>>| {
        let (peers, who) = (peers.clone(), who.clone());
        async move {
            let results: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", Some(&who), &query("quarterly revenue", collections)).await.unwrap();
            let mut docs: Vec<String> = results.hits.into_iter().map(|h| h.document_id).collect();
            docs.sort();
            docs
        }
    };
    assert_eq!(search(&ann, None).await, ["d1", "d2"], "her own collections, never one she has no access to");
    assert_eq!(search(&ann, Some(vec!["c-nobody".into()])).await, Vec::<String>::new(), "naming a collection does not widen access");
    assert_eq!(search(&ann, Some(vec![shared.id.clone()])).await, ["d2"], "naming one narrows to it");
    assert!(search(&bob, None).await.is_empty());
    assert!(search(&eve, None).await.is_empty());

    // Shared with bob, then not: each change reaches the cached answers at once.
    let share = |members: serde_json::Value| {
        let (peers, ann, id) = (peers.clone(), ann.clone(), shared.id.clone());
        async move {
            let _: Collection = peers.put_json(ServiceName::Authz, &format!("/v1/collections/{id}/members"), Some(&ann), &serde_json::json!({ "members": members })).await.unwrap();
        }
    };
    share(serde_json::json!([{"user": bob.sub, "role": "viewer"}])).await;
    let started = Instant::now();
    while search(&bob, None).await != ["d2"] {
        assert!(started.elapsed() < Duration::from_secs(1), "a new share reaches search within a second");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    share(serde_json::json!([])).await;
    let started = Instant::now();
    while !search(&bob, None).await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(1), "an unshare reaches search within a second");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Without an acting user there is no search at all.
    let anonymous = peers.post_json::<_, SearchResults>(ServiceName::Search, "/v1/search", None, &query("quarterly", None)).await;
    assert!(anonymous.is_err(), "search needs the user it acts for");

    indexer.delete(ServiceName::Search, "/v1/documents/d1", None).await.unwrap();
    assert_eq!(search(&ann, None).await, ["d2"]);
    let held: serde_json::Value = indexer.get_json(ServiceName::Search, "/v1/documents/d1", None).await.unwrap();
    assert_eq!(held["chunks"], 0);
    echo.stop().await;
}
