//! The embedded backend: SQLite in WAL mode with `synchronous=FULL`, one delivery row
//! per (subscription, message), leases with visibility timeouts, backoff, dead
//! letters, idempotency keys, per-key ordering.
//!
//! Group commit: every write (publish, lease, ack, nack, extend) goes to one writer
//! task, which runs whatever has queued up in a single transaction and answers each
//! caller only after that transaction's commit is on disk. One fsync then covers
//! hundreds of operations, and a publish is still answered only once durable.

use std::path::Path;
use std::time::Duration;

use sqlx::{Row, SqliteConnection, SqlitePool};
use tokio::sync::{Notify, mpsc, oneshot};

use common::bus::Delivery;
use common::now_unix_ms;
use common::wire::CloudEvent;

use crate::backend::{Backend, Capabilities, DeadLetter, Declared, NewMessage, Options, Result, Subscription, SubscriptionStats, backoff_ms, long_poll};

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
"#, r#"
ALTER TABLE subscriptions ADD COLUMN ordered INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN ordering_key TEXT;
CREATE INDEX deliveries_order ON deliveries(subscription, ordering_key, seq) WHERE ordering_key IS NOT NULL;
CREATE INDEX deliveries_stats ON deliveries(subscription, state, seq);
CREATE INDEX messages_published ON messages(published_at);
"#];

/// Most operations one transaction carries.
const MAX_GROUP: usize = 512;

pub(crate) struct SqliteBackend {
    pool: SqlitePool,
    writes: mpsc::Sender<Write>,
    wake: std::sync::Arc<Notify>,
    /// Transactions the writer committed (what group commit saves is visible here).
    #[cfg_attr(not(test), allow(dead_code))]
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Subscription settings by name (this process is the file's only writer).
    specs: std::sync::RwLock<std::collections::HashMap<String, Spec>>,
}

/// One write operation, answered after the commit that carried it.
enum Write {
    Publish { topic: String, messages: Vec<NewMessage>, reply: oneshot::Sender<Result<Vec<String>>> },
    Lease { subscription: String, spec: Spec, max: usize, reply: oneshot::Sender<Result<Option<Vec<Delivery>>>> },
    /// Dead-letters messages whose lease ran out on their last allowed delivery.
    Sweep { reply: oneshot::Sender<Result<bool>> },
    Ack { subscription: String, seq: i64, lease: String, reply: oneshot::Sender<Result<bool>> },
    Nack { subscription: String, seq: i64, lease: String, error: String, reply: oneshot::Sender<Result<bool>> },
    Extend { subscription: String, seq: i64, lease: String, lease_ms: i64, reply: oneshot::Sender<Result<bool>> },
}

/// A write's result waiting for the commit.
enum Done {
    Publish(oneshot::Sender<Result<Vec<String>>>, Vec<String>),
    Lease(oneshot::Sender<Result<Option<Vec<Delivery>>>>, Option<Vec<Delivery>>),
    Flag(oneshot::Sender<Result<bool>>, bool),
}

impl Done {
    fn send(self) {
        match self {
            Done::Publish(reply, ids) => drop(reply.send(Ok(ids))),
            Done::Lease(reply, leased) => drop(reply.send(Ok(leased))),
            Done::Flag(reply, flag) => drop(reply.send(Ok(flag))),
        }
    }

    fn fail(self, error: &str) {
        let error = || anyhow::anyhow!("queue write failed: {error}");
        match self {
            Done::Publish(reply, _) => drop(reply.send(Err(error()))),
            Done::Lease(reply, _) => drop(reply.send(Err(error()))),
            Done::Flag(reply, _) => drop(reply.send(Err(error()))),
        }
    }
}

impl SqliteBackend {
    pub(crate) async fn open(path: &Path, options: Options) -> Result<SqliteBackend> {
        let pool = common::db::open_migrated(path, MIGRATIONS).await?;
        let (writes, queued) = mpsc::channel(4 * MAX_GROUP);
        let window_ms = options.idempotency_window.as_millis() as i64;
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(writer(pool.clone(), queued, window_ms, commits.clone()));
        spawn_sweeper(writes.downgrade());
        Ok(SqliteBackend { pool, writes, wake: std::sync::Arc::new(Notify::new()), commits, specs: Default::default() })
    }

