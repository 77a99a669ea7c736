//! authz — Cedar policy decisions over Echo's relationships.
//!
//! Owns the policies (compiled in from `policies/`, validated against the schema at
//! start) and the relationships (collections, shares, groups) in `authz.db`. Public
//! surface: `run`, and `check_policies` for `echod config check`.
//! Invariants: every answer about access comes from a Cedar decision; "readable
//! collections" is exact (every candidate evaluated, never truncated); a collection
//! the caller may not read is reported as not found, never as forbidden.

mod denials;
mod policy;
mod store;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use axum::{Router, middleware};
use serde::Deserialize;
use tokio::net::TcpListener;

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::wire::{Collection, Decision, DecisionRequest, Principal, ReadableCollections, ShareRequest, UserSummary, events};
use common::{ApiError, ServiceContext, ServiceName};

pub use policy::PolicyError;
use policy::{Engine, Facts};
use store::{CollectionRow, RelationStore};


#[derive(Clone)]
struct AppState {
    ctx: ServiceContext,
    engine: Arc<std::sync::RwLock<Arc<Engine>>>,
    store: Arc<dyn RelationStore>,
    /// Bumped on every policy reload.
    policy_generation: Arc<std::sync::atomic::AtomicU64>,
    /// Readable lists by principal and action, valid while neither the relationship
    /// version nor the policy generation has moved: exact, never stale.
    readable_cache: Arc<std::sync::Mutex<std::collections::HashMap<String, CachedList>>>,
    facts_cache: Arc<std::sync::Mutex<FactsCache>>,
    /// Audits denials, folding floods of identical ones into counts.
    denials: denials::Denials,
}

/// Relationship facts read from `authz.db` for single decisions, valid for one
/// relationship version: when any write bumps the version, everything is read again.
#[derive(Default)]
struct FactsCache {
    version: i64,
    collections: std::collections::HashMap<String, Option<(CollectionRow, policy::CollectionFacts)>>,
    groups: std::collections::HashMap<String, Vec<String>>,
}

/// Entries kept before the facts cache starts over.
const FACTS_CACHE_ENTRIES: usize = 50_000;

struct CachedList {
    version: i64,
    policy_generation: u64,
    answer: Arc<ReadableCollections>,
}

/// Entries kept before the cache starts over (each is one principal and action).
const READABLE_CACHE_ENTRIES: usize = 10_000;

/// The policy generation a start begins at: the clock in milliseconds, so that it
/// keeps growing across restarts (readers compare epochs).
fn start_generation() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1)
}

/// Validates the built-in schema and policies (for `echod config check`).
pub fn check_policies(config: &common::EchoConfig) -> Result<usize, PolicyError> {
    Ok(Engine::from_dir(config.authz.policy_dir.as_deref())?.1)
}

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the authz service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let engine = Arc::new(std::sync::RwLock::new(Arc::new(Engine::from_dir(ctx.config.authz.policy_dir.as_deref())?.0)));
    let store = store::open(&ctx.config).await?;
    let ready: common::server::ReadyCheck = {
        let store = store.clone();
        Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.ready().await })
        })
    };
    let denials = denials::Denials::new(std::time::Duration::from_secs(ctx.config.authz.denial_audit_window_secs.max(1)));
    denials.spawn_flusher(ctx.clone());
    let state = AppState { ctx: ctx.clone(), engine, store, policy_generation: Arc::new(std::sync::atomic::AtomicU64::new(start_generation())), readable_cache: Arc::default(), facts_cache: Arc::default(), denials };
    spawn_reload_on_hangup(state.clone());
    let routes = Router::new()
        .route("/v1/collections", get(list_collections).post(create_collection))
        .route("/v1/collections/{id}", get(get_collection).delete(delete_collection))
        .route("/v1/collections/{id}/members", put(share_collection).get(collection_members))
        .route("/v1/decide", post(decide))
        .route("/v1/decide/batch", post(decide_batch))
        .route("/v1/policies/reload", post(reload_policies))
        .route("/v1/groups", get(list_groups).post(create_group))
        .route("/v1/groups/{id}/members", put(set_group_members))
        .route("/v1/readable", post(readable))
        .route("/v1/rooms", get(list_rooms).post(create_room))
        .route("/v1/rooms/{id}/members", put(set_room_members).get(room_members))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

