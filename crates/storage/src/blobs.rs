//! Where the bytes live: the `BlobStore` trait, with the local filesystem (under the data
//! dir, the default) and any S3-compatible store (`storage.url: s3://BUCKET[/PREFIX]`,
//! through `object_store`). Both stream: nothing holds a whole upload in memory (S3 takes
//! a multipart upload of 8 MiB parts, two in flight; an upload smaller than one part is
//! one plain PUT). A blob is visible only once complete — a temporary file renamed into
//! place after `fsync`, or a multipart upload completed — and one refused half-way (too
//! large, the client gone) leaves nothing behind. Reads take a byte range. One
//! conformance suite (below) runs against both (S3 against a real S3-protocol server,
//! PyPI's `moto[server]`).

use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::Digest;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use common::config::StorageConfig;

/// Bytes in, as the request body streams them.
pub(crate) type BodyStream = BoxStream<'static, Result<Bytes, String>>;
/// Bytes out.
pub(crate) type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// A stored blob's size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stored {
    pub(crate) size: u64,
    pub(crate) sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PutError {
    #[error("the upload is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the upload was interrupted: {0}")]
    Body(String),
    #[error("the blob store failed: {0}")]
    Store(String),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BlobError {
    #[error("no such blob")]
    NotFound,
    #[error("the blob store failed: {0}")]
    Store(String),
}

#[async_trait]
pub(crate) trait BlobStore: Send + Sync {
    /// Streams `body` into a new blob `id`, refusing it past `limit` bytes.
    async fn put(&self, id: &str, body: BodyStream, limit: u64) -> Result<Stored, PutError>;
    /// The blob's bytes, or those of `range` (within the blob).
    async fn get(&self, id: &str, range: Option<Range<u64>>) -> Result<ByteStream, BlobError>;
    /// Removes the blob; one already gone is not an error.
    async fn delete(&self, id: &str) -> Result<(), BlobError>;
    async fn ready(&self) -> Result<(), String>;
    /// Where the bytes are, for the start-up line (no credentials).
    fn describe(&self) -> String;
}

/// The store `config` names: S3 for `s3://…`, else files under `data_dir/blobs`.
pub(crate) async fn open(config: &StorageConfig, data_dir: &FsPath) -> anyhow::Result<Arc<dyn BlobStore>> {
    match config.url.trim() {
        "" => Ok(Arc::new(LocalBlobs::open(data_dir.join("blobs")).await?)),
        url => Ok(Arc::new(S3Blobs::open(url, config)?)),
    }
}

/// Blobs are spread over 256 directories (or key prefixes) by their id's first two hex digits.
fn relative_path(id: &str) -> String {
    format!("{}/{id}", id.get(..2).unwrap_or("00"))
}

/// Files under a directory: `<root>/ab/abcd…`, uploads in flight under `<root>/tmp`.
pub(crate) struct LocalBlobs {
    root: PathBuf,
}

impl LocalBlobs {
    pub(crate) async fn open(root: PathBuf) -> anyhow::Result<LocalBlobs> {
        let tmp = root.join("tmp");
        tokio::fs::create_dir_all(&tmp).await?;
        // Leftovers of uploads cut short when the last run ended.
        if let Ok(mut entries) = tokio::fs::read_dir(&tmp).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
        Ok(LocalBlobs { root })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.root.join(relative_path(id))
    }

    async fn write(&self, tmp: &FsPath, mut body: BodyStream, limit: u64) -> Result<Stored, PutError> {
        let io = |e: std::io::Error| PutError::Store(e.to_string());
        let mut file = tokio::fs::File::create(tmp).await.map_err(io)?;
        let mut hasher = sha2::Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(PutError::Body)?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(PutError::TooLarge(limit));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        Ok(Stored { size, sha256: hex::encode(hasher.finalize()) })
    }
}

#[async_trait]
impl BlobStore for LocalBlobs {
    async fn put(&self, id: &str, body: BodyStream, limit: u64) -> Result<Stored, PutError> {
        let tmp = self.root.join("tmp").join(id);
        let stored = match self.write(&tmp, body, limit).await {
            Ok(stored) => stored,
            Err(error) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(error);
            }
        };
        let path = self.path(id);
        let placed = async {
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(error) = placed.await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(PutError::Store(error.to_string()));
        }
        Ok(stored)
    }

    async fn get(&self, id: &str, range: Option<Range<u64>>) -> Result<ByteStream, BlobError> {
        let mut file = match tokio::fs::File::open(self.path(id)).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound),
            Err(error) => return Err(BlobError::Store(error.to_string())),
        };
        use tokio::io::AsyncReadExt;
        let stream = match range {
            None => tokio_util::io::ReaderStream::new(file).boxed(),
            Some(range) => {
                file.seek(std::io::SeekFrom::Start(range.start)).await.map_err(|e| BlobError::Store(e.to_string()))?;
                tokio_util::io::ReaderStream::new(file.take(range.end.saturating_sub(range.start))).boxed()
            }
        };
        Ok(stream)
    }

    async fn delete(&self, id: &str) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path(id)).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(BlobError::Store(error.to_string())),
        }
    }

    async fn ready(&self) -> Result<(), String> {
        tokio::fs::metadata(self.root.join("tmp")).await.map(|_| ()).map_err(|e| format!("{}: {e}", self.root.display()))
    }

    fn describe(&self) -> String {
        format!("files under {}", self.root.display())
    }
}

