//! Relationships: collections (owner, org), shares and group memberships, in authz's
//! own SQLite file. No policy logic here: the Cedar engine decides.

use sqlx::{Row, SqlitePool};

use crate::policy::{CollectionFacts, RoomFacts};

pub(crate) const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE collections (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    org TEXT NOT NULL,
    owner TEXT NOT NULL,
    personal INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX collections_personal ON collections(owner) WHERE personal = 1;
CREATE INDEX collections_org ON collections(org);
CREATE TABLE shares (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    subject_type TEXT NOT NULL CHECK (subject_type IN ('user', 'group')),
    subject_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('viewer', 'editor', 'manager', 'answers')),
    PRIMARY KEY (collection_id, subject_type, subject_id)
);
CREATE TABLE groups (id TEXT PRIMARY KEY, org TEXT NOT NULL, name TEXT NOT NULL);
CREATE TABLE group_members (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
"#, r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('version', 0);
CREATE TRIGGER collections_ins AFTER INSERT ON collections BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER collections_upd AFTER UPDATE ON collections BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER collections_del AFTER DELETE ON collections BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER shares_ins AFTER INSERT ON shares BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER shares_upd AFTER UPDATE ON shares BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER shares_del AFTER DELETE ON shares BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER groups_ins AFTER INSERT ON groups BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER groups_del AFTER DELETE ON groups BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER members_ins AFTER INSERT ON group_members BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER members_del AFTER DELETE ON group_members BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
"#, r#"
ALTER TABLE collections ADD COLUMN org_owned INTEGER NOT NULL DEFAULT 0;
"#, r#"
CREATE TABLE rooms (id TEXT PRIMARY KEY, org TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX rooms_org ON rooms(org);
CREATE TABLE room_members (
    room_id TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'member')),
    PRIMARY KEY (room_id, user_id)
);
CREATE TRIGGER rooms_ins AFTER INSERT ON rooms BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER rooms_del AFTER DELETE ON rooms BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER room_members_ins AFTER INSERT ON room_members BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
CREATE TRIGGER room_members_del AFTER DELETE ON room_members BEGIN UPDATE meta SET value = value + 1 WHERE key = 'version'; END;
"#];

#[derive(Clone)]
pub(crate) struct RelationStore {
    pub(crate) pool: SqlitePool,
}

#[derive(Clone, Debug)]
pub(crate) struct CollectionRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) org: String,
    pub(crate) owner: String,
    pub(crate) personal: bool,
    /// Owned by the org (managed by its owners and admins), not by a person.
    pub(crate) org_owned: bool,
}

impl RelationStore {
    pub(crate) async fn open(path: &std::path::Path) -> Result<RelationStore, sqlx::Error> {
        let pool = common::db::open_migrated(path, MIGRATIONS).await?;
        Ok(RelationStore { pool })
    }

    /// Bumped by triggers on every change to collections, shares, groups or
    /// memberships: a cached answer computed at an older version is stale.
    pub(crate) async fn version(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'version'").fetch_one(&self.pool).await
    }

