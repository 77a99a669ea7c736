//! logs — central operational logs.
//!
//! Consumes `echo.log.batch` from every service into `logs.db` (SQLite with an FTS5
//! index over messages), applies retention by age, count and size, and answers queries by
//! service, level, time, trace id and text. Public surface: `run`.
//! Invariant: user text is matched as quoted phrases, never as FTS query syntax.

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Router, middleware};
use serde::Deserialize;
use sqlx::{Row, SqlitePool};
use tokio::net::TcpListener;

use common::error::{ApiResult, Json, Query};
use common::wire::{LogBatch, LogRecord, events};
use common::{ApiError, ServiceContext, ServiceName};

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

#[derive(Clone)]
struct AppState {
    pool: SqlitePool,
}

/// Runs the logs service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let pool = common::db::open_migrated(&ctx.config.db_path(ServiceName::Logs), MIGRATIONS).await?;
    let state = AppState { pool: pool.clone() };
    let consumer_ready = common::server::ReadyFlag::default();
    spawn_consumer(&ctx, state.clone(), consumer_ready.clone());
    spawn_retention(&ctx, pool.clone());
    let ready = common::server::sqlite_ready(pool.clone(), vec![("the logs subscription", consumer_ready)]);
    let routes = Router::new()
        .route("/v1/logs", get(query))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn spawn_consumer(ctx: &ServiceContext, state: AppState, ready: common::server::ReadyFlag) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let spec = common::bus::SubscriptionSpec { topic: events::LOG_BATCH.into(), max_deliveries: Some(3), lease_ms: Some(30_000), ordered: None };
        if !ctx.bus.declare("logs", &spec, &ctx.shutdown).await {
            return;
        }
        ready.set();
        // Exported from the start, so a dashboard shows 0 rather than no data.
        metrics::counter!("echo_logs_dropped_at_source_total").increment(0);
        ctx.bus.spawn_consumer("logs", 2, ctx.shutdown.clone(), move |event, _| {
            let state = state.clone();
            async move {
                let batch: LogBatch = event.data_as().map_err(|e| format!("bad log batch: {e}"))?;
                if batch.dropped > 0 {
                    metrics::counter!("echo_logs_dropped_at_source_total").increment(batch.dropped);
                }
                store(&state.pool, &batch.records, &event.id).await.map_err(|e| e.to_string())
            }
        });
    });
}

