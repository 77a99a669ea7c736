//! Identity's business functions: validating authorization requests, minting and
//! verifying tokens, users and clients. No axum types here; handlers in `http` call these.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, Header};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::RwLock;

use common::config::API_AUDIENCE;
use common::{EchoConfig, ServiceContext, ServiceName, now_unix};

use crate::error::IdentityError;
use crate::kek::KeyEncryptionKey;
use crate::keys::{self, SigningKey};
use crate::password;
use crate::store::{AuthCode, Client, IdentityStore, RefreshToken, User};

#[derive(Clone)]
pub(crate) struct Identity {
    pub(crate) store: Arc<dyn IdentityStore>,
    pub(crate) keys: Arc<RwLock<Vec<SigningKey>>>,
    pub(crate) config: Arc<EchoConfig>,
    pub(crate) issuer: String,
    pub(crate) form_key: Arc<aws_lc_rs::hmac::Key>,
    /// Seals and opens the private signing keys stored in `identity.db`.
    pub(crate) kek: Arc<KeyEncryptionKey>,
    pub(crate) mailer: crate::mailer::Mailer,
    pub(crate) ctx: Option<ServiceContext>,
}

/// The parameters of `/authorize`, as received (and re-posted by the login form).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct AuthorizeParams {
    #[serde(default)]
    pub(crate) response_type: String,
    #[serde(default)]
    pub(crate) client_id: String,
    #[serde(default)]
    pub(crate) redirect_uri: String,
    #[serde(default)]
    pub(crate) scope: String,
    #[serde(default)]
    pub(crate) state: Option<String>,
    #[serde(default)]
    pub(crate) nonce: Option<String>,
    #[serde(default)]
    pub(crate) code_challenge: Option<String>,
    #[serde(default)]
    pub(crate) code_challenge_method: Option<String>,
    #[serde(default)]
    pub(crate) prompt: Option<String>,
    /// Accepted as a number or a string: the login form re-posts it inside a flattened
    /// form, where every value arrives as a string.
    #[serde(default, deserialize_with = "max_age_from_any", skip_serializing_if = "Option::is_none")]
    pub(crate) max_age: Option<i64>,
    /// Request objects (JAR) are not supported: present, they are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) request_uri: Option<String>,
}

impl AuthorizeParams {
    /// The `prompt` values asked for.
    pub(crate) fn prompts(&self) -> Vec<&str> {
        self.prompt.as_deref().unwrap_or_default().split_whitespace().collect()
    }

    pub(crate) fn prompts_for(&self, value: &str) -> bool {
        self.prompts().contains(&value)
    }
}

fn max_age_from_any<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(i64),
        Text(String),
    }
    match Option::<NumberOrText>::deserialize(deserializer)? {
        None => Ok(None),
        Some(NumberOrText::Number(n)) => Ok(Some(n)),
        Some(NumberOrText::Text(text)) if text.is_empty() => Ok(None),
        Some(NumberOrText::Text(text)) => text.parse().map(Some).map_err(|_| serde::de::Error::custom("max_age must be a whole number of seconds")),
    }
}

/// Why an authorization request fails: shown on our own page when the client or
/// redirect URI cannot be trusted, otherwise sent back to the client.
#[derive(Debug)]
pub(crate) enum AuthorizeFailure {
    Page(String),
    Redirect { redirect_uri: String, error: &'static str, description: String, state: Option<String> },
}

/// The scopes identity knows; any other asked for is ignored (Core §3.1.2.1).
pub(crate) const SCOPES: [&str; 7] = ["openid", "profile", "email", "offline_access", "echo", "echo:read", "echo:ask"];

/// What a scope lets a client do, in the words of the consent page.
pub(crate) fn describe_scope(scope: &str) -> &'static str {
    match scope {
        "openid" => "Know who you are (your Echo user id)",
        "profile" => "See your username, name, organisation and roles",
        "email" => "See your email address",
        "offline_access" => "Keep access while you are away (refresh tokens)",
        "echo" => "Act for you in Echo: read, upload, share and delete your documents and ask questions",
        "echo:read" => "Read your documents and ask questions about them, without changing anything",
        "echo:ask" => "Ask questions about your documents",
        _ => "",
    }
}

/// The known scopes of `requested`, in order, once each: what is granted.
pub(crate) fn granted_scope(requested: &str) -> String {
    let mut granted: Vec<&str> = Vec::new();
    for scope in requested.split_whitespace() {
        if SCOPES.contains(&scope) && !granted.contains(&scope) {
            granted.push(scope);
        }
    }
    granted.join(" ")
}

fn has_scope(scope: &str, wanted: &str) -> bool {
    scope.split_whitespace().any(|s| s == wanted)
}

/// Whether `requested` is a redirect URI registered for `client`: exactly, or, for a
/// registered loopback URI (`http://127.0.0.1/…`, `http://[::1]/…`, `http://localhost/…`),
/// the same URI on any port (RFC 8252 §7.3: native apps listen on a port of their own).
pub(crate) fn redirect_registered(client: &Client, requested: &str) -> bool {
    if requested.is_empty() {
        return false;
    }
    if client.redirect_uris.iter().any(|uri| uri == requested) {
        return true;
    }
    let Ok(wanted) = url::Url::parse(requested) else { return false };
    let loopback = |url: &url::Url| url.scheme() == "http" && matches!(url.host_str(), Some("127.0.0.1" | "[::1]" | "localhost"));
    if !loopback(&wanted) || wanted.username() != "" || wanted.password().is_some() || wanted.fragment().is_some() {
        return false;
    }
    client.redirect_uris.iter().filter_map(|uri| url::Url::parse(uri).ok()).any(|registered| {
        loopback(&registered) && registered.host_str() == wanted.host_str() && registered.path() == wanted.path() && registered.query() == wanted.query()
    })
}

