//! The ingest service over HTTP, started by its real `run` on a free port: a document
//! registered with a stored blob goes through the worker to `done`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use common::ServiceName;
use common::wire::{BlobInfo, CreatedDocument, Job, NewDocument, Principal};
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_document_is_parsed_chunked_and_indexed() {
    let echo = TestEcho::start().await;
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