async fn store(pool: &SqlitePool, records: &[LogRecord], _batch_id: &str) -> Result<(), sqlx::Error> {
    let mut tx = common::db::begin_write(pool).await?;
    for record in records.iter().take(10_000) {
        sqlx::query("INSERT INTO records (ts_ms, service, level, target, message, fields, trace_id) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(record.ts_ms)
            .bind(&record.service)
            .bind(&record.level)
            .bind(&record.target)
            .bind(record.message.chars().take(8192).collect::<String>())
            .bind(serde_json::to_string(&record.fields).unwrap_or_default())
            .bind(&record.trace_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

fn spawn_retention(ctx: &ServiceContext, pool: SqlitePool) {
    let config = ctx.config.logs.clone();
    let shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            if let Err(error) = retain(&pool, &config).await {
                tracing::warn!(%error, "log retention failed; retrying in a minute");
            }
        }
    });
}

/// Bytes of `logs.db` in use (the records, their indexes and text index; pages freed by
/// deletions are reused, so the file stops growing where this stops).
async fn bytes_used(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT (c.page_count - f.freelist_count) * s.page_size FROM pragma_page_count() c, pragma_freelist_count() f, pragma_page_size() s").fetch_one(pool).await
}

/// One retention pass: records older than `retention_days`, all but the newest
/// `max_records`, then the oldest while the records take more than `max_megabytes`.
/// Returns how many records were deleted.
async fn retain(pool: &SqlitePool, config: &common::config::LogsConfig) -> Result<u64, sqlx::Error> {
    let cutoff = common::now_unix_ms() - config.retention_days * 86_400_000;
    let mut deleted = sqlx::query("DELETE FROM records WHERE ts_ms < ?").bind(cutoff).execute(pool).await?.rows_affected();
    deleted += sqlx::query("DELETE FROM records WHERE id <= (SELECT MAX(id) FROM records) - ?").bind(config.max_records).execute(pool).await?.rows_affected();
    let limit = config.max_megabytes.max(1) * 1024 * 1024;
    // Down to 90 % of the limit, so the next records do not cross it again at once (and
    // the text index is rewritten only when the limit is crossed); a few rounds at most.
    for _ in 0..8 {
        let used = bytes_used(pool).await?;
        if used <= limit {
            break;
        }
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records").fetch_one(pool).await?;
        if count == 0 {
            break;
        }
        let over = (used - limit * 9 / 10) as f64 / used as f64;
        let remove = ((count as f64 * over).ceil() as i64).clamp(1, count);
        deleted += sqlx::query("DELETE FROM records WHERE id IN (SELECT id FROM records ORDER BY id LIMIT ?)").bind(remove).execute(pool).await?.rows_affected();
        // The text index only marks deletions; merging its segments frees their pages.
        sqlx::query("INSERT INTO records_fts(records_fts) VALUES ('optimize')").execute(pool).await?;
    }
    Ok(deleted)
}

#[derive(Deserialize)]
struct LogQuery {
    service: Option<String>,
    level: Option<String>,
    q: Option<String>,
    trace_id: Option<String>,
    /// Unix milliseconds or RFC 3339.
    since: Option<String>,
    limit: Option<i64>,
    /// Only records stored after this record id, oldest first (for a live tail).
    after: Option<i64>,
    /// Only records whose `org` field is this org. The gateway sets it for everyone
    /// but operators; the service forces it for any non-operator acting user.
    org: Option<String>,
}

fn parse_since(since: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = since.parse::<i64>() {
        return Ok(ms);
    }
    time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| ApiError::bad_request("logs.invalid_since", "since is Unix milliseconds or an RFC 3339 time"))
}

/// Turns user text into an FTS5 query of quoted terms (all must match).
fn fts_query(text: &str) -> String {
    text.split_whitespace().take(16).map(|w| format!("\"{}\"", w.replace('"', "\"\""))).collect::<Vec<_>>().join(" ")
}

