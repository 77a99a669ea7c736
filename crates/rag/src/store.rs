//! Conversations and their messages: the `ConversationStore` trait, with SQLite (`rag.db`
//! in the data dir, the default) and PostgreSQL (schema `rag`, chosen by
//! `rag.database_url` or `database.url`). Every read and write names the owner, so one
//! person's conversations are never another's. One conformance suite (below) runs
//! against both.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Row, SqlitePool};

use common::wire::{Citation, Turn};
use common::{EchoConfig, ServiceName, now_unix, rfc3339};

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX conversations_user ON conversations(user_id, updated_at);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    citations TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE messages ADD COLUMN mode TEXT NOT NULL DEFAULT 'extractive';
ALTER TABLE messages ADD COLUMN not_found INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_conversation ON messages(conversation_id, id);
"#,
];

/// Longest title kept.
pub(crate) const MAX_TITLE: usize = 120;

/// One stored message.
#[derive(Debug, PartialEq)]
pub(crate) struct StoredMessage {
    pub(crate) role: String,
    pub(crate) content: String,
    pub(crate) citations: Vec<Citation>,
    pub(crate) mode: String,
    pub(crate) not_found: bool,
    pub(crate) created_at: i64,
}

#[derive(serde::Serialize)]
pub(crate) struct ConversationSummary {
    pub(crate) id: String,
    pub(crate) title: String,
    pub(crate) updated_at: String,
}

/// The assistant's side of one exchange, as stored.
pub(crate) struct Reply<'a> {
    pub(crate) content: &'a str,
    pub(crate) citations: &'a [Citation],
    pub(crate) mode: &'a str,
    pub(crate) not_found: bool,
}

#[async_trait]
pub(crate) trait ConversationStore: Send + Sync {
    /// Whether `user` owns conversation `id`.
    async fn owns(&self, user: &str, id: &str) -> Result<bool, sqlx::Error>;
    /// A new conversation of `user`; its id.
    async fn create(&self, user: &str, title: &str) -> Result<String, sqlx::Error>;
    /// The last `limit` turns of a conversation, oldest first (withdrawn checks are the
    /// caller's: history feeds retrieval only, never an answer's text).
    async fn recent_turns(&self, id: &str, limit: i64) -> Result<Vec<Turn>, sqlx::Error>;
    /// Stores a question and its answer together.
    async fn append(&self, id: &str, question: &str, reply: Reply<'_>) -> Result<(), sqlx::Error>;
    /// `user`'s conversations, most recently used first.
    async fn list(&self, user: &str) -> Result<Vec<ConversationSummary>, sqlx::Error>;
    /// A conversation's title and messages, if `user` owns it.
    async fn get(&self, user: &str, id: &str) -> Result<Option<(String, Vec<StoredMessage>)>, sqlx::Error>;
    /// Renames `user`'s conversation; false when there is none.
    async fn rename(&self, user: &str, id: &str, title: &str) -> Result<bool, sqlx::Error>;
    /// Deletes `user`'s conversation and its messages; false when there is none.
    async fn delete(&self, user: &str, id: &str) -> Result<bool, sqlx::Error>;
    async fn ready(&self) -> Result<(), String>;
}

/// The store `config` names: PostgreSQL when a URL is set, else `rag.db`.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<Arc<dyn ConversationStore>> {
    match config.database_url(&config.rag.database_url) {
        Some(url) => Ok(Arc::new(PgConversations::open(url).await?)),
        None => Ok(Arc::new(SqliteConversations::open(&config.db_path(ServiceName::Rag)).await?)),
    }
}

fn title_of(title: &str) -> String {
    title.chars().take(MAX_TITLE).collect()
}

pub(crate) struct SqliteConversations {
    pool: SqlitePool,
}

impl SqliteConversations {
    pub(crate) async fn open(path: &Path) -> Result<SqliteConversations, sqlx::Error> {
        Ok(SqliteConversations { pool: common::db::open_migrated(path, MIGRATIONS).await? })
    }
}

