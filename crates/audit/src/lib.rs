//! audit — the append-only, hash-chained audit log.
//!
//! Consumes `echo.audit.recorded` from every service and appends each event exactly
//! once (deduplicated by event id, since the bus delivers at least once) to
//! `audit.db`, chained by SHA-256. Every `audit.checkpoint_every` records an Ed25519
//! signed checkpoint (count, head hash) is stored. No update or delete path exists,
//! and triggers refuse both. Public surface: `run`, `verify` (for `echod audit verify`).

mod chain;
mod export;

use std::path::Path as FsPath;
use std::sync::Arc;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use axum::extract::State;
use axum::routing::get;
use axum::{Router, middleware};
use base64::Engine;
use serde::Deserialize;
use sqlx::{Row, SqlitePool};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use common::error::{ApiResult, Json, Query};
use common::wire::{AuditEvent, events};
use common::{ApiError, EchoConfig, ServiceContext, ServiceName};

pub use chain::Verification;
pub use export::{FileVerification, verify_file};
use chain::{GENESIS, Record, record_hash};

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    event_id TEXT NOT NULL UNIQUE,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    outcome TEXT NOT NULL,
    context TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX records_actor ON records(actor, ts);
CREATE INDEX records_action ON records(action, ts);
CREATE TRIGGER records_no_update BEFORE UPDATE ON records BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY,
    head_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    public_key TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"#, r#"
ALTER TABLE records ADD COLUMN org TEXT;
CREATE INDEX records_org ON records(org, seq);
"#];

#[derive(Clone)]
struct AppState {
    pool: SqlitePool,
    append: Arc<Mutex<()>>,
    signer: Arc<Ed25519KeyPair>,
    checkpoint_every: i64,
    /// Where actors' orgs are looked up (identity); `None` in unit tests.
    ctx: Option<ServiceContext>,
    /// actor → org, learned from identity (a user's org never changes).
    orgs: Arc<Mutex<std::collections::HashMap<String, Option<String>>>>,
}

