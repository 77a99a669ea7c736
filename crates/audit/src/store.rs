//! Where the audit log lives: the `AuditStore` trait, with SQLite (`audit.db` in the data
//! dir, the default) and PostgreSQL (schema `audit`, chosen by `audit.database_url` or
//! `database.url`). Both chain each record to the last one inside the transaction that
//! appends it (PostgreSQL: under an advisory lock, so several audit replicas still make
//! one chain), deduplicate by event id, and refuse UPDATE and DELETE of records and
//! checkpoints with triggers (PostgreSQL also TRUNCATE). One conformance suite (below)
//! runs against both.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Row, SqlitePool};

use common::{EchoConfig, ServiceName};

use crate::chain::{GENESIS, Record, record_hash};
use crate::export::Signed;

/// A record to append: everything but its place in the chain.
#[derive(Debug, Clone)]
pub(crate) struct NewRecord {
    pub(crate) event_id: String,
    pub(crate) ts: i64,
    pub(crate) actor: String,
    pub(crate) action: String,
    pub(crate) resource: String,
    pub(crate) outcome: String,
    /// JSON text, stored and hashed as is.
    pub(crate) context: String,
    /// Decides visibility; not part of the chained evidence.
    pub(crate) org: Option<String>,
}

impl NewRecord {
    fn chained(&self, seq: i64, prev_hash: String) -> Record {
        let mut record = Record {
            seq,
            ts: self.ts,
            event_id: self.event_id.clone(),
            actor: self.actor.clone(),
            action: self.action.clone(),
            resource: self.resource.clone(),
            outcome: self.outcome.clone(),
            context: self.context.clone(),
            prev_hash,
            hash: String::new(),
        };
        record.hash = record_hash(&record.prev_hash, &record);
        record
    }
}

/// What the audit page filters by.
#[derive(Debug, Default, Clone)]
pub(crate) struct Filter {
    pub(crate) since: i64,
    pub(crate) actor: Option<String>,
    pub(crate) action: Option<String>,
    pub(crate) resource: Option<String>,
    pub(crate) org: Option<String>,
    pub(crate) limit: i64,
}

/// Signs a checkpoint for the record just chained, when one is due.
pub(crate) type Checkpointer<'a> = &'a (dyn Fn(&Record) -> Option<Signed> + Send + Sync);

#[derive(Debug, thiserror::Error)]
#[error("audit store: {0}")]
pub(crate) struct StoreError(#[from] sqlx::Error);

#[async_trait]
pub(crate) trait AuditStore: Send + Sync {
    /// Chains and appends `record` unless its event id is there already (`false` then),
    /// with the checkpoint `checkpoint` makes for it, in one transaction.
    async fn append(&self, record: &NewRecord, checkpoint: Checkpointer<'_>) -> Result<bool, StoreError>;
    /// Every record in chain order, with its org.
    async fn chain(&self) -> Result<Vec<(Record, Option<String>)>, StoreError>;
    /// Records matching `filter`, newest first.
    async fn query(&self, filter: &Filter) -> Result<Vec<(Record, Option<String>)>, StoreError>;
    /// Signed checkpoints, oldest first (the newest `limit` when given).
    async fn checkpoints(&self, limit: Option<i64>) -> Result<Vec<Signed>, StoreError>;
    async fn ready(&self) -> Result<(), String>;
    /// Runs SQL as an attacker with database access would (tests of the triggers).
    #[cfg(test)]
    async fn tamper(&self, sql: &str) -> Result<(), StoreError>;
}

/// The store `config` names: PostgreSQL when a URL is set, else `audit.db`.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<std::sync::Arc<dyn AuditStore>> {
    match config.database_url(&config.audit.database_url) {
        Some(url) => Ok(std::sync::Arc::new(PgAuditStore::open(url).await?)),
        None => Ok(std::sync::Arc::new(SqliteAuditStore::open(&config.db_path(ServiceName::Audit)).await?)),
    }
}

fn record_from_row<R: Row>(r: &R) -> Result<(Record, Option<String>), sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<String>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    let record = Record {
        seq: r.try_get("seq")?,
        ts: r.try_get("ts")?,
        event_id: r.try_get("event_id")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        resource: r.try_get("resource")?,
        outcome: r.try_get("outcome")?,
        context: r.try_get("context")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    };
    Ok((record, r.try_get("org")?))
}

fn checkpoint_from_row<R: Row>(r: &R) -> Result<Signed, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Signed {
        seq: r.try_get("seq")?,
        head_hash: r.try_get("head_hash")?,
        signature: r.try_get("signature")?,
        public_key: r.try_get("public_key")?,
        created_at: r.try_get("created_at")?,
    })
}

