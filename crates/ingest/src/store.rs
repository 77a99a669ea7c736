//! The document catalog, jobs and the transactional outbox in `ingest.db`. A
//! document, its job and its `echo.document.uploaded` event commit together; the
//! relay publishes the outbox afterwards. No HTTP types here.

use sqlx::{Row, SqlitePool};

use common::wire::{CloudEvent, Document, Job, NewDocument, ReindexRun};
use common::{now_unix, rfc3339};

pub(crate) const MIGRATIONS: &[&str] = &[r#"
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

/// A rebuild of the index and where it stands: the last document done (`cursor`,
/// documents go in id order) and when it started (documents that became indexed
/// after that are swept again at the end).
#[derive(Clone, Debug)]
pub(crate) struct RunRow {
    pub(crate) run: ReindexRun,
    pub(crate) cursor: String,
    pub(crate) started_unix: i64,
}

fn run_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<RunRow, sqlx::Error> {
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

#[derive(Clone)]
pub(crate) struct CatalogStore {
    pub(crate) pool: SqlitePool,
}

fn document_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Document, sqlx::Error> {
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

impl CatalogStore {
    pub(crate) async fn open(path: &std::path::Path) -> Result<CatalogStore, sqlx::Error> {
        let pool = common::db::open_migrated(path, MIGRATIONS).await?;
        Ok(CatalogStore { pool })
    }

    /// A live document of the collection with the same content, if any.
    pub(crate) async fn duplicate(&self, collection_id: &str, sha256: &str) -> Result<Option<Document>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM documents WHERE collection_id = ? AND sha256 = ? AND deleted_at IS NULL LIMIT 1")
            .bind(collection_id)
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(document_from_row).transpose()
    }

    /// Creates the document, its job and the outbox event in one transaction.
    pub(crate) async fn create(&self, new: &NewDocument, make_event: impl FnOnce(&str, &str) -> CloudEvent) -> Result<(String, String), sqlx::Error> {
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

    pub(crate) async fn document(&self, id: &str) -> Result<Option<Document>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM documents WHERE id = ? AND deleted_at IS NULL").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(document_from_row).transpose()
    }

    /// Live documents of `collections`; in those of `restricted` only the listed
    /// classifications.
    pub(crate) async fn list(
        &self,
        collections: &[String],
        restricted: &std::collections::BTreeMap<String, Vec<String>>,
        filter: &common::wire::DocumentFilter,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<Document>, i64), sqlx::Error> {
        if collections.is_empty() {
            return Ok((vec![], 0));
        }
        let full: Vec<&String> = collections.iter().filter(|c| !restricted.contains_key(*c)).collect();
        let pairs: Vec<String> = collections
            .iter()
            .filter_map(|c| restricted.get(c).map(|classes| (c, classes)))
            .flat_map(|(c, classes)| classes.iter().map(move |class| format!("{c}#{class}")))
            .collect();
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
    pub(crate) async fn cancel(&self, job_id: &str) -> Result<Result<(), String>, sqlx::Error> {
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
    pub(crate) async fn retry(&self, job_id: &str, event: &CloudEvent) -> Result<Result<(), String>, sqlx::Error> {
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
    pub(crate) async fn delete(&self, id: &str, event: &CloudEvent) -> Result<bool, sqlx::Error> {
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

    /// Live documents of a collection (for deleting the collection), at most `limit`.
    pub(crate) async fn documents_in(&self, collection_id: &str, limit: i64) -> Result<Vec<Document>, sqlx::Error> {
        let (documents, _) = self.list(&[collection_id.to_string()], &Default::default(), &Default::default(), limit, 0).await?;
        Ok(documents)
    }

    pub(crate) async fn job(&self, id: &str) -> Result<Option<Job>, sqlx::Error> {
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
    pub(crate) async fn set_stage(&self, job_id: &str, status: &str, attempts: Option<i64>, error: Option<&str>) -> Result<bool, sqlx::Error> {
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
    pub(crate) async fn set_progress(&self, document_id: &str, pages: Option<Option<u32>>, chunks: Option<usize>, embedded: Option<usize>) -> Result<(), sqlx::Error> {
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

    pub(crate) async fn set_chunks(&self, document_id: &str, n_chunks: usize) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE documents SET n_chunks = ? WHERE id = ?").bind(n_chunks as i64).bind(document_id).execute(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn outbox_batch(&self, limit: i64) -> Result<Vec<(i64, CloudEvent)>, sqlx::Error> {
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

    pub(crate) async fn outbox_done(&self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM outbox WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// The newest rebuild of the index, if any ever ran.
    pub(crate) async fn latest_run(&self) -> Result<Option<RunRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM reindex_runs ORDER BY started_at DESC, rowid DESC LIMIT 1").fetch_optional(&self.pool).await?;
        row.as_ref().map(run_from_row).transpose()
    }

    /// A new rebuild over every indexed document.
    pub(crate) async fn create_run(&self) -> Result<RunRow, sqlx::Error> {
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

    pub(crate) async fn set_run_status(&self, id: &str, status: &str, error: Option<&str>) -> Result<(), sqlx::Error> {
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
    pub(crate) async fn advance_run(&self, id: &str, document_id: &str, ok: bool) -> Result<(), sqlx::Error> {
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
    pub(crate) async fn indexed_after(&self, cursor: &str, limit: i64) -> Result<Vec<Document>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM documents WHERE status = 'done' AND deleted_at IS NULL AND id > ? ORDER BY id LIMIT ?")
            .bind(cursor)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(document_from_row).collect()
    }

    /// Documents the rebuild passed that became indexed at or after `since`.
    pub(crate) async fn indexed_since(&self, since: i64, cursor: &str) -> Result<Vec<Document>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM documents WHERE status = 'done' AND deleted_at IS NULL AND updated_at >= ? AND id <= ? ORDER BY id")
            .bind(since)
            .bind(cursor)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(document_from_row).collect()
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

    #[tokio::test]
    async fn a_rebuild_counts_a_document_once_however_often_it_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let store = CatalogStore::open(&dir.path().join("catalog.db")).await.unwrap();
        let run = store.create_run().await.unwrap();
        store.advance_run(&run.run.id, "doc-a", true).await.unwrap();
        store.advance_run(&run.run.id, "doc-b", false).await.unwrap();
        // A stopping driver finishes doc-a again after the cursor moved past it, and
        // doc-b after the next start's driver counted it: neither counts twice.
        store.advance_run(&run.run.id, "doc-a", true).await.unwrap();
        store.advance_run(&run.run.id, "doc-b", false).await.unwrap();
        store.advance_run(&run.run.id, "doc-c", true).await.unwrap();
        let row = store.latest_run().await.unwrap().unwrap();
        assert_eq!((row.run.done, row.run.failed, row.cursor.as_str()), (2, 1, "doc-c"));
    }
}
