//! audit — the append-only, hash-chained audit log.
//!
//! Consumes `echo.audit.recorded` from every service and appends each event exactly
//! once (deduplicated by event id, since the bus delivers at least once) to
//! the store (`store`: `audit.db`, or PostgreSQL schema `audit` with `audit.database_url`
//! / `database.url`), chained by SHA-256. Every `audit.checkpoint_every` records an
//! Ed25519 signed checkpoint (count, head hash) is stored. No update or delete path
//! exists, and triggers refuse both on either backend. Public surface: `run`, `verify`
//! and `export` (for `echod audit verify|export`), `verify_file`.

mod chain;
mod export;
mod store;

use std::path::Path as FsPath;
use std::sync::Arc;

use aws_lc_rs::signature::Ed25519KeyPair;
use axum::extract::State;
use axum::routing::get;
use axum::{Router, middleware};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use common::error::{ApiResult, Json, Query};
use common::wire::{AuditEvent, events};
use common::{ApiError, EchoConfig, ServiceContext, ServiceName};

pub use chain::Verification;
pub use export::{FileVerification, verify_file};
use store::{AuditStore, NewRecord};

#[derive(Clone)]
struct AppState {
    store: Arc<dyn AuditStore>,
    signer: Arc<Ed25519KeyPair>,
    checkpoint_every: i64,
    /// Where actors' orgs are looked up (identity); `None` in unit tests.
    ctx: Option<ServiceContext>,
    /// actor → org, learned from identity (a user's org never changes).
    orgs: Arc<Mutex<std::collections::HashMap<String, Option<String>>>>,
}

fn load_signer(path: &FsPath) -> anyhow::Result<Ed25519KeyPair> {
    let pkcs8 = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(_) => {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let document = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("cannot generate the checkpoint key"))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, document.as_ref())?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            document.as_ref().to_vec()
        }
    };
    Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| anyhow::anyhow!("the checkpoint key at {} is unreadable", path.display()))
}

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the audit service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let store = store::open(&ctx.config).await?;
    let signer = load_signer(&ctx.config.data_dir.join("keys").join("audit-checkpoint.pk8"))?;
    let state = AppState {
        store: store.clone(),
        signer: Arc::new(signer),
        checkpoint_every: ctx.config.audit.checkpoint_every.max(1),
        ctx: Some(ctx.clone()),
        orgs: Arc::default(),
    };
    let consumer_ready = common::server::ReadyFlag::default();
    spawn_consumer(&ctx, state.clone(), consumer_ready.clone());
    let ready: common::server::ReadyCheck = Arc::new(move || {
        let (store, consumer_ready) = (store.clone(), consumer_ready.clone());
        Box::pin(async move {
            store.ready().await?;
            if consumer_ready.is_set() { Ok(()) } else { Err("the audit subscription is not declared yet".into()) }
        })
    });
    let routes = Router::new()
        .route("/v1/audit", get(query))
        .route("/v1/audit/verify", get(verify_endpoint))
        .route("/v1/audit/checkpoints", get(checkpoints))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

fn spawn_consumer(ctx: &ServiceContext, state: AppState, ready: common::server::ReadyFlag) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let spec = common::bus::SubscriptionSpec { topic: events::AUDIT_RECORDED.into(), max_deliveries: Some(20), lease_ms: Some(30_000), ordered: None };
        if !ctx.bus.declare("audit", &spec, &ctx.shutdown).await {
            return;
        }
        ready.set();
        ctx.bus.spawn_consumer("audit", 1, ctx.shutdown.clone(), move |event, _| {
            let state = state.clone();
            async move {
                let audit: AuditEvent = event.data_as().map_err(|e| format!("bad audit event: {e}"))?;
                // Identity unreachable: retried later rather than stored without its org.
                let org = org_of(&state, &audit).await.map_err(|e| format!("org of the actor unknown for now: {e}"))?;
                append(&state, &event.id, &audit, org.as_deref()).await.map_err(|e| e.to_string())
            }
        });
    });
}

