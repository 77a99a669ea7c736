//! The NATS JetStream backend. One stream (`?stream=NAME` in the URL, `ECHO` by
//! default) with file storage and interest retention holds every topic; each
//! subscription is a durable pull consumer filtered on its topic; dead letters live
//! in a second stream, `NAME_DLQ`. The REST facade keeps working unchanged:
//!
//! - the lease handed out is the message's JetStream ack subject (plus the attempt
//!   count), so acks, nacks and extensions need no state in the queue process and
//!   work through any replica and across restarts;
//! - nack → `-NAK` with our backoff as the delay; the last allowed delivery → the
//!   message is copied to the dead-letter stream with its error and terminated;
//! - idempotency keys → `Nats-Msg-Id` (the stream's duplicate window is the
//!   configured idempotency window);
//! - delayed delivery → an `Echo-Not-Before` header: delivered early, the message is
//!   handed back with the remaining delay (that deferral is not counted as an attempt);
//! - ordered subscriptions → `max_ack_pending = 1` (one message at a time, so per key
//!   and overall order);
//! - redrive → the dead letter is republished addressed to its one subscription
//!   (other subscriptions of the topic skip it).
//!
//! Durability: the stream uses file storage, and JetStream acknowledges a publish
//! once stored; it fsyncs every write only when the server runs with
//! `jetstream { sync_interval: always }` (NATS ≥ 2.10; see docs/operating.md).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Mutex;

use common::bus::Delivery;
use common::now_unix_ms;
use common::wire::CloudEvent;

use crate::backend::{Backend, Capabilities, DeadLetter, Declared, NewMessage, Options, Result, Subscription, SubscriptionStats, backoff_ms};

const NOT_BEFORE: &str = "Echo-Not-Before";
const ORDERING_KEY: &str = "Echo-Ordering-Key";
const ERROR: &str = "Echo-Error";
const ATTEMPTS: &str = "Echo-Attempts";
const TOPIC: &str = "Echo-Topic";

pub(crate) struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Stream name; also the first token of its subjects.
    stream: String,
    dlq: String,
    /// Subscriptions by name, read from their consumers' descriptions.
    subscriptions: Mutex<HashMap<String, (Subscription, consumer::PullConsumer)>>,
}

/// Escapes a name into one subject token (and a valid consumer name): `_` → `__`,
/// `.` → `_-`. Injective, so two names never share a token.
fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_-"),
            c => out.push(c),
        }
    }
    out
}

/// The parts of a `$JS.ACK` reply subject a lease is checked against (ADR-15: 9
/// tokens, or 11 and more with domain and account hash).
struct AckSubject<'a> {
    stream: &'a str,
    consumer: &'a str,
    delivered: i64,
    stream_sequence: i64,
}

fn parse_ack(reply: &str) -> Option<AckSubject<'_>> {
    let tokens: Vec<&str> = reply.split('.').collect();
    if tokens.len() < 9 || tokens[0] != "$JS" || tokens[1] != "ACK" {
        return None;
    }
    let base = if tokens.len() == 9 { 2 } else { 4 };
    Some(AckSubject {
        stream: tokens.get(base)?,
        consumer: tokens.get(base + 1)?,
        delivered: tokens.get(base + 2)?.parse().ok()?,
        stream_sequence: tokens.get(base + 3)?.parse().ok()?,
    })
}

