//! The blob ledger: which blobs exist (owner, size, SHA-256, when) and the quota held by
//! uploads in flight (reservations). The `Ledger` trait, with SQLite (`storage.db` in the
//! data dir, the default) and PostgreSQL (schema `storage`, chosen by
//! `storage.database_url` or `database.url`). Reserving is atomic with every other
//! upload of the same owner on either backend (SQLite: one writer; PostgreSQL: a
//! transaction-scoped advisory lock per owner), so concurrent uploads — through one
//! replica or several — never together exceed the quota. One conformance suite (below)
//! runs against both.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlitePool;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use common::{EchoConfig, ServiceName};

/// How long a reservation holds quota for an upload that never finishes (the process
/// died mid-upload): after this it counts for nothing.
pub(crate) const RESERVATION_TTL_SECS: i64 = 3600;

/// A stored blob as the ledger knows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BlobRow {
    pub(crate) size: u64,
    pub(crate) sha256: String,
    /// Unix seconds.
    pub(crate) created_at: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("blob ledger: {0}")]
pub(crate) struct StoreError(#[from] sqlx::Error);

/// The answer to a reservation.
#[derive(Debug, PartialEq)]
pub(crate) enum Reserved {
    /// The reservation's id.
    Held(String),
    /// It does not fit: this many bytes of the quota are free.
    Refused { free: u64 },
}

#[async_trait]
pub(crate) trait Ledger: Send + Sync {
    /// At start: forgets reservations whose uploads cannot finish any more. A ledger
    /// this process alone uses (SQLite) drops them all; a shared one (PostgreSQL, other
    /// replicas may be mid-upload) only those expired.
    async fn forget_stale_reservations(&self) -> Result<(), StoreError>;
    /// Holds `bytes` of `owner`'s `quota` unless what is stored plus what is reserved
    /// would then exceed it.
    async fn reserve(&self, owner: &str, bytes: u64, quota: u64) -> Result<Reserved, StoreError>;
    /// The bytes a live reservation of `owner` holds.
    async fn reservation(&self, id: &str, owner: &str) -> Result<Option<u64>, StoreError>;
    /// Bytes of `owner`'s quota in use (stored + reserved).
    async fn used(&self, owner: &str) -> Result<u64, StoreError>;
    /// Releases a reservation (of `owner` when given).
    async fn release(&self, id: &str, owner: Option<&str>) -> Result<(), StoreError>;
    /// Turns a reservation into the blob's row, in one transaction.
    async fn commit(&self, reservation: &str, id: &str, owner: &str, size: u64, sha256: &str) -> Result<(), StoreError>;
    async fn blob(&self, id: &str) -> Result<Option<BlobRow>, StoreError>;
    async fn forget_blob(&self, id: &str) -> Result<(), StoreError>;
    async fn ready(&self) -> Result<(), String>;
}

/// The ledger `config` names: PostgreSQL when a URL is set, else `storage.db`.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<Arc<dyn Ledger>> {
    match config.database_url(&config.storage.database_url) {
        Some(url) => Ok(Arc::new(PgLedger::open(url).await?)),
        None => Ok(Arc::new(SqliteLedger::open(&config.db_path(ServiceName::Storage)).await?)),
    }
}

