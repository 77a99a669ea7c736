//! The storage service over HTTP, started by its real `run` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::{BlobInfo, Principal};
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_stream_in_with_their_hash_and_out_with_ranges() {
    let echo = TestEcho::start().await;
    let peers = echo.peers_as(ServiceName::Gateway);
    let owner = Principal { sub: "u1".into(), username: "u1".into(), org: "acme".into(), roles: vec![] };
    let bytes = b"0123456789abcdef".repeat(1000);
    let request = peers.request(ServiceName::Storage, reqwest::Method::PUT, "/v1/blobs", Some(&owner)).await.unwrap().body(bytes.clone());
    let blob: BlobInfo = peers.send(ServiceName::Storage, request).await.unwrap().json().await.unwrap();
    assert_eq!(blob.size, bytes.len() as u64);
    assert_eq!(blob.sha256, common::rand::sha256_hex(&bytes));

    let path = format!("/v1/blobs/{}", blob.blob_id);
    let request = peers.request(ServiceName::Storage, reqwest::Method::GET, &path, None).await.unwrap().header("range", "bytes=10-19");
    let partial = peers.send(ServiceName::Storage, request).await.unwrap();
    assert_eq!(partial.status(), 206);
    assert_eq!(partial.bytes().await.unwrap().as_ref(), &bytes[10..20]);

    peers.delete(ServiceName::Storage, &path, None).await.unwrap();
    let request = peers.request(ServiceName::Storage, reqwest::Method::GET, &path, None).await.unwrap();
    assert_eq!(peers.send(ServiceName::Storage, request).await.unwrap_err().code, "storage.blob_not_found");
    echo.stop().await;
}
