//! Relationships: collections (owner, org), shares, groups and their members, rooms and
//! their people. The `RelationStore` trait, with SQLite (`authz.db` in the data dir, the
//! default) and PostgreSQL (schema `authz`, chosen by `authz.database_url` or
//! `database.url`). On both, every change bumps one version number (triggers), which
//! tags cached answers; caps are checked atomically with the insert they limit. No
//! policy logic here: the Cedar engine decides. One conformance suite (below) runs
//! against both.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Row, SqlitePool};

use common::{EchoConfig, ServiceName};

use crate::policy::{CollectionFacts, RoomFacts};

const SQLITE_MIGRATIONS: &[&str] = &[r#"
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

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CollectionRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) org: String,
    pub(crate) owner: String,
    pub(crate) personal: bool,
    /// Owned by the org (managed by its owners and admins), not by a person.
    pub(crate) org_owned: bool,
}

#[async_trait]
pub(crate) trait RelationStore: Send + Sync {
    /// Bumped by every change to collections, shares, groups, rooms or memberships: a
    /// cached answer computed at an older version is stale.
    async fn version(&self) -> Result<i64, sqlx::Error>;
    /// The user's personal collection, created on first use.
    async fn ensure_personal(&self, user_id: &str, username: &str, org: &str) -> Result<String, sqlx::Error>;
    /// A collection owned by `owner`, or by the org itself when `org_owned` (its owner
    /// is then recorded as `org:<org>`, which is nobody's user id). `None` when the
    /// owner already owns `cap` collections besides the personal one (checked
    /// atomically with the insert, so concurrent creations cannot pass the cap).
    async fn create(&self, name: &str, org: &str, owner: &str, org_owned: bool, cap: i64) -> Result<Option<String>, sqlx::Error>;
    async fn collection(&self, id: &str) -> Result<Option<CollectionRow>, sqlx::Error>;
    /// Every collection of `org`, personal ones first, then by name.
    async fn collections_in_org(&self, org: &str) -> Result<Vec<CollectionRow>, sqlx::Error>;
    async fn groups_of(&self, user_id: &str) -> Result<Vec<String>, sqlx::Error>;
    /// The facts of `collections` with their shares, read in one query (the list of
    /// readable collections asks this for every collection of an org).
    async fn facts(&self, collections: &[CollectionRow]) -> Result<Vec<CollectionFacts>, sqlx::Error>;
    /// For `echod bench authz`: `n` collections in `org` owned by `owner`, every tenth
    /// shared with `reader` (viewer), in one transaction.
    async fn seed(&self, org: &str, owner: &str, reader: &str, n: usize) -> Result<(), sqlx::Error>;
    /// Removes a (non-personal) collection and its shares in one transaction.
    async fn delete_collection(&self, id: &str) -> Result<bool, sqlx::Error>;
    /// Replaces the collection's shares with (subject type, subject id, role) in one transaction.
    async fn replace_shares(&self, collection_id: &str, members: &[(String, String, String)]) -> Result<(), sqlx::Error>;
    /// `None` when the org already has `cap` groups (checked atomically with the insert).
    async fn create_group(&self, org: &str, name: &str, cap: i64) -> Result<Option<String>, sqlx::Error>;
    /// (id, name, members) of every group of `org`, by name.
    async fn groups_in_org(&self, org: &str) -> Result<Vec<(String, String, Vec<String>)>, sqlx::Error>;
    async fn replace_group_members(&self, group_id: &str, members: &[String]) -> Result<(), sqlx::Error>;
    async fn group_org(&self, group_id: &str) -> Result<Option<String>, sqlx::Error>;
    /// A new room of `org` whose only person is its creator, as owner; false if it exists.
    async fn create_room(&self, id: &str, org: &str, creator: &str) -> Result<bool, sqlx::Error>;
    async fn room(&self, id: &str) -> Result<Option<RoomFacts>, sqlx::Error>;
    /// Every room of `org` with its people.
    async fn rooms_in_org(&self, org: &str) -> Result<Vec<RoomFacts>, sqlx::Error>;
    async fn replace_room_members(&self, id: &str, members: &[(String, String)]) -> Result<(), sqlx::Error>;
    async fn ready(&self) -> Result<(), String>;
}