impl AppState {
    /// The policy set in force (a reload swaps it; in-flight decisions keep theirs).
    fn engine(&self) -> Arc<Engine> {
        self.engine.read().map(|e| e.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Re-reads and validates the policies; an invalid set is refused and the old one stays.
    fn reload(&self) -> Result<usize, PolicyError> {
        let (engine, n_files) = Engine::from_dir(self.ctx.config.authz.policy_dir.as_deref())?;
        match self.engine.write() {
            Ok(mut slot) => *slot = Arc::new(engine),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(engine),
        }
        self.policy_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(n_files)
    }

    async fn epoch(&self) -> Result<common::wire::AccessEpoch, sqlx::Error> {
        let policies = self.policy_generation.load(std::sync::atomic::Ordering::SeqCst);
        Ok(common::wire::AccessEpoch { version: self.store.version().await?, policies })
    }

    /// Announces a change of access (after it is committed) with the new epoch, so
    /// that caches of access answers elsewhere (search) drop what it outdates.
    async fn announce(&self, object: String, relation: &str, subjects: serde_json::Value) {
        let epoch = match self.epoch().await {
            Ok(epoch) => epoch,
            Err(error) => {
                tracing::warn!(%error, "cannot read the access epoch; the change is announced without it");
                common::wire::AccessEpoch { version: i64::MAX, policies: u64::MAX }
            }
        };
        common::local::announce_access(&self.ctx.config.url(common::ServiceName::Authz), epoch);
        let change = common::wire::RelationshipChanged { object: object.clone(), relation: relation.into(), subjects, epoch };
        let event = self.ctx.bus.event(events::RELATIONSHIP_CHANGED, Some(object), serde_json::to_value(&change).unwrap_or_default());
        if let Err(error) = self.ctx.bus.publish_one(event).await {
            tracing::warn!(%error, "relationship change not published");
        }
    }

    /// Evaluates `action` for `principal` on each of `collections`; returns the allowed ones
    /// with the policies that allowed them.
    async fn evaluate(&self, principal: &Principal, action: &str, collections: &[CollectionRow]) -> ApiResult<Vec<(CollectionRow, Vec<String>)>> {
        self.evaluate_classified(principal, action, collections, None).await
    }

    /// The policy set in force (one for the whole evaluation, even if a reload lands
    /// meanwhile) and the entities of `principal` with `collections`, read from the store.
    async fn engine_and_entities(&self, principal: &Principal, collections: &[CollectionRow]) -> ApiResult<(Arc<Engine>, cedar_policy::Entities)> {
        let groups = self.store.groups_of(&principal.sub).await?;
        let facts = self.store.facts(collections).await?;
        let engine = self.engine();
        let entities = engine
            .entities(&Facts { user_id: &principal.sub, org: &principal.org, roles: &principal.roles, groups: &groups, collections: &facts })
            .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
        Ok((engine, entities))
    }

    /// `evaluate` about a document of the given classification.
    async fn evaluate_classified(
        &self,
        principal: &Principal,
        action: &str,
        collections: &[CollectionRow],
        classification: Option<&str>,
    ) -> ApiResult<Vec<(CollectionRow, Vec<String>)>> {
        let (engine, entities) = self.engine_and_entities(principal, collections).await?;
        let mut allowed = Vec::new();
        for collection in collections {
            let outcome = engine
                .decide_classified(&principal.sub, action, "Collection", &collection.id, classification, &entities)
                .map_err(|e| ApiError::bad_request("authz.invalid_request", e))?;
            if outcome.allowed {
                allowed.push((collection.clone(), outcome.policies));
            }
        }
        Ok(allowed)
    }

    /// For each collection, the classifications of its documents `principal` may do
    /// `action` on (every one is evaluated: policies may use the classification either way).
    async fn classes_allowed(&self, principal: &Principal, action: &str, collections: &[CollectionRow]) -> ApiResult<Vec<(String, Vec<String>)>> {
        let (engine, entities) = self.engine_and_entities(principal, collections).await?;
        let mut answer = Vec::with_capacity(collections.len());
        for collection in collections {
            let mut classes = Vec::new();
            for class in common::wire::CLASSIFICATIONS {
                let outcome = engine
                    .decide_classified(&principal.sub, action, "Collection", &collection.id, Some(class), &entities)
                    .map_err(|e| ApiError::bad_request("authz.invalid_request", e))?;
                if outcome.allowed {
                    classes.push(class.to_string());
                }
            }
            answer.push((collection.id.clone(), classes));
        }
        Ok(answer)
    }

    /// One decision about one collection (and document classification), from facts
    /// cached for the current relationship version: one small query when nothing
    /// changed. `None` when there is no such collection.
    async fn decide_one(&self, principal: &Principal, action: &str, id: &str, classification: Option<&str>) -> ApiResult<Option<policy::Outcome>> {
        let version = self.store.version().await?;
        let cached = {
            let mut cache = self.facts_cache.lock().map_err(|_| ApiError::internal(anyhow::anyhow!("facts cache poisoned")))?;
            if cache.version != version || cache.collections.len() + cache.groups.len() > FACTS_CACHE_ENTRIES {
                *cache = FactsCache { version, ..FactsCache::default() };
            }
            (cache.collections.get(id).cloned(), cache.groups.get(&principal.sub).cloned())
        };
        let collection = match cached.0 {
            Some(known) => known,
            None => {
                let loaded = match self.store.collection(id).await? {
                    Some(row) => {
                        let facts = self.store.facts(std::slice::from_ref(&row)).await?.into_iter().next();
                        facts.map(|f| (row, f))
                    }
                    None => None,
                };
                if let Ok(mut cache) = self.facts_cache.lock()
                    && cache.version == version
                {
                    cache.collections.insert(id.to_string(), loaded.clone());
                }
                loaded
            }
        };
        let Some((_, facts)) = collection else { return Ok(None) };
        let groups = match cached.1 {
            Some(groups) => groups,
            None => {
                let groups = self.store.groups_of(&principal.sub).await?;
                if let Ok(mut cache) = self.facts_cache.lock()
                    && cache.version == version
                {
                    cache.groups.insert(principal.sub.clone(), groups.clone());
                }
                groups
            }
        };
        let engine = self.engine();
        let entities = engine
            .entities(&Facts { user_id: &principal.sub, org: &principal.org, roles: &principal.roles, groups: &groups, collections: std::slice::from_ref(&facts) })
            .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
        engine
            .decide_classified(&principal.sub, action, "Collection", id, classification, &entities)
            .map(Some)
            .map_err(|e| ApiError::bad_request("authz.invalid_request", e))
    }

    /// A decision on an org-level action (`collection:create`, `admin:manage_users`, …)
    /// or, with `resource_type` `System`, an operator action.
    async fn decide_on_org(&self, principal: &Principal, action: &str, resource_type: &str, org: &str) -> ApiResult<policy::Outcome> {
        let groups = self.store.groups_of(&principal.sub).await?;
        let entities = self
            .engine()
            .entities(&Facts { user_id: &principal.sub, org: &principal.org, roles: &principal.roles, groups: &groups, collections: &[] })
            .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
        self.engine().decide(&principal.sub, action, resource_type, org, &entities).map_err(|e| ApiError::bad_request("authz.invalid_request", e))
    }

    /// A decision on another account (`user:*`): the target's org and roles are read
    /// from identity, never taken from the caller. `None` when there is no such user.
    async fn decide_on_user(&self, principal: &Principal, action: &str, target_id: &str, new_role: Option<&str>) -> ApiResult<Option<policy::Outcome>> {
        if uuid::Uuid::parse_str(target_id).is_err() {
            return Ok(None);
        }
        let path = format!("/internal/users/{}", common::client::encode(target_id));
        let target: UserSummary = match self.ctx.peers.get_json(ServiceName::Identity, &path, None).await {
            Ok(user) => user,
            Err(ApiError { kind: common::ErrorKind::NotFound, .. }) => return Ok(None),
            Err(error) => return Err(error),
        };
        if new_role.is_some_and(|role| !matches!(role, "owner" | "admin" | "member" | "viewer")) {
            return Err(ApiError::bad_request("authz.invalid_role", "role must be owner, admin, member or viewer"));
        }
        let groups = self.store.groups_of(&principal.sub).await?;
        let facts = Facts { user_id: &principal.sub, org: &principal.org, roles: &principal.roles, groups: &groups, collections: &[] };
        let target = policy::TargetUser { id: target.id, org: target.org, roles: target.roles };
        self.engine().decide_on_user(&facts, action, &target, new_role).map(Some).map_err(|e| ApiError::bad_request("authz.invalid_request", e))
    }

    /// A `room:*` decision; `None` when there is no such room.
    async fn decide_on_room(&self, principal: &Principal, action: &str, room_id: &str) -> ApiResult<Option<policy::Outcome>> {
        let Some(room) = self.store.room(room_id).await? else { return Ok(None) };
        self.room_outcome(principal, action, &room).map(Some)
    }

    fn room_outcome(&self, principal: &Principal, action: &str, room: &policy::RoomFacts) -> ApiResult<policy::Outcome> {
        let facts = Facts { user_id: &principal.sub, org: &principal.org, roles: &principal.roles, groups: &[], collections: &[] };
        self.engine().decide_on_room(&facts, action, room).map_err(|e| ApiError::bad_request("authz.invalid_request", e))
    }

    async fn candidates(&self, principal: &Principal) -> ApiResult<Vec<CollectionRow>> {
        self.store.ensure_personal(&principal.sub, &principal.username, &principal.org).await?;
        Ok(self.store.collections_in_org(&principal.org).await?)
    }

    fn wire(&self, row: &CollectionRow, role: Option<String>) -> Collection {
        Collection { id: row.id.clone(), name: row.name.clone(), org: row.org.clone(), owner: row.owner.clone(), personal: row.personal, org_owned: row.org_owned, role }
    }

    async fn role_of(&self, principal: &Principal, row: &CollectionRow) -> ApiResult<Option<String>> {
        if row.owner == principal.sub {
            return Ok(Some("owner".into()));
        }
        for (action, role) in [("collection:share", "manager"), ("document:create", "editor"), ("document:download", "viewer"), ("collection:read", "answers")] {
            if !self.evaluate(principal, action, std::slice::from_ref(row)).await?.is_empty() {
                return Ok(Some(role.into()));
            }
        }
        Ok(None)
    }
}

async fn list_collections(State(state): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<Vec<Collection>>> {
    let candidates = state.candidates(&principal).await?;
    let readable = state.evaluate(&principal, "collection:read", &candidates).await?;
    let mut collections = Vec::with_capacity(readable.len());
    for (row, _) in readable {
        let role = state.role_of(&principal, &row).await?;
        collections.push(state.wire(&row, role));
    }
    Ok(Json(collections))
}

#[derive(Deserialize)]
struct NewCollection {
    name: String,
    /// Owned by the org rather than the creator (org owners and admins only).
    #[serde(default)]
    org_owned: bool,
}

async fn create_collection(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(body): Json<NewCollection>) -> ApiResult<Json<Collection>> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad_request("authz.invalid_name", "collection names are 1 to 200 characters"));
    }
    let outcome = state.decide_on_org(&principal, "collection:create", "Org", &principal.org).await?;
    if !outcome.allowed {
        state.denials.record(&state.ctx, &principal.sub, &format!("org:{}", principal.org), serde_json::json!({"action": "collection:create"})).await;
        return Err(ApiError::forbidden("authz.denied", "you may not create collections"));
    }
    if body.org_owned {
        // Collections of the org itself are for those who manage the org.
        let admin = state.decide_on_org(&principal, "admin:manage_users", "Org", &principal.org).await?;
        if !admin.allowed {
            state.denials.record(&state.ctx, &principal.sub, &format!("org:{}", principal.org), serde_json::json!({"action": "collection:create", "org_owned": true})).await;
            return Err(ApiError::forbidden("authz.denied", "only org owners and admins create collections owned by the org"));
        }
    }
    let cap = state.ctx.config.authz.max_collections_per_user;
    let Some(id) = state.store.create(name, &principal.org, &principal.sub, body.org_owned, cap).await? else {
        let whose = if body.org_owned { "the organisation already owns" } else { "you already own" };
        return Err(ApiError::new(
            common::ErrorKind::Forbidden,
            "collection.limit_reached",
            format!("{whose} {cap} collections, the most allowed (authz.max_collections_per_user); delete one first"),
        ));
    };
    state.announce(format!("collection:{id}"), "created", serde_json::json!([{"type": "user", "id": principal.sub, "role": "owner"}])).await;
    let row = state.store.collection(&id).await?.ok_or_else(|| ApiError::internal(anyhow::anyhow!("collection vanished")))?;
    state
        .ctx
        .audit(&principal.sub, "collection.created", &format!("collection:{id}"), "success", serde_json::json!({"name": name, "org_owned": body.org_owned}))
        .await;
    let role = state.role_of(&principal, &row).await?;
    Ok(Json(state.wire(&row, role)))
}