    async fn spec(&self, subscription: &str) -> Result<Option<Spec>> {
        if let Some(spec) = self.specs.read().unwrap_or_else(|p| p.into_inner()).get(subscription) {
            return Ok(Some(*spec));
        }
        let row: Option<(i64, i64, bool)> = sqlx::query_as("SELECT max_deliveries, lease_ms, ordered FROM subscriptions WHERE name = ?")
            .bind(subscription)
            .fetch_optional(&self.pool)
            .await?;
        let Some((max_deliveries, lease_ms, ordered)) = row else { return Ok(None) };
        let spec = Spec { max_deliveries, lease_ms, ordered };
        self.specs.write().unwrap_or_else(|p| p.into_inner()).insert(subscription.to_string(), spec);
        Ok(Some(spec))
    }

    async fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Write) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.writes.send(make(reply)).await.map_err(|_| anyhow::anyhow!("the queue writer has stopped"))?;
        answer.await.map_err(|_| anyhow::anyhow!("the queue writer has stopped"))?
    }
}

/// Twice a second, dead-letters what ran out of deliveries; stops with the backend.
fn spawn_sweeper(writes: mpsc::WeakSender<Write>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Some(writes) = writes.upgrade() else { return };
            let (reply, answer) = oneshot::channel();
            if writes.send(Write::Sweep { reply }).await.is_err() {
                return;
            }
            drop(writes);
            if let Ok(Err(error)) = answer.await {
                tracing::warn!(%error, "queue sweep failed");
            }
        }
    });
}

/// The writer task: takes what has queued up (at most `MAX_GROUP`), runs it in one
/// `BEGIN IMMEDIATE` transaction, commits, then answers. When the group fails as a
/// whole, each operation is retried alone so one bad operation fails only itself.
async fn writer(pool: SqlitePool, mut queued: mpsc::Receiver<Write>, window_ms: i64, commits: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queued.recv_many(&mut group, MAX_GROUP).await > 0 {
        let batch: Vec<Write> = std::mem::take(&mut group);
        commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::histogram!("echo_queue_group_commit_size").record(batch.len() as f64);
        if batch.len() == 1 {
            for write in batch {
                run_alone(&pool, write, window_ms).await;
            }
            continue;
        }
        // Keep the operations (they are not Clone) for a one-by-one retry.
        match run_group(&pool, &batch, window_ms).await {
            Ok(results) => {
                for (write, result) in batch.into_iter().zip(results) {
                    answer(write, Ok(result));
                }
            }
            Err(error) => {
                tracing::warn!(%error, n = batch.len(), "group commit failed; running its operations one by one");
                for write in batch {
                    run_alone(&pool, write, window_ms).await;
                }
            }
        }
    }
}

/// What an operation produced, before its reply channel is attached.
enum Outcome {
    Ids(Vec<String>),
    Leased(Option<Vec<Delivery>>),
    Flag(bool),
}

fn answer(write: Write, outcome: std::result::Result<Outcome, String>) {
    let done = match (write, outcome) {
        (Write::Publish { reply, .. }, Ok(Outcome::Ids(ids))) => Done::Publish(reply, ids),
        (Write::Lease { reply, .. }, Ok(Outcome::Leased(leased))) => Done::Lease(reply, leased),
        (Write::Ack { reply, .. } | Write::Nack { reply, .. } | Write::Extend { reply, .. } | Write::Sweep { reply }, Ok(Outcome::Flag(flag))) => {
            Done::Flag(reply, flag)
        }
        (write, outcome) => {
            let error = match outcome {
                Err(error) => error,
                Ok(_) => "internal: outcome of another operation".to_string(),
            };
            let done = match write {
                Write::Publish { reply, .. } => Done::Publish(reply, vec![]),
                Write::Lease { reply, .. } => Done::Lease(reply, None),
                Write::Ack { reply, .. } | Write::Nack { reply, .. } | Write::Extend { reply, .. } | Write::Sweep { reply } => Done::Flag(reply, false),
            };
            done.fail(&error);
            return;
        }
    };
    done.send();
}

