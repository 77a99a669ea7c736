//! The one trait every storage backend of the bus implements, and `open`, which picks
//! the backend from the URL in config: `sqlite:` (or none: the embedded default under
//! the data dir), `postgres://…`, `nats://…`. The REST facade in `lib.rs` only talks
//! to this trait, so the other services never know which backend runs.
//!
//! Semantics every backend keeps (the conformance suite in `tests/api/conformance.rs`
//! checks them against all three): fan-out to every subscription of a topic, one
//! lease at a time per message within a subscription, publish answered only once
//! durable, nack → redelivery after exponential backoff, `max_deliveries` → dead letter
//! with the last error, redrive, idempotent publish by key within a window, delayed
//! delivery, per-key ordering on subscriptions that ask for it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

use common::bus::Delivery;
use common::wire::CloudEvent;

/// A subscription as declared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Subscription {
    pub name: String,
    pub topic: String,
    pub max_deliveries: i64,
    pub lease_ms: i64,
    /// Messages with the same ordering key are delivered one at a time, in publish order.
    pub ordered: bool,
}

/// What declaring a subscription did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    Created,
    /// It existed with the same topic (its settings are updated).
    Exists,
    /// The name is taken by a subscription of another topic.
    Conflict,
}

/// A message to publish.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub event: CloudEvent,
    /// Idempotency key: a second publish with the same key on the topic within the
    /// window is a no-op answering the first message's id.
    pub key: Option<String>,
    /// Ordering key, honoured by subscriptions declared `ordered`.
    pub ordering_key: Option<String>,
    pub delay_ms: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SubscriptionStats {
    pub subscription: String,
    pub topic: String,
    /// Waiting to be delivered (including delayed and backing-off messages).
    pub depth: i64,
    pub in_flight: i64,
    pub dead_letters: i64,
    /// Age of the oldest message not yet settled, if any.
    pub oldest_age_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    /// The id to redrive it by (the backend's sequence number).
    pub seq: i64,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub event: serde_json::Value,
}

/// What a backend can promise beyond the common semantics; the conformance suite
/// checks each promise a backend makes.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// An ack or nack with a lease that expired (the message was leased again) is
    /// refused. Without it (JetStream) such an ack is answered but may be ignored, and
    /// the message is delivered again: at-least-once still holds.
    pub stale_leases_refused: bool,
    /// `extend` sets the lease to exactly the asked duration (JetStream restarts the
    /// subscription's lease instead).
    pub exact_extend: bool,
}

pub type Result<T> = anyhow::Result<T>;

#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// `sqlite`, `postgres` or `nats`.
    fn kind(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// Creates the subscription, or updates its settings if it exists on the same topic.
    async fn declare(&self, subscription: &Subscription) -> Result<Declared>;
    /// Stores `messages` durably and fans them out to every subscription of `topic`;
    /// answers the message ids (the first message's id for a repeated key).
    async fn publish(&self, topic: &str, messages: Vec<NewMessage>) -> Result<Vec<String>>;
    /// Leases up to `max` available messages, waiting up to `wait` for the first one.
    /// `None` when the subscription does not exist.
    async fn pull(&self, subscription: &str, max: usize, wait: Duration) -> Result<Option<Vec<Delivery>>>;
    /// Settles a delivery; `false` when the lease is no longer the message's.
    async fn ack(&self, subscription: &str, seq: i64, lease: &str) -> Result<bool>;
    /// Gives a delivery back: redelivered after a backoff, or dead-lettered with
    /// `error` once its deliveries are used up. `false` when the lease is stale.
    async fn nack(&self, subscription: &str, seq: i64, lease: &str, error: &str) -> Result<bool>;
    async fn extend(&self, subscription: &str, seq: i64, lease: &str, lease_ms: i64) -> Result<bool>;
    async fn stats(&self) -> Result<Vec<SubscriptionStats>>;
    async fn dead_letters(&self, subscription: &str, limit: i64) -> Result<Vec<DeadLetter>>;
    /// Delivers dead letters again (one, or all when `seq` is `None`) with a fresh budget.
    async fn redrive(&self, subscription: &str, seq: Option<i64>) -> Result<u64>;
    /// Periodic work: dropping message bodies nobody needs, expiring idempotency keys.
    async fn housekeeping(&self) -> Result<()>;
    /// Whether the backing store answers (for `/readyz`).
    async fn ping(&self) -> Result<()>;
}

/// Knobs every backend takes from `queue.*` config.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options { idempotency_window: Duration::from_secs(24 * 3600) }
    }
}

/// Opens the backend `url` names: `None` or `sqlite:` → `data_dir/queue.db`,
/// `sqlite:///path/file.db` → that file, `postgres://…`, `nats://…`.
pub async fn open(url: Option<&str>, default_sqlite: &Path, options: Options) -> Result<Arc<dyn Backend>> {
    let url = url.map(str::trim).filter(|u| !u.is_empty());
    match url {
        None | Some("sqlite:") | Some("sqlite://") => Ok(Arc::new(crate::sqlite::SqliteBackend::open(default_sqlite, options).await?)),
        Some(u) if u.starts_with("sqlite://") => {
            let path = Path::new(&u["sqlite://".len()..]);
            Ok(Arc::new(crate::sqlite::SqliteBackend::open(path, options).await?))
        }
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            Ok(Arc::new(crate::postgres::PostgresBackend::open(u, options).await?))
        }
        Some(u) if u.starts_with("nats://") => Ok(Arc::new(crate::nats::NatsBackend::open(u, options).await?)),
        Some(u) => anyhow::bail!("queue.url `{}`: expected sqlite:, postgres:// or nats://", redact(u)),
    }
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("redacted"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// Exponential backoff after `attempts` failed deliveries: 0.5 s, 1 s, 2 s … capped at 5 min.
pub fn backoff_ms(attempts: i64) -> i64 {
    let exponent = attempts.clamp(1, 20) - 1;
    (500i64 << exponent.min(10)).min(300_000)
}

/// Long-poll for the SQL backends: try, and while nothing is there wait for a wake-up
/// (a publish, a NOTIFY, the once-a-second tick) until `wait` has passed.
pub(crate) async fn long_poll<F, Fut>(wake: &Notify, wait: Duration, mut attempt: F) -> Result<Option<Vec<Delivery>>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Vec<Delivery>>>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let leased = attempt().await?;
        match &leased {
            None => return Ok(None),
            Some(found) if !found.is_empty() => return Ok(leased),
            Some(_) if tokio::time::Instant::now() >= deadline => return Ok(leased),
            Some(_) => {}
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
            // Delayed, backed-off and expired messages become available with time.
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_ms(1), 500);
        assert_eq!(backoff_ms(2), 1000);
        assert_eq!(backoff_ms(3), 2000);
        assert_eq!(backoff_ms(40), 300_000);
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://echo:s3cret@db:5432/echo"), "postgres://echo:redacted@db:5432/echo");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
