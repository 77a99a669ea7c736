//! Where log records live: the `LogStore` trait, with SQLite (`logs.db` in the data
//! dir, the embedded default; `sqlite.rs`) and PostgreSQL (schema `logs`, chosen by
//! `logs.database_url` or `database.url`; `postgres.rs`). The consumer, the retention
//! task and the query handler talk to the trait only; one conformance suite (below)
//! runs against both.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use common::config::LogsConfig;
use common::wire::LogRecord;
use common::{EchoConfig, ServiceName};

/// The longest message kept (characters).
pub(crate) const MAX_MESSAGE_CHARS: usize = 8192;
/// The most records one batch may store.
pub(crate) const MAX_BATCH: usize = 10_000;

/// What a query asks for (all conditions hold at once).
#[derive(Clone, Debug, Default)]
pub(crate) struct LogFilter {
    pub(crate) since_ms: i64,
    pub(crate) service: Option<String>,
    /// The levels wanted (at least the asked one).
    pub(crate) levels: Vec<&'static str>,
    pub(crate) trace_id: Option<String>,
    /// Words that must all occur in the message or the fields.
    pub(crate) words: Vec<String>,
    /// Only records whose `org` field is this.
    pub(crate) org: Option<String>,
    /// Only records stored after this id, oldest first (a live tail); else newest first.
    pub(crate) after: Option<i64>,
    pub(crate) limit: i64,
}

/// A stored record as the API returns it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct StoredRecord {
    pub(crate) id: i64,
    pub(crate) ts: String,
    pub(crate) ts_ms: i64,
    pub(crate) service: String,
    pub(crate) level: String,
    pub(crate) target: String,
    pub(crate) message: String,
    pub(crate) fields: serde_json::Value,
    pub(crate) trace_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("log store: {0}")]
pub(crate) struct StoreError(#[from] pub(crate) sqlx::Error);

#[async_trait]
pub(crate) trait LogStore: Send + Sync {
    /// Stores a batch (at most [`MAX_BATCH`] records, messages cut at
    /// [`MAX_MESSAGE_CHARS`]) in one transaction.
    async fn append(&self, records: &[LogRecord]) -> Result<(), StoreError>;
    async fn query(&self, filter: &LogFilter) -> Result<Vec<StoredRecord>, StoreError>;
    /// One retention pass: older than `retention_days`, all but the newest
    /// `max_records`, then the oldest while the records take more than `max_megabytes`.
    /// Returns how many records were deleted.
    async fn retain(&self, policy: &LogsConfig) -> Result<u64, StoreError>;
    /// Bytes the records take (with their indexes).
    async fn bytes_used(&self) -> Result<i64, StoreError>;
    async fn ready(&self) -> Result<(), String>;
}

/// The store `config` names: PostgreSQL when a URL is set, else `logs.db`.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<Arc<dyn LogStore>> {
    match config.database_url(&config.logs.database_url) {
        Some(url) => Ok(Arc::new(crate::postgres::PgLogStore::open(url, "logs").await?)),
        None => Ok(Arc::new(crate::sqlite::SqliteLogStore::open(&config.db_path(ServiceName::Logs)).await?)),
    }
}