const SQLITE_MIGRATIONS: &[&str] = &[r#"
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    event_id TEXT NOT NULL UNIQUE,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    outcome TEXT NOT NULL,
    context TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX records_actor ON records(actor, ts);
CREATE INDEX records_action ON records(action, ts);
CREATE TRIGGER records_no_update BEFORE UPDATE ON records BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY,
    head_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    public_key TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"#, r#"
ALTER TABLE records ADD COLUMN org TEXT;
CREATE INDEX records_org ON records(org, seq);
"#, r#"
CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
"#];

pub(crate) struct SqliteAuditStore {
    pool: SqlitePool,
}

impl SqliteAuditStore {
    pub(crate) async fn open(path: &std::path::Path) -> anyhow::Result<SqliteAuditStore> {
        Ok(SqliteAuditStore { pool: common::db::open_migrated(path, SQLITE_MIGRATIONS).await? })
    }
}

#[async_trait]
impl AuditStore for SqliteAuditStore {
    async fn append(&self, new: &NewRecord, checkpoint: Checkpointer<'_>) -> Result<bool, StoreError> {
        // One writer at a time: the head read here is still the head at commit.
        let mut tx = common::db::begin_write(&self.pool).await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT seq FROM records WHERE event_id = ?").bind(&new.event_id).fetch_optional(&mut *tx).await?;
        if exists.is_some() {
            return Ok(false);
        }
        let head: Option<(i64, String)> = sqlx::query_as("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetch_optional(&mut *tx).await?;
        let (prev_seq, prev_hash) = head.unwrap_or((0, GENESIS.to_string()));
        let record = new.chained(prev_seq + 1, prev_hash);
        sqlx::query("INSERT INTO records (seq, ts, event_id, actor, action, resource, outcome, context, prev_hash, hash, org) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(record.seq)
            .bind(record.ts)
            .bind(&record.event_id)
            .bind(&record.actor)
            .bind(&record.action)
            .bind(&record.resource)
            .bind(&record.outcome)
            .bind(&record.context)
            .bind(&record.prev_hash)
            .bind(&record.hash)
            .bind(&new.org)
            .execute(&mut *tx)
            .await?;
        if let Some(signed) = checkpoint(&record) {
            sqlx::query("INSERT INTO checkpoints (seq, head_hash, signature, public_key, created_at) VALUES (?, ?, ?, ?, ?)")
                .bind(signed.seq)
                .bind(&signed.head_hash)
                .bind(&signed.signature)
                .bind(&signed.public_key)
                .bind(signed.created_at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn chain(&self) -> Result<Vec<(Record, Option<String>)>, StoreError> {
        let rows = sqlx::query("SELECT * FROM records ORDER BY seq").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(record_from_row).collect::<Result<_, _>>()?)
    }

    async fn query(&self, filter: &Filter) -> Result<Vec<(Record, Option<String>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM records WHERE ts >= ?1 AND (?2 IS NULL OR actor = ?2) AND (?3 IS NULL OR action = ?3) AND (?4 IS NULL OR resource = ?4)
               AND (?5 IS NULL OR org = ?5)
             ORDER BY seq DESC LIMIT ?6",
        )
        .bind(filter.since)
        .bind(&filter.actor)
        .bind(&filter.action)
        .bind(&filter.resource)
        .bind(&filter.org)
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(record_from_row).collect::<Result<_, _>>()?)
    }

    async fn checkpoints(&self, limit: Option<i64>) -> Result<Vec<Signed>, StoreError> {
        let rows = sqlx::query("SELECT * FROM (SELECT * FROM checkpoints ORDER BY seq DESC LIMIT ?) ORDER BY seq").bind(limit.unwrap_or(-1)).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(checkpoint_from_row).collect::<Result<_, _>>()?)
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("audit.db: {e}"))
    }

    #[cfg(test)]
    async fn tamper(&self, sql: &str) -> Result<(), StoreError> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await?;
        Ok(())
    }
}

/// The audit log in PostgreSQL, schema `audit`.
pub(crate) struct PgAuditStore {
    pool: PgPool,
}