impl Identity {
    pub(crate) async fn new(config: Arc<EchoConfig>, ctx: Option<ServiceContext>) -> Result<Identity, IdentityError> {
        let store = crate::store::open(&config).await.map_err(|e| IdentityError::Internal(format!("{e:#}")))?;
        let mailer = crate::mailer::Mailer::from_config(&config).map_err(IdentityError::BadRequest)?;
        // A new key-encryption key only for a database that has sealed nothing yet.
        let kek = KeyEncryptionKey::load(&config, !store.has_sealed_keys().await?)?;
        let form_key = kek.derive("echo identity login form v1");
        let identity = Identity {
            store,
            keys: Arc::new(RwLock::new(Vec::new())),
            issuer: config.issuer(),
            config,
            form_key: Arc::new(aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &form_key)),
            kek: Arc::new(kek),
            mailer,
            ctx,
        };
        identity.ensure_keys().await?;
        Ok(identity)
    }

    /// Loads the published keys, generating the first key of each algorithm on a new
    /// data dir (and, on an older one, of an algorithm added since). Keys stored in
    /// clear by an older Echo are sealed here, once.
    async fn ensure_keys(&self) -> Result<(), IdentityError> {
        let stored = self.store.all_keys_der().await?;
        for (kid, der) in &stored {
            if !KeyEncryptionKey::is_sealed(der) {
                self.store.replace_key_der(kid, &self.kek.seal(kid, der)?).await?;
                tracing::warn!(%kid, "a signing key was stored unencrypted by an older Echo and is now sealed; if identity.db was ever readable by others, run `echod keys rotate`");
            }
        }
        let published = self.store.published_keys().await?;
        for alg in keys::SIGNING_ALGS {
            if !published.iter().any(|k| k.alg == keys::alg_name(alg)) {
                let new = generate_key(alg).await?;
                let sealed = self.kek.seal(&new.kid, &new.pkcs8)?;
                self.store.insert_key(&new_stored(&new, &sealed, 0), None).await?;
            }
        }
        self.store.forget_setting("form_key").await?;
        self.reload_keys().await
    }

    /// Re-reads the keys (a rotation may come from `echod keys rotate` in another process).
    pub(crate) async fn reload_keys(&self) -> Result<(), IdentityError> {
        let mut loaded = Vec::new();
        for k in self.store.published_keys().await? {
            let der = self.kek.open(&k.kid, &k.der)?;
            loaded.push(keys::load(k.kid, &k.alg, &der, k.n, k.e, k.public_jwk.as_deref(), k.activate_at)?);
        }
        *self.keys.write().await = loaded;
        Ok(())
    }

    /// Publishes a new key of every algorithm now, each starting to sign after
    /// `lead_secs`; the keys signing until then stay published until every token they
    /// signed has expired. Returns the new key ids.
    pub(crate) async fn rotate_keys(&self, lead_secs: i64, actor: &str) -> Result<Vec<String>, IdentityError> {
        let activate_at = now_unix() + lead_secs.max(0);
        let identity = &self.config.identity;
        let longest = identity.access_token_ttl_secs.max(identity.id_token_ttl_secs).max(identity.service_token_ttl_secs);
        // The verifiers' clock leeway (30 s) is added so no token outlives its key.
        let publish_until = activate_at + longest + 60;
        let mut kids = Vec::new();
        for alg in keys::SIGNING_ALGS {
            let new = generate_key(alg).await?;
            let sealed = self.kek.seal(&new.kid, &new.pkcs8)?;
            self.store.insert_key(&new_stored(&new, &sealed, activate_at), Some(publish_until)).await?;
            kids.push(new.kid);
        }
        self.audit(
            actor,
            "identity.key_rotated",
            &format!("key:{}", kids.join(",")),
            "success",
            serde_json::json!({"activate_at": activate_at, "kids": kids}),
        )
        .await;
        self.reload_keys().await?;
        Ok(kids)
    }

    /// Signs `claims` with the current key of `alg`; `typ` is `at+jwt` for access
    /// tokens (RFC 9068) and `JWT` for ID tokens.
    async fn sign<T: Serialize>(&self, claims: &T, alg: Algorithm, typ: &str) -> Result<String, IdentityError> {
        let keys = self.keys.read().await;
        let key = keys::signing_key(&keys, alg, now_unix()).ok_or_else(|| IdentityError::Internal(format!("no {alg:?} signing key")))?;
        let mut header = Header::new(alg);
        header.kid = Some(key.kid.clone());
        header.typ = Some(typ.into());
        jsonwebtoken::encode(&header, claims, &key.encoding).map_err(|e| IdentityError::Internal(e.to_string()))
    }

    /// Records an audit event: published at once by the running service, or kept in
    /// identity's audit outbox when there is no bus (the CLI) for the service to relay.
    pub(crate) async fn audit(&self, actor: &str, action: &str, resource: &str, outcome: &str, context: serde_json::Value) {
        match self.ctx.clone() {
            Some(ctx) => {
                let (actor, action, resource, outcome) = (actor.to_string(), action.to_string(), resource.to_string(), outcome.to_string());
                tokio::spawn(common::trace::in_current(async move { ctx.audit(&actor, &action, &resource, &outcome, context).await }));
            }
            None => {
                let event = common::wire::AuditEvent {
                    actor: actor.to_string(),
                    action: action.to_string(),
                    resource: resource.to_string(),
                    outcome: outcome.to_string(),
                    context,
                };
                if let Err(error) = self.store.queue_audit(&event).await {
                    tracing::error!(%error, %action, "audit event could not be kept");
                }
            }
        }
    }

    /// Publishes the audit events the CLI left in the outbox.
    pub(crate) async fn relay_queued_audits(&self) -> Result<usize, IdentityError> {
        let Some(ctx) = &self.ctx else { return Ok(0) };
        let queued = self.store.queued_audits().await?;
        for (id, audit) in &queued {
            let event = ctx.bus.event(common::wire::events::AUDIT_RECORDED, Some(audit.resource.clone()), audit);
            let key = Some(format!("identity-audit-{id}"));
            ctx.bus
                .publish(vec![common::bus::PublishMessage { event, key, ordering_key: None, delay_ms: None }])
                .await
                .map_err(|e| IdentityError::Internal(e.to_string()))?;
            self.store.drop_queued_audit(*id).await?;
        }
        Ok(queued.len())
    }

    /// Announces a user lifecycle change (`echo.user.*`) to the other services.
    pub(crate) async fn publish_user_event(&self, type_: &str, user: &User) {
        let Some(ctx) = &self.ctx else { return };
        let event = ctx.bus.event(type_, Some(format!("user:{}", user.id)), user.summary());
        if let Err(error) = ctx.bus.publish_one(event).await {
            tracing::error!(%error, event = type_, "user event not published");
        }
    }

    /// Refuses `tokens` from now on, here and (through `echo.token.revoked`) at every
    /// verifier, optionally ending the browser sessions of a user. The refusal and its
    /// announcement are stored together; the announcement is published at once when
    /// the bus answers, else by the relay within seconds.
    pub(crate) async fn revoke_and_announce(
        &self,
        reason: &str,
        tokens: Vec<(String, i64)>,
        end_sessions_of: Option<&str>,
        keep_session: Option<String>,
    ) -> Result<(), IdentityError> {
        if tokens.is_empty() && end_sessions_of.is_none() {
            return Ok(());
        }
        let event = common::wire::TokensRevoked {
            reason: reason.to_string(),
            tokens: tokens.iter().map(|(jti, exp)| common::wire::RevokedToken { jti: jti.clone(), exp: *exp }).collect(),
            end_sessions_of: end_sessions_of.map(str::to_string),
            keep_session,
        };
        self.store.revoke_tokens(&tokens, &event).await?;
        if let Err(error) = self.relay_events().await {
            tracing::warn!(%error, "revocation stored; it will be announced when the bus answers");
        }
        Ok(())
    }

    /// After a password change or reset: every identity session and refresh token of
    /// the user ends, their access tokens are refused everywhere, and their browser
    /// sessions at the gateway end (but `keep_session`, the one that made the change).
    pub(crate) async fn end_everything_of(&self, user_id: &str, reason: &str, keep_session: Option<String>) -> Result<(), IdentityError> {
        self.store.end_user_sessions(user_id).await?;
        let tokens = self.store.live_tokens_of_user(user_id).await?;
        self.revoke_and_announce(reason, tokens, Some(user_id), keep_session).await
    }

    /// Publishes the events waiting in identity's outbox, oldest first.
    pub(crate) async fn relay_events(&self) -> Result<usize, IdentityError> {
        let Some(ctx) = &self.ctx else { return Ok(0) };
        let queued = self.store.queued_events().await?;
        for (id, type_, subject, data) in &queued {
            let event = ctx.bus.event(type_, subject.clone(), data);
            let key = Some(format!("identity-event-{id}"));
            ctx.bus
                .publish(vec![common::bus::PublishMessage { event, key, ordering_key: None, delay_ms: None }])
                .await
                .map_err(|e| IdentityError::Internal(e.to_string()))?;
            self.store.drop_queued_event(*id).await?;
        }
        Ok(queued.len())
    }

    /// Refuses a change that would leave the org of `user_id` without an active
    /// owner: disabling its last owner (`new_role` `None`) or giving them another role.
    pub(crate) async fn keep_an_owner(&self, user_id: &str, new_role: Option<&str>) -> Result<(), IdentityError> {
        let Some(user) = self.store.user_by_id(user_id).await? else { return Err(IdentityError::NotFound) };
        let is_owner = user.roles.iter().any(|r| r == "owner") && !user.disabled;
        if !is_owner || new_role == Some("owner") {
            return Ok(());
        }
        let owners = self.store.users_in_org(&user.org).await?.iter().filter(|u| !u.disabled && u.roles.iter().any(|r| r == "owner")).count();
        if owners <= 1 {
            return Err(IdentityError::Conflict(format!("{} is the last owner of {}; make someone else an owner first", user.username, user.org)));
        }
        Ok(())
    }

    /// Gives `user_id` the org role `role` (the operator role, if held, is kept), then
    /// ends the account's sessions and tokens so that no token carries the old role.
    pub(crate) async fn set_org_role(&self, user_id: &str, role: &str) -> Result<User, IdentityError> {
        if !matches!(role, "owner" | "admin" | "member" | "viewer") {
            return Err(IdentityError::BadRequest("role must be owner, admin, member or viewer".into()));
        }
        self.keep_an_owner(user_id, Some(role)).await?;
        let user = self.store.user_by_id(user_id).await?.ok_or(IdentityError::NotFound)?;
        let mut roles = vec![role.to_string()];
        if user.roles.iter().any(|r| r == common::wire::OPERATOR_ROLE) {
            roles.push(common::wire::OPERATOR_ROLE.to_string());
        }
        self.store.set_roles(user_id, &roles).await?;
        self.end_everything_of(user_id, "role_changed", None).await?;
        self.store.user_by_id(user_id).await?.ok_or(IdentityError::NotFound)
    }

    // ---- password reset ----

    /// Sends a single-use reset link (valid one hour) when the user exists and has an
    /// email address. Says nothing either way, so the answer cannot enumerate users.
    pub(crate) async fn request_reset(&self, username: &str) -> Result<(), IdentityError> {
        let Some(user) = self.store.user_by_username(username.trim()).await?.filter(|u| !u.disabled) else { return Ok(()) };
        let Some(email) = user.email.clone() else { return Ok(()) };
        let token = common::rand::token(32);
        self.store.insert_reset(&common::rand::sha256_hex(token.as_bytes()), &user.id, now_unix() + 3600).await?;
        let link = format!("{}/reset?token={token}", self.issuer);
        let body = format!(
            "Someone asked to reset the Echo password of {}.\n\nTo choose a new password, open this link within an hour:\n\n{link}\n\nIf it was not you, ignore this message.\n",
            user.username
        );
        // Delivered in the background: the answer takes the same time whether or not
        // the user exists, however slow the mail server is.
        let mailer = self.mailer.clone();
        tokio::spawn(async move {
            if let Err(error) = mailer.send(&email, "Reset your Echo password", &body).await {
                tracing::error!(%error, "password reset mail could not be sent or kept");
            }
        });
        self.audit(&user.id, "identity.password_reset_requested", &format!("user:{}", user.id), "success", serde_json::json!({})).await;
        Ok(())
    }

    pub(crate) async fn reset_password(&self, token: &str, new_password: String) -> Result<(), IdentityError> {
        password::check_policy(&new_password).map_err(|e| IdentityError::BadRequest(e.to_string()))?;
        let user_id = self
            .store
            .take_reset(&common::rand::sha256_hex(token.as_bytes()))
            .await?
            .ok_or_else(|| IdentityError::BadRequest("this reset link is invalid, expired or already used".into()))?;
        let hash = password::hash(new_password).await.map_err(|e| IdentityError::BadRequest(e.to_string()))?;
        self.store.set_password(&user_id, &hash).await?;
        self.end_everything_of(&user_id, "password_reset", None).await?;
        if let Some(user) = self.store.user_by_id(&user_id).await? {
            self.store.clear_failures(&format!("user:{}", user.username.to_lowercase())).await?;
        }
        self.audit(&user_id, "identity.password_reset", &format!("user:{user_id}"), "success", serde_json::json!({})).await;
        Ok(())
    }

    // ---- authorization requests ----

    pub(crate) async fn validate_authorize(&self, params: &AuthorizeParams) -> Result<Client, AuthorizeFailure> {
        let client = match self.store.client(&params.client_id).await {
            Ok(Some(client)) if client.kind != "service" => client,
            Ok(_) => return Err(AuthorizeFailure::Page("unknown client".into())),
            Err(_) => return Err(AuthorizeFailure::Page("the identity service is unavailable".into())),
        };
        if !redirect_registered(&client, &params.redirect_uri) {
            return Err(AuthorizeFailure::Page("the redirect URI is not registered for this client".into()));
        }
        let redirect = |error: &'static str, description: &str| AuthorizeFailure::Redirect {
            redirect_uri: params.redirect_uri.clone(),
            error,
            description: description.to_string(),
            state: params.state.clone(),
        };
        if params.request.is_some() {
            return Err(redirect("request_not_supported", "request objects are not supported; send the parameters themselves"));
        }
        if params.request_uri.is_some() {
            return Err(redirect("request_uri_not_supported", "request_uri is not supported; send the parameters themselves"));
        }
        if params.response_type != "code" {
            return Err(redirect("unsupported_response_type", "only response_type=code is supported"));
        }
        let prompts = params.prompts();
        if prompts.contains(&"none") && prompts.len() > 1 {
            return Err(redirect("invalid_request", "prompt=none cannot be combined with other prompt values"));
        }
        match (params.code_challenge.as_deref(), params.code_challenge_method.as_deref()) {
            (Some(challenge), Some("S256")) if (43..=128).contains(&challenge.len()) => {}
            (Some(_), Some("S256")) => return Err(redirect("invalid_request", "code_challenge must be 43 to 128 characters")),
            (Some(_), _) => return Err(redirect("invalid_request", "code_challenge_method must be S256")),
            (None, _) if client.kind == "public" => {
                return Err(redirect("invalid_request", "public clients must use PKCE (S256)"));
            }
            (None, _) => {}
        }
        if params.state.as_ref().is_some_and(|s| s.len() > 1024) || params.nonce.as_ref().is_some_and(|n| n.len() > 1024) {
            return Err(redirect("invalid_request", "state and nonce must be at most 1024 characters"));
        }
        Ok(client)
    }

    /// A signed, expiring token binding the login form to the authorization request.
    pub(crate) fn form_token(&self, params: &AuthorizeParams, expires_at: i64) -> String {
        let payload = format!("{}|{}", expires_at, serde_json::to_string(params).unwrap_or_default());
        let tag = aws_lc_rs::hmac::sign(&self.form_key, payload.as_bytes());
        format!("{expires_at}.{}", hex::encode(tag.as_ref()))
    }

    /// A signed, expiring token that lets the sign-in of `user_id` (whose password was
    /// just checked) continue on the "choose a new password" page of this request.
    pub(crate) fn change_token(&self, user_id: &str, params: &AuthorizeParams, expires_at: i64) -> String {
        let payload = format!("password-change|{user_id}|{expires_at}|{}", serde_json::to_string(params).unwrap_or_default());
        let tag = aws_lc_rs::hmac::sign(&self.form_key, payload.as_bytes());
        format!("{user_id}.{expires_at}.{}", hex::encode(tag.as_ref()))
    }

    /// The user a change token is for, while it is valid for this request.
    pub(crate) fn check_change_token(&self, params: &AuthorizeParams, token: &str) -> Option<String> {
        let mut parts = token.splitn(3, '.');
        let (user_id, expires, _) = (parts.next()?, parts.next()?, parts.next()?);
        let expires_at: i64 = expires.parse().ok()?;
        let fresh = expires_at > now_unix() && common::rand::constant_time_eq(self.change_token(user_id, params, expires_at).as_bytes(), token.as_bytes());
        fresh.then(|| user_id.to_string())
    }

    /// The first sign-in with a given password replaces it: the new one is set, the
    /// given one stops working, and every other session and token of the account ends.
    pub(crate) async fn replace_given_password(&self, user: &User, new_password: String) -> Result<(), IdentityError> {
        if password::verify(new_password.clone(), Some(user.password_hash.clone())).await {
            return Err(IdentityError::BadRequest("choose a password different from the one you were given".into()));
        }
        let hash = password::hash(new_password).await.map_err(|e| IdentityError::BadRequest(e.to_string()))?;
        self.store.set_password(&user.id, &hash).await?;
        self.end_everything_of(&user.id, "password_changed", None).await?;
        self.audit(&user.id, "identity.password_changed", &format!("user:{}", user.id), "success", serde_json::json!({"first_sign_in": true})).await;
        Ok(())
    }

    /// Whether `origin` (`scheme://host[:port]`) is the origin of a redirect URI
    /// registered for a client people sign in to; loopback ones match on any port.
    pub(crate) async fn origin_registered(&self, origin: &str) -> bool {
        let Ok(asked) = url::Url::parse(origin) else { return false };
        let loopback = |url: &url::Url| url.scheme() == "http" && matches!(url.host_str(), Some("127.0.0.1" | "[::1]" | "localhost"));
        let uris = self.store.browser_redirect_uris().await.unwrap_or_default();
        uris.iter().filter_map(|uri| url::Url::parse(uri).ok()).any(|registered| {
            registered.origin() == asked.origin() || (loopback(&registered) && loopback(&asked) && registered.host_str() == asked.host_str())
        })
    }

    /// Whether `user` must be asked before `client` gets `params.scope` for them.
    pub(crate) async fn needs_consent(&self, client: &Client, user: &User, params: &AuthorizeParams) -> Result<bool, IdentityError> {
        if !client.consent_required {
            return Ok(false);
        }
        if params.prompts_for("consent") {
            return Ok(true);
        }
        let wanted = granted_scope(&params.scope);
        let given = self.store.consent(&user.id, &client.client_id).await?.unwrap_or_default();
        Ok(wanted.split_whitespace().any(|scope| !has_scope(&given, scope)))
    }

    /// A signed, expiring token letting `user_id` (signed in at `auth_time`) answer
    /// the consent page of this request.
    pub(crate) fn consent_token(&self, user_id: &str, auth_time: i64, params: &AuthorizeParams, expires_at: i64) -> String {
        let payload = format!("consent|{user_id}|{auth_time}|{expires_at}|{}", serde_json::to_string(params).unwrap_or_default());
        let tag = aws_lc_rs::hmac::sign(&self.form_key, payload.as_bytes());
        format!("{user_id}.{auth_time}.{expires_at}.{}", hex::encode(tag.as_ref()))
    }

    /// (user id, auth time) of a valid consent token for this request.
    pub(crate) fn check_consent_token(&self, params: &AuthorizeParams, token: &str) -> Option<(String, i64)> {
        let mut parts = token.splitn(4, '.');
        let (user_id, auth_time, expires, _) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let (auth_time, expires_at): (i64, i64) = (auth_time.parse().ok()?, expires.parse().ok()?);
        let valid = expires_at > now_unix() && common::rand::constant_time_eq(self.consent_token(user_id, auth_time, params, expires_at).as_bytes(), token.as_bytes());
        valid.then(|| (user_id.to_string(), auth_time))
    }

    /// Withdraws a consent: the client's refresh tokens for the user end and its
    /// access tokens are refused everywhere. `false` when there was none.
    pub(crate) async fn withdraw_consent(&self, user_id: &str, client_id: &str) -> Result<bool, IdentityError> {
        let Some(tokens) = self.store.withdraw_consent(user_id, client_id).await? else { return Ok(false) };
        self.revoke_and_announce("consent_withdrawn", tokens, None, None).await?;
        self.audit(user_id, "identity.consent_withdrawn", &format!("client:{client_id}"), "success", serde_json::json!({})).await;
        Ok(true)
    }

    /// A token binding the logout confirmation form to the identity session it ends.
    pub(crate) fn logout_token(&self, session_hash: &str, expires_at: i64) -> String {
        let tag = aws_lc_rs::hmac::sign(&self.form_key, format!("logout|{session_hash}|{expires_at}").as_bytes());
        format!("{expires_at}.{}", hex::encode(tag.as_ref()))
    }

    pub(crate) fn check_logout_token(&self, session_hash: &str, token: &str) -> bool {
        let Some((expires, _)) = token.split_once('.') else { return false };
        let Ok(expires_at) = expires.parse::<i64>() else { return false };
        expires_at > now_unix() && common::rand::constant_time_eq(self.logout_token(session_hash, expires_at).as_bytes(), token.as_bytes())
    }

    /// An `id_token_hint`: an ID token we signed (expired ones too, as RP-initiated
    /// logout allows), with its subject and audience; `None` for anything else.
    pub(crate) async fn id_token_hint(&self, token: &str) -> Option<IdTokenHint> {
        if token.len() > 16 * 1024 {
            return None;
        }
        let header = jsonwebtoken::decode_header(token).ok()?;
        let keys = self.keys.read().await;
        let key = keys.iter().find(|k| Some(&k.kid) == header.kid.as_ref())?;
        if header.alg != key.alg {
            return None;
        }
        let mut validation = jsonwebtoken::Validation::new(key.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.validate_aud = false;
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["iss", "sub", "aud"]);
        let claims = jsonwebtoken::decode::<IdTokenHint>(token, &key.decoding().ok()?, &validation).ok()?.claims;
        // Access tokens are not ID tokens: they carry the API's audience and a scope.
        (claims.aud != API_AUDIENCE && claims.scope.is_none()).then_some(claims)
    }

    pub(crate) fn check_form_token(&self, params: &AuthorizeParams, token: &str) -> bool {
        let Some((expires, _)) = token.split_once('.') else { return false };
        let Ok(expires_at) = expires.parse::<i64>() else { return false };
        expires_at > now_unix() && common::rand::constant_time_eq(self.form_token(params, expires_at).as_bytes(), token.as_bytes())
    }

    pub(crate) async fn issue_code(&self, params: &AuthorizeParams, user: &User, auth_time: i64) -> Result<String, IdentityError> {
        let code = common::rand::token(32);
        let record = AuthCode {
            client_id: params.client_id.clone(),
            redirect_uri: params.redirect_uri.clone(),
            user_id: user.id.clone(),
            scope: granted_scope(&params.scope),
            nonce: params.nonce.clone(),
            code_challenge: params.code_challenge.clone(),
            auth_time,
            expires_at: now_unix() + self.config.identity.code_ttl_secs,
        };
        self.store.insert_code(&common::rand::sha256_hex(code.as_bytes()), &record).await?;
        Ok(code)
    }

    // ---- sign-in ----

    /// How a sign-in attempt for `username` from `ip` is slowed down (see `Throttle`).
    ///
    /// The model (OWASP's "account lockout" guidance: slow guessing down, never let a
    /// stranger lock the owner out): failures are counted per (account, address), per
    /// address and per account. The first two are hard limits — five free failures for
    /// an account from one address, fifty from one address over all accounts, then a
    /// doubling wait up to 15 minutes — so a guesser at one address is stopped without
    /// touching anyone else. The per-account count is only a backstop against guessing
    /// spread over many addresses: past twenty failures each attempt on the account is
    /// held for a doubling delay of at most three seconds, and then judged on its merits,
    /// so the owner's correct password from their own address still gets through.
    pub(crate) async fn throttled_for(&self, username: &str, ip: &str) -> Result<Throttle, IdentityError> {
        // Milliseconds, so a delay never ends early by crossing a second boundary.
        let now_ms = common::now_unix_ms();
        let account = username.trim().to_lowercase();
        let mut wait_ms = 0;
        for (key, free) in [(format!("userip:{account}|{ip}"), FREE_PER_ACCOUNT_AND_IP), (format!("ip:{ip}"), FREE_PER_IP)] {
            let (failures, last_at_ms) = self.store.failures(&key).await?;
            if let Some(delay) = throttle_delay(failures, free) {
                wait_ms = wait_ms.max(last_at_ms + delay * 1000 - now_ms);
            }
        }
        let (account_failures, _) = self.store.failures(&format!("user:{account}")).await?;
        let hold_ms = throttle_delay(account_failures, FREE_PER_ACCOUNT).map(|d| (d * 1000).min(MAX_ACCOUNT_HOLD_MS)).unwrap_or(0);
        // Whole seconds for Retry-After, rounded up.
        Ok(Throttle { retry_after_secs: if wait_ms > 0 { (wait_ms + 999) / 1000 } else { 0 }, hold_ms })
    }

    pub(crate) async fn record_login_outcome(&self, username: &str, ip: &str, succeeded: bool) -> Result<(), IdentityError> {
        let account = username.trim().to_lowercase();
        if succeeded {
            for key in failure_keys_cleared_by_success(&account, ip) {
                self.store.clear_failures(&key).await?;
            }
        } else {
            let now_ms = common::now_unix_ms();
            for key in [format!("userip:{account}|{ip}"), format!("ip:{ip}"), format!("user:{account}")] {
                self.store.record_failure(&key, now_ms, FORGET_FAILURES_AFTER * 1000).await?;
            }
        }
        Ok(())
    }

    /// Open sign-up (only when `identity.open_signup` is on): a new `member` of
    /// `identity.signup_org`. Each address may create `FREE_SIGNUPS_PER_IP` accounts an
    /// hour before it must wait, growing as sign-ins do.
    pub(crate) async fn sign_up(&self, username: &str, email: Option<String>, password: String, ip: &str) -> Result<User, IdentityError> {
        if !self.config.identity.open_signup {
            return Err(IdentityError::NotFound);
        }
        let key = format!("signup:{ip}");
        let (count, last_at_ms) = self.store.failures(&key).await?;
        if let Some(delay) = throttle_delay(count, FREE_SIGNUPS_PER_IP) {
            let wait_ms = last_at_ms + delay * 1000 - common::now_unix_ms();
            if wait_ms > 0 {
                return Err(IdentityError::Throttled((wait_ms + 999) / 1000));
            }
        }
        let email = email.map(|e| e.trim().to_string()).filter(|e| !e.is_empty());
        if let Some(email) = &email {
            let plausible = email.len() <= 254 && email.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
            if !plausible || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(IdentityError::BadRequest("enter a valid email address, or leave it empty".into()));
            }
        }
        password::check_policy(&password).map_err(|e| IdentityError::BadRequest(e.to_string()))?;
        let user = self
            .create_user(NewUser {
                username: username.to_string(),
                password,
                org: self.config.identity.signup_org.clone(),
                role: "member".into(),
                email,
                temporary: false,
            })
            .await?;
        self.store.record_failure(&key, common::now_unix_ms(), FORGET_FAILURES_AFTER * 1000).await?;
        self.audit(&user.id, "identity.signed_up", &format!("user:{}", user.id), "success", serde_json::json!({"org": user.org})).await;
        Ok(user)
    }

    /// Checks credentials; unknown users and wrong passwords cost the same.
    pub(crate) async fn authenticate(&self, username: &str, password: &str) -> Result<User, IdentityError> {
        if username.len() > 256 || password.len() > 1024 {
            return Err(IdentityError::InvalidCredentials);
        }
        let user = self.store.user_by_username(username.trim()).await?;
        let ok = password::verify(password.to_string(), user.as_ref().map(|u| u.password_hash.clone())).await;
        match user {
            Some(user) if ok && !user.disabled => Ok(user),
            _ => Err(IdentityError::InvalidCredentials),
        }
    }

    /// After a correct password: forgets the account's failures and stores the new
    /// identity session and the authorization code together. Returns (session id,
    /// session lifetime in seconds, code).
    pub(crate) async fn complete_login(&self, user: &User, username: &str, ip: &str, params: &AuthorizeParams) -> Result<(String, i64, String), IdentityError> {
        let now = now_unix();
        let (session_id, code) = (common::rand::token(32), common::rand::token(32));
        let ttl = self.config.identity.session_ttl_hours * 3600;
        let record = AuthCode {
            client_id: params.client_id.clone(),
            redirect_uri: params.redirect_uri.clone(),
            user_id: user.id.clone(),
            scope: granted_scope(&params.scope),
            nonce: params.nonce.clone(),
            code_challenge: params.code_challenge.clone(),
            auth_time: now,
            expires_at: now + self.config.identity.code_ttl_secs,
        };
        self.store
            .complete_login(
                &failure_keys_cleared_by_success(&username.trim().to_lowercase(), ip),
                &common::rand::sha256_hex(session_id.as_bytes()),
                &common::rand::sha256_hex(code.as_bytes()),
                &record,
                now + ttl,
            )
            .await?;
        Ok((session_id, ttl, code))
    }

    pub(crate) async fn start_session(&self, user: &User) -> Result<(String, i64), IdentityError> {
        let id = common::rand::token(32);
        let now = now_unix();
        let ttl = self.config.identity.session_ttl_hours * 3600;
        self.store.insert_session(&common::rand::sha256_hex(id.as_bytes()), &user.id, now, now + ttl).await?;
        Ok((id, ttl))
    }

    pub(crate) async fn session_user(&self, session_id: &str) -> Result<Option<(User, i64)>, IdentityError> {
        let Some((user_id, auth_time)) = self.store.session(&common::rand::sha256_hex(session_id.as_bytes())).await? else {
            return Ok(None);
        };
        Ok(self.store.user_by_id(&user_id).await?.filter(|u| !u.disabled).map(|u| (u, auth_time)))
    }

    // ---- tokens ----

    /// Authenticates a client at the token endpoint. Public clients present only their id.
    pub(crate) async fn authenticate_client(&self, client_id: &str, secret: Option<&str>) -> Result<Client, IdentityError> {
        let client = self.store.client(client_id).await?.ok_or(IdentityError::InvalidClient)?;
        match (&client.secret_hash, secret) {
            (None, None) if client.kind == "public" => Ok(client),
            (Some(hash), Some(secret)) => {
                let presented = common::rand::sha256_hex(secret.as_bytes());
                if common::rand::constant_time_eq(presented.as_bytes(), hash.as_bytes()) {
                    Ok(client)
                } else {
                    Err(IdentityError::InvalidClient)
                }
            }
            _ => Err(IdentityError::InvalidClient),
        }
    }

    pub(crate) async fn exchange_code(
        &self,
        client: &Client,
        code: &str,
        redirect_uri: &str,
        code_verifier: Option<&str>,
    ) -> Result<TokenResponse, IdentityError> {
        let code_hash = common::rand::sha256_hex(code.as_bytes());
        let Some(record) = self.store.take_code(&code_hash).await? else {
            // A replayed code may mean it leaked: revoke what it was exchanged for.
            if let Some((user_id, family, jti, exp)) = self.store.spent_code(&code_hash).await? {
                let mut tokens = Vec::new();
                if let Some(family) = family {
                    self.store.revoke_family(&family).await?;
                    tokens = self.store.live_tokens_of_family(&family).await?;
                }
                if let (Some(jti), Some(exp)) = (jti, exp) {
                    tokens.push((jti, exp));
                }
                self.revoke_and_announce("code_reuse", tokens, None, None).await?;
                self.audit(&user_id, "identity.code_reuse_detected", &format!("client:{}", client.client_id), "denied", serde_json::json!({})).await;
            }
            return Err(IdentityError::InvalidGrant("authorization code is invalid or was already used".into()));
        };
        if record.expires_at < now_unix() {
            return Err(IdentityError::InvalidGrant("authorization code expired".into()));
        }
        if record.client_id != client.client_id {
            return Err(IdentityError::InvalidGrant("authorization code was issued to another client".into()));
        }
        if record.redirect_uri != redirect_uri {
            return Err(IdentityError::InvalidGrant("redirect_uri does not match the authorization request".into()));
        }
        match (&record.code_challenge, code_verifier) {
            (Some(challenge), Some(verifier)) => {
                if !(43..=128).contains(&verifier.len()) {
                    return Err(IdentityError::InvalidGrant("code_verifier must be 43 to 128 characters".into()));
                }
                let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
                if !common::rand::constant_time_eq(computed.as_bytes(), challenge.as_bytes()) {
                    return Err(IdentityError::InvalidGrant("PKCE verification failed".into()));
                }
            }
            (Some(_), None) => return Err(IdentityError::InvalidGrant("code_verifier is required".into())),
            (None, Some(_)) => return Err(IdentityError::InvalidGrant("no code_challenge was sent for this code".into())),
            (None, None) => {}
        }
        let user = self.live_user(&record.user_id).await?;
        let family = record.scope.split_whitespace().any(|s| s == "offline_access").then(|| uuid::Uuid::new_v4().to_string());
        let tokens = self.issue_user_tokens(&user, client, &record.scope, record.nonce.as_deref(), record.auth_time, family.clone()).await?;
        self.store.record_code_issue(&code_hash, family.as_deref(), &tokens.jti, tokens.expires_at).await?;
        Ok(tokens)
    }

    pub(crate) async fn exchange_refresh(&self, client: &Client, refresh_token: &str) -> Result<TokenResponse, IdentityError> {
        let hash = common::rand::sha256_hex(refresh_token.as_bytes());
        let token = self.store.refresh(&hash).await?.ok_or_else(|| IdentityError::InvalidGrant("unknown refresh token".into()))?;
        if token.client_id != client.client_id {
            return Err(IdentityError::InvalidGrant("refresh token was issued to another client".into()));
        }
        if token.revoked_at.is_some() || token.expires_at < now_unix() {
            return Err(IdentityError::InvalidGrant("refresh token is expired or revoked".into()));
        }
        if token.used_at.is_some() || !self.store.spend_refresh(&hash).await? {
            self.store.revoke_family(&token.family).await?;
            let tokens = self.store.live_tokens_of_family(&token.family).await?;
            self.revoke_and_announce("refresh_reuse", tokens, None, None).await?;
            self.audit(&token.user_id, "identity.refresh_reuse_detected", &format!("client:{}", client.client_id), "denied", serde_json::json!({})).await;
            return Err(IdentityError::InvalidGrant("refresh token was already used; its family is revoked".into()));
        }
        let user = self.live_user(&token.user_id).await?;
        let tokens = self.issue_user_tokens(&user, client, &token.scope, None, token.auth_time, Some(token.family)).await?;
        self.audit(&user.id, "identity.token_refreshed", &format!("client:{}", client.client_id), "success", serde_json::json!({})).await;
        Ok(tokens)
    }

    async fn live_user(&self, user_id: &str) -> Result<User, IdentityError> {
        self.store
            .user_by_id(user_id)
            .await?
            .filter(|u| !u.disabled)
            .ok_or_else(|| IdentityError::InvalidGrant("the user is disabled or deleted".into()))
    }

    async fn issue_user_tokens(
        &self,
        user: &User,
        client: &Client,
        scope: &str,
        nonce: Option<&str>,
        auth_time: i64,
        refresh_family: Option<String>,
    ) -> Result<TokenResponse, IdentityError> {
        let now = now_unix();
        let ttl = self.config.identity.access_token_ttl_secs;
        let access = AccessTokenClaims {
            iss: self.issuer.clone(),
            sub: user.id.clone(),
            aud: API_AUDIENCE.to_string(),
            exp: now + ttl,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scope.to_string(),
            client_id: client.client_id.clone(),
            preferred_username: Some(user.username.clone()),
            org: Some(user.org.clone()),
            roles: user.roles.clone(),
        };
        let alg = keys::parse_alg(&client.signing_alg)?;
        let access_token = self.sign(&access, alg, ACCESS_TOKEN_TYP).await?;
        self.store.record_access_token(&access.jti, &user.id, &client.client_id, refresh_family.as_deref(), access.exp).await?;
        let id_token = if scope.split_whitespace().any(|s| s == "openid") {
            let at_hash = at_hash(&access_token, alg);
            let claims = IdTokenClaims {
                iss: self.issuer.clone(),
                sub: user.id.clone(),
                aud: client.client_id.clone(),
                exp: now + self.config.identity.id_token_ttl_secs,
                iat: now,
                auth_time,
                nonce: nonce.map(str::to_string),
                at_hash,
                azp: client.client_id.clone(),
                profile: has_scope(scope, "profile").then(|| ProfileClaims::of(user)),
                email: has_scope(scope, "email").then(|| EmailClaims::of(user)).flatten(),
            };
            Some(self.sign(&claims, alg, "JWT").await?)
        } else {
            None
        };
        let refresh_token = match refresh_family {
            Some(family) => {
                let token = common::rand::token(32);
                let record = RefreshToken {
                    family,
                    client_id: client.client_id.clone(),
                    user_id: user.id.clone(),
                    scope: scope.to_string(),
                    auth_time,
                    expires_at: now + self.config.identity.refresh_token_ttl_days * 86_400,
                    used_at: None,
                    revoked_at: None,
                };
                self.store.insert_refresh(&common::rand::sha256_hex(token.as_bytes()), &record).await?;
                Some(token)
            }
            None => None,
        };
        self.audit(&user.id, "identity.token_issued", &format!("client:{}", client.client_id), "success", serde_json::json!({"scope": scope})).await;
        Ok(TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in: ttl,
            id_token,
            refresh_token,
            scope: scope.to_string(),
            jti: access.jti.clone(),
            expires_at: access.exp,
        })
    }

    /// A client-credentials token. Echo services name the one callee it is for
    /// (`audience`); any other confidential client gets one for the Echo API with the
    /// API scopes it asked for (it acts for no user).
    pub(crate) async fn client_credentials(&self, client: &Client, audience: Option<&str>, scope: Option<&str>) -> Result<TokenResponse, IdentityError> {
        let (audience, scope) = match client.kind.as_str() {
            "service" => {
                let audience = audience.ok_or_else(|| IdentityError::InvalidRequest("audience is required".into()))?;
                if !ServiceName::ALL.iter().any(|s| s.audience() == audience) {
                    return Err(IdentityError::InvalidTarget);
                }
                (audience.to_string(), "service".to_string())
            }
            "confidential" => {
                if audience.is_some_and(|a| a != API_AUDIENCE) {
                    return Err(IdentityError::InvalidTarget);
                }
                let granted = granted_scope(scope.unwrap_or_default());
                let api_only: Vec<&str> = granted.split_whitespace().filter(|s| s.starts_with("echo")).collect();
                (API_AUDIENCE.to_string(), api_only.join(" "))
            }
            _ => return Err(IdentityError::UnauthorizedClient),
        };
        let alg = keys::parse_alg(&client.signing_alg)?;
        let now = now_unix();
        let ttl = self.config.identity.service_token_ttl_secs;
        let claims = AccessTokenClaims {
            iss: self.issuer.clone(),
            sub: client.client_id.clone(),
            aud: audience,
            exp: now + ttl,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scope.clone(),
            client_id: client.client_id.clone(),
            preferred_username: None,
            org: None,
            roles: vec![],
        };
        Ok(TokenResponse {
            access_token: self.sign(&claims, alg, ACCESS_TOKEN_TYP).await?,
            token_type: "Bearer",
            expires_in: ttl,
            id_token: None,
            refresh_token: None,
            scope,
            jti: claims.jti.clone(),
            expires_at: claims.exp,
        })
    }

    /// Verifies one of our own user access tokens (for `/userinfo`): audience `echo-api`,
    /// not revoked.
    pub(crate) async fn verify_access(&self, token: &str) -> Result<AccessTokenClaims, IdentityError> {
        let claims = self.verify_any_access(token).await?;
        if claims.aud != API_AUDIENCE || self.store.access_revoked(&claims.jti).await? {
            return Err(IdentityError::InvalidToken);
        }
        Ok(claims)
    }

    /// RFC 7009: revokes a refresh token (and its family) or an access token of this
    /// client. Unknown tokens are not an error: the answer is the same either way.
    pub(crate) async fn revoke(&self, client: &Client, token: &str) -> Result<(), IdentityError> {
        let hash = common::rand::sha256_hex(token.as_bytes());
        if let Some(refresh) = self.store.refresh(&hash).await? {
            if refresh.client_id == client.client_id {
                self.store.revoke_family(&refresh.family).await?;
                // RFC 7009 §2.1: the access tokens of the same grant go with it.
                let tokens = self.store.live_tokens_of_family(&refresh.family).await?;
                self.revoke_and_announce("revoked", tokens, None, None).await?;
                self.audit(&refresh.user_id, "identity.token_revoked", &format!("client:{}", client.client_id), "success", serde_json::json!({"type": "refresh_token"})).await;
            }
            return Ok(());
        }
        if let Ok(claims) = self.verify_any_access(token).await
            && claims.client_id == client.client_id {
                self.revoke_and_announce("revoked", vec![(claims.jti.clone(), claims.exp)], None, None).await?;
                self.audit(&claims.sub, "identity.token_revoked", &format!("client:{}", client.client_id), "success", serde_json::json!({"type": "access_token"})).await;
            }
        Ok(())
    }

    /// RFC 7662: what a token is, for confidential clients.
    pub(crate) async fn introspect(&self, token: &str) -> Result<serde_json::Value, IdentityError> {
        let inactive = serde_json::json!({"active": false});
        let hash = common::rand::sha256_hex(token.as_bytes());
        if let Some(refresh) = self.store.refresh(&hash).await? {
            let live = refresh.revoked_at.is_none() && refresh.used_at.is_none() && refresh.expires_at > now_unix();
            let user = self.store.user_by_id(&refresh.user_id).await?.filter(|u| !u.disabled);
            return Ok(match (live, user) {
                (true, Some(user)) => serde_json::json!({
                    "active": true, "token_type": "refresh_token", "client_id": refresh.client_id, "sub": user.id,
                    "username": user.username, "scope": refresh.scope, "exp": refresh.expires_at, "iss": self.issuer,
                }),
                _ => inactive,
            });
        }
        let Ok(claims) = self.verify_any_access(token).await else { return Ok(inactive) };
        if self.store.access_revoked(&claims.jti).await? {
            return Ok(inactive);
        }
        if claims.preferred_username.is_some() && self.store.user_by_id(&claims.sub).await?.filter(|u| !u.disabled).is_none() {
            return Ok(inactive);
        }
        Ok(serde_json::json!({
            "active": true, "token_type": "Bearer", "client_id": claims.client_id, "sub": claims.sub, "aud": claims.aud,
            "iss": claims.iss, "exp": claims.exp, "iat": claims.iat, "nbf": claims.nbf, "jti": claims.jti, "scope": claims.scope,
            "username": claims.preferred_username, "org": claims.org, "roles": claims.roles,
        }))
    }

    /// Verifies one of our access tokens for any audience (users' and services').
    async fn verify_any_access(&self, token: &str) -> Result<AccessTokenClaims, IdentityError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| IdentityError::InvalidToken)?;
        let keys = self.keys.read().await;
        let key = keys.iter().find(|k| Some(&k.kid) == header.kid.as_ref()).ok_or(IdentityError::InvalidToken)?;
        // The key decides the algorithm: a header naming another one is refused.
        if header.alg != key.alg {
            return Err(IdentityError::InvalidToken);
        }
        let decoding = key.decoding().map_err(|_| IdentityError::InvalidToken)?;
        let mut validation = jsonwebtoken::Validation::new(key.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.validate_aud = false;
        validation.validate_nbf = true;
        jsonwebtoken::decode::<AccessTokenClaims>(token, &decoding, &validation).map(|d| d.claims).map_err(|_| IdentityError::InvalidToken)
    }

    // ---- administration (CLI and bootstrap) ----

    pub(crate) async fn create_user(&self, new: NewUser) -> Result<User, IdentityError> {
        let username = new.username.trim().to_string();
        let valid_name = !username.is_empty()
            && username.len() <= 64
            && username.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
        if !valid_name {
            return Err(IdentityError::BadRequest("username must be 1 to 64 letters, digits, '.', '_', '-' or '@'".into()));
        }
        let valid_org = !new.org.is_empty() && new.org.len() <= 64 && new.org.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        if !valid_org {
            return Err(IdentityError::BadRequest("org must be 1 to 64 letters, digits, '_' or '-'".into()));
        }
        if !matches!(new.role.as_str(), "owner" | "admin" | "member" | "viewer") {
            return Err(IdentityError::BadRequest("role must be owner, admin, member or viewer".into()));
        }
        if self.store.user_by_username(&username).await?.is_some() {
            return Err(IdentityError::Conflict(format!("user `{username}` already exists")));
        }
        let password_hash = password::hash(new.password).await.map_err(|e| IdentityError::BadRequest(e.to_string()))?;
        let user = User {
            id: uuid::Uuid::new_v4().to_string(),
            username,
            email: new.email,
            name: None,
            org: new.org,
            roles: vec![new.role],
            password_hash,
            disabled: false,
            must_change_password: new.temporary,
        };
        self.store.insert_user(&user).await?;
        self.audit("system", "identity.user_created", &format!("user:{}", user.id), "success", serde_json::json!({"org": user.org})).await;
        Ok(user)
    }

    pub(crate) async fn register_client(
        &self,
        client_id: &str,
        redirect_uris: Vec<String>,
        secret: Option<&str>,
        kind: &str,
        signing_alg: &str,
        consent_required: bool,
    ) -> Result<(), IdentityError> {
        keys::parse_alg(signing_alg).map_err(|e| IdentityError::BadRequest(e.to_string()))?;
        for uri in &redirect_uris {
            let parsed = url::Url::parse(uri).map_err(|_| IdentityError::BadRequest(format!("`{uri}` is not an absolute URL")))?;
            if parsed.fragment().is_some() || !matches!(parsed.scheme(), "http" | "https") {
                return Err(IdentityError::BadRequest(format!("`{uri}` must be an http(s) URL without a fragment")));
            }
        }
        if client_id.is_empty() || client_id.len() > 128 {
            return Err(IdentityError::BadRequest("client id must be 1 to 128 characters".into()));
        }
        let client = Client {
            client_id: client_id.to_string(),
            secret_hash: secret.map(|s| common::rand::sha256_hex(s.as_bytes())),
            redirect_uris,
            kind: kind.to_string(),
            signing_alg: signing_alg.to_string(),
            consent_required,
        };
        self.store.upsert_client(&client).await?;
        Ok(())
    }
}

