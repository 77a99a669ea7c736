//! `echod bench identity`, `echod bench authz` (and `echod bench queue` and `echod bench flood`, in `bench/`): figures measured against a real
//! system started in a temporary data dir (ports chosen by the OS).
//!
//! - JWT verification: p50/p99 of `common::auth::TokenVerifier::verify` (what every
//!   service runs on every request), keys cached, over many iterations.
//! - Password logins per second through the real login form at the configured argon2id
//!   parameters (OWASP: m = 19 MiB, t = 2, p = 1), `concurrency` clients at once.
//! - Rejection time for known vs unknown usernames (they must not differ measurably).

pub mod answers;
pub mod api;
mod corpus;
pub mod embed;
pub mod flood;
pub mod parse;
mod python;
pub mod quality;
pub mod queue;
pub mod search;
pub mod smollm;

use std::time::{Duration, Instant};

use common::{EchoConfig, ServiceName};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// An access token (scope `echo`) for `username`, by code + PKCE through the login form.
pub async fn sign_in(http: &reqwest::Client, issuer: &str, client: &str, redirect: &str, username: &str, password: &str) -> anyhow::Result<String> {
    let verifier = common::rand::token(48);
    let challenge = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, <sha2::Sha256 as sha2::Digest>::digest(verifier.as_bytes()));
    let params = [
        ("response_type", "code"),
        ("client_id", client),
        ("redirect_uri", redirect),
        ("scope", "openid echo"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let page = http.get(format!("{issuer}/authorize")).query(&params).send().await?.text().await?;
    let marker = "name=\"form_token\" value=\"";
    let start = page.find(marker).map(|i| i + marker.len()).ok_or_else(|| anyhow::anyhow!("no form token"))?;
    let form_token = page[start..start + page[start..].find('"').unwrap_or(0)].to_string();
    let mut form: Vec<(&str, &str)> = params.to_vec();
    form.extend([("username", username), ("password", password), ("form_token", form_token.as_str())]);
    let answer = http.post(format!("{issuer}/login")).form(&form).send().await?;
    let location = answer.headers().get("location").and_then(|v| v.to_str().ok()).ok_or_else(|| anyhow::anyhow!("sign-in did not redirect"))?;
    let code = url::Url::parse(location)?.query_pairs().find(|(k, _)| k == "code").map(|(_, v)| v.into_owned()).ok_or_else(|| anyhow::anyhow!("no code"))?;
    let tokens: serde_json::Value = http
        .post(format!("{issuer}/token"))
        .form(&[("grant_type", "authorization_code"), ("code", &code), ("redirect_uri", redirect), ("client_id", client), ("code_verifier", &verifier)])
        .send()
        .await?
        .json()
        .await?;
    tokens["access_token"].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("no access token: {tokens}"))
}

struct LoginClient {
    http: reqwest::Client,
    issuer: String,
}

