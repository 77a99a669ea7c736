//! The embedded `LogStore`: `logs.db` (SQLite) with an FTS5 index over messages and
//! fields. User words are matched as quoted FTS terms, never as FTS query syntax.

use std::path::Path;

use async_trait::async_trait;
use sqlx::{Row, SqlitePool};

use common::config::LogsConfig;
use common::wire::LogRecord;

use crate::store::{LogFilter, LogStore, MAX_BATCH, MAX_MESSAGE_CHARS, StoreError, StoredRecord, over_budget};

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    service TEXT NOT NULL,
    level TEXT NOT NULL,
    target TEXT NOT NULL,
    message TEXT NOT NULL,
    fields TEXT NOT NULL,
    trace_id TEXT
);
CREATE INDEX records_ts ON records(ts_ms);
CREATE INDEX records_trace ON records(trace_id);
CREATE VIRTUAL TABLE records_fts USING fts5(message, fields, content='records', content_rowid='id');
CREATE TRIGGER records_ai AFTER INSERT ON records BEGIN
  INSERT INTO records_fts(rowid, message, fields) VALUES (new.id, new.message, new.fields);
END;
CREATE TRIGGER records_ad AFTER DELETE ON records BEGIN
  INSERT INTO records_fts(records_fts, rowid, message, fields) VALUES ('delete', old.id, old.message, old.fields);
END;
"#];

pub(crate) struct SqliteLogStore {
    pool: SqlitePool,
}

impl SqliteLogStore {
    pub(crate) async fn open(path: &Path) -> anyhow::Result<SqliteLogStore> {
        Ok(SqliteLogStore { pool: common::db::open_migrated(path, MIGRATIONS).await? })
    }
}

/// User words as an FTS5 query of quoted terms (all must match).
pub(crate) fn fts_query(words: &[String]) -> Option<String> {
    let terms: Vec<String> = words.iter().flat_map(|w| w.split_whitespace()).take(16).map(|w| format!("\"{}\"", w.replace('"', "\"\""))).collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

#[async_trait]
impl LogStore for SqliteLogStore {
    async fn append(&self, records: &[LogRecord]) -> Result<(), StoreError> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        for record in records.iter().take(MAX_BATCH) {
            sqlx::query("INSERT INTO records (ts_ms, service, level, target, message, fields, trace_id) VALUES (?, ?, ?, ?, ?, ?, ?)")
                .bind(record.ts_ms)
                .bind(&record.service)
                .bind(&record.level)
                .bind(&record.target)
                .bind(record.message.chars().take(MAX_MESSAGE_CHARS).collect::<String>())
                .bind(serde_json::to_string(&record.fields).unwrap_or_default())
                .bind(&record.trace_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn query(&self, filter: &LogFilter) -> Result<Vec<StoredRecord>, StoreError> {
        let fts = fts_query(&filter.words);
        // Newest first, or oldest first after a record already seen (a tail).
        macro_rules! select {
            ($order:literal) => {
                concat!(
                    "SELECT r.* FROM records r
                     WHERE r.ts_ms >= ?
                       AND (? IS NULL OR r.service = ?)
                       AND r.level IN (SELECT value FROM json_each(?))
                       AND (? IS NULL OR r.trace_id = ?)
                       AND (? IS NULL OR r.id IN (SELECT rowid FROM records_fts WHERE records_fts MATCH ?))
                       AND (? IS NULL OR json_extract(r.fields, '$.org') = ?)
                       AND (? IS NULL OR r.id > ?)
                     ORDER BY r.id ",
                    $order,
                    " LIMIT ?"
                )
            };
        }
        let sql = if filter.after.is_some() { select!("ASC") } else { select!("DESC") };
        let rows = sqlx::query(sql)
            .bind(filter.since_ms)
            .bind(&filter.service)
            .bind(&filter.service)
            .bind(serde_json::to_string(&filter.levels).unwrap_or_default())
            .bind(&filter.trace_id)
            .bind(&filter.trace_id)
            .bind(&fts)
            .bind(&fts)
            .bind(&filter.org)
            .bind(&filter.org)
            .bind(filter.after)
            .bind(filter.after)
            .bind(filter.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let fields: String = r.try_get("fields")?;
                let ts_ms: i64 = r.try_get("ts_ms")?;
                Ok(StoredRecord {
                    id: r.try_get("id")?,
                    ts: common::rfc3339(ts_ms / 1000),
                    ts_ms,
                    service: r.try_get("service")?,
                    level: r.try_get("level")?,
                    target: r.try_get("target")?,
                    message: r.try_get("message")?,
                    fields: serde_json::from_str(&fields).unwrap_or_default(),
                    trace_id: r.try_get("trace_id")?,
                })
            })
            .collect()
    }

    async fn retain(&self, policy: &LogsConfig) -> Result<u64, StoreError> {
        let pool = &self.pool;
        let cutoff = common::now_unix_ms() - policy.retention_days * 86_400_000;
        let mut deleted = sqlx::query("DELETE FROM records WHERE ts_ms < ?").bind(cutoff).execute(pool).await?.rows_affected();
        deleted += sqlx::query("DELETE FROM records WHERE id <= (SELECT MAX(id) FROM records) - ?").bind(policy.max_records).execute(pool).await?.rows_affected();
        let limit = policy.max_megabytes.max(1) * 1024 * 1024;
        // Down to 90 % of the limit, so the next records do not cross it again at once (and
        // the text index is rewritten only when the limit is crossed); a few rounds at most.
        for _ in 0..8 {
            let used = self.bytes_used().await?;
            if used <= limit {
                break;
            }
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records").fetch_one(pool).await?;
            if count == 0 {
                break;
            }
            let remove = over_budget(used, limit, count);
            deleted += sqlx::query("DELETE FROM records WHERE id IN (SELECT id FROM records ORDER BY id LIMIT ?)").bind(remove).execute(pool).await?.rows_affected();
            // The text index only marks deletions; merging its segments frees their pages.
            sqlx::query("INSERT INTO records_fts(records_fts) VALUES ('optimize')").execute(pool).await?;
        }
        Ok(deleted)
    }

    /// Pages in use (freed pages are reused, so the file stops growing where this stops).
    async fn bytes_used(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT (c.page_count - f.freelist_count) * s.page_size FROM pragma_page_count() c, pragma_freelist_count() f, pragma_page_size() s").fetch_one(&self.pool).await?)
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("logs.db: {e}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn user_words_become_quoted_terms() {
        assert_eq!(fts_query(&["disk full".into()]).unwrap(), "\"disk\" \"full\"");
        assert_eq!(fts_query(&["a\"".into(), "OR".into(), "x".into()]).unwrap(), "\"a\"\"\" \"OR\" \"x\"");
        assert_eq!(fts_query(&[]), None);
    }

    #[tokio::test]
    async fn conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteLogStore::open(&dir.path().join("logs.db")).await.unwrap();
        crate::store::conformance::queries_find_what_was_stored(&store).await;
        let store = SqliteLogStore::open(&dir.path().join("retained.db")).await.unwrap();
        crate::store::conformance::retention_keeps_the_newest_records(&store).await;
    }
}
