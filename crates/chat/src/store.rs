//! Where rooms and messages live: the `ChatStore` trait, with SQLite (`chat.db` in the
//! data dir, the default) and PostgreSQL (schema `chat`, chosen by `chat.database_url`
//! or `database.url`). Message sequence numbers only grow, so a room's history reads
//! in order and pages by `before`. One conformance suite (below) runs against both.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlitePool;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use common::{EchoConfig, ServiceName};

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RoomRow {
    pub(crate) id: String,
    pub(crate) org: String,
    pub(crate) name: String,
    pub(crate) created_by: String,
    pub(crate) created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MessageRow {
    pub(crate) id: String,
    pub(crate) seq: i64,
    pub(crate) room_id: String,
    pub(crate) author: String,
    pub(crate) author_name: String,
    pub(crate) body: String,
    pub(crate) created_at: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("chat store: {0}")]
pub(crate) struct StoreError(#[from] sqlx::Error);

#[async_trait]
pub(crate) trait ChatStore: Send + Sync {
    async fn rooms_created_by(&self, user: &str) -> Result<i64, StoreError>;
    async fn create_room(&self, room: &RoomRow) -> Result<(), StoreError>;
    /// Removes a room and its messages.
    async fn delete_room(&self, id: &str) -> Result<(), StoreError>;
    /// The rooms of `org` among `ids`, by name.
    async fn rooms_among(&self, org: &str, ids: &[String]) -> Result<Vec<RoomRow>, StoreError>;
    /// Stores a message (its `seq` is assigned here) and returns its sequence number.
    async fn append(&self, message: &MessageRow) -> Result<i64, StoreError>;
    /// At most `limit` messages of the room with `seq < before`, oldest first.
    async fn messages(&self, room_id: &str, before: i64, limit: i64) -> Result<Vec<MessageRow>, StoreError>;
    async fn ready(&self) -> Result<(), String>;
}

/// The store `config` names: PostgreSQL when a URL is set, else `chat.db`.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<Arc<dyn ChatStore>> {
    match config.database_url(&config.chat.database_url) {
        Some(url) => Ok(Arc::new(PgChatStore::open(url).await?)),
        None => Ok(Arc::new(SqliteChatStore::open(&config.db_path(ServiceName::Chat)).await?)),
    }
}

const SQLITE_MIGRATIONS: &[&str] = &[r#"
CREATE TABLE rooms (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX rooms_org ON rooms(org);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    author TEXT NOT NULL,
    author_name TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX messages_room ON messages(room_id, seq);
"#, r#"
CREATE INDEX rooms_created_by ON rooms(created_by);
"#];

pub(crate) struct SqliteChatStore {
    pool: SqlitePool,
}

impl SqliteChatStore {
    pub(crate) async fn open(path: &std::path::Path) -> anyhow::Result<SqliteChatStore> {
        Ok(SqliteChatStore { pool: common::db::open_migrated(path, SQLITE_MIGRATIONS).await? })
    }
}

type RoomTuple = (String, String, String, String, i64);
type MessageTuple = (String, i64, String, String, String, String, i64);

fn room((id, org, name, created_by, created_at): RoomTuple) -> RoomRow {
    RoomRow { id, org, name, created_by, created_at }
}

fn message((id, seq, room_id, author, author_name, body, created_at): MessageTuple) -> MessageRow {
    MessageRow { id, seq, room_id, author, author_name, body, created_at }
}

#[async_trait]
impl ChatStore for SqliteChatStore {
    async fn rooms_created_by(&self, user: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM rooms WHERE created_by = ?").bind(user).fetch_one(&self.pool).await?)
    }

    async fn create_room(&self, room: &RoomRow) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO rooms (id, org, name, created_by, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&room.id)
            .bind(&room.org)
            .bind(&room.name)
            .bind(&room.created_by)
            .bind(room.created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_room(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM messages WHERE room_id = ?").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM rooms WHERE id = ?").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rooms_among(&self, org: &str, ids: &[String]) -> Result<Vec<RoomRow>, StoreError> {
        let rows: Vec<RoomTuple> = sqlx::query_as("SELECT id, org, name, created_by, created_at FROM rooms WHERE org = ? AND id IN (SELECT value FROM json_each(?)) ORDER BY name, id")
            .bind(org)
            .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(room).collect())
    }

    async fn append(&self, m: &MessageRow) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("INSERT INTO messages (id, room_id, author, author_name, body, created_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING seq")
            .bind(&m.id)
            .bind(&m.room_id)
            .bind(&m.author)
            .bind(&m.author_name)
            .bind(&m.body)
            .bind(m.created_at)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn messages(&self, room_id: &str, before: i64, limit: i64) -> Result<Vec<MessageRow>, StoreError> {
        let rows: Vec<MessageTuple> = sqlx::query_as(
            "SELECT id, seq, room_id, author, author_name, body, created_at FROM messages WHERE room_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
        )
        .bind(room_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().rev().map(message).collect())
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("chat.db: {e}"))
    }
}

/// Rooms and messages in PostgreSQL, schema `chat`.
pub(crate) struct PgChatStore {
    pool: PgPool,
}

impl PgChatStore {
    pub(crate) async fn open(url: &str) -> anyhow::Result<PgChatStore> {
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("chat database URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for chat: {e}"))?;
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-chat-migrate'))").execute(&mut *tx).await?;
        sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS chat;
             CREATE TABLE IF NOT EXISTS chat.rooms (
                 id TEXT PRIMARY KEY,
                 org TEXT NOT NULL,
                 name TEXT NOT NULL,
                 created_by TEXT NOT NULL,
                 created_at BIGINT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS rooms_org ON chat.rooms(org);
             CREATE INDEX IF NOT EXISTS rooms_created_by ON chat.rooms(created_by);
             CREATE TABLE IF NOT EXISTS chat.messages (
                 seq BIGSERIAL PRIMARY KEY,
                 id TEXT NOT NULL UNIQUE,
                 room_id TEXT NOT NULL REFERENCES chat.rooms(id) ON DELETE CASCADE,
                 author TEXT NOT NULL,
                 author_name TEXT NOT NULL,
                 body TEXT NOT NULL,
                 created_at BIGINT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS messages_room ON chat.messages(room_id, seq);",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PgChatStore { pool })
    }
}

#[async_trait]
impl ChatStore for PgChatStore {
    async fn rooms_created_by(&self, user: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM chat.rooms WHERE created_by = $1").bind(user).fetch_one(&self.pool).await?)
    }

    async fn create_room(&self, room: &RoomRow) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO chat.rooms (id, org, name, created_by, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&room.id)
            .bind(&room.org)
            .bind(&room.name)
            .bind(&room.created_by)
            .bind(room.created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_room(&self, id: &str) -> Result<(), StoreError> {
        // Messages go with it (ON DELETE CASCADE).
        sqlx::query("DELETE FROM chat.rooms WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    async fn rooms_among(&self, org: &str, ids: &[String]) -> Result<Vec<RoomRow>, StoreError> {
        let rows: Vec<RoomTuple> = sqlx::query_as("SELECT id, org, name, created_by, created_at FROM chat.rooms WHERE org = $1 AND id = ANY($2) ORDER BY name, id")
            .bind(org)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(room).collect())
    }

    async fn append(&self, m: &MessageRow) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("INSERT INTO chat.messages (id, room_id, author, author_name, body, created_at) VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq")
            .bind(&m.id)
            .bind(&m.room_id)
            .bind(&m.author)
            .bind(&m.author_name)
            .bind(&m.body)
            .bind(m.created_at)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn messages(&self, room_id: &str, before: i64, limit: i64) -> Result<Vec<MessageRow>, StoreError> {
        let rows: Vec<MessageTuple> = sqlx::query_as(
            "SELECT id, seq, room_id, author, author_name, body, created_at FROM chat.messages WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
        )
        .bind(room_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().rev().map(message).collect())
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("PostgreSQL: {e}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn a_room(id: &str, org: &str, name: &str, by: &str) -> RoomRow {
        RoomRow { id: id.into(), org: org.into(), name: name.into(), created_by: by.into(), created_at: 1_700_000_000 }
    }

    fn a_message(room: &str, body: &str) -> MessageRow {
        MessageRow {
            id: uuid::Uuid::now_v7().to_string(),
            seq: 0,
            room_id: room.into(),
            author: "u-ann".into(),
            author_name: "ann".into(),
            body: body.into(),
            created_at: 1_700_000_001,
        }
    }

    /// What every `ChatStore` must do.
    async fn conformance(store: &dyn ChatStore) {
        store.ready().await.unwrap();
        store.create_room(&a_room("r-1", "acme", "general", "u-ann")).await.unwrap();
        store.create_room(&a_room("r-2", "acme", "design", "u-ann")).await.unwrap();
        store.create_room(&a_room("r-3", "globex", "general", "u-eve")).await.unwrap();
        assert!(store.create_room(&a_room("r-1", "acme", "again", "u-ann")).await.is_err(), "ids are unique");
        assert_eq!(store.rooms_created_by("u-ann").await.unwrap(), 2);
        let ids = |rooms: Vec<RoomRow>| rooms.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let all: Vec<String> = ["r-1", "r-2", "r-3"].map(String::from).to_vec();
        assert_eq!(ids(store.rooms_among("acme", &all).await.unwrap()), ["r-2", "r-1"], "the org's, by name");
        assert_eq!(ids(store.rooms_among("acme", &["r-3".to_string()]).await.unwrap()), Vec::<String>::new(), "never another org's");
        assert!(store.rooms_among("acme", &[]).await.unwrap().is_empty());

        let mut seqs = Vec::new();
        for body in ["one", "two", "three", "four"] {
            seqs.push(store.append(&a_message("r-1", body)).await.unwrap());
        }
        store.append(&a_message("r-2", "elsewhere")).await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let bodies = |messages: Vec<MessageRow>| messages.into_iter().map(|m| m.body).collect::<Vec<_>>();
        assert_eq!(bodies(store.messages("r-1", i64::MAX, 50).await.unwrap()), ["one", "two", "three", "four"]);
        assert_eq!(bodies(store.messages("r-1", i64::MAX, 2).await.unwrap()), ["three", "four"], "the newest page, oldest first");
        assert_eq!(bodies(store.messages("r-1", seqs[2], 2).await.unwrap()), ["one", "two"], "the page before");
        let stored = store.messages("r-1", i64::MAX, 1).await.unwrap().remove(0);
        assert_eq!((stored.author.as_str(), stored.author_name.as_str(), stored.created_at, stored.seq), ("u-ann", "ann", 1_700_000_001, seqs[3]));

        store.delete_room("r-1").await.unwrap();
        assert!(store.messages("r-1", i64::MAX, 50).await.unwrap().is_empty(), "its messages went with it");
        assert_eq!(ids(store.rooms_among("acme", &all).await.unwrap()), ["r-2"]);
        assert_eq!(store.messages("r-2", i64::MAX, 50).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn sqlite_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance(&SqliteChatStore::open(&dir.path().join("chat.db")).await.unwrap()).await;
    }

    /// On a scratch database of the test PostgreSQL (skipped with a reason when it is not
    /// reachable, failed under CI).
    #[tokio::test]
    async fn postgres_conforms() {
        let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
        conformance(&PgChatStore::open(&server.url).await.unwrap()).await;
        let again = PgChatStore::open(&server.url).await.unwrap();
        assert_eq!(again.rooms_created_by("u-ann").await.unwrap(), 1, "another replica sees the same rooms");
        drop(again);
        server.cleanup().await;
    }
}
