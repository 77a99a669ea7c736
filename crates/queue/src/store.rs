//! The embedded queue store: messages, one delivery row per (subscription, message),
//! leases with visibility timeouts, backoff, dead letters, idempotency keys.
//! SQLite in WAL mode with `synchronous=FULL`: a publish returns only once durable.
//! No HTTP types here.

use sqlx::{Row, SqlitePool};

use common::bus::Delivery;
use common::now_unix_ms;
use common::wire::CloudEvent;

pub(crate) const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE subscriptions (
    name TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    max_deliveries INTEGER NOT NULL,
    lease_ms INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX subscriptions_topic ON subscriptions(topic);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    idem_key TEXT,
    body TEXT NOT NULL,
    published_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX messages_idem ON messages(topic, idem_key) WHERE idem_key IS NOT NULL;
CREATE TABLE deliveries (
    subscription TEXT NOT NULL REFERENCES subscriptions(name) ON DELETE CASCADE,
    seq INTEGER NOT NULL REFERENCES messages(seq),
    state TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'dead')),
    available_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease TEXT,
    last_error TEXT,
    PRIMARY KEY (subscription, seq)
);
CREATE INDEX deliveries_ready ON deliveries(subscription, state, available_at);
"#];

#[derive(Clone)]
pub(crate) struct QueueStore {
    pub(crate) pool: SqlitePool,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct SubscriptionStats {
    pub(crate) subscription: String,
    pub(crate) topic: String,
    pub(crate) depth: i64,
    pub(crate) in_flight: i64,
    pub(crate) dead_letters: i64,
    pub(crate) oldest_age_ms: Option<i64>,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct DeadLetter {
    pub(crate) seq: i64,
    pub(crate) attempts: i64,
    pub(crate) last_error: Option<String>,
    pub(crate) event: serde_json::Value,
}

pub(crate) struct NewMessage {
    pub(crate) event: CloudEvent,
    pub(crate) key: Option<String>,
    pub(crate) delay_ms: i64,
}

/// Exponential backoff after `attempts` failed deliveries: 0.5 s, 1 s, 2 s … capped at 5 min.
pub(crate) fn backoff_ms(attempts: i64) -> i64 {
    let exponent = attempts.clamp(1, 20) - 1;
    (500i64 << exponent.min(10)).min(300_000)
}

impl QueueStore {
    pub(crate) async fn open(path: &std::path::Path) -> Result<QueueStore, sqlx::Error> {
        let pool = common::db::open_sqlite(path).await?;
        common::db::migrate(&pool, MIGRATIONS).await?;
        Ok(QueueStore { pool })
    }

    pub(crate) async fn declare(&self, name: &str, topic: &str, max_deliveries: i64, lease_ms: i64) -> Result<bool, sqlx::Error> {
        let existing: Option<String> = sqlx::query_scalar("SELECT topic FROM subscriptions WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match existing {
            Some(existing) => Ok(existing == topic),
            None => {
                sqlx::query("INSERT OR IGNORE INTO subscriptions (name, topic, max_deliveries, lease_ms, created_at) VALUES (?, ?, ?, ?, ?)")
                    .bind(name)
                    .bind(topic)
                    .bind(max_deliveries)
                    .bind(lease_ms)
                    .bind(now_unix_ms())
                    .execute(&self.pool)
                    .await?;
                Ok(true)
            }
        }
    }

    /// Stores messages and fans them out to every subscription of `topic`, in one
    /// transaction. Returns the message ids (the existing id for a repeated key).
    pub(crate) async fn publish(&self, topic: &str, messages: Vec<NewMessage>) -> Result<Vec<String>, sqlx::Error> {
        let now = now_unix_ms();
        let mut tx = common::db::begin_write(&self.pool).await?;
        let subscriptions: Vec<String> = sqlx::query_scalar("SELECT name FROM subscriptions WHERE topic = ?")
            .bind(topic)
            .fetch_all(&mut *tx)
            .await?;
        let mut ids = Vec::with_capacity(messages.len());
        for message in messages {
            if let Some(key) = &message.key {
                let existing: Option<String> = sqlx::query_scalar("SELECT id FROM messages WHERE topic = ? AND idem_key = ?")
                    .bind(topic)
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(existing) = existing {
                    ids.push(existing);
                    continue;
                }
            }
            let body = serde_json::to_string(&message.event).unwrap_or_default();
            let seq: i64 = sqlx::query_scalar("INSERT INTO messages (id, topic, idem_key, body, published_at) VALUES (?, ?, ?, ?, ?) RETURNING seq")
                .bind(&message.event.id)
                .bind(topic)
                .bind(&message.key)
                .bind(body)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            for subscription in &subscriptions {
                sqlx::query("INSERT INTO deliveries (subscription, seq, state, available_at) VALUES (?, ?, 'ready', ?)")
                    .bind(subscription)
                    .bind(seq)
                    .bind(now + message.delay_ms.max(0))
                    .execute(&mut *tx)
                    .await?;
            }
            ids.push(message.event.id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Leases up to `max` available messages. Expired leases count as available, and
    /// a message whose deliveries are used up moves to the dead letters instead.
    pub(crate) async fn lease(&self, subscription: &str, max: usize) -> Result<Option<Vec<Delivery>>, sqlx::Error> {
        let now = now_unix_ms();
        let mut tx = common::db::begin_write(&self.pool).await?;
        let spec: Option<(i64, i64)> = sqlx::query_as("SELECT max_deliveries, lease_ms FROM subscriptions WHERE name = ?")
            .bind(subscription)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((max_deliveries, lease_ms)) = spec else { return Ok(None) };
        sqlx::query(
            "UPDATE deliveries SET state = 'dead', lease = NULL,
                 last_error = COALESCE(last_error, 'lease expired after the last allowed delivery')
             WHERE subscription = ? AND state = 'leased' AND available_at <= ? AND attempts >= ?",
        )
        .bind(subscription)
        .bind(now)
        .bind(max_deliveries)
        .execute(&mut *tx)
        .await?;
        let lease = uuid::Uuid::new_v4().to_string();
        let rows = sqlx::query(
            "UPDATE deliveries SET state = 'leased', lease = ?, attempts = attempts + 1, available_at = ?
             WHERE rowid IN (
                 SELECT rowid FROM deliveries
                 WHERE subscription = ? AND state IN ('ready', 'leased') AND available_at <= ?
                 ORDER BY seq LIMIT ?)
             RETURNING seq, attempts",
        )
        .bind(&lease)
        .bind(now + lease_ms)
        .bind(subscription)
        .bind(now)
        .bind(max as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get("seq")?;
            let attempts: i64 = row.try_get("attempts")?;
            let body: String = sqlx::query_scalar("SELECT body FROM messages WHERE seq = ?").bind(seq).fetch_one(&mut *tx).await?;
            if let Ok(event) = serde_json::from_str::<CloudEvent>(&body) {
                deliveries.push(Delivery { seq, lease: lease.clone(), attempts, event });
            }
        }
        tx.commit().await?;
        deliveries.sort_by_key(|d| d.seq);
        Ok(Some(deliveries))
    }

    pub(crate) async fn ack(&self, subscription: &str, seq: i64, lease: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM deliveries WHERE subscription = ? AND seq = ? AND lease = ? AND state = 'leased'")
            .bind(subscription)
            .bind(seq)
            .bind(lease)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn nack(&self, subscription: &str, seq: i64, lease: &str, error: &str) -> Result<bool, sqlx::Error> {
        let now = now_unix_ms();
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT d.attempts, s.max_deliveries FROM deliveries d JOIN subscriptions s ON s.name = d.subscription
             WHERE d.subscription = ? AND d.seq = ? AND d.lease = ? AND d.state = 'leased'",
        )
        .bind(subscription)
        .bind(seq)
        .bind(lease)
        .fetch_optional(&self.pool)
        .await?;
        let Some((attempts, max_deliveries)) = row else { return Ok(false) };
        let (state, available_at) = if attempts >= max_deliveries { ("dead", now) } else { ("ready", now + backoff_ms(attempts)) };
        sqlx::query("UPDATE deliveries SET state = ?, available_at = ?, lease = NULL, last_error = ? WHERE subscription = ? AND seq = ?")
            .bind(state)
            .bind(available_at)
            .bind(error)
            .bind(subscription)
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(true)
    }

    pub(crate) async fn extend(&self, subscription: &str, seq: i64, lease: &str, lease_ms: i64) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("UPDATE deliveries SET available_at = ? WHERE subscription = ? AND seq = ? AND lease = ? AND state = 'leased'")
            .bind(now_unix_ms() + lease_ms)
            .bind(subscription)
            .bind(seq)
            .bind(lease)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn stats(&self) -> Result<Vec<SubscriptionStats>, sqlx::Error> {
        let now = now_unix_ms();
        let rows = sqlx::query(
            "SELECT s.name, s.topic,
                 COALESCE(SUM(d.state = 'ready'), 0) AS depth,
                 COALESCE(SUM(d.state = 'leased'), 0) AS in_flight,
                 COALESCE(SUM(d.state = 'dead'), 0) AS dead,
                 MIN(CASE WHEN d.state != 'dead' THEN m.published_at END) AS oldest
             FROM subscriptions s
             LEFT JOIN deliveries d ON d.subscription = s.name
             LEFT JOIN messages m ON m.seq = d.seq
             GROUP BY s.name ORDER BY s.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SubscriptionStats {
                    subscription: r.try_get("name")?,
                    topic: r.try_get("topic")?,
                    depth: r.try_get("depth")?,
                    in_flight: r.try_get("in_flight")?,
                    dead_letters: r.try_get("dead")?,
                    oldest_age_ms: r.try_get::<Option<i64>, _>("oldest")?.map(|t| now - t),
                })
            })
            .collect()
    }

    pub(crate) async fn dead_letters(&self, subscription: &str, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT d.seq, d.attempts, d.last_error, m.body FROM deliveries d JOIN messages m ON m.seq = d.seq
             WHERE d.subscription = ? AND d.state = 'dead' ORDER BY d.seq LIMIT ?",
        )
        .bind(subscription)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let body: String = r.try_get("body")?;
                Ok(DeadLetter {
                    seq: r.try_get("seq")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                    event: serde_json::from_str(&body).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Moves dead letters back to ready with a fresh delivery budget.
    pub(crate) async fn redrive(&self, subscription: &str, seq: Option<i64>) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE deliveries SET state = 'ready', attempts = 0, available_at = ?, lease = NULL
             WHERE subscription = ? AND state = 'dead' AND (? IS NULL OR seq = ?)",
        )
        .bind(now_unix_ms())
        .bind(subscription)
        .bind(seq)
        .bind(seq)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Drops message bodies no subscription still needs.
    pub(crate) async fn collect_garbage(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM messages WHERE published_at < ? AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = messages.seq)",
        )
        .bind(now_unix_ms() - 24 * 3600 * 1000)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn event(topic: &str) -> CloudEvent {
        CloudEvent::new("test", topic, None, serde_json::json!({"n": 1}))
    }

    async fn store() -> (tempfile::TempDir, QueueStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = QueueStore::open(&dir.path().join("q.db")).await.unwrap();
        (dir, store)
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_ms(1), 500);
        assert_eq!(backoff_ms(2), 1000);
        assert_eq!(backoff_ms(3), 2000);
        assert_eq!(backoff_ms(40), 300_000);
    }

    #[tokio::test]
    async fn every_subscription_gets_every_message_once_leased() {
        let (_dir, store) = store().await;
        store.declare("a", "t", 3, 60_000).await.unwrap();
        store.declare("b", "t", 3, 60_000).await.unwrap();
        store.publish("t", vec![NewMessage { event: event("t"), key: None, delay_ms: 0 }]).await.unwrap();
        let a = store.lease("a", 10).await.unwrap().unwrap();
        let b = store.lease("b", 10).await.unwrap().unwrap();
        assert_eq!((a.len(), b.len()), (1, 1));
        assert!(store.lease("a", 10).await.unwrap().unwrap().is_empty(), "a leased message is invisible");
        assert!(store.ack("a", a[0].seq, &a[0].lease).await.unwrap());
        assert!(!store.ack("a", a[0].seq, &a[0].lease).await.unwrap(), "acking twice does nothing");
    }

    #[tokio::test]
    async fn repeated_failures_dead_letter_and_redrive_restores() {
        let (_dir, store) = store().await;
        store.declare("s", "t", 2, 60_000).await.unwrap();
        store.publish("t", vec![NewMessage { event: event("t"), key: None, delay_ms: 0 }]).await.unwrap();
        let first = store.lease("s", 1).await.unwrap().unwrap().remove(0);
        store.nack("s", first.seq, &first.lease, "boom").await.unwrap();
        sqlx::query("UPDATE deliveries SET available_at = 0").execute(&store.pool).await.unwrap();
        let second = store.lease("s", 1).await.unwrap().unwrap().remove(0);
        assert_eq!(second.attempts, 2);
        store.nack("s", second.seq, &second.lease, "boom again").await.unwrap();
        let dead = store.dead_letters("s", 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].last_error.as_deref(), Some("boom again"));
        assert_eq!(store.redrive("s", None).await.unwrap(), 1);
        assert_eq!(store.lease("s", 1).await.unwrap().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn idempotency_keys_deduplicate_publishes() {
        let (_dir, store) = store().await;
        store.declare("s", "t", 3, 60_000).await.unwrap();
        let first = store.publish("t", vec![NewMessage { event: event("t"), key: Some("k".into()), delay_ms: 0 }]).await.unwrap();
        let second = store.publish("t", vec![NewMessage { event: event("t"), key: Some("k".into()), delay_ms: 0 }]).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(store.lease("s", 10).await.unwrap().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn expired_leases_are_redelivered() {
        let (_dir, store) = store().await;
        store.declare("s", "t", 5, 1).await.unwrap();
        store.publish("t", vec![NewMessage { event: event("t"), key: None, delay_ms: 0 }]).await.unwrap();
        let first = store.lease("s", 1).await.unwrap().unwrap();
        assert_eq!(first.len(), 1);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let again = store.lease("s", 1).await.unwrap().unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempts, 2);
        assert!(!store.ack("s", first[0].seq, &first[0].lease).await.unwrap(), "a stale lease cannot ack");
    }
}