#[async_trait]
impl ConversationStore for SqliteConversations {
    /// Whether `user` owns conversation `id`.
    async fn owns(&self, user: &str, id: &str) -> Result<bool, sqlx::Error> {
        let owner: Option<String> = sqlx::query_scalar("SELECT user_id FROM conversations WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        Ok(owner.as_deref() == Some(user))
    }

    async fn create(&self, user: &str, title: &str) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::now_v7().to_string();
        let title = title_of(title);
        sqlx::query("INSERT INTO conversations (id, user_id, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&id)
            .bind(user)
            .bind(title)
            .bind(now_unix())
            .bind(now_unix())
            .execute(&self.pool)
            .await?;
        Ok(id)
    }

    /// The last `limit` turns of a conversation, oldest first (withdrawn checks are the
    /// caller's: history feeds retrieval only, never an answer's text).
    async fn recent_turns(&self, id: &str, limit: i64) -> Result<Vec<Turn>, sqlx::Error> {
        let rows = sqlx::query("SELECT role, content FROM (SELECT id, role, content FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id")
            .bind(id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(Turn { role: r.try_get("role")?, content: r.try_get("content")? })).collect()
    }

    /// Stores a question and its answer together.
    async fn append(&self, id: &str, question: &str, reply: Reply<'_>) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        let cited = serde_json::to_string(reply.citations).unwrap_or_else(|_| "[]".into());
        for (role, content, cited, mode, not_found) in [("user", question, "[]", "", false), ("assistant", reply.content, cited.as_str(), reply.mode, reply.not_found)] {
            sqlx::query("INSERT INTO messages (conversation_id, role, content, citations, mode, not_found, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
                .bind(id)
                .bind(role)
                .bind(content)
                .bind(cited)
                .bind(mode)
                .bind(not_found)
                .bind(now_unix())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE conversations SET updated_at = ? WHERE id = ?").bind(now_unix()).bind(id).execute(&mut *tx).await?;
        tx.commit().await
    }

    async fn list(&self, user: &str) -> Result<Vec<ConversationSummary>, sqlx::Error> {
        let rows = sqlx::query("SELECT id, title, updated_at FROM conversations WHERE user_id = ? ORDER BY updated_at DESC, id DESC LIMIT 200")
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(ConversationSummary { id: r.try_get("id")?, title: r.try_get("title")?, updated_at: rfc3339(r.try_get("updated_at")?) })).collect()
    }

    /// A conversation's title and messages, if `user` owns it.
    async fn get(&self, user: &str, id: &str) -> Result<Option<(String, Vec<StoredMessage>)>, sqlx::Error> {
        let title: Option<String> = sqlx::query_scalar("SELECT title FROM conversations WHERE id = ? AND user_id = ?").bind(id).bind(user).fetch_optional(&self.pool).await?;
        let Some(title) = title else { return Ok(None) };
        let rows = sqlx::query("SELECT role, content, citations, mode, not_found, created_at FROM messages WHERE conversation_id = ? ORDER BY id LIMIT 1000")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let mut messages = Vec::with_capacity(rows.len());
        for r in &rows {
            let citations: String = r.try_get("citations")?;
            messages.push(StoredMessage {
                role: r.try_get("role")?,
                content: r.try_get("content")?,
                citations: serde_json::from_str(&citations).unwrap_or_default(),
                mode: r.try_get("mode")?,
                not_found: r.try_get("not_found")?,
                created_at: r.try_get("created_at")?,
            });
        }
        Ok(Some((title, messages)))
    }

    /// Renames `user`'s conversation; false when there is none.
    async fn rename(&self, user: &str, id: &str, title: &str) -> Result<bool, sqlx::Error> {
        let title = title_of(title);
        let done = sqlx::query("UPDATE conversations SET title = ? WHERE id = ? AND user_id = ?").bind(title).bind(id).bind(user).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete(&self, user: &str, id: &str) -> Result<bool, sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        let done = sqlx::query("DELETE FROM conversations WHERE id = ? AND user_id = ?").bind(id).bind(user).execute(&mut *tx).await?;
        if done.rows_affected() > 0 {
            sqlx::query("DELETE FROM messages WHERE conversation_id = ?").bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("rag.db: {e}"))
    }
}

/// Conversations in PostgreSQL, schema `rag`.
pub(crate) struct PgConversations {
    pool: PgPool,
}

impl PgConversations {
    pub(crate) async fn open(url: &str) -> anyhow::Result<PgConversations> {
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("rag database URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for conversations: {e}"))?;
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-rag-migrate'))").execute(&mut *tx).await?;
        sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS rag;
             CREATE TABLE IF NOT EXISTS rag.conversations (
                 id TEXT PRIMARY KEY,
                 user_id TEXT NOT NULL,
                 title TEXT NOT NULL,
                 created_at BIGINT NOT NULL,
                 updated_at BIGINT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS conversations_user ON rag.conversations(user_id, updated_at);
             CREATE TABLE IF NOT EXISTS rag.messages (
                 id BIGSERIAL PRIMARY KEY,
                 conversation_id TEXT NOT NULL REFERENCES rag.conversations(id) ON DELETE CASCADE,
                 role TEXT NOT NULL,
                 content TEXT NOT NULL,
                 citations JSONB NOT NULL DEFAULT '[]',
                 mode TEXT NOT NULL DEFAULT 'extractive',
                 not_found BOOLEAN NOT NULL DEFAULT FALSE,
                 created_at BIGINT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS messages_conversation ON rag.messages(conversation_id, id);",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PgConversations { pool })
    }
}

#[async_trait]
impl ConversationStore for PgConversations {
    async fn owns(&self, user: &str, id: &str) -> Result<bool, sqlx::Error> {
        let owner: Option<String> = sqlx::query_scalar("SELECT user_id FROM rag.conversations WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(owner.as_deref() == Some(user))
    }

    async fn create(&self, user: &str, title: &str) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::now_v7().to_string();
        sqlx::query("INSERT INTO rag.conversations (id, user_id, title, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)")
            .bind(&id)
            .bind(user)
            .bind(title_of(title))
            .bind(now_unix())
            .execute(&self.pool)
            .await?;
        Ok(id)
    }

    async fn recent_turns(&self, id: &str, limit: i64) -> Result<Vec<Turn>, sqlx::Error> {
        let rows = sqlx::query("SELECT role, content FROM (SELECT id, role, content FROM rag.messages WHERE conversation_id = $1 ORDER BY id DESC LIMIT $2) recent ORDER BY id")
            .bind(id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(Turn { role: r.try_get("role")?, content: r.try_get("content")? })).collect()
    }

    async fn append(&self, id: &str, question: &str, reply: Reply<'_>) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let cited = serde_json::to_value(reply.citations).unwrap_or_else(|_| serde_json::json!([]));
        for (role, content, cited, mode, not_found) in [("user", question, serde_json::json!([]), "", false), ("assistant", reply.content, cited, reply.mode, reply.not_found)] {
            sqlx::query("INSERT INTO rag.messages (conversation_id, role, content, citations, mode, not_found, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(id)
                .bind(role)
                .bind(content)
                .bind(cited)
                .bind(mode)
                .bind(not_found)
                .bind(now_unix())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE rag.conversations SET updated_at = $1 WHERE id = $2").bind(now_unix()).bind(id).execute(&mut *tx).await?;
        tx.commit().await
    }

    async fn list(&self, user: &str) -> Result<Vec<ConversationSummary>, sqlx::Error> {
        let rows = sqlx::query("SELECT id, title, updated_at FROM rag.conversations WHERE user_id = $1 ORDER BY updated_at DESC, id DESC LIMIT 200")
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(ConversationSummary { id: r.try_get("id")?, title: r.try_get("title")?, updated_at: rfc3339(r.try_get("updated_at")?) })).collect()
    }

    async fn get(&self, user: &str, id: &str) -> Result<Option<(String, Vec<StoredMessage>)>, sqlx::Error> {
        let title: Option<String> = sqlx::query_scalar("SELECT title FROM rag.conversations WHERE id = $1 AND user_id = $2").bind(id).bind(user).fetch_optional(&self.pool).await?;
        let Some(title) = title else { return Ok(None) };
        let rows = sqlx::query("SELECT role, content, citations, mode, not_found, created_at FROM rag.messages WHERE conversation_id = $1 ORDER BY id LIMIT 1000")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let mut messages = Vec::with_capacity(rows.len());
        for r in &rows {
            let citations: serde_json::Value = r.try_get("citations")?;
            messages.push(StoredMessage {
                role: r.try_get("role")?,
                content: r.try_get("content")?,
                citations: serde_json::from_value(citations).unwrap_or_default(),
                mode: r.try_get("mode")?,
                not_found: r.try_get("not_found")?,
                created_at: r.try_get("created_at")?,
            });
        }
        Ok(Some((title, messages)))
    }

    async fn rename(&self, user: &str, id: &str, title: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("UPDATE rag.conversations SET title = $1 WHERE id = $2 AND user_id = $3").bind(title_of(title)).bind(id).bind(user).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete(&self, user: &str, id: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM rag.conversations WHERE id = $1 AND user_id = $2").bind(id).bind(user).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("PostgreSQL: {e}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn citation(document: &str) -> Citation {
        serde_json::from_value(serde_json::json!({"n": 1, "document_id": document, "chunk_id": format!("{document}-0"), "text": "quoted", "page": 3})).unwrap()
    }

    /// What every `ConversationStore` must do.
    async fn conformance(store: &dyn ConversationStore) {
        store.ready().await.unwrap();
        let long_title = "t".repeat(MAX_TITLE + 50);
        let first = store.create("u-ann", &long_title).await.unwrap();
        let second = store.create("u-ann", "Second").await.unwrap();
        let bos = store.create("u-bo", "Bo's").await.unwrap();
        assert!(store.owns("u-ann", &first).await.unwrap());
        assert!(!store.owns("u-bo", &first).await.unwrap(), "one person's conversations are never another's");
        assert!(!store.owns("u-ann", "no-such").await.unwrap());

        let cited = [citation("d1")];
        store.append(&first, "What is the code?", Reply { content: "It is 42 [1].", citations: &cited, mode: "llm", not_found: false }).await.unwrap();
        store.append(&first, "And the colour?", Reply { content: "Not in your documents.", citations: &[], mode: "extractive", not_found: true }).await.unwrap();
        let turns = store.recent_turns(&first, 3).await.unwrap();
        assert_eq!(turns.iter().map(|t| t.content.as_str()).collect::<Vec<_>>(), ["It is 42 [1].", "And the colour?", "Not in your documents."], "the last three, oldest first");

        let (title, messages) = store.get("u-ann", &first).await.unwrap().unwrap();
        assert_eq!(title.chars().count(), MAX_TITLE);
        assert_eq!(messages.len(), 4);
        assert_eq!((messages[1].role.as_str(), messages[1].mode.as_str(), messages[1].not_found), ("assistant", "llm", false));
        assert_eq!(messages[1].citations, cited.to_vec());
        assert!(messages[3].not_found && messages[3].citations.is_empty());
        assert!(store.get("u-bo", &first).await.unwrap().is_none());

        // Most recently used first (the first conversation was just answered in).
        let listed: Vec<String> = store.list("u-ann").await.unwrap().into_iter().map(|c| c.id).collect();
        assert!(listed.contains(&first) && listed.contains(&second) && !listed.contains(&bos));
        assert!(store.rename("u-ann", &second, "Renamed").await.unwrap());
        assert!(!store.rename("u-bo", &second, "Stolen").await.unwrap());
        assert_eq!(store.get("u-ann", &second).await.unwrap().unwrap().0, "Renamed");

        assert!(!store.delete("u-bo", &first).await.unwrap());
        assert!(store.delete("u-ann", &first).await.unwrap());
        assert!(store.get("u-ann", &first).await.unwrap().is_none());
        assert!(store.recent_turns(&first, 10).await.unwrap().is_empty(), "its messages went with it");
        assert!(!store.delete("u-ann", &first).await.unwrap());
    }

    #[tokio::test]
    async fn sqlite_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance(&SqliteConversations::open(&dir.path().join("rag.db")).await.unwrap()).await;
    }

    /// On a scratch database of the test PostgreSQL (skipped with a reason when it is not
    /// reachable, failed under CI).
    #[tokio::test]
    async fn postgres_conforms() {
        let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
        conformance(&PgConversations::open(&server.url).await.unwrap()).await;
        server.cleanup().await;
    }
}