/// `at_hash`: the left half of the access token's hash, with the hash of the ID
/// token's algorithm (SHA-256 for RS256 and ES256; SHA-512 for EdDSA over Ed25519, as
/// OIDC libraries such as `openidconnect` expect).
fn at_hash(access_token: &str, alg: Algorithm) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    match alg {
        Algorithm::EdDSA => b64.encode(&sha2::Sha512::digest(access_token.as_bytes())[..32]),
        _ => b64.encode(&sha2::Sha256::digest(access_token.as_bytes())[..16]),
    }
}

async fn generate_key(alg: Algorithm) -> Result<keys::NewKey, IdentityError> {
    tokio::task::spawn_blocking(move || keys::generate(alg)).await.map_err(|e| IdentityError::Internal(e.to_string()))?.map_err(Into::into)
}

/// The row of a new key: its private half only as `sealed` (see `kek`).
fn new_stored<'a>(new: &'a keys::NewKey, sealed: &'a [u8], activate_at: i64) -> crate::store::NewStoredKey<'a> {
    let (n, e) = new.rsa_components();
    crate::store::NewStoredKey {
        kid: &new.kid,
        alg: keys::alg_name(new.alg),
        der: sealed,
        n,
        e,
        public_jwk: serde_json::Value::Object(new.public.clone()).to_string(),
        activate_at,
    }
}

