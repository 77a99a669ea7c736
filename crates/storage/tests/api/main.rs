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

/// The scale path: the bytes in an S3 bucket (a real S3-protocol server) and the ledger in
/// PostgreSQL; the same answers as the embedded default, nothing on local disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_and_postgres_blobs_live_in_the_bucket_and_the_ledger_in_postgresql() {
    let Some(s3) = echod::testing::ScratchS3::start().await else { return };
    let Some(postgres) = echod::testing::ScratchServer::postgres().await else { return };
    let storage = s3.config();
    let ledger_url = postgres.url.clone();
    let echo = TestEcho::start_with(|config| {
        config.storage = common::config::StorageConfig { database_url: common::config::Secret(ledger_url), quota_bytes_per_user: 1 << 20, ..storage };
    })
    .await;
    let peers = echo.peers_as(ServiceName::Gateway);
    let owner = Principal { sub: "u1".into(), username: "u1".into(), org: "acme".into(), roles: vec![] };
    let bytes = b"scale path ".repeat(5000);
    let request = peers.request(ServiceName::Storage, reqwest::Method::PUT, "/v1/blobs", Some(&owner)).await.unwrap().body(bytes.clone());
    let blob: BlobInfo = peers.send(ServiceName::Storage, request).await.unwrap().json().await.unwrap();
    assert_eq!(blob.sha256, common::rand::sha256_hex(&bytes));
    assert_eq!(s3.keys().await, vec![format!("{}/{}", &blob.blob_id[..2], blob.blob_id)], "the bytes are in the bucket");
    assert!(!echo.config.data_dir.join("blobs").join(&blob.blob_id[..2]).exists(), "and not on local disk");
    let rows: i64 = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&postgres.url).await.unwrap();
        sqlx::query_scalar("SELECT COUNT(*) FROM storage.blobs").fetch_one(&mut conn).await.unwrap()
    };
    assert_eq!(rows, 1, "the ledger is in PostgreSQL");

    let path = format!("/v1/blobs/{}", blob.blob_id);
    let request = peers.request(ServiceName::Storage, reqwest::Method::GET, &path, None).await.unwrap().header("range", "bytes=-6");
    let tail = peers.send(ServiceName::Storage, request).await.unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.headers()["content-range"], format!("bytes {}-{}/{}", bytes.len() - 6, bytes.len() - 1, bytes.len()).as_str());
    assert_eq!(tail.bytes().await.unwrap().as_ref(), b" path ");

    // The quota holds across the shared ledger: 1 MiB, 55 KB used.
    let request = peers.request(ServiceName::Storage, reqwest::Method::PUT, "/v1/blobs", Some(&owner)).await.unwrap().body(vec![0u8; 1_000_000]);
    assert_eq!(peers.send(ServiceName::Storage, request).await.unwrap_err().code, "storage.quota_exceeded");
    assert_eq!(s3.keys().await.len(), 1, "the refused upload left nothing in the bucket");
    assert_eq!(s3.open_multipart_uploads().await, 0);

    peers.delete(ServiceName::Storage, &path, None).await.unwrap();
    assert!(s3.keys().await.is_empty());
    echo.stop().await;
    postgres.cleanup().await;
}
