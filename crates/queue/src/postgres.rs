//! The PostgreSQL backend, for several queue replicas over one database: the same
//! tables as the embedded backend (prefixed `queue_`), leases taken with
//! `FOR UPDATE SKIP LOCKED` so competing pullers never wait on each other, and
//! `LISTEN/NOTIFY` so a publish through any replica wakes the long-polls of all.
//! A publish is answered after its transaction commits (PostgreSQL's own WAL flush,
//! `synchronous_commit` as the server has it; `on` by default).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Row};
use tokio::sync::Notify;

use common::bus::Delivery;
use common::now_unix_ms;
use common::wire::CloudEvent;

use crate::backend::{Backend, Capabilities, DeadLetter, Declared, NewMessage, Options, Result, Subscription, SubscriptionStats, backoff_ms, long_poll};

/// The channel publishes notify on; the payload is the topic.
const CHANNEL: &str = "echo_queue";

/// Applied in order, each once, under an advisory lock (replicas may start together).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE queue_subscriptions (
    name TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    max_deliveries BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL,
    ordered BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL
);
CREATE INDEX queue_subscriptions_topic ON queue_subscriptions(topic);
CREATE TABLE queue_messages (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    idem_key TEXT,
    body TEXT NOT NULL,
    published_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX queue_messages_idem ON queue_messages(topic, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX queue_messages_published ON queue_messages(published_at);
CREATE TABLE queue_deliveries (
    subscription TEXT NOT NULL REFERENCES queue_subscriptions(name) ON DELETE CASCADE,
    seq BIGINT NOT NULL REFERENCES queue_messages(seq),
    state TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'dead')),
    available_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    lease TEXT,
    last_error TEXT,
    ordering_key TEXT,
    PRIMARY KEY (subscription, seq)
);
CREATE INDEX queue_deliveries_ready ON queue_deliveries(subscription, state, available_at);
CREATE INDEX queue_deliveries_stats ON queue_deliveries(subscription, state, seq);
CREATE INDEX queue_deliveries_order ON queue_deliveries(subscription, ordering_key, seq) WHERE ordering_key IS NOT NULL;
"#];

pub(crate) struct PostgresBackend {
    pool: PgPool,
    wake: Arc<Notify>,
    window_ms: i64,
    /// Stops the LISTEN task when the backend goes.
    _listener: tokio_util::sync::DropGuard,
}

impl PostgresBackend {
    pub(crate) async fn open(url: &str, options: Options) -> Result<PostgresBackend> {
        let connect: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("queue.url {}: {e}", crate::backend::redact(url)))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(connect)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL at {}: {e}", crate::backend::redact(url)))?;
        migrate(&pool).await?;
        let wake = Arc::new(Notify::new());
        let stop = tokio_util::sync::CancellationToken::new();
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        tokio::spawn(listen(listener, wake.clone(), stop.clone()));
        Ok(PostgresBackend { pool, wake, window_ms: options.idempotency_window.as_millis() as i64, _listener: stop.drop_guard() })
    }

    async fn lease(&self, subscription: &str, max: usize) -> Result<Option<Vec<Delivery>>> {
        let mut tx = self.pool.begin().await?;
        let leased = lease_in(&mut tx, subscription, max).await?;
        tx.commit().await?;
        Ok(leased)
    }
}

/// Wakes local long-polls on every NOTIFY; `PgListener` reconnects by itself, and a
/// wake-up is sent after a reconnect too, since notifications may have been missed.
async fn listen(mut listener: PgListener, wake: Arc<Notify>, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            received = listener.recv() => {
                if let Err(error) = received {
                    tracing::warn!(%error, "queue LISTEN connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                wake.notify_waiters();
            }
        }
    }
}