async fn run_group(pool: &SqlitePool, batch: &[Write], window_ms: i64) -> std::result::Result<Vec<Outcome>, sqlx::Error> {
    let mut tx = common::db::begin_write(pool).await?;
    // The group's acks in one statement: every statement is a round trip to SQLite's
    // thread, and acks are a third of the traffic.
    let acks: Vec<(&str, i64, &str)> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Ack { subscription, seq, lease, .. } => Some((subscription.as_str(), *seq, lease.as_str())),
            _ => None,
        })
        .collect();
    let settled: std::collections::HashSet<(String, i64, String)> = if acks.len() > 1 {
        let list = serde_json::to_string(&acks).unwrap_or_default();
        sqlx::query_as(
            "DELETE FROM deliveries WHERE state = 'leased' AND (subscription, seq, lease) IN (
                 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?))
             RETURNING subscription, seq, lease",
        )
        .bind(list)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    } else {
        Default::default()
    };
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        match write {
            Write::Ack { subscription, seq, lease, .. } if acks.len() > 1 => {
                results.push(Outcome::Flag(settled.contains(&(subscription.clone(), *seq, lease.clone()))));
            }
            write => results.push(apply(&mut tx, write, window_ms).await?),
        }
    }
    tx.commit().await?;
    Ok(results)
}

async fn run_alone(pool: &SqlitePool, write: Write, window_ms: i64) {
    let outcome = async {
        let mut tx = common::db::begin_write(pool).await?;
        let outcome = apply(&mut tx, &write, window_ms).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(outcome)
    }
    .await;
    answer(write, outcome.map_err(|e| e.to_string()));
}

async fn apply(conn: &mut SqliteConnection, write: &Write, window_ms: i64) -> std::result::Result<Outcome, sqlx::Error> {
    Ok(match write {
        Write::Publish { topic, messages, .. } => Outcome::Ids(publish_in(conn, topic, messages, window_ms).await?),
        Write::Lease { subscription, spec, max, .. } => Outcome::Leased(Some(lease_in(conn, subscription, *spec, *max).await?)),
        Write::Sweep { .. } => Outcome::Flag(sweep_in(conn).await? > 0),
        Write::Ack { subscription, seq, lease, .. } => Outcome::Flag(ack_in(conn, subscription, *seq, lease).await?),
        Write::Nack { subscription, seq, lease, error, .. } => Outcome::Flag(nack_in(conn, subscription, *seq, lease, error).await?),
        Write::Extend { subscription, seq, lease, lease_ms, .. } => Outcome::Flag(extend_in(conn, subscription, *seq, lease, *lease_ms).await?),
    })
}

/// Stores messages and fans them out to every subscription of `topic`: two
/// statements per message (three with an idempotency key), whatever the fan-out.
async fn publish_in(conn: &mut SqliteConnection, topic: &str, messages: &[NewMessage], window_ms: i64) -> std::result::Result<Vec<String>, sqlx::Error> {
    let now = now_unix_ms();
    let mut ids = Vec::with_capacity(messages.len());
    for message in messages {
        if let Some(key) = &message.key {
            let existing: Option<(String, i64)> = sqlx::query_as("SELECT id, published_at FROM messages WHERE topic = ? AND idem_key = ?")
                .bind(topic)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
            match existing {
                Some((id, published_at)) if published_at >= now - window_ms => {
                    ids.push(id);
                    continue;
                }
                // Outside the window: the key is free again.
                Some(_) => {
                    sqlx::query("UPDATE messages SET idem_key = NULL WHERE topic = ? AND idem_key = ?").bind(topic).bind(key).execute(&mut *conn).await?;
                }
                None => {}
            }
        }
        let body = serde_json::to_string(&message.event).unwrap_or_default();
        let seq: i64 = sqlx::query_scalar("INSERT INTO messages (id, topic, idem_key, body, published_at) VALUES (?, ?, ?, ?, ?) RETURNING seq")
            .bind(&message.event.id)
            .bind(topic)
            .bind(&message.key)
            .bind(body)
            .bind(now)
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query(
            "INSERT INTO deliveries (subscription, seq, state, available_at, ordering_key)
             SELECT name, ?, 'ready', ?, ? FROM subscriptions WHERE topic = ?",
        )
        .bind(seq)
        .bind(now + message.delay_ms.max(0))
        .bind(&message.ordering_key)
        .bind(topic)
        .execute(&mut *conn)
        .await?;
        ids.push(message.event.id.clone());
    }
    Ok(ids)
}