/// Failures older than this are forgotten.
const FORGET_FAILURES_AFTER: i64 = 3600;

/// Accounts one address may open in an hour before sign-up slows down.
const FREE_SIGNUPS_PER_IP: i64 = 10;

/// Failures an account gets from one address before that address must wait.
const FREE_PER_ACCOUNT_AND_IP: i64 = 5;
/// Failures an account gets from all addresses together before each attempt on it is held.
const FREE_PER_ACCOUNT: i64 = 20;
/// The longest an attempt on an account under attack is held before it is judged.
const MAX_ACCOUNT_HOLD_MS: i64 = 3000;

/// What slows one sign-in attempt down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Throttle {
    /// Refuse the attempt (429) and say when to come back; 0 when it may proceed.
    pub(crate) retry_after_secs: i64,
    /// Hold the attempt this long before checking the password (the account backstop).
    pub(crate) hold_ms: i64,
}

/// A correct password forgets the failures of its account and of its (account, address).
fn failure_keys_cleared_by_success(account: &str, ip: &str) -> Vec<String> {
    vec![format!("user:{account}"), format!("userip:{account}|{ip}")]
}
/// Failures one address gets (many people may share it behind a proxy) before its
/// sign-ins slow down, so one address cannot spray passwords over many accounts fast.
const FREE_PER_IP: i64 = 50;