const SQLITE_MIGRATIONS: &[&str] = &[r#"
CREATE TABLE blobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX blobs_owner ON blobs(owner);
"#, r#"
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX reservations_owner ON reservations(owner);
"#];

pub(crate) struct SqliteLedger {
    pool: SqlitePool,
}

impl SqliteLedger {
    pub(crate) async fn open(path: &std::path::Path) -> anyhow::Result<SqliteLedger> {
        Ok(SqliteLedger { pool: common::db::open_migrated(path, SQLITE_MIGRATIONS).await? })
    }
}

const SQLITE_USED: &str =
    "SELECT (SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner = ?1) + (SELECT COALESCE(SUM(bytes), 0) FROM reservations WHERE owner = ?1 AND expires_at > ?2)";

#[async_trait]
impl Ledger for SqliteLedger {
    async fn forget_stale_reservations(&self) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM reservations").execute(&self.pool).await?;
        Ok(())
    }

    async fn reserve(&self, owner: &str, bytes: u64, quota: u64) -> Result<Reserved, StoreError> {
        let now = common::now_unix();
        // One write transaction at a time: the sum and the insert see no other upload's.
        let mut tx = common::db::begin_write(&self.pool).await?;
        let used: i64 = sqlx::query_scalar(SQLITE_USED).bind(owner).bind(now).fetch_one(&mut *tx).await?;
        let used = used.max(0) as u64;
        if used.saturating_add(bytes) > quota {
            return Ok(Reserved::Refused { free: quota.saturating_sub(used) });
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO reservations (id, owner, bytes, expires_at) VALUES (?, ?, ?, ?)")
            .bind(&id)
            .bind(owner)
            .bind(bytes as i64)
            .bind(now + RESERVATION_TTL_SECS)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Reserved::Held(id))
    }

    async fn reservation(&self, id: &str, owner: &str) -> Result<Option<u64>, StoreError> {
        let bytes: Option<i64> = sqlx::query_scalar("SELECT bytes FROM reservations WHERE id = ? AND owner = ? AND expires_at > ?")
            .bind(id)
            .bind(owner)
            .bind(common::now_unix())
            .fetch_optional(&self.pool)
            .await?;
        Ok(bytes.map(|b| b.max(0) as u64))
    }

    async fn used(&self, owner: &str) -> Result<u64, StoreError> {
        let used: i64 = sqlx::query_scalar(SQLITE_USED).bind(owner).bind(common::now_unix()).fetch_one(&self.pool).await?;
        Ok(used.max(0) as u64)
    }

    async fn release(&self, id: &str, owner: Option<&str>) -> Result<(), StoreError> {
        match owner {
            Some(owner) => sqlx::query("DELETE FROM reservations WHERE id = ? AND owner = ?").bind(id).bind(owner).execute(&self.pool).await?,
            None => sqlx::query("DELETE FROM reservations WHERE id = ?").bind(id).execute(&self.pool).await?,
        };
        Ok(())
    }

    async fn commit(&self, reservation: &str, id: &str, owner: &str, size: u64, sha256: &str) -> Result<(), StoreError> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM reservations WHERE id = ?").bind(reservation).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO blobs (id, owner, size, sha256, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(id)
            .bind(owner)
            .bind(size as i64)
            .bind(sha256)
            .bind(common::now_unix())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn blob(&self, id: &str) -> Result<Option<BlobRow>, StoreError> {
        let row: Option<(i64, String, i64)> = sqlx::query_as("SELECT size, sha256, created_at FROM blobs WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.map(|(size, sha256, created_at)| BlobRow { size: size.max(0) as u64, sha256, created_at }))
    }

    async fn forget_blob(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM blobs WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("storage.db: {e}"))
    }
}

/// The ledger in PostgreSQL, schema `storage`.
pub(crate) struct PgLedger {
    pool: PgPool,
}

impl PgLedger {
    pub(crate) async fn open(url: &str) -> anyhow::Result<PgLedger> {
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("storage database URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for the blob ledger: {e}"))?;
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-storage-migrate'))").execute(&mut *tx).await?;
        sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS storage;
             CREATE TABLE IF NOT EXISTS storage.blobs (
                 id TEXT PRIMARY KEY,
                 owner TEXT NOT NULL,
                 size BIGINT NOT NULL,
                 sha256 TEXT NOT NULL,
                 created_at BIGINT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS blobs_owner ON storage.blobs(owner);
             CREATE TABLE IF NOT EXISTS storage.reservations (
                 id TEXT PRIMARY KEY,
                 owner TEXT NOT NULL,
                 bytes BIGINT NOT NULL,
                 expires_at BIGINT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS reservations_owner ON storage.reservations(owner);",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PgLedger { pool })
    }
}

const PG_USED: &str = "SELECT ((SELECT COALESCE(SUM(size), 0) FROM storage.blobs WHERE owner = $1) \
                       + (SELECT COALESCE(SUM(bytes), 0) FROM storage.reservations WHERE owner = $1 AND expires_at > $2))::BIGINT";

#[async_trait]
impl Ledger for PgLedger {
    async fn forget_stale_reservations(&self) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM storage.reservations WHERE expires_at <= $1").bind(common::now_unix()).execute(&self.pool).await?;
        Ok(())
    }

