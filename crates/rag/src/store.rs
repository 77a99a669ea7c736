//! Conversations and their messages in rag's SQLite file. Every read and write names
//! the owner, so one person's conversations are never another's.

use std::path::Path;

use sqlx::{Row, SqlitePool};

use common::wire::{Citation, Turn};
use common::{now_unix, rfc3339};

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

#[derive(Clone)]
pub(crate) struct Store {
    pool: SqlitePool,
}

impl Store {
    pub(crate) async fn open(path: &Path) -> Result<Store, sqlx::Error> {
        Ok(Store { pool: common::db::open_migrated(path, MIGRATIONS).await? })
    }

    /// Whether `user` owns conversation `id`.
    pub(crate) async fn owns(&self, user: &str, id: &str) -> Result<bool, sqlx::Error> {
        let owner: Option<String> = sqlx::query_scalar("SELECT user_id FROM conversations WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        Ok(owner.as_deref() == Some(user))
    }

    pub(crate) async fn create(&self, user: &str, title: &str) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::now_v7().to_string();
        let title: String = title.chars().take(MAX_TITLE).collect();
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
    pub(crate) async fn recent_turns(&self, id: &str, limit: i64) -> Result<Vec<Turn>, sqlx::Error> {
        let rows = sqlx::query("SELECT role, content FROM (SELECT id, role, content FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id")
            .bind(id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(Turn { role: r.try_get("role")?, content: r.try_get("content")? })).collect()
    }

    /// Stores a question and its answer together.
    pub(crate) async fn append(&self, id: &str, question: &str, reply: Reply<'_>) -> Result<(), sqlx::Error> {
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

    pub(crate) async fn list(&self, user: &str) -> Result<Vec<ConversationSummary>, sqlx::Error> {
        let rows = sqlx::query("SELECT id, title, updated_at FROM conversations WHERE user_id = ? ORDER BY updated_at DESC, id DESC LIMIT 200")
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(ConversationSummary { id: r.try_get("id")?, title: r.try_get("title")?, updated_at: rfc3339(r.try_get("updated_at")?) })).collect()
    }

    /// A conversation's title and messages, if `user` owns it.
    pub(crate) async fn get(&self, user: &str, id: &str) -> Result<Option<(String, Vec<StoredMessage>)>, sqlx::Error> {
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
    pub(crate) async fn rename(&self, user: &str, id: &str, title: &str) -> Result<bool, sqlx::Error> {
        let title: String = title.chars().take(MAX_TITLE).collect();
        let done = sqlx::query("UPDATE conversations SET title = ? WHERE id = ? AND user_id = ?").bind(title).bind(id).bind(user).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    pub(crate) async fn delete(&self, user: &str, id: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM conversations WHERE id = ? AND user_id = ?").bind(id).bind(user).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }
}
