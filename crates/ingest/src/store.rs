//! The document catalog, jobs, the transactional outbox and index rebuilds: the
//! `CatalogStore` trait, with SQLite (`ingest.db` in the data dir, the default) and
//! PostgreSQL (schema `ingest`, chosen by `ingest.database_url` or `database.url`). A
//! document, its job and its `echo.document.uploaded` event commit together; the relay
//! publishes the outbox afterwards (the event id is the bus's idempotency key, so two
//! relays, or a crash between publish and delete, publish once). No HTTP types here.
//! One conformance suite (below) runs against both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Row, SqlitePool};

use common::wire::{CloudEvent, Document, DocumentFilter, Job, NewDocument, ReindexRun};
use common::{EchoConfig, ServiceName, now_unix, rfc3339};

/// Makes the `echo.document.uploaded` event of a new (document id, job id).
pub(crate) type MakeEvent<'a> = &'a (dyn Fn(&str, &str) -> CloudEvent + Send + Sync);

#[async_trait]
pub(crate) trait CatalogStore: Send + Sync {
    /// A live document of the collection with the same content, if any.
    async fn duplicate(&self, collection_id: &str, sha256: &str) -> Result<Option<Document>, sqlx::Error>;
    /// Creates the document, its job and the outbox event in one transaction; (document id, job id).
    async fn create(&self, new: &NewDocument, make_event: MakeEvent<'_>) -> Result<(String, String), sqlx::Error>;
    async fn document(&self, id: &str) -> Result<Option<Document>, sqlx::Error>;
    /// Live documents of `collections` (in those of `restricted` only the listed
    /// classifications) matching `filter`, newest first; and how many match in all.
    async fn list(&self, collections: &[String], restricted: &BTreeMap<String, Vec<String>>, filter: &DocumentFilter, limit: i64, offset: i64) -> Result<(Vec<Document>, i64), sqlx::Error>;
    /// Cancels a job that has not finished: `Ok(Err(status))` names the status of one
    /// that has (done, failed or cancelled already), or `missing`.
    async fn cancel(&self, job_id: &str) -> Result<Result<(), String>, sqlx::Error>;
    /// Queues a failed or cancelled job again, its event in the outbox in the same
    /// transaction: `Ok(Err(status))` names the status of a job that is neither.
    async fn retry(&self, job_id: &str, event: &CloudEvent) -> Result<Result<(), String>, sqlx::Error>;
    /// Marks the document deleted and queues `echo.document.deleted`, atomically.
    async fn delete(&self, id: &str, event: &CloudEvent) -> Result<bool, sqlx::Error>;
    /// Live documents of a collection (for deleting the collection), at most `limit`.
    async fn documents_in(&self, collection_id: &str, limit: i64) -> Result<Vec<Document>, sqlx::Error> {
        let (documents, _) = self.list(&[collection_id.to_string()], &BTreeMap::new(), &DocumentFilter::default(), limit, 0).await?;
        Ok(documents)
    }
    async fn job(&self, id: &str) -> Result<Option<Job>, sqlx::Error>;
    /// Moves the job (and its document) to `status`, recording when the stage began;
    /// `false` when the job was cancelled meanwhile (nothing is then changed).
    async fn set_stage(&self, job_id: &str, status: &str, attempts: Option<i64>, error: Option<&str>) -> Result<bool, sqlx::Error>;
    /// Where a document's processing stands: pages parsed (when the format has pages),
    /// chunks made, chunks embedded. `None` leaves a count as it is.
    async fn set_progress(&self, document_id: &str, pages: Option<Option<u32>>, chunks: Option<usize>, embedded: Option<usize>) -> Result<(), sqlx::Error>;
    async fn set_chunks(&self, document_id: &str, n_chunks: usize) -> Result<(), sqlx::Error>;
    /// The oldest outbox events, at most `limit` (unreadable rows are dropped).
    async fn outbox_batch(&self, limit: i64) -> Result<Vec<(i64, CloudEvent)>, sqlx::Error>;
    async fn outbox_done(&self, id: i64) -> Result<(), sqlx::Error>;
    /// The newest rebuild of the index, if any ever ran.
    async fn latest_run(&self) -> Result<Option<RunRow>, sqlx::Error>;
    /// A new rebuild over every indexed document.
    async fn create_run(&self) -> Result<RunRow, sqlx::Error>;
    async fn set_run_status(&self, id: &str, status: &str, error: Option<&str>) -> Result<(), sqlx::Error>;
    /// Records a document of the rebuild as done (or failed) and moves the cursor past
    /// it — counted only when it moves the cursor.
    async fn advance_run(&self, id: &str, document_id: &str, ok: bool) -> Result<(), sqlx::Error>;
    /// Indexed documents after `cursor` in id order, at most `limit`.
    async fn indexed_after(&self, cursor: &str, limit: i64) -> Result<Vec<Document>, sqlx::Error>;
    /// Documents the rebuild passed that became indexed at or after `since`.
    async fn indexed_since(&self, since: i64, cursor: &str) -> Result<Vec<Document>, sqlx::Error>;
    async fn ready(&self) -> Result<(), String>;
}

/// The store `config` names: PostgreSQL when a URL is set, else `ingest.db`.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<Arc<dyn CatalogStore>> {
    match config.database_url(&config.ingest.database_url) {
        Some(url) => Ok(Arc::new(PgCatalog::open(url).await?)),
        None => Ok(Arc::new(SqliteCatalog::open(&config.db_path(ServiceName::Ingest)).await?)),
    }
}

