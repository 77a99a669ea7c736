//! The audit service over HTTP, started by its real `run` on a free port: events on
//! the bus are chained once each, and the chain verifies.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use common::ServiceName;
use common::bus::{Bus, PublishMessage};
use common::wire::{AuditEvent, events};
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_chained_once_and_the_chain_verifies() {
    chained_once_and_verified(TestEcho::start().await).await;
}

/// The same with the audit log in PostgreSQL (`audit.database_url`), exported and
/// verified offline from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_database_url_the_audit_log_lives_in_postgresql() {
    let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
    let url = server.url.clone();
    let echo = TestEcho::start_with(|config| config.audit.database_url = common::config::Secret(url)).await;
    let config = echo.config.clone();
    chained_once_and_verified(echo).await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&server.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit.records WHERE action = 'test.audited'").fetch_one(&mut conn).await.unwrap();
    assert_eq!(n, 1);
    assert!(sqlx::query("DELETE FROM audit.records").execute(&mut conn).await.is_err(), "the trigger refuses deletion");
    let mut exported = Vec::new();
    let written = audit::export(&config, &mut exported).await.unwrap();
    assert!(written >= 1);
    let verified = audit::verify_file(std::io::Cursor::new(exported), None).unwrap();
    assert!(verified.chain.ok, "{verified:?}");
    drop(conn);
    server.cleanup().await;
}

async fn chained_once_and_verified(echo: TestEcho) {
    let bus = Bus::new(echo.peers_as(ServiceName::Rag), ServiceName::Rag);
    let audit = AuditEvent { actor: "ann".into(), action: "test.audited".into(), resource: "thing:1".into(), outcome: "success".into(), context: serde_json::json!({}) };
    let event = bus.event(events::AUDIT_RECORDED, None, audit);
    // The same event twice (an at-least-once redelivery) is recorded once.
    bus.publish(vec![PublishMessage { event: event.clone(), key: None, ordering_key: None, delay_ms: None }]).await.unwrap();
    bus.publish(vec![PublishMessage { event, key: None, ordering_key: None, delay_ms: None }]).await.unwrap();
    let peers = echo.peers_as(ServiceName::Gateway);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found: serde_json::Value = peers.get_json(ServiceName::Audit, "/v1/audit?action=test.audited", None).await.unwrap();
        if found["records"].as_array().is_some_and(|r| !r.is_empty()) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let found: serde_json::Value = peers.get_json(ServiceName::Audit, "/v1/audit?action=test.audited", None).await.unwrap();
            assert_eq!(found["records"].as_array().unwrap().len(), 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the audit record never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let verified: serde_json::Value = peers.get_json(ServiceName::Audit, "/v1/audit/verify", None).await.unwrap();
    assert_eq!(verified["ok"], true);
    let offline = audit::verify(&echo.config).await.unwrap();
    assert!(offline.ok);
    echo.stop().await;
}