/// The part size of multipart uploads (S3's minimum is 5 MiB).
const PART_BYTES: usize = 8 << 20;
/// Parts in flight per upload.
const PARTS_IN_FLIGHT: usize = 2;

/// Objects in an S3-compatible bucket, under an optional key prefix.
pub(crate) struct S3Blobs {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    endpoint: String,
}

impl S3Blobs {
    pub(crate) fn open(url: &str, config: &StorageConfig) -> anyhow::Result<S3Blobs> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| anyhow::anyhow!("storage.url must be s3://BUCKET[/PREFIX]"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_string();
        let endpoint = config.s3_endpoint.trim().trim_end_matches('/').to_string();
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(config.s3_region.trim())
            .with_retry(object_store::RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(30), ..Default::default() })
            .with_client_options(object_store::ClientOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(120)));
        if !config.s3_access_key_id.is_empty() {
            builder = builder.with_access_key_id(config.s3_access_key_id.expose()).with_secret_access_key(config.s3_secret_access_key.expose());
        }
        if !endpoint.is_empty() {
            // A self-hosted store (MinIO, Ceph, moto…) is addressed by path, not by a
            // bucket subdomain, and may be plain HTTP on a private network.
            builder = builder.with_endpoint(&endpoint).with_allow_http(endpoint.starts_with("http://")).with_virtual_hosted_style_request(false);
        }
        let store = builder.build().map_err(|e| anyhow::anyhow!("S3 store for {url}: {e}"))?;
        Ok(S3Blobs { store: Arc::new(store), bucket: bucket.to_string(), prefix, endpoint })
    }

    fn key(&self, id: &str) -> ObjectPath {
        let relative = relative_path(id);
        if self.prefix.is_empty() { ObjectPath::from(relative) } else { ObjectPath::from(format!("{}/{relative}", self.prefix)) }
    }
}

fn store_error(error: object_store::Error) -> PutError {
    PutError::Store(error.to_string())
}

#[async_trait]
impl BlobStore for S3Blobs {
    async fn put(&self, id: &str, mut body: BodyStream, limit: u64) -> Result<Stored, PutError> {
        let key = self.key(id);
        let mut hasher = sha2::Sha256::new();
        let mut size: u64 = 0;
        // The first part's worth is held back: an upload smaller than that is one PUT.
        let mut head: Vec<Bytes> = Vec::new();
        let mut head_bytes = 0usize;
        let mut upload: Option<WriteMultipart> = None;
        let outcome: Result<(), PutError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(PutError::Body)?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(PutError::TooLarge(limit));
                }
                hasher.update(&chunk);
                match upload.as_mut() {
                    Some(writer) => {
                        writer.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(store_error)?;
                        writer.put(chunk);
                    }
                    None => {
                        head_bytes += chunk.len();
                        head.push(chunk);
                        if head_bytes >= PART_BYTES {
                            let started = self.store.put_multipart(&key).await.map_err(store_error)?;
                            let mut writer = WriteMultipart::new_with_chunk_size(started, PART_BYTES);
                            for part in head.drain(..) {
                                writer.put(part);
                            }
                            upload = Some(writer);
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        match (outcome, upload) {
            (Ok(()), Some(writer)) => {
                writer.finish().await.map_err(store_error)?;
            }
            (Ok(()), None) => {
                self.store.put(&key, PutPayload::from_iter(head)).await.map_err(store_error)?;
            }
            (Err(error), Some(writer)) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(error = %abort, "an abandoned multipart upload was not aborted; the bucket's lifecycle rule must clean it up");
                }
                return Err(error);
            }
            (Err(error), None) => return Err(error),
        }
        Ok(Stored { size, sha256: hex::encode(hasher.finalize()) })
    }