impl NatsBackend {
    pub(crate) async fn open(url: &str, options: Options) -> Result<NatsBackend> {
        let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("queue.url {}: {e}", crate::backend::redact(url)))?;
        let stream = parsed.query_pairs().find(|(k, _)| k == "stream").map(|(_, v)| v.to_string()).unwrap_or_else(|| "ECHO".into());
        if stream.is_empty() || !stream.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            anyhow::bail!("queue.url: the stream name must be letters, digits, '_' or '-'");
        }
        let mut server = parsed.clone();
        server.set_query(None);
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(server.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("NATS at {}: {e}", crate::backend::redact(url)))?;
        let js = jetstream::new(client.clone());
        let dlq = format!("{stream}_DLQ");
        js.get_or_create_stream(stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{stream}.>")],
            retention: stream::RetentionPolicy::Interest,
            storage: stream::StorageType::File,
            duplicate_window: options.idempotency_window,
            num_replicas: 1,
            description: Some("Echo event bus".into()),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("JetStream stream {stream}: {e}"))?;
        js.get_or_create_stream(stream::Config {
            name: dlq.clone(),
            subjects: vec![format!("{dlq}.>")],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: 1,
            description: Some("Echo event bus: dead letters".into()),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("JetStream stream {dlq}: {e}"))?;
        Ok(NatsBackend { client, js, stream, dlq, subscriptions: Mutex::new(HashMap::new()) })
    }

    fn topic_filter(&self, topic: &str) -> String {
        format!("{}.{}.>", self.stream, token(topic))
    }

    fn dlq_subject(&self, subscription: &str) -> String {
        format!("{}.{}", self.dlq, token(subscription))
    }

    fn consumer_config(subscription: &Subscription, filter: String) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(token(&subscription.name)),
            description: serde_json::to_string(subscription).ok(),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_millis(subscription.lease_ms.max(1) as u64),
            // Delivery budgets and dead letters are ours (see `pull` and `nack`).
            max_deliver: -1,
            max_ack_pending: if subscription.ordered { 1 } else { 20_000 },
            filter_subject: filter,
            ..Default::default()
        }
    }

    /// The subscription and its consumer, from the cache or the server.
    async fn subscription(&self, name: &str) -> Result<Option<(Subscription, consumer::PullConsumer)>> {
        if let Some(found) = self.subscriptions.lock().await.get(name) {
            return Ok(Some(found.clone()));
        }
        let stream = self.js.get_stream_no_info(&self.stream).await?;
        let info = match stream.consumer_info(token(name)).await {
            Ok(info) => info,
            Err(error) if error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let Some(subscription) = info.config.description.as_deref().and_then(|d| serde_json::from_str::<Subscription>(d).ok()) else {
            return Ok(None);
        };
        let consumer: consumer::PullConsumer = stream.get_consumer(&token(name)).await.map_err(|e| anyhow::anyhow!("JetStream consumer {name}: {e}"))?;
        self.subscriptions.lock().await.insert(name.to_string(), (subscription.clone(), consumer.clone()));
        Ok(Some((subscription, consumer)))
    }

    async fn send_ack(&self, reply: &str, kind: jetstream::AckKind) -> Result<()> {
        let payload: Bytes = kind.into();
        tokio::time::timeout(Duration::from_secs(10), self.client.request(reply.to_string(), payload))
            .await
            .map_err(|_| anyhow::anyhow!("JetStream did not confirm the ack"))??;
        Ok(())
    }

    /// Copies a message into the dead-letter stream with its error, then ends its
    /// deliveries. Copy first: a crash in between leaves a duplicate, never a loss.
    async fn dead_letter(&self, subscription: &str, reply: &str, event: Bytes, topic: &str, attempts: i64, error: &str) -> Result<()> {
        let mut headers = HeaderMap::new();
        headers.insert(ERROR, error.chars().filter(|c| !c.is_control()).take(2000).collect::<String>().as_str());
        headers.insert(ATTEMPTS, attempts.to_string().as_str());
        headers.insert(TOPIC, topic);
        self.js.publish_with_headers(self.dlq_subject(subscription), headers, event).await?.await?;
        self.send_ack(reply, jetstream::AckKind::Term).await
    }

    /// Turns fetched messages into deliveries: skips redrives addressed to other
    /// subscriptions, hands early delayed messages back, dead-letters messages whose
    /// lease expired on their last allowed delivery.
    async fn admit(&self, sub: &Subscription, messages: Vec<jetstream::Message>) -> Result<Vec<Delivery>> {
        let own = format!("to.{}", token(&sub.name));
        let mut deliveries = Vec::with_capacity(messages.len());
        let now = now_unix_ms();
        for message in messages {
            let Some(reply) = message.message.reply.as_ref().map(|r| r.to_string()) else { continue };
            let Some(ack) = parse_ack(&reply) else { continue };
            let subject = message.message.subject.as_str();
            let addressed = subject.strip_prefix(&format!("{}.{}.", self.stream, token(&sub.topic))).unwrap_or("all");
            if addressed != "all" && addressed != own {
                self.send_ack(&reply, jetstream::AckKind::Ack).await?;
                continue;
            }
            let headers = message.message.headers.clone().unwrap_or_default();
            let not_before = headers.get(NOT_BEFORE).and_then(|v| v.as_str().parse::<i64>().ok());
            if let Some(not_before) = not_before.filter(|t| *t > now) {
                self.send_ack(&reply, jetstream::AckKind::Nak(Some(Duration::from_millis((not_before - now) as u64)))).await?;
                continue;
            }
            let attempts = (ack.delivered - i64::from(not_before.is_some())).max(1);
            if attempts > sub.max_deliveries {
                let error = "lease expired after the last allowed delivery";
                self.dead_letter(&sub.name, &reply, message.message.payload.clone(), &sub.topic, attempts - 1, error).await?;
                continue;
            }
            match serde_json::from_slice::<CloudEvent>(&message.message.payload) {
                Ok(event) => deliveries.push(Delivery { seq: ack.stream_sequence, lease: format!("{reply}#{attempts}"), attempts, event, lease_ms: Some(sub.lease_ms) }),
                Err(error) => {
                    let payload = message.message.payload.clone();
                    self.dead_letter(&sub.name, &reply, payload, &sub.topic, attempts, &format!("not a CloudEvent: {error}")).await?;
                }
            }
        }
        Ok(deliveries)
    }

    /// Checks that `lease` is this subscription's lease on message `seq`; answers the
    /// ack subject and the attempt count.
    fn check_lease<'a>(&self, subscription: &str, seq: i64, lease: &'a str) -> Option<(&'a str, i64)> {
        let (reply, attempts) = lease.rsplit_once('#')?;
        let ack = parse_ack(reply)?;
        (ack.stream == self.stream && ack.consumer == token(subscription) && ack.stream_sequence == seq).then_some((reply, attempts.parse().ok()?))
    }

    /// One pull request for up to `max` messages that the server holds for `expires`
    /// at most. Never `no_wait`, never dropped early: the server answers every request
    /// (messages, then a timeout status) before the client stops listening, so no
    /// message is ever sent to an inbox nobody reads (it would sit out a whole lease).
    async fn request(consumer: &consumer::PullConsumer, max: usize, expires: Duration) -> Result<Vec<jetstream::Message>> {
        let mut batch = consumer.batch().max_messages(max).expires(expires).messages().await?;
        let mut messages = Vec::new();
        while let Some(message) = batch.next().await {
            messages.push(message.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        Ok(messages)
    }
}

#[async_trait::async_trait]
impl Backend for NatsBackend {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        // An ack on a redelivered message's old subject is answered by JetStream but
        // not reported as stale (it may be ignored, and the message comes again), and
        // a progress ack restarts the subscription's lease rather than setting one.
        Capabilities { stale_leases_refused: false, exact_extend: false }
    }

    async fn declare(&self, subscription: &Subscription) -> Result<Declared> {
        let stream = self.js.get_stream_no_info(&self.stream).await?;
        let config = Self::consumer_config(subscription, self.topic_filter(&subscription.topic));
        let existing = match self.subscription(&subscription.name).await? {
            Some((existing, _)) if existing.topic != subscription.topic => return Ok(Declared::Conflict),
            Some((existing, _)) => Some(existing),
            None => None,
        };
        if existing.as_ref() == Some(subscription) {
            return Ok(Declared::Exists);
        }
        let consumer: consumer::PullConsumer = stream.create_consumer(config).await.map_err(|e| anyhow::anyhow!("JetStream consumer {}: {e}", subscription.name))?;
        self.subscriptions.lock().await.insert(subscription.name.clone(), (subscription.clone(), consumer));
        Ok(if existing.is_some() { Declared::Exists } else { Declared::Created })
    }

    async fn publish(&self, topic: &str, messages: Vec<NewMessage>) -> Result<Vec<String>> {
        let subject = format!("{}.{}.all", self.stream, token(topic));
        let mut pending = Vec::with_capacity(messages.len());
        for message in &messages {
            let mut headers = HeaderMap::new();
            if let Some(key) = &message.key {
                headers.insert("Nats-Msg-Id", format!("{topic}/{key}").as_str());
            }
            if let Some(key) = &message.ordering_key {
                headers.insert(ORDERING_KEY, key.as_str());
            }
            if message.delay_ms > 0 {
                headers.insert(NOT_BEFORE, (now_unix_ms() + message.delay_ms).to_string().as_str());
            }
            let payload = Bytes::from(serde_json::to_vec(&message.event)?);
            // Sent back to back; the acks are awaited together below.
            pending.push(self.js.publish_with_headers(subject.clone(), headers, payload).await?);
        }
        let mut ids = Vec::with_capacity(messages.len());
        for (message, ack) in messages.iter().zip(pending) {
            let ack = ack.await?;
            if ack.duplicate {
                // The first message's id, as the other backends answer.
                let stream = self.js.get_stream_no_info(&self.stream).await?;
                let id = match stream.get_raw_message(ack.sequence).await {
                    Ok(first) => serde_json::from_slice::<CloudEvent>(&first.payload).map(|e| e.id).unwrap_or_else(|_| message.event.id.clone()),
                    // Already delivered everywhere and removed: the key still held.
                    Err(_) => message.event.id.clone(),
                };
                ids.push(id);
            } else {
                ids.push(message.event.id.clone());
            }
        }
        Ok(ids)
    }

    async fn pull(&self, subscription: &str, max: usize, wait: Duration) -> Result<Option<Vec<Delivery>>> {
        let Some((sub, consumer)) = self.subscription(subscription).await? else { return Ok(None) };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Wait on the server for the first message (at least a moment, so what is
            // already there is found), then take what else is there at once.
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_millis(20));
            let mut messages = Self::request(&consumer, 1, remaining).await?;
            if !messages.is_empty() && max > 1 {
                messages.extend(Self::request(&consumer, max - 1, Duration::from_millis(5)).await?);
            }
            let deliveries = self.admit(&sub, messages).await?;
            if !deliveries.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(Some(deliveries));
            }
        }
    }

    async fn ack(&self, subscription: &str, seq: i64, lease: &str) -> Result<bool> {
        let Some((reply, _)) = self.check_lease(subscription, seq, lease) else { return Ok(false) };
        self.send_ack(reply, jetstream::AckKind::Ack).await?;
        Ok(true)
    }

    async fn nack(&self, subscription: &str, seq: i64, lease: &str, error: &str) -> Result<bool> {
        let Some((reply, attempts)) = self.check_lease(subscription, seq, lease) else { return Ok(false) };
        let Some((sub, _)) = self.subscription(subscription).await? else { return Ok(false) };
        if attempts >= sub.max_deliveries {
            let stream = self.js.get_stream_no_info(&self.stream).await?;
            let message = stream.get_raw_message(seq as u64).await?;
            self.dead_letter(subscription, reply, message.payload, &sub.topic, attempts, error).await?;
        } else {
            let delay = Duration::from_millis(backoff_ms(attempts) as u64);
            self.send_ack(reply, jetstream::AckKind::Nak(Some(delay))).await?;
        }
        Ok(true)
    }

    async fn extend(&self, subscription: &str, seq: i64, lease: &str, _lease_ms: i64) -> Result<bool> {
        let Some((reply, _)) = self.check_lease(subscription, seq, lease) else { return Ok(false) };
        self.send_ack(reply, jetstream::AckKind::Progress).await?;
        Ok(true)
    }

    async fn stats(&self) -> Result<Vec<SubscriptionStats>> {
        let mut stream = self.js.get_stream(&self.stream).await?;
        let mut dlq = self.js.get_stream(&self.dlq).await?;
        let dead_counts: HashMap<String, usize> = {
            let mut counts = HashMap::new();
            let mut subjects = dlq.info_with_subjects(format!("{}.>", self.dlq)).await?;
            while let Some(entry) = subjects.next().await {
                let (subject, n) = entry?;
                counts.insert(subject, n);
            }
            counts
        };
        let _ = dlq.info().await?;
        let mut infos = Vec::new();
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            infos.push(info?);
        }
        let _ = stream.info().await?;
        let now = time::OffsetDateTime::now_utc();
        let mut stats = Vec::new();
        for info in infos {
            let Some(sub) = info.config.description.as_deref().and_then(|d| serde_json::from_str::<Subscription>(d).ok()) else { continue };
            let unsettled = info.num_pending + info.num_ack_pending as u64;
            let oldest_age_ms = if unsettled > 0 {
                let from = info.ack_floor.stream_sequence + 1;
                match stream.get_first_raw_message_by_subject(self.topic_filter(&sub.topic), from).await {
                    Ok(message) => Some(((now - message.time).whole_milliseconds() as i64).max(0)),
                    Err(_) => None,
                }
            } else {
                None
            };
            stats.push(SubscriptionStats {
                dead_letters: dead_counts.get(&self.dlq_subject(&sub.name)).copied().unwrap_or(0) as i64,
                subscription: sub.name,
                topic: sub.topic,
                depth: info.num_pending as i64,
                in_flight: info.num_ack_pending as i64,
                oldest_age_ms,
            });
        }
        stats.sort_by(|a, b| a.subscription.cmp(&b.subscription));
        Ok(stats)
    }

    async fn dead_letters(&self, subscription: &str, limit: i64) -> Result<Vec<DeadLetter>> {
        let dlq = self.js.get_stream_no_info(&self.dlq).await?;
        let subject = self.dlq_subject(subscription);
        let mut letters = Vec::new();
        let mut from = 1;
        while (letters.len() as i64) < limit {
            let Ok(message) = dlq.get_first_raw_message_by_subject(&subject, from).await else { break };
            from = message.sequence + 1;
            letters.push(DeadLetter {
                seq: message.sequence as i64,
                attempts: message.headers.get(ATTEMPTS).and_then(|v| v.as_str().parse().ok()).unwrap_or(0),
                last_error: message.headers.get(ERROR).map(|v| v.as_str().to_string()),
                event: serde_json::from_slice(&message.payload).unwrap_or_default(),
            });
        }
        Ok(letters)
    }

    /// Republishes dead letters addressed to their subscription alone, then removes
    /// them from the dead-letter stream (republish first: never lost, at worst twice).
    async fn redrive(&self, subscription: &str, seq: Option<i64>) -> Result<u64> {
        let Some((sub, _)) = self.subscription(subscription).await? else { return Ok(0) };
        let dlq = self.js.get_stream_no_info(&self.dlq).await?;
        let letters = match seq {
            Some(seq) => vec![seq],
            None => self.dead_letters(subscription, i64::MAX).await?.into_iter().map(|l| l.seq).collect(),
        };
        let target = format!("{}.{}.to.{}", self.stream, token(&sub.topic), token(subscription));
        let mut n = 0;
        for seq in letters {
            let Ok(message) = dlq.get_raw_message(seq as u64).await else { continue };
            if message.subject.as_str() != self.dlq_subject(subscription) {
                continue;
            }
            let mut headers = HeaderMap::new();
            if let Some(key) = message.headers.get(ORDERING_KEY) {
                headers.insert(ORDERING_KEY, key.as_str());
            }
            self.js.publish_with_headers(target.clone(), headers, message.payload).await?.await?;
            dlq.delete_message(seq as u64).await?;
            n += 1;
        }
        Ok(n)
    }

    async fn housekeeping(&self) -> Result<()> {
        // Interest retention removes a message once every subscription has acked it.
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        self.js.get_stream_no_info(&self.stream).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_injective_and_valid_subject_tokens() {
        assert_eq!(token("echo.document.uploaded"), "echo_-document_-uploaded");
        assert_ne!(token("a.b"), token("a_b"));
        assert_ne!(token("a_-b"), token("a.b"));
        assert!(!token("x.y_z").contains('.'));
    }

    #[test]
    fn ack_subjects_of_both_formats_parse() {
        let v1 = parse_ack("$JS.ACK.ECHO.sub.3.100.7.1790230470084404000.42").unwrap();
        assert_eq!((v1.stream, v1.consumer, v1.delivered, v1.stream_sequence), ("ECHO", "sub", 3, 100));
        let v2 = parse_ack("$JS.ACK.dom.hash.ECHO.sub.2.55.7.1790230470084404000.0.tok").unwrap();
        assert_eq!((v2.stream, v2.consumer, v2.delivered, v2.stream_sequence), ("ECHO", "sub", 2, 55));
        assert!(parse_ack("$JS.ACK.ECHO").is_none());
        assert!(parse_ack("_INBOX.x.y.z.a.b.c.d.e").is_none());
    }
}