/// The collection if the principal may read it; 404 otherwise (existence is not leaked).
async fn readable_collection(state: &AppState, principal: &Principal, id: &str) -> ApiResult<CollectionRow> {
    let not_found = || ApiError::not_found("authz.collection_not_found", "no such collection");
    let row = state.store.collection(id).await?.ok_or_else(not_found)?;
    if state.evaluate(principal, "collection:read", std::slice::from_ref(&row)).await?.is_empty() {
        return Err(not_found());
    }
    Ok(row)
}

async fn get_collection(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<Json<Collection>> {
    let row = readable_collection(&state, &principal, &id).await?;
    let role = state.role_of(&principal, &row).await?;
    Ok(Json(state.wire(&row, role)))
}

async fn share_collection(
    State(state): State<AppState>,
    ActingUser(principal): ActingUser,
    Path(id): Path<String>,
    Json(body): Json<ShareRequest>,
) -> ApiResult<Json<Collection>> {
    let row = readable_collection(&state, &principal, &id).await?;
    if state.evaluate(&principal, "collection:share", std::slice::from_ref(&row)).await?.is_empty() {
        state.denials.record(&state.ctx, &principal.sub, &format!("collection:{id}"), serde_json::json!({"action": "collection:share"})).await;
        return Err(ApiError::forbidden("authz.denied", "you may not share this collection"));
    }
    if body.members.len() > 1000 {
        return Err(ApiError::bad_request("authz.too_many_members", "at most 1000 members per collection"));
    }
    let mut members = Vec::with_capacity(body.members.len());
    for member in &body.members {
        if !matches!(member.role.as_str(), "viewer" | "editor" | "manager" | "answers") {
            return Err(ApiError::bad_request("authz.invalid_role", "role must be viewer, editor, manager or answers"));
        }
        match (&member.user, &member.group) {
            (Some(user_id), None) => {
                let path = format!("/internal/users/{}", common::client::encode(user_id));
                let user: Result<UserSummary, ApiError> = state.ctx.peers.get_json(ServiceName::Identity, &path, None).await;
                // Users of other orgs are reported exactly like unknown users.
                match user {
                    Ok(user) if user.org == row.org => members.push(("user".to_string(), user_id.clone(), member.role.clone())),
                    Ok(_) | Err(ApiError { kind: common::ErrorKind::NotFound, .. }) => {
                        return Err(ApiError::bad_request("authz.unknown_member", format!("no user `{user_id}` in this organisation")));
                    }
                    Err(error) => return Err(error),
                }
            }
            (None, Some(group_id)) => match state.store.group_org(group_id).await? {
                Some(org) if org == row.org => members.push(("group".to_string(), group_id.clone(), member.role.clone())),
                _ => return Err(ApiError::bad_request("authz.unknown_member", format!("no group `{group_id}` in this organisation"))),
            },
            _ => return Err(ApiError::bad_request("authz.invalid_member", "each member names exactly one of `user` or `group`")),
        }
    }
    state.store.replace_shares(&id, &members).await?;
    state.announce(format!("collection:{id}"), "members", serde_json::json!(members.iter().map(|(t, s, r)| serde_json::json!({"type": t, "id": s, "role": r})).collect::<Vec<_>>())).await;
    state.ctx.audit(&principal.sub, "collection.shared", &format!("collection:{id}"), "success", serde_json::json!({"members": members.len()})).await;
    let role = state.role_of(&principal, &row).await?;
    Ok(Json(state.wire(&row, role)))
}

/// The collection if the principal may do `action` on it: not readable → 404, readable
/// but not allowed → 403 (audited).
async fn permitted_collection(state: &AppState, principal: &Principal, id: &str, action: &str) -> ApiResult<CollectionRow> {
    let row = readable_collection(state, principal, id).await?;
    if state.evaluate(principal, action, std::slice::from_ref(&row)).await?.is_empty() {
        state.denials.record(&state.ctx, &principal.sub, &format!("collection:{id}"), serde_json::json!({"action": action})).await;
        return Err(ApiError::forbidden("authz.denied", format!("your role on this collection does not allow {action}")));
    }
    Ok(row)
}

/// Who the collection is shared with, for those who may share it.
async fn collection_members(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let row = permitted_collection(&state, &principal, &id, "collection:share").await?;
    let facts = state.store.facts(std::slice::from_ref(&row)).await?;
    let members: Vec<serde_json::Value> = facts
        .into_iter()
        .flat_map(|f| f.shares)
        .map(|(subject_type, subject_id, role)| serde_json::json!({subject_type: subject_id, "role": role}))
        .collect();
    Ok(Json(serde_json::json!({"collection": id, "members": members})))
}

/// Deletes a collection and its shares (its documents are purged by ingest first).
/// Personal collections cannot be deleted.
async fn delete_collection(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<axum::http::StatusCode> {
    let row = permitted_collection(&state, &principal, &id, "collection:delete").await?;
    if row.personal {
        return Err(ApiError::new(common::ErrorKind::Conflict, "collection.personal", "a personal collection cannot be deleted"));
    }
    state.store.delete_collection(&id).await?;
    state.announce(format!("collection:{id}"), "deleted", serde_json::json!([])).await;
    state.ctx.audit(&principal.sub, "collection.deleted", &format!("collection:{id}"), "success", serde_json::json!({"name": row.name})).await;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

fn spawn_reload_on_hangup(state: AppState) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        loop {
            tokio::select! {
                _ = state.ctx.shutdown.cancelled() => break,
                received = hangups.recv() => if received.is_none() { break },
            }
            match state.reload() {
                Ok(n) => {
                tracing::info!(policy_files = n, "policies reloaded on SIGHUP");
                state.announce("policies".into(), "reloaded", serde_json::json!([])).await;
            }
                Err(error) => tracing::error!(%error, "policy reload refused; the previous policies stay in force"),
            }
        }
    });
}

