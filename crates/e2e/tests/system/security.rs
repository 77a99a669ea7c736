//! Regression tests for the holes an attack run found (issue P1.1), each through the
//! public edges: the data dir as another local user sees it, the gateway's sign-in
//! as a hostile link or another browser uses it, revoked tokens at the API, floods,
//! concurrent uploads against a quota, lock-out attempts, and org roles.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{TestSystem, password_of};

/// Every path under `dir` with its permission bits.
fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u32)>) {
    let meta = std::fs::symlink_metadata(dir).unwrap();
    out.push((dir.to_path_buf(), meta.permissions().mode() & 0o7777));
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).unwrap() {
            walk(&entry.unwrap().path(), out);
        }
    }
}

fn readable_by_others(dir: &std::path::Path) -> Vec<String> {
    let mut all = Vec::new();
    walk(dir, &mut all);
    all.into_iter().filter(|(_, mode)| mode & 0o077 != 0).map(|(path, mode)| format!("{} {mode:04o}", path.display())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_in_the_data_dir_is_readable_by_other_users_and_a_copied_identity_db_signs_nothing() {
    let ts = TestSystem::start().await;
    ts.add_user("priya", "acme", "member").await;
    // Make every kind of file exist: a blob, the index, logs, audit, mail.
    let tokens = ts.sign_in("priya", &password_of("priya")).await;
    let part = reqwest::multipart::Part::bytes(b"# Notes\n\nThe vault code is walnut-7.\n".to_vec()).file_name("notes.md").mime_str("text/markdown").unwrap();
    let created: serde_json::Value = ts
        .http
        .post(format!("{}/api/v1/documents", ts.gateway()))
        .bearer_auth(&tokens.access_token)
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = created["job_id"].as_str().unwrap().to_string();
    crate::helpers::eventually("the upload to be indexed", Duration::from_secs(60), || async {
        let job: serde_json::Value = ts.http.get(format!("{}/api/v1/jobs/{job}", ts.gateway())).bearer_auth(&tokens.access_token).send().await.ok()?.json().await.ok()?;
        (job["status"] == "done").then_some(())
    })
    .await;
    let data_dir = ts.config.data_dir.clone();
    assert!(data_dir.join("blobs").exists() && data_dir.join("secrets/identity.kek").exists());
    let exposed = readable_by_others(&data_dir);
    assert!(exposed.is_empty(), "readable by other local users: {exposed:#?}");

    // Another local user copies identity.db (and its WAL) without secrets/.
    let stolen = tempfile::tempdir().unwrap();
    for name in ["identity.db", "identity.db-wal"] {
        if data_dir.join(name).exists() {
            std::fs::copy(data_dir.join(name), stolen.path().join(name)).unwrap();
        }
    }
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", stolen.path().join("identity.db").display())).await.unwrap();
    let keys: Vec<(String, Vec<u8>)> = sqlx::query_as("SELECT kid, private_der FROM signing_keys").fetch_all(&pool).await.unwrap();
    let settings: Vec<(String,)> = sqlx::query_as("SELECT key FROM settings").fetch_all(&pool).await.unwrap();
    pool.close().await;
    assert!(keys.len() >= 3, "one key per algorithm at least");
    for (kid, der) in &keys {
        assert!(der.starts_with(b"EKv1"), "{kid} is stored sealed");
        assert_ne!(der.first(), Some(&0x30), "{kid} is no DER key");
    }
    assert!(!settings.iter().any(|(k,)| k == "form_key"), "the login form key is not stored");
    let mut config = common::EchoConfig::for_test(stolen.path());
    config.log.ship = false;
    let refused = identity::list_users(&config).await.unwrap_err().to_string();
    assert!(refused.contains("key-encryption key is missing"), "{refused}");
    // A key-encryption key of the attacker's own opens nothing either.
    std::fs::create_dir_all(config.secrets_dir()).unwrap();
    std::fs::write(config.secrets_dir().join("identity.kek"), base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [9u8; 32])).unwrap();
    let refused = identity::list_users(&config).await.unwrap_err().to_string();
    assert!(refused.contains("does not open"), "{refused}");

    // Back on the real data dir: loosened files are tightened at the next start, and a
    // secret other users could have read refuses it.
    let mut config = ts.config.clone();
    ts.system.stop().await;
    for port in config.ports.values_mut() {
        *port = 0;
    }
    let kek = data_dir.join("secrets/identity.kek");
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(data_dir.join("identity.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = echod::up(config.clone()).await.err().expect("an exposed secret refuses the start").to_string();
    assert!(refused.contains("refusing to start") && refused.contains("identity.kek"), "{refused}");
    config.allow_exposed_secrets = true;
    let system = echod::up(config).await.expect("starts when told to");
    assert!(readable_by_others(&data_dir).is_empty(), "tightened at start");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_never_returns_to_another_site_and_a_foreign_callback_signs_nobody_in() {
    let ts = TestSystem::start().await;
    ts.add_user("quinn", "acme", "member").await;
    ts.add_user("mallory", "acme", "member").await;

    // Open redirect: `return_to` that browsers would read as another site.
    for hostile in ["%2F%09%2Fevil.example", "%2F%2Fevil.example", "%2F%5Cevil.example", "https%3A%2F%2Fevil.example", "%2F%0A%2Fevil.example"] {
        let signed_in = ts.browser_sign_in(&format!("/auth/login?return_to={hostile}"), "quinn").await;
        assert_eq!(signed_in.status, StatusCode::SEE_OTHER, "{hostile}");
        let location = signed_in.location.unwrap();
        let base = url::Url::parse(&ts.gateway()).unwrap();
        let browser_view: String = location.chars().filter(|c| !matches!(c, '\t' | '\n' | '\r')).collect();
        assert_eq!(base.join(&browser_view).unwrap().origin(), base.origin(), "{hostile} sent the browser to {location:?}");
        assert!(signed_in.session.is_some());
    }
    let signed_in = ts.browser_sign_in("/auth/login?return_to=%2Fask%3Fq%3D1", "quinn").await;
    assert_eq!(signed_in.location.as_deref(), Some("/ask?q=1"), "a local path is honoured");

    // Login CSRF: Mallory signs in but sends her unopened callback URL to Quinn, whose
    // browser never started that sign-in.
    let mallorys = ts.browser_start_sign_in("/auth/login", "mallory").await;
    let victim = ts.http.get(&mallorys.callback).send().await.unwrap();
    assert_eq!(victim.status(), StatusCode::BAD_REQUEST);
    assert!(crate::helpers::cookie_named(&victim, "echo_session").is_none(), "no session for the victim");
    let page = victim.text().await.unwrap();
    assert!(page.contains("<html") && page.contains("another browser"), "a friendly page: {page}");
    // Quinn's browser with its own, different pre-sign-in cookie fares the same.
    let quinns = ts.browser_start_sign_in("/auth/login", "quinn").await;
    let mallorys_again = ts.browser_start_sign_in("/auth/login", "mallory").await;
    let mixed = ts.http.get(&mallorys_again.callback).header("cookie", &quinns.login_cookie).send().await.unwrap();
    assert_eq!(mixed.status(), StatusCode::BAD_REQUEST);
    assert!(crate::helpers::cookie_named(&mixed, "echo_session").is_none());
    // The refused callback is spent: not even Mallory's own browser can finish it now.
    let late = ts.http.get(&mallorys.callback).header("cookie", &mallorys.login_cookie).send().await.unwrap();
    assert_eq!(late.status(), StatusCode::BAD_REQUEST);
    // Quinn's own sign-in in her own browser still works.
    let own = ts.http.get(&quinns.callback).header("cookie", &quinns.login_cookie).send().await.unwrap();
    assert_eq!(own.status(), StatusCode::SEE_OTHER);
    assert!(crate::helpers::cookie_named(&own, "echo_session").is_some());
    ts.system.stop().await;
}

/// Polls `GET /api/v1/me` with `token` until it is refused; the time it took.
async fn until_refused(ts: &TestSystem, token: &str, what: &str) -> Duration {
    let started = std::time::Instant::now();
    loop {
        let status = ts.http.get(format!("{}/api/v1/me", ts.gateway())).bearer_auth(token).send().await.unwrap().status();
        if status == StatusCode::UNAUTHORIZED {
            return started.elapsed();
        }
        assert_eq!(status, StatusCode::OK, "{what}");
        assert!(started.elapsed() < Duration::from_secs(3), "{what}: the gateway still accepts the token after 3 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn me_status(ts: &TestSystem, token: &str) -> StatusCode {
    ts.http.get(format!("{}/api/v1/me", ts.gateway())).bearer_auth(token).send().await.unwrap().status()
}

async fn refresh(ts: &TestSystem, refresh_token: &str) -> (StatusCode, serde_json::Value) {
    let answer = ts
        .http
        .post(format!("{}/token", ts.issuer()))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token), ("client_id", crate::helpers::CLIENT_ID)])
        .send()
        .await
        .unwrap();
    (answer.status(), answer.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_access_tokens_are_refused_by_the_gateway_within_a_second_and_after_a_restart() {
    let ts = TestSystem::start().await;
    ts.add_user("rosa", "acme", "member").await;

    // 1. RFC 7009 revocation of the access token itself.
    let tokens = ts.sign_in("rosa", &password_of("rosa")).await;
    assert_eq!(me_status(&ts, &tokens.access_token).await, StatusCode::OK);
    let revoked = ts
        .http
        .post(format!("{}/revoke", ts.issuer()))
        .form(&[("token", tokens.access_token.as_str()), ("client_id", crate::helpers::CLIENT_ID)])
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let took = until_refused(&ts, &tokens.access_token, "after /revoke").await;
    println!("revoked by /revoke: refused after {} ms", took.as_millis());
    let refused = ts.http.get(format!("{}/api/v1/me", ts.gateway())).bearer_auth(&tokens.access_token).send().await.unwrap();
    let challenge = refused.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert!(challenge.contains("invalid_token"), "{challenge}");
    // Revoking the refresh token takes the access tokens of its grant along (RFC 7009 §2.1).
    let grant = ts.sign_in("rosa", &password_of("rosa")).await;
    let refresh_token = grant.refresh_token.clone().unwrap();
    ts.http.post(format!("{}/revoke", ts.issuer())).form(&[("token", refresh_token.as_str()), ("client_id", crate::helpers::CLIENT_ID)]).send().await.unwrap();
    until_refused(&ts, &grant.access_token, "after revoking its refresh token").await;
    assert_eq!(refresh(&ts, &refresh_token).await.0, StatusCode::BAD_REQUEST);

    // 2. A replayed authorization code revokes what it was exchanged for.
    let replayed = ts.sign_in("rosa", &password_of("rosa")).await;
    assert_eq!(me_status(&ts, &replayed.access_token).await, StatusCode::OK);
    let again = ts
        .http
        .post(format!("{}/token", ts.issuer()))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", replayed.code.as_str()),
            ("redirect_uri", crate::helpers::REDIRECT_URI),
            ("client_id", crate::helpers::CLIENT_ID),
            ("code_verifier", replayed.verifier.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    let took = until_refused(&ts, &replayed.access_token, "after the code replay").await;
    println!("revoked by a code replay: refused after {} ms", took.as_millis());
    assert_eq!(refresh(&ts, replayed.refresh_token.as_deref().unwrap()).await.0, StatusCode::BAD_REQUEST);

    // 3. A reused refresh token revokes its whole family, access tokens included.
    let family = ts.sign_in("rosa", &password_of("rosa")).await;
    let first_refresh = family.refresh_token.clone().unwrap();
    let (status, rotated) = refresh(&ts, &first_refresh).await;
    assert_eq!(status, StatusCode::OK);
    let rotated_access = rotated["access_token"].as_str().unwrap().to_string();
    assert_eq!(me_status(&ts, &rotated_access).await, StatusCode::OK);
    assert_eq!(refresh(&ts, &first_refresh).await.0, StatusCode::BAD_REQUEST, "the spent token is refused");
    let took = until_refused(&ts, &rotated_access, "after refresh reuse").await;
    println!("revoked by refresh reuse: refused after {} ms", took.as_millis());
    until_refused(&ts, &family.access_token, "the family's first access token").await;
    assert_eq!(refresh(&ts, rotated["refresh_token"].as_str().unwrap()).await.0, StatusCode::BAD_REQUEST);

    // An untouched token keeps working; after a restart every revoked one stays refused.
    let untouched = ts.sign_in("rosa", &password_of("rosa")).await;
    let ts = ts.restart().await;
    for (what, token) in [("revoked", &tokens.access_token), ("replayed", &replayed.access_token), ("reused", &rotated_access)] {
        assert_eq!(me_status(&ts, token).await, StatusCode::UNAUTHORIZED, "{what} after the restart");
    }
    assert_eq!(me_status(&ts, &untouched.access_token).await, StatusCode::OK);
    ts.system.stop().await;
}

/// A browser's identity (SSO) session: the `echo_idp` cookie a sign-in at the login form leaves.
async fn identity_session(ts: &TestSystem, username: &str) -> String {
    let challenge = "x".repeat(43);
    let params = [
        ("response_type", "code"),
        ("client_id", crate::helpers::CLIENT_ID),
        ("redirect_uri", crate::helpers::REDIRECT_URI),
        ("scope", "openid"),
        ("state", "s"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let html = ts.http.get(format!("{}/authorize", ts.issuer())).query(&params).send().await.unwrap().text().await.unwrap();
    let mut form: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    form.push(("form_token".into(), crate::helpers::hidden_value(&html, "form_token").unwrap()));
    form.push(("username".into(), username.into()));
    form.push(("password".into(), password_of(username)));
    let answer = ts.http.post(format!("{}/login", ts.issuer())).form(&form).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::SEE_OTHER);
    crate::helpers::cookie_named(&answer, "echo_idp").unwrap()
}

/// Whether identity signs this browser in without asking (`prompt=none`).
async fn sso_still_works(ts: &TestSystem, idp_cookie: &str) -> bool {
    let challenge = "x".repeat(43);
    let answer = ts
        .http
        .get(format!("{}/authorize", ts.issuer()))
        .query(&[
            ("response_type", "code"),
            ("client_id", crate::helpers::CLIENT_ID),
            ("redirect_uri", crate::helpers::REDIRECT_URI),
            ("scope", "openid"),
            ("prompt", "none"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .header("cookie", idp_cookie)
        .send()
        .await
        .unwrap();
    let location = answer.headers().get("location").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    location.contains("code=")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_password_ends_every_other_session_and_token() {
    let ts = TestSystem::start().await;
    ts.add_user("sana", "acme", "member").await;
    let (changing, csrf) = ts.browser_session("sana").await;
    let (other_browser, _) = ts.browser_session("sana").await;
    let api = ts.sign_in("sana", &password_of("sana")).await;
    let sso = identity_session(&ts, "sana").await;
    assert!(sso_still_works(&ts, &sso).await);
    let page = |cookie: String| {
        let ts = &ts;
        async move { ts.http.get(format!("{}/api/v1/me", ts.gateway())).header("cookie", cookie).send().await.unwrap().status() }
    };
    assert_eq!(page(other_browser.clone()).await, StatusCode::OK);

    let changed = ts
        .http
        .post(format!("{}/api/v1/me/password", ts.gateway()))
        .header("cookie", &changing)
        .header("x-csrf-token", &csrf)
        .json(&serde_json::json!({"current_password": password_of("sana"), "new_password": "a-brand-new-passphrase"}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::NO_CONTENT);
    let renewed = crate::helpers::cookie_named(&changed, "echo_session").expect("the changing session is re-issued");
    assert_ne!(renewed, changing);
    assert_eq!(page(renewed).await, StatusCode::OK, "the session that made the change continues");
    assert_eq!(page(changing).await, StatusCode::UNAUTHORIZED, "under a new id only");
    crate::helpers::eventually("the other browser to be signed out", Duration::from_secs(3), || async {
        (page(other_browser.clone()).await == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    until_refused(&ts, &api.access_token, "the API token after the password change").await;
    assert_eq!(refresh(&ts, api.refresh_token.as_deref().unwrap()).await.0, StatusCode::BAD_REQUEST, "refresh tokens end");
    assert!(!sso_still_works(&ts, &sso).await, "the SSO session ends");
    ts.system.stop().await;
}