const SQLITE_MIGRATIONS: &[&str] = &[r#"
CREATE TABLE documents (
    id TEXT PRIMARY KEY,
    collection_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    blob_id TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL,
    job_id TEXT NOT NULL,
    n_chunks INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX documents_collection ON documents(collection_id, created_at);
CREATE INDEX documents_sha ON documents(collection_id, sha256);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    document_id TEXT NOT NULL REFERENCES documents(id),
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    timings TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"#, r#"
ALTER TABLE documents ADD COLUMN classification TEXT NOT NULL DEFAULT 'internal';
"#, r#"
CREATE TABLE reindex_runs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    cursor TEXT NOT NULL DEFAULT '',
    error TEXT,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER
);
"#, r#"
ALTER TABLE documents ADD COLUMN n_pages INTEGER;
ALTER TABLE documents ADD COLUMN n_embedded INTEGER NOT NULL DEFAULT 0;
"#];

/// The collections readable in full, and `collection#classification` for those
/// readable only in part.
fn visible_sets(collections: &[String], restricted: &BTreeMap<String, Vec<String>>) -> (Vec<String>, Vec<String>) {
    let full: Vec<String> = collections.iter().filter(|c| !restricted.contains_key(*c)).cloned().collect();
    let pairs: Vec<String> = collections
        .iter()
        .filter_map(|c| restricted.get(c).map(|classes| (c, classes)))
        .flat_map(|(c, classes)| classes.iter().map(move |class| format!("{c}#{class}")))
        .collect();
    (full, pairs)
}

/// A rebuild of the index and where it stands: the last document done (`cursor`,
/// documents go in id order) and when it started (documents that became indexed
/// after that are swept again at the end).
#[derive(Clone, Debug)]
pub(crate) struct RunRow {
    pub(crate) run: ReindexRun,
    pub(crate) cursor: String,
    pub(crate) started_unix: i64,
}

fn run_from_row<R: Row>(row: &R) -> Result<RunRow, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<i64>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<String>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    let started_unix: i64 = row.try_get("started_at")?;
    Ok(RunRow {
        run: ReindexRun {
            id: row.try_get("id")?,
            status: row.try_get("status")?,
            total: row.try_get("total")?,
            done: row.try_get("done")?,
            failed: row.try_get("failed")?,
            error: row.try_get("error")?,
            started_at: rfc3339(started_unix),
            finished_at: row.try_get::<Option<i64>, _>("finished_at")?.map(rfc3339),
        },
        cursor: row.try_get("cursor")?,
        started_unix,
    })
}

pub(crate) struct SqliteCatalog {
    pool: SqlitePool,
}

fn document_from_row<R: Row>(row: &R) -> Result<Document, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<i64>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<String>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Document {
        id: row.try_get("id")?,
        collection: row.try_get("collection_id")?,
        owner: row.try_get("owner")?,
        filename: row.try_get("filename")?,
        content_type: row.try_get("content_type")?,
        size: row.try_get::<i64, _>("size")? as u64,
        sha256: row.try_get("sha256")?,
        status: row.try_get("status")?,
        version: row.try_get("version")?,
        job_id: row.try_get("job_id")?,
        blob_id: row.try_get("blob_id")?,
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
        classification: row.try_get("classification")?,
        error: row.try_get("error")?,
        pages: row.try_get::<Option<i64>, _>("n_pages")?.map(|n| n as u32),
        chunks: row.try_get::<i64, _>("n_chunks")? as u64,
        embedded: row.try_get::<i64, _>("n_embedded")? as u64,
    })
}

impl SqliteCatalog {
    async fn open(path: &std::path::Path) -> Result<SqliteCatalog, sqlx::Error> {
        let pool = common::db::open_migrated(path, SQLITE_MIGRATIONS).await?;
        Ok(SqliteCatalog { pool })
    }
}

