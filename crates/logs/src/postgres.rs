//! The `LogStore` on PostgreSQL, for several machines: records in the schema named after
//! the service (`logs`), words found through a generated `tsvector` (the `simple`
//! configuration: every word as written, lower-cased) with a GIN index. User words go in
//! as `plainto_tsquery` text, never as query syntax.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use common::config::LogsConfig;
use common::wire::LogRecord;

use crate::store::{LogFilter, LogStore, MAX_BATCH, MAX_MESSAGE_CHARS, StoreError, StoredRecord, over_budget};

pub(crate) struct PgLogStore {
    pool: PgPool,
    /// `schema.records`.
    table: String,
}

impl PgLogStore {
    /// Connects and creates the schema and table when missing. `schema` is Echo's own
    /// name (letters and `_`), never user input.
    pub(crate) async fn open(url: &str, schema: &'static str) -> anyhow::Result<PgLogStore> {
        anyhow::ensure!(schema.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "schema name {schema}");
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("logs database URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for the logs: {e}"))?;
        let table = format!("{schema}.records");
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-logs-migrate'))").execute(&mut *tx).await?;
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {table} (
                 id BIGSERIAL PRIMARY KEY,
                 ts_ms BIGINT NOT NULL,
                 service TEXT NOT NULL,
                 level TEXT NOT NULL,
                 target TEXT NOT NULL,
                 message TEXT NOT NULL,
                 fields JSONB NOT NULL,
                 trace_id TEXT,
                 words TSVECTOR GENERATED ALWAYS AS (to_tsvector('simple', message || ' ' || fields::text)) STORED
             );
             CREATE INDEX IF NOT EXISTS records_ts ON {table} (ts_ms);
             CREATE INDEX IF NOT EXISTS records_trace ON {table} (trace_id);
             CREATE INDEX IF NOT EXISTS records_words ON {table} USING GIN (words);"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(ddl)).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(PgLogStore { pool, table })
    }
}

#[async_trait]
impl LogStore for PgLogStore {
    async fn append(&self, records: &[LogRecord]) -> Result<(), StoreError> {
        let records = &records[..records.len().min(MAX_BATCH)];
        let column = |f: fn(&LogRecord) -> String| records.iter().map(f).collect::<Vec<String>>();
        // One statement for the batch.
        let sql = format!(
            "INSERT INTO {} (ts_ms, service, level, target, message, fields, trace_id)
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::text[])",
            self.table
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(records.iter().map(|r| r.ts_ms).collect::<Vec<i64>>())
            .bind(column(|r| r.service.clone()))
            .bind(column(|r| r.level.clone()))
            .bind(column(|r| r.target.clone()))
            .bind(column(|r| r.message.chars().take(MAX_MESSAGE_CHARS).collect::<String>().replace('\0', "")))
            .bind(records.iter().map(|r| serde_json::Value::Object(r.fields.clone())).collect::<Vec<serde_json::Value>>())
            .bind(records.iter().map(|r| r.trace_id.clone()).collect::<Vec<Option<String>>>())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn query(&self, filter: &LogFilter) -> Result<Vec<StoredRecord>, StoreError> {
        let words = filter.words.iter().flat_map(|w| w.split_whitespace()).take(16).collect::<Vec<_>>().join(" ");
        let words = (!words.is_empty()).then_some(words);
        let order = if filter.after.is_some() { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT id, ts_ms, service, level, target, message, fields, trace_id FROM {}
             WHERE ts_ms >= $1
               AND ($2::text IS NULL OR service = $2)
               AND level = ANY($3)
               AND ($4::text IS NULL OR trace_id = $4)
               AND ($5::text IS NULL OR words @@ plainto_tsquery('simple', $5))
               AND ($6::text IS NULL OR fields->>'org' = $6)
               AND ($7::bigint IS NULL OR id > $7)
             ORDER BY id {order} LIMIT $8",
            self.table
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(filter.since_ms)
            .bind(&filter.service)
            .bind(filter.levels.iter().map(|l| l.to_string()).collect::<Vec<String>>())
            .bind(&filter.trace_id)
            .bind(&words)
            .bind(&filter.org)
            .bind(filter.after)
            .bind(filter.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let ts_ms: i64 = r.try_get("ts_ms")?;
                Ok(StoredRecord {
                    id: r.try_get("id")?,
                    ts: common::rfc3339(ts_ms / 1000),
                    ts_ms,
                    service: r.try_get("service")?,
                    level: r.try_get("level")?,
                    target: r.try_get("target")?,
                    message: r.try_get("message")?,
                    fields: r.try_get("fields")?,
                    trace_id: r.try_get("trace_id")?,
                })
            })
            .collect()
    }

    async fn retain(&self, policy: &LogsConfig) -> Result<u64, StoreError> {
        let table = &self.table;
        let cutoff = common::now_unix_ms() - policy.retention_days * 86_400_000;
        let mut deleted = sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE ts_ms < $1"))).bind(cutoff).execute(&self.pool).await?.rows_affected();
        deleted += sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE id <= (SELECT MAX(id) FROM {table}) - $1")))
            .bind(policy.max_records)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let limit = policy.max_megabytes.max(1) * 1024 * 1024;
        for _ in 0..8 {
            // The table's files bound what the rows take; only when they are over the
            // limit are the rows themselves measured (deleted rows' space is reused after
            // autovacuum, so the files stop growing there).
            let files: i64 = sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)").bind(table).fetch_one(&self.pool).await?;
            if files <= limit {
                break;
            }
            let used = self.bytes_used().await?;
            if used <= limit {
                break;
            }
            let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"))).fetch_one(&self.pool).await?;
            if count == 0 {
                break;
            }
            let remove = over_budget(used, limit, count);
            deleted += sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT $1)")))
                .bind(remove)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(deleted)
    }

    /// The live rows' bytes (their columns, the word vector included).
    async fn bytes_used(&self) -> Result<i64, StoreError> {
        let sql = format!("SELECT COALESCE(SUM(pg_column_size(r.*)), 0)::bigint FROM {} r", self.table);
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&self.pool).await?)
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("PostgreSQL: {e}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The conformance suite on a scratch database of the test PostgreSQL (skipped with a
    /// reason when it is not reachable, failed under CI).
    #[tokio::test]
    async fn conforms() {
        let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
        let store = PgLogStore::open(&server.url, "logs").await.unwrap();
        crate::store::conformance::queries_find_what_was_stored(&store).await;
        // Opening again (another replica, a restart) keeps what is there.
        let again = PgLogStore::open(&server.url, "logs").await.unwrap();
        assert!(!again.query(&LogFilter { levels: vec!["info"], limit: 10, ..Default::default() }).await.unwrap().is_empty());
        sqlx::query("DROP TABLE logs.records").execute(&store.pool).await.unwrap();
        let store = PgLogStore::open(&server.url, "logs").await.unwrap();
        crate::store::conformance::retention_keeps_the_newest_records(&store).await;
        drop(store);
        drop(again);
        server.cleanup().await;
    }
}
