//! The search service over HTTP, started by its real `run` (with authz beside it) on
//! free ports: searches see only what authz says the acting user may read, and a
//! change of access reaches search's cache of those answers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use common::ServiceName;
use common::wire::{Chunk, Collection, IndexRequest, Principal, ReadableCollections, SearchQuery, SearchResults};
use echod::testing::TestEcho;

mod engines;

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
    SearchQuery { query: text.into(), k: 10, collections, mode: None, full_text: true, rerank: None, per_page: None }
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

/// An outside service on a real socket: an OpenAI-compatible `/v1/embeddings` whose
/// vectors depend on the model asked for (`m1`: 4 dimensions, others 6), and a
/// TEI-shaped `/rerank` that puts passages with "winner" first (or fails, `broken`).
async fn outside_services() -> String {
    use axum::Json;
    use axum::routing::post;
    async fn embeddings(Json(body): Json<serde_json::Value>) -> Json<serde_json::Value> {
        let dimension = if body["model"] == "m1" { 4 } else { 6 };
        let data: Vec<serde_json::Value> = body["input"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let text = text.as_str().unwrap();
                let vector: Vec<f32> = (0..dimension).map(|d| text.bytes().map(|b| ((b as usize * (d + 3)) % 17) as f32).sum::<f32>() + 1.0).collect();
                serde_json::json!({"index": index, "embedding": vector})
            })
            .collect();
        Json(serde_json::json!({"data": data}))
    }
    async fn rerank(Json(body): Json<serde_json::Value>) -> Json<serde_json::Value> {
        let scored: Vec<serde_json::Value> = body["texts"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(index, text)| serde_json::json!({"index": index, "score": if text.as_str().unwrap().contains("winner") { 0.9 } else { 0.1 }}))
            .collect();
        Json(serde_json::Value::Array(scored))
    }
    async fn broken() -> axum::http::StatusCode {
        axum::http::StatusCode::INTERNAL_SERVER_ERROR
    }
    let router = axum::Router::new().route("/v1/embeddings", post(embeddings)).route("/rerank", post(rerank)).route("/broken/rerank", post(broken));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

async fn index_texts(echo: &TestEcho, collection: &str, docs: &[(&str, &str)]) {
    let indexer = echo.peers_as(ServiceName::Ingest);
    for (doc, text) in docs {
        // With embeddings off (no provider) the chunks go in without vectors.
        let embedded = indexer.post_json::<_, common::wire::EmbedResponse>(ServiceName::Search, "/v1/embed", None, &common::wire::EmbedRequest { texts: vec![text.to_string()] }).await;
        let embedding = match embedded {
            Ok(embedded) => embedded.vectors.into_iter().next(),
            Err(error) => {
                assert_eq!(error.code, "search.embeddings_off");
                None
            }
        };
        let chunk = Chunk { embedding, ..chunk(doc, collection, text) };
        let _: serde_json::Value = indexer.post_json(ServiceName::Search, "/v1/index", None, &IndexRequest { document_id: doc.to_string(), chunks: vec![chunk] }).await.unwrap();
    }
}