#[async_trait]
impl CatalogStore for SqliteCatalog {
    /// A live document of the collection with the same content, if any.
    async fn duplicate(&self, collection_id: &str, sha256: &str) -> Result<Option<Document>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM documents WHERE collection_id = ? AND sha256 = ? AND deleted_at IS NULL LIMIT 1")
            .bind(collection_id)
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(document_from_row).transpose()
    }

    /// Creates the document, its job and the outbox event in one transaction.
    async fn create(&self, new: &NewDocument, make_event: MakeEvent<'_>) -> Result<(String, String), sqlx::Error> {
        let now = now_unix();
        let document_id = uuid::Uuid::now_v7().to_string();
        let job_id = uuid::Uuid::now_v7().to_string();
        let event = make_event(&document_id, &job_id);
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query(
            "INSERT INTO documents (id, collection_id, owner, filename, content_type, size, sha256, blob_id, status, job_id, created_at, updated_at, classification)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
        )
        .bind(&document_id)
        .bind(&new.collection_id)
        .bind(&new.owner)
        .bind(&new.filename)
        .bind(&new.content_type)
        .bind(new.size as i64)
        .bind(&new.sha256)
        .bind(&new.blob_id)
        .bind(&job_id)
        .bind(now)
        .bind(now)
        .bind(&new.classification)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO jobs (id, document_id, status, created_at, updated_at, timings) VALUES (?, ?, 'queued', ?, ?, json_object('queued', ?))")
            .bind(&job_id)
            .bind(&document_id)
            .bind(now)
            .bind(now)
            .bind(common::now_unix_ms())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO outbox (event, created_at) VALUES (?, ?)")
            .bind(serde_json::to_string(&event).unwrap_or_default())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((document_id, job_id))
    }

    async fn document(&self, id: &str) -> Result<Option<Document>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM documents WHERE id = ? AND deleted_at IS NULL").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(document_from_row).transpose()
    }

    /// Live documents of `collections`; in those of `restricted` only the listed
    /// classifications.
    async fn list(&self, collections: &[String], restricted: &BTreeMap<String, Vec<String>>, filter: &DocumentFilter, limit: i64, offset: i64) -> Result<(Vec<Document>, i64), sqlx::Error> {
        if collections.is_empty() {
            return Ok((vec![], 0));
        }
        let (full, pairs) = visible_sets(collections, restricted);
        let full = serde_json::to_string(&full).unwrap_or_else(|_| "[]".into());
        let pairs = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into());
        macro_rules! visible {
            () => {
                "deleted_at IS NULL AND (collection_id IN (SELECT value FROM json_each(?))
                 OR collection_id || '#' || classification IN (SELECT value FROM json_each(?)))
                 AND (? IS NULL OR instr(lower(filename), lower(?)) > 0)
                 AND (? IS NULL OR status = ?)
                 AND (? IS NULL OR substr(lower(filename), -length(?) - 1) = '.' || lower(?))"
            };
        }
        let (name, status, extension) = (&filter.name, &filter.status, &filter.extension);
        let rows = sqlx::query(concat!("SELECT * FROM documents WHERE ", visible!(), " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"))
            .bind(&full)
            .bind(&pairs)
            .bind(name)
            .bind(name)
            .bind(status)
            .bind(status)
            .bind(extension)
            .bind(extension)
            .bind(extension)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        let total: i64 = sqlx::query_scalar(concat!("SELECT COUNT(*) FROM documents WHERE ", visible!()))
            .bind(&full)
            .bind(&pairs)
            .bind(name)
            .bind(name)
            .bind(status)
            .bind(status)
            .bind(extension)
            .bind(extension)
            .bind(extension)
            .fetch_one(&self.pool)
            .await?;
        Ok((rows.iter().map(document_from_row).collect::<Result<_, _>>()?, total))
    }

    /// Cancels a job that has not finished: `Ok(Err(status))` names the status of one
    /// that has (done, failed or cancelled already).
    async fn cancel(&self, job_id: &str) -> Result<Result<(), String>, sqlx::Error> {
        let now = now_unix();
        let mut tx = common::db::begin_write(&self.pool).await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?").bind(job_id).fetch_optional(&mut *tx).await?;
        let Some(status) = status else { return Ok(Err("missing".into())) };
        if matches!(status.as_str(), "done" | "failed" | "cancelled") {
            return Ok(Err(status));
        }
        sqlx::query("UPDATE jobs SET status = 'cancelled', error = 'cancelled by a person', updated_at = ?, timings = json_set(timings, '$.cancelled', ?) WHERE id = ?")
            .bind(now)
            .bind(common::now_unix_ms())
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE documents SET status = 'cancelled', error = 'cancelled by a person', updated_at = ? WHERE job_id = ? AND deleted_at IS NULL")
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Queues a failed or cancelled job again, its event in the outbox in the same
    /// transaction: `Ok(Err(status))` names the status of a job that is neither.
    async fn retry(&self, job_id: &str, event: &CloudEvent) -> Result<Result<(), String>, sqlx::Error> {
        let now = now_unix();
        let mut tx = common::db::begin_write(&self.pool).await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?").bind(job_id).fetch_optional(&mut *tx).await?;
        let Some(status) = status else { return Ok(Err("missing".into())) };
        if !matches!(status.as_str(), "failed" | "cancelled") {
            return Ok(Err(status));
        }
        sqlx::query("UPDATE jobs SET status = 'queued', attempts = 0, error = NULL, updated_at = ?, timings = json_object('queued', ?) WHERE id = ?")
            .bind(now)
            .bind(common::now_unix_ms())
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE documents SET status = 'queued', error = NULL, updated_at = ? WHERE job_id = ? AND deleted_at IS NULL")
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO outbox (event, created_at) VALUES (?, ?)")
            .bind(serde_json::to_string(event).unwrap_or_default())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Marks the document deleted and queues `echo.document.deleted`, atomically.
    async fn delete(&self, id: &str, event: &CloudEvent) -> Result<bool, sqlx::Error> {
        let now = now_unix();
        let mut tx = common::db::begin_write(&self.pool).await?;
        let done = sqlx::query("UPDATE documents SET deleted_at = ?, status = 'cancelled', updated_at = ? WHERE id = ? AND deleted_at IS NULL")
            .bind(now)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("UPDATE jobs SET status = 'cancelled', updated_at = ? WHERE document_id = ? AND status NOT IN ('done', 'failed')")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO outbox (event, created_at) VALUES (?, ?)")
            .bind(serde_json::to_string(event).unwrap_or_default())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn job(&self, id: &str) -> Result<Option<Job>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT j.*, d.collection_id FROM jobs j JOIN documents d ON d.id = j.document_id WHERE j.id = ? AND d.deleted_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> Result<Job, sqlx::Error> {
            Ok(Job {
                id: r.try_get("id")?,
                document_id: r.try_get("document_id")?,
                collection: r.try_get("collection_id")?,
                status: r.try_get("status")?,
                attempts: r.try_get("attempts")?,
                error: r.try_get("error")?,
                created_at: rfc3339(r.try_get("created_at")?),
                updated_at: rfc3339(r.try_get("updated_at")?),
                stages: stages(&r.try_get::<String, _>("timings")?),
            })
        })
        .transpose()
    }

    /// Moves the job (and its document) to `status`, recording how long the previous stage took.
    /// Records the job's stage; `false` when the job was cancelled meanwhile (nothing
    /// is then changed).
    async fn set_stage(&self, job_id: &str, status: &str, attempts: Option<i64>, error: Option<&str>) -> Result<bool, sqlx::Error> {
        let now = now_unix();
        let mut tx = common::db::begin_write(&self.pool).await?;
        let live = sqlx::query(
            "UPDATE jobs SET status = ?, attempts = COALESCE(?, attempts), error = ?, updated_at = ?,
                 timings = json_set(timings, '$.' || ?, ?)
             WHERE id = ? AND status != 'cancelled'",
        )
        .bind(status)
        .bind(attempts)
        .bind(error)
        .bind(now)
        .bind(status)
        .bind(common::now_unix_ms())
        .bind(job_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if !live {
            return Ok(false);
        }
        sqlx::query("UPDATE documents SET status = ?, error = ?, updated_at = ? WHERE job_id = ? AND deleted_at IS NULL")
            .bind(status)
            .bind(error)
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Where a document's processing stands: pages parsed (when the format has pages),
    /// chunks made, chunks embedded. `None` leaves a count as it is.
    async fn set_progress(&self, document_id: &str, pages: Option<Option<u32>>, chunks: Option<usize>, embedded: Option<usize>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE documents SET n_pages = CASE WHEN ? THEN ? ELSE n_pages END, n_chunks = COALESCE(?, n_chunks), n_embedded = COALESCE(?, n_embedded) WHERE id = ?",
        )
        .bind(pages.is_some())
        .bind(pages.flatten().map(i64::from))
        .bind(chunks.map(|n| n as i64))
        .bind(embedded.map(|n| n as i64))
        .bind(document_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn set_chunks(&self, document_id: &str, n_chunks: usize) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE documents SET n_chunks = ? WHERE id = ?").bind(n_chunks as i64).bind(document_id).execute(&self.pool).await?;
        Ok(())
    }

    async fn outbox_batch(&self, limit: i64) -> Result<Vec<(i64, CloudEvent)>, sqlx::Error> {
        let rows = sqlx::query("SELECT id, event FROM outbox ORDER BY id LIMIT ?").bind(limit).fetch_all(&self.pool).await?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let event: String = row.try_get("event")?;
            match serde_json::from_str(&event) {
                Ok(event) => batch.push((id, event)),
                Err(error) => {
                    tracing::error!(id, %error, "dropping an unreadable outbox row");
                    self.outbox_done(id).await?;
                }
            }
        }
        Ok(batch)
    }

    async fn outbox_done(&self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM outbox WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// The newest rebuild of the index, if any ever ran.
    async fn latest_run(&self) -> Result<Option<RunRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM reindex_runs ORDER BY started_at DESC, rowid DESC LIMIT 1").fetch_optional(&self.pool).await?;
        row.as_ref().map(run_from_row).transpose()
    }

    /// A new rebuild over every indexed document.
    async fn create_run(&self) -> Result<RunRow, sqlx::Error> {
        let (id, now) = (common::rand::token(12), now_unix());
        let mut tx = common::db::begin_write(&self.pool).await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM documents WHERE status = 'done' AND deleted_at IS NULL").fetch_one(&mut *tx).await?;
        sqlx::query("INSERT INTO reindex_runs (id, status, total, started_at, updated_at) VALUES (?, 'running', ?, ?, ?)")
            .bind(&id)
            .bind(total)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT * FROM reindex_runs WHERE id = ?").bind(&id).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        run_from_row(&row)
    }

    async fn set_run_status(&self, id: &str, status: &str, error: Option<&str>) -> Result<(), sqlx::Error> {
        let now = now_unix();
        let finished = (status == "done").then_some(now);
        sqlx::query("UPDATE reindex_runs SET status = ?, error = ?, updated_at = ?, finished_at = COALESCE(?, finished_at) WHERE id = ?")
            .bind(status)
            .bind(error)
            .bind(now)
            .bind(finished)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a document of the rebuild as done (or failed) and moves the cursor past it.
    async fn advance_run(&self, id: &str, document_id: &str, ok: bool) -> Result<(), sqlx::Error> {
        // Counted only when it moves the cursor: a document finished by a stopping
        // driver after the next start's driver took it again is counted once.
        sqlx::query(
            "UPDATE reindex_runs SET done = done + CASE WHEN cursor < ?1 THEN ?2 ELSE 0 END, failed = failed + CASE WHEN cursor < ?1 THEN ?3 ELSE 0 END, \
             cursor = MAX(cursor, ?1), updated_at = ?4 WHERE id = ?5",
        )
        .bind(document_id)
        .bind(i64::from(ok))
        .bind(i64::from(!ok))
        .bind(now_unix())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Indexed documents after `cursor` in id order, at most `limit`.
    async fn indexed_after(&self, cursor: &str, limit: i64) -> Result<Vec<Document>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM documents WHERE status = 'done' AND deleted_at IS NULL AND id > ? ORDER BY id LIMIT ?")
            .bind(cursor)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(document_from_row).collect()
    }

    /// Documents the rebuild passed that became indexed at or after `since`.
    async fn indexed_since(&self, since: i64, cursor: &str) -> Result<Vec<Document>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM documents WHERE status = 'done' AND deleted_at IS NULL AND updated_at >= ? AND id <= ? ORDER BY id")
            .bind(since)
            .bind(cursor)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(document_from_row).collect()
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("ingest.db: {e}"))
    }
}