async fn query(
    State(state): State<AppState>,
    caller: common::server::Caller,
    Query(mut params): Query<LogQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    // Whoever the gateway acts for sees their org's records only, unless an operator.
    if let Some(principal) = caller.principal.as_ref().filter(|p| !p.is_operator()) {
        params.org = Some(principal.org.clone());
    }
    let since = params.since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
    let limit = params.limit.unwrap_or(200).clamp(1, 1000);
    let levels: Vec<&str> = match params.level.as_deref() {
        None | Some("") => vec!["trace", "debug", "info", "warn", "error"],
        Some("trace") => vec!["trace", "debug", "info", "warn", "error"],
        Some("debug") => vec!["debug", "info", "warn", "error"],
        Some("info") => vec!["info", "warn", "error"],
        Some("warn") => vec!["warn", "error"],
        Some("error") => vec!["error"],
        Some(_) => return Err(ApiError::bad_request("logs.invalid_level", "level is trace, debug, info, warn or error")),
    };
    let fts = params.q.as_deref().map(fts_query).filter(|q| !q.is_empty());
    // Newest first, or oldest first after a record already seen (a tail).
    macro_rules! select {
        ($order:literal) => {
            concat!("SELECT r.* FROM records r
         WHERE r.ts_ms >= ?
           AND (? IS NULL OR r.service = ?)
           AND r.level IN (SELECT value FROM json_each(?))
           AND (? IS NULL OR r.trace_id = ?)
           AND (? IS NULL OR r.id IN (SELECT rowid FROM records_fts WHERE records_fts MATCH ?))
           AND (? IS NULL OR json_extract(r.fields, '$.org') = ?)
           AND (? IS NULL OR r.id > ?)
         ORDER BY r.id ", $order, " LIMIT ?")
        };
    }
    let sql = if params.after.is_some() { select!("ASC") } else { select!("DESC") };
    let rows = sqlx::query(sql)
    .bind(since)
    .bind(&params.service)
    .bind(&params.service)
    .bind(serde_json::to_string(&levels).unwrap_or_default())
    .bind(&params.trace_id)
    .bind(&params.trace_id)
    .bind(&fts)
    .bind(&fts)
    .bind(&params.org)
    .bind(&params.org)
    .bind(params.after)
    .bind(params.after)
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    let records = rows
        .iter()
        .map(|r| {
            let fields: String = r.try_get("fields")?;
            Ok(serde_json::json!({
                "id": r.try_get::<i64, _>("id")?,
                "ts": common::rfc3339(r.try_get::<i64, _>("ts_ms")? / 1000),
                "ts_ms": r.try_get::<i64, _>("ts_ms")?,
                "service": r.try_get::<String, _>("service")?,
                "level": r.try_get::<String, _>("level")?,
                "target": r.try_get::<String, _>("target")?,
                "message": r.try_get::<String, _>("message")?,
                "fields": serde_json::from_str::<serde_json::Value>(&fields).unwrap_or_default(),
                "trace_id": r.try_get::<Option<String>, _>("trace_id")?,
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(serde_json::json!({"records": records})))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn user_text_becomes_quoted_terms() {
        assert_eq!(fts_query("disk full"), "\"disk\" \"full\"");
        assert_eq!(fts_query("a\" OR x"), "\"a\"\"\" \"OR\" \"x\"");
    }

    #[tokio::test]
    async fn stored_records_are_found_by_text_service_and_trace() {
        let dir = tempfile::tempdir().unwrap();
        let pool = common::db::open_migrated(&dir.path().join("logs.db"), MIGRATIONS).await.unwrap();
        let record = |service: &str, message: &str, trace: &str| LogRecord {
            ts_ms: common::now_unix_ms(),
            service: service.into(),
            level: "info".into(),
            target: "t".into(),
            message: message.into(),
            fields: serde_json::json!({"org": if service == "ingest" { "acme" } else { "globex" }}).as_object().cloned().unwrap_or_default(),
            trace_id: Some(trace.into()),
        };
        store(&pool, &[record("ingest", "document indexed quickly", "t1"), record("search", "query served", "t2")], "b").await.unwrap();
        let operator = common::server::Caller {
            client_id: "svc-gateway".into(),
            principal: Some(common::wire::Principal { sub: "op".into(), username: "op".into(), org: "infra".into(), roles: vec!["operator".into()] }),
        };
        let operator_of = || common::server::Caller {
            client_id: "svc-gateway".into(),
            principal: Some(common::wire::Principal { sub: "op".into(), username: "op".into(), org: "infra".into(), roles: vec!["operator".into()] }),
        };
        let acme_admin = common::server::Caller {
            client_id: "svc-gateway".into(),
            principal: Some(common::wire::Principal { sub: "a".into(), username: "a".into(), org: "acme".into(), roles: vec!["admin".into()] }),
        };
        let state = AppState { pool };
        let q = |service: Option<&str>, q: Option<&str>, trace: Option<&str>| LogQuery {
            service: service.map(str::to_string),
            level: None,
            q: q.map(str::to_string),
            trace_id: trace.map(str::to_string),
            since: None,
            limit: None,
            after: None,
            org: Some("globex".into()),
        };
        // Operators may ask for any org; everyone else gets their own, whatever they ask.
        let Json(found) = query(State(state.clone()), operator.clone(), Query(LogQuery { org: None, ..q(None, Some("indexed"), None) })).await.unwrap();
        assert_eq!(found["records"].as_array().unwrap().len(), 1);
        let Json(found) = query(State(state.clone()), operator.clone(), Query(q(Some("search"), None, None))).await.unwrap();
        assert_eq!(found["records"][0]["message"], "query served");
        let Json(found) = query(State(state.clone()), operator, Query(LogQuery { org: None, ..q(None, None, Some("t1")) })).await.unwrap();
        assert_eq!(found["records"][0]["service"], "ingest");
        let Json(found) = query(State(state.clone()), acme_admin.clone(), Query(q(None, None, None))).await.unwrap();
        let services: Vec<&str> = found["records"].as_array().unwrap().iter().map(|r| r["service"].as_str().unwrap()).collect();
        assert_eq!(services, ["ingest"], "asking for globex's records as an acme admin returns acme's only");
        let Json(found) = query(State(state.clone()), acme_admin, Query(q(Some("search"), None, None))).await.unwrap();
        assert!(found["records"].as_array().unwrap().is_empty());
        // A tail: records after one already seen, oldest first.
        store(&state.pool, &[record("search", "later one", "t3"), record("search", "later two", "t3")], "c").await.unwrap();
        let Json(all) = query(State(state.clone()), operator_of(), Query(LogQuery { org: None, ..q(None, None, None) })).await.unwrap();
        let first = all["records"].as_array().unwrap().last().unwrap()["id"].as_i64().unwrap();
        let Json(tail) = query(State(state), operator_of(), Query(LogQuery { org: None, after: Some(first), ..q(None, None, None) })).await.unwrap();
        let messages: Vec<&str> = tail["records"].as_array().unwrap().iter().map(|r| r["message"].as_str().unwrap()).collect();
        assert_eq!(messages, ["query served", "later one", "later two"]);
    }

    fn record(i: usize, ts_ms: i64) -> LogRecord {
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

    #[tokio::test]
    async fn retention_keeps_the_newest_records_within_age_count_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let pool = common::db::open_migrated(&dir.path().join("logs.db"), MIGRATIONS).await.unwrap();
        let now = common::now_unix_ms();
        let old: Vec<LogRecord> = (0..50).map(|i| record(i, now - 20 * 86_400_000)).collect();
        store(&pool, &old, "old").await.unwrap();
        for batch in 0..10 {
            let records: Vec<LogRecord> = (0..500).map(|i| record(batch * 500 + i, now)).collect();
            store(&pool, &records, "new").await.unwrap();
        }
        let before = bytes_used(&pool).await.unwrap();
        assert!(before > 4 * 1024 * 1024, "the test writes more than the limit: {before}");
        let newest: i64 = sqlx::query_scalar("SELECT MAX(id) FROM records").fetch_one(&pool).await.unwrap();

        let config = common::config::LogsConfig { retention_days: 14, max_records: 4_000, max_megabytes: 2 };
        let deleted = retain(&pool, &config).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records").fetch_one(&pool).await.unwrap();
        assert_eq!(deleted as i64 + left, 5_050);
        // Age: none of the old ones; count and size: fewer than the count limit, newest kept.
        let oldest_ts: i64 = sqlx::query_scalar("SELECT MIN(ts_ms) FROM records").fetch_one(&pool).await.unwrap();
        assert!(oldest_ts >= now - 14 * 86_400_000);
        assert!(left < 4_000 && left > 0, "{left}");
        assert_eq!(sqlx::query_scalar::<_, i64>("SELECT MAX(id) FROM records").fetch_one(&pool).await.unwrap(), newest);
        let used = bytes_used(&pool).await.unwrap();
        assert!(used <= 2 * 1024 * 1024, "{used} bytes in use after retention (from {before})");
        // The survivors are the newest, with no gap: a contiguous run of ids.
        let min_id: i64 = sqlx::query_scalar("SELECT MIN(id) FROM records").fetch_one(&pool).await.unwrap();
        assert_eq!(newest - min_id + 1, left);
        // And the text index forgot the deleted ones.
        let indexed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records_fts WHERE records_fts MATCH 'word0x0'").fetch_one(&pool).await.unwrap();
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records WHERE message LIKE 'word0x0 %'").fetch_one(&pool).await.unwrap();
        assert_eq!(indexed, stored);
        // A pass within every limit deletes nothing.
        assert_eq!(retain(&pool, &config).await.unwrap(), 0);
    }
}
