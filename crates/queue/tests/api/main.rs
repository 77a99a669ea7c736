//! The queue service over HTTP, started by its real `run` on a free port: fan-out,
//! competing consumers, nack and dead letters, redrive, event validation and auth.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod conformance;

use std::time::Duration;

use common::ServiceName;
use common::bus::{Bus, PublishMessage, SubscriptionSpec};
use common::wire::events;
use echod::testing::TestEcho;

fn spec(max_deliveries: i64) -> SubscriptionSpec {
    SubscriptionSpec { topic: events::CHAT_MESSAGE_POSTED.into(), max_deliveries: Some(max_deliveries), lease_ms: Some(60_000), ordered: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_fan_out_and_poison_messages_are_dead_lettered_then_redriven() {
    let echo = TestEcho::start().await;
    let bus = Bus::new(echo.peers_as(ServiceName::Chat), ServiceName::Chat);
    bus.subscribe("test-a", &spec(2)).await.unwrap();
    bus.subscribe("test-b", &spec(2)).await.unwrap();
    let event = bus.event(events::CHAT_MESSAGE_POSTED, None, serde_json::json!({"room_id": "r", "message_id": "m", "seq": 1}));
    bus.publish(vec![PublishMessage { event: event.clone(), key: Some("k1".into()), ordering_key: None, delay_ms: None }]).await.unwrap();
    bus.publish(vec![PublishMessage { event: event.clone(), key: Some("k1".into()), ordering_key: None, delay_ms: None }]).await.unwrap();

    let a = bus.pull("test-a", 10, Duration::from_secs(2)).await.unwrap();
    let b = bus.pull("test-b", 10, Duration::from_secs(2)).await.unwrap();
    assert_eq!((a.len(), b.len()), (1, 1), "each subscription gets the message once (idempotent publish)");
    assert_eq!(a[0].event, event);
    assert!(bus.pull("test-a", 10, Duration::from_millis(100)).await.unwrap().is_empty(), "a leased message is not handed out twice");
    bus.ack("test-a", &a[0]).await.unwrap();

    // test-b fails twice: the message goes to the dead letters with the last error.
    bus.nack("test-b", &b[0], "first failure").await.unwrap();
    let again = bus.pull("test-b", 10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 2);
    bus.nack("test-b", &again[0], "poison: cannot handle").await.unwrap();
    let peers = echo.peers_as(ServiceName::Chat);
    let dead: serde_json::Value = peers.get_json(ServiceName::Queue, "/v1/subscriptions/test-b/dead-letters", None).await.unwrap();
    assert_eq!(dead["dead_letters"][0]["last_error"], "poison: cannot handle");
    let stats: serde_json::Value = peers.get_json(ServiceName::Queue, "/v1/stats", None).await.unwrap();
    let b_stats = stats["subscriptions"].as_array().unwrap().iter().find(|s| s["subscription"] == "test-b").unwrap().clone();
    assert_eq!(b_stats["dead_letters"], 1);

    let _: serde_json::Value = peers.post_json(ServiceName::Queue, "/v1/subscriptions/test-b/redrive", None, &serde_json::json!({})).await.unwrap();
    let redriven = bus.pull("test-b", 10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(redriven.len(), 1, "a redriven message is delivered again");
    bus.ack("test-b", &redriven[0]).await.unwrap();
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_and_unauthenticated_callers_are_refused() {
    let echo = TestEcho::start().await;
    let bus = Bus::new(echo.peers_as(ServiceName::Chat), ServiceName::Chat);
    let unknown = bus.event("echo.not.a.type", None, serde_json::json!({}));
    let error = bus.publish(vec![PublishMessage { event: unknown, key: None, ordering_key: None, delay_ms: None }]).await.unwrap_err();
    assert_eq!(error.code, "queue.unknown_event_type");
    let malformed = bus.event(events::DOCUMENT_DELETED, None, serde_json::json!({"document_id": 7}));
    let error = bus.publish(vec![PublishMessage { event: malformed, key: None, ordering_key: None, delay_ms: None }]).await.unwrap_err();
    assert_eq!(error.code, "queue.invalid_event_data");

    let http = reqwest::Client::new();
    let anonymous = http.get(format!("{}/v1/stats", echo.url(ServiceName::Queue))).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let health = http.get(format!("{}/healthz", echo.url(ServiceName::Queue))).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // One process runs every service here: the gateway's /metrics serves its registry,
    // the queue's says so (a scrape of every service counts nothing twice).
    let metrics = http.get(format!("{}/metrics", echo.url(ServiceName::Queue))).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("served by gateway"), "{metrics}");
    let metrics = http.get(format!("{}/metrics", echo.url(ServiceName::Gateway))).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("echo_http_requests_total{service=\"queue\""), "{metrics}");
    echo.stop().await;
}

/// The REST API is described, without a token, and the description names every route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_described_in_openapi() {
    let echo = TestEcho::start().await;
    let url = format!("{}/v1/openapi.json", echo.url(ServiceName::Queue));
    let doc: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let source = include_str!("../../src/lib.rs");
    let mut routes = 0;
    for line in source.lines().filter(|l| l.trim_start().starts_with(".route(\"")) {
        let path = line.split('"').nth(1).unwrap();
        assert!(doc["paths"][path].is_object(), "{path} is not described");
        routes += 1;
    }
    assert!(routes >= 9, "every route of the bus was checked ({routes})");
    // Everything else still needs a service token.
    let stats = reqwest::get(format!("{}/v1/stats", echo.url(ServiceName::Queue))).await.unwrap();
    assert_eq!(stats.status(), 401);
    echo.stop().await;
}

/// A handler that runs for three leases keeps its message: `spawn_consumer` extends the
/// lease while it works, so no second consumer gets the message meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handlers_keep_their_lease_and_run_once() {
    let echo = TestEcho::start().await;
    let bus = Bus::new(echo.peers_as(ServiceName::Chat), ServiceName::Chat);
    let spec = SubscriptionSpec { topic: events::CHAT_MESSAGE_POSTED.into(), max_deliveries: Some(5), lease_ms: Some(600), ordered: None };
    bus.subscribe("test-long", &spec).await.unwrap();
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let counted = runs.clone();
    // Two competing handlers: without the keep-alive the second would get the message
    // when the first one's 600 ms lease runs out.
    let consumer = bus.spawn_consumer("test-long", 2, shutdown.clone(), move |_event, _attempts| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2000)).await;
            Ok(())
        }
    });
    let event = bus.event(events::CHAT_MESSAGE_POSTED, None, serde_json::json!({"room_id": "r", "message_id": "long", "seq": 1}));
    bus.publish_one(event).await.unwrap();
    let peers = echo.peers_as(ServiceName::Chat);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let stats: serde_json::Value = peers.get_json(ServiceName::Queue, "/v1/stats", None).await.unwrap();
        let s = stats["subscriptions"].as_array().unwrap().iter().find(|s| s["subscription"] == "test-long").unwrap().clone();
        if runs.load(std::sync::atomic::Ordering::SeqCst) > 0 && s["depth"] == 0 && s["in_flight"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not settled: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1, "the message ran once, its lease extended while it ran");
    shutdown.cancel();
    consumer.await.unwrap();
    echo.stop().await;
}