/// The catalog in PostgreSQL, schema `ingest`. Ids and the rebuild cursor compare
/// bytewise (`COLLATE "C"`), as in SQLite.
pub(crate) struct PgCatalog {
    pool: PgPool,
}

impl PgCatalog {
    pub(crate) async fn open(url: &str) -> anyhow::Result<PgCatalog> {
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("ingest database URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for the catalog: {e}"))?;
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-ingest-migrate'))").execute(&mut *tx).await?;
        sqlx::raw_sql(
            r#"CREATE SCHEMA IF NOT EXISTS ingest;
             CREATE TABLE IF NOT EXISTS ingest.documents (
                 id TEXT COLLATE "C" PRIMARY KEY,
                 collection_id TEXT NOT NULL,
                 owner TEXT NOT NULL,
                 filename TEXT NOT NULL,
                 content_type TEXT NOT NULL,
                 size BIGINT NOT NULL,
                 sha256 TEXT NOT NULL,
                 blob_id TEXT NOT NULL,
                 version BIGINT NOT NULL DEFAULT 1,
                 status TEXT NOT NULL,
                 job_id TEXT NOT NULL,
                 n_chunks BIGINT NOT NULL DEFAULT 0,
                 error TEXT,
                 created_at BIGINT NOT NULL,
                 updated_at BIGINT NOT NULL,
                 deleted_at BIGINT,
                 classification TEXT NOT NULL DEFAULT 'internal',
                 n_pages BIGINT,
                 n_embedded BIGINT NOT NULL DEFAULT 0
             );
             CREATE INDEX IF NOT EXISTS documents_collection ON ingest.documents(collection_id, created_at);
             CREATE INDEX IF NOT EXISTS documents_sha ON ingest.documents(collection_id, sha256);
             CREATE INDEX IF NOT EXISTS documents_job ON ingest.documents(job_id);
             CREATE TABLE IF NOT EXISTS ingest.jobs (
                 id TEXT PRIMARY KEY,
                 document_id TEXT NOT NULL REFERENCES ingest.documents(id),
                 status TEXT NOT NULL,
                 attempts BIGINT NOT NULL DEFAULT 0,
                 error TEXT,
                 timings JSONB NOT NULL DEFAULT '{}',
                 created_at BIGINT NOT NULL,
                 updated_at BIGINT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS jobs_document ON ingest.jobs(document_id);
             CREATE TABLE IF NOT EXISTS ingest.outbox (
                 id BIGSERIAL PRIMARY KEY,
                 event TEXT NOT NULL,
                 created_at BIGINT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS ingest.reindex_runs (
                 seq BIGSERIAL,
                 id TEXT PRIMARY KEY,
                 status TEXT NOT NULL,
                 total BIGINT NOT NULL,
                 done BIGINT NOT NULL DEFAULT 0,
                 failed BIGINT NOT NULL DEFAULT 0,
                 cursor TEXT COLLATE "C" NOT NULL DEFAULT '',
                 error TEXT,
                 started_at BIGINT NOT NULL,
                 updated_at BIGINT NOT NULL,
                 finished_at BIGINT
             );"#,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PgCatalog { pool })
    }
}

/// What a document list shows, in PostgreSQL ($1 full collections, $2 pairs, $3 name,
/// $4 status, $5 extension).
const PG_VISIBLE: &str = "deleted_at IS NULL AND (collection_id = ANY($1) OR collection_id || '#' || classification = ANY($2))
     AND ($3::TEXT IS NULL OR strpos(lower(filename), lower($3)) > 0)
     AND ($4::TEXT IS NULL OR status = $4)
     AND ($5::TEXT IS NULL OR right(lower(filename), length($5) + 1) = '.' || lower($5))";

#[async_trait]
impl CatalogStore for PgCatalog {
    async fn duplicate(&self, collection_id: &str, sha256: &str) -> Result<Option<Document>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM ingest.documents WHERE collection_id = $1 AND sha256 = $2 AND deleted_at IS NULL LIMIT 1")
            .bind(collection_id)
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(document_from_row).transpose()
    }

    async fn create(&self, new: &NewDocument, make_event: MakeEvent<'_>) -> Result<(String, String), sqlx::Error> {
        let now = now_unix();
        let document_id = uuid::Uuid::now_v7().to_string();
        let job_id = uuid::Uuid::now_v7().to_string();
        let event = make_event(&document_id, &job_id);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO ingest.documents (id, collection_id, owner, filename, content_type, size, sha256, blob_id, status, job_id, created_at, updated_at, classification)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $10, $11)",
        )
        .bind(&document_id)
        .bind(&new.collection_id)
        .bind(&new.owner)
        .bind(&new.filename)
        .bind(&new.content_type)
        .bind(new.size as i64)
        .bind(&new.sha256)
        .bind(&new.blob_id)
        .bind(&job_id)
        .bind(now)
        .bind(&new.classification)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO ingest.jobs (id, document_id, status, created_at, updated_at, timings) VALUES ($1, $2, 'queued', $3, $3, jsonb_build_object('queued', $4::BIGINT))")
            .bind(&job_id)
            .bind(&document_id)
            .bind(now)
            .bind(common::now_unix_ms())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO ingest.outbox (event, created_at) VALUES ($1, $2)").bind(serde_json::to_string(&event).unwrap_or_default()).bind(now).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok((document_id, job_id))
    }

    async fn document(&self, id: &str) -> Result<Option<Document>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM ingest.documents WHERE id = $1 AND deleted_at IS NULL").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(document_from_row).transpose()
    }

    async fn list(&self, collections: &[String], restricted: &BTreeMap<String, Vec<String>>, filter: &DocumentFilter, limit: i64, offset: i64) -> Result<(Vec<Document>, i64), sqlx::Error> {
        if collections.is_empty() {
            return Ok((vec![], 0));
        }
        let (full, pairs) = visible_sets(collections, restricted);
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM ingest.documents WHERE {PG_VISIBLE} ORDER BY created_at DESC, id DESC LIMIT $6 OFFSET $7")))
            .bind(&full)
            .bind(&pairs)
            .bind(&filter.name)
            .bind(&filter.status)
            .bind(&filter.extension)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM ingest.documents WHERE {PG_VISIBLE}")))
            .bind(&full)
            .bind(&pairs)
            .bind(&filter.name)
            .bind(&filter.status)
            .bind(&filter.extension)
            .fetch_one(&self.pool)
            .await?;
        Ok((rows.iter().map(document_from_row).collect::<Result<_, _>>()?, total))
    }

    async fn cancel(&self, job_id: &str) -> Result<Result<(), String>, sqlx::Error> {
        let now = now_unix();
        let mut tx = self.pool.begin().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM ingest.jobs WHERE id = $1 FOR UPDATE").bind(job_id).fetch_optional(&mut *tx).await?;
        let Some(status) = status else { return Ok(Err("missing".into())) };
        if matches!(status.as_str(), "done" | "failed" | "cancelled") {
            return Ok(Err(status));
        }
        sqlx::query("UPDATE ingest.jobs SET status = 'cancelled', error = 'cancelled by a person', updated_at = $1, timings = timings || jsonb_build_object('cancelled', $2::BIGINT) WHERE id = $3")
            .bind(now)
            .bind(common::now_unix_ms())
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE ingest.documents SET status = 'cancelled', error = 'cancelled by a person', updated_at = $1 WHERE job_id = $2 AND deleted_at IS NULL")
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn retry(&self, job_id: &str, event: &CloudEvent) -> Result<Result<(), String>, sqlx::Error> {
        let now = now_unix();
        let mut tx = self.pool.begin().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM ingest.jobs WHERE id = $1 FOR UPDATE").bind(job_id).fetch_optional(&mut *tx).await?;
        let Some(status) = status else { return Ok(Err("missing".into())) };
        if !matches!(status.as_str(), "failed" | "cancelled") {
            return Ok(Err(status));
        }
        sqlx::query("UPDATE ingest.jobs SET status = 'queued', attempts = 0, error = NULL, updated_at = $1, timings = jsonb_build_object('queued', $2::BIGINT) WHERE id = $3")
            .bind(now)
            .bind(common::now_unix_ms())
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE ingest.documents SET status = 'queued', error = NULL, updated_at = $1 WHERE job_id = $2 AND deleted_at IS NULL").bind(now).bind(job_id).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO ingest.outbox (event, created_at) VALUES ($1, $2)").bind(serde_json::to_string(event).unwrap_or_default()).bind(now).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn delete(&self, id: &str, event: &CloudEvent) -> Result<bool, sqlx::Error> {
        let now = now_unix();
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE ingest.documents SET deleted_at = $1, status = 'cancelled', updated_at = $1 WHERE id = $2 AND deleted_at IS NULL").bind(now).bind(id).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("UPDATE ingest.jobs SET status = 'cancelled', updated_at = $1 WHERE document_id = $2 AND status NOT IN ('done', 'failed')").bind(now).bind(id).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO ingest.outbox (event, created_at) VALUES ($1, $2)").bind(serde_json::to_string(event).unwrap_or_default()).bind(now).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn job(&self, id: &str) -> Result<Option<Job>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT j.id, j.document_id, j.status, j.attempts, j.error, j.created_at, j.updated_at, j.timings::TEXT AS timings, d.collection_id
             FROM ingest.jobs j JOIN ingest.documents d ON d.id = j.document_id WHERE j.id = $1 AND d.deleted_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> Result<Job, sqlx::Error> {
            Ok(Job {
                id: r.try_get("id")?,
                document_id: r.try_get("document_id")?,
                collection: r.try_get("collection_id")?,
                status: r.try_get("status")?,
                attempts: r.try_get("attempts")?,
                error: r.try_get("error")?,
                created_at: rfc3339(r.try_get("created_at")?),
                updated_at: rfc3339(r.try_get("updated_at")?),
                stages: stages(&r.try_get::<String, _>("timings")?),
            })
        })
        .transpose()
    }

    async fn set_stage(&self, job_id: &str, status: &str, attempts: Option<i64>, error: Option<&str>) -> Result<bool, sqlx::Error> {
        let now = now_unix();
        let mut tx = self.pool.begin().await?;
        let live = sqlx::query(
            "UPDATE ingest.jobs SET status = $1, attempts = COALESCE($2, attempts), error = $3, updated_at = $4,
                 timings = timings || jsonb_build_object($1::TEXT, $5::BIGINT)
             WHERE id = $6 AND status != 'cancelled'",
        )
        .bind(status)
        .bind(attempts)
        .bind(error)
        .bind(now)
        .bind(common::now_unix_ms())
        .bind(job_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if !live {
            return Ok(false);
        }
        sqlx::query("UPDATE ingest.documents SET status = $1, error = $2, updated_at = $3 WHERE job_id = $4 AND deleted_at IS NULL")
            .bind(status)
            .bind(error)
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn set_progress(&self, document_id: &str, pages: Option<Option<u32>>, chunks: Option<usize>, embedded: Option<usize>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE ingest.documents SET n_pages = CASE WHEN $1 THEN $2 ELSE n_pages END, n_chunks = COALESCE($3, n_chunks), n_embedded = COALESCE($4, n_embedded) WHERE id = $5",
        )
        .bind(pages.is_some())
        .bind(pages.flatten().map(i64::from))
        .bind(chunks.map(|n| n as i64))
        .bind(embedded.map(|n| n as i64))
        .bind(document_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn set_chunks(&self, document_id: &str, n_chunks: usize) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE ingest.documents SET n_chunks = $1 WHERE id = $2").bind(n_chunks as i64).bind(document_id).execute(&self.pool).await?;
        Ok(())
    }

    async fn outbox_batch(&self, limit: i64) -> Result<Vec<(i64, CloudEvent)>, sqlx::Error> {
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, event FROM ingest.outbox ORDER BY id LIMIT $1").bind(limit).fetch_all(&self.pool).await?;
        let mut batch = Vec::with_capacity(rows.len());
        for (id, event) in rows {
            match serde_json::from_str(&event) {
                Ok(event) => batch.push((id, event)),
                Err(error) => {
                    tracing::error!(id, %error, "dropping an unreadable outbox row");
                    self.outbox_done(id).await?;
                }
            }
        }
        Ok(batch)
    }

    async fn outbox_done(&self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM ingest.outbox WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    async fn latest_run(&self) -> Result<Option<RunRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM ingest.reindex_runs ORDER BY started_at DESC, seq DESC LIMIT 1").fetch_optional(&self.pool).await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn create_run(&self) -> Result<RunRow, sqlx::Error> {
        let (id, now) = (common::rand::token(12), now_unix());
        let mut tx = self.pool.begin().await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ingest.documents WHERE status = 'done' AND deleted_at IS NULL").fetch_one(&mut *tx).await?;
        let row = sqlx::query("INSERT INTO ingest.reindex_runs (id, status, total, started_at, updated_at) VALUES ($1, 'running', $2, $3, $3) RETURNING *")
            .bind(&id)
            .bind(total)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        run_from_row(&row)
    }

    async fn set_run_status(&self, id: &str, status: &str, error: Option<&str>) -> Result<(), sqlx::Error> {
        let now = now_unix();
        let finished = (status == "done").then_some(now);
        sqlx::query("UPDATE ingest.reindex_runs SET status = $1, error = $2, updated_at = $3, finished_at = COALESCE($4, finished_at) WHERE id = $5")
            .bind(status)
            .bind(error)
            .bind(now)
            .bind(finished)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn advance_run(&self, id: &str, document_id: &str, ok: bool) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE ingest.reindex_runs SET done = done + CASE WHEN cursor < $1 THEN $2 ELSE 0 END, failed = failed + CASE WHEN cursor < $1 THEN $3 ELSE 0 END,
             cursor = GREATEST(cursor, $1), updated_at = $4 WHERE id = $5",
        )
        .bind(document_id)
        .bind(i64::from(ok))
        .bind(i64::from(!ok))
        .bind(now_unix())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn indexed_after(&self, cursor: &str, limit: i64) -> Result<Vec<Document>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM ingest.documents WHERE status = 'done' AND deleted_at IS NULL AND id > $1 ORDER BY id LIMIT $2")
            .bind(cursor)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(document_from_row).collect()
    }

    async fn indexed_since(&self, since: i64, cursor: &str) -> Result<Vec<Document>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM ingest.documents WHERE status = 'done' AND deleted_at IS NULL AND updated_at >= $1 AND id <= $2 ORDER BY id")
            .bind(since)
            .bind(cursor)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(document_from_row).collect()
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("PostgreSQL: {e}"))
    }
}

