//! The logs service over HTTP, started by its real `run` on a free port: batches
//! published on the bus become queryable records — with `logs.db` and with the records
//! in PostgreSQL (`database.url`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use common::ServiceName;
use common::bus::{Bus, PublishMessage};
use common::wire::{LogBatch, LogRecord, events};
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_batches_are_stored_and_found_by_text_and_trace() {
    let echo = TestEcho::start().await;
    batches_are_found(&echo).await;
    echo.stop().await;
}

/// The same with `database.url` naming a PostgreSQL: the records are in its `logs`
/// schema, not in `logs.db`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_database_url_the_records_live_in_postgresql() {
    let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
    let url = server.url.clone();
    let echo = TestEcho::start_with(|config| config.database.url = common::config::Secret(url)).await;
    batches_are_found(&echo).await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&server.url).await.unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM logs.records WHERE message = 'segment merge slow zebra'").fetch_one(&mut conn).await.unwrap();
    assert_eq!(stored, 1);
    assert!(!echo.config.db_path(ServiceName::Logs).exists(), "no logs.db beside PostgreSQL");
    drop(conn);
    echo.stop().await;
    server.cleanup().await;
}

async fn batches_are_found(echo: &TestEcho) {
    let bus = Bus::new(echo.peers_as(ServiceName::Search), ServiceName::Search);
    let record = LogRecord {
        ts_ms: common::now_unix_ms(),
        service: "search".into(),
        level: "warn".into(),
        target: "search::index".into(),
        message: "segment merge slow zebra".into(),
        fields: Default::default(),
        trace_id: Some("trace-xyz".into()),
    };
    let event = bus.event(events::LOG_BATCH, None, LogBatch { records: vec![record], dropped: 0 });
    bus.publish(vec![PublishMessage { event, key: None, ordering_key: None, delay_ms: None }]).await.unwrap();
    let peers = echo.peers_as(ServiceName::Gateway);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found: serde_json::Value = peers.get_json(ServiceName::Logs, "/v1/logs?q=zebra&level=warn&trace_id=trace-xyz", None).await.unwrap();
        if found["records"].as_array().is_some_and(|r| r.len() == 1) {
            assert_eq!(found["records"][0]["service"], "search");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the record never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad = peers.get_json::<serde_json::Value>(ServiceName::Logs, "/v1/logs?level=loud", None).await.unwrap_err();
    assert_eq!(bad.code, "logs.invalid_level");
}