async fn reload_policies(State(state): State<AppState>, caller: common::server::Caller) -> ApiResult<Json<serde_json::Value>> {
    match state.reload() {
        Ok(n_files) => {
            state.announce("policies".into(), "reloaded", serde_json::json!([])).await;
            // The operator on whose behalf the gateway asked, or the calling service.
            let actor = caller.principal.as_ref().map(|p| p.sub.clone()).unwrap_or_else(|| caller.client_id.clone());
            state
                .ctx
                .audit(&actor, "authz.policies_reloaded", "policies", "success", serde_json::json!({"files": n_files, "via": caller.client_id}))
                .await;
            Ok(Json(serde_json::json!({"reloaded": true, "policy_files": n_files})))
        }
        Err(error) => {
            tracing::error!(%error, "policy reload refused; the previous policies stay in force");
            Err(ApiError::bad_request("authz.invalid_policies", error.to_string()))
        }
    }
}

#[derive(Deserialize)]
struct BatchRequest {
    requests: Vec<DecisionRequest>,
}

/// Many decisions for one principal in one call (at most 1000), answered in order.
async fn decide_batch(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(batch): Json<BatchRequest>) -> ApiResult<Json<serde_json::Value>> {
    if batch.requests.len() > 1000 {
        return Err(ApiError::bad_request("authz.batch_too_large", "at most 1000 decisions per batch"));
    }
    let mut decisions = Vec::with_capacity(batch.requests.len());
    for request in batch.requests {
        let Json(decision) = decide(State(state.clone()), ActingUser(principal.clone()), Json(request)).await?;
        decisions.push(decision);
    }
    Ok(Json(serde_json::json!({"decisions": decisions})))
}