/// The org a record belongs to, which decides which org admins may read it: the
/// acting user's org, else an `org` the emitting service put in the context. Records
/// of services, the CLI and unknown actors (a mistyped username) have none: only
/// operators see them.
async fn org_of(state: &AppState, event: &AuditEvent) -> Result<Option<String>, ApiError> {
    let from_context = event.context.get("org").and_then(|v| v.as_str()).map(str::to_string);
    let looks_like_user = uuid::Uuid::parse_str(&event.actor).is_ok();
    let Some(ctx) = state.ctx.as_ref().filter(|_| looks_like_user) else { return Ok(from_context) };
    if let Some(known) = state.orgs.lock().await.get(&event.actor) {
        return Ok(known.clone().or(from_context));
    }
    let path = format!("/internal/users/{}", event.actor);
    let org = match ctx.peers.get_json::<common::wire::UserSummary>(ServiceName::Identity, &path, None).await {
        Ok(user) => Some(user.org),
        Err(error) if error.kind == common::error::ErrorKind::NotFound => None,
        Err(error) => return Err(error),
    };
    let mut cache = state.orgs.lock().await;
    if cache.len() > 100_000 {
        cache.clear();
    }
    cache.insert(event.actor.clone(), org.clone());
    Ok(org.or(from_context))
}

async fn append(state: &AppState, event_id: &str, event: &AuditEvent, org: Option<&str>) -> Result<(), store::StoreError> {
    let record = NewRecord {
        event_id: event_id.to_string(),
        ts: common::now_unix(),
        actor: event.actor.chars().take(256).collect(),
        action: event.action.chars().take(128).collect(),
        resource: event.resource.chars().take(512).collect(),
        outcome: event.outcome.chars().take(32).collect(),
        context: serde_json::to_string(&event.context).unwrap_or_else(|_| "{}".into()),
        // `org` decides visibility; it is not part of the chained evidence (records
        // written before it existed have none), and the append-only triggers protect it.
        org: org.map(str::to_string),
    };
    let every = state.checkpoint_every;
    let signer = state.signer.clone();
    let checkpoint = move |record: &chain::Record| (record.seq % every == 0).then(|| export::Signed::sign(&signer, record.seq, &record.hash, common::now_unix()));
    if state.store.append(&record, &checkpoint).await? {
        metrics::counter!("echo_audit_records_total").increment(1);
    }
    Ok(())
}

async fn verify_store(store: &dyn AuditStore) -> Result<Verification, store::StoreError> {
    Ok(chain::verify(store.chain().await?.into_iter().map(|(record, _)| record)))
}

/// Verifies the chain in the data dir (for `echod audit verify`).
pub async fn verify(config: &EchoConfig) -> anyhow::Result<Verification> {
    let store = store::open(config).await?;
    Ok(verify_store(store.as_ref()).await?)
}

/// Writes the whole log as JSON Lines — every record in chain order, the signed
/// checkpoints, then a head signed now with the checkpoint key (for `echod audit
/// export`). Returns how many records were written.
pub async fn export(config: &EchoConfig, out: &mut dyn std::io::Write) -> anyhow::Result<usize> {
    let store = store::open(config).await?;
    let signer = load_signer(&config.data_dir.join("keys").join("audit-checkpoint.pk8"))?;
    let records = store.chain().await?;
    let checkpoints = store.checkpoints(None).await?;
    export::write(out, &records, &checkpoints, &signer, common::now_unix())?;
    Ok(records.len())
}

async fn verify_endpoint(State(state): State<AppState>) -> ApiResult<Json<Verification>> {
    Ok(Json(verify_store(state.store.as_ref()).await.map_err(ApiError::internal)?))
}

#[derive(Deserialize)]
struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    resource: Option<String>,
    /// Unix seconds or RFC 3339.
    since: Option<String>,
    limit: Option<i64>,
    /// Only this org's records. Forced to the acting user's org unless an operator.
    org: Option<String>,
}

