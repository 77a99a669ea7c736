//! Rebuilding the whole index (`echod reindex`), after a change of embedding model or
//! chunking: every indexed document goes through parse → chunk → embed again into a
//! new index generation that search builds beside the live one; searches keep
//! answering from the live one until the last document is in, then the new one takes
//! over at once.
//!
//! Resumable: documents go in id order and the run's cursor is stored after each, so
//! a run cut short (a stop, a crash, an unreachable peer) goes on from where it was
//! when ingest starts again or `echod reindex` is run again. Uploads and deletions
//! meanwhile reach both generations through search; documents that became indexed
//! after the run started are swept once more at the end, so none is missed.
//! One run at a time in this process (several ingest replicas would need a lease:
//! the scale-out work).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use common::wire::{Document, DocumentUploaded, IndexRequest, RebuildStatus, ReindexRun};
use common::{ApiError, ServiceContext, ServiceName};

use crate::store::{CatalogStore, RunRow};
use crate::worker::{Stages, build_chunks, permanent};

/// Documents read from the catalog per step.
const BATCH: i64 = 16;
/// Attempts at one document while its peers are unreachable, before the run stops.
const ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub(crate) struct Reindexer {
    ctx: ServiceContext,
    store: Arc<dyn CatalogStore>,
    /// Held by the task that drives the run.
    driving: Arc<Mutex<()>>,
}

impl Reindexer {
    pub(crate) fn new(ctx: ServiceContext, store: Arc<dyn CatalogStore>) -> Reindexer {
        Reindexer { ctx, store, driving: Arc::default() }
    }

    /// Starts a rebuild, or resumes the one that was cut short.
    pub(crate) async fn start(&self) -> Result<ReindexRun, ApiError> {
        let row = match self.store.latest_run().await? {
            Some(row) if row.run.status != "done" => {
                if row.run.status != "running" {
                    self.store.set_run_status(&row.run.id, "running", None).await?;
                }
                row
            }
            _ => self.store.create_run().await?,
        };
        self.spawn();
        Ok(self.store.latest_run().await?.map_or(row.run, |r| r.run))
    }

    /// The newest run, if any.
    pub(crate) async fn status(&self) -> Result<Option<ReindexRun>, ApiError> {
        Ok(self.store.latest_run().await?.map(|row| row.run))
    }

