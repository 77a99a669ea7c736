//! Identity's storage: users, orgs, clients, signing keys, authorization codes,
//! sessions and refresh tokens in its own SQLite file. Bearer secrets (codes,
//! session ids, refresh tokens, client secrets) are stored only as SHA-256 hashes.
//! No HTTP types here.

use sqlx::{Row, SqlitePool};

use common::now_unix;

pub(crate) const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE orgs (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL);
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE COLLATE NOCASE,
    email TEXT,
    name TEXT,
    org TEXT NOT NULL REFERENCES orgs(name),
    roles TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE clients (
    client_id TEXT PRIMARY KEY,
    secret_hash TEXT,
    redirect_uris TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('public', 'confidential', 'service')),
    created_at INTEGER NOT NULL
);
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    alg TEXT NOT NULL,
    private_der BLOB NOT NULL,
    n TEXT NOT NULL,
    e TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE auth_codes (
    code_hash TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    user_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    nonce TEXT,
    code_challenge TEXT,
    auth_time INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    auth_time INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    family TEXT NOT NULL,
    client_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    auth_time INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    revoked_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
"#, r#"
CREATE TABLE revoked_access_tokens (jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE TABLE login_failures (key TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_at INTEGER NOT NULL);
"#, r#"
ALTER TABLE signing_keys ADD COLUMN activate_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE signing_keys ADD COLUMN publish_until INTEGER;
"#, r#"
ALTER TABLE auth_codes ADD COLUMN issued_family TEXT;
ALTER TABLE auth_codes ADD COLUMN issued_jti TEXT;
ALTER TABLE auth_codes ADD COLUMN issued_exp INTEGER;
CREATE TABLE audit_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE reset_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
"#, r#"
ALTER TABLE signing_keys ADD COLUMN public_jwk TEXT;
ALTER TABLE clients ADD COLUMN signing_alg TEXT NOT NULL DEFAULT 'RS256';
"#, r#"
CREATE TABLE access_tokens (
    jti TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    family TEXT,
    expires_at INTEGER NOT NULL
);
CREATE INDEX access_tokens_user ON access_tokens(user_id);
CREATE INDEX access_tokens_family ON access_tokens(family);
CREATE TABLE event_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    subject TEXT,
    data TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
DELETE FROM settings WHERE key = 'form_key';
"#, r#"
ALTER TABLE users ADD COLUMN must_change_password INTEGER NOT NULL DEFAULT 0;
"#, r#"
ALTER TABLE clients ADD COLUMN consent_required INTEGER NOT NULL DEFAULT 0;
CREATE TABLE consents (
    user_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, client_id)
);
"#];

#[derive(Clone, Debug)]
pub(crate) struct User {
    pub(crate) id: String,
    pub(crate) username: String,
    pub(crate) email: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) org: String,
    pub(crate) roles: Vec<String>,
    pub(crate) password_hash: String,
    pub(crate) disabled: bool,
    /// The password was given to the user (the first admin's printed one, or one an
    /// admin chose): the next sign-in must replace it before it goes on.
    pub(crate) must_change_password: bool,
}