    /// The user's personal collection, created on first use.
    pub(crate) async fn ensure_personal(&self, user_id: &str, username: &str, org: &str) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT OR IGNORE INTO collections (id, name, org, owner, personal, created_at) VALUES (?, ?, ?, ?, 1, ?)")
            .bind(&id)
            .bind(format!("{username} (personal)"))
            .bind(org)
            .bind(user_id)
            .bind(common::now_unix())
            .execute(&self.pool)
            .await?;
        sqlx::query_scalar("SELECT id FROM collections WHERE owner = ? AND personal = 1").bind(user_id).fetch_one(&self.pool).await
    }

    /// A collection owned by `owner`, or by the org itself when `org_owned` (its owner
    /// is then recorded as `org:<org>`, which is nobody's user id).
    /// `None` when the owner (a person, or the org for org-owned ones) already owns
    /// `cap` collections besides the personal one; the count and the insert are one
    /// statement, so concurrent creations cannot pass the cap.
    pub(crate) async fn create(&self, name: &str, org: &str, owner: &str, org_owned: bool, cap: i64) -> Result<Option<String>, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        let owner = if org_owned { format!("org:{org}") } else { owner.to_string() };
        let done = sqlx::query(
            "INSERT INTO collections (id, name, org, owner, personal, created_at, org_owned)
             SELECT ?1, ?2, ?3, ?4, 0, ?5, ?6 WHERE (SELECT COUNT(*) FROM collections WHERE owner = ?4 AND personal = 0) < ?7",
        )
        .bind(&id)
        .bind(name)
        .bind(org)
        .bind(&owner)
        .bind(common::now_unix())
        .bind(org_owned as i64)
        .bind(cap)
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then_some(id))
    }

    pub(crate) async fn collection(&self, id: &str) -> Result<Option<CollectionRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM collections WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(collection_from_row).transpose()
    }

    pub(crate) async fn collections_in_org(&self, org: &str) -> Result<Vec<CollectionRow>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM collections WHERE org = ? ORDER BY personal DESC, name").bind(org).fetch_all(&self.pool).await?;
        rows.iter().map(collection_from_row).collect()
    }

    pub(crate) async fn groups_of(&self, user_id: &str) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT group_id FROM group_members WHERE user_id = ?").bind(user_id).fetch_all(&self.pool).await
    }

    /// The facts of `collections` with their shares, read in one query (the list of
    /// readable collections asks this for every collection of an org).
    pub(crate) async fn facts(&self, collections: &[CollectionRow]) -> Result<Vec<CollectionFacts>, sqlx::Error> {
        let ids: Vec<&str> = collections.iter().map(|c| c.id.as_str()).collect();
        let rows = sqlx::query("SELECT collection_id, subject_type, subject_id, role FROM shares WHERE collection_id IN (SELECT value FROM json_each(?))")
            .bind(serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()))
            .fetch_all(&self.pool)
            .await?;
        let mut shares: std::collections::HashMap<String, Vec<(String, String, String)>> = std::collections::HashMap::new();
        for row in &rows {
            shares.entry(row.try_get("collection_id")?).or_default().push((row.try_get("subject_type")?, row.try_get("subject_id")?, row.try_get("role")?));
        }
        Ok(collections
            .iter()
            .map(|collection| CollectionFacts {
                id: collection.id.clone(),
                org: collection.org.clone(),
                owner: collection.owner.clone(),
                personal: collection.personal,
                org_owned: collection.org_owned,
                shares: shares.remove(&collection.id).unwrap_or_default(),
            })
            .collect())
    }

    /// `echod bench authz`: `n` collections in `org` owned by `owner`, every tenth shared
    /// with `reader` (viewer), in one transaction.
    pub(crate) async fn seed(&self, org: &str, owner: &str, reader: &str, n: usize) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        for i in 0..n {
            let id = uuid::Uuid::new_v4().to_string();
            sqlx::query("INSERT INTO collections (id, name, org, owner, personal, created_at) VALUES (?, ?, ?, ?, 0, ?)")
                .bind(&id)
                .bind(format!("bench {i}"))
                .bind(org)
                .bind(owner)
                .bind(common::now_unix())
                .execute(&mut *tx)
                .await?;
            if i % 10 == 0 {
                sqlx::query("INSERT INTO shares (collection_id, subject_type, subject_id, role) VALUES (?, 'user', ?, 'viewer')")
                    .bind(&id)
                    .bind(reader)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await
    }

    /// Removes a collection and its shares in one transaction.
    pub(crate) async fn delete_collection(&self, id: &str) -> Result<bool, sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM shares WHERE collection_id = ?").bind(id).execute(&mut *tx).await?;
        let done = sqlx::query("DELETE FROM collections WHERE id = ? AND personal = 0").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Replaces the collection's shares with `members` in one transaction.
    pub(crate) async fn replace_shares(&self, collection_id: &str, members: &[(String, String, String)]) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM shares WHERE collection_id = ?").bind(collection_id).execute(&mut *tx).await?;
        for (subject_type, subject_id, role) in members {
            sqlx::query("INSERT OR REPLACE INTO shares (collection_id, subject_type, subject_id, role) VALUES (?, ?, ?, ?)")
                .bind(collection_id)
                .bind(subject_type)
                .bind(subject_id)
                .bind(role)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// `None` when the org already has `cap` groups (checked in the same statement).
    pub(crate) async fn create_group(&self, org: &str, name: &str, cap: i64) -> Result<Option<String>, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        let done = sqlx::query("INSERT INTO groups (id, org, name) SELECT ?1, ?2, ?3 WHERE (SELECT COUNT(*) FROM groups WHERE org = ?2) < ?4")
            .bind(&id)
            .bind(org)
            .bind(name)
            .bind(cap)
            .execute(&self.pool)
            .await?;
        Ok((done.rows_affected() == 1).then_some(id))
    }

    /// (id, name, members) of every group of `org`.
    pub(crate) async fn groups_in_org(&self, org: &str) -> Result<Vec<(String, String, Vec<String>)>, sqlx::Error> {
        let groups: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM groups WHERE org = ? ORDER BY name").bind(org).fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(groups.len());
        for (id, name) in groups {
            let members: Vec<String> = sqlx::query_scalar("SELECT user_id FROM group_members WHERE group_id = ? ORDER BY user_id").bind(&id).fetch_all(&self.pool).await?;
            out.push((id, name, members));
        }
        Ok(out)
    }

    pub(crate) async fn replace_group_members(&self, group_id: &str, members: &[String]) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM group_members WHERE group_id = ?").bind(group_id).execute(&mut *tx).await?;
        for user in members {
            sqlx::query("INSERT OR IGNORE INTO group_members (group_id, user_id) VALUES (?, ?)").bind(group_id).bind(user).execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    pub(crate) async fn group_org(&self, group_id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT org FROM groups WHERE id = ?").bind(group_id).fetch_optional(&self.pool).await
    }
}

impl RelationStore {
    /// A new room of `org` whose only person is its creator, as owner.
    pub(crate) async fn create_room(&self, id: &str, org: &str, creator: &str) -> Result<bool, sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        let done = sqlx::query("INSERT OR IGNORE INTO rooms (id, org, created_at) VALUES (?, ?, ?)").bind(id).bind(org).bind(common::now_unix()).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("INSERT INTO room_members (room_id, user_id, role) VALUES (?, ?, 'owner')").bind(id).bind(creator).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(crate) async fn room(&self, id: &str) -> Result<Option<RoomFacts>, sqlx::Error> {
        let Some(org) = sqlx::query_scalar::<_, String>("SELECT org FROM rooms WHERE id = ?").bind(id).fetch_optional(&self.pool).await? else {
            return Ok(None);
        };
        let members: Vec<(String, String)> = sqlx::query_as("SELECT user_id, role FROM room_members WHERE room_id = ? ORDER BY role, user_id").bind(id).fetch_all(&self.pool).await?;
        Ok(Some(RoomFacts { id: id.to_string(), org, members }))
    }

    /// Every room of `org` with its people, in two queries.
    pub(crate) async fn rooms_in_org(&self, org: &str) -> Result<Vec<RoomFacts>, sqlx::Error> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM rooms WHERE org = ? ORDER BY id").bind(org).fetch_all(&self.pool).await?;
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT m.room_id, m.user_id, m.role FROM room_members m JOIN rooms r ON r.id = m.room_id WHERE r.org = ?",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        let mut members: std::collections::HashMap<String, Vec<(String, String)>> = std::collections::HashMap::new();
        for (room, user, role) in rows {
            members.entry(room).or_default().push((user, role));
        }
        Ok(ids.into_iter().map(|id| RoomFacts { members: members.remove(&id).unwrap_or_default(), org: org.to_string(), id }).collect())
    }

    pub(crate) async fn replace_room_members(&self, id: &str, members: &[(String, String)]) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM room_members WHERE room_id = ?").bind(id).execute(&mut *tx).await?;
        for (user, role) in members {
            sqlx::query("INSERT OR REPLACE INTO room_members (room_id, user_id, role) VALUES (?, ?, ?)").bind(id).bind(user).bind(role).execute(&mut *tx).await?;
        }
        tx.commit().await
    }
}

fn collection_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<CollectionRow, sqlx::Error> {
    Ok(CollectionRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        org: row.try_get("org")?,
        owner: row.try_get("owner")?,
        personal: row.try_get::<i64, _>("personal")? != 0,
        org_owned: row.try_get::<i64, _>("org_owned")? != 0,
    })
}