/// The delay after `failures` recent failures, or `None` while they are free.
pub(crate) fn throttle_delay(failures: i64, free: i64) -> Option<i64> {
    (failures >= free).then(|| (1i64 << (failures - free).min(10)).min(900))
}

pub(crate) struct NewUser {
    pub(crate) username: String,
    pub(crate) password: String,
    pub(crate) org: String,
    pub(crate) role: String,
    pub(crate) email: Option<String>,
    /// The password was chosen for the user, who must replace it at first sign-in.
    pub(crate) temporary: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AccessTokenClaims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) aud: String,
    pub(crate) exp: i64,
    pub(crate) iat: i64,
    pub(crate) nbf: i64,
    pub(crate) jti: String,
    pub(crate) scope: String,
    pub(crate) client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) preferred_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) org: Option<String>,
    #[serde(default)]
    pub(crate) roles: Vec<String>,
}

/// What logout reads from an `id_token_hint`.
#[derive(Debug, Deserialize)]
pub(crate) struct IdTokenHint {
    pub(crate) sub: String,
    pub(crate) aud: String,
    #[serde(default)]
    scope: Option<String>,
}

/// The `typ` of access tokens (RFC 9068 §2.1).
pub(crate) const ACCESS_TOKEN_TYP: &str = "at+jwt";