/// A subscription's settings, as leases need them (kept in memory).
#[derive(Clone, Copy, Debug)]
struct Spec {
    max_deliveries: i64,
    lease_ms: i64,
    ordered: bool,
}

/// Moves deliveries whose lease ran out on their last allowed attempt to the dead
/// letters (run by a ticker twice a second; leases never pick them up meanwhile).
async fn sweep_in(conn: &mut SqliteConnection) -> std::result::Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE deliveries SET state = 'dead', lease = NULL,
             last_error = COALESCE(last_error, 'lease expired after the last allowed delivery')
         WHERE state = 'leased' AND available_at <= ?
           AND attempts >= (SELECT max_deliveries FROM subscriptions s WHERE s.name = deliveries.subscription)",
    )
    .bind(now_unix_ms())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Leases up to `max` available messages: ready ones, and leased ones whose lease
/// expired with deliveries left (those without wait for the sweep to dead-letter
/// them). On an ordered subscription only the oldest unsettled message of each key is
/// available. Two statements, whatever the batch.
async fn lease_in(conn: &mut SqliteConnection, subscription: &str, spec: Spec, max: usize) -> std::result::Result<Vec<Delivery>, sqlx::Error> {
    let now = now_unix_ms();
    let Spec { max_deliveries, lease_ms, ordered } = spec;
    let lease = uuid::Uuid::new_v4().to_string();
    let rows = sqlx::query(
        "UPDATE deliveries SET state = 'leased', lease = ?, attempts = attempts + 1, available_at = ?
         WHERE rowid IN (
             SELECT d.rowid FROM deliveries d
             WHERE d.subscription = ? AND d.state IN ('ready', 'leased') AND d.available_at <= ?
               AND (d.state = 'ready' OR d.attempts < ?)
               AND (? = 0 OR d.ordering_key IS NULL OR NOT EXISTS (
                   SELECT 1 FROM deliveries e
                   WHERE e.subscription = d.subscription AND e.ordering_key = d.ordering_key
                     AND e.seq < d.seq AND e.state != 'dead'))
             ORDER BY d.seq LIMIT ?)
         RETURNING seq, attempts",
    )
    .bind(&lease)
    .bind(now + lease_ms)
    .bind(subscription)
    .bind(now)
    .bind(max_deliveries)
    .bind(ordered)
    .bind(max as i64)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(vec![]);
    }
    // The bodies in one statement, not one per message.
    let leased: Vec<(i64, i64)> = rows.iter().map(|r| Ok((r.try_get("seq")?, r.try_get("attempts")?))).collect::<std::result::Result<_, sqlx::Error>>()?;
    let seqs = serde_json::to_string(&leased.iter().map(|(seq, _)| *seq).collect::<Vec<_>>()).unwrap_or_default();
    let bodies: std::collections::HashMap<i64, String> = sqlx::query_as("SELECT seq, body FROM messages WHERE seq IN (SELECT value FROM json_each(?))")
        .bind(seqs)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    let mut deliveries = Vec::with_capacity(leased.len());
    for (seq, attempts) in leased {
        if let Some(event) = bodies.get(&seq).and_then(|body| serde_json::from_str::<CloudEvent>(body).ok()) {
            deliveries.push(Delivery { seq, lease: lease.clone(), attempts, event, lease_ms: Some(lease_ms) });
        }
    }
    deliveries.sort_by_key(|d| d.seq);
    Ok(deliveries)
}

