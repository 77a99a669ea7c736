//! Tokens the gateway refuses although their signature, issuer, audience and expiry
//! are fine: those identity announced as revoked (`echo.token.revoked`: `/revoke`, a
//! replayed code, a reused refresh token, a password change or reset) and those of
//! users identity announced as disabled. The lists live in memory, checked on every
//! API request without IO, and in `gateway.db`, so a restart forgets nothing; a
//! revoked `jti` is kept until the token would have expired anyway.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use sqlx::SqlitePool;

use common::now_unix;
use common::wire::{TokensRevoked, UserSummary, events};

#[derive(Clone, Default)]
pub(crate) struct Revocations {
    /// Revoked `jti` → its `exp`.
    tokens: Arc<RwLock<HashMap<String, i64>>>,
    disabled: Arc<RwLock<HashSet<String>>>,
}

impl Revocations {
    /// The lists as `gateway.db` holds them.
    pub(crate) async fn load(pool: &SqlitePool) -> Result<Revocations, sqlx::Error> {
        let now = now_unix();
        sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < ?").bind(now).execute(pool).await?;
        let tokens: Vec<(String, i64)> = sqlx::query_as("SELECT jti, expires_at FROM revoked_tokens").fetch_all(pool).await?;
        let disabled: Vec<String> = sqlx::query_scalar("SELECT sub FROM disabled_users").fetch_all(pool).await?;
        Ok(Revocations { tokens: Arc::new(RwLock::new(tokens.into_iter().collect())), disabled: Arc::new(RwLock::new(disabled.into_iter().collect())) })
    }

    pub(crate) fn token_revoked(&self, jti: &str) -> bool {
        self.tokens.read().map(|t| t.contains_key(jti)).unwrap_or(true)
    }

    pub(crate) fn user_disabled(&self, sub: &str) -> bool {
        self.disabled.read().map(|d| d.contains(sub)).unwrap_or(true)
    }

    fn remember_tokens(&self, revoked: &TokensRevoked) {
        if let Ok(mut tokens) = self.tokens.write() {
            let now = now_unix();
            tokens.retain(|_, exp| *exp >= now);
            for token in &revoked.tokens {
                tokens.insert(token.jti.clone(), token.exp);
            }
        }
    }

    fn remember_disabled(&self, sub: &str) {
        if let Ok(mut disabled) = self.disabled.write() {
            disabled.insert(sub.to_string());
        }
    }
}

/// Stores a revocation and ends the browser sessions it names, in one transaction.
async fn apply_tokens_revoked(pool: &SqlitePool, revoked: &TokensRevoked) -> Result<(), sqlx::Error> {
    let mut tx = common::db::begin_write(pool).await?;
    for token in &revoked.tokens {
        sqlx::query("INSERT OR IGNORE INTO revoked_tokens (jti, expires_at) VALUES (?, ?)").bind(&token.jti).bind(token.exp).execute(&mut *tx).await?;
    }
    if let Some(user) = &revoked.end_sessions_of {
        sqlx::query("DELETE FROM sessions WHERE sub = ? AND id_hash != ?")
            .bind(user)
            .bind(revoked.keep_session.as_deref().unwrap_or_default())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

async fn apply_user_disabled(pool: &SqlitePool, user: &UserSummary) -> Result<(), sqlx::Error> {
    let mut tx = common::db::begin_write(pool).await?;
    sqlx::query("INSERT OR IGNORE INTO disabled_users (sub, disabled_at) VALUES (?, ?)").bind(&user.id).bind(now_unix()).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM sessions WHERE sub = ?").bind(&user.id).execute(&mut *tx).await?;
    tx.commit().await
}

/// Consumes `echo.token.revoked` and `echo.user.disabled`; `ready` is set once both
/// subscriptions exist, so no announcement made after the gateway is ready is missed.
pub(crate) fn spawn_consumers(ctx: common::ServiceContext, pool: SqlitePool, revocations: Revocations, ready: common::server::ReadyFlag) {
    tokio::spawn(async move {
        let spec = |topic: &str| common::bus::SubscriptionSpec { topic: topic.into(), max_deliveries: None, lease_ms: None, ordered: None };
        if !ctx.bus.declare("gateway-user-disabled", &spec(events::USER_DISABLED), &ctx.shutdown).await {
            return;
        }
        if !ctx.bus.declare("gateway-token-revoked", &spec(events::TOKENS_REVOKED), &ctx.shutdown).await {
            return;
        }
        ready.set();
        let (disabled_pool, disabled_list) = (pool.clone(), revocations.clone());
        ctx.bus.spawn_consumer("gateway-user-disabled", 1, ctx.shutdown.clone(), move |event, _| {
            let (pool, revocations) = (disabled_pool.clone(), disabled_list.clone());
            async move {
                let user: UserSummary = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                revocations.remember_disabled(&user.id);
                apply_user_disabled(&pool, &user).await.map_err(|e| e.to_string())
            }
        });
        ctx.bus.spawn_consumer("gateway-token-revoked", 1, ctx.shutdown.clone(), move |event, _| {
            let (pool, revocations) = (pool.clone(), revocations.clone());
            async move {
                let revoked: TokensRevoked = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                // Refused in memory first: the next request already sees it.
                revocations.remember_tokens(&revoked);
                apply_tokens_revoked(&pool, &revoked).await.map_err(|e| e.to_string())
            }
        });
    });
}
