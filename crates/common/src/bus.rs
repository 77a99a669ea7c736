//! The `Bus` client every service uses to publish and consume events. It speaks the
//! queue service's REST API; which backend stores the messages is the queue's business.
//!
//! Consumers are at-least-once: a handler that returns `Err` nacks (redelivery with
//! backoff, dead letter after the subscription's `max_deliveries`); handlers must be
//! idempotent.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::client::{Peers, encode};
use crate::config::ServiceName;
use crate::error::ApiError;
use crate::trace::{self, TraceContext};
use crate::wire::CloudEvent;
use tracing::Instrument;

#[derive(Clone)]
pub struct Bus {
    peers: Peers,
    source: String,
    service: ServiceName,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishMessage {
    pub event: CloudEvent,
    /// Idempotency key: a second publish with the same key on the topic is a no-op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Messages with the same ordering key reach a subscription declared `ordered`
    /// one at a time, in publish order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishBatch {
    pub messages: Vec<PublishMessage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishResult {
    pub ids: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubscriptionSpec {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliveries: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<i64>,
    /// Deliver messages of one ordering key one at a time, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PullRequest {
    pub max: usize,
    pub wait_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub seq: i64,
    pub lease: String,
    pub attempts: i64,
    pub event: CloudEvent,
    /// How long the lease lasts from the pull (what `spawn_consumer` keeps extending
    /// while a handler runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PullResponse {
    pub messages: Vec<Delivery>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AckRequest {
    pub seq: i64,
    pub lease: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NackRequest {
    pub seq: i64,
    pub lease: String,
    pub error: String,
}

impl Bus {
    pub fn new(peers: Peers, source: ServiceName) -> Bus {
        Bus { peers, source: format!("echo/{source}"), service: source }
    }

    /// Builds an event from this service.
    pub fn event(&self, type_: &str, subject: Option<String>, data: impl Serialize) -> CloudEvent {
        CloudEvent::new(&self.source, type_, subject, serde_json::to_value(data).unwrap_or_default())
    }

    /// Publishes durably: returns once the queue has committed the events.
    pub async fn publish(&self, events: Vec<PublishMessage>) -> Result<PublishResult, ApiError> {
        let Some(first) = events.first() else { return Ok(PublishResult { ids: vec![] }) };
        let topic = first.event.type_.clone();
        if events.iter().any(|m| m.event.type_ != topic) {
            return Err(ApiError::bad_request("bus.mixed_topics", "a batch must carry one event type"));
        }
        let path = format!("/v1/topics/{}/publish", encode(&topic));
        // Publishing is part of the event's trace, also when a relay publishes it later
        // from outside that work (an outbox).
        let carried = first.event.traceparent.as_deref().and_then(TraceContext::parse).filter(|_| trace::current().is_none());
        let batch = PublishBatch { messages: events };
        let publish = self.peers.post_json(ServiceName::Queue, &path, None, &batch);
        match carried {
            Some(context) => trace::scope(context, publish).await,
            None => publish.await,
        }
    }

    pub async fn publish_one(&self, event: CloudEvent) -> Result<(), ApiError> {
        self.publish(vec![PublishMessage { event, key: None, ordering_key: None, delay_ms: None }]).await.map(|_| ())
    }

    /// Creates the subscription if missing (idempotent).
    pub async fn subscribe(&self, subscription: &str, spec: &SubscriptionSpec) -> Result<(), ApiError> {
        let path = format!("/v1/subscriptions/{}", encode(subscription));
        let _: serde_json::Value = self.peers.put_json(ServiceName::Queue, &path, None, spec).await?;
        Ok(())
    }

    pub async fn pull(&self, subscription: &str, max: usize, wait: Duration) -> Result<Vec<Delivery>, ApiError> {
        let path = format!("/v1/subscriptions/{}/pull", encode(subscription));
        let request = PullRequest { max, wait_ms: wait.as_millis() as u64 };
        let builder = self.peers.request(ServiceName::Queue, Method::POST, &path, None).await?;
        let builder = builder.json(&request).timeout(wait + Duration::from_secs(10));
        let response = self.peers.send(ServiceName::Queue, builder).await?;
        let pulled: PullResponse = response.json().await.map_err(ApiError::internal)?;
        Ok(pulled.messages)
    }

    pub async fn ack(&self, subscription: &str, delivery: &Delivery) -> Result<(), ApiError> {
        let path = format!("/v1/subscriptions/{}/ack", encode(subscription));
        let body = AckRequest { seq: delivery.seq, lease: delivery.lease.clone() };
        let _: serde_json::Value = self.peers.post_json(ServiceName::Queue, &path, None, &body).await?;
        Ok(())
    }

    pub async fn nack(&self, subscription: &str, delivery: &Delivery, error: &str) -> Result<(), ApiError> {
        let path = format!("/v1/subscriptions/{}/nack", encode(subscription));
        let body = NackRequest { seq: delivery.seq, lease: delivery.lease.clone(), error: error.chars().take(2000).collect() };
        let _: serde_json::Value = self.peers.post_json(ServiceName::Queue, &path, None, &body).await?;
        Ok(())
    }

    /// Extends a delivery's lease to `lease_ms` from now (for work that takes longer
    /// than the subscription's lease).
    pub async fn extend(&self, subscription: &str, delivery: &Delivery, lease_ms: i64) -> Result<(), ApiError> {
        let path = format!("/v1/subscriptions/{}/extend", encode(subscription));
        let body = serde_json::json!({"seq": delivery.seq, "lease": delivery.lease, "lease_ms": lease_ms});
        let _: serde_json::Value = self.peers.post_json(ServiceName::Queue, &path, None, &body).await?;
        Ok(())
    }

    /// Declares `subscription` on `topic`, retrying until the queue answers or `shutdown`.
    pub async fn declare(&self, subscription: &str, spec: &SubscriptionSpec, shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(50);
        let started = std::time::Instant::now();
        let mut warned_at: Option<std::time::Instant> = None;
        loop {
            match self.subscribe(subscription, spec).await {
                Ok(()) => return true,
                // Normal while the queue starts; said louder (every 10 s) once it lasts,
                // so a service that never becomes ready says why.
                Err(error) if started.elapsed() >= Duration::from_secs(5) && warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) => {
                    warned_at = Some(std::time::Instant::now());
                    tracing::warn!(%subscription, %error, waited_secs = started.elapsed().as_secs(), "subscription still not declared");
                }
                Err(error) => tracing::debug!(%subscription, %error, "subscription not declared yet"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Runs `handler` over every delivery of `subscription` until `shutdown`, with
    /// `concurrency` handlers in flight. The subscription must already be declared.
    /// While a handler runs, its lease is extended every half lease, so a long job is
    /// not handed to a second consumer; if the consumer dies, the lease runs out.
    pub fn spawn_consumer<F, Fut>(
        &self,
        subscription: &'static str,
        concurrency: usize,
        shutdown: CancellationToken,
        handler: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(CloudEvent, i64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let bus = self.clone();
        let handler = Arc::new(handler);
        tokio::spawn(async move {
            let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
            let mut backoff = Duration::from_millis(100);
            loop {
                if shutdown.is_cancelled() {
                    break;
                }
                let permits = semaphore.available_permits();
                if permits == 0 {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        permit = semaphore.clone().acquire_owned() => drop(permit),
                    }
                    continue;
                }
                let pulled = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    pulled = bus.pull(subscription, permits, Duration::from_secs(10)) => pulled,
                };
                let deliveries = match pulled {
                    Ok(deliveries) => {
                        backoff = Duration::from_millis(100);
                        deliveries
                    }
                    Err(error) => {
                        tracing::debug!(%subscription, %error, "pull failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                for delivery in deliveries {
                    let Ok(permit) = semaphore.clone().acquire_owned().await else { break };
                    let bus = bus.clone();
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        let keep_alive = delivery.lease_ms.filter(|ms| *ms >= 200).map(|lease_ms| {
                            let (bus, delivery) = (bus.clone(), delivery.clone());
                            tokio::spawn(async move {
                                loop {
                                    tokio::time::sleep(Duration::from_millis(lease_ms as u64 / 2)).await;
                                    if let Err(error) = bus.extend(subscription, &delivery, lease_ms).await {
                                        tracing::warn!(%subscription, seq = delivery.seq, %error, "could not extend a lease");
                                        break;
                                    }
                                }
                            })
                        });
                        // The handler's work continues the trace of the event it handles
                        // (or starts one), and its records say so.
                        let parent = delivery.event.traceparent.as_deref().and_then(TraceContext::parse);
                        let parent_span_id = parent.as_ref().map(|p| p.span_id().to_string());
                        let context = parent.map_or_else(|| TraceContext::root().with_sampled(false), |p| p.child());
                        let span = tracing::info_span!("delivery", service = %bus.service, %subscription, seq = delivery.seq, trace_id = %context.trace_id(), span_id = %context.span_id());
                        let started = std::time::SystemTime::now();
                        let outcome = trace::scope(context.clone(), handler(delivery.event.clone(), delivery.attempts).instrument(span)).await;
                        crate::otlp::record(crate::otlp::Finished {
                            service: bus.service.as_str(),
                            name: format!("deliver {}", delivery.event.type_),
                            kind: opentelemetry::trace::SpanKind::Consumer,
                            context: &context,
                            parent_span_id: parent_span_id.as_deref(),
                            started,
                            attributes: vec![
                                opentelemetry::KeyValue::new("messaging.destination.subscription.name", subscription),
                                opentelemetry::KeyValue::new("messaging.message.id", delivery.event.id.clone()),
                                opentelemetry::KeyValue::new("cloudevents.event_type", delivery.event.type_.clone()),
                                opentelemetry::KeyValue::new("cloudevents.event_subject", delivery.event.subject.clone().unwrap_or_default()),
                                opentelemetry::KeyValue::new("echo.attempt", delivery.attempts),
                            ],
                            error: outcome.is_err(),
                        });
                        if let Some(keep_alive) = keep_alive {
                            keep_alive.abort();
                        }
                        let result = match outcome {
                            Ok(()) => bus.ack(subscription, &delivery).await,
                            Err(error) => {
                                tracing::warn!(%subscription, seq = delivery.seq, %error, "handler failed; message will be redelivered");
                                bus.nack(subscription, &delivery, &error).await
                            }
                        };
                        if let Err(error) = result {
                            tracing::warn!(%subscription, seq = delivery.seq, %error, "could not settle delivery; the lease will expire");
                        }
                        drop(permit);
                    });
                }
            }
        })
    }
}