/// Records to delete so the bytes in use fall to 90 % of `limit`, assuming records of
/// equal size: a share of `count`, at least one.
pub(crate) fn over_budget(used: i64, limit: i64, count: i64) -> i64 {
    let over = (used - limit * 9 / 10) as f64 / used.max(1) as f64;
    ((count as f64 * over).ceil() as i64).clamp(1, count.max(1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod conformance {
    //! The behaviour every `LogStore` must have, run against SQLite and PostgreSQL.

    use super::*;

    fn record(service: &str, message: &str, trace: &str, org: &str) -> LogRecord {
        LogRecord {
            ts_ms: common::now_unix_ms(),
            service: service.into(),
            level: if message.contains("failed") { "error".into() } else { "info".into() },
            target: "t".into(),
            message: message.into(),
            fields: serde_json::json!({"org": org, "document_id": "d-17"}).as_object().cloned().unwrap_or_default(),
            trace_id: Some(trace.into()),
        }
    }

    fn all() -> LogFilter {
        LogFilter { levels: vec!["trace", "debug", "info", "warn", "error"], limit: 100, ..Default::default() }
    }

    /// Filters, order, the tail and the size of what is kept.
    pub(crate) async fn queries_find_what_was_stored(store: &dyn LogStore) {
        store.ready().await.unwrap();
        store
            .append(&[record("ingest", "document indexed quickly", "t1", "acme"), record("search", "query served", "t2", "globex"), record("ingest", "parse failed badly", "t1", "acme")])
            .await
            .unwrap();
        let newest_first = store.query(&all()).await.unwrap();
        assert_eq!(newest_first.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(), ["parse failed badly", "query served", "document indexed quickly"]);
        assert_eq!(newest_first[0].fields["document_id"], "d-17");
        assert!(newest_first[0].ts.ends_with('Z'));
        // Words: every one must occur, in the message or the fields; case does not matter.
        let found = store.query(&LogFilter { words: vec!["Indexed".into(), "quickly".into()], ..all() }).await.unwrap();
        assert_eq!(found.len(), 1);
        assert!(store.query(&LogFilter { words: vec!["indexed".into(), "slowly".into()], ..all() }).await.unwrap().is_empty());
        assert_eq!(store.query(&LogFilter { words: vec!["d-17".into()], ..all() }).await.unwrap().len(), 3, "fields are searched too");
        // Words are words, never query syntax.
        assert!(store.query(&LogFilter { words: vec!["\"quickly OR".into(), "*".into()], ..all() }).await.is_ok());
        // Service, trace, level, org.
        assert_eq!(store.query(&LogFilter { service: Some("search".into()), ..all() }).await.unwrap()[0].message, "query served");
        assert_eq!(store.query(&LogFilter { trace_id: Some("t1".into()), ..all() }).await.unwrap().len(), 2);
        assert_eq!(store.query(&LogFilter { levels: vec!["warn", "error"], ..all() }).await.unwrap()[0].message, "parse failed badly");
        assert!(store.query(&LogFilter { org: Some("acme".into()), ..all() }).await.unwrap().iter().all(|r| r.fields["org"] == "acme"));
        assert_eq!(store.query(&LogFilter { org: Some("globex".into()), ..all() }).await.unwrap().len(), 1);
        // Limit and since.
        assert_eq!(store.query(&LogFilter { limit: 1, ..all() }).await.unwrap().len(), 1);
        assert!(store.query(&LogFilter { since_ms: common::now_unix_ms() + 60_000, ..all() }).await.unwrap().is_empty());
        // A tail: after an id, oldest first.
        let first = newest_first.last().unwrap().id;
        store.append(&[record("search", "later one", "t3", "globex")]).await.unwrap();
        let tail = store.query(&LogFilter { after: Some(first), ..all() }).await.unwrap();
        assert_eq!(tail.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(), ["query served", "parse failed badly", "later one"]);
        // Long messages are cut, not refused.
        store.append(&[record("search", &"x".repeat(MAX_MESSAGE_CHARS + 100), "t4", "globex")]).await.unwrap();
        let long = store.query(&LogFilter { trace_id: Some("t4".into()), ..all() }).await.unwrap();
        assert_eq!(long[0].message.chars().count(), MAX_MESSAGE_CHARS);
    }

    fn filler(i: usize, ts_ms: i64) -> LogRecord {
        LogRecord {
            ts_ms,
            service: "ingest".into(),
            level: "info".into(),
            target: "ingest::worker".into(),
            // Words that differ per record, so the text index grows with them.
            message: (0..120).map(|w| format!("word{}x{}", i % 997, w)).collect::<Vec<_>>().join(" "),
            fields: Default::default(),
            trace_id: None,
        }
    }

    /// Age, count and size: the newest records stay, in one unbroken run of ids.
    pub(crate) async fn retention_keeps_the_newest_records(store: &dyn LogStore) {
        let now = common::now_unix_ms();
        let old: Vec<LogRecord> = (0..50).map(|i| filler(i, now - 20 * 86_400_000)).collect();
        store.append(&old).await.unwrap();
        for batch in 0..10 {
            let records: Vec<LogRecord> = (0..500).map(|i| filler(batch * 500 + i, now)).collect();
            store.append(&records).await.unwrap();
        }
        let before = store.bytes_used().await.unwrap();
        assert!(before > 4 * 1024 * 1024, "the test writes more than the limit: {before}");
        let stored = store.query(&LogFilter { limit: 1, ..all() }).await.unwrap();
        let newest = stored[0].id;

        let policy = LogsConfig { retention_days: 14, max_records: 4_000, max_megabytes: 2, ..LogsConfig::default() };
        let deleted = store.retain(&policy).await.unwrap();
        let left = store.query(&LogFilter { limit: 1_000_000, ..all() }).await.unwrap();
        assert_eq!(deleted as usize + left.len(), 5_050);
        assert!(left.iter().all(|r| r.ts_ms >= now - 14 * 86_400_000), "none older than the retention");
        assert!(left.len() < 4_000 && !left.is_empty(), "{}", left.len());
        assert_eq!(left[0].id, newest, "the newest record stays");
        assert_eq!(left.first().unwrap().id - left.last().unwrap().id + 1, left.len() as i64, "the survivors are the newest, with no gap");
        let used = store.bytes_used().await.unwrap();
        assert!(used <= 2 * 1024 * 1024, "{used} bytes in use after retention (from {before})");
        // The text index forgot the deleted ones.
        let indexed = store.query(&LogFilter { words: vec!["word0x0".into()], limit: 1_000_000, ..all() }).await.unwrap();
        let stored = left.iter().filter(|r| r.message.starts_with("word0x0 ")).count();
        assert_eq!(indexed.len(), stored);
        // A pass within every limit deletes nothing.
        assert_eq!(store.retain(&policy).await.unwrap(), 0);
    }
}