impl User {
    pub(crate) fn summary(&self) -> common::wire::UserSummary {
        common::wire::UserSummary {
            id: self.id.clone(),
            username: self.username.clone(),
            org: self.org.clone(),
            roles: self.roles.clone(),
            email: self.email.clone(),
            disabled: self.disabled,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Client {
    pub(crate) client_id: String,
    pub(crate) secret_hash: Option<String>,
    pub(crate) redirect_uris: Vec<String>,
    pub(crate) kind: String,
    /// `RS256` (default), `ES256` or `EdDSA`: signs this client's ID and access tokens.
    pub(crate) signing_alg: String,
    /// Each user is asked once (and again when it wants more) whether this client may
    /// act for them (`echod client add --consent`).
    pub(crate) consent_required: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct AuthCode {
    pub(crate) client_id: String,
    pub(crate) redirect_uri: String,
    pub(crate) user_id: String,
    pub(crate) scope: String,
    pub(crate) nonce: Option<String>,
    pub(crate) code_challenge: Option<String>,
    pub(crate) auth_time: i64,
    pub(crate) expires_at: i64,
}

#[derive(Clone, Debug)]
pub(crate) struct RefreshToken {
    pub(crate) family: String,
    pub(crate) client_id: String,
    pub(crate) user_id: String,
    pub(crate) scope: String,
    pub(crate) auth_time: i64,
    pub(crate) expires_at: i64,
    pub(crate) used_at: Option<i64>,
    pub(crate) revoked_at: Option<i64>,
}

/// A key to insert.
pub(crate) struct NewStoredKey<'a> {
    pub(crate) kid: &'a str,
    pub(crate) alg: &'a str,
    pub(crate) der: &'a [u8],
    pub(crate) n: &'a str,
    pub(crate) e: &'a str,
    pub(crate) public_jwk: String,
    pub(crate) activate_at: i64,
}

pub(crate) struct StoredKey {
    pub(crate) kid: String,
    pub(crate) alg: String,
    pub(crate) public_jwk: Option<String>,
    pub(crate) der: Vec<u8>,
    pub(crate) n: String,
    pub(crate) e: String,
    pub(crate) activate_at: i64,
}

#[derive(Clone)]
pub(crate) struct Store {
    pub(crate) pool: SqlitePool,
}

fn user_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<User, sqlx::Error> {
    let roles: String = row.try_get("roles")?;
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        org: row.try_get("org")?,
        roles: serde_json::from_str(&roles).unwrap_or_default(),
        password_hash: row.try_get("password_hash")?,
        disabled: row.try_get::<i64, _>("disabled")? != 0,
        must_change_password: row.try_get::<i64, _>("must_change_password")? != 0,
    })
}

impl Store {
    pub(crate) async fn open(path: &std::path::Path) -> Result<Store, sqlx::Error> {
        let pool = common::db::open_migrated(path, MIGRATIONS).await?;
        Ok(Store { pool })
    }

    // ---- users ----

    pub(crate) async fn count_users(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&self.pool).await
    }

    pub(crate) async fn insert_user(&self, user: &User) -> Result<(), sqlx::Error> {
        let now = now_unix();
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("INSERT OR IGNORE INTO orgs (name, created_at) VALUES (?, ?)")
            .bind(&user.org)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO users (id, username, email, name, org, roles, password_hash, disabled, created_at, updated_at, must_change_password)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(&user.email)
        .bind(&user.name)
        .bind(&user.org)
        .bind(serde_json::to_string(&user.roles).unwrap_or_else(|_| "[]".into()))
        .bind(&user.password_hash)
        .bind(user.disabled as i64)
        .bind(now)
        .bind(now)
        .bind(user.must_change_password as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    pub(crate) async fn user_by_username(&self, username: &str) -> Result<Option<User>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM users WHERE username = ?").bind(username).fetch_optional(&self.pool).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    pub(crate) async fn user_by_id(&self, id: &str) -> Result<Option<User>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM users WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    pub(crate) async fn users_in_org(&self, org: &str) -> Result<Vec<User>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM users WHERE org = ? ORDER BY username").bind(org).fetch_all(&self.pool).await?;
        rows.iter().map(user_from_row).collect()
    }

