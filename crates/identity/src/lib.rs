//! identity — Echo's OpenID Connect provider.
//!
//! Users, orgs, clients, signing keys, sessions and tokens live in `identity.db`.
//! Public surface: `run` (the HTTP service), `bootstrap` (first-run set-up used by
//! `echod up`), and the operator functions behind `echod user …` / `echod client …`,
//! which work on the database directly whether or not the service runs.
//! Invariants: bearer secrets are stored hashed; redirect URIs match exactly; public
//! clients must use PKCE S256; codes are single-use and live at most 60 s.

mod error;
mod http;
mod kek;
mod keys;
mod mailer;
mod password;
mod service;
mod store;

use std::sync::Arc;

use tokio::net::TcpListener;

use common::config::WEB_CLIENT_ID;
use common::{EchoConfig, ServiceContext, ServiceName};

pub use error::IdentityError;
pub use common::wire::UserSummary;

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the identity service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let identity = service::Identity::new(ctx.config.clone(), Some(ctx.clone())).await?;
    spawn_key_reload(identity.clone(), ctx.shutdown.clone());
    let ready: common::server::ReadyCheck = {
        let store = identity.store.clone();
        std::sync::Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.ready().await })
        })
    };
    let router = common::server::service_router(&ctx, http::router(identity, ctx.clone()), ready)
        .fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

/// Picks up rotations made by other processes, drops keys past their publication, and
/// relays audit events the CLI recorded.
fn spawn_key_reload(identity: service::Identity, shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
            if let Err(error) = identity.reload_keys().await {
                tracing::warn!(%error, "could not reload signing keys");
            }
            if let Err(error) = identity.relay_queued_audits().await {
                tracing::debug!(%error, "audit outbox not relayed yet");
            }
            if let Err(error) = identity.relay_events().await {
                tracing::debug!(%error, "event outbox not relayed yet");
            }
            if let Err(error) = identity.store.prune_expired_tokens().await {
                tracing::debug!(%error, "expired tokens not pruned yet");
            }
        }
    });
}

/// `echod keys rotate`: publishes a new signing key of every algorithm now; they sign
/// after `lead_secs`. Returns the new key ids.
pub async fn rotate_keys(config: &EchoConfig, lead_secs: i64) -> Result<Vec<String>, IdentityError> {
    let identity = service::Identity::new(Arc::new(config.clone()), None).await?;
    identity.rotate_keys(lead_secs, "cli").await
}

/// For `echod bench identity`: `n` argon2id verifications at Echo's parameters (OWASP:
/// m = 19 MiB, t = 2, p = 1) timed one by one on the calling thread.
pub fn time_password_verifications(n: usize) -> Vec<std::time::Duration> {
    password::time_verifications(n)
}

/// What the first run created.
#[derive(Debug, Default)]
pub struct Bootstrap {
    /// The admin's one-time password, when the admin was created by this call.
    pub admin_password: Option<String>,
}

/// Prepares identity's data: signing keys, service clients (secrets under
/// `data_dir/secrets`, mode 0600), the web client for the gateway, and on a new data
/// dir an `admin` user — owner of org `default` and the installation's operator — with
/// a random password.
pub async fn bootstrap(config: &EchoConfig) -> Result<Bootstrap, IdentityError> {
    let identity = service::Identity::new(Arc::new(config.clone()), None).await?;
    std::fs::create_dir_all(config.secrets_dir()).map_err(|e| IdentityError::Internal(e.to_string()))?;
    restrict_permissions(&config.secrets_dir(), 0o700);
    for service in ServiceName::ALL {
        let path = config.service_secret_path(service);
        let secret = match std::fs::read_to_string(&path) {
            Ok(secret) if !secret.trim().is_empty() => secret.trim().to_string(),
            _ => {
                let secret = common::rand::token(32);
                let _ = std::fs::remove_file(&path);
                common::files::write_new_secret(&path, secret.as_bytes()).map_err(|e| IdentityError::Internal(format!("{}: {e}", path.display())))?;
                secret
            }
        };
        identity.register_client(&service.client_id(), vec![], Some(&secret), "service", "RS256", false).await?;
    }
    let callback = format!("{}/auth/callback", config.public_url());
    let mut uris = identity.store.client(WEB_CLIENT_ID).await?.map(|c| c.redirect_uris).unwrap_or_default();
    if !uris.contains(&callback) {
        uris.push(callback);
    }
    let signed_out = format!("{}/signed-out", config.public_url());
    if !uris.contains(&signed_out) {
        uris.push(signed_out);
    }
    identity.register_client(WEB_CLIENT_ID, uris, None, "public", "RS256", false).await?;
    let mut report = Bootstrap::default();
    if identity.store.count_users().await? == 0 {
        let password = common::rand::token(15);
        let admin = identity
            .create_user(service::NewUser {
                username: "admin".into(),
                password: password.clone(),
                org: "default".into(),
                role: "owner".into(),
                email: None,
                // Printed once on the console: the first sign-in must replace it.
                temporary: true,
            })
            .await?;
        // The person who installs Echo runs it: the first admin is also its operator
        // (audited like every grant; `echod user operator admin --revoke` takes it back).
        let roles = vec!["owner".to_string(), common::wire::OPERATOR_ROLE.to_string()];
        identity.store.set_roles(&admin.id, &roles).await?;
        identity.audit("bootstrap", "identity.operator_granted", &format!("user:{}", admin.id), "success", serde_json::json!({"username": "admin"})).await;
        report.admin_password = Some(password);
    }
    Ok(report)
}