async fn require_user_admin(state: &AppState, principal: &Principal) -> ApiResult<()> {
    let outcome = state.decide_on_org(principal, "admin:manage_users", "Org", &principal.org).await?;
    if outcome.allowed {
        Ok(())
    } else {
        state.denials.record(&state.ctx, &principal.sub, &format!("org:{}", principal.org), serde_json::json!({"action": "admin:manage_users"})).await;
        Err(ApiError::forbidden("authz.denied", "only org owners and admins manage groups"))
    }
}

async fn list_groups(State(state): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<serde_json::Value>> {
    let groups = state.store.groups_in_org(&principal.org).await?;
    let groups: Vec<_> = groups.into_iter().map(|(id, name, members)| serde_json::json!({"id": id, "name": name, "members": members})).collect();
    Ok(Json(serde_json::json!(groups)))
}

async fn create_group(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(body): Json<NewCollection>) -> ApiResult<Json<serde_json::Value>> {
    require_user_admin(&state, &principal).await?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad_request("authz.invalid_name", "group names are 1 to 200 characters"));
    }
    let cap = state.ctx.config.authz.max_groups_per_org;
    let Some(id) = state.store.create_group(&principal.org, name, cap).await? else {
        return Err(ApiError::new(
            common::ErrorKind::Forbidden,
            "group.limit_reached",
            format!("the organisation already has {cap} groups, the most allowed (authz.max_groups_per_org)"),
        ));
    };
    state.announce(format!("group:{id}"), "created", serde_json::json!([])).await;
    state.ctx.audit(&principal.sub, "group.created", &format!("group:{id}"), "success", serde_json::json!({"name": name})).await;
    Ok(Json(serde_json::json!({"id": id, "name": name, "members": []})))
}

