//! Tokens the gateway refuses although their signature, issuer, audience and expiry
//! are fine: those identity announced as revoked (`echo.token.revoked`: `/revoke`, a
//! replayed code, a reused refresh token, a password change or reset) and those of
//! users identity announced as disabled. The lists live in memory, checked on every
//! API request without IO, and in the gateway's store, so a restart forgets nothing; a
//! revoked `jti` is kept until the token would have expired anyway. Each announcement
//! reaches one gateway replica (a competing consumer); every replica also merges the
//! store's lists into its own every `REFRESH` (with the store on PostgreSQL, shared), so
//! a revocation holds at every replica within that.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use std::time::Duration;

use common::now_unix;
use common::wire::{TokensRevoked, UserSummary, events};

use crate::store::{GatewayStore, Revoked};

/// How often a replica merges the stored lists into its own.
const REFRESH: Duration = Duration::from_secs(1);

#[derive(Clone, Default)]
pub(crate) struct Revocations {
    /// Revoked `jti` → its `exp`.
    tokens: Arc<RwLock<HashMap<String, i64>>>,
    disabled: Arc<RwLock<HashSet<String>>>,
}

impl Revocations {
    /// The lists as the store holds them.
    pub(crate) async fn load(store: &dyn GatewayStore) -> Result<Revocations, sqlx::Error> {
        let lists = Revocations::default();
        lists.merge(store.revoked(now_unix()).await?);
        Ok(lists)
    }

    /// Adds what the store holds (an announcement another replica took); forgets
    /// revocations of tokens that have expired. Nothing live is ever dropped.
    fn merge(&self, stored: Revoked) {
        if let Ok(mut tokens) = self.tokens.write() {
            let now = now_unix();
            tokens.retain(|_, exp| *exp >= now);
            tokens.extend(stored.tokens.into_iter().filter(|(_, exp)| *exp >= now));
        }
        if let Ok(mut disabled) = self.disabled.write() {
            disabled.extend(stored.disabled);
        }
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

/// Consumes `echo.token.revoked` and `echo.user.disabled`; `ready` is set once both
/// subscriptions exist, so no announcement made after the gateway is ready is missed.
pub(crate) fn spawn_consumers(ctx: common::ServiceContext, store: std::sync::Arc<dyn GatewayStore>, revocations: Revocations, ready: common::server::ReadyFlag) {
    let (refresh_store, refresh_lists, shutdown) = (store.clone(), revocations.clone(), ctx.shutdown.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match refresh_store.revoked(now_unix()).await {
                Ok(stored) => refresh_lists.merge(stored),
                Err(error) => tracing::warn!(%error, "the stored revocation lists could not be read; those in memory stand"),
            }
        }
    });
    tokio::spawn(async move {
        let spec = |topic: &str| common::bus::SubscriptionSpec { topic: topic.into(), max_deliveries: None, lease_ms: None, ordered: None };
        if !ctx.bus.declare("gateway-user-disabled", &spec(events::USER_DISABLED), &ctx.shutdown).await {
            return;
        }
        if !ctx.bus.declare("gateway-token-revoked", &spec(events::TOKENS_REVOKED), &ctx.shutdown).await {
            return;
        }
        ready.set();
        let (disabled_store, disabled_list) = (store.clone(), revocations.clone());
        ctx.bus.spawn_consumer("gateway-user-disabled", 1, ctx.shutdown.clone(), move |event, _| {
            let (store, revocations) = (disabled_store.clone(), disabled_list.clone());
            async move {
                let user: UserSummary = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                revocations.remember_disabled(&user.id);
                store.apply_user_disabled(&user.id, now_unix()).await.map_err(|e| e.to_string())
            }
        });
        ctx.bus.spawn_consumer("gateway-token-revoked", 1, ctx.shutdown.clone(), move |event, _| {
            let (store, revocations) = (store.clone(), revocations.clone());
            async move {
                let revoked: TokensRevoked = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                // Refused in memory first: the next request already sees it.
                revocations.remember_tokens(&revoked);
                store.apply_tokens_revoked(&revoked).await.map_err(|e| e.to_string())
            }
        });
    });
}