    pub(crate) async fn all_users(&self) -> Result<Vec<User>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY org, username").fetch_all(&self.pool).await?;
        rows.iter().map(user_from_row).collect()
    }

    /// Sets the user's own password: one they chose, so nothing asks to change it.
    pub(crate) async fn set_password(&self, user_id: &str, password_hash: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("UPDATE users SET password_hash = ?, updated_at = ?, must_change_password = 0 WHERE id = ?")
            .bind(password_hash)
            .bind(now_unix())
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn set_roles(&self, user_id: &str, roles: &[String]) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("UPDATE users SET roles = ?, updated_at = ? WHERE id = ?")
            .bind(serde_json::to_string(roles).unwrap_or_else(|_| "[]".into()))
            .bind(now_unix())
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn set_disabled(&self, user_id: &str, disabled: bool) -> Result<bool, sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        let done = sqlx::query("UPDATE users SET disabled = ?, updated_at = ? WHERE id = ?")
            .bind(disabled as i64)
            .bind(now_unix())
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if disabled {
            sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL")
                .bind(now_unix())
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM sessions WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    // ---- clients ----

    pub(crate) async fn client(&self, client_id: &str) -> Result<Option<Client>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM clients WHERE client_id = ?").bind(client_id).fetch_optional(&self.pool).await?;
        row.map(|row| -> Result<Client, sqlx::Error> {
            let uris: String = row.try_get("redirect_uris")?;
            Ok(Client {
                client_id: row.try_get("client_id")?,
                secret_hash: row.try_get("secret_hash")?,
                redirect_uris: serde_json::from_str(&uris).unwrap_or_default(),
                kind: row.try_get("kind")?,
                signing_alg: row.try_get("signing_alg")?,
                consent_required: row.try_get::<i64, _>("consent_required")? != 0,
            })
        })
        .transpose()
    }

    /// Creates or replaces a client registration.
    pub(crate) async fn upsert_client(&self, client: &Client) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO clients (client_id, secret_hash, redirect_uris, kind, created_at, signing_alg, consent_required) VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT(client_id) DO UPDATE SET secret_hash = excluded.secret_hash,
                 redirect_uris = excluded.redirect_uris, kind = excluded.kind, signing_alg = excluded.signing_alg,
                 consent_required = excluded.consent_required",
        )
        .bind(&client.client_id)
        .bind(&client.secret_hash)
        .bind(serde_json::to_string(&client.redirect_uris).unwrap_or_else(|_| "[]".into()))
        .bind(&client.kind)
        .bind(now_unix())
        .bind(&client.signing_alg)
        .bind(client.consent_required as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The redirect URIs of every client people sign in to (not services): their
    /// origins may call identity from a browser (CORS).
    pub(crate) async fn browser_redirect_uris(&self) -> Result<Vec<String>, sqlx::Error> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT redirect_uris FROM clients WHERE kind != 'service'").fetch_all(&self.pool).await?;
        Ok(rows.iter().flat_map(|uris| serde_json::from_str::<Vec<String>>(uris).unwrap_or_default()).collect())
    }

    // ---- consents ----

    /// The scopes `user_id` allowed `client_id`, if they ever did.
    pub(crate) async fn consent(&self, user_id: &str, client_id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT scope FROM consents WHERE user_id = ? AND client_id = ?").bind(user_id).bind(client_id).fetch_optional(&self.pool).await
    }

    pub(crate) async fn grant_consent(&self, user_id: &str, client_id: &str, scope: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO consents (user_id, client_id, scope, granted_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(user_id, client_id) DO UPDATE SET scope = excluded.scope, granted_at = excluded.granted_at",
        )
        .bind(user_id)
        .bind(client_id)
        .bind(scope)
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// (client id, scope, granted at) of every consent the user gave.
    pub(crate) async fn consents_of(&self, user_id: &str) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        sqlx::query_as("SELECT client_id, scope, granted_at FROM consents WHERE user_id = ? ORDER BY client_id").bind(user_id).fetch_all(&self.pool).await
    }

    /// Withdraws a consent and ends the client's refresh tokens for the user; the
    /// access tokens to refuse are returned (jti, exp).
    pub(crate) async fn withdraw_consent(&self, user_id: &str, client_id: &str) -> Result<Option<Vec<(String, i64)>>, sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        let done = sqlx::query("DELETE FROM consents WHERE user_id = ? AND client_id = ?").bind(user_id).bind(client_id).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND client_id = ? AND revoked_at IS NULL")
            .bind(now_unix())
            .bind(user_id)
            .bind(client_id)
            .execute(&mut *tx)
            .await?;
        let tokens: Vec<(String, i64)> = sqlx::query_as("SELECT jti, expires_at FROM access_tokens WHERE user_id = ? AND client_id = ? AND expires_at > ?")
            .bind(user_id)
            .bind(client_id)
            .bind(now_unix())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(tokens))
    }

    // ---- keys and settings ----

    /// Keys still published in the JWKS, newest activation first.
    pub(crate) async fn published_keys(&self) -> Result<Vec<StoredKey>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT kid, alg, public_jwk, private_der, n, e, activate_at FROM signing_keys
             WHERE publish_until IS NULL OR publish_until > ? ORDER BY activate_at DESC, created_at DESC",
        )
        .bind(now_unix())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredKey {
                    kid: r.try_get("kid")?,
                    alg: r.try_get("alg")?,
                    public_jwk: r.try_get("public_jwk")?,
                    der: r.try_get("private_der")?,
                    n: r.try_get("n")?,
                    e: r.try_get("e")?,
                    activate_at: r.try_get("activate_at")?,
                })
            })
            .collect()
    }

    /// Adds a key of `alg` that starts signing at `activate_at`; the keys of that
    /// algorithm signing until then stay published until `old_publish_until`, when every
    /// token they signed has expired.
    pub(crate) async fn insert_key(&self, key: &NewStoredKey<'_>, old_publish_until: Option<i64>) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        if let Some(until) = old_publish_until {
            sqlx::query("UPDATE signing_keys SET publish_until = ? WHERE publish_until IS NULL AND alg = ?")
                .bind(until)
                .bind(key.alg)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO signing_keys (kid, alg, private_der, n, e, public_jwk, created_at, activate_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(key.kid)
        .bind(key.alg)
        .bind(key.der)
        .bind(key.n)
        .bind(key.e)
        .bind(&key.public_jwk)
        .bind(now_unix())
        .bind(key.activate_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Whether any private key is stored sealed (then the key-encryption key must exist).
    pub(crate) async fn has_sealed_keys(&self) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM signing_keys WHERE substr(private_der, 1, 4) = CAST('EKv1' AS BLOB)").fetch_one(&self.pool).await?;
        Ok(n > 0)
    }

    /// Every stored key's (kid, private part as stored), published or not.
    pub(crate) async fn all_keys_der(&self) -> Result<Vec<(String, Vec<u8>)>, sqlx::Error> {
        sqlx::query_as("SELECT kid, private_der FROM signing_keys").fetch_all(&self.pool).await
    }

    pub(crate) async fn replace_key_der(&self, kid: &str, der: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE signing_keys SET private_der = ? WHERE kid = ?").bind(der).bind(kid).execute(&self.pool).await?;
        Ok(())
    }

    /// Removes a setting older versions kept (the login form key, now derived).
    pub(crate) async fn forget_setting(&self, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM settings WHERE key = ?").bind(key).execute(&self.pool).await?;
        Ok(())
    }

    // ---- codes ----

    pub(crate) async fn insert_code(&self, code_hash: &str, code: &AuthCode) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        insert_code_on(&mut conn, code_hash, code).await
    }

    /// Marks the code used and returns it; `Ok(None)` when unknown or already used.
    pub(crate) async fn take_code(&self, code_hash: &str) -> Result<Option<AuthCode>, sqlx::Error> {
        let row = sqlx::query(
            "UPDATE auth_codes SET used_at = ? WHERE code_hash = ? AND used_at IS NULL
             RETURNING client_id, redirect_uri, user_id, scope, nonce, code_challenge, auth_time, expires_at",
        )
        .bind(now_unix())
        .bind(code_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> Result<AuthCode, sqlx::Error> {
            Ok(AuthCode {
                client_id: r.try_get("client_id")?,
                redirect_uri: r.try_get("redirect_uri")?,
                user_id: r.try_get("user_id")?,
                scope: r.try_get("scope")?,
                nonce: r.try_get("nonce")?,
                code_challenge: r.try_get("code_challenge")?,
                auth_time: r.try_get("auth_time")?,
                expires_at: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    /// Remembers what a code was exchanged for, so a replay can revoke it.
    pub(crate) async fn record_code_issue(&self, code_hash: &str, family: Option<&str>, jti: &str, exp: i64) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE auth_codes SET issued_family = ?, issued_jti = ?, issued_exp = ? WHERE code_hash = ?")
            .bind(family)
            .bind(jti)
            .bind(exp)
            .bind(code_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// For a code presented again: (user, refresh family, access jti, access exp) issued from it.
    pub(crate) async fn spent_code(&self, code_hash: &str) -> Result<Option<(String, Option<String>, Option<String>, Option<i64>)>, sqlx::Error> {
        sqlx::query_as("SELECT user_id, issued_family, issued_jti, issued_exp FROM auth_codes WHERE code_hash = ? AND used_at IS NOT NULL")
            .bind(code_hash)
            .fetch_optional(&self.pool)
            .await
    }

    // ---- sessions ----

    /// A successful sign-in in one durable transaction: the account's failures are
    /// forgotten, the identity session and the authorization code are stored.
    pub(crate) async fn complete_login(&self, failure_keys: &[String], session_hash: &str, code_hash: &str, code: &AuthCode, session_expires_at: i64) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        for key in failure_keys {
            sqlx::query("DELETE FROM login_failures WHERE key = ?").bind(key).execute(&mut *tx).await?;
        }
        insert_session_on(&mut tx, session_hash, &code.user_id, code.auth_time, session_expires_at).await?;
        insert_code_on(&mut tx, code_hash, code).await?;
        tx.commit().await
    }

    pub(crate) async fn insert_session(&self, id_hash: &str, user_id: &str, auth_time: i64, expires_at: i64) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        insert_session_on(&mut conn, id_hash, user_id, auth_time, expires_at).await
    }

    /// The live session's (user id, auth_time).
    pub(crate) async fn session(&self, id_hash: &str) -> Result<Option<(String, i64)>, sqlx::Error> {
        let row = sqlx::query("SELECT user_id, auth_time FROM sessions WHERE id_hash = ? AND expires_at > ?")
            .bind(id_hash)
            .bind(now_unix())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("user_id")?, r.try_get("auth_time")?))).transpose()
    }

    pub(crate) async fn delete_session(&self, id_hash: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = ?").bind(id_hash).execute(&self.pool).await?;
        Ok(())
    }

    // ---- refresh tokens ----

    pub(crate) async fn insert_refresh(&self, token_hash: &str, token: &RefreshToken) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family, client_id, user_id, scope, auth_time, expires_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(token_hash)
        .bind(&token.family)
        .bind(&token.client_id)
        .bind(&token.user_id)
        .bind(&token.scope)
        .bind(token.auth_time)
        .bind(token.expires_at)
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn refresh(&self, token_hash: &str) -> Result<Option<RefreshToken>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM refresh_tokens WHERE token_hash = ?").bind(token_hash).fetch_optional(&self.pool).await?;
        row.map(|r| -> Result<RefreshToken, sqlx::Error> {
            Ok(RefreshToken {
                family: r.try_get("family")?,
                client_id: r.try_get("client_id")?,
                user_id: r.try_get("user_id")?,
                scope: r.try_get("scope")?,
                auth_time: r.try_get("auth_time")?,
                expires_at: r.try_get("expires_at")?,
                used_at: r.try_get("used_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        })
        .transpose()
    }

    /// Marks a refresh token spent; false when it already was (a replay).
    pub(crate) async fn spend_refresh(&self, token_hash: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL")
            .bind(now_unix())
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Remembers an issued user access token until it expires, so that a revocation
    /// of its family or of its user can name it.
    pub(crate) async fn record_access_token(&self, jti: &str, user_id: &str, client_id: &str, family: Option<&str>, expires_at: i64) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT OR IGNORE INTO access_tokens (jti, user_id, client_id, family, expires_at) VALUES (?, ?, ?, ?, ?)")
            .bind(jti)
            .bind(user_id)
            .bind(client_id)
            .bind(family)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Unexpired access tokens (jti, exp) issued from a refresh family.
    pub(crate) async fn live_tokens_of_family(&self, family: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as("SELECT jti, expires_at FROM access_tokens WHERE family = ? AND expires_at > ?").bind(family).bind(now_unix()).fetch_all(&self.pool).await
    }

    /// Unexpired access tokens (jti, exp) of a user.
    pub(crate) async fn live_tokens_of_user(&self, user_id: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as("SELECT jti, expires_at FROM access_tokens WHERE user_id = ? AND expires_at > ?").bind(user_id).bind(now_unix()).fetch_all(&self.pool).await
    }

    /// Records revoked access tokens until they would have expired anyway, and the
    /// event announcing them, in one transaction: the announcement cannot be lost.
    pub(crate) async fn revoke_tokens(&self, tokens: &[(String, i64)], event: &common::wire::TokensRevoked) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        for (jti, expires_at) in tokens {
            sqlx::query("INSERT OR IGNORE INTO revoked_access_tokens (jti, expires_at) VALUES (?, ?)").bind(jti).bind(expires_at).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO event_outbox (type, subject, data, created_at) VALUES (?, ?, ?, ?)")
            .bind(common::wire::events::TOKENS_REVOKED)
            .bind(event.end_sessions_of.as_ref().map(|user| format!("user:{user}")))
            .bind(serde_json::to_string(event).unwrap_or_default())
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Events waiting to be published: (id, type, subject, data).
    pub(crate) async fn queued_events(&self) -> Result<Vec<(i64, String, Option<String>, serde_json::Value)>, sqlx::Error> {
        let rows: Vec<(i64, String, Option<String>, String)> =
            sqlx::query_as("SELECT id, type, subject, data FROM event_outbox ORDER BY id LIMIT 100").fetch_all(&self.pool).await?;
        Ok(rows.into_iter().filter_map(|(id, type_, subject, data)| serde_json::from_str(&data).ok().map(|d| (id, type_, subject, d))).collect())
    }

    pub(crate) async fn drop_queued_event(&self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM event_outbox WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Forgets what can no longer matter: tokens past their expiry.
    pub(crate) async fn prune_expired_tokens(&self) -> Result<(), sqlx::Error> {
        let now = now_unix();
        sqlx::query("DELETE FROM revoked_access_tokens WHERE expires_at < ?").bind(now).execute(&self.pool).await?;
        sqlx::query("DELETE FROM access_tokens WHERE expires_at < ?").bind(now).execute(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn access_revoked(&self, jti: &str) -> Result<bool, sqlx::Error> {
        let found: Option<String> = sqlx::query_scalar("SELECT jti FROM revoked_access_tokens WHERE jti = ?").bind(jti).fetch_optional(&self.pool).await?;
        Ok(found.is_some())
    }

    /// (failures, last failure time in Unix ms) for a throttling key such as `user:ann` or `ip:10.0.0.1`.
    pub(crate) async fn failures(&self, key: &str) -> Result<(i64, i64), sqlx::Error> {
        let row: Option<(i64, i64)> = sqlx::query_as("SELECT failures, last_at FROM login_failures WHERE key = ?").bind(key).fetch_optional(&self.pool).await?;
        Ok(row.unwrap_or((0, 0)))
    }

    pub(crate) async fn record_failure(&self, key: &str, now: i64, forget_after: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO login_failures (key, failures, last_at) VALUES (?, 1, ?)
             ON CONFLICT(key) DO UPDATE SET failures = CASE WHEN last_at < ? THEN 1 ELSE failures + 1 END, last_at = excluded.last_at",
        )
        .bind(key)
        .bind(now)
        .bind(now - forget_after)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn clear_failures(&self, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM login_failures WHERE key = ?").bind(key).execute(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn insert_reset(&self, token_hash: &str, user_id: &str, expires_at: i64) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO reset_tokens (token_hash, user_id, expires_at) VALUES (?, ?, ?)")
            .bind(token_hash)
            .bind(user_id)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Spends a reset token: the user it was for, once, before it expires.
    pub(crate) async fn take_reset(&self, token_hash: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("UPDATE reset_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? RETURNING user_id")
            .bind(now_unix())
            .bind(token_hash)
            .bind(now_unix())
            .fetch_optional(&self.pool)
            .await
    }

    /// After a password reset every refresh token and session of the user ends.
    pub(crate) async fn end_user_sessions(&self, user_id: &str) -> Result<(), sqlx::Error> {
        let mut tx = common::db::begin_write(&self.pool).await?;
        sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL").bind(now_unix()).bind(user_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
        tx.commit().await
    }

    /// Keeps an audit event made without a bus connection (the CLI) until a running
    /// identity relays it.
    pub(crate) async fn queue_audit(&self, event: &common::wire::AuditEvent) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO audit_outbox (event, created_at) VALUES (?, ?)")
            .bind(serde_json::to_string(event).unwrap_or_default())
            .bind(now_unix())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn queued_audits(&self) -> Result<Vec<(i64, common::wire::AuditEvent)>, sqlx::Error> {
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, event FROM audit_outbox ORDER BY id LIMIT 100").fetch_all(&self.pool).await?;
        Ok(rows.into_iter().filter_map(|(id, event)| serde_json::from_str(&event).ok().map(|e| (id, e))).collect())
    }

    pub(crate) async fn drop_queued_audit(&self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM audit_outbox WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn revoke_family(&self, family: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL")
            .bind(now_unix())
            .bind(family)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

async fn insert_code_on(conn: &mut sqlx::SqliteConnection, code_hash: &str, code: &AuthCode) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO auth_codes (code_hash, client_id, redirect_uri, user_id, scope, nonce, code_challenge, auth_time, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(code_hash)
    .bind(&code.client_id)
    .bind(&code.redirect_uri)
    .bind(&code.user_id)
    .bind(&code.scope)
    .bind(&code.nonce)
    .bind(&code.code_challenge)
    .bind(code.auth_time)
    .bind(code.expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_session_on(conn: &mut sqlx::SqliteConnection, id_hash: &str, user_id: &str, auth_time: i64, expires_at: i64) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO sessions (id_hash, user_id, auth_time, expires_at) VALUES (?, ?, ?, ?)")
        .bind(id_hash)
        .bind(user_id)
        .bind(auth_time)
        .bind(expires_at)
        .execute(conn)
        .await?;
    Ok(())
}