async fn ack_in(conn: &mut SqliteConnection, subscription: &str, seq: i64, lease: &str) -> std::result::Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM deliveries WHERE subscription = ? AND seq = ? AND lease = ? AND state = 'leased'")
        .bind(subscription)
        .bind(seq)
        .bind(lease)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn nack_in(conn: &mut SqliteConnection, subscription: &str, seq: i64, lease: &str, error: &str) -> std::result::Result<bool, sqlx::Error> {
    let now = now_unix_ms();
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT d.attempts, s.max_deliveries FROM deliveries d JOIN subscriptions s ON s.name = d.subscription
         WHERE d.subscription = ? AND d.seq = ? AND d.lease = ? AND d.state = 'leased'",
    )
    .bind(subscription)
    .bind(seq)
    .bind(lease)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((attempts, max_deliveries)) = row else { return Ok(false) };
    let (state, available_at) = if attempts >= max_deliveries { ("dead", now) } else { ("ready", now + backoff_ms(attempts)) };
    sqlx::query("UPDATE deliveries SET state = ?, available_at = ?, lease = NULL, last_error = ? WHERE subscription = ? AND seq = ?")
        .bind(state)
        .bind(available_at)
        .bind(error)
        .bind(subscription)
        .bind(seq)
        .execute(&mut *conn)
        .await?;
    Ok(true)
}

async fn extend_in(conn: &mut SqliteConnection, subscription: &str, seq: i64, lease: &str, lease_ms: i64) -> std::result::Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE deliveries SET available_at = ? WHERE subscription = ? AND seq = ? AND lease = ? AND state = 'leased'")
        .bind(now_unix_ms() + lease_ms)
        .bind(subscription)
        .bind(seq)
        .bind(lease)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