impl PgAuditStore {
    pub(crate) async fn open(url: &str) -> anyhow::Result<PgAuditStore> {
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("audit database URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for the audit log: {e}"))?;
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-audit-migrate'))").execute(&mut *tx).await?;
        sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS audit;
             CREATE TABLE IF NOT EXISTS audit.records (
                 seq BIGINT PRIMARY KEY,
                 ts BIGINT NOT NULL,
                 event_id TEXT NOT NULL UNIQUE,
                 actor TEXT NOT NULL,
                 action TEXT NOT NULL,
                 resource TEXT NOT NULL,
                 outcome TEXT NOT NULL,
                 context TEXT NOT NULL,
                 prev_hash TEXT NOT NULL,
                 hash TEXT NOT NULL,
                 org TEXT
             );
             CREATE INDEX IF NOT EXISTS records_actor ON audit.records(actor, ts);
             CREATE INDEX IF NOT EXISTS records_action ON audit.records(action, ts);
             CREATE INDEX IF NOT EXISTS records_org ON audit.records(org, seq);
             CREATE TABLE IF NOT EXISTS audit.checkpoints (
                 seq BIGINT PRIMARY KEY,
                 head_hash TEXT NOT NULL,
                 signature TEXT NOT NULL,
                 public_key TEXT NOT NULL,
                 created_at BIGINT NOT NULL
             );
             CREATE OR REPLACE FUNCTION audit.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE EXCEPTION 'audit % are append-only', TG_TABLE_NAME;
             END $$;
             CREATE OR REPLACE TRIGGER records_no_change BEFORE UPDATE OR DELETE ON audit.records
                 FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
             CREATE OR REPLACE TRIGGER records_no_truncate BEFORE TRUNCATE ON audit.records
                 FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
             CREATE OR REPLACE TRIGGER checkpoints_no_change BEFORE UPDATE OR DELETE ON audit.checkpoints
                 FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
             CREATE OR REPLACE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON audit.checkpoints
                 FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PgAuditStore { pool })
    }
}

