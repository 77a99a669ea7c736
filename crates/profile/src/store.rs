//! Where profiles live: the `ProfileStore` trait, with SQLite (`profile.db` in the data
//! dir, the default) and PostgreSQL (schema `profile`, chosen by
//! `profile.database_url` or `database.url`). Handlers talk to the trait only; one
//! conformance suite (below) runs against both.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::SqlitePool;

use common::wire::Principal;
use common::{EchoConfig, ServiceName};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct Profile {
    pub(crate) id: String,
    pub(crate) username: String,
    pub(crate) org: String,
    pub(crate) display_name: String,
    pub(crate) preferences: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
#[error("profile store: {0}")]
pub(crate) struct StoreError(#[from] sqlx::Error);

#[async_trait]
pub(crate) trait ProfileStore: Send + Sync {
    /// Creates `principal`'s profile (display name = username) unless it exists.
    async fn ensure(&self, principal: &Principal) -> Result<(), StoreError>;
    async fn load(&self, user_id: &str) -> Result<Option<Profile>, StoreError>;
    async fn set_display_name(&self, user_id: &str, name: &str) -> Result<(), StoreError>;
    async fn set_preferences(&self, user_id: &str, preferences: &serde_json::Value) -> Result<(), StoreError>;
    async fn ready(&self) -> Result<(), String>;
}

/// The store `config` names: PostgreSQL when a URL is set, else `profile.db`.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<Arc<dyn ProfileStore>> {
    match config.database_url(&config.profile.database_url) {
        Some(url) => Ok(Arc::new(PgProfileStore::open(url).await?)),
        None => Ok(Arc::new(SqliteProfileStore::open(&config.db_path(ServiceName::Profile)).await?)),
    }
}

const SQLITE_MIGRATIONS: &[&str] = &[r#"
CREATE TABLE profiles (
    user_id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    username TEXT NOT NULL,
    display_name TEXT NOT NULL,
    preferences TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
"#];

pub(crate) struct SqliteProfileStore {
    pool: SqlitePool,
}

impl SqliteProfileStore {
    pub(crate) async fn open(path: &std::path::Path) -> anyhow::Result<SqliteProfileStore> {
        Ok(SqliteProfileStore { pool: common::db::open_migrated(path, SQLITE_MIGRATIONS).await? })
    }
}

#[async_trait]
impl ProfileStore for SqliteProfileStore {
    async fn ensure(&self, principal: &Principal) -> Result<(), StoreError> {
        sqlx::query("INSERT OR IGNORE INTO profiles (user_id, org, username, display_name, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&principal.sub)
            .bind(&principal.org)
            .bind(&principal.username)
            .bind(&principal.username)
            .bind(common::now_unix())
            .bind(common::now_unix())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn load(&self, user_id: &str) -> Result<Option<Profile>, StoreError> {
        let row = sqlx::query("SELECT * FROM profiles WHERE user_id = ?").bind(user_id).fetch_optional(&self.pool).await?;
        Ok(row
            .map(|r| -> Result<Profile, sqlx::Error> {
                let preferences: String = r.try_get("preferences")?;
                Ok(Profile {
                    id: r.try_get("user_id")?,
                    username: r.try_get("username")?,
                    org: r.try_get("org")?,
                    display_name: r.try_get("display_name")?,
                    preferences: serde_json::from_str(&preferences).unwrap_or_default(),
                })
            })
            .transpose()?)
    }

    async fn set_display_name(&self, user_id: &str, name: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE profiles SET display_name = ?, updated_at = ? WHERE user_id = ?").bind(name).bind(common::now_unix()).bind(user_id).execute(&self.pool).await?;
        Ok(())
    }

    async fn set_preferences(&self, user_id: &str, preferences: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query("UPDATE profiles SET preferences = ?, updated_at = ? WHERE user_id = ?")
            .bind(serde_json::to_string(preferences).unwrap_or_default())
            .bind(common::now_unix())
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("profile.db: {e}"))
    }
}

/// Profiles in PostgreSQL, schema `profile`.
pub(crate) struct PgProfileStore {
    pool: PgPool,
}

impl PgProfileStore {
    pub(crate) async fn open(url: &str) -> anyhow::Result<PgProfileStore> {
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("profile database URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for profiles: {e}"))?;
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-profile-migrate'))").execute(&mut *tx).await?;
        sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS profile;
             CREATE TABLE IF NOT EXISTS profile.profiles (
                 user_id TEXT PRIMARY KEY,
                 org TEXT NOT NULL,
                 username TEXT NOT NULL,
                 display_name TEXT NOT NULL,
                 preferences JSONB NOT NULL DEFAULT '{}',
                 created_at BIGINT NOT NULL,
                 updated_at BIGINT NOT NULL
             );",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PgProfileStore { pool })
    }
}

#[async_trait]
impl ProfileStore for PgProfileStore {
    async fn ensure(&self, principal: &Principal) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO profile.profiles (user_id, org, username, display_name, created_at, updated_at) VALUES ($1, $2, $3, $3, $4, $4) ON CONFLICT (user_id) DO NOTHING")
            .bind(&principal.sub)
            .bind(&principal.org)
            .bind(&principal.username)
            .bind(common::now_unix())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn load(&self, user_id: &str) -> Result<Option<Profile>, StoreError> {
        let row = sqlx::query("SELECT user_id, username, org, display_name, preferences FROM profile.profiles WHERE user_id = $1").bind(user_id).fetch_optional(&self.pool).await?;
        Ok(row
            .map(|r| -> Result<Profile, sqlx::Error> {
                Ok(Profile { id: r.try_get("user_id")?, username: r.try_get("username")?, org: r.try_get("org")?, display_name: r.try_get("display_name")?, preferences: r.try_get("preferences")? })
            })
            .transpose()?)
    }

    async fn set_display_name(&self, user_id: &str, name: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE profile.profiles SET display_name = $1, updated_at = $2 WHERE user_id = $3").bind(name).bind(common::now_unix()).bind(user_id).execute(&self.pool).await?;
        Ok(())
    }

    async fn set_preferences(&self, user_id: &str, preferences: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query("UPDATE profile.profiles SET preferences = $1, updated_at = $2 WHERE user_id = $3").bind(preferences).bind(common::now_unix()).bind(user_id).execute(&self.pool).await?;
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

    /// What every `ProfileStore` must do.
    async fn conformance(store: &dyn ProfileStore) {
        store.ready().await.unwrap();
        let ann = Principal { sub: "u-ann".into(), username: "ann".into(), org: "acme".into(), roles: vec![] };
        assert_eq!(store.load("u-ann").await.unwrap(), None);
        store.ensure(&ann).await.unwrap();
        let created = store.load("u-ann").await.unwrap().unwrap();
        assert_eq!((created.display_name.as_str(), created.org.as_str(), &created.preferences), ("ann", "acme", &serde_json::json!({})));
        store.set_display_name("u-ann", "Ann Lee — ops ✓").await.unwrap();
        store.set_preferences("u-ann", &serde_json::json!({"theme": "dark", "language": "de"})).await.unwrap();
        // A second first sign-in changes nothing.
        store.ensure(&Principal { username: "ann2".into(), ..ann.clone() }).await.unwrap();
        let edited = store.load("u-ann").await.unwrap().unwrap();
        assert_eq!(edited.display_name, "Ann Lee — ops ✓");
        assert_eq!(edited.username, "ann");
        assert_eq!(edited.preferences["theme"], "dark");
        // Others are untouched.
        store.ensure(&Principal { sub: "u-bo".into(), username: "bo".into(), org: "acme".into(), roles: vec![] }).await.unwrap();
        assert_eq!(store.load("u-bo").await.unwrap().unwrap().display_name, "bo");
    }

    #[tokio::test]
    async fn sqlite_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance(&SqliteProfileStore::open(&dir.path().join("profile.db")).await.unwrap()).await;
    }

    /// On a scratch database of the test PostgreSQL (skipped with a reason when it is not
    /// reachable, failed under CI).
    #[tokio::test]
    async fn postgres_conforms() {
        let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
        conformance(&PgProfileStore::open(&server.url).await.unwrap()).await;
        // Opening again (another replica, a restart) keeps what is there.
        let again = PgProfileStore::open(&server.url).await.unwrap();
        assert_eq!(again.load("u-ann").await.unwrap().unwrap().display_name, "Ann Lee — ops ✓");
        drop(again);
        server.cleanup().await;
    }
}
