//! Headless Chromium driven over the W3C WebDriver protocol by chromedriver, for the
//! tests that use the web UI as a person does. Shared by test binaries with `#[path]`.

#![allow(dead_code)] // each test binary uses part of it

use std::time::Duration;

use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub(crate) struct Browser {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    driver: tokio::process::Child,
}

impl Browser {
    pub(crate) async fn start(chromium: &str, chromedriver: &str, profile: &std::path::Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = tokio::process::Command::new(chromedriver).arg(format!("--port={port}")).kill_on_drop(true).spawn().expect("chromedriver starts");
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while http.get(format!("{root}/status")).send().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,900",
                     format!("--user-data-dir={}", profile.display())]
        }}}});
        let session: Value = http.post(format!("{root}/session")).json(&capabilities).send().await.unwrap().json().await.unwrap();
        let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {session}")).to_string();
        Browser { http, base: format!("{root}/session/{id}"), driver }
    }

    pub(crate) async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        if answer["value"].get("error").is_some() {
            panic!("webdriver {path}: {answer}");
        }
        answer["value"].clone()
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    pub(crate) async fn find(&self, css: &str) -> String {
        let found = self.call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css}))).await;
        found[ELEMENT].as_str().unwrap().to_string()
    }

    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{element}/value"), Some(json!({"text": text}))).await;
    }

    pub(crate) async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{element}/click"), Some(json!({}))).await;
    }

    pub(crate) async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None).await.as_str().unwrap().to_string()
    }

    pub(crate) async fn current_url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None).await.as_str().unwrap().to_string()
    }

    pub(crate) async fn wait_for(&self, what: &str, mut check: impl FnMut(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let source = self.source().await;
            if check(&source) {
                return source;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; page:\n{source}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(crate) async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    pub(crate) async fn quit(mut self) {
        let _ = self.http.delete(&self.base).send().await;
        let _ = self.driver.kill().await;
    }
}

fn installed(candidates: &[&str]) -> Option<String> {
    candidates.iter().find(|p| std::path::Path::new(p).exists()).map(|p| p.to_string())
}

/// (chromium, chromedriver), or `None` after saying why the test is skipped; under CI
/// (where `.ci/run` installs them) their absence fails the test instead.
pub(crate) fn chromium_or_skip() -> Option<(String, String)> {
    let found = installed(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]).zip(installed(&["/usr/bin/chromedriver"]));
    if found.is_none() {
        let reason = "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver; .ci/run does)";
        assert!(std::env::var_os("CI").is_none(), "CI must run the browser test: {reason}");
        println!("SKIPPED: {reason}");
    }
    found
}