    /// Resumes a run that was under way when the service stopped.
    pub(crate) async fn resume_if_running(&self) {
        match self.store.latest_run().await {
            Ok(Some(row)) if row.run.status == "running" => {
                tracing::info!(run = %row.run.id, done = row.run.done, total = row.run.total, "an index rebuild was under way; resuming it");
                self.spawn();
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not read the index rebuild's state"),
        }
    }

    fn spawn(&self) {
        let reindexer = self.clone();
        tokio::spawn(async move {
            // One driver at a time; a second start finds it busy and leaves it be.
            let Ok(_driving) = reindexer.driving.clone().try_lock_owned() else { return };
            let Ok(Some(row)) = reindexer.store.latest_run().await else { return };
            if row.run.status != "running" {
                return;
            }
            let id = row.run.id.clone();
            match reindexer.drive(row).await {
                Ok(true) => tracing::info!(run = %id, "index rebuild done; the new index is live"),
                Ok(false) => tracing::info!(run = %id, "index rebuild paused by shutdown; it resumes at the next start"),
                // A peer that went away because everything is stopping is a pause too.
                Err(error) if reindexer.ctx.shutdown.is_cancelled() => {
                    tracing::info!(run = %id, %error, "index rebuild paused by shutdown; it resumes at the next start");
                }
                Err(error) => {
                    tracing::warn!(run = %id, %error, "index rebuild stopped; run `echod reindex` again to resume it");
                    let _ = reindexer.store.set_run_status(&id, "stopped", Some(&error.detail)).await;
                }
            }
        });
    }

    /// Runs the rebuild to its end; `false` when shutdown interrupted it.
    async fn drive(&self, row: RunRow) -> Result<bool, ApiError> {
        let peers = &self.ctx.peers;
        // At start-up search may not be listening yet.
        let mut pause = Duration::from_millis(500);
        for attempt in 1..=ATTEMPTS {
            match peers.post_json::<_, RebuildStatus>(ServiceName::Search, "/v1/rebuild", None, &serde_json::json!({})).await {
                Ok(_) => break,
                Err(error) if attempt == ATTEMPTS || permanent(&error) => return Err(error),
                Err(_) => {
                    tokio::select! {
                        _ = self.ctx.shutdown.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause *= 2;
                }
            }
        }
        let mut cursor = row.cursor.clone();
        loop {
            let batch = self.store.indexed_after(&cursor, BATCH).await?;
            let Some(last) = batch.last() else { break };
            let last_id = last.id.clone();
            for document in &batch {
                if self.ctx.shutdown.is_cancelled() {
                    return Ok(false);
                }
                let ok = self.rebuild_one(document).await?;
                self.store.advance_run(&row.run.id, &document.id, ok).await?;
            }
            cursor = last_id;
        }
        // Documents that became indexed after the start, in case their own indexing
        // reached search before the new generation existed (a few seconds of slack
        // for the clock's whole seconds).
        for document in self.store.indexed_since(row.started_unix - 5, &cursor).await? {
            if self.ctx.shutdown.is_cancelled() {
                return Ok(false);
            }
            self.rebuild_one(&document).await?;
        }
        let _: RebuildStatus = peers.post_json(ServiceName::Search, "/v1/rebuild/finish", None, &serde_json::json!({})).await?;
        self.store.set_run_status(&row.run.id, "done", None).await?;
        Ok(true)
    }

    /// One document into the new generation. `Ok(false)`: the document itself cannot
    /// be rebuilt (it is marked failed with the reason); `Err`: its peers failed
    /// `ATTEMPTS` times, and the run stops to be resumed later.
    async fn rebuild_one(&self, document: &Document) -> Result<bool, ApiError> {
        let uploaded = DocumentUploaded {
            document_id: document.id.clone(),
            job_id: document.job_id.clone(),
            collection_id: document.collection.clone(),
            owner: document.owner.clone(),
            blob_id: document.blob_id.clone(),
            sha256: document.sha256.clone(),
            content_type: document.content_type.clone(),
            filename: document.filename.clone(),
            version: document.version,
            classification: document.classification.clone(),
        };
        let mut pause = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match self.index_one(&uploaded).await {
                Ok(n_chunks) => {
                    self.store.set_chunks(&document.id, n_chunks).await?;
                    break;
                }
                Err(error) if permanent(&error) => {
                    let reason = format!("the index rebuild could not read it again: {}", error.detail);
                    tracing::warn!(document_id = %document.id, %reason, "document left out of the rebuilt index");
                    self.store.set_stage(&document.job_id, "failed", None, Some(&reason)).await?;
                    return Ok(false);
                }
                Err(error) if attempt >= ATTEMPTS => return Err(error),
                Err(error) => {
                    tracing::debug!(document_id = %document.id, %error, attempt, "rebuilding a document failed; retrying");
                    tokio::select! {
                        _ = self.ctx.shutdown.cancelled() => return Err(error),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause *= 2;
                    attempt += 1;
                }
            }
        }
        // Deleted while it was being rebuilt: its deletion may have reached search
        // before these chunks did.
        if self.store.document(&document.id).await?.is_none() {
            self.ctx.peers.delete(ServiceName::Search, &format!("/v1/documents/{}", document.id), None).await?;
        }
        Ok(true)
    }

    async fn index_one(&self, uploaded: &DocumentUploaded) -> Result<usize, ApiError> {
        let chunks = build_chunks(&self.ctx, uploaded, &Stages::Quiet).await?;
        let n_chunks = chunks.len();
        let request = IndexRequest { document_id: uploaded.document_id.clone(), chunks };
        let _: serde_json::Value = self.ctx.peers.post_json(ServiceName::Search, "/v1/rebuild/index", None, &request).await?;
        Ok(n_chunks)
    }
}