async fn someone(echo: &TestEcho, name: &str) -> (Principal, String) {
    let user = identity::add_user(&echo.config, name, "a-long-password-1", "acme", "member", None).await.unwrap();
    let who = principal(&user.id, "acme");
    let readable: ReadableCollections = echo.peers_as(ServiceName::Gateway).post_json(ServiceName::Authz, "/v1/readable", Some(&who), &serde_json::json!({})).await.unwrap();
    (who, readable.collections[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reranker_reorders_the_hits_and_one_that_fails_leaves_the_fused_order() {
    let outside = outside_services().await;
    for (rerank_url, reordered) in [(outside.clone(), true), (format!("{outside}/broken"), false)] {
        let echo = TestEcho::start_with(|config| config.search.rerank_url = rerank_url.clone()).await;
        let (ann, personal) = someone(&echo, "ann").await;
        index_texts(&echo, &personal, &[("d1", "pump pump pump maintenance plan"), ("d2", "pump notes of the winner team")]).await;
        let peers = echo.peers_as(ServiceName::Gateway);
        let ask = |rerank: Option<bool>| {
            let (peers, ann) = (peers.clone(), ann.clone());
            async move {
                let query = SearchQuery { rerank, ..query("pump", None) };
                let results: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", Some(&ann), &query).await.unwrap();
                results.hits.into_iter().map(|h| h.document_id).collect::<Vec<_>>()
            }
        };
        assert_eq!(ask(Some(false)).await, ["d1", "d2"], "BM25 alone prefers the repeated word");
        let expected = if reordered { ["d2", "d1"] } else { ["d1", "d2"] };
        assert_eq!(ask(None).await, expected, "reranked by {rerank_url}");
        echo.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_compact_unless_the_full_text_is_asked_for() {
    let echo = TestEcho::start().await;
    let (ann, personal) = someone(&echo, "ann").await;
    let long = format!("{} The valve code is walnut seven. {}", "Filler words about nothing. ".repeat(30), "More filler to close. ".repeat(30));
    index_texts(&echo, &personal, &[("d1", long.as_str())]).await;
    let peers = echo.peers_as(ServiceName::Gateway);
    let compact: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", Some(&ann), &SearchQuery { full_text: false, ..query("walnut valve", None) }).await.unwrap();
    let hit = &compact.hits[0];
    assert!(hit.text.contains("walnut") && hit.text.len() < long.len() / 2, "the text is the matching passage: {:?}", hit.text);
    assert!(!hit.text.contains("<mark>"), "plain text, the marks are in the snippet");
    assert!(hit.snippet.as_deref().unwrap().contains("<mark>walnut</mark>"));
    let full: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", Some(&ann), &query("walnut valve", None)).await.unwrap();
    assert_eq!(full.hits[0].text, long);
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_of_another_model_are_refused_until_the_index_is_rebuilt() {
    let outside = outside_services().await;
    let dir = tempfile::tempdir().unwrap();
    let start = |model: &'static str| {
        let mut config = common::EchoConfig::for_test(dir.path());
        config.embeddings.provider = Some("openai".into());
        config.embeddings.base_url = format!("{outside}/v1");
        config.embeddings.model = model.into();
        async move {
            let system = echod::up(config).await.unwrap();
            echod::wait_ready(&system.config, Duration::from_secs(60)).await.unwrap();
            let config = (*system.config).clone();
            (system, config)
        }
    };
    let (system, config) = start("m1").await;
    let ctx = |config: &common::EchoConfig, name| common::ServiceContext::new(std::sync::Arc::new(config.clone()), name, tokio_util::sync::CancellationToken::new()).unwrap().peers;
    let user = identity::add_user(&config, "ann", "a-long-password-1", "acme", "member", None).await.unwrap();
    let ann = principal(&user.id, "acme");
    let readable: ReadableCollections = ctx(&config, ServiceName::Gateway).post_json(ServiceName::Authz, "/v1/readable", Some(&ann), &serde_json::json!({})).await.unwrap();
    let personal = readable.collections[0].clone();
    let indexer = ctx(&config, ServiceName::Ingest);
    let embedded: common::wire::EmbedResponse =
        indexer.post_json(ServiceName::Search, "/v1/embed", None, &common::wire::EmbedRequest { texts: vec!["turbine blades".into()] }).await.unwrap();
    assert_eq!((embedded.model.as_str(), embedded.dimension), ("m1", 4));
    let chunk = Chunk { embedding: embedded.vectors.into_iter().next(), ..chunk("d1", &personal, "turbine blades") };
    let _: serde_json::Value = indexer.post_json(ServiceName::Search, "/v1/index", None, &IndexRequest { document_id: "d1".into(), chunks: vec![chunk] }).await.unwrap();
    let vector_search = SearchQuery { mode: Some(common::wire::SearchMode::Vector), ..query("turbine", None) };
    let found: SearchResults = ctx(&config, ServiceName::Gateway).post_json(ServiceName::Search, "/v1/search", Some(&ann), &vector_search).await.unwrap();
    assert_eq!(found.hits.len(), 1);
    system.stop().await;

    // Another model from the next start: vector searches are refused with the remedy,
    // hybrid ones fall back to BM25, and nothing of the old index is lost.
    let (system, config) = start("m2").await;
    let refused = ctx(&config, ServiceName::Gateway).post_json::<_, SearchResults>(ServiceName::Search, "/v1/search", Some(&ann), &vector_search).await.unwrap_err();
    assert_eq!(refused.code, "search.model_mismatch");
    assert!(refused.detail.contains("echod reindex") && refused.detail.contains("m1") && refused.detail.contains("m2"), "{}", refused.detail);
    let hybrid: SearchResults = ctx(&config, ServiceName::Gateway).post_json(ServiceName::Search, "/v1/search", Some(&ann), &query("turbine", None)).await.unwrap();
    assert_eq!(hybrid.hits.len(), 1, "BM25 still answers");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_search_is_answered_again_only_while_nothing_it_depends_on_changed() {
    let echo = TestEcho::start().await;
    let (ann, personal) = someone(&echo, "ann").await;
    let (bob, _) = someone(&echo, "bob").await;
    index_texts(&echo, &personal, &[("d1", "quarterly kelp harvest")]).await;
    let peers = echo.peers_as(ServiceName::Gateway);
    let ask = |who: &Principal| {
        let (peers, who) = (peers.clone(), who.clone());
        async move {
            let results: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", Some(&who), &query("kelp harvest", None)).await.unwrap();
            let mut docs: Vec<String> = results.hits.into_iter().map(|h| h.document_id).collect();
            docs.sort();
            docs
        }
    };
    assert_eq!(ask(&ann).await, ["d1"]);
    assert_eq!(ask(&ann).await, ["d1"], "asked again: the same answer");
    // Another person with other permissions never gets ann's answer.
    assert!(ask(&bob).await.is_empty());
    // A new document, a replaced one, a deleted one: each is seen at once.
    index_texts(&echo, &personal, &[("d2", "kelp harvest report")]).await;
    assert_eq!(ask(&ann).await, ["d1", "d2"], "a commit is a new version of the index");
    index_texts(&echo, &personal, &[("d1", "nothing about seaweed")]).await;
    assert_eq!(ask(&ann).await, ["d2"], "a replaced document");
    let _ = echo.peers_as(ServiceName::Ingest).delete(ServiceName::Search, "/v1/documents/d2", None).await;
    assert!(ask(&ann).await.is_empty(), "a deleted document");
    // Shared with bob: his permissions changed, so his key did.
    index_texts(&echo, &personal, &[("d3", "kelp harvest shared")]).await;
    let shared: Collection = peers.post_json(ServiceName::Authz, "/v1/collections", Some(&ann), &serde_json::json!({"name": "Kelp"})).await.unwrap();
    index_texts(&echo, &shared.id, &[("d4", "kelp harvest for the team")]).await;
    assert!(ask(&bob).await.is_empty());
    let _: Collection = peers
        .put_json(ServiceName::Authz, &format!("/v1/collections/{}/members", shared.id), Some(&ann), &serde_json::json!({"members": [{"user": bob.sub, "role": "viewer"}]}))
        .await
        .unwrap();
    eventually_eq(|| ask(&bob), vec!["d4".to_string()]).await;
    echo.stop().await;
}

/// Waits (up to 10 s) for `probe` to give `expected`: access changes reach search over the bus.
async fn eventually_eq<F, Fut>(probe: F, expected: Vec<String>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe().await;
        if got == expected {
            return;
        }
        assert!(Instant::now() < deadline, "still {got:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With `search.url`, chunks live in PostgreSQL (full-text search and pgvector) and a
/// second search replica answers from the same index: what one writes the other finds
/// at once, a deletion through one is gone from both, and neither serves a cached
/// answer from before a write it did not make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_replicas_on_postgresql_share_one_index() {
    let Some(server) = echod::testing::ScratchPgvector::start().await else { return };
    let outside = outside_services().await;
    let echo = TestEcho::start_with(|config| {
        config.search.url = common::config::Secret(server.url.clone());
        config.embeddings.provider = Some("openai".into());
        config.embeddings.base_url = format!("{outside}/v1");
        config.embeddings.model = "m1".into();
    })
    .await;
    // The second replica: the same configuration, its own port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut replica_config = echo.config.clone();
    replica_config.urls.insert(ServiceName::Search, format!("http://{}", listener.local_addr().unwrap()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let replica_ctx = common::ServiceContext::new(std::sync::Arc::new(replica_config.clone()), ServiceName::Search, shutdown.clone()).unwrap();
    let replica = tokio::spawn(search::run(replica_ctx, listener));
    echod::wait_ready(&replica_config, Duration::from_secs(60)).await.unwrap();
    let peers_of = |config: &common::EchoConfig, caller| common::ServiceContext::new(std::sync::Arc::new(config.clone()), caller, tokio_util::sync::CancellationToken::new()).unwrap().peers;
    let (first, second) = (peers_of(&echo.config, ServiceName::Gateway), peers_of(&replica_config, ServiceName::Gateway));

    let (ann, personal) = someone(&echo, "ann").await;
    let (bob, _) = someone(&echo, "bob").await;
    // Written through the first replica (with vectors from the outside embedder).
    index_texts(&echo, &personal, &[("d1", "quarterly kelp harvest"), ("d2", "turbine maintenance schedule")]).await;
    let ask = |peers: &common::client::Peers, who: &Principal, text: &str, mode: Option<common::wire::SearchMode>| {
        let (peers, who, text) = (peers.clone(), who.clone(), text.to_string());
        async move {
            let results: SearchResults = peers.post_json(ServiceName::Search, "/v1/search", Some(&who), &SearchQuery { mode, ..query(&text, None) }).await.unwrap();
            let mut docs: Vec<String> = results.hits.into_iter().map(|h| h.document_id).collect();
            docs.sort();
            docs
        }
    };
    for peers in [&first, &second] {
        assert_eq!(ask(peers, &ann, "kelp harvest", Some(common::wire::SearchMode::Bm25)).await, ["d1"], "both replicas find it");
        assert!(ask(peers, &bob, "kelp harvest", Some(common::wire::SearchMode::Bm25)).await.is_empty(), "never another person's");
        let vector = ask(peers, &ann, "turbine", Some(common::wire::SearchMode::Vector)).await;
        assert_eq!(vector.len(), 2, "vectors are stored and searched there: {vector:?}");
    }
    // Written through the second, seen by the first — which had the old answer cached.
    let writer = peers_of(&replica_config, ServiceName::Ingest);
    let chunk = chunk("d3", &personal, "kelp harvest report");
    let _: serde_json::Value = writer.post_json(ServiceName::Search, "/v1/index", None, &IndexRequest { document_id: "d3".into(), chunks: vec![chunk] }).await.unwrap();
    assert_eq!(ask(&first, &ann, "kelp harvest", Some(common::wire::SearchMode::Bm25)).await, ["d1", "d3"]);
    writer.delete(ServiceName::Search, "/v1/documents/d1", None).await.unwrap();
    assert_eq!(ask(&first, &ann, "kelp harvest", Some(common::wire::SearchMode::Bm25)).await, ["d3"]);
    assert_eq!(ask(&second, &ann, "kelp harvest", Some(common::wire::SearchMode::Bm25)).await, ["d3"]);
    let held: serde_json::Value = peers_of(&echo.config, ServiceName::Ingest).get_json(ServiceName::Search, "/v1/documents/d1", None).await.unwrap();
    assert_eq!(held["chunks"], 0);
    shutdown.cancel();
    let _ = replica.await;
    echo.stop().await;
    drop(server);
}