#[derive(Deserialize)]
struct GroupMembers {
    users: Vec<String>,
}

async fn set_group_members(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>, Json(body): Json<GroupMembers>) -> ApiResult<Json<serde_json::Value>> {
    require_user_admin(&state, &principal).await?;
    if state.store.group_org(&id).await?.as_deref() != Some(principal.org.as_str()) {
        return Err(ApiError::not_found("authz.group_not_found", "no such group"));
    }
    if body.users.len() > 10_000 {
        return Err(ApiError::bad_request("authz.too_many_members", "at most 10000 members per group"));
    }
    for user_id in &body.users {
        let path = format!("/internal/users/{}", common::client::encode(user_id));
        match state.ctx.peers.get_json::<UserSummary>(ServiceName::Identity, &path, None).await {
            Ok(user) if user.org == principal.org => {}
            Ok(_) | Err(ApiError { kind: common::ErrorKind::NotFound, .. }) => {
                return Err(ApiError::bad_request("authz.unknown_member", format!("no user `{user_id}` in this organisation")));
            }
            Err(error) => return Err(error),
        }
    }
    state.store.replace_group_members(&id, &body.users).await?;
    state.announce(format!("group:{id}"), "members", serde_json::json!(body.users)).await;
    state.ctx.audit(&principal.sub, "group.members_changed", &format!("group:{id}"), "success", serde_json::json!({"members": body.users.len()})).await;
    Ok(Json(serde_json::json!({"id": id, "members": body.users})))
}

async fn decide(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(request): Json<DecisionRequest>) -> ApiResult<Json<Decision>> {
    let decision = match request.resource_type.as_str() {
        "Collection" => {
            let classification = request.classification.as_deref();
            if classification.is_some_and(|c| !common::wire::is_classification(c)) {
                return Err(ApiError::bad_request("authz.invalid_classification", "classification is public, internal, confidential or restricted"));
            }
            match state.decide_one(&principal, &request.action, &request.resource_id, classification).await? {
                Some(outcome) if outcome.allowed => Decision { allowed: true, policies: outcome.policies },
                _ => Decision { allowed: false, policies: vec![] },
            }
        }
        "Org" | "System" => {
            let outcome = state.decide_on_org(&principal, &request.action, &request.resource_type, &request.resource_id).await?;
            Decision { allowed: outcome.allowed, policies: outcome.policies }
        }
        "Room" => match state.decide_on_room(&principal, &request.action, &request.resource_id).await? {
            Some(outcome) => Decision { allowed: outcome.allowed, policies: outcome.policies },
            None => Decision { allowed: false, policies: vec![] },
        },
        "User" => match state.decide_on_user(&principal, &request.action, &request.resource_id, request.new_role.as_deref()).await? {
            Some(outcome) => Decision { allowed: outcome.allowed, policies: outcome.policies },
            None => Decision { allowed: false, policies: vec![] },
        },
        other => return Err(ApiError::bad_request("authz.invalid_request", format!("unknown resource type `{other}`"))),
    };
    if !decision.allowed {
        state.denials.record(&state.ctx, &principal.sub, &format!("{}:{}", request.resource_type, request.resource_id), serde_json::json!({"action": request.action}))
            .await;
    }
    Ok(Json(decision))
}

#[derive(Deserialize)]
struct NewRoom {
    id: String,
}