/// The store `config` names: PostgreSQL when a URL is set, else `authz.db`.
pub(crate) async fn open(config: &EchoConfig) -> anyhow::Result<Arc<dyn RelationStore>> {
    match config.database_url(&config.authz.database_url) {
        Some(url) => Ok(Arc::new(PgRelations::open(url).await?)),
        None => Ok(Arc::new(SqliteRelations::open(&config.db_path(ServiceName::Authz)).await?)),
    }
}

/// Shares by collection, from (collection, subject type, subject id, role) rows.
fn facts_of(collections: &[CollectionRow], rows: Vec<(String, String, String, String)>) -> Vec<CollectionFacts> {
    let mut shares: std::collections::HashMap<String, Vec<(String, String, String)>> = std::collections::HashMap::new();
    for (collection, subject_type, subject_id, role) in rows {
        shares.entry(collection).or_default().push((subject_type, subject_id, role));
    }
    collections
        .iter()
        .map(|collection| CollectionFacts {
            id: collection.id.clone(),
            org: collection.org.clone(),
            owner: collection.owner.clone(),
            personal: collection.personal,
            org_owned: collection.org_owned,
            shares: shares.remove(&collection.id).unwrap_or_default(),
        })
        .collect()
}

/// Rooms with their people, from (room, user, role) rows.
fn rooms_of(org: &str, ids: Vec<String>, rows: Vec<(String, String, String)>) -> Vec<RoomFacts> {
    let mut members: std::collections::HashMap<String, Vec<(String, String)>> = std::collections::HashMap::new();
    for (room, user, role) in rows {
        members.entry(room).or_default().push((user, role));
    }
    ids.into_iter().map(|id| RoomFacts { members: members.remove(&id).unwrap_or_default(), org: org.to_string(), id }).collect()
}

pub(crate) struct SqliteRelations {
    pool: SqlitePool,
}

impl SqliteRelations {
    pub(crate) async fn open(path: &std::path::Path) -> Result<SqliteRelations, sqlx::Error> {
        let pool = common::db::open_migrated(path, SQLITE_MIGRATIONS).await?;
        Ok(SqliteRelations { pool })
    }
}

#[async_trait]
impl RelationStore for SqliteRelations {
    /// Bumped by triggers on every change to collections, shares, groups or
    /// memberships: a cached answer computed at an older version is stale.
    async fn version(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'version'").fetch_one(&self.pool).await
    }

    /// The user's personal collection, created on first use.
    async fn ensure_personal(&self, user_id: &str, username: &str, org: &str) -> Result<String, sqlx::Error> {
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
    async fn create(&self, name: &str, org: &str, owner: &str, org_owned: bool, cap: i64) -> Result<Option<String>, sqlx::Error> {
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

    async fn collection(&self, id: &str) -> Result<Option<CollectionRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM collections WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(collection_from_row).transpose()
    }

    async fn collections_in_org(&self, org: &str) -> Result<Vec<CollectionRow>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM collections WHERE org = ? ORDER BY personal DESC, name").bind(org).fetch_all(&self.pool).await?;
        rows.iter().map(collection_from_row).collect()
    }

