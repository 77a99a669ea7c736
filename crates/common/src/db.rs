//! Embedded SQLite: one file per service, WAL, `synchronous=FULL`, and a minimal
//! ordered migration runner. Services keep their SQL; this module only opens and migrates.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Opens (creating if needed) the SQLite database at `path`.
pub async fn open_sqlite(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
    }
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new().max_connections(8).min_connections(0).connect_with(options).await
}

/// Begins a write transaction that takes the write lock up front (`BEGIN IMMEDIATE`),
/// so concurrent writers wait on `busy_timeout` instead of failing with "database is
/// locked" when a read lock cannot be upgraded.
pub async fn begin_write(pool: &SqlitePool) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// Applies, in order and each in its own transaction, the migrations not yet applied.
/// Versions are the 1-based positions in `migrations`; never reorder or edit one that shipped.
/// Opens `path` and applies `migrations`. When any was applied, the pool is closed
/// and opened again, so that no connection keeps the schema it saw before: SQLite
/// re-prepares a cached `SELECT *` after an `ALTER TABLE` with more columns than the
/// statement cache knows, which sqlx cannot read.
pub async fn open_migrated(path: &Path, migrations: &[&'static str]) -> Result<SqlitePool, sqlx::Error> {
    let pool = open_sqlite(path).await?;
    if migrate_counting(&pool, migrations).await? == 0 {
        return Ok(pool);
    }
    pool.close().await;
    open_sqlite(path).await
}

pub async fn migrate(pool: &SqlitePool, migrations: &[&'static str]) -> Result<(), sqlx::Error> {
    migrate_counting(pool, migrations).await.map(|_| ())
}

/// Applies the migrations not yet applied, in order; returns how many were.
async fn migrate_counting(pool: &SqlitePool, migrations: &[&'static str]) -> Result<usize, sqlx::Error> {
    sqlx::query("CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
        .execute(pool)
        .await?;
    let applied: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _migrations").fetch_one(pool).await?;
    let mut n_applied = 0;
    for (idx, sql) in migrations.iter().enumerate() {
        let version = idx as i64 + 1;
        if version <= applied {
            continue;
        }
        let mut tx = begin_write(pool).await?;
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO _migrations (version, applied_at) VALUES (?, ?)")
            .bind(version)
            .bind(crate::now_unix())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        n_applied += 1;
    }
    Ok(n_applied)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Columns added by later migrations are read by every connection of the pool,
    /// whichever connection ran which migration.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn select_star_sees_columns_added_by_migrations_on_every_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let migrations: &[&'static str] = &[
            "CREATE TABLE t (a INTEGER NOT NULL); INSERT INTO t (a) VALUES (1);",
            "ALTER TABLE t ADD COLUMN b INTEGER NOT NULL DEFAULT 2;",
            "ALTER TABLE t ADD COLUMN c INTEGER NOT NULL DEFAULT 3;",
        ];
        let pool = open_migrated(&path, migrations).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let row = sqlx::query("SELECT * FROM t").fetch_one(&pool).await.unwrap();
                use sqlx::Row;
                (row.len(), row.get::<i64, _>("c"))
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), (3, 3));
        }
    }

    #[tokio::test]
    async fn migrations_apply_once_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let pool = open_sqlite(&path).await.unwrap();
        let migrations = ["CREATE TABLE a (x INTEGER)", "INSERT INTO a VALUES (1)"];
        migrate(&pool, &migrations).await.unwrap();
        migrate(&pool, &migrations).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM a").fetch_one(&pool).await.unwrap();
        assert_eq!(n, 1, "the second run must not re-apply");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&pool).await.unwrap();
        assert_eq!(mode, "wal");
    }
}