/// Chat registers a room it created: the acting user becomes its owner.
async fn create_room(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(body): Json<NewRoom>) -> ApiResult<(axum::http::StatusCode, Json<serde_json::Value>)> {
    if uuid::Uuid::parse_str(&body.id).is_err() {
        return Err(ApiError::bad_request("authz.invalid_room", "room ids are UUIDs"));
    }
    if !state.store.create_room(&body.id, &principal.org, &principal.sub).await? {
        return Err(ApiError::conflict("authz.room_exists", "that room is already registered"));
    }
    state.announce(format!("room:{}", body.id), "created", serde_json::json!([{"type": "user", "id": principal.sub, "role": "owner"}])).await;
    state.ctx.audit(&principal.sub, "room.created", &format!("room:{}", body.id), "success", serde_json::json!({})).await;
    Ok((axum::http::StatusCode::CREATED, Json(serde_json::json!({"id": body.id, "members": [{"user": principal.sub, "role": "owner"}]}))))
}

/// The rooms of the caller's org the caller may read (every one evaluated: exact).
async fn list_rooms(State(state): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<serde_json::Value>> {
    let mut readable = Vec::new();
    for room in state.store.rooms_in_org(&principal.org).await? {
        if state.room_outcome(&principal, "room:read", &room)?.allowed {
            readable.push(room.id);
        }
    }
    Ok(Json(serde_json::json!({"rooms": readable})))
}

/// The room if the principal may read it (404 otherwise, as if it did not exist).
async fn readable_room(state: &AppState, principal: &Principal, id: &str) -> ApiResult<policy::RoomFacts> {
    let not_found = || ApiError::not_found("chat.room_not_found", "no such room");
    let room = state.store.room(id).await?.ok_or_else(not_found)?;
    if !state.room_outcome(principal, "room:read", &room)?.allowed {
        state.denials.record(&state.ctx, &principal.sub, &format!("room:{id}"), serde_json::json!({"action": "room:read"})).await;
        return Err(not_found());
    }
    Ok(room)
}

fn room_members_json(room: &policy::RoomFacts) -> serde_json::Value {
    let members: Vec<_> = room.members.iter().map(|(user, role)| serde_json::json!({"user": user, "role": role})).collect();
    serde_json::json!({"room": room.id, "members": members})
}

async fn room_members(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(room_members_json(&readable_room(&state, &principal, &id).await?)))
}

#[derive(Deserialize)]
struct RoomMember {
    user: String,
    role: String,
}

#[derive(Deserialize)]
struct RoomMembers {
    members: Vec<RoomMember>,
}

/// Replaces a room's people (its owners only); everyone named must be of the room's
/// org, and a room always keeps an owner.
async fn set_room_members(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>, Json(body): Json<RoomMembers>) -> ApiResult<Json<serde_json::Value>> {
    let room = readable_room(&state, &principal, &id).await?;
    if !state.room_outcome(&principal, "room:manage", &room)?.allowed {
        state.denials.record(&state.ctx, &principal.sub, &format!("room:{id}"), serde_json::json!({"action": "room:manage"})).await;
        return Err(ApiError::forbidden("authz.denied", "only the room's owners change who is in it"));
    }
    if body.members.len() > 1000 {
        return Err(ApiError::bad_request("authz.too_many_members", "at most 1000 people per room"));
    }
    if !body.members.iter().any(|m| m.role == "owner") {
        return Err(ApiError::bad_request("authz.room_needs_owner", "a room keeps at least one owner"));
    }
    let mut members = Vec::with_capacity(body.members.len());
    for member in &body.members {
        if !matches!(member.role.as_str(), "owner" | "member") {
            return Err(ApiError::bad_request("authz.invalid_role", "room roles are owner or member"));
        }
        let path = format!("/internal/users/{}", common::client::encode(&member.user));
        match state.ctx.peers.get_json::<UserSummary>(ServiceName::Identity, &path, None).await {
            Ok(user) if user.org == room.org => members.push((member.user.clone(), member.role.clone())),
            Ok(_) | Err(ApiError { kind: common::ErrorKind::NotFound, .. }) => {
                return Err(ApiError::bad_request("authz.unknown_member", format!("no user `{}` in this organisation", member.user)));
            }
            Err(error) => return Err(error),
        }
    }
    state.store.replace_room_members(&id, &members).await?;
    state.announce(format!("room:{id}"), "members", serde_json::json!(members.iter().map(|(u, r)| serde_json::json!({"type": "user", "id": u, "role": r})).collect::<Vec<_>>())).await;
    state.ctx.audit(&principal.sub, "room.members_changed", &format!("room:{id}"), "success", serde_json::json!({"members": members.len()})).await;
    let room = state.store.room(&id).await?.ok_or_else(|| ApiError::not_found("chat.room_not_found", "no such room"))?;
    Ok(Json(room_members_json(&room)))
}

#[derive(Deserialize)]
struct ReadableRequest {
    #[serde(default = "default_read_action")]
    action: String,
}

fn default_read_action() -> String {
    "document:read_chunks".into()
}

