//! logs — central operational logs.
//!
//! Consumes `echo.log.batch` from every service into a `LogStore` (`store.rs`: SQLite
//! `logs.db` with an FTS5 index by default, PostgreSQL with `logs.database_url` or
//! `database.url`), applies retention by age, count and size, and answers queries by
//! service, level, time, trace id and text. Public surface: `run`.
//! Invariants: user text is matched as words, never as query syntax; whoever the
//! gateway acts for sees their org's records only, unless an operator.

mod postgres;
mod sqlite;
mod store;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Router, middleware};
use serde::Deserialize;
use tokio::net::TcpListener;

use common::error::{ApiResult, Json, Query};
use common::wire::{LogBatch, events};
use common::{ApiError, ServiceContext};

use store::{LogFilter, LogStore};

#[derive(Clone)]
struct AppState {
    store: Arc<dyn LogStore>,
}

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the logs service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let store = store::open(&ctx.config).await?;
    let state = AppState { store: store.clone() };
    let consumer_ready = common::server::ReadyFlag::default();
    spawn_consumer(&ctx, state.clone(), consumer_ready.clone());
    spawn_retention(&ctx, store.clone());
    let ready: common::server::ReadyCheck = Arc::new(move || {
        let store = store.clone();
        let consumer_ready = consumer_ready.clone();
        Box::pin(async move {
            store.ready().await?;
            if consumer_ready.is_set() { Ok(()) } else { Err("the logs subscription is not in place yet".to_string()) }
        })
    });
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
                state.store.append(&batch.records).await.map_err(|e| e.to_string())
            }
        });
    });
}

fn spawn_retention(ctx: &ServiceContext, store: Arc<dyn LogStore>) {
    let config = ctx.config.logs.clone();
    let shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            if let Err(error) = store.retain(&config).await {
                tracing::warn!(%error, "log retention failed; retrying in a minute");
            }
        }
    });
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

async fn query(
    State(state): State<AppState>,
    caller: common::server::Caller,
    Query(mut params): Query<LogQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    // Whoever the gateway acts for sees their org's records only, unless an operator.
    if let Some(principal) = caller.principal.as_ref().filter(|p| !p.is_operator()) {
        params.org = Some(principal.org.clone());
    }
    let levels: Vec<&'static str> = match params.level.as_deref() {
        None | Some("") | Some("trace") => vec!["trace", "debug", "info", "warn", "error"],
        Some("debug") => vec!["debug", "info", "warn", "error"],
        Some("info") => vec!["info", "warn", "error"],
        Some("warn") => vec!["warn", "error"],
        Some("error") => vec!["error"],
        Some(_) => return Err(ApiError::bad_request("logs.invalid_level", "level is trace, debug, info, warn or error")),
    };
    let filter = LogFilter {
        since_ms: params.since.as_deref().map(parse_since).transpose()?.unwrap_or(0),
        service: params.service.filter(|s| !s.is_empty()),
        levels,
        trace_id: params.trace_id.filter(|t| !t.is_empty()),
        words: params.q.map(|q| q.split_whitespace().take(16).map(str::to_string).collect()).unwrap_or_default(),
        org: params.org,
        after: params.after,
        limit: params.limit.unwrap_or(200).clamp(1, 1000),
    };
    let records = state.store.query(&filter).await.map_err(|error| {
        tracing::warn!(%error, "log query failed");
        ApiError::unavailable("logs.store_unavailable", "the log store did not answer; try again")
    })?;
    Ok(Json(serde_json::json!({"records": records})))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stored_records_are_found_by_text_service_and_trace() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn LogStore> = Arc::new(sqlite::SqliteLogStore::open(&dir.path().join("logs.db")).await.unwrap());
        let record = |service: &str, message: &str, trace: &str| common::wire::LogRecord {
            ts_ms: common::now_unix_ms(),
            service: service.into(),
            level: "info".into(),
            target: "t".into(),
            message: message.into(),
            fields: serde_json::json!({"org": if service == "ingest" { "acme" } else { "globex" }}).as_object().cloned().unwrap_or_default(),
            trace_id: Some(trace.into()),
        };
        store.append(&[record("ingest", "document indexed quickly", "t1"), record("search", "query served", "t2")]).await.unwrap();
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
        let state = AppState { store: store.clone() };
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
        store.append(&[record("search", "later one", "t3"), record("search", "later two", "t3")]).await.unwrap();
        let Json(all) = query(State(state.clone()), operator_of(), Query(LogQuery { org: None, ..q(None, None, None) })).await.unwrap();
        let first = all["records"].as_array().unwrap().last().unwrap()["id"].as_i64().unwrap();
        let Json(tail) = query(State(state), operator_of(), Query(LogQuery { org: None, after: Some(first), ..q(None, None, None) })).await.unwrap();
        let messages: Vec<&str> = tail["records"].as_array().unwrap().iter().map(|r| r["message"].as_str().unwrap()).collect();
        assert_eq!(messages, ["query served", "later one", "later two"]);
    }

    #[tokio::test]
    async fn a_bad_level_or_time_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let state = AppState { store: Arc::new(sqlite::SqliteLogStore::open(&dir.path().join("logs.db")).await.unwrap()) };
        let caller = common::server::Caller { client_id: "svc-gateway".into(), principal: None };
        let ask = |level: Option<&str>, since: Option<&str>| LogQuery { service: None, level: level.map(str::to_string), q: None, trace_id: None, since: since.map(str::to_string), limit: None, after: None, org: None };
        let error = query(State(state.clone()), caller.clone(), Query(ask(Some("loud"), None))).await.err().unwrap();
        assert_eq!(error.code, "logs.invalid_level");
        let error = query(State(state.clone()), caller.clone(), Query(ask(None, Some("last tuesday")))).await.err().unwrap();
        assert_eq!(error.code, "logs.invalid_since");
        assert!(query(State(state), caller, Query(ask(Some("warn"), Some("2026-12-07T10:00:00Z")))).await.is_ok());
    }
}