    async fn reserve(&self, owner: &str, bytes: u64, quota: u64) -> Result<Reserved, StoreError> {
        let now = common::now_unix();
        let mut tx = self.pool.begin().await?;
        // The owner's uploads reserve one at a time, whichever replica takes them.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-storage-quota'), hashtext($1))").bind(owner).execute(&mut *tx).await?;
        let used: i64 = sqlx::query_scalar(PG_USED).bind(owner).bind(now).fetch_one(&mut *tx).await?;
        let used = used.max(0) as u64;
        if used.saturating_add(bytes) > quota {
            return Ok(Reserved::Refused { free: quota.saturating_sub(used) });
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO storage.reservations (id, owner, bytes, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(&id)
            .bind(owner)
            .bind(bytes as i64)
            .bind(now + RESERVATION_TTL_SECS)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Reserved::Held(id))
    }

    async fn reservation(&self, id: &str, owner: &str) -> Result<Option<u64>, StoreError> {
        let bytes: Option<i64> = sqlx::query_scalar("SELECT bytes FROM storage.reservations WHERE id = $1 AND owner = $2 AND expires_at > $3")
            .bind(id)
            .bind(owner)
            .bind(common::now_unix())
            .fetch_optional(&self.pool)
            .await?;
        Ok(bytes.map(|b| b.max(0) as u64))
    }

    async fn used(&self, owner: &str) -> Result<u64, StoreError> {
        let used: i64 = sqlx::query_scalar(PG_USED).bind(owner).bind(common::now_unix()).fetch_one(&self.pool).await?;
        Ok(used.max(0) as u64)
    }

    async fn release(&self, id: &str, owner: Option<&str>) -> Result<(), StoreError> {
        match owner {
            Some(owner) => sqlx::query("DELETE FROM storage.reservations WHERE id = $1 AND owner = $2").bind(id).bind(owner).execute(&self.pool).await?,
            None => sqlx::query("DELETE FROM storage.reservations WHERE id = $1").bind(id).execute(&self.pool).await?,
        };
        Ok(())
    }

    async fn commit(&self, reservation: &str, id: &str, owner: &str, size: u64, sha256: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM storage.reservations WHERE id = $1").bind(reservation).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO storage.blobs (id, owner, size, sha256, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(owner)
            .bind(size as i64)
            .bind(sha256)
            .bind(common::now_unix())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn blob(&self, id: &str) -> Result<Option<BlobRow>, StoreError> {
        let row: Option<(i64, String, i64)> = sqlx::query_as("SELECT size, sha256, created_at FROM storage.blobs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.map(|(size, sha256, created_at)| BlobRow { size: size.max(0) as u64, sha256, created_at }))
    }

    async fn forget_blob(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM storage.blobs WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("PostgreSQL: {e}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn held(reserved: Reserved) -> String {
        match reserved {
            Reserved::Held(id) => id,
            Reserved::Refused { free } => panic!("refused with {free} free"),
        }
    }

    /// What every `Ledger` must do.
    async fn conformance(ledger: Arc<dyn Ledger>) {
        ledger.ready().await.unwrap();
        let quota = 1000;
        let first = held(ledger.reserve("u-ann", 600, quota).await.unwrap());
        assert_eq!(ledger.reservation(&first, "u-ann").await.unwrap(), Some(600));
        assert_eq!(ledger.reservation(&first, "u-bo").await.unwrap(), None, "a reservation is its owner's");
        assert_eq!(ledger.used("u-ann").await.unwrap(), 600);
        assert_eq!(ledger.reserve("u-ann", 500, quota).await.unwrap(), Reserved::Refused { free: 400 });
        assert!(matches!(ledger.reserve("u-bo", 900, quota).await.unwrap(), Reserved::Held(_)), "quotas are per owner");

        // A reservation becomes the blob's row; the quota then counts the blob.
        ledger.commit(&first, "b-1", "u-ann", 550, "ab12").await.unwrap();
        assert_eq!(ledger.reservation(&first, "u-ann").await.unwrap(), None);
        let row = ledger.blob("b-1").await.unwrap().unwrap();
        assert_eq!((row.size, row.sha256.as_str()), (550, "ab12"));
        assert!(row.created_at > 0);
        assert_eq!(ledger.used("u-ann").await.unwrap(), 550);

        // Releasing frees; someone else's release of it does nothing.
        let second = held(ledger.reserve("u-ann", 400, quota).await.unwrap());
        ledger.release(&second, Some("u-bo")).await.unwrap();
        assert_eq!(ledger.used("u-ann").await.unwrap(), 950);
        ledger.release(&second, Some("u-ann")).await.unwrap();
        assert_eq!(ledger.used("u-ann").await.unwrap(), 550);

        // Concurrent reservations never together exceed the quota.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.reserve("u-cy", 300, quota).await.unwrap() })
            })
            .collect();
        let mut granted = 0;
        for task in tasks {
            if matches!(task.await.unwrap(), Reserved::Held(_)) {
                granted += 1;
            }
        }
        assert_eq!(granted, 3, "1000 bytes hold three reservations of 300");

        ledger.forget_blob("b-1").await.unwrap();
        assert_eq!(ledger.blob("b-1").await.unwrap(), None);
        assert_eq!(ledger.used("u-ann").await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(SqliteLedger::open(&dir.path().join("storage.db")).await.unwrap());
        conformance(ledger.clone()).await;
        // Alone on its file: at start, every reservation goes.
        held(ledger.reserve("u-dee", 10, 100).await.unwrap());
        ledger.forget_stale_reservations().await.unwrap();
        assert_eq!(ledger.used("u-dee").await.unwrap(), 0);
    }

    /// On a scratch database of the test PostgreSQL (skipped with a reason when it is not
    /// reachable, failed under CI).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_conforms() {
        let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
        let ledger = Arc::new(PgLedger::open(&server.url).await.unwrap());
        conformance(ledger.clone()).await;
        // Shared with other replicas: a live reservation survives another's start.
        held(ledger.reserve("u-dee", 10, 100).await.unwrap());
        let again = PgLedger::open(&server.url).await.unwrap();
        again.forget_stale_reservations().await.unwrap();
        assert_eq!(again.used("u-dee").await.unwrap(), 10);
        drop((ledger, again));
        server.cleanup().await;
    }
}