#[async_trait]
impl AuditStore for PgAuditStore {
    async fn append(&self, new: &NewRecord, checkpoint: Checkpointer<'_>) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Appends make one chain whichever replica takes them: one at a time.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-audit-append'))").execute(&mut *tx).await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT seq FROM audit.records WHERE event_id = $1").bind(&new.event_id).fetch_optional(&mut *tx).await?;
        if exists.is_some() {
            return Ok(false);
        }
        let head: Option<(i64, String)> = sqlx::query_as("SELECT seq, hash FROM audit.records ORDER BY seq DESC LIMIT 1").fetch_optional(&mut *tx).await?;
        let (prev_seq, prev_hash) = head.unwrap_or((0, GENESIS.to_string()));
        let record = new.chained(prev_seq + 1, prev_hash);
        sqlx::query(
            "INSERT INTO audit.records (seq, ts, event_id, actor, action, resource, outcome, context, prev_hash, hash, org) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(record.seq)
        .bind(record.ts)
        .bind(&record.event_id)
        .bind(&record.actor)
        .bind(&record.action)
        .bind(&record.resource)
        .bind(&record.outcome)
        .bind(&record.context)
        .bind(&record.prev_hash)
        .bind(&record.hash)
        .bind(&new.org)
        .execute(&mut *tx)
        .await?;
        if let Some(signed) = checkpoint(&record) {
            sqlx::query("INSERT INTO audit.checkpoints (seq, head_hash, signature, public_key, created_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(signed.seq)
                .bind(&signed.head_hash)
                .bind(&signed.signature)
                .bind(&signed.public_key)
                .bind(signed.created_at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn chain(&self) -> Result<Vec<(Record, Option<String>)>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit.records ORDER BY seq").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(record_from_row).collect::<Result<_, _>>()?)
    }

    async fn query(&self, filter: &Filter) -> Result<Vec<(Record, Option<String>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM audit.records WHERE ts >= $1 AND ($2::TEXT IS NULL OR actor = $2) AND ($3::TEXT IS NULL OR action = $3)
               AND ($4::TEXT IS NULL OR resource = $4) AND ($5::TEXT IS NULL OR org = $5)
             ORDER BY seq DESC LIMIT $6",
        )
        .bind(filter.since)
        .bind(&filter.actor)
        .bind(&filter.action)
        .bind(&filter.resource)
        .bind(&filter.org)
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(record_from_row).collect::<Result<_, _>>()?)
    }

    async fn checkpoints(&self, limit: Option<i64>) -> Result<Vec<Signed>, StoreError> {
        let rows = sqlx::query("SELECT * FROM (SELECT * FROM audit.checkpoints ORDER BY seq DESC LIMIT $1) newest ORDER BY seq").bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(checkpoint_from_row).collect::<Result<_, _>>()?)
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("PostgreSQL: {e}"))
    }

    #[cfg(test)]
    async fn tamper(&self, sql: &str) -> Result<(), StoreError> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn new(event_id: &str, actor: &str, action: &str, org: Option<&str>) -> NewRecord {
        NewRecord {
            event_id: event_id.into(),
            ts: 1_700_000_000,
            actor: actor.into(),
            action: action.into(),
            resource: "document:1".into(),
            outcome: "success".into(),
            context: r#"{"b":1,"a":2}"#.into(),
            org: org.map(str::to_string),
        }
    }

    /// A checkpoint every second record, "signed" with a marker the test can see.
    fn every_second(record: &Record) -> Option<Signed> {
        (record.seq % 2 == 0).then(|| Signed { seq: record.seq, head_hash: record.hash.clone(), signature: "sig".into(), public_key: "key".into(), created_at: 1 })
    }

    /// What every `AuditStore` must do; `table` names its records table in raw SQL.
    async fn conformance(store: Arc<dyn AuditStore>, records: &str, checkpoints: &str) {
        store.ready().await.unwrap();
        assert!(store.append(&new("e1", "ann", "document.uploaded", Some("acme")), &every_second).await.unwrap());
        assert!(store.append(&new("e2", "bo", "rag.asked", Some("globex")), &every_second).await.unwrap());
        assert!(!store.append(&new("e2", "bo", "rag.asked", Some("globex")), &every_second).await.unwrap(), "an event is appended once");
        // Concurrent appends still make one chain.
        let tasks: Vec<_> = (3..13)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.append(&new(&format!("e{i}"), "cy", "document.deleted", None), &every_second).await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap());
        }
        let chain = store.chain().await.unwrap();
        assert_eq!(chain.len(), 12);
        let verification = crate::chain::verify(chain.iter().map(|(r, _)| r.clone()));
        assert!(verification.ok, "{verification:?}");
        assert_eq!(chain[0].1.as_deref(), Some("acme"));

        let checkpoints_kept = store.checkpoints(None).await.unwrap();
        assert_eq!(checkpoints_kept.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![2, 4, 6, 8, 10, 12]);
        assert_eq!(checkpoints_kept[0].head_hash, chain[1].0.hash);
        assert_eq!(store.checkpoints(Some(2)).await.unwrap().iter().map(|c| c.seq).collect::<Vec<_>>(), vec![10, 12], "the newest, oldest first");

        // Filters.
        let all = Filter { limit: 100, ..Filter::default() };
        assert_eq!(store.query(&all).await.unwrap().first().map(|(r, _)| r.seq), Some(12), "newest first");
        let by_org = store.query(&Filter { org: Some("globex".into()), ..all.clone() }).await.unwrap();
        assert_eq!(by_org.iter().map(|(r, _)| r.event_id.as_str()).collect::<Vec<_>>(), vec!["e2"]);
        assert_eq!(store.query(&Filter { actor: Some("cy".into()), limit: 3, ..all.clone() }).await.unwrap().len(), 3);
        assert_eq!(store.query(&Filter { action: Some("rag.asked".into()), ..all.clone() }).await.unwrap().len(), 1);
        assert!(store.query(&Filter { since: 1_800_000_000, ..all.clone() }).await.unwrap().is_empty());

        // The database itself refuses changes to what was written.
        for sql in [
            format!("UPDATE {records} SET actor = 'mallory' WHERE seq = 2"),
            format!("DELETE FROM {records} WHERE seq = 2"),
            format!("UPDATE {records} SET org = 'evil'"),
            format!("UPDATE {checkpoints} SET head_hash = 'x'"),
            format!("DELETE FROM {checkpoints}"),
        ] {
            assert!(store.tamper(&sql).await.is_err(), "refused: {sql}");
        }
        assert_eq!(store.chain().await.unwrap(), chain, "nothing changed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteAuditStore::open(&dir.path().join("audit.db")).await.unwrap());
        conformance(store.clone(), "records", "checkpoints").await;
        // Someone with the file drops the trigger and edits: verification catches it.
        store.tamper("DROP TRIGGER records_no_update; UPDATE records SET actor = 'mallory' WHERE seq = 2").await.unwrap();
        let verification = crate::chain::verify(store.chain().await.unwrap().into_iter().map(|(r, _)| r));
        assert_eq!((verification.ok, verification.first_bad), (false, Some(2)));
    }

    /// On a scratch database of the test PostgreSQL (skipped with a reason when it is not
    /// reachable, failed under CI).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_conforms() {
        let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
        let store = Arc::new(PgAuditStore::open(&server.url).await.unwrap());
        conformance(store.clone(), "audit.records", "audit.checkpoints").await;
        assert!(store.tamper("TRUNCATE audit.records CASCADE").await.is_err(), "TRUNCATE is refused too");
        // Another replica opening the same schema appends to the same chain.
        let again = PgAuditStore::open(&server.url).await.unwrap();
        assert!(again.append(&new("e13", "dee", "document.uploaded", None), &every_second).await.unwrap());
        assert_eq!(again.chain().await.unwrap().last().map(|(r, _)| r.seq), Some(13));
        store.tamper("ALTER TABLE audit.records DISABLE TRIGGER records_no_change; UPDATE audit.records SET actor = 'mallory' WHERE seq = 2").await.unwrap();
        let verification = crate::chain::verify(store.chain().await.unwrap().into_iter().map(|(r, _)| r));
        assert_eq!((verification.ok, verification.first_bad), (false, Some(2)));
        drop((store, again));
        server.cleanup().await;
    }
}
