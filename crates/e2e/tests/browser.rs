//! The web UI in real headless Chromium, driven over the W3C WebDriver protocol by
//! chromedriver: sign in through identity's login page, upload through the documents
//! page (the page's own script sends the file and polls the job), ask, and follow a
//! citation. Skipped with a reason when Chromium or chromedriver is not installed
//! (`.ci/run` installs Debian's `chromium` and `chromium-driver`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "system/helpers.rs"]
mod helpers;
#[path = "support/chromium.rs"]
mod chromium;

use std::time::Duration;

use serde_json::{Value, json};

use chromium::{Browser, chromium_or_skip};
use helpers::{TestSystem, password_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_uploads_and_follows_a_citation_in_chromium() {
    let Some((chromium, chromedriver)) = chromium_or_skip() else { return };
    let ts = TestSystem::start().await;
    ts.add_user("hana", "acme", "member").await;
    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::start(&chromium, &chromedriver, profile.path()).await;

    browser.goto(&format!("{}/documents", ts.gateway())).await;
    assert!(browser.current_url().await.starts_with(&format!("{}/authorize", ts.issuer())), "signed-out visitors go to the login page");
    browser.type_into("input[name=username]", "hana").await;
    browser.type_into("input[name=password]", &password_of("hana")).await;
    browser.click("button[type=submit]").await;
    browser.wait_for("the documents page", |s| s.contains("<h1>Documents</h1>")).await;
    assert_eq!(browser.current_url().await, format!("{}/documents", ts.gateway()));

    let file = profile.path().join("handbook.md");
    std::fs::write(&file, "# Handbook\n\n## Launch\n\nThe launch code is tangerine-42.\n").unwrap();
    browser.type_into("input[type=file]", file.to_str().unwrap()).await;
    browser.click("#upload button").await;
    browser.wait_for("the upload to be indexed", |s| s.contains("handbook.md") && s.contains("status status-done")).await;
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    browser.screenshot(&shots.join("documents.png")).await;

    browser.click("header a[href='/ask']").await;
    browser.wait_for("the ask page", |s| s.contains("Ask your documents")).await;
    browser.type_into("textarea[name=question]", "What is the launch code?").await;
    browser.click("#ask-form button.primary").await;
    browser.wait_for("the answer on its own page", |s| s.contains("href=\"#cite-1-1\"")).await;
    let first_answer = browser.current_url().await;
    assert!(first_answer.contains("/ask/") && first_answer.contains("answer=1"), "{first_answer}");
    // A citation opens expanded, the quoted words highlighted.
    browser.click("a[href='#cite-1-1']").await;
    let page = browser.wait_for("the citation to open", |s| s.contains("id=\"cite-1-1\" open")).await;
    assert!(page.contains("<mark>") && page.contains("tangerine-42"), "the quote is highlighted");
    assert!(page.contains("handbook.md"), "the citation names its document");
    browser.screenshot(&shots.join("ask.png")).await;
    // A follow-up in the same conversation gets its own address; Back returns to the first.
    browser.type_into("textarea[name=question]", "And who may enter it?").await;
    browser.click("#ask-form button.primary").await;
    browser.wait_for("the follow-up", |s| s.contains("href=\"#cite-3-1\"")).await;
    assert!(browser.current_url().await.contains("answer=3#m3"), "the follow-up answer has its own address");
    browser.call(reqwest::Method::POST, "/back", Some(json!({}))).await;
    let page = browser.wait_for("the first answer again", |s| s.contains("href=\"#cite-1-1\"")).await;
    // The same answer's page (at the citation last opened there), not a re-sent form.
    let without_fragment = |url: &str| url.split('#').next().unwrap().to_string();
    assert_eq!(without_fragment(&browser.current_url().await), without_fragment(&first_answer));
    assert!(!page.contains("Confirm Form Resubmission"));

    // Collections: create one, share it with a colleague, take the share back, delete it.
    ts.add_user("ivo", "acme", "member").await;
    browser.click("header a[href='/collections']").await;
    browser.wait_for("the collections page", |s| s.contains("<h1>Collections</h1>")).await;
    browser.type_into("form[action='/collections'] input[name=name]", "Team handbook").await;
    browser.click("form[action='/collections'] button").await;
    let page = browser.wait_for("the new collection", |s| s.contains("Created the collection Team handbook.")).await;
    let heading = page.find("<h2 style=\"margin-top: 0\">Team handbook</h2>").expect("the collection is listed");
    let marker = "data-collection=\"";
    let start = page[..heading].rfind(marker).unwrap() + marker.len();
    let id = page[start..start + page[start..].find('"').unwrap()].to_string();
    let section = format!("section[data-collection='{id}']");
    browser.click(&format!("{section} select[name=member] option")).await;
    browser.click(&format!("{section} form button.primary")).await;
    let page = browser.wait_for("the share", |s| s.contains("Shared as viewer.")).await;
    let shared = &page[page.find(&format!("data-collection=\"{id}\"")).unwrap()..];
    assert!(shared.contains("<td>ivo</td><td>viewer</td>"), "the member is listed by name and role");
    browser.click(&format!("{section} table form button")).await;
    browser.wait_for("the share to go", |s| s.contains("Removed.")).await;
    browser.click(&format!("{section} form[action$='/delete'] button")).await;
    browser.call(reqwest::Method::POST, "/alert/accept", Some(json!({}))).await;
    let page = browser.wait_for("the deletion", |s| s.contains("Deleted the collection and its documents.")).await;
    assert!(!page.contains("Team handbook"));
    browser.quit().await;
    ts.system.stop().await;
}

/// A language model's stand-in over the OpenAI protocol on a real socket: it streams the
/// words of `ANSWER` one by one, `GAP` apart, citing passage 1.
const ANSWER: &str = "The launch code is tangerine-42 [1] and only the shift lead may enter it [1].";
const GAP: Duration = Duration::from_millis(150);

async fn slow_model() -> String {
    use axum::response::sse::{Event, Sse};
    async fn completions() -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
        let words: Vec<String> = ANSWER.split_inclusive(' ').map(str::to_string).collect();
        let n = words.len();
        let stream = futures_util::stream::unfold(0usize, move |i| {
            let words = words.clone();
            async move {
                if i > n {
                    return None;
                }
                tokio::time::sleep(GAP).await;
                let data = if i < n {
                    json!({"id": "s", "object": "chat.completion.chunk", "created": 0, "model": "slow", "choices": [{"index": 0, "delta": {"content": words[i]}, "finish_reason": null}]}).to_string()
                } else {
                    "[DONE]".to_string()
                };
                Some((Ok(Event::default().data(data)), i + 1))
            }
        });
        Sse::new(stream)
    }
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(completions));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_answer_streams_into_the_page_word_by_word() {
    let Some((chromium, chromedriver)) = chromium_or_skip() else { return };
    let url = slow_model().await;
    let ts = TestSystem::start_with(move |config| {
        config.llm.provider = "openai".into();
        config.llm.base_url = url;
        config.llm.model = "slow".into();
    })
    .await;
    ts.add_user("hana", "acme", "member").await;
    let token = ts.sign_in("hana", &password_of("hana")).await.access_token;
    let document = ts.upload(&token, "handbook.md", "text/markdown", b"# Handbook\n\n## Launch\n\nThe launch code is tangerine-42. Only the shift lead may enter it.\n".to_vec()).await;
    ts.wait_indexed(&token, &document).await;
    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::start(&chromium, &chromedriver, profile.path()).await;
    browser.goto(&format!("{}/ask", ts.gateway())).await;
    browser.type_into("input[name=username]", "hana").await;
    browser.type_into("input[name=password]", &password_of("hana")).await;
    browser.click("button[type=submit]").await;
    browser.wait_for("the ask page", |s| s.contains("Ask your documents")).await;
    browser.type_into("textarea[name=question]", "What is the launch code?").await;
    browser.click("#ask-form button.primary").await;
    // What the reader sees while the model writes: a growing answer, several states.
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Read without failing: the page may be between documents when it moves on.
        let script = json!({"script": "var e = document.getElementById('live-text'); return e ? e.textContent : '';", "args": []});
        let answer: Value = match browser.http.post(format!("{}/execute/sync", browser.base)).json(&script).send().await {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        match answer["value"].as_str() {
            Some("") if !seen.is_empty() => break, // the stored answer's page: streaming is over
            Some(text) if !text.is_empty() && seen.last().map(String::as_str) != Some(text) => seen.push(text.to_string()),
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "the answer did not finish streaming: {seen:?}");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(seen.len() >= 4, "the answer appeared in {} steps: {seen:?}", seen.len());
    assert!(seen.windows(2).all(|w| w[1].starts_with(w[0].as_str())), "each state extends the last: {seen:?}");
    assert!(seen[0].len() < ANSWER.len() / 2, "the first words showed before the rest were written: {seen:?}");
    let page = browser.wait_for("the stored answer", |s| s.contains("href=\"#cite-1-1\"")).await;
    assert!(page.contains("tangerine-42"));
    browser.quit().await;
    ts.system.stop().await;
}

/// The sign-in attacks of the P1.1 attack run, in a real browser: the first admin's
/// printed password must be replaced on a page of its own; a callback URL made by
/// someone else's sign-in signs nobody in; and a `return_to` that browsers would read
/// as another site (a tab inside `/\t/evil.example`) lands on Echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_attacks_fail_in_chromium() {
    let Some((chromium, chromedriver)) = chromium_or_skip() else { return };
    let ts = TestSystem::start().await;
    let printed = ts.system.admin_password.clone().unwrap();
    ts.add_user("mallory", "acme", "member").await;
    ts.add_user("quinn", "acme", "member").await;
    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::start(&chromium, &chromedriver, profile.path()).await;
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    // The first admin signs in with the printed password and must choose another.
    browser.goto(&format!("{}/documents", ts.gateway())).await;
    browser.type_into("input[name=username]", "admin").await;
    browser.type_into("input[name=password]", &printed).await;
    browser.click("button[type=submit]").await;
    browser.wait_for("the choose-a-password page", |s| s.contains("Choose your password")).await;
    browser.screenshot(&shots.join("first-password.png")).await;
    browser.type_into("input[name=new_password]", "the-admins-own-password").await;
    browser.type_into("input[name=new_password_again]", "the-admins-own-password").await;
    browser.click("button[type=submit]").await;
    browser.wait_for("the documents page", |s| s.contains("<h1>Documents</h1>")).await;
    assert!(browser.current_url().await.starts_with(&ts.gateway()));
    browser.click("header form button").await;
    browser.wait_for("the signed-out page", |s| s.contains("You are signed out")).await;

    // Login CSRF: Mallory's unopened callback URL, opened in this browser, signs no one in.
    let mallorys = ts.browser_start_sign_in("/auth/login", "mallory").await;
    browser.goto(&mallorys.callback).await;
    let page = browser.wait_for("the refusal", |s| s.contains("another browser")).await;
    assert!(!page.contains("mallory"), "not signed in as the attacker");
    browser.goto(&format!("{}/documents", ts.gateway())).await;
    assert!(browser.current_url().await.starts_with(&format!("{}/authorize", ts.issuer())), "still signed out: {}", browser.current_url().await);

    // Open redirect: a tab hidden in return_to does not take the browser off-site.
    browser.goto(&format!("{}/auth/login?return_to=%2F%09%2Fevil.example", ts.gateway())).await;
    browser.type_into("input[name=username]", "quinn").await;
    browser.type_into("input[name=password]", &password_of("quinn")).await;
    browser.click("button[type=submit]").await;
    browser.wait_for("a page of Echo", |s| s.contains("<h1>Documents</h1>")).await;
    let landed = browser.current_url().await;
    assert!(landed.starts_with(&ts.gateway()), "landed on {landed}");
    browser.quit().await;
    ts.system.stop().await;
}
