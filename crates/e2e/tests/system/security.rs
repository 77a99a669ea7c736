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

/// Uploads `bytes` as `name` (`mime`) into the caller's personal collection.
async fn upload(ts: &TestSystem, token: &str, name: &str, mime: &str, bytes: Vec<u8>) -> reqwest::Response {
    let part = reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()).mime_str(mime).unwrap();
    ts.http.post(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(token).multipart(reqwest::multipart::Form::new().part("file", part)).send().await.unwrap()
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
    let created: serde_json::Value = upload(&ts, &tokens.access_token, "notes.md", "text/markdown", b"# Notes\n\nThe vault code is walnut-7.\n".to_vec()).await.json().await.unwrap();
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
    let ts = ts.restart_keeping_ports().await;
    for (what, token) in [("revoked", &tokens.access_token), ("replayed", &replayed.access_token), ("reused", &rotated_access)] {
        assert_eq!(me_status(&ts, token).await, StatusCode::UNAUTHORIZED, "{what} after the restart");
    }
    let answer = ts.http.get(format!("{}/api/v1/me", ts.gateway())).bearer_auth(&untouched.access_token).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK, "{:?}", answer.text().await);
    ts.system.stop().await;
}

/// A browser's identity (SSO) session: the `echo_idp` cookie a sign-in at the login form leaves.
async fn identity_session(ts: &TestSystem, username: &str) -> String {
    let answer = submit_login(ts, username, &password_of(username)).await;
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

/// One sign-in at identity's form from source address `from`: the answer's status.
async fn login_from(ts: &TestSystem, from: &str, username: &str, password: &str) -> StatusCode {
    submit_login_with(ts, &client_from(from), username, password).await.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_from_one_address_do_not_lock_the_owner_out() {
    let ts = TestSystem::start().await;
    ts.add_user("tess", "acme", "member").await;
    // A stranger at 127.0.0.1 guesses.
    for _ in 0..5 {
        assert_eq!(login_from(&ts, "127.0.0.1", "tess", "guess-guess-guess").await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(login_from(&ts, "127.0.0.1", "tess", "guess-guess-guess").await, StatusCode::TOO_MANY_REQUESTS, "five are free, then the address waits");
    assert_eq!(login_from(&ts, "127.0.0.1", "tess", &password_of("tess")).await, StatusCode::TOO_MANY_REQUESTS, "whatever it sends");
    // The owner, from her own address, signs in at once.
    let started = std::time::Instant::now();
    assert_eq!(login_from(&ts, "127.0.0.2", "tess", &password_of("tess")).await, StatusCode::SEE_OTHER);
    assert!(started.elapsed() < Duration::from_secs(3), "not held: {:?}", started.elapsed());

    // Guessing spread over many addresses: each is throttled on its own, the account's
    // backstop holds attempts (a few seconds at most) but never refuses the right password.
    for n in 0..24 {
        let from = format!("127.0.1.{}", n % 6 + 1);
        let status = login_from(&ts, &from, "tess", "guess-guess-guess").await;
        assert!(matches!(status, StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS), "{from}: {status}");
    }
    let started = std::time::Instant::now();
    assert_eq!(login_from(&ts, "127.0.0.3", "tess", &password_of("tess")).await, StatusCode::SEE_OTHER, "the owner still gets in");
    let held = started.elapsed();
    assert!(held < Duration::from_secs(5), "held {held:?}");
    println!("under a spread attack the owner's sign-in took {} ms", held.as_millis());
    ts.system.stop().await;
}

async fn user_id(ts: &TestSystem, username: &str) -> String {
    identity::list_users(&ts.config).await.unwrap().into_iter().find(|u| u.username == username).unwrap().id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_admins_manage_members_only_and_an_org_keeps_an_owner() {
    let ts = TestSystem::start().await;
    for (name, role) in [("olga", "owner"), ("adam", "admin"), ("alex", "admin"), ("mia", "member"), ("vic", "viewer")] {
        ts.add_user(name, "acme", role).await;
    }
    ts.add_user("gus", "globex", "owner").await;
    let admin = ts.sign_in("adam", &password_of("adam")).await.access_token;
    let act = |token: String, method: reqwest::Method, path: String, body: serde_json::Value| {
        let ts = &ts;
        async move { ts.http.request(method, format!("{}/api/v1/admin/users/{path}", ts.gateway())).bearer_auth(token).json(&body).send().await.unwrap() }
    };
    let (olga, alex, mia, vic, gus) = (user_id(&ts, "olga").await, user_id(&ts, "alex").await, user_id(&ts, "mia").await, user_id(&ts, "vic").await, user_id(&ts, "gus").await);
    let post = reqwest::Method::POST;
    let patch = reqwest::Method::PATCH;
    let none = serde_json::json!({});

    // An admin touches neither owners nor other admins, nor promotes anyone past member.
    let refused = act(admin.clone(), post.clone(), format!("{olga}/disable"), none.clone()).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(refused.json::<serde_json::Value>().await.unwrap()["code"], "admin.not_permitted");
    assert_eq!(act(admin.clone(), patch.clone(), olga.clone(), serde_json::json!({"role": "member"})).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(act(admin.clone(), post.clone(), format!("{olga}/reset"), none.clone()).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(act(admin.clone(), post.clone(), format!("{alex}/disable"), none.clone()).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(act(admin.clone(), patch.clone(), mia.clone(), serde_json::json!({"role": "admin"})).await.status(), StatusCode::FORBIDDEN);
    let made_owner = ts
        .http
        .post(format!("{}/api/v1/admin/users", ts.gateway()))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"username": "sneaky", "password": "a-long-password", "role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(made_owner.status(), StatusCode::FORBIDDEN, "an admin cannot create another admin");
    // …but manages members and viewers.
    assert_eq!(act(admin.clone(), patch.clone(), mia.clone(), serde_json::json!({"role": "viewer"})).await.status(), StatusCode::OK);
    assert_eq!(act(admin.clone(), post.clone(), format!("{vic}/disable"), none.clone()).await.status(), StatusCode::OK);
    // Another org's people are not there at all.
    assert_eq!(act(admin.clone(), post.clone(), format!("{gus}/disable"), none.clone()).await.status(), StatusCode::NOT_FOUND);

    // The owner manages admins; nobody re-roles themselves; the last owner stays.
    let owner = ts.sign_in("olga", &password_of("olga")).await.access_token;
    assert_eq!(act(owner.clone(), patch.clone(), olga.clone(), serde_json::json!({"role": "member"})).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(act(owner.clone(), post.clone(), format!("{olga}/disable"), none.clone()).await.status(), StatusCode::BAD_REQUEST);
    let demoted = act(owner.clone(), patch.clone(), alex.clone(), serde_json::json!({"role": "member"})).await;
    assert_eq!(demoted.status(), StatusCode::OK);
    assert_eq!(demoted.json::<serde_json::Value>().await.unwrap()["roles"], serde_json::json!(["member"]));
    // The org's only owner cannot be disabled even by a service acting for someone.
    let ctx = common::ServiceContext::new(std::sync::Arc::new(ts.config.clone()), common::ServiceName::Gateway, tokio_util::sync::CancellationToken::new()).unwrap();
    let as_owner = common::wire::Principal { sub: user_id(&ts, "olga").await, username: "olga".into(), org: "acme".into(), roles: vec!["owner".into()] };
    let last: Result<serde_json::Value, _> = ctx.peers.post_json(common::ServiceName::Identity, &format!("/internal/users/{olga}/disable"), Some(&as_owner), &none).await;
    let error = last.unwrap_err();
    assert_eq!(error.kind, common::ErrorKind::Conflict, "{error}");
    assert!(error.detail.contains("last owner"), "{error}");
    let demote_last: Result<serde_json::Value, _> = ctx.peers.post_json(common::ServiceName::Identity, &format!("/internal/users/{olga}/role"), Some(&as_owner), &serde_json::json!({"role": "admin"})).await;
    assert_eq!(demote_last.unwrap_err().kind, common::ErrorKind::Conflict);
    ts.system.stop().await;
}

/// Signs in at identity's form with `password`: the answer.
async fn submit_login(ts: &TestSystem, username: &str, password: &str) -> reqwest::Response {
    submit_login_with(ts, &ts.http, username, password).await
}

/// `submit_login` through `http` (a client bound to some source address, say).
async fn submit_login_with(ts: &TestSystem, http: &reqwest::Client, username: &str, password: &str) -> reqwest::Response {
    let challenge = "w".repeat(43);
    let params = [
        ("response_type", "code"),
        ("client_id", crate::helpers::CLIENT_ID),
        ("redirect_uri", crate::helpers::REDIRECT_URI),
        ("scope", "openid"),
        ("state", "s"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let html = http.get(format!("{}/authorize", ts.issuer())).query(&params).send().await.unwrap().text().await.unwrap();
    let mut form: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    form.push(("form_token".into(), crate::helpers::hidden_value(&html, "form_token").unwrap()));
    form.push(("username".into(), username.into()));
    form.push(("password".into(), password.into()));
    http.post(format!("{}/login", ts.issuer())).form(&form).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_admins_printed_password_works_once_and_must_be_replaced() {
    let ts = TestSystem::start().await;
    let printed = ts.system.admin_password.clone().expect("the first start prints a password");
    let first = submit_login(&ts, "admin", &printed).await;
    assert_eq!(first.status(), StatusCode::OK, "no code yet: a page asks for a new password");
    let page = first.text().await.unwrap();
    assert!(page.contains("Choose your password") && page.contains("name=\"new_password\""), "{page}");
    let mut form: Vec<(String, String)> = ["response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge", "code_challenge_method", "form_token", "change_token"]
        .iter()
        .filter_map(|name| crate::helpers::hidden_value(&page, name).map(|v| (name.to_string(), v)))
        .collect();
    assert_eq!(form.len(), 9);
    // The same password again, or two that differ, are refused on the page.
    let mut same = form.clone();
    same.extend([("new_password".to_string(), printed.clone()), ("new_password_again".to_string(), printed.clone())]);
    let refused = ts.http.post(format!("{}/login/password", ts.issuer())).form(&same).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let mut differ = form.clone();
    differ.extend([("new_password".to_string(), "one-new-password".to_string()), ("new_password_again".to_string(), "another-one".to_string())]);
    assert_eq!(ts.http.post(format!("{}/login/password", ts.issuer())).form(&differ).send().await.unwrap().status(), StatusCode::BAD_REQUEST);
    // A forged change token is refused.
    let mut forged = form.clone();
    for (name, value) in forged.iter_mut() {
        if name == "change_token" {
            let last = if value.ends_with('0') { '1' } else { '0' };
            *value = format!("{}{last}", &value[..value.len() - 1]);
        }
    }
    forged.extend([("new_password".to_string(), "my-own-admin-password".to_string()), ("new_password_again".to_string(), "my-own-admin-password".to_string())]);
    assert_eq!(ts.http.post(format!("{}/login/password", ts.issuer())).form(&forged).send().await.unwrap().status(), StatusCode::BAD_REQUEST);

    form.extend([("new_password".to_string(), "my-own-admin-password".to_string()), ("new_password_again".to_string(), "my-own-admin-password".to_string())]);
    let chosen = ts.http.post(format!("{}/login/password", ts.issuer())).form(&form).send().await.unwrap();
    assert_eq!(chosen.status(), StatusCode::SEE_OTHER, "the sign-in continues");
    assert!(chosen.headers()["location"].to_str().unwrap().contains("code="));
    assert_eq!(submit_login(&ts, "admin", &printed).await.status(), StatusCode::UNAUTHORIZED, "the printed password no longer works");
    assert_eq!(submit_login(&ts, "admin", "my-own-admin-password").await.status(), StatusCode::SEE_OTHER, "and the chosen one goes straight through");
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_never_pass_the_quota_and_the_rest_hear_413() {
    let ts = TestSystem::start_with(|config| config.storage.quota_bytes_per_user = 10 * 1024 * 1024).await;
    ts.add_user("uma", "acme", "member").await;
    let token = ts.sign_in("uma", &password_of("uma")).await.access_token;
    let size = 3 * 1024 * 1024;
    let uploads = (0..24).map(|n| {
        let (http, url, token) = (ts.http.clone(), format!("{}/api/v1/documents", ts.gateway()), token.clone());
        async move {
            // Distinct text files, so none is a duplicate of another.
            let line = format!("upload {n} says hello. ");
            let body: Vec<u8> = line.as_bytes().iter().cycle().take(size).copied().collect();
            let part = reqwest::multipart::Part::bytes(body).file_name(format!("file-{n}.txt")).mime_str("text/plain").unwrap();
            let answer = http.post(url).bearer_auth(token).multipart(reqwest::multipart::Form::new().part("file", part)).send().await.expect("an answer, not a reset connection");
            let status = answer.status();
            let body: serde_json::Value = answer.json().await.unwrap_or_default();
            (status, body)
        }
    });
    let answers = futures_util::future::join_all(uploads).await;
    let stored: Vec<_> = answers.iter().filter(|(s, _)| *s == StatusCode::ACCEPTED).collect();
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s == StatusCode::PAYLOAD_TOO_LARGE).collect();
    assert_eq!(stored.len() + refused.len(), 24, "only 202 or 413: {answers:?}");
    assert_eq!(stored.len(), 3, "three 3 MiB files fit in 10 MiB");
    assert!(refused.iter().all(|(_, body)| body["code"] == "storage.quota_exceeded"), "{refused:?}");
    let documents: serde_json::Value = ts.http.get(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    let total: u64 = documents["documents"].as_array().unwrap().iter().map(|d| d["size"].as_u64().unwrap()).sum();
    assert!(total <= 10 * 1024 * 1024, "stored {total} bytes");
    // The refused uploads' reservations were released: a small file still fits.
    let small = upload(&ts, &token, "small.txt", "text/plain", b"small and new".to_vec()).await;
    assert_eq!(small.status(), StatusCode::ACCEPTED);
    ts.system.stop().await;
}

fn client_from(address: &str) -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).local_address(address.parse::<std::net::IpAddr>().unwrap()).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_flood_is_throttled_and_leaves_everyone_else_alone() {
    let ts = TestSystem::start_with(|config| config.authz.denial_audit_window_secs = 2).await;
    ts.add_user("flo", "acme", "member").await;
    ts.add_user("ned", "acme", "member").await;
    ts.add_user("gus", "globex", "owner").await;
    let flo = ts.sign_in("flo", &password_of("flo")).await.access_token;
    let ned = ts.sign_in("ned", &password_of("ned")).await.access_token;
    let me = format!("{}/api/v1/me", ts.gateway());

    // Flo sends 1,000 requests as fast as 50 connections allow; Ned works meanwhile.
    let flooder = client_from("127.0.0.3");
    let flood = futures_util::stream::iter(0..1000)
        .map(|_| {
            let (http, url, token) = (flooder.clone(), me.clone(), flo.clone());
            async move {
                let answer = http.get(url).bearer_auth(token).send().await.unwrap();
                let retry_after = answer.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
                let status = answer.status();
                let code = answer.json::<serde_json::Value>().await.ok().and_then(|b| b["code"].as_str().map(str::to_string));
                (status, retry_after, code)
            }
        })
        .buffer_unordered(50)
        .collect::<Vec<_>>();
    let colleague = client_from("127.0.0.4");
    let steady = async {
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(colleague.get(&me).bearer_auth(&ned).send().await.unwrap().status());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        statuses
    };
    use futures_util::StreamExt;
    let started = std::time::Instant::now();
    let (flood, steady) = tokio::join!(flood, steady);
    let elapsed = started.elapsed().as_secs_f64();
    let throttled: Vec<_> = flood.iter().filter(|(s, _, _)| *s == StatusCode::TOO_MANY_REQUESTS).collect();
    let served = flood.iter().filter(|(s, _, _)| *s == StatusCode::OK).count();
    println!("flood: {served} served, {} throttled in {elapsed:.1} s", throttled.len());
    assert_eq!(served + throttled.len(), 1000);
    // The read budget: a burst of 200, then 20 a second.
    let most = 200.0 + 20.0 * elapsed + 10.0;
    assert!((served as f64) <= most && !throttled.is_empty(), "{served} served in {elapsed:.1} s; the budget allows {most:.0}");
    assert!(throttled.iter().all(|(_, retry, code)| retry.is_some_and(|r| r >= 1) && code.as_deref() == Some("request.rate_limited")), "429 with Retry-After and a code");
    assert!(steady.iter().all(|s| *s == StatusCode::OK), "the colleague is never throttled: {steady:?}");

    // An address with no credentials at all runs out of its own budget.
    let stranger = client_from("127.0.0.5");
    let started = std::time::Instant::now();
    let unauthenticated = futures_util::stream::iter(0..1600)
        .map(|_| {
            let (http, url) = (stranger.clone(), me.clone());
            async move { http.get(url).send().await.unwrap().status() }
        })
        .buffer_unordered(50)
        .collect::<Vec<_>>()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let answered = unauthenticated.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count();
    // The address budget: a burst of 1,000, then 100 a second.
    let most = 1000.0 + 100.0 * elapsed + 10.0;
    assert!((answered as f64) <= most && unauthenticated.contains(&StatusCode::TOO_MANY_REQUESTS), "{answered} answered in {elapsed:.1} s; the budget allows {most:.0}");
    let metrics = ts.http.get(format!("{}/metrics", ts.gateway())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("echo_gateway_throttled_total"), "throttling is counted");

    // Repeated identical denials are one audit record, then one with the count.
    let created: serde_json::Value = upload(&ts, &flo, "private.md", "text/markdown", b"# Private\n\nflo's notes\n".to_vec()).await.json().await.unwrap();
    let document = created["id"].as_str().unwrap().to_string();
    let gus = ts.sign_in("gus", &password_of("gus")).await.access_token;
    let prober = client_from("127.0.0.6");
    for _ in 0..150 {
        let status = prober.get(format!("{}/api/v1/documents/{document}", ts.gateway())).bearer_auth(&gus).send().await.unwrap().status();
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let gus_id = user_id(&ts, "gus").await;
    let denials = || {
        let (ts, gus, gus_id) = (&ts, &gus, &gus_id);
        async move {
            let audit: serde_json::Value = ts
                .http
                .get(format!("{}/api/v1/audit", ts.gateway()))
                .query(&[("actor", gus_id.as_str()), ("action", "authz.denied")])
                .bearer_auth(gus)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            audit["records"].as_array().cloned().unwrap_or_default()
        }
    };
    let records = crate::helpers::eventually("the folded denial record", Duration::from_secs(10), || async {
        let records = denials().await;
        records.iter().any(|r| r["context"]["repeated"].as_u64().is_some()).then_some(records)
    })
    .await;
    assert_eq!(records.len(), 2, "150 identical denials: the first, and one with the count: {records:#?}");
    let repeated: u64 = records.iter().filter_map(|r| r["context"]["repeated"].as_u64()).sum();
    assert_eq!(repeated, 149);
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_person_may_create_is_capped_with_a_clear_error() {
    let ts = TestSystem::start_with(|config| {
        config.authz.max_collections_per_user = 2;
        config.authz.max_groups_per_org = 1;
        config.chat.max_rooms_per_user = 2;
    })
    .await;
    ts.add_user("cap", "acme", "owner").await;
    let token = ts.sign_in("cap", &password_of("cap")).await.access_token;
    let create = |path: &'static str, name: String| {
        let (ts, token) = (&ts, token.clone());
        async move { ts.http.post(format!("{}/api/v1/{path}", ts.gateway())).bearer_auth(token).json(&serde_json::json!({"name": name})).send().await.unwrap() }
    };
    for (path, allowed, code) in [("collections", 2, "collection.limit_reached"), ("groups", 1, "group.limit_reached"), ("rooms", 2, "chat.limit_reached")] {
        for n in 0..allowed {
            assert_eq!(create(path, format!("{path} {n}")).await.status(), StatusCode::CREATED, "{path} {n}");
        }
        let refused = create(path, format!("{path} too many")).await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{path}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], code, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("the most allowed"), "{body}");
    }
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_rooms_are_for_their_members_only() {
    let ts = TestSystem::start().await;
    for name in ["rhea", "sam", "tom"] {
        ts.add_user(name, "acme", "member").await;
    }
    ts.add_user("ugo", "globex", "member").await;
    let rhea = ts.sign_in("rhea", &password_of("rhea")).await.access_token;
    let sam = ts.sign_in("sam", &password_of("sam")).await.access_token;
    let api = |method: reqwest::Method, path: String, token: String, body: Option<serde_json::Value>| {
        let ts = &ts;
        async move {
            let mut request = ts.http.request(method, format!("{}/api/v1/{path}", ts.gateway())).bearer_auth(token);
            if let Some(body) = body {
                request = request.json(&body);
            }
            let answer = request.send().await.unwrap();
            let status = answer.status();
            (status, answer.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    use reqwest::Method;
    let (status, room) = api(Method::POST, "rooms".into(), rhea.clone(), Some(serde_json::json!({"name": "plans"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let room = room["id"].as_str().unwrap().to_string();
    let messages = format!("rooms/{room}/messages");
    assert_eq!(api(Method::POST, messages.clone(), rhea.clone(), Some(serde_json::json!({"body": "secret plan"}))).await.0, StatusCode::CREATED);

    // Sam, of the same org but not invited, cannot see, read or post.
    let (_, listed) = api(Method::GET, "rooms".into(), sam.clone(), None).await;
    assert_eq!(listed, serde_json::json!([]));
    assert_eq!(api(Method::GET, messages.clone(), sam.clone(), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api(Method::POST, messages.clone(), sam.clone(), Some(serde_json::json!({"body": "hi"}))).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api(Method::GET, format!("rooms/{room}/members"), sam.clone(), None).await.0, StatusCode::NOT_FOUND);

    // Rhea invites Sam: now he reads and posts, but cannot change who is in the room.
    let sam_id = user_id(&ts, "sam").await;
    let rhea_id = user_id(&ts, "rhea").await;
    let members = serde_json::json!({"members": [{"user": rhea_id, "role": "owner"}, {"user": sam_id, "role": "member"}]});
    assert_eq!(api(Method::PUT, format!("rooms/{room}/members"), rhea.clone(), Some(members)).await.0, StatusCode::OK);
    let (status, history) = api(Method::GET, messages.clone(), sam.clone(), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history[0]["body"], "secret plan");
    assert_eq!(api(Method::POST, messages.clone(), sam.clone(), Some(serde_json::json!({"body": "count me in"}))).await.0, StatusCode::CREATED);
    let tom_id = user_id(&ts, "tom").await;
    let grab = serde_json::json!({"members": [{"user": sam_id, "role": "owner"}, {"user": tom_id, "role": "member"}]});
    assert_eq!(api(Method::PUT, format!("rooms/{room}/members"), sam.clone(), Some(grab)).await.0, StatusCode::FORBIDDEN);
    // Nobody of another org can be let in, and a room keeps an owner.
    let ugo_id = user_id(&ts, "ugo").await;
    let foreign = serde_json::json!({"members": [{"user": rhea_id, "role": "owner"}, {"user": ugo_id, "role": "member"}]});
    let (status, body) = api(Method::PUT, format!("rooms/{room}/members"), rhea.clone(), Some(foreign)).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("authz.unknown_member")));
    let ownerless = serde_json::json!({"members": [{"user": sam_id, "role": "member"}]});
    assert_eq!(api(Method::PUT, format!("rooms/{room}/members"), rhea.clone(), Some(ownerless)).await.0, StatusCode::BAD_REQUEST);
    let ugo = ts.sign_in("ugo", &password_of("ugo")).await.access_token;
    assert_eq!(api(Method::GET, messages.clone(), ugo, None).await.0, StatusCode::NOT_FOUND);

    // Removed again, Sam is out at once.
    let alone = serde_json::json!({"members": [{"user": rhea_id, "role": "owner"}]});
    assert_eq!(api(Method::PUT, format!("rooms/{room}/members"), rhea.clone(), Some(alone)).await.0, StatusCode::OK);
    assert_eq!(api(Method::GET, messages, sam, None).await.0, StatusCode::NOT_FOUND);
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smaller_holes_stay_closed() {
    let ts = TestSystem::start().await;
    ts.add_user("vera", "acme", "member").await;
    let token = ts.sign_in("vera", &password_of("vera")).await.access_token;
    // A filename that would display reversed loses its bidi override.
    let created: serde_json::Value = upload(&ts, &token, "invoice\u{202E}fdp.txt", "text/plain", b"an invoice".to_vec()).await.json().await.unwrap();
    let document: serde_json::Value =
        ts.http.get(format!("{}/api/v1/documents/{}", ts.gateway(), created["id"].as_str().unwrap())).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(document["filename"], "invoicefdp.txt");

    // Text well over 2 MB is indexed, not failed with an internal message.
    let big: Vec<u8> = b"The quarterly figures are in the annex. ".iter().cycle().take(3 * 1024 * 1024).copied().collect();
    let created: serde_json::Value = upload(&ts, &token, "big.txt", "text/plain", big).await.json().await.unwrap();
    let job = created["job_id"].as_str().unwrap().to_string();
    let done = crate::helpers::eventually("the large text to be indexed", Duration::from_secs(120), || async {
        let job: serde_json::Value = ts.http.get(format!("{}/api/v1/jobs/{job}", ts.gateway())).bearer_auth(&token).send().await.ok()?.json().await.ok()?;
        matches!(job["status"].as_str(), Some("done" | "failed")).then_some(job)
    })
    .await;
    assert_eq!(done["status"], "done", "{done}");

    // Listing pages are bounded.
    for limit in ["0", "100000", "-1"] {
        let answer = ts.http.get(format!("{}/api/v1/documents?limit={limit}", ts.gateway())).bearer_auth(&token).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "limit={limit}");
    }
    assert_eq!(ts.http.get(format!("{}/api/v1/documents?limit=500", ts.gateway())).bearer_auth(&token).send().await.unwrap().status(), StatusCode::OK);

    // Metrics are not for strangers: the public port answers them only with the
    // scrape token, or to the machine itself.
    assert_eq!(ts.http.get(format!("{}/metrics", ts.gateway())).send().await.unwrap().status(), StatusCode::OK, "the machine itself may scrape");
    let proxied = ts.http.get(format!("{}/metrics", ts.gateway())).header("x-forwarded-for", "203.0.113.9").send().await.unwrap();
    assert_eq!(proxied.status(), StatusCode::NOT_FOUND, "but not what a proxy on the machine forwards from outside");
    ts.system.stop().await;

    let ts = TestSystem::start_with(|config| {
        config.bind = "0.0.0.0".into();
        config.metrics_token = common::config::Secret("scrape-me-please".into());
    })
    .await;
    let public = first_non_loopback_address().expect("this machine has a non-loopback address");
    let port = ts.config.port(common::ServiceName::Gateway);
    let http = client_from(&public.to_string());
    let refused = http.get(format!("http://{public}:{port}/metrics")).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::NOT_FOUND, "no token, not loopback: nothing to see");
    let allowed = http.get(format!("http://{public}:{port}/metrics")).bearer_auth("scrape-me-please").send().await.unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
    assert!(allowed.text().await.unwrap().contains("echo_http_requests_total"));
    ts.system.stop().await;
}

/// An address of this machine that is not loopback (for a request that does not come
/// from 127.0.0.1).
fn first_non_loopback_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    socket.local_addr().ok().map(|a| a.ip()).filter(|ip| !ip.is_loopback())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profile_page_changes_the_password_and_keeps_only_this_browser() {
    let ts = TestSystem::start().await;
    ts.add_user("wren", "acme", "member").await;
    let (here, csrf) = ts.browser_session("wren").await;
    let (elsewhere, _) = ts.browser_session("wren").await;
    let page = ts.http.get(format!("{}/profile", ts.gateway())).header("cookie", &here).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("Change your password") && page.contains("Applications you allowed"), "{page}");
    let form = [("csrf", csrf.as_str()), ("current_password", &password_of("wren")), ("new_password", "wren-new-passphrase"), ("new_password_again", "wren-new-passphrase")];
    let changed = ts.http.post(format!("{}/profile/password", ts.gateway())).header("cookie", &here).form(&form).send().await.unwrap();
    assert_eq!(changed.status(), StatusCode::SEE_OTHER);
    let renewed = crate::helpers::cookie_named(&changed, "echo_session").unwrap();
    let page = ts.http.get(format!("{}/profile?changed=1", ts.gateway())).header("cookie", &renewed).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("everywhere else you are signed out"));
    for old in [here, elsewhere] {
        let answer = ts.http.get(format!("{}/profile", ts.gateway())).header("cookie", &old).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::SEE_OTHER, "the old sessions go to sign-in");
    }
    let forged = ts.http.post(format!("{}/profile/password", ts.gateway())).header("cookie", &renewed).form(&[("csrf", "nope"), ("current_password", "x"), ("new_password", "y-y-y-y-y-y"), ("new_password_again", "y-y-y-y-y-y")]).send().await.unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    ts.system.stop().await;
}