    async fn groups_of(&self, user_id: &str) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT group_id FROM group_members WHERE user_id = ?").bind(user_id).fetch_all(&self.pool).await
    }

    /// The facts of `collections` with their shares, read in one query (the list of
    /// readable collections asks this for every collection of an org).
    async fn facts(&self, collections: &[CollectionRow]) -> Result<Vec<CollectionFacts>, sqlx::Error> {
        let ids: Vec<&str> = collections.iter().map(|c| c.id.as_str()).collect();
        let rows: Vec<(String, String, String, String)> =
            sqlx::query_as("SELECT collection_id, subject_type, subject_id, role FROM shares WHERE collection_id IN (SELECT value FROM json_each(?))")
                .bind(serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()))
                .fetch_all(&self.pool)
                .await?;
        Ok(facts_of(collections, rows))
    }

    /// `echod bench authz`: `n` collections in `org` owned by `owner`, every tenth shared
    /// with `reader` (viewer), in one transaction.
    async fn seed(&self, org: &str, owner: &str, reader: &str, n: usize) -> Result<(), sqlx::Error> {
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
    async fn delete_collection(&self, id: &str) -> Result<bool, sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM shares WHERE collection_id = ?").bind(id).execute(&mut *tx).await?;
        let done = sqlx::query("DELETE FROM collections WHERE id = ? AND personal = 0").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Replaces the collection's shares with `members` in one transaction.
    async fn replace_shares(&self, collection_id: &str, members: &[(String, String, String)]) -> Result<(), sqlx::Error> {
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
    async fn create_group(&self, org: &str, name: &str, cap: i64) -> Result<Option<String>, sqlx::Error> {
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
    async fn groups_in_org(&self, org: &str) -> Result<Vec<(String, String, Vec<String>)>, sqlx::Error> {
        let groups: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM groups WHERE org = ? ORDER BY name").bind(org).fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(groups.len());
        for (id, name) in groups {
            let members: Vec<String> = sqlx::query_scalar("SELECT user_id FROM group_members WHERE group_id = ? ORDER BY user_id").bind(&id).fetch_all(&self.pool).await?;
            out.push((id, name, members));
        }
        Ok(out)
    }

    async fn replace_group_members(&self, group_id: &str, members: &[String]) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM group_members WHERE group_id = ?").bind(group_id).execute(&mut *tx).await?;
        for user in members {
            sqlx::query("INSERT OR IGNORE INTO group_members (group_id, user_id) VALUES (?, ?)").bind(group_id).bind(user).execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    async fn group_org(&self, group_id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT org FROM groups WHERE id = ?").bind(group_id).fetch_optional(&self.pool).await
    }

    /// A new room of `org` whose only person is its creator, as owner.
    async fn create_room(&self, id: &str, org: &str, creator: &str) -> Result<bool, sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        let done = sqlx::query("INSERT OR IGNORE INTO rooms (id, org, created_at) VALUES (?, ?, ?)").bind(id).bind(org).bind(common::now_unix()).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("INSERT INTO room_members (room_id, user_id, role) VALUES (?, ?, 'owner')").bind(id).bind(creator).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn room(&self, id: &str) -> Result<Option<RoomFacts>, sqlx::Error> {
        let Some(org) = sqlx::query_scalar::<_, String>("SELECT org FROM rooms WHERE id = ?").bind(id).fetch_optional(&self.pool).await? else {
            return Ok(None);
        };
        let members: Vec<(String, String)> = sqlx::query_as("SELECT user_id, role FROM room_members WHERE room_id = ? ORDER BY role, user_id").bind(id).fetch_all(&self.pool).await?;
        Ok(Some(RoomFacts { id: id.to_string(), org, members }))
    }

    /// Every room of `org` with its people, in two queries.
    async fn rooms_in_org(&self, org: &str) -> Result<Vec<RoomFacts>, sqlx::Error> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM rooms WHERE org = ? ORDER BY id").bind(org).fetch_all(&self.pool).await?;
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT m.room_id, m.user_id, m.role FROM room_members m JOIN rooms r ON r.id = m.room_id WHERE r.org = ?",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        Ok(rooms_of(org, ids, rows))
    }

    async fn replace_room_members(&self, id: &str, members: &[(String, String)]) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM room_members WHERE room_id = ?").bind(id).execute(&mut *tx).await?;
        for (user, role) in members {
            sqlx::query("INSERT OR REPLACE INTO room_members (room_id, user_id, role) VALUES (?, ?, ?)").bind(id).bind(user).bind(role).execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("authz.db: {e}"))
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

/// Relationships in PostgreSQL, schema `authz`.
pub(crate) struct PgRelations {
    pool: PgPool,
}

impl PgRelations {
    pub(crate) async fn open(url: &str) -> anyhow::Result<PgRelations> {
        let options: PgConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("authz database URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL for authz: {e}"))?;
        // One replica migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-authz-migrate'))").execute(&mut *tx).await?;
        sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS authz;
             CREATE TABLE IF NOT EXISTS authz.collections (
                 id TEXT PRIMARY KEY,
                 name TEXT NOT NULL,
                 org TEXT NOT NULL,
                 owner TEXT NOT NULL,
                 personal BOOLEAN NOT NULL,
                 created_at BIGINT NOT NULL,
                 org_owned BOOLEAN NOT NULL DEFAULT FALSE
             );
             CREATE UNIQUE INDEX IF NOT EXISTS collections_personal ON authz.collections(owner) WHERE personal;
             CREATE INDEX IF NOT EXISTS collections_org ON authz.collections(org);
             CREATE INDEX IF NOT EXISTS collections_owner ON authz.collections(owner);
             CREATE TABLE IF NOT EXISTS authz.shares (
                 collection_id TEXT NOT NULL REFERENCES authz.collections(id) ON DELETE CASCADE,
                 subject_type TEXT NOT NULL CHECK (subject_type IN ('user', 'group')),
                 subject_id TEXT NOT NULL,
                 role TEXT NOT NULL CHECK (role IN ('viewer', 'editor', 'manager', 'answers')),
                 PRIMARY KEY (collection_id, subject_type, subject_id)
             );
             CREATE TABLE IF NOT EXISTS authz.groups (id TEXT PRIMARY KEY, org TEXT NOT NULL, name TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS groups_org ON authz.groups(org);
             CREATE TABLE IF NOT EXISTS authz.group_members (
                 group_id TEXT NOT NULL REFERENCES authz.groups(id) ON DELETE CASCADE,
                 user_id TEXT NOT NULL,
                 PRIMARY KEY (group_id, user_id)
             );
             CREATE INDEX IF NOT EXISTS group_members_user ON authz.group_members(user_id);
             CREATE TABLE IF NOT EXISTS authz.rooms (id TEXT PRIMARY KEY, org TEXT NOT NULL, created_at BIGINT NOT NULL);
             CREATE INDEX IF NOT EXISTS rooms_org ON authz.rooms(org);
             CREATE TABLE IF NOT EXISTS authz.room_members (
                 room_id TEXT NOT NULL REFERENCES authz.rooms(id) ON DELETE CASCADE,
                 user_id TEXT NOT NULL,
                 role TEXT NOT NULL CHECK (role IN ('owner', 'member')),
                 PRIMARY KEY (room_id, user_id)
             );
             CREATE TABLE IF NOT EXISTS authz.meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
             INSERT INTO authz.meta (key, value) VALUES ('version', 0) ON CONFLICT (key) DO NOTHING;
             CREATE OR REPLACE FUNCTION authz.bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 UPDATE authz.meta SET value = value + 1 WHERE key = 'version';
                 RETURN NULL;
             END $$;
             CREATE OR REPLACE TRIGGER collections_changed AFTER INSERT OR UPDATE OR DELETE ON authz.collections
                 FOR EACH STATEMENT EXECUTE FUNCTION authz.bump_version();
             CREATE OR REPLACE TRIGGER shares_changed AFTER INSERT OR UPDATE OR DELETE ON authz.shares
                 FOR EACH STATEMENT EXECUTE FUNCTION authz.bump_version();
             CREATE OR REPLACE TRIGGER groups_changed AFTER INSERT OR UPDATE OR DELETE ON authz.groups
                 FOR EACH STATEMENT EXECUTE FUNCTION authz.bump_version();
             CREATE OR REPLACE TRIGGER group_members_changed AFTER INSERT OR UPDATE OR DELETE ON authz.group_members
                 FOR EACH STATEMENT EXECUTE FUNCTION authz.bump_version();
             CREATE OR REPLACE TRIGGER rooms_changed AFTER INSERT OR UPDATE OR DELETE ON authz.rooms
                 FOR EACH STATEMENT EXECUTE FUNCTION authz.bump_version();
             CREATE OR REPLACE TRIGGER room_members_changed AFTER INSERT OR UPDATE OR DELETE ON authz.room_members
                 FOR EACH STATEMENT EXECUTE FUNCTION authz.bump_version();",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PgRelations { pool })
    }
}

fn pg_collection(row: &sqlx::postgres::PgRow) -> Result<CollectionRow, sqlx::Error> {
    Ok(CollectionRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        org: row.try_get("org")?,
        owner: row.try_get("owner")?,
        personal: row.try_get("personal")?,
        org_owned: row.try_get("org_owned")?,
    })
}

#[async_trait]
impl RelationStore for PgRelations {
    async fn version(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT value FROM authz.meta WHERE key = 'version'").fetch_one(&self.pool).await
    }

    async fn ensure_personal(&self, user_id: &str, username: &str, org: &str) -> Result<String, sqlx::Error> {
        sqlx::query("INSERT INTO authz.collections (id, name, org, owner, personal, created_at) VALUES ($1, $2, $3, $4, TRUE, $5) ON CONFLICT (owner) WHERE personal DO NOTHING")
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(format!("{username} (personal)"))
            .bind(org)
            .bind(user_id)
            .bind(common::now_unix())
            .execute(&self.pool)
            .await?;
        sqlx::query_scalar("SELECT id FROM authz.collections WHERE owner = $1 AND personal").bind(user_id).fetch_one(&self.pool).await
    }

    async fn create(&self, name: &str, org: &str, owner: &str, org_owned: bool, cap: i64) -> Result<Option<String>, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        let owner = if org_owned { format!("org:{org}") } else { owner.to_string() };
        let mut tx = self.pool.begin().await?;
        // The owner's creations one at a time, so the count below stays true until commit.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-authz-collections'), hashtext($1))").bind(&owner).execute(&mut *tx).await?;
        let done = sqlx::query(
            "INSERT INTO authz.collections (id, name, org, owner, personal, created_at, org_owned)
             SELECT $1, $2, $3, $4, FALSE, $5, $6 WHERE (SELECT COUNT(*) FROM authz.collections WHERE owner = $4 AND NOT personal) < $7",
        )
        .bind(&id)
        .bind(name)
        .bind(org)
        .bind(&owner)
        .bind(common::now_unix())
        .bind(org_owned)
        .bind(cap)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((done.rows_affected() == 1).then_some(id))
    }

    async fn collection(&self, id: &str) -> Result<Option<CollectionRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM authz.collections WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(pg_collection).transpose()
    }

    async fn collections_in_org(&self, org: &str) -> Result<Vec<CollectionRow>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM authz.collections WHERE org = $1 ORDER BY personal DESC, name").bind(org).fetch_all(&self.pool).await?;
        rows.iter().map(pg_collection).collect()
    }

    async fn groups_of(&self, user_id: &str) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT group_id FROM authz.group_members WHERE user_id = $1").bind(user_id).fetch_all(&self.pool).await
    }

    async fn facts(&self, collections: &[CollectionRow]) -> Result<Vec<CollectionFacts>, sqlx::Error> {
        let ids: Vec<&str> = collections.iter().map(|c| c.id.as_str()).collect();
        let rows: Vec<(String, String, String, String)> =
            sqlx::query_as("SELECT collection_id, subject_type, subject_id, role FROM authz.shares WHERE collection_id = ANY($1)").bind(&ids).fetch_all(&self.pool).await?;
        Ok(facts_of(collections, rows))
    }

    async fn seed(&self, org: &str, owner: &str, reader: &str, n: usize) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        for i in 0..n {
            let id = uuid::Uuid::new_v4().to_string();
            sqlx::query("INSERT INTO authz.collections (id, name, org, owner, personal, created_at) VALUES ($1, $2, $3, $4, FALSE, $5)")
                .bind(&id)
                .bind(format!("bench {i}"))
                .bind(org)
                .bind(owner)
                .bind(common::now_unix())
                .execute(&mut *tx)
                .await?;
            if i % 10 == 0 {
                sqlx::query("INSERT INTO authz.shares (collection_id, subject_type, subject_id, role) VALUES ($1, 'user', $2, 'viewer')").bind(&id).bind(reader).execute(&mut *tx).await?;
            }
        }
        tx.commit().await
    }

    async fn delete_collection(&self, id: &str) -> Result<bool, sqlx::Error> {
        // Shares go with it (ON DELETE CASCADE).
        let done = sqlx::query("DELETE FROM authz.collections WHERE id = $1 AND NOT personal").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    async fn replace_shares(&self, collection_id: &str, members: &[(String, String, String)]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM authz.shares WHERE collection_id = $1").bind(collection_id).execute(&mut *tx).await?;
        for (subject_type, subject_id, role) in members {
            sqlx::query(
                "INSERT INTO authz.shares (collection_id, subject_type, subject_id, role) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (collection_id, subject_type, subject_id) DO UPDATE SET role = EXCLUDED.role",
            )
            .bind(collection_id)
            .bind(subject_type)
            .bind(subject_id)
            .bind(role)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    async fn create_group(&self, org: &str, name: &str, cap: i64) -> Result<Option<String>, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('echo-authz-groups'), hashtext($1))").bind(org).execute(&mut *tx).await?;
        let done = sqlx::query("INSERT INTO authz.groups (id, org, name) SELECT $1, $2, $3 WHERE (SELECT COUNT(*) FROM authz.groups WHERE org = $2) < $4")
            .bind(&id)
            .bind(org)
            .bind(name)
            .bind(cap)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((done.rows_affected() == 1).then_some(id))
    }

    async fn groups_in_org(&self, org: &str) -> Result<Vec<(String, String, Vec<String>)>, sqlx::Error> {
        let groups: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM authz.groups WHERE org = $1 ORDER BY name").bind(org).fetch_all(&self.pool).await?;
        let members: Vec<(String, String)> = sqlx::query_as(
            "SELECT m.group_id, m.user_id FROM authz.group_members m JOIN authz.groups g ON g.id = m.group_id WHERE g.org = $1 ORDER BY m.user_id",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        let mut by_group: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        for (group, user) in members {
            by_group.entry(group).or_default().push(user);
        }
        Ok(groups
            .into_iter()
            .map(|(id, name)| {
                let members = by_group.remove(&id).unwrap_or_default();
                (id, name, members)
            })
            .collect())
    }

    async fn replace_group_members(&self, group_id: &str, members: &[String]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM authz.group_members WHERE group_id = $1").bind(group_id).execute(&mut *tx).await?;
        for user in members {
            sqlx::query("INSERT INTO authz.group_members (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING").bind(group_id).bind(user).execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    async fn group_org(&self, group_id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT org FROM authz.groups WHERE id = $1").bind(group_id).fetch_optional(&self.pool).await
    }

    async fn create_room(&self, id: &str, org: &str, creator: &str) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("INSERT INTO authz.rooms (id, org, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING").bind(id).bind(org).bind(common::now_unix()).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("INSERT INTO authz.room_members (room_id, user_id, role) VALUES ($1, $2, 'owner')").bind(id).bind(creator).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn room(&self, id: &str) -> Result<Option<RoomFacts>, sqlx::Error> {
        let Some(org) = sqlx::query_scalar::<_, String>("SELECT org FROM authz.rooms WHERE id = $1").bind(id).fetch_optional(&self.pool).await? else {
            return Ok(None);
        };
        let members: Vec<(String, String)> =
            sqlx::query_as("SELECT user_id, role FROM authz.room_members WHERE room_id = $1 ORDER BY role, user_id").bind(id).fetch_all(&self.pool).await?;
        Ok(Some(RoomFacts { id: id.to_string(), org, members }))
    }

    async fn rooms_in_org(&self, org: &str) -> Result<Vec<RoomFacts>, sqlx::Error> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM authz.rooms WHERE org = $1 ORDER BY id").bind(org).fetch_all(&self.pool).await?;
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT m.room_id, m.user_id, m.role FROM authz.room_members m JOIN authz.rooms r ON r.id = m.room_id WHERE r.org = $1")
                .bind(org)
                .fetch_all(&self.pool)
                .await?;
        Ok(rooms_of(org, ids, rows))
    }

    async fn replace_room_members(&self, id: &str, members: &[(String, String)]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM authz.room_members WHERE room_id = $1").bind(id).execute(&mut *tx).await?;
        for (user, role) in members {
            sqlx::query("INSERT INTO authz.room_members (room_id, user_id, role) VALUES ($1, $2, $3) ON CONFLICT (room_id, user_id) DO UPDATE SET role = EXCLUDED.role")
                .bind(id)
                .bind(user)
                .bind(role)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| format!("PostgreSQL: {e}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// What every `RelationStore` must do.
    async fn conformance(store: Arc<dyn RelationStore>) {
        store.ready().await.unwrap();
        let v0 = store.version().await.unwrap();
        let personal = store.ensure_personal("u-ann", "ann", "acme").await.unwrap();
        assert_eq!(store.ensure_personal("u-ann", "ann", "acme").await.unwrap(), personal, "one personal collection per person");
        let v1 = store.version().await.unwrap();
        assert!(v1 > v0, "a change bumps the version");

        let handbook = store.create("Handbook", "acme", "u-ann", false, 2).await.unwrap().unwrap();
        let org_owned = store.create("Policies", "acme", "u-ann", true, 2).await.unwrap().unwrap();
        let row = store.collection(&org_owned).await.unwrap().unwrap();
        assert_eq!((row.owner.as_str(), row.org_owned, row.personal), ("org:acme", true, false));
        store.create("Second", "acme", "u-ann", false, 2).await.unwrap().unwrap();
        assert_eq!(store.create("Third", "acme", "u-ann", false, 2).await.unwrap(), None, "the cap holds (personal not counted)");
        // Concurrent creations never pass the cap.
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.create(&format!("c{i}"), "acme", "u-bo", false, 3).await.unwrap() })
            })
            .collect();
        let mut made = 0;
        for task in tasks {
            made += usize::from(task.await.unwrap().is_some());
        }
        assert_eq!(made, 3);

        let names: Vec<String> = store.collections_in_org("acme").await.unwrap().into_iter().map(|c| c.name).collect();
        assert_eq!(names[0], "ann (personal)", "personal first");
        assert!(store.collections_in_org("globex").await.unwrap().is_empty());

        // Shares and groups become facts.
        let group = store.create_group("acme", "ops", 1).await.unwrap().unwrap();
        assert_eq!(store.create_group("acme", "more", 1).await.unwrap(), None);
        assert_eq!(store.group_org(&group).await.unwrap().as_deref(), Some("acme"));
        store.replace_group_members(&group, &["u-cy".into(), "u-dee".into(), "u-cy".into()]).await.unwrap();
        assert_eq!(store.groups_of("u-cy").await.unwrap(), vec![group.clone()]);
        assert_eq!(store.groups_in_org("acme").await.unwrap(), vec![(group.clone(), "ops".to_string(), vec!["u-cy".to_string(), "u-dee".to_string()])]);
        let before = store.version().await.unwrap();
        store.replace_shares(&handbook, &[("user".into(), "u-bo".into(), "viewer".into()), ("group".into(), group.clone(), "editor".into())]).await.unwrap();
        assert!(store.version().await.unwrap() > before);
        let rows = [store.collection(&handbook).await.unwrap().unwrap(), store.collection(&personal).await.unwrap().unwrap()];
        let facts = store.facts(&rows).await.unwrap();
        let mut shares = facts[0].shares.clone();
        shares.sort();
        assert_eq!(shares, vec![("group".to_string(), group.clone(), "editor".to_string()), ("user".to_string(), "u-bo".to_string(), "viewer".to_string())]);
        assert!(facts[1].shares.is_empty() && facts[1].personal);
        store.replace_shares(&handbook, &[("user".into(), "u-bo".into(), "manager".into())]).await.unwrap();
        assert_eq!(store.facts(&rows[..1]).await.unwrap()[0].shares, vec![("user".to_string(), "u-bo".to_string(), "manager".to_string())], "replaced, not added");

        // Deleting takes the shares; a personal collection is never deleted.
        assert!(!store.delete_collection(&personal).await.unwrap());
        assert!(store.delete_collection(&handbook).await.unwrap());
        assert!(store.collection(&handbook).await.unwrap().is_none());
        assert!(store.facts(&rows[..1]).await.unwrap()[0].shares.is_empty());

        // Rooms.
        assert!(store.create_room("r-1", "acme", "u-ann").await.unwrap());
        assert!(!store.create_room("r-1", "acme", "u-eve").await.unwrap(), "a room is created once");
        assert_eq!(store.room("r-1").await.unwrap().unwrap().members, vec![("u-ann".to_string(), "owner".to_string())]);
        store.replace_room_members("r-1", &[("u-ann".into(), "owner".into()), ("u-bo".into(), "member".into())]).await.unwrap();
        let rooms = store.rooms_in_org("acme").await.unwrap();
        assert_eq!(rooms.len(), 1);
        let mut members = rooms[0].members.clone();
        members.sort();
        assert_eq!(members, vec![("u-ann".to_string(), "owner".to_string()), ("u-bo".to_string(), "member".to_string())]);
        assert!(store.room("r-none").await.unwrap().is_none());

        store.seed("bench", "u-owner", "u-reader", 20).await.unwrap();
        let seeded = store.collections_in_org("bench").await.unwrap();
        assert_eq!(seeded.len(), 20);
        assert_eq!(store.facts(&seeded).await.unwrap().iter().filter(|f| !f.shares.is_empty()).count(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance(Arc::new(SqliteRelations::open(&dir.path().join("authz.db")).await.unwrap())).await;
    }

    /// On a scratch database of the test PostgreSQL (skipped with a reason when it is not
    /// reachable, failed under CI).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_conforms() {
        let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
        conformance(Arc::new(PgRelations::open(&server.url).await.unwrap())).await;
        let again = PgRelations::open(&server.url).await.unwrap();
        assert!(again.version().await.unwrap() > 0, "another replica sees the same version");
        drop(again);
        server.cleanup().await;
    }
}