#[derive(Serialize)]
struct IdTokenClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: i64,
    iat: i64,
    auth_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    at_hash: String,
    azp: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    profile: Option<ProfileClaims>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    email: Option<EmailClaims>,
}

/// Released with scope `profile` (in ID tokens and at `/userinfo`).
#[derive(Serialize)]
pub(crate) struct ProfileClaims {
    pub(crate) preferred_username: String,
    pub(crate) name: String,
    pub(crate) org: String,
    pub(crate) roles: Vec<String>,
}

impl ProfileClaims {
    pub(crate) fn of(user: &User) -> ProfileClaims {
        ProfileClaims {
            preferred_username: user.username.clone(),
            name: user.name.clone().unwrap_or_else(|| user.username.clone()),
            org: user.org.clone(),
            roles: user.roles.clone(),
        }
    }
}

/// Released with scope `email`, when the user has an address. Echo does not prove
/// that people own their addresses, so it says so.
#[derive(Serialize)]
pub(crate) struct EmailClaims {
    pub(crate) email: String,
    pub(crate) email_verified: bool,
}

impl EmailClaims {
    pub(crate) fn of(user: &User) -> Option<EmailClaims> {
        user.email.clone().map(|email| EmailClaims { email, email_verified: false })
    }
}

#[derive(Serialize)]
pub(crate) struct TokenResponse {
    pub(crate) access_token: String,
    pub(crate) token_type: &'static str,
    pub(crate) expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) refresh_token: Option<String>,
    pub(crate) scope: String,
    #[serde(skip)]
    pub(crate) jti: String,
    #[serde(skip)]
    pub(crate) expires_at: i64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::throttle_delay;

    #[test]
    fn failures_are_free_then_the_delay_doubles_up_to_a_cap() {
        let delays: Vec<Option<i64>> = (0..8).map(|n| throttle_delay(n, 5)).collect();
        assert_eq!(delays, [None, None, None, None, None, Some(1), Some(2), Some(4)]);
        assert_eq!(throttle_delay(100, 5), Some(900));
        assert_eq!(throttle_delay(49, 50), None);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod properties {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    const REGISTERED: &str = "https://app.example/callback";

    /// One provider (key generation is the slow part) shared by every case.
    fn identity() -> &'static (tempfile::TempDir, tokio::runtime::Runtime, Identity) {
        static SHARED: std::sync::OnceLock<(tempfile::TempDir, tokio::runtime::Runtime, Identity)> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let config = Arc::new(EchoConfig::for_test(dir.path()));
            let identity = runtime.block_on(async {
                let identity = Identity::new(config, None).await.unwrap();
                identity.register_client("app", vec![REGISTERED.into()], None, "public", "RS256", false).await.unwrap();
                identity
            });
            (dir, runtime, identity)
        })
    }

    fn redirect_uri() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(REGISTERED.to_string()),
            Just(format!("{REGISTERED}/")),
            Just(format!("{REGISTERED}?x=1")),
            Just("https://app.example/callback#frag".to_string()),
            Just("https://APP.example/callback".to_string()),
            Just("https://evil.example/callback".to_string()),
            ".{0,60}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the request says, we redirect only to the exact registered URI.
        #[test]
        fn authorize_redirects_only_to_the_exact_registered_uri(
            redirect in redirect_uri(),
            response_type in prop_oneof![Just("code".to_string()), ".{0,8}"],
            scope in prop_oneof![Just("openid".to_string()), Just("openid offline_access".to_string()), ".{0,20}"],
            challenge in prop::option::of("[A-Za-z0-9_-]{0,130}"),
            method in prop::option::of(prop_oneof![Just("S256".to_string()), Just("plain".to_string()), ".{0,6}"]),
            state in prop::option::of(".{0,40}"),
        ) {
            let (_, runtime, identity) = identity();
            let params = AuthorizeParams {
                response_type, client_id: "app".into(), redirect_uri: redirect.clone(), scope, state,
                nonce: None, code_challenge: challenge.clone(), code_challenge_method: method.clone(), prompt: None, max_age: None,
                request: None, request_uri: None,
            };
            match runtime.block_on(identity.validate_authorize(&params)) {
                Ok(_) => {
                    prop_assert_eq!(redirect.as_str(), REGISTERED);
                    prop_assert_eq!(method.as_deref(), Some("S256"), "a public client passed without S256");
                    prop_assert!(challenge.is_some_and(|c| (43..=128).contains(&c.len())));
                }
                Err(AuthorizeFailure::Redirect { redirect_uri, .. }) => prop_assert_eq!(redirect_uri.as_str(), REGISTERED),
                Err(AuthorizeFailure::Page(_)) => prop_assert_ne!(redirect.as_str(), REGISTERED),
            }
        }

        /// Any change to a signed access token makes it invalid.
        #[test]
        fn tampered_access_tokens_never_verify(
            position in any::<prop::sample::Index>(),
            replacement in any::<u8>(),
            alg in prop::sample::select(keys::SIGNING_ALGS.to_vec()),
        ) {
            let (_, runtime, identity) = identity();
            let claims = AccessTokenClaims {
                iss: identity.issuer.clone(), sub: "u".into(), aud: API_AUDIENCE.into(), exp: now_unix() + 60, iat: now_unix(), nbf: now_unix(),
                jti: "j".into(), scope: "openid".into(), client_id: "app".into(), preferred_username: Some("u".into()), org: Some("o".into()), roles: vec![],
            };
            let token = runtime.block_on(identity.sign(&claims, alg, ACCESS_TOKEN_TYP)).unwrap();
            prop_assert!(runtime.block_on(identity.verify_access(&token)).is_ok());
            let mut bytes = token.clone().into_bytes();
            let at = position.index(bytes.len());
            let replacement = if bytes[at] == replacement { replacement.wrapping_add(1) } else { replacement };
            bytes[at] = replacement;
            let tampered = String::from_utf8_lossy(&bytes).into_owned();
            prop_assert!(runtime.block_on(identity.verify_access(&tampered)).is_err(), "tampered at {at}: {tampered}");
        }
    }
}