async fn migrate(pool: &PgPool) -> Result<()> {
    let mut tx = pool.begin().await?;
    // One migrator at a time across replicas: a transaction-scoped advisory lock.
    sqlx::query("SELECT pg_advisory_xact_lock(7226085126)").execute(&mut *tx).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS queue_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)").execute(&mut *tx).await?;
    let applied: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM queue_migrations").fetch_one(&mut *tx).await?;
    for (idx, sql) in MIGRATIONS.iter().enumerate() {
        let version = idx as i64 + 1;
        if version <= applied {
            continue;
        }
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO queue_migrations (version, applied_at) VALUES ($1, $2)").bind(version).bind(now_unix_ms()).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn lease_in(conn: &mut PgConnection, subscription: &str, max: usize) -> Result<Option<Vec<Delivery>>> {
    let now = now_unix_ms();
    let spec: Option<(i64, i64, bool)> = sqlx::query_as("SELECT max_deliveries, lease_ms, ordered FROM queue_subscriptions WHERE name = $1")
        .bind(subscription)
        .fetch_optional(&mut *conn)
        .await?;
    let Some((max_deliveries, lease_ms, ordered)) = spec else { return Ok(None) };
    sqlx::query(
        "UPDATE queue_deliveries SET state = 'dead', lease = NULL,
             last_error = COALESCE(last_error, 'lease expired after the last allowed delivery')
         WHERE (subscription, seq) IN (
             SELECT subscription, seq FROM queue_deliveries
             WHERE subscription = $1 AND state = 'leased' AND available_at <= $2 AND attempts >= $3
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(subscription)
    .bind(now)
    .bind(max_deliveries)
    .execute(&mut *conn)
    .await?;
    let lease = uuid::Uuid::new_v4().to_string();
    // Rows another puller holds are skipped, not waited for. On an ordered
    // subscription a message is available only when no older one of its key is
    // unsettled (read from the snapshot, so a locked head still blocks its key).
    let rows = sqlx::query(
        "WITH picked AS (
             SELECT d.subscription, d.seq FROM queue_deliveries d
             WHERE d.subscription = $1 AND d.state IN ('ready', 'leased') AND d.available_at <= $2
               AND (NOT $3 OR d.ordering_key IS NULL OR NOT EXISTS (
                   SELECT 1 FROM queue_deliveries e
                   WHERE e.subscription = d.subscription AND e.ordering_key = d.ordering_key
                     AND e.seq < d.seq AND e.state <> 'dead'))
             ORDER BY d.seq LIMIT $4
             FOR UPDATE SKIP LOCKED)
         UPDATE queue_deliveries d SET state = 'leased', lease = $5, attempts = d.attempts + 1, available_at = $6
         FROM picked, queue_messages m
         WHERE d.subscription = picked.subscription AND d.seq = picked.seq AND m.seq = picked.seq
         RETURNING d.seq, d.attempts, m.body",
    )
    .bind(subscription)
    .bind(now)
    .bind(ordered)
    .bind(max as i64)
    .bind(&lease)
    .bind(now + lease_ms)
    .fetch_all(&mut *conn)
    .await?;
    let mut deliveries = Vec::with_capacity(rows.len());
    for row in rows {
        let body: String = row.try_get("body")?;
        if let Ok(event) = serde_json::from_str::<CloudEvent>(&body) {
            deliveries.push(Delivery { seq: row.try_get("seq")?, lease: lease.clone(), attempts: row.try_get("attempts")?, event, lease_ms: Some(lease_ms) });
        }
    }
    deliveries.sort_by_key(|d| d.seq);
    Ok(Some(deliveries))
}

#[async_trait::async_trait]
impl Backend for PostgresBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { stale_leases_refused: true, exact_extend: true }
    }

    async fn declare(&self, subscription: &Subscription) -> Result<Declared> {
        let inserted = sqlx::query(
            "INSERT INTO queue_subscriptions (name, topic, max_deliveries, lease_ms, ordered, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&subscription.name)
        .bind(&subscription.topic)
        .bind(subscription.max_deliveries)
        .bind(subscription.lease_ms)
        .bind(subscription.ordered)
        .bind(now_unix_ms())
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Declared::Created);
        }
        let updated = sqlx::query("UPDATE queue_subscriptions SET max_deliveries = $1, lease_ms = $2, ordered = $3 WHERE name = $4 AND topic = $5")
            .bind(subscription.max_deliveries)
            .bind(subscription.lease_ms)
            .bind(subscription.ordered)
            .bind(&subscription.name)
            .bind(&subscription.topic)
            .execute(&self.pool)
            .await?;
        Ok(if updated.rows_affected() == 1 { Declared::Exists } else { Declared::Conflict })
    }

    async fn publish(&self, topic: &str, messages: Vec<NewMessage>) -> Result<Vec<String>> {
        let now = now_unix_ms();
        let mut tx = self.pool.begin().await?;
        let subscriptions: Vec<String> = sqlx::query_scalar("SELECT name FROM queue_subscriptions WHERE topic = $1").bind(topic).fetch_all(&mut *tx).await?;
        let mut ids = Vec::with_capacity(messages.len());
        for message in &messages {
            if let Some(key) = &message.key {
                // Serialise publishers of one key so the check and the insert agree.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))").bind(format!("{topic}\u{1f}{key}")).execute(&mut *tx).await?;
                let existing: Option<(String, i64)> = sqlx::query_as("SELECT id, published_at FROM queue_messages WHERE topic = $1 AND idem_key = $2")
                    .bind(topic)
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
                match existing {
                    Some((id, published_at)) if published_at >= now - self.window_ms => {
                        ids.push(id);
                        continue;
                    }
                    Some(_) => {
                        sqlx::query("UPDATE queue_messages SET idem_key = NULL WHERE topic = $1 AND idem_key = $2").bind(topic).bind(key).execute(&mut *tx).await?;
                    }
                    None => {}
                }
            }
            let body = serde_json::to_string(&message.event)?;
            let seq: i64 = sqlx::query_scalar("INSERT INTO queue_messages (id, topic, idem_key, body, published_at) VALUES ($1, $2, $3, $4, $5) RETURNING seq")
                .bind(&message.event.id)
                .bind(topic)
                .bind(&message.key)
                .bind(body)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            if !subscriptions.is_empty() {
                sqlx::query(
                    "INSERT INTO queue_deliveries (subscription, seq, state, available_at, ordering_key)
                     SELECT name, $1, 'ready', $2, $3 FROM UNNEST($4::text[]) AS name",
                )
                .bind(seq)
                .bind(now + message.delay_ms.max(0))
                .bind(&message.ordering_key)
                .bind(&subscriptions)
                .execute(&mut *tx)
                .await?;
            }
            ids.push(message.event.id.clone());
        }
        sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(topic).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(ids)
    }

    async fn pull(&self, subscription: &str, max: usize, wait: Duration) -> Result<Option<Vec<Delivery>>> {
        long_poll(&self.wake, wait, || self.lease(subscription, max)).await
    }

    async fn ack(&self, subscription: &str, seq: i64, lease: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM queue_deliveries WHERE subscription = $1 AND seq = $2 AND lease = $3 AND state = 'leased'")
            .bind(subscription)
            .bind(seq)
            .bind(lease)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn nack(&self, subscription: &str, seq: i64, lease: &str, error: &str) -> Result<bool> {
        let now = now_unix_ms();
        let mut tx = self.pool.begin().await?;
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT d.attempts, s.max_deliveries FROM queue_deliveries d JOIN queue_subscriptions s ON s.name = d.subscription
             WHERE d.subscription = $1 AND d.seq = $2 AND d.lease = $3 AND d.state = 'leased' FOR UPDATE OF d",
        )
        .bind(subscription)
        .bind(seq)
        .bind(lease)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((attempts, max_deliveries)) = row else { return Ok(false) };
        let (state, available_at) = if attempts >= max_deliveries { ("dead", now) } else { ("ready", now + backoff_ms(attempts)) };
        sqlx::query("UPDATE queue_deliveries SET state = $1, available_at = $2, lease = NULL, last_error = $3 WHERE subscription = $4 AND seq = $5")
            .bind(state)
            .bind(available_at)
            .bind(error)
            .bind(subscription)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn extend(&self, subscription: &str, seq: i64, lease: &str, lease_ms: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE queue_deliveries SET available_at = $1 WHERE subscription = $2 AND seq = $3 AND lease = $4 AND state = 'leased'")
            .bind(now_unix_ms() + lease_ms)
            .bind(subscription)
            .bind(seq)
            .bind(lease)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn stats(&self) -> Result<Vec<SubscriptionStats>> {
        let now = now_unix_ms();
        let rows = sqlx::query(
            "SELECT s.name, s.topic,
                 COALESCE(c.depth, 0) AS depth, COALESCE(c.in_flight, 0) AS in_flight, COALESCE(c.dead, 0) AS dead,
                 (SELECT m.published_at FROM queue_messages m WHERE m.seq = c.oldest) AS oldest
             FROM queue_subscriptions s
             LEFT JOIN (
                 SELECT subscription,
                     COUNT(*) FILTER (WHERE state = 'ready') AS depth,
                     COUNT(*) FILTER (WHERE state = 'leased') AS in_flight,
                     COUNT(*) FILTER (WHERE state = 'dead') AS dead,
                     MIN(seq) FILTER (WHERE state <> 'dead') AS oldest
                 FROM queue_deliveries GROUP BY subscription) c ON c.subscription = s.name
             ORDER BY s.name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut stats = Vec::with_capacity(rows.len());
        for r in rows {
            stats.push(SubscriptionStats {
                subscription: r.try_get("name")?,
                topic: r.try_get("topic")?,
                depth: r.try_get("depth")?,
                in_flight: r.try_get("in_flight")?,
                dead_letters: r.try_get("dead")?,
                oldest_age_ms: r.try_get::<Option<i64>, _>("oldest")?.map(|t| (now - t).max(0)),
            });
        }
        Ok(stats)
    }

    async fn dead_letters(&self, subscription: &str, limit: i64) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT d.seq, d.attempts, d.last_error, m.body FROM queue_deliveries d JOIN queue_messages m ON m.seq = d.seq
             WHERE d.subscription = $1 AND d.state = 'dead' ORDER BY d.seq LIMIT $2",
        )
        .bind(subscription)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut letters = Vec::with_capacity(rows.len());
        for r in rows {
            let body: String = r.try_get("body")?;
            letters.push(DeadLetter {
                seq: r.try_get("seq")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                event: serde_json::from_str(&body).unwrap_or_default(),
            });
        }
        Ok(letters)
    }

    async fn redrive(&self, subscription: &str, seq: Option<i64>) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE queue_deliveries SET state = 'ready', attempts = 0, available_at = $1, lease = NULL
             WHERE subscription = $2 AND state = 'dead' AND ($3::BIGINT IS NULL OR seq = $3)",
        )
        .bind(now_unix_ms())
        .bind(subscription)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(subscription).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn housekeeping(&self) -> Result<()> {
        sqlx::query(
            "DELETE FROM queue_messages m WHERE m.published_at < $1
             AND NOT EXISTS (SELECT 1 FROM queue_deliveries d WHERE d.seq = m.seq)",
        )
        .bind(now_unix_ms() - 24 * 3600 * 1000)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