#[async_trait::async_trait]
impl Backend for SqliteBackend {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { stale_leases_refused: true, exact_extend: true }
    }

    async fn declare(&self, subscription: &Subscription) -> Result<Declared> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        let existing: Option<String> = sqlx::query_scalar("SELECT topic FROM subscriptions WHERE name = ?").bind(&subscription.name).fetch_optional(&mut *tx).await?;
        let declared = match existing {
            Some(topic) if topic != subscription.topic => return Ok(Declared::Conflict),
            Some(_) => {
                sqlx::query("UPDATE subscriptions SET max_deliveries = ?, lease_ms = ?, ordered = ? WHERE name = ?")
                    .bind(subscription.max_deliveries)
                    .bind(subscription.lease_ms)
                    .bind(subscription.ordered)
                    .bind(&subscription.name)
                    .execute(&mut *tx)
                    .await?;
                Declared::Exists
            }
            None => {
                sqlx::query("INSERT INTO subscriptions (name, topic, max_deliveries, lease_ms, ordered, created_at) VALUES (?, ?, ?, ?, ?, ?)")
                    .bind(&subscription.name)
                    .bind(&subscription.topic)
                    .bind(subscription.max_deliveries)
                    .bind(subscription.lease_ms)
                    .bind(subscription.ordered)
                    .bind(now_unix_ms())
                    .execute(&mut *tx)
                    .await?;
                Declared::Created
            }
        };
        tx.commit().await?;
        let spec = Spec { max_deliveries: subscription.max_deliveries, lease_ms: subscription.lease_ms, ordered: subscription.ordered };
        self.specs.write().unwrap_or_else(|p| p.into_inner()).insert(subscription.name.clone(), spec);
        Ok(declared)
    }

    async fn publish(&self, topic: &str, messages: Vec<NewMessage>) -> Result<Vec<String>> {
        let topic = topic.to_string();
        let ids = self.submit(|reply| Write::Publish { topic, messages, reply }).await?;
        self.wake.notify_waiters();
        Ok(ids)
    }

    async fn pull(&self, subscription: &str, max: usize, wait: Duration) -> Result<Option<Vec<Delivery>>> {
        let Some(spec) = self.spec(subscription).await? else { return Ok(None) };
        long_poll(&self.wake, wait, || self.submit(|reply| Write::Lease { subscription: subscription.to_string(), spec, max, reply })).await
    }

    async fn ack(&self, subscription: &str, seq: i64, lease: &str) -> Result<bool> {
        self.submit(|reply| Write::Ack { subscription: subscription.to_string(), seq, lease: lease.to_string(), reply }).await
    }

    async fn nack(&self, subscription: &str, seq: i64, lease: &str, error: &str) -> Result<bool> {
        let nacked = self
            .submit(|reply| Write::Nack { subscription: subscription.to_string(), seq, lease: lease.to_string(), error: error.to_string(), reply })
            .await?;
        Ok(nacked)
    }

    async fn extend(&self, subscription: &str, seq: i64, lease: &str, lease_ms: i64) -> Result<bool> {
        self.submit(|reply| Write::Extend { subscription: subscription.to_string(), seq, lease: lease.to_string(), lease_ms, reply }).await
    }

    /// Counts come from the `(subscription, state, seq)` index alone; the oldest age
    /// is one primary-key lookup per subscription.
    async fn stats(&self) -> Result<Vec<SubscriptionStats>> {
        let now = now_unix_ms();
        let subscriptions: Vec<(String, String)> = sqlx::query_as("SELECT name, topic FROM subscriptions ORDER BY name").fetch_all(&self.pool).await?;
        let counts = sqlx::query("SELECT subscription, state, COUNT(*) AS n, MIN(seq) AS first FROM deliveries GROUP BY subscription, state")
            .fetch_all(&self.pool)
            .await?;
        let mut stats = Vec::with_capacity(subscriptions.len());
        for (name, topic) in subscriptions {
            let mut entry = SubscriptionStats { subscription: name.clone(), topic, depth: 0, in_flight: 0, dead_letters: 0, oldest_age_ms: None };
            let mut oldest_seq: Option<i64> = None;
            for row in counts.iter().filter(|r| r.try_get::<String, _>("subscription").is_ok_and(|s| s == name)) {
                let state: String = row.try_get("state")?;
                let n: i64 = row.try_get("n")?;
                let first: i64 = row.try_get("first")?;
                match state.as_str() {
                    "ready" => entry.depth = n,
                    "leased" => entry.in_flight = n,
                    _ => entry.dead_letters = n,
                }
                if state != "dead" {
                    oldest_seq = Some(oldest_seq.map_or(first, |o: i64| o.min(first)));
                }
            }
            if let Some(seq) = oldest_seq {
                let published: Option<i64> = sqlx::query_scalar("SELECT published_at FROM messages WHERE seq = ?").bind(seq).fetch_optional(&self.pool).await?;
                entry.oldest_age_ms = published.map(|t| (now - t).max(0));
            }
            stats.push(entry);
        }
        Ok(stats)
    }

    async fn dead_letters(&self, subscription: &str, limit: i64) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT d.seq, d.attempts, d.last_error, m.body FROM deliveries d JOIN messages m ON m.seq = d.seq
             WHERE d.subscription = ? AND d.state = 'dead' ORDER BY d.seq LIMIT ?",
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
        self.wake.notify_waiters();
        Ok(done.rows_affected())
    }

    /// Drops message bodies no subscription still needs, a day after their publish
    /// (idempotency keys live in the same rows).
    async fn housekeeping(&self) -> Result<()> {
        sqlx::query("DELETE FROM messages WHERE published_at < ? AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = messages.seq)")
            .bind(now_unix_ms() - 24 * 3600 * 1000)
            .execute(&self.pool)
            .await?;
        self.wake.notify_waiters();
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn message(topic: &str) -> NewMessage {
        NewMessage { event: CloudEvent::new("test", topic, None, serde_json::json!({"n": 1})), key: None, ordering_key: None, delay_ms: 0 }
    }

    /// Concurrent publishes share commits: far fewer transactions than operations,
    /// and every publish still answers with its own id, all of them stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits_and_each_gets_its_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let backend = std::sync::Arc::new(SqliteBackend::open(&dir.path().join("q.db"), Options::default()).await.unwrap());
        let sub = Subscription { name: "s".into(), topic: "t".into(), max_deliveries: 3, lease_ms: 60_000, ordered: false };
        backend.declare(&sub).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let backend = backend.clone();
            tasks.push(tokio::spawn(async move { backend.publish("t", vec![message("t")]).await.unwrap() }));
        }
        let mut ids = std::collections::HashSet::new();
        for task in tasks {
            let answered = task.await.unwrap();
            assert_eq!(answered.len(), 1);
            ids.insert(answered[0].clone());
        }
        assert_eq!(ids.len(), 200);
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE subscription = 's'").fetch_one(&backend.pool).await.unwrap();
        assert_eq!(stored, 200);
        let commits = backend.commits.load(std::sync::atomic::Ordering::Relaxed);
        assert!(commits < 100, "200 publishes took {commits} transactions");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&backend.pool).await.unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&backend.pool).await.unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
    }
}