async fn open(config: &EchoConfig) -> Result<SqlitePool, sqlx::Error> {
    let pool = common::db::open_migrated(&config.db_path(ServiceName::Audit), MIGRATIONS).await?;
    Ok(pool)
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

/// Runs the audit service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let pool = open(&ctx.config).await?;
    let signer = load_signer(&ctx.config.data_dir.join("keys").join("audit-checkpoint.pk8"))?;
    let state = AppState {
        pool: pool.clone(),
        append: Arc::new(Mutex::new(())),
        signer: Arc::new(signer),
        checkpoint_every: ctx.config.audit.checkpoint_every.max(1),
        ctx: Some(ctx.clone()),
        orgs: Arc::default(),
    };
    let consumer_ready = common::server::ReadyFlag::default();
    spawn_consumer(&ctx, state.clone(), consumer_ready.clone());
    let ready = common::server::sqlite_ready(pool.clone(), vec![("the audit subscription", consumer_ready)]);
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

async fn append(state: &AppState, event_id: &str, event: &AuditEvent, org: Option<&str>) -> Result<(), sqlx::Error> {
    let _guard = state.append.lock().await;
    let mut tx = common::db::begin_write(&state.pool).await?;
    let exists: Option<i64> = sqlx::query_scalar("SELECT seq FROM records WHERE event_id = ?").bind(event_id).fetch_optional(&mut *tx).await?;
    if exists.is_some() {
        return Ok(());
    }
    let head: Option<(i64, String)> = sqlx::query_as("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetch_optional(&mut *tx).await?;
    let (prev_seq, prev_hash) = head.unwrap_or((0, GENESIS.to_string()));
    let mut record = Record {
        seq: prev_seq + 1,
        ts: common::now_unix(),
        event_id: event_id.to_string(),
        actor: event.actor.chars().take(256).collect(),
        action: event.action.chars().take(128).collect(),
        resource: event.resource.chars().take(512).collect(),
        outcome: event.outcome.chars().take(32).collect(),
        context: serde_json::to_string(&event.context).unwrap_or_else(|_| "{}".into()),
        prev_hash: prev_hash.clone(),
        hash: String::new(),
    };
    record.hash = record_hash(&prev_hash, &record);
    // `org` decides visibility; it is not part of the chained evidence (records written
    // before it existed have none), and the append-only triggers protect it as well.
    sqlx::query("INSERT INTO records (seq, ts, event_id, actor, action, resource, outcome, context, prev_hash, hash, org) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        .bind(record.seq)
        .bind(record.ts)
        .bind(&record.event_id)
        .bind(&record.actor)
        .bind(&record.action)
        .bind(&record.resource)
        .bind(&record.outcome)
        .bind(&record.context)
        .bind(&record.prev_hash)
        .bind(&record.hash)
        .bind(org)
        .execute(&mut *tx)
        .await?;
    if record.seq % state.checkpoint_every == 0 {
        let message = format!("{}:{}", record.seq, record.hash);
        let signature = state.signer.sign(message.as_bytes());
        let b64 = base64::engine::general_purpose::STANDARD;
        sqlx::query("INSERT INTO checkpoints (seq, head_hash, signature, public_key, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(record.seq)
            .bind(&record.hash)
            .bind(b64.encode(signature.as_ref()))
            .bind(b64.encode(state.signer.public_key().as_ref()))
            .bind(common::now_unix())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    metrics::counter!("echo_audit_records_total").increment(1);
    Ok(())
}

fn record_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Record, sqlx::Error> {
    Ok(Record {
        seq: r.try_get("seq")?,
        ts: r.try_get("ts")?,
        event_id: r.try_get("event_id")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        resource: r.try_get("resource")?,
        outcome: r.try_get("outcome")?,
        context: r.try_get("context")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

async fn verify_pool(pool: &SqlitePool) -> Result<Verification, sqlx::Error> {
    let rows = sqlx::query("SELECT * FROM records ORDER BY rowid").fetch_all(pool).await?;
    let records = rows.iter().map(record_from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(chain::verify(records))
}

/// Verifies the chain in the data dir (for `echod audit verify`).
pub async fn verify(config: &EchoConfig) -> anyhow::Result<Verification> {
    let pool = open(config).await?;
    Ok(verify_pool(&pool).await?)
}

/// Writes the whole log as JSON Lines — every record in chain order, the signed
/// checkpoints, then a head signed now with the checkpoint key (for `echod audit
/// export`). Returns how many records were written.
pub async fn export(config: &EchoConfig, out: &mut dyn std::io::Write) -> anyhow::Result<usize> {
    let pool = open(config).await?;
    let signer = load_signer(&config.data_dir.join("keys").join("audit-checkpoint.pk8"))?;
    let rows = sqlx::query("SELECT * FROM records ORDER BY seq").fetch_all(&pool).await?;
    let records = rows.iter().map(|r| Ok((record_from_row(r)?, r.try_get::<Option<String>, _>("org")?))).collect::<Result<Vec<_>, sqlx::Error>>()?;
    let rows = sqlx::query("SELECT * FROM checkpoints ORDER BY seq").fetch_all(&pool).await?;
    let checkpoints = rows
        .iter()
        .map(|r| {
            Ok(export::Signed {
                seq: r.try_get("seq")?,
                head_hash: r.try_get("head_hash")?,
                signature: r.try_get("signature")?,
                public_key: r.try_get("public_key")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    export::write(out, &records, &checkpoints, &signer, common::now_unix())?;
    Ok(records.len())
}

async fn verify_endpoint(State(state): State<AppState>) -> ApiResult<Json<Verification>> {
    Ok(Json(verify_pool(&state.pool).await?))
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
    let rows = sqlx::query(
        "SELECT * FROM records WHERE ts >= ? AND (? IS NULL OR actor = ?) AND (? IS NULL OR action = ?) AND (? IS NULL OR resource = ?)
           AND (? IS NULL OR org = ?)
         ORDER BY seq DESC LIMIT ?",
    )
    .bind(since)
    .bind(&params.actor)
    .bind(&params.actor)
    .bind(&params.action)
    .bind(&params.action)
    .bind(&params.resource)
    .bind(&params.resource)
    .bind(&params.org)
    .bind(&params.org)
    .bind(params.limit.unwrap_or(200).clamp(1, 1000))
    .fetch_all(&state.pool)
    .await?;
    let records = rows
        .iter()
        .map(|r| {
            let record = record_from_row(r)?;
            Ok(serde_json::json!({
                "seq": record.seq,
                "time": common::rfc3339(record.ts),
                "actor": record.actor,
                "action": record.action,
                "resource": record.resource,
                "outcome": record.outcome,
                "org": r.try_get::<Option<String>, _>("org")?,
                "context": serde_json::from_str::<serde_json::Value>(&record.context).unwrap_or_default(),
                "hash": record.hash,
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(serde_json::json!({"records": records})))
}

async fn checkpoints(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let rows = sqlx::query("SELECT * FROM checkpoints ORDER BY seq DESC LIMIT 100").fetch_all(&state.pool).await?;
    let list = rows
        .iter()
        .map(|r| {
            Ok(serde_json::json!({
                "seq": r.try_get::<i64, _>("seq")?,
                "head_hash": r.try_get::<String, _>("head_hash")?,
                "signature": r.try_get::<String, _>("signature")?,
                "public_key": r.try_get::<String, _>("public_key")?,
                "created_at": common::rfc3339(r.try_get("created_at")?),
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(serde_json::json!({"checkpoints": list})))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    async fn state() -> (tempfile::TempDir, AppState) {
        let dir = tempfile::tempdir().unwrap();
        let config = EchoConfig::for_test(dir.path());
        let pool = open(&config).await.unwrap();
        let signer = load_signer(&dir.path().join("keys/k.pk8")).unwrap();
        (dir, AppState { pool, append: Arc::new(Mutex::new(())), signer: Arc::new(signer), checkpoint_every: 2, ctx: None, orgs: Arc::default() })
    }

    fn event(action: &str) -> AuditEvent {
        AuditEvent { actor: "ann".into(), action: action.into(), resource: "document:1".into(), outcome: "success".into(), context: serde_json::json!({"b": 1, "a": 2}) }
    }

    #[tokio::test]
    async fn records_carry_their_org_and_the_org_column_is_append_only_too() {
        let (_dir, state) = state().await;
        let with_org = AuditEvent { context: serde_json::json!({"org": "acme"}), ..event("identity.user_created") };
        let org = org_of(&state, &with_org).await.unwrap();
        assert_eq!(org.as_deref(), Some("acme"), "the emitter's org context is used when the actor is not a user");
        assert_eq!(org_of(&state, &event("rag.asked")).await.unwrap(), None, "no org: operators only");
        append(&state, "o1", &with_org, org.as_deref()).await.unwrap();
        let stored: Option<String> = sqlx::query_scalar("SELECT org FROM records WHERE event_id = 'o1'").fetch_one(&state.pool).await.unwrap();
        assert_eq!(stored.as_deref(), Some("acme"));
        assert!(sqlx::query("UPDATE records SET org = 'globex'").execute(&state.pool).await.is_err());
    }

    #[tokio::test]
    async fn appends_chain_deduplicate_and_verify() {
        let (_dir, state) = state().await;
        append(&state, "e1", &event("document.uploaded"), None).await.unwrap();
        append(&state, "e2", &event("rag.asked"), None).await.unwrap();
        append(&state, "e2", &event("rag.asked"), None).await.unwrap();
        let verification = verify_pool(&state.pool).await.unwrap();
        assert!(verification.ok);
        assert_eq!(verification.n_records, 2);
        let n_checkpoints: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM checkpoints").fetch_one(&state.pool).await.unwrap();
        assert_eq!(n_checkpoints, 1);
    }

    #[tokio::test]
    async fn the_database_refuses_updates_and_tampering_is_detected() {
        let (_dir, state) = state().await;
        for i in 0..3 {
            append(&state, &format!("e{i}"), &event("document.uploaded"), None).await.unwrap();
        }
        let refused = sqlx::query("UPDATE records SET actor = 'mallory' WHERE seq = 2").execute(&state.pool).await;
        assert!(refused.is_err(), "append-only trigger must refuse updates");
        assert!(sqlx::query("DELETE FROM records WHERE seq = 2").execute(&state.pool).await.is_err());
        // An attacker with file access drops the trigger first; verification still catches it.
        sqlx::query("DROP TRIGGER records_no_update").execute(&state.pool).await.unwrap();
        sqlx::query("UPDATE records SET actor = 'mallory' WHERE seq = 2").execute(&state.pool).await.unwrap();
        let verification = verify_pool(&state.pool).await.unwrap();
        assert!(!verification.ok);
        assert_eq!(verification.first_bad, Some(2));
    }
}