async fn query(
    State(state): State<AppState>,
    caller: common::server::Caller,
    Query(mut params): Query<AuditQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    if let Some(principal) = caller.principal.as_ref().filter(|p| !p.is_operator()) {
        params.org = Some(principal.org.clone());
    }
    let since = match params.since.as_deref() {
        None => 0,
        Some(s) => s.parse::<i64>().or_else(|_| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map(|t| t.unix_timestamp())
                .map_err(|_| ApiError::bad_request("audit.invalid_since", "since is Unix seconds or an RFC 3339 time"))
        })?,
    };
    let filter = store::Filter {
        since,
        actor: params.actor,
        action: params.action,
        resource: params.resource,
        org: params.org,
        limit: params.limit.unwrap_or(200).clamp(1, 1000),
    };
    let records: Vec<serde_json::Value> = state
        .store
        .query(&filter)
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|(record, org)| {
            serde_json::json!({
                "seq": record.seq,
                "time": common::rfc3339(record.ts),
                "actor": record.actor,
                "action": record.action,
                "resource": record.resource,
                "outcome": record.outcome,
                "org": org,
                "context": serde_json::from_str::<serde_json::Value>(&record.context).unwrap_or_default(),
                "hash": record.hash,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({"records": records})))
}

async fn checkpoints(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let mut list: Vec<serde_json::Value> = state
        .store
        .checkpoints(Some(100))
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|c| serde_json::json!({"seq": c.seq, "head_hash": c.head_hash, "signature": c.signature, "public_key": c.public_key, "created_at": common::rfc3339(c.created_at)}))
        .collect();
    // Newest first, as before.
    list.reverse();
    Ok(Json(serde_json::json!({"checkpoints": list})))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use aws_lc_rs::signature::KeyPair;
    use base64::Engine;

    use super::*;

    async fn state() -> (tempfile::TempDir, AppState) {
        let dir = tempfile::tempdir().unwrap();
        let config = EchoConfig::for_test(dir.path());
        let store = store::open(&config).await.unwrap();
        let signer = load_signer(&dir.path().join("keys/k.pk8")).unwrap();
        (dir, AppState { store, signer: Arc::new(signer), checkpoint_every: 2, ctx: None, orgs: Arc::default() })
    }

    fn event(action: &str) -> AuditEvent {
        AuditEvent { actor: "ann".into(), action: action.into(), resource: "document:1".into(), outcome: "success".into(), context: serde_json::json!({"b": 1, "a": 2}) }
    }

    #[tokio::test]
    async fn records_carry_their_org() {
        let (_dir, state) = state().await;
        let with_org = AuditEvent { context: serde_json::json!({"org": "acme"}), ..event("identity.user_created") };
        let org = org_of(&state, &with_org).await.unwrap();
        assert_eq!(org.as_deref(), Some("acme"), "the emitter's org context is used when the actor is not a user");
        assert_eq!(org_of(&state, &event("rag.asked")).await.unwrap(), None, "no org: operators only");
        append(&state, "o1", &with_org, org.as_deref()).await.unwrap();
        assert_eq!(state.store.chain().await.unwrap()[0].1.as_deref(), Some("acme"));
    }

    #[tokio::test]
    async fn appends_chain_deduplicate_sign_checkpoints_and_verify() {
        let (_dir, state) = state().await;
        append(&state, "e1", &event("document.uploaded"), None).await.unwrap();
        append(&state, "e2", &event("rag.asked"), None).await.unwrap();
        append(&state, "e2", &event("rag.asked"), None).await.unwrap();
        let verification = verify_store(state.store.as_ref()).await.unwrap();
        assert!(verification.ok);
        assert_eq!(verification.n_records, 2);
        let checkpoints = state.store.checkpoints(None).await.unwrap();
        assert_eq!(checkpoints.len(), 1);
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(checkpoints[0].public_key, b64.encode(state.signer.public_key().as_ref()), "signed with the checkpoint key");
    }
}