impl LoginClient {
    /// One full form submission; returns the status.
    async fn login(&self, username: &str, password: &str) -> anyhow::Result<u16> {
        let challenge = "c".repeat(43);
        let params = [
            ("response_type", "code"),
            ("client_id", "bench"),
            ("redirect_uri", "http://127.0.0.1:9/cb"),
            ("scope", "openid"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        let page = self.http.get(format!("{}/authorize", self.issuer)).query(&params).send().await?.text().await?;
        let marker = "name=\"form_token\" value=\"";
        let start = page.find(marker).map(|i| i + marker.len()).ok_or_else(|| anyhow::anyhow!("no form token"))?;
        let form_token = &page[start..start + page[start..].find('"').unwrap_or(0)];
        let mut form: Vec<(&str, &str)> = params.to_vec();
        form.extend([("username", username), ("password", password), ("form_token", form_token)]);
        Ok(self.http.post(format!("{}/login", self.issuer)).form(&form).send().await?.status().as_u16())
    }
}

pub async fn identity(iterations: usize, logins: usize, concurrency: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = EchoConfig::for_test(dir.path());
    config.log.ship = false;
    let system = crate::up(config).await?;
    crate::wait_ready(&system.config, Duration::from_secs(60)).await?;
    let config = (*system.config).clone();
    identity::add_client(&config, "bench", vec!["http://127.0.0.1:9/cb".into()], None, "RS256").await?;
    let n_users = concurrency.max(1) * 2;
    for i in 0..n_users {
        identity::add_user(&config, &format!("bench{i}"), "bench-password-123", "bench", "member", None).await?;
    }
    let issuer = config.issuer();

    // JWT verification, as every service does it.
    let secret = std::fs::read_to_string(config.service_secret_path(ServiceName::Rag))?;
    let http = reqwest::Client::new();
    let answer: serde_json::Value = http
        .post(format!("{issuer}/token"))
        .basic_auth("svc-rag", Some(secret.trim()))
        .form(&[("grant_type", "client_credentials"), ("audience", "echo:search")])
        .send()
        .await?
        .json()
        .await?;
    let token = answer["access_token"].as_str().ok_or_else(|| anyhow::anyhow!("no token"))?.to_string();
    let verifier = common::auth::TokenVerifier::new(&issuer, &config.url(ServiceName::Identity), http.clone());
    verifier.verify(&token, "echo:search").await?;
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        verifier.verify(&token, "echo:search").await?;
        samples.push(started.elapsed());
    }
    samples.sort();
    println!("jwt_verify_rs256: n={iterations} p50={:?} p99={:?} max={:?}", percentile(&samples, 0.5), percentile(&samples, 0.99), samples.last().copied().unwrap_or_default());

    // The one expensive step of a sign-in, alone on one core.
    let mut hashes = tokio::task::spawn_blocking(|| identity::time_password_verifications(30)).await?;
    hashes.sort();
    println!(
        "argon2id_verify (m=19MiB,t=2,p=1, one thread): n={} p50={:?} p99={:?} = {:.1} verifications/s/core",
        hashes.len(),
        percentile(&hashes, 0.5),
        percentile(&hashes, 0.99),
        1.0 / percentile(&hashes, 0.5).as_secs_f64().max(1e-9)
    );

    // Password logins per second through the form.
    let client = std::sync::Arc::new(LoginClient { http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?, issuer: issuer.clone() });
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency.max(1) {
        let client = client.clone();
        let share = logins / concurrency.max(1);
        tasks.spawn(async move {
            let mut ok = 0usize;
            for i in 0..share {
                // Alternate users so per-account throttling never applies.
                let user = format!("bench{}", (worker * 2 + i % 2) % n_users);
                if client.login(&user, "bench-password-123").await? == 303 {
                    ok += 1;
                }
            }
            anyhow::Ok(ok)
        });
    }
    let mut ok = 0;
    while let Some(done) = tasks.join_next().await {
        ok += done??;
    }
    let elapsed = started.elapsed();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let per_second = ok as f64 / elapsed.as_secs_f64();
    println!("password_logins: ok={ok} in {elapsed:?} = {per_second:.1}/s on {cores} cores = {:.1}/s/core (concurrency {concurrency})", per_second / cores as f64);

    // Known vs unknown usernames: rejection time must not tell them apart. Few
    // attempts per name so throttling does not start; fresh names for the unknowns.
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for round in 0..4 {
        for i in 0..n_users {
            // Alternate which goes first so neither pays for the other's warm-up.
            for known_first in [round % 2 == 0, round % 2 == 1] {
                let (name, samples) = if known_first { (format!("bench{i}"), &mut known) } else { (format!("nobody-{round}-{i}"), &mut unknown) };
                let started = Instant::now();
                client.login(&name, "wrong-password").await?;
                samples.push(started.elapsed());
            }
        }
    }
    known.sort();
    unknown.sort();
    let (k, u) = (percentile(&known, 0.5), percentile(&unknown, 0.5));
    println!("reject_known_user: median {k:?}; reject_unknown_user: median {u:?}; difference {:?}", k.abs_diff(u));
    system.stop().await;
    Ok(())
}

/// `echod bench authz`: Cedar decisions in-process; `POST /v1/decide` over loopback at
/// a fixed offered rate (open loop: latency includes any queueing); and
/// `POST /v1/readable` for a user in an org of `n_collections` collections.
pub async fn authz(iterations: usize, n_collections: usize, rate: usize, seconds: u64) -> anyhow::Result<()> {
    // In-process: the engine alone.
    let figures = tokio::task::spawn_blocking(move || authz::bench::in_process(n_collections, iterations, 5)).await?.map_err(anyhow::Error::msg)?;
    let mut single = figures.single;
    single.sort();
    println!(
        "decision_in_process: n={} p50={:?} p99={:?} max={:?}",
        single.len(),
        percentile(&single, 0.5),
        percentile(&single, 0.99),
        single.last().copied().unwrap_or_default()
    );
    let mut list = figures.list;
    list.sort();
    println!("list_in_process ({n_collections} collections, {} readable): median {:?} over {} rounds", figures.n_readable, percentile(&list, 0.5), list.len());

    // Over HTTP, against the real service.
    let dir = tempfile::tempdir()?;
    let mut config = EchoConfig::for_test(dir.path());
    config.log.ship = false;
    config.log.level = "warn".into();
    let system = crate::up(config).await?;
    crate::wait_ready(&system.config, Duration::from_secs(60)).await?;
    let config = (*system.config).clone();
    authz::bench::seed(&config, "bench", "owner-id", "reader-id", n_collections).await?;
    let ctx = common::ServiceContext::new(std::sync::Arc::new(config.clone()), ServiceName::Gateway, tokio_util::sync::CancellationToken::new())?;
    let peers = ctx.peers.clone();
    let reader = common::wire::Principal { sub: "reader-id".into(), username: "reader".into(), org: "bench".into(), roles: vec!["member".into()] };
    let sent = Instant::now();
    let readable: common::wire::ReadableCollections = peers.post_json(ServiceName::Authz, "/v1/readable", Some(&reader), &serde_json::json!({})).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let cold = sent.elapsed();
    let target = readable.collections.first().cloned().ok_or_else(|| anyhow::anyhow!("nothing readable"))?;
    let request = common::wire::DecisionRequest { action: "document:read_chunks".into(), resource_type: "Collection".into(), resource_id: target, classification: Some("internal".into()), new_role: None };
    for _ in 0..200 {
        let _: common::wire::Decision = peers.post_json(ServiceName::Authz, "/v1/decide", Some(&reader), &request).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // Open loop: every millisecond, start rate/1000 requests without waiting for earlier ones.
    let per_tick = (rate / 1000).max(1);
    let ticks = seconds * 1000;
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(rate * seconds as usize)));
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..ticks {
        interval.tick().await;
        for _ in 0..per_tick {
            let (peers, reader, request, samples, errors) = (peers.clone(), reader.clone(), request.clone(), samples.clone(), errors.clone());
            tasks.spawn(async move {
                let sent = Instant::now();
                let outcome: Result<common::wire::Decision, _> = peers.post_json(ServiceName::Authz, "/v1/decide", Some(&reader), &request).await;
                match outcome {
                    Ok(decision) if decision.allowed => samples.lock().map(|mut s| s.push(sent.elapsed())).unwrap_or(()),
                    _ => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let mut samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    samples.sort();
    println!(
        "decision_http: offered {rate}/s for {seconds} s; completed {} ({:.0}/s), errors {}; p50={:?} p99={:?} max={:?}",
        samples.len(),
        samples.len() as f64 / elapsed.as_secs_f64(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default()
    );
    let mut lists = Vec::new();
    for _ in 0..10 {
        let sent = Instant::now();
        let readable: common::wire::ReadableCollections = peers.post_json(ServiceName::Authz, "/v1/readable", Some(&reader), &serde_json::json!({})).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        lists.push(sent.elapsed());
        std::hint::black_box(readable.collections.len());
    }
    lists.sort();
    println!(
        "list_http ({n_collections} collections, {} readable): first (every collection evaluated) {cold:?}; repeated (relationships unchanged) p50={:?} max={:?}",
        readable.collections.len(),
        percentile(&lists, 0.5),
        lists.last().copied().unwrap_or_default()
    );
    system.stop().await;
    Ok(())
}
