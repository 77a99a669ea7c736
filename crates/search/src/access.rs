//! What each user may read, as authz answers it (`/v1/readable`), kept for the next
//! searches. An answer carries the access epoch it was computed at; authz announces
//! every change of access with the new epoch (`echo.relationship.changed`), and an
//! answer older than an announced epoch is never used again, nor stored if it arrives
//! after the announcement. An authz in this process also announces in process
//! (`common::local::announce_access`) before it answers, so there a change holds for
//! the very next search; from another process it holds once the bus delivers it.
//! `search.readable_cache_secs` bounds an answer's life in case an announcement is lost.
//! Search replicas sharing one index (`search.url`) share the subscription, so an
//! announcement reaches one of them: there an answer lives at most one second, the
//! bound within which a change of access holds at every replica (as a revocation does
//! at every gateway).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::wire::{AccessEpoch, Principal, ReadableCollections, RelationshipChanged, events};
use common::{ApiError, ServiceContext, ServiceName};

/// Users whose answers are kept before the cache starts over.
const MAX_ENTRIES: usize = 20_000;

struct Entry {
    answer: Arc<ReadableCollections>,
    fetched: Instant,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// The latest epoch authz announced.
    announced: AccessEpoch,
}

#[derive(Clone)]
pub(crate) struct Access {
    ctx: ServiceContext,
    ttl: Duration,
    authz_url: String,
    state: Arc<Mutex<State>>,
}

/// The cache key: everything of the principal that authz's answer depends on.
fn key_of(principal: &Principal) -> String {
    format!("{}\u{1f}{}\u{1f}{}", principal.sub, principal.org, principal.roles.join(","))
}

impl Access {
    pub(crate) fn new(ctx: ServiceContext) -> Access {
        let mut ttl = Duration::from_secs(ctx.config.search.readable_cache_secs);
        if !ctx.config.search.url.is_empty() {
            ttl = ttl.min(Duration::from_secs(1));
        }
        let authz_url = ctx.config.url(ServiceName::Authz);
        Access { ctx, ttl, authz_url, state: Arc::default() }
    }

    /// What `principal` may read (`document:read_chunks`), from the cache when current.
    pub(crate) async fn readable(&self, principal: &Principal) -> Result<Arc<ReadableCollections>, ApiError> {
        let key = key_of(principal);
        if let Some(epoch) = common::local::announced_access(&self.authz_url) {
            self.changed(&epoch);
        }
        if !self.ttl.is_zero()
            && let Ok(state) = self.state.lock()
            && let Some(entry) = state.entries.get(&key)
            && entry.fetched.elapsed() < self.ttl
            && entry.answer.epoch.current_after(&state.announced)
        {
            metrics::counter!("echo_search_readable_cache_hits_total").increment(1);
            return Ok(entry.answer.clone());
        }
        let answer: ReadableCollections =
            self.ctx.peers.post_json(ServiceName::Authz, "/v1/readable", Some(principal), &serde_json::json!({"action": "document:read_chunks"})).await?;
        let answer = Arc::new(answer);
        if !self.ttl.is_zero()
            && let Ok(mut state) = self.state.lock()
            && answer.epoch.current_after(&state.announced)
        {
            if state.entries.len() >= MAX_ENTRIES {
                state.entries.clear();
            }
            state.entries.insert(key, Entry { answer: answer.clone(), fetched: Instant::now() });
        }
        Ok(answer)
    }

    /// An announced change: every answer it outdates goes.
    pub(crate) fn changed(&self, epoch: &AccessEpoch) {
        if let Ok(mut state) = self.state.lock() {
            let announced = state.announced.max(epoch);
            if announced != state.announced {
                state.announced = announced;
                state.entries.retain(|_, entry| entry.answer.epoch.current_after(&announced));
            }
        }
    }

    /// Listens for announcements; `ready` is set once subscribed. Replicas share the
    /// subscription (each announcement reaches one; the others' answers expire in 1 s).
    pub(crate) fn spawn_listener(&self, ready: common::server::ReadyFlag) {
        let access = self.clone();
        tokio::spawn(async move {
            let ctx = access.ctx.clone();
            let name = "search-access";
            let spec = common::bus::SubscriptionSpec { topic: events::RELATIONSHIP_CHANGED.into(), max_deliveries: None, lease_ms: None, ordered: None };
            if !ctx.bus.declare(name, &spec, &ctx.shutdown).await {
                return;
            }
            ctx.bus.spawn_consumer(name, 1, ctx.shutdown.clone(), move |event, _| {
                let access = access.clone();
                async move {
                    let change: RelationshipChanged = event.data_as().map_err(|e| format!("bad event: {e}"))?;
                    access.changed(&change.epoch);
                    Ok(())
                }
            });
            ready.set();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_order_answers() {
        let old = AccessEpoch { version: 3, policies: 10 };
        let new = AccessEpoch { version: 4, policies: 10 };
        assert!(new.current_after(&old) && !old.current_after(&new));
        let reloaded = AccessEpoch { version: 3, policies: 11 };
        assert!(!new.current_after(&reloaded), "a policy reload outdates answers of an older generation");
        assert_eq!(new.max(&reloaded), AccessEpoch { version: 4, policies: 11 });
    }
}