/// Every collection of the principal's org is evaluated (exact, whatever the policies
/// say); the answer is reused until a relationship or the policy set changes.
async fn readable(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(request): Json<ReadableRequest>) -> ApiResult<Json<ReadableCollections>> {
    state.store.ensure_personal(&principal.sub, &principal.username, &principal.org).await?;
    // Read both before evaluating: a change that lands meanwhile leaves an entry
    // tagged with the older version, which the next request will not use.
    let epoch = state.epoch().await?;
    let (policy_generation, version) = (epoch.policies, epoch.version);
    let key = format!("{}\u{1f}{}\u{1f}{}\u{1f}{}", principal.sub, principal.org, principal.roles.join(","), request.action);
    let cached = state.readable_cache.lock().ok().and_then(|cache| {
        cache.get(&key).filter(|c| c.version == version && c.policy_generation == policy_generation).map(|c| c.answer.clone())
    });
    if let Some(answer) = cached {
        metrics::counter!("echo_authz_readable_cache_hits_total").increment(1);
        return Ok(Json(answer.as_ref().clone()));
    }
    let candidates = state.store.collections_in_org(&principal.org).await?;
    let answer = if request.action.starts_with("document:") {
        // Per classification: a collection is listed when any may be read, and
        // restricted to those when not all may.
        let mut answer = ReadableCollections { collections: Vec::new(), restricted: Default::default(), epoch };
        for (id, classes) in state.classes_allowed(&principal, &request.action, &candidates).await? {
            if classes.is_empty() {
                continue;
            }
            if classes.len() < common::wire::CLASSIFICATIONS.len() {
                answer.restricted.insert(id.clone(), classes);
            }
            answer.collections.push(id);
        }
        answer
    } else {
        let allowed = state.evaluate(&principal, &request.action, &candidates).await?;
        ReadableCollections { collections: allowed.into_iter().map(|(row, _)| row.id).collect(), restricted: Default::default(), epoch }
    };
    let answer = Arc::new(answer);
    if let Ok(mut cache) = state.readable_cache.lock() {
        if cache.len() >= READABLE_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, CachedList { version, policy_generation, answer: answer.clone() });
    }
    Ok(Json(answer.as_ref().clone()))
}

/// Figures for `echod bench authz`, measured on the built-in policies without IO.
pub mod bench {
    use std::time::{Duration, Instant};

    use crate::policy::{CollectionFacts, Engine, Facts};

    pub struct InProcess {
        /// One `document:read_chunks` decision: entities for one collection built and evaluated.
        pub single: Vec<Duration>,
        /// Every collection of an org of `n` evaluated, as the readable list does.
        pub list: Vec<Duration>,
        pub n_readable: usize,
    }

    /// `n` collections owned by someone else, every tenth shared with the reader.
    fn collections(n: usize) -> Vec<CollectionFacts> {
        (0..n)
            .map(|i| CollectionFacts {
                id: format!("c{i}"),
                org: "bench".into(),
                owner: "owner".into(),
                personal: false,
                org_owned: false,
                shares: if i % 10 == 0 { vec![("user".into(), "reader".into(), "viewer".into())] } else { vec![] },
            })
            .collect()
    }

    pub fn in_process(n_collections: usize, iterations: usize, list_rounds: usize) -> Result<InProcess, String> {
        let engine = Engine::builtin().map_err(|e| e.to_string())?;
        let all = collections(n_collections.max(1));
        let roles = vec!["member".to_string()];
        let groups = vec!["g1".to_string()];
        let mut single = Vec::with_capacity(iterations);
        for i in 0..iterations {
            let one = std::slice::from_ref(&all[i % all.len()]);
            let started = Instant::now();
            let entities = engine.entities(&Facts { user_id: "reader", org: "bench", roles: &roles, groups: &groups, collections: one })?;
            let outcome = engine.decide("reader", "document:read_chunks", "Collection", &one[0].id, &entities)?;
            single.push(started.elapsed());
            std::hint::black_box(outcome.allowed);
        }
        let mut list = Vec::with_capacity(list_rounds);
        let mut n_readable = 0;
        for _ in 0..list_rounds {
            let started = Instant::now();
            let entities = engine.entities(&Facts { user_id: "reader", org: "bench", roles: &roles, groups: &groups, collections: &all })?;
            let mut readable = 0;
            for collection in &all {
                if engine.decide("reader", "document:read_chunks", "Collection", &collection.id, &entities)?.allowed {
                    readable += 1;
                }
            }
            list.push(started.elapsed());
            n_readable = readable;
        }
        Ok(InProcess { single, list, n_readable })
    }

    /// Adds `n` collections to `org` in authz's database (owned by `owner`, every tenth
    /// shared with `reader`), for the HTTP measurements against a running system.
    pub async fn seed(config: &common::EchoConfig, org: &str, owner: &str, reader: &str, n: usize) -> anyhow::Result<()> {
        let store = crate::store::open(config).await?;
        store.seed(org, owner, reader, n).await?;
        Ok(())
    }
}