/// The job's stages in the order they began, each with how long it lasted (until the
/// next began; the last, still running or final, has none). `timings` maps a stage to
/// when it began, in milliseconds (seconds in jobs recorded before that changed).
fn stages(timings: &str) -> Vec<common::wire::JobStage> {
    let Ok(map) = serde_json::from_str::<std::collections::HashMap<String, i64>>(timings) else { return Vec::new() };
    let mut begun: Vec<(i64, String)> = map.into_iter().map(|(stage, at)| (if at < 100_000_000_000 { at * 1000 } else { at }, stage)).collect();
    begun.sort();
    let mut stages = Vec::with_capacity(begun.len());
    for (i, (at, stage)) in begun.iter().enumerate() {
        let seconds = begun.get(i + 1).map(|(next, _)| (next - at) as f64 / 1000.0);
        stages.push(common::wire::JobStage { stage: stage.clone(), started_at: common::rfc3339(at / 1000), seconds });
    }
    stages
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn new_document(collection: &str, filename: &str, sha: &str, classification: &str) -> NewDocument {
        NewDocument {
            collection_id: collection.into(),
            owner: "u-ann".into(),
            filename: filename.into(),
            content_type: "text/markdown".into(),
            size: 42,
            sha256: sha.into(),
            blob_id: format!("blob-{sha}"),
            classification: classification.into(),
        }
    }

    fn event(kind: &str, subject: &str) -> CloudEvent {
        serde_json::from_value(serde_json::json!({
            "specversion": "1.0", "id": uuid::Uuid::now_v7().to_string(), "source": "/ingest", "type": kind,
            "subject": subject, "time": "2026-12-07T00:00:00Z", "datacontenttype": "application/json", "data": {"document_id": subject}
        }))
        .unwrap()
    }

    async fn drain(store: &dyn CatalogStore) -> Vec<String> {
        let batch = store.outbox_batch(100).await.unwrap();
        for (id, _) in &batch {
            store.outbox_done(*id).await.unwrap();
        }
        batch.into_iter().map(|(_, e)| e.type_).collect()
    }

    /// What every `CatalogStore` must do.
    async fn conformance(store: &dyn CatalogStore) {
        store.ready().await.unwrap();
        let make = |document: &str, _job: &str| event("echo.document.uploaded", document);
        let (doc_a, job_a) = store.create(&new_document("c-1", "Guide.MD", "sha-a", "internal"), &make).await.unwrap();
        let (doc_b, job_b) = store.create(&new_document("c-1", "secret.pdf", "sha-b", "restricted"), &make).await.unwrap();
        let (doc_c, _) = store.create(&new_document("c-2", "notes.txt", "sha-c", "public"), &make).await.unwrap();
        assert_eq!(drain(store).await, ["echo.document.uploaded"; 3], "each document's event is in the outbox, in order");
        assert!(drain(store).await.is_empty());

        let a = store.document(&doc_a).await.unwrap().unwrap();
        assert_eq!((a.status.as_str(), a.job_id.as_str(), a.size, a.version, a.classification.as_str()), ("queued", job_a.as_str(), 42, 1, "internal"));
        assert_eq!(store.duplicate("c-1", "sha-a").await.unwrap().map(|d| d.id), Some(doc_a.clone()));
        assert!(store.duplicate("c-2", "sha-a").await.unwrap().is_none(), "duplicates are per collection");

        // Listing: visibility by collection and classification, filters, paging, newest first.
        let all = ["c-1".to_string(), "c-2".to_string()];
        let none = BTreeMap::new();
        let (listed, total) = store.list(&all, &none, &DocumentFilter::default(), 10, 0).await.unwrap();
        assert_eq!(total, 3);
        assert_eq!(listed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [doc_c.as_str(), doc_b.as_str(), doc_a.as_str()]);
        let only_internal = BTreeMap::from([("c-1".to_string(), vec!["internal".to_string()])]);
        let (listed, total) = store.list(&all, &only_internal, &DocumentFilter::default(), 10, 0).await.unwrap();
        assert_eq!((total, listed.iter().any(|d| d.id == doc_b)), (2, false), "a restricted document stays hidden");
        let by_name = DocumentFilter { name: Some("GUIDE".into()), ..DocumentFilter::default() };
        assert_eq!(store.list(&all, &none, &by_name, 10, 0).await.unwrap().1, 1);
        let by_extension = DocumentFilter { extension: Some("md".into()), ..DocumentFilter::default() };
        assert_eq!(store.list(&all, &none, &by_extension, 10, 0).await.unwrap().0[0].id, doc_a);
        let by_status = DocumentFilter { status: Some("done".into()), ..DocumentFilter::default() };
        assert_eq!(store.list(&all, &none, &by_status, 10, 0).await.unwrap().1, 0);
        let (page, total) = store.list(&all, &none, &DocumentFilter::default(), 1, 1).await.unwrap();
        assert_eq!((page.len(), page[0].id.as_str(), total), (1, doc_b.as_str(), 3));
        assert!(store.list(&[], &none, &DocumentFilter::default(), 10, 0).await.unwrap().0.is_empty());
        assert_eq!(store.documents_in("c-2", 10).await.unwrap().len(), 1);

        // Stages, progress, and the job's timeline.
        assert!(store.set_stage(&job_a, "parsing", Some(1), None).await.unwrap());
        store.set_progress(&doc_a, Some(Some(7)), Some(12), None).await.unwrap();
        store.set_progress(&doc_a, None, None, Some(12)).await.unwrap();
        assert!(store.set_stage(&job_a, "done", None, None).await.unwrap());
        let a = store.document(&doc_a).await.unwrap().unwrap();
        assert_eq!((a.status.as_str(), a.pages, a.chunks, a.embedded), ("done", Some(7), 12, 12));
        let job = store.job(&job_a).await.unwrap().unwrap();
        assert_eq!((job.status.as_str(), job.attempts, job.collection.as_str()), ("done", 1, "c-1"));
        assert_eq!(job.stages.iter().map(|s| s.stage.as_str()).collect::<Vec<_>>(), ["queued", "parsing", "done"]);

        // Cancel and retry.
        assert_eq!(store.cancel(&job_a).await.unwrap(), Err("done".to_string()), "a finished job is not cancelled");
        assert_eq!(store.cancel("no-such-job").await.unwrap(), Err("missing".to_string()));
        assert_eq!(store.cancel(&job_b).await.unwrap(), Ok(()));
        assert!(!store.set_stage(&job_b, "parsing", None, None).await.unwrap(), "a cancelled job stays cancelled");
        assert_eq!(store.document(&doc_b).await.unwrap().unwrap().status, "cancelled");
        assert_eq!(store.retry(&job_a, &event("echo.document.uploaded", &doc_a)).await.unwrap(), Err("done".to_string()));
        assert_eq!(store.retry(&job_b, &event("echo.document.uploaded", &doc_b)).await.unwrap(), Ok(()));
        assert_eq!(store.job(&job_b).await.unwrap().unwrap().status, "queued");
        assert_eq!(drain(store).await, ["echo.document.uploaded"]);

        // Deletion hides the document and its job and queues its event, once.
        assert!(store.delete(&doc_c, &event("echo.document.deleted", &doc_c)).await.unwrap());
        assert!(!store.delete(&doc_c, &event("echo.document.deleted", &doc_c)).await.unwrap());
        assert!(store.document(&doc_c).await.unwrap().is_none());
        assert_eq!(drain(store).await, ["echo.document.deleted"]);
        assert!(store.duplicate("c-2", "sha-c").await.unwrap().is_none());

        // A rebuild walks indexed documents in id order and counts each once.
        let run = store.create_run().await.unwrap();
        assert_eq!((run.run.total, run.run.status.as_str()), (1, "running"));
        assert_eq!(store.indexed_after("", 10).await.unwrap().iter().map(|d| d.id.clone()).collect::<Vec<_>>(), vec![doc_a.clone()]);
        assert!(store.indexed_after(&doc_a, 10).await.unwrap().is_empty());
        store.advance_run(&run.run.id, "doc-a", true).await.unwrap();
        store.advance_run(&run.run.id, "doc-b", false).await.unwrap();
        // A stopping driver finishes doc-a again after the cursor moved past it, and
        // doc-b after the next start's driver counted it: neither counts twice.
        store.advance_run(&run.run.id, "doc-a", true).await.unwrap();
        store.advance_run(&run.run.id, "doc-b", false).await.unwrap();
        store.advance_run(&run.run.id, "doc-c", true).await.unwrap();
        store.set_run_status(&run.run.id, "done", None).await.unwrap();
        let row = store.latest_run().await.unwrap().unwrap();
        assert_eq!((row.run.done, row.run.failed, row.cursor.as_str(), row.run.status.as_str()), (2, 1, "doc-c", "done"));
        assert!(row.run.finished_at.is_some());
        assert_eq!(store.indexed_since(0, &doc_a).await.unwrap().len(), 1);
        assert!(store.indexed_since(i64::MAX, &doc_a).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn sqlite_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance(&SqliteCatalog::open(&dir.path().join("ingest.db")).await.unwrap()).await;
    }

    /// On a scratch database of the test PostgreSQL (skipped with a reason when it is not
    /// reachable, failed under CI).
    #[tokio::test]
    async fn postgres_conforms() {
        let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
        conformance(&PgCatalog::open(&server.url).await.unwrap()).await;
        server.cleanup().await;
    }
}
