//! The storage service's functions, between the handlers and the two stores: quota
//! reservations, uploads (reserve → stream into the blob store → ledger row, or nothing
//! at all), reads and deletions.

use std::ops::Range;
use std::sync::Arc;

use common::config::StorageConfig;
use common::wire::BlobInfo;
use common::{ApiError, ErrorKind};

use crate::blobs::{BlobError, BlobStore, BodyStream, ByteStream, PutError};
use crate::ledger::{BlobRow, Ledger, Reserved};

#[derive(Clone)]
pub(crate) struct Storage {
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) config: StorageConfig,
}

fn ledger_error(error: crate::ledger::StoreError) -> ApiError {
    ApiError::internal(error)
}

fn not_found() -> ApiError {
    ApiError::not_found("storage.blob_not_found", "no such blob")
}

fn valid_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok()
}

impl Storage {
    fn too_large(&self) -> ApiError {
        ApiError::new(ErrorKind::PayloadTooLarge, "storage.too_large", format!("files are limited to {} bytes", self.config.max_blob_bytes))
    }

    /// Sets aside `bytes` of `owner`'s quota; `storage.quota_exceeded` when it does not fit.
    pub(crate) async fn reserve(&self, owner: &str, bytes: u64) -> Result<String, ApiError> {
        if bytes > self.config.max_blob_bytes {
            return Err(self.too_large());
        }
        let bytes = bytes.max(1);
        let quota = self.config.quota_bytes_per_user;
        match self.ledger.reserve(owner, bytes, quota).await.map_err(ledger_error)? {
            Reserved::Held(id) => Ok(id),
            Reserved::Refused { free } => Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                "storage.quota_exceeded",
                format!("the upload needs up to {bytes} bytes but only {free} of your {quota} bytes of storage are free"),
            )),
        }
    }

    /// Streams `body` into a new blob of `owner`, within `reservation` (or within what
    /// is free of the quota). The reservation becomes the blob's row on success and is
    /// released on failure, when nothing of the upload remains.
    pub(crate) async fn upload(&self, owner: &str, reservation: Option<&str>, body: BodyStream) -> Result<BlobInfo, ApiError> {
        let (reservation, limit) = match reservation {
            Some(id) => {
                let bytes = self.ledger.reservation(id, owner).await.map_err(ledger_error)?;
                let bytes = bytes.ok_or_else(|| ApiError::bad_request("storage.unknown_reservation", "no such reservation (it expired or was used)"))?;
                (id.to_string(), bytes)
            }
            None => {
                let used = self.ledger.used(owner).await.map_err(ledger_error)?;
                let free = self.config.quota_bytes_per_user.saturating_sub(used);
                let bytes = self.config.max_blob_bytes.min(free);
                if bytes == 0 {
                    return Err(ApiError::new(ErrorKind::PayloadTooLarge, "storage.quota_exceeded", "your storage quota is used up"));
                }
                (self.reserve(owner, bytes).await?, bytes)
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        let stored = match self.blobs.put(&id, body, limit).await {
            Ok(stored) => match self.ledger.commit(&reservation, &id, owner, stored.size, &stored.sha256).await {
                Ok(()) => Ok(stored),
                Err(error) => {
                    let _ = self.blobs.delete(&id).await;
                    Err(ledger_error(error))
                }
            },
            Err(PutError::TooLarge(_)) if limit < self.config.max_blob_bytes => {
                Err(ApiError::new(ErrorKind::PayloadTooLarge, "storage.quota_exceeded", "the upload is larger than the quota it reserved"))
            }
            Err(PutError::TooLarge(_)) => Err(self.too_large()),
            Err(PutError::Body(error)) => Err(ApiError::bad_request("storage.upload_interrupted", format!("the upload was interrupted: {error}"))),
            Err(error @ PutError::Store(_)) => Err(ApiError::unavailable("storage.backend_unavailable", error.to_string())),
        };
        match stored {
            Ok(stored) => {
                metrics::counter!("echo_storage_bytes_written_total").increment(stored.size);
                Ok(BlobInfo { blob_id: id, sha256: stored.sha256, size: stored.size })
            }
            Err(error) => {
                let _ = self.ledger.release(&reservation, None).await;
                Err(error)
            }
        }
    }

    /// The ledger's row of blob `id`.
    pub(crate) async fn find(&self, id: &str) -> Result<BlobRow, ApiError> {
        if !valid_id(id) {
            return Err(not_found());
        }
        self.ledger.blob(id).await.map_err(ledger_error)?.ok_or_else(not_found)
    }

    /// The bytes of blob `id` (of `range` within it).
    pub(crate) async fn read(&self, id: &str, range: Option<Range<u64>>) -> Result<ByteStream, ApiError> {
        match self.blobs.get(id, range).await {
            Ok(stream) => Ok(stream),
            Err(BlobError::NotFound) => {
                tracing::error!(blob = id, "the ledger lists a blob its store does not have");
                Err(not_found())
            }
            Err(error @ BlobError::Store(_)) => Err(ApiError::unavailable("storage.backend_unavailable", error.to_string())),
        }
    }

    /// Removes blob `id` (bytes first, then its row: a crash in between leaves a row
    /// whose bytes are gone, which a retried deletion finishes).
    pub(crate) async fn delete(&self, id: &str) -> Result<(), ApiError> {
        if !valid_id(id) {
            return Ok(());
        }
        self.blobs.delete(id).await.map_err(|e| ApiError::unavailable("storage.backend_unavailable", e.to_string()))?;
        self.ledger.forget_blob(id).await.map_err(ledger_error)
    }

    pub(crate) async fn ready(&self) -> Result<(), String> {
        self.ledger.ready().await?;
        self.blobs.ready().await
    }
}
