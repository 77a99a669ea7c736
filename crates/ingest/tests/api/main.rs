//! The ingest service over HTTP, started by its real `run` on a free port: a document
//! registered with a stored blob goes through the worker to `done`; with embeddings on,
//! it is searchable by its words while it is embedded, and a job that fails leaves
//! nothing in the index.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use common::ServiceName;
use common::wire::{BlobInfo, CreatedDocument, Job, NewDocument, Principal};
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_document_is_parsed_chunked_and_indexed() {
    parsed_chunked_and_indexed(TestEcho::start().await).await;
}

/// The same with the catalog, jobs and outbox in PostgreSQL (`ingest.database_url`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_database_url_the_catalog_lives_in_postgresql() {
    let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
    let url = server.url.clone();
    parsed_chunked_and_indexed(TestEcho::start_with(|config| config.ingest.database_url = common::config::Secret(url)).await).await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&server.url).await.unwrap();
    let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ingest.documents WHERE status = 'done'").fetch_one(&mut conn).await.unwrap();
    assert_eq!(done, 1);
    let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ingest.outbox").fetch_one(&mut conn).await.unwrap();
    assert_eq!(pending, 0, "the relay published the outbox");
    drop(conn);
    server.cleanup().await;
}

async fn parsed_chunked_and_indexed(echo: TestEcho) {
    let peers = echo.peers_as(ServiceName::Gateway);
    let owner = Principal { sub: "u1".into(), username: "u1".into(), org: "acme".into(), roles: vec![] };
    let bytes = b"Hello ingest. The answer is forty-two.".to_vec();
    let request = peers.request(ServiceName::Storage, reqwest::Method::PUT, "/v1/blobs", Some(&owner)).await.unwrap().body(bytes.clone());
    let blob: BlobInfo = peers.send(ServiceName::Storage, request).await.unwrap().json().await.unwrap();
    let new = NewDocument {
        collection_id: "c1".into(),
        owner: "u1".into(),
        filename: "../../a.txt".into(),
        content_type: "text/plain".into(),
        size: blob.size,
        sha256: blob.sha256.clone(),
        blob_id: blob.blob_id.clone(),
        classification: "confidential".into(),
    };
    let refused = peers.post_json::<_, CreatedDocument>(ServiceName::Ingest, "/v1/documents", Some(&owner), &NewDocument { classification: "secret".into(), ..new.clone() }).await;
    assert_eq!(refused.unwrap_err().code, "document.invalid_classification");
    let created: CreatedDocument = peers.post_json(ServiceName::Ingest, "/v1/documents", Some(&owner), &new).await.unwrap();
    assert_eq!(created.status, "queued");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let job = loop {
        let job: Job = peers.get_json(ServiceName::Ingest, &format!("/v1/jobs/{}", created.job_id), None).await.unwrap();
        if job.status == "done" || tokio::time::Instant::now() > deadline {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job.status, "done", "{job:?}");
    assert_eq!(job.attempts, 1);
    let document: common::wire::Document = peers.get_json(ServiceName::Ingest, &format!("/v1/documents/{}", created.id), None).await.unwrap();
    assert_eq!(document.filename, "a.txt", "paths are stripped from filenames");
    let again: CreatedDocument = peers.post_json(ServiceName::Ingest, "/v1/documents", Some(&owner), &new).await.unwrap();
    assert_eq!(again.duplicate_of.as_deref(), Some(created.id.as_str()));
    echo.stop().await;
}

/// Stores `text` and registers it as a document of collection `c1` owned by `u1`.
async fn register(echo: &TestEcho, text: &str) -> CreatedDocument {
    let peers = echo.peers_as(ServiceName::Gateway);
    let owner = Principal { sub: "u1".into(), username: "u1".into(), org: "acme".into(), roles: vec![] };
    let request = peers.request(ServiceName::Storage, reqwest::Method::PUT, "/v1/blobs", Some(&owner)).await.unwrap().body(text.as_bytes().to_vec());
    let blob: BlobInfo = peers.send(ServiceName::Storage, request).await.unwrap().json().await.unwrap();
    let new = NewDocument {
        collection_id: "c1".into(),
        owner: "u1".into(),
        filename: "pump.txt".into(),
        content_type: "text/plain".into(),
        size: blob.size,
        sha256: blob.sha256.clone(),
        blob_id: blob.blob_id.clone(),
        classification: "internal".into(),
    };
    peers.post_json(ServiceName::Ingest, "/v1/documents", Some(&owner), &new).await.unwrap()
}

/// The job once its status is `wanted` (or whatever it is after 30 s).
async fn job_when(echo: &TestEcho, job_id: &str, wanted: &str) -> Job {
    let peers = echo.peers_as(ServiceName::Gateway);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job: Job = peers.get_json(ServiceName::Ingest, &format!("/v1/jobs/{job_id}"), None).await.unwrap();
        if job.status == wanted || tokio::time::Instant::now() > deadline {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many chunks of the document the search index holds.
async fn chunks_in_index(echo: &TestEcho, document_id: &str) -> u64 {
    let held: serde_json::Value = echo.peers_as(ServiceName::Ingest).get_json(ServiceName::Search, &format!("/v1/documents/{document_id}"), None).await.unwrap();
    held["chunks"].as_u64().unwrap()
}

/// An OpenAI-compatible `/v1/embeddings` on a real socket that answers a call only once
/// `gate` gives it a permit, or refuses every call (`/broken`).
async fn embedder(gate: Arc<tokio::sync::Semaphore>) -> String {
    use axum::Json;
    use axum::routing::post;
    let embeddings = move |Json(body): Json<serde_json::Value>| {
        let gate = gate.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            let data: Vec<serde_json::Value> =
                body["input"].as_array().unwrap().iter().enumerate().map(|(index, _)| serde_json::json!({"index": index, "embedding": [1.0, 0.5, 0.25, 0.125]})).collect();
            Json(serde_json::json!({"data": data}))
        }
    };
    let router = axum::Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/broken/v1/embeddings", post(|| async { axum::http::StatusCode::INTERNAL_SERVER_ERROR }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_is_searchable_by_its_words_while_it_is_embedded() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let url = embedder(gate.clone()).await;
    let echo = TestEcho::start_with(|config| {
        config.embeddings.provider = Some("openai".into());
        config.embeddings.base_url = format!("{url}/v1");
        config.embeddings.model = "m1".into();
    })
    .await;
    let created = register(&echo, "The feed pump runs at 40 bar. Its seals are checked monthly.").await;
    // The embedder holds every call: the job waits in `embedding`…
    let job = job_when(&echo, &created.job_id, "embedding").await;
    assert_eq!(job.status, "embedding", "{job:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(job_when(&echo, &created.job_id, "embedding").await.status, "embedding", "no vectors yet, so not done");
    // …while its words are in the index already.
    assert!(chunks_in_index(&echo, &created.id).await >= 1, "searchable by its words before it is embedded");
    gate.add_permits(1_000);
    let job = job_when(&echo, &created.job_id, "done").await;
    assert_eq!(job.status, "done", "{job:?}");
    assert!(chunks_in_index(&echo, &created.id).await >= 1);
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_whose_embedding_fails_is_not_left_searchable() {
    let url = embedder(Arc::new(tokio::sync::Semaphore::new(0))).await;
    let echo = TestEcho::start_with(|config| {
        config.embeddings.provider = Some("openai".into());
        config.embeddings.base_url = format!("{url}/broken/v1");
        config.embeddings.model = "m1".into();
        config.ingest.max_attempts = 1;
    })
    .await;
    let created = register(&echo, "The feed pump runs at 40 bar. Its seals are checked monthly.").await;
    let job = job_when(&echo, &created.job_id, "failed").await;
    assert_eq!(job.status, "failed", "{job:?}");
    assert_eq!(chunks_in_index(&echo, &created.id).await, 0, "a failed document's words were taken out of the index");
    echo.stop().await;
}