    async fn get(&self, id: &str, range: Option<Range<u64>>) -> Result<ByteStream, BlobError> {
        if range.as_ref().is_some_and(|r| r.is_empty()) {
            return Ok(futures_util::stream::empty().boxed());
        }
        let options = GetOptions { range: range.map(GetRange::Bounded), ..Default::default() };
        let result = match self.store.get_opts(&self.key(id), options).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Err(BlobError::NotFound),
            Err(error) => return Err(BlobError::Store(error.to_string())),
        };
        Ok(result.into_stream().map(|chunk| chunk.map_err(std::io::Error::other)).boxed())
    }

    async fn delete(&self, id: &str) -> Result<(), BlobError> {
        match self.store.delete(&self.key(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(BlobError::Store(error.to_string())),
        }
    }

    async fn ready(&self) -> Result<(), String> {
        // Any answer from the bucket (this key does not exist) says it is reachable.
        match self.store.head(&ObjectPath::from(".echo-ready")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(format!("S3 bucket {}: {error}", self.bucket)),
        }
    }

    fn describe(&self) -> String {
        let at = if self.endpoint.is_empty() { String::new() } else { format!(" at {}", self.endpoint) };
        let under = if self.prefix.is_empty() { String::new() } else { format!(" under {}/", self.prefix) };
        format!("S3 bucket {}{under}{at}", self.bucket)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn body(parts: Vec<Vec<u8>>) -> BodyStream {
        futures_util::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p)))).boxed()
    }

    async fn read(store: &dyn BlobStore, id: &str, range: Option<Range<u64>>) -> Vec<u8> {
        let mut stream = store.get(id, range).await.unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    fn id() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    /// What every `BlobStore` must do.
    async fn conformance(store: &dyn BlobStore) {
        store.ready().await.unwrap();
        // Streamed in pieces, hashed on the way, read back whole and by range.
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let small = id();
        let stored = store.put(&small, body(bytes.chunks(7_000).map(<[u8]>::to_vec).collect()), 1 << 20).await.unwrap();
        assert_eq!(stored, Stored { size: bytes.len() as u64, sha256: common::rand::sha256_hex(&bytes) });
        assert_eq!(read(store, &small, None).await, bytes);
        assert_eq!(read(store, &small, Some(10..20)).await, &bytes[10..20]);
        assert_eq!(read(store, &small, Some(99_990..100_000)).await, &bytes[99_990..]);

        // Larger than a part: a multipart upload where there is one, same bytes back.
        let big: Vec<u8> = (0..(PART_BYTES + 3_000_000) as u64).map(|i| (i * 7 % 253) as u8).collect();
        let large = id();
        let stored = store.put(&large, body(big.chunks(1 << 20).map(<[u8]>::to_vec).collect()), 64 << 20).await.unwrap();
        assert_eq!(stored.size, big.len() as u64);
        assert_eq!(stored.sha256, common::rand::sha256_hex(&big));
        let tail = (big.len() - 5)..big.len();
        assert_eq!(read(store, &large, Some(tail.start as u64..tail.end as u64)).await, &big[tail]);
        assert_eq!(common::rand::sha256_hex(&read(store, &large, None).await), stored.sha256);

        // Empty blobs exist too.
        let empty = id();
        assert_eq!(store.put(&empty, body(vec![]), 10).await.unwrap().size, 0);
        assert!(read(store, &empty, None).await.is_empty());

        // Refused past the limit, before and after a part went out: nothing is left.
        let refused = id();
        assert!(matches!(store.put(&refused, body(vec![vec![1; 600], vec![2; 600]]), 1000).await, Err(PutError::TooLarge(1000))));
        assert!(matches!(store.get(&refused, None).await, Err(BlobError::NotFound)));
        let refused_late = id();
        let parts: Vec<Vec<u8>> = (0..12).map(|_| vec![3u8; 1 << 20]).collect();
        assert!(matches!(store.put(&refused_late, body(parts), 10 << 20).await, Err(PutError::TooLarge(_))));
        assert!(matches!(store.get(&refused_late, None).await, Err(BlobError::NotFound)));

        // A body that breaks off leaves nothing either.
        let cut = id();
        let broken: BodyStream = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"partial")), Err("connection reset".to_string())]).boxed();
        assert!(matches!(store.put(&cut, broken, 1000).await, Err(PutError::Body(_))));
        assert!(matches!(store.get(&cut, None).await, Err(BlobError::NotFound)));

        // Deleting is idempotent.
        store.delete(&small).await.unwrap();
        assert!(matches!(store.get(&small, None).await, Err(BlobError::NotFound)));
        store.delete(&small).await.unwrap();
        store.delete(&large).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_files_conform() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobs::open(dir.path().join("blobs")).await.unwrap();
        conformance(&store).await;
        // Nothing of the refused or broken uploads stays behind in tmp.
        assert_eq!(std::fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
    }

    /// Against a real S3-protocol server (moto; skipped with a reason when it is not
    /// installed, failed under CI).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_conforms() {
        let Some(s3) = echod::testing::ScratchS3::start().await else { return };
        let config = StorageConfig { url: format!("s3://{}/echo", s3.bucket), s3_endpoint: s3.endpoint.clone(), ..s3.config() };
        let store = S3Blobs::open(&config.url, &config).unwrap();
        conformance(&store).await;
        assert!(store.describe().contains(&s3.bucket) && !store.describe().contains("secret"));
        // No upload is left open in the bucket (the refused ones were aborted).
        assert_eq!(s3.open_multipart_uploads().await, 0);
        // An unreachable store is not ready, with a reason.
        let gone = StorageConfig { s3_endpoint: "http://127.0.0.1:9".into(), ..config.clone() };
        let unreachable = S3Blobs::open(&gone.url, &gone).unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(60), unreachable.ready()).await.unwrap().is_err());
    }
}
