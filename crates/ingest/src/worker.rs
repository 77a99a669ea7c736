//! The ingest worker and the outbox relay.
//!
//! The worker consumes `echo.document.uploaded`: fetch the blob, parse, chunk, index the
//! words (searchable at once), embed, index again with the vectors, mark the job done,
//! publish `echo.document.indexed`. It is idempotent (chunk ids are derived from the
//! document and position; indexing replaces the document's chunks), so a redelivery
//! after a crash redoes the job safely. Files the parser
//! rejects fail at once with the parser's reason; transient failures retry with
//! backoff until the last attempt, then the job fails and the message is dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use tokio::sync::Notify;

use common::bus::PublishMessage;
use common::wire::{Chunk, DocumentFailed, DocumentIndexed, DocumentUploaded, EmbedRequest, EmbedResponse, IndexRequest, ParsedDocument, events};
use common::{ApiError, ErrorKind, ServiceContext, ServiceName};

use crate::chunk::chunk_blocks;
use crate::store::CatalogStore;

/// Publishes outbox rows until shutdown; woken on every insert and once a second.
pub(crate) fn spawn_relay(ctx: ServiceContext, store: Arc<dyn CatalogStore>, wake: Arc<Notify>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let published = relay_once(&ctx, store.as_ref()).await;
            let pause = match published {
                Ok(0) => Duration::from_secs(1),
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Err(error) => {
                    tracing::debug!(%error, "outbox relay could not publish; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    });
}

async fn relay_once(ctx: &ServiceContext, store: &dyn CatalogStore) -> Result<usize, ApiError> {
    let batch = store.outbox_batch(100).await?;
    for (id, event) in &batch {
        // The event id is the idempotency key: a crash between publish and delete
        // republishes, and the queue drops the duplicate.
        let key = Some(event.id.clone());
        ctx.bus.publish(vec![PublishMessage { event: event.clone(), key, ordering_key: None, delay_ms: None }]).await?;
        store.outbox_done(*id).await?;
    }
    Ok(batch.len())
}

pub(crate) const SUBSCRIPTION: &str = "ingest-worker";
/// The error code of work stopped because its job was cancelled.
const CANCELLED: &str = "ingest.cancelled";
/// The ingest worker's lease on a job.
const LEASE_MS: i64 = 15_000;

pub(crate) fn spawn_workers(ctx: ServiceContext, store: Arc<dyn CatalogStore>, ready: common::server::ReadyFlag) {
    tokio::spawn(async move {
        let spec = common::bus::SubscriptionSpec {
            topic: events::DOCUMENT_UPLOADED.into(),
            max_deliveries: Some(ctx.config.ingest.max_attempts),
            // Short, and kept alive while a job runs (the bus extends it every half
            // lease): a job held by a killed process is redone within this of the kill.
            lease_ms: Some(LEASE_MS),
            ordered: None,
        };
        if !ctx.bus.declare(SUBSCRIPTION, &spec, &ctx.shutdown).await {
            return;
        }
        ready.set();
        let concurrency = ctx.config.ingest.workers;
        let worker_ctx = ctx.clone();
        ctx.bus.spawn_consumer(SUBSCRIPTION, concurrency, ctx.shutdown.clone(), move |event, attempts| {
            let ctx = worker_ctx.clone();
            let store = store.clone();
            async move {
                let uploaded: DocumentUploaded = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                process(&ctx, store.as_ref(), &uploaded, attempts).await
            }
        });
    });
}

pub(crate) fn permanent(error: &ApiError) -> bool {
    matches!(error.kind, ErrorKind::BadRequest | ErrorKind::UnsupportedMediaType | ErrorKind::PayloadTooLarge | ErrorKind::NotFound)
}

async fn process(ctx: &ServiceContext, store: &dyn CatalogStore, uploaded: &DocumentUploaded, attempts: i64) -> Result<(), String> {
    let job = match store.job(&uploaded.job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return Ok(()), // deleted meanwhile: nothing to do
        Err(error) => return Err(format!("catalog unavailable: {error}")),
    };
    if matches!(job.status.as_str(), "done" | "cancelled") {
        return Ok(());
    }
    let started = std::time::Instant::now();
    match run_stages(ctx, store, uploaded, attempts).await {
        Ok(n_chunks) => {
            metrics::histogram!("echo_ingest_job_seconds").record(started.elapsed().as_secs_f64());
            let event = ctx.bus.event(
                events::DOCUMENT_INDEXED,
                Some(format!("document:{}", uploaded.document_id)),
                DocumentIndexed {
                    document_id: uploaded.document_id.clone(),
                    job_id: uploaded.job_id.clone(),
                    collection_id: uploaded.collection_id.clone(),
                    n_chunks,
                },
            );
            if let Err(error) = ctx.bus.publish_one(event).await {
                tracing::warn!(%error, "indexed event not published");
            }
            tracing::info!(document_id = %uploaded.document_id, n_chunks, "document indexed");
            Ok(())
        }
        Err(error) if error.code == CANCELLED => {
            tracing::info!(document_id = %uploaded.document_id, "ingest job cancelled; its work stopped");
            Ok(())
        }
        Err(error) => {
            let last_attempt = attempts >= ctx.config.ingest.max_attempts;
            let reason = error.detail.clone();
            if permanent(&error) || last_attempt {
                // Its words may be in the index already (embedding failed): a failed
                // document is not searchable.
                unindex(ctx, &uploaded.document_id).await;
                let _ = store.set_stage(&uploaded.job_id, "failed", Some(attempts), Some(&reason)).await;
                let event = ctx.bus.event(
                    events::DOCUMENT_FAILED,
                    Some(format!("document:{}", uploaded.document_id)),
                    DocumentFailed {
                        document_id: uploaded.document_id.clone(),
                        job_id: uploaded.job_id.clone(),
                        collection_id: uploaded.collection_id.clone(),
                        error: reason.clone(),
                    },
                );
                let _ = ctx.bus.publish_one(event).await;
                tracing::warn!(document_id = %uploaded.document_id, %reason, attempts, "ingest job failed");
                if permanent(&error) {
                    return Ok(());
                }
                return Err(reason);
            }
            let _ = store.set_stage(&uploaded.job_id, "queued", Some(attempts), Some(&format!("attempt {attempts} failed, retrying: {reason}"))).await;
            Err(reason)
        }
    }
}

/// Texts sent to the embedder per call: small enough that a call never runs long.
const EMBED_BATCH: usize = 64;

/// The embedding stage: each chunk's vector from the search service's embedder, in
/// batches. What is embedded is the chunk with its document title and heading path,
/// so a passage that only makes sense under its heading is found by it.
async fn embed_chunks(ctx: &ServiceContext, chunks: &mut [Chunk], stages: &Stages<'_>) -> Result<(), ApiError> {
    let mut embedded = 0;
    for batch in chunks.chunks_mut(EMBED_BATCH) {
        let texts: Vec<String> = batch.iter().map(embedding_text).collect();
        let answer: EmbedResponse = ctx.peers.post_json(ServiceName::Search, "/v1/embed", None, &EmbedRequest { texts }).await?;
        if answer.vectors.len() != batch.len() {
            return Err(ApiError::unavailable("ingest.embedding_failed", "the embedder answered with a different number of vectors"));
        }
        for (chunk, vector) in batch.iter_mut().zip(answer.vectors) {
            chunk.embedding = Some(vector);
        }
        embedded += batch.len();
        stages.progress(None, None, Some(embedded)).await;
    }
    Ok(())
}

/// What the embedding of a chunk is computed from.
fn embedding_text(chunk: &Chunk) -> String {
    let mut text = String::new();
    if let Some(title) = &chunk.title {
        text.push_str(title);
        text.push('\n');
    }
    if let Some(section) = chunk.section.as_ref().filter(|s| chunk.title.as_deref() != Some(s.as_str())) {
        text.push_str(section);
        text.push('\n');
    }
    text.push_str(&chunk.text);
    text
}

/// Where a document's progress through the stages is recorded: its job (uploads),
/// or nowhere (a rebuild of the index, which keeps its own count).
pub(crate) enum Stages<'a> {
    Job {
        store: &'a dyn CatalogStore,
        job_id: &'a str,
        document_id: &'a str,
        collection_id: &'a str,
        attempts: i64,
        /// The stage the job is in and since when (for `echo_ingest_stage_seconds`
        /// and the stage's span in the job's trace).
        entered: std::sync::Mutex<(String, std::time::Instant, std::time::SystemTime)>,
    },
    Quiet,
}

impl Stages<'_> {
    /// Records how far the document has come (pages parsed, chunks made, chunks
    /// embedded) for the documents page; a failure to record is not the job's failure.
    async fn progress(&self, pages: Option<Option<u32>>, chunks: Option<usize>, embedded: Option<usize>) {
        if let Stages::Job { store, document_id, .. } = self
            && let Err(error) = store.set_progress(document_id, pages, chunks, embedded).await
        {
            tracing::warn!(%error, "progress not recorded");
        }
    }

    /// Moves the job to `stage`; an error when a person cancelled it meanwhile, which
    /// stops the work between stages.
    async fn enter(&self, stage: &str) -> Result<(), ApiError> {
        match self {
            Stages::Job { store, job_id, document_id, collection_id, attempts, entered } => {
                let ended = entered.lock().ok().map(|mut entered| std::mem::replace(&mut *entered, (stage.to_string(), std::time::Instant::now(), std::time::SystemTime::now())));
                if let Some((previous, since, started)) = ended {
                    metrics::histogram!("echo_ingest_stage_seconds", "stage" => previous.clone()).record(since.elapsed().as_secs_f64());
                    // The stage as a span of the job's trace (its delivery's child).
                    if let Some(job) = common::trace::current().filter(|_| previous != "starting") {
                        common::otlp::record(common::otlp::Finished {
                            service: "ingest",
                            name: format!("stage {previous}"),
                            kind: common::otlp::Kind::Internal,
                            context: &job.child(),
                            parent_span_id: Some(job.span_id()),
                            started,
                            attributes: vec![
                                common::otlp::Attribute::new("echo.document_id", document_id.to_string()),
                                common::otlp::Attribute::new("echo.job_id", job_id.to_string()),
                                common::otlp::Attribute::new("echo.collection_id", collection_id.to_string()),
                                common::otlp::Attribute::new("echo.stage", previous),
                            ],
                            error: false,
                        });
                    }
                }
                metrics::counter!("echo_ingest_stages_entered_total", "stage" => stage.to_string()).increment(1);
                let attempts = (stage == "parsing").then_some(*attempts);
                if store.set_stage(job_id, stage, attempts, None).await? {
                    Ok(())
                } else {
                    Err(ApiError::conflict(CANCELLED, "the job was cancelled"))
                }
            }
            Stages::Quiet => Ok(()),
        }
    }
}

async fn run_stages(ctx: &ServiceContext, store: &dyn CatalogStore, uploaded: &DocumentUploaded, attempts: i64) -> Result<usize, ApiError> {
    let stages = Stages::Job {
        store,
        job_id: &uploaded.job_id,
        document_id: &uploaded.document_id,
        collection_id: &uploaded.collection_id,
        attempts,
        entered: std::sync::Mutex::new(("starting".to_string(), std::time::Instant::now(), std::time::SystemTime::now())),
    };
    let mut chunks = parsed_chunks(ctx, uploaded, &stages).await?;
    let n_chunks = chunks.len();
    let outcome = async {
        if ctx.config.embedding_provider() != "none" {
            // Searchable by its words at once, by meaning once embedded: embedding is most
            // of an ingest's time (~30 chunks/s on two cores, minutes for a manual),
            // parsing and indexing the words a few seconds. The write below replaces
            // these chunks with the same chunks and their vectors.
            index_chunks(ctx, uploaded, chunks.clone()).await?;
            stages.enter("embedding").await?;
            embed_chunks(ctx, &mut chunks, &stages).await?;
        }
        stages.enter("indexing").await?;
        index_chunks(ctx, uploaded, chunks).await?;
        store.set_chunks(&uploaded.document_id, n_chunks).await?;
        stages.enter("done").await
    }
    .await;
    if let Err(error) = outcome {
        // Cancelled (or deleted) after its chunks went in: take them out again.
        if error.code == CANCELLED {
            unindex(ctx, &uploaded.document_id).await;
        }
        return Err(error);
    }
    metrics::counter!("echo_ingest_documents_indexed_total").increment(1);
    Ok(n_chunks)
}

/// Replaces the document's chunks in the index, in one request (atomically).
async fn index_chunks(ctx: &ServiceContext, uploaded: &DocumentUploaded, chunks: Vec<Chunk>) -> Result<(), ApiError> {
    let request = IndexRequest { document_id: uploaded.document_id.clone(), chunks };
    let _: serde_json::Value = ctx.peers.post_json(ServiceName::Search, "/v1/index", None, &request).await?;
    Ok(())
}

/// Takes the document's chunks out of the index (a job cancelled or failed after its
/// words went in); a failure is logged, the document's deletion removes them later.
async fn unindex(ctx: &ServiceContext, document_id: &str) {
    if let Err(error) = ctx.peers.delete(ServiceName::Search, &format!("/v1/documents/{document_id}"), None).await {
        tracing::warn!(%error, %document_id, "chunks of a stopped job not taken out of the index");
    }
}

/// Parse → chunk → embed: a document's chunks, ready for the index (a rebuild's path).
pub(crate) async fn build_chunks(ctx: &ServiceContext, uploaded: &DocumentUploaded, stages: &Stages<'_>) -> Result<Vec<Chunk>, ApiError> {
    let mut chunks = parsed_chunks(ctx, uploaded, stages).await?;
    if ctx.config.embedding_provider() != "none" {
        stages.enter("embedding").await?;
        embed_chunks(ctx, &mut chunks, stages).await?;
    }
    Ok(chunks)
}

/// Parse → chunk: a document's chunks, not embedded yet.
async fn parsed_chunks(ctx: &ServiceContext, uploaded: &DocumentUploaded, stages: &Stages<'_>) -> Result<Vec<Chunk>, ApiError> {
    stages.enter("parsing").await?;
    let path = format!("/v1/blobs/{}", uploaded.blob_id);
    let request = ctx.peers.request(ServiceName::Storage, Method::GET, &path, None).await?;
    let bytes = ctx.peers.send(ServiceName::Storage, request).await?.bytes().await.map_err(|e| ApiError::unavailable("ingest.blob_read", e.to_string()))?;
    let query = format!(
        "/v1/parse?content_type={}&filename={}",
        common::client::encode(&uploaded.content_type),
        common::client::encode(&uploaded.filename)
    );
    let request = ctx.peers.request(ServiceName::Parser, Method::POST, &query, None).await?.body(bytes);
    let parsed: ParsedDocument = ctx.peers.send(ServiceName::Parser, request).await?.json().await.map_err(ApiError::internal)?;

    stages.enter("chunking").await?;
    let n_pages = parsed.n_pages;
    let config = &ctx.config.ingest;
    let blocks = parsed.blocks;
    let title = parsed.title.clone().unwrap_or_else(|| uploaded.filename.clone());
    let (budget, overlap) = (config.chunk_chars, config.chunk_overlap_chars);
    let drafts = tokio::task::spawn_blocking(move || chunk_blocks(&blocks, budget, overlap)).await.map_err(ApiError::internal)?;
    let chunks: Vec<Chunk> = drafts
        .into_iter()
        .enumerate()
        .map(|(ordinal, draft)| Chunk {
            chunk_id: format!("{}-{}", uploaded.document_id, ordinal),
            document_id: uploaded.document_id.clone(),
            collection_id: uploaded.collection_id.clone(),
            ordinal: ordinal as u32,
            text: draft.text,
            page: draft.page,
            section: draft.section,
            char_start: draft.char_start,
            char_end: draft.char_end,
            classification: uploaded.classification.clone(),
            title: Some(title.clone()),
            embedding: None,
        })
        .collect();

    // One write for what parsing and chunking found (and no chunk embedded yet).
    stages.progress(Some(n_pages), Some(chunks.len()), Some(0)).await;
    Ok(chunks)
}