fn restrict_permissions(path: &std::path::Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    }
}

/// `echod user add`.
pub async fn add_user(
    config: &EchoConfig,
    username: &str,
    password: &str,
    org: &str,
    role: &str,
    email: Option<String>,
) -> Result<UserSummary, IdentityError> {
    let identity = service::Identity::new(Arc::new(config.clone()), None).await?;
    let user = identity
        .create_user(service::NewUser {
            username: username.to_string(),
            password: password.to_string(),
            org: org.to_string(),
            role: role.to_string(),
            email,
            temporary: false,
        })
        .await?;
    Ok(user.summary())
}

/// `echod user list`.
pub async fn list_users(config: &EchoConfig) -> Result<Vec<UserSummary>, IdentityError> {
    let identity = service::Identity::new(Arc::new(config.clone()), None).await?;
    Ok(identity.store.all_users().await?.iter().map(|u| u.summary()).collect())
}

/// `echod user passwd`.
pub async fn set_password(config: &EchoConfig, username: &str, password: &str) -> Result<(), IdentityError> {
    let identity = service::Identity::new(Arc::new(config.clone()), None).await?;
    let user = identity.store.user_by_username(username).await?.ok_or(IdentityError::NotFound)?;
    let hash = password::hash(password.to_string()).await.map_err(|e| IdentityError::BadRequest(e.to_string()))?;
    identity.store.set_password(&user.id, &hash).await?;
    // As after any password change: sessions and tokens end (announced by the running
    // identity's relay when the bus is not reachable from here).
    identity.end_everything_of(&user.id, "password_changed", None).await?;
    identity.audit("cli", "identity.password_changed", &format!("user:{}", user.id), "success", serde_json::json!({"via": "cli"})).await;
    Ok(())
}

/// `echod user operator USER --grant|--revoke`: the one role that reaches across
/// orgs (key rotation, policy reload, every org's audit and logs). Only this command
/// grants it; it is audited, and takes effect with the user's next token.
pub async fn set_operator(config: &EchoConfig, username: &str, grant: bool) -> Result<UserSummary, IdentityError> {
    let identity = service::Identity::new(Arc::new(config.clone()), None).await?;
    let user = identity.store.user_by_username(username).await?.ok_or(IdentityError::NotFound)?;
    let mut roles: Vec<String> = user.roles.iter().filter(|r| r.as_str() != common::wire::OPERATOR_ROLE).cloned().collect();
    if grant {
        roles.push(common::wire::OPERATOR_ROLE.to_string());
    }
    identity.store.set_roles(&user.id, &roles).await?;
    let action = if grant { "identity.operator_granted" } else { "identity.operator_revoked" };
    identity.audit("cli", action, &format!("user:{}", user.id), "success", serde_json::json!({"username": user.username})).await;
    let user = identity.store.user_by_id(&user.id).await?.ok_or(IdentityError::NotFound)?;
    Ok(user.summary())
}

/// `echod user disable`: also revokes the user's refresh tokens and sessions, and
/// (through identity's outbox, relayed by the running service) their access tokens
/// and browser sessions at the gateway.
pub async fn disable_user(config: &EchoConfig, username: &str) -> Result<(), IdentityError> {
    let identity = service::Identity::new(Arc::new(config.clone()), None).await?;
    let user = identity.store.user_by_username(username).await?.ok_or(IdentityError::NotFound)?;
    identity.store.set_disabled(&user.id, true).await?;
    identity.end_everything_of(&user.id, "disabled", None).await?;
    identity.audit("cli", "identity.user_disabled", &format!("user:{}", user.id), "success", serde_json::json!({"via": "cli"})).await;
    Ok(())
}

/// `echod client add`: a public client (PKCE) or a confidential one with a secret,
/// whose tokens are signed with `signing_alg` (`RS256`, `ES256` or `EdDSA`).
pub async fn add_client(
    config: &EchoConfig,
    client_id: &str,
    redirect_uris: Vec<String>,
    secret: Option<&str>,
    signing_alg: &str,
) -> Result<(), IdentityError> {
    register_client(config, NewClient { client_id, redirect_uris, secret, signing_alg, consent: false }).await
}

/// A client to register (`echod client add`).
pub struct NewClient<'a> {
    pub client_id: &'a str,
    /// Exact URIs; `http://127.0.0.1/…`, `http://[::1]/…` and `http://localhost/…` also
    /// match on any port (RFC 8252 loopback redirects for native and CLI apps).
    pub redirect_uris: Vec<String>,
    /// `None`: a public client (PKCE required).
    pub secret: Option<&'a str>,
    pub signing_alg: &'a str,
    /// Ask each user once whether the client may act for them (`--consent`).
    pub consent: bool,
}

pub async fn register_client(config: &EchoConfig, new: NewClient<'_>) -> Result<(), IdentityError> {
    let NewClient { client_id, redirect_uris, secret, signing_alg, consent } = new;
    if redirect_uris.is_empty() {
        return Err(IdentityError::BadRequest("at least one --redirect-uri is required".into()));
    }
    if client_id.starts_with("svc-") || client_id == WEB_CLIENT_ID {
        return Err(IdentityError::BadRequest(format!("client id `{client_id}` is reserved for Echo itself")));
    }
    let identity = service::Identity::new(Arc::new(config.clone()), None).await?;
    let kind = if secret.is_some() { "confidential" } else { "public" };
    identity.register_client(client_id, redirect_uris, secret, kind, signing_alg, consent).await
}
