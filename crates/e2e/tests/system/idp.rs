//! Identity as users and operators meet it: clients with their own signing
//! algorithm (and keys that cannot be swapped between algorithms), single sign-on
//! with `prompt` and `max_age`, open sign-up, password-reset mail over a real SMTP
//! conversation (and the outbox when the server is gone), and the operator role that
//! rotates keys and reloads policies while org admins cannot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use sha2::Digest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::helpers::{REDIRECT_URI, TestSystem, eventually, hidden_value, password_of};

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn header_of(token: &str) -> serde_json::Value {
    serde_json::from_slice(&b64().decode(token.split('.').next().unwrap()).unwrap()).unwrap()
}

/// The same token with its header replaced.
fn with_header(token: &str, header: &serde_json::Value) -> String {
    let mut parts = token.splitn(2, '.');
    let _ = parts.next();
    format!("{}.{}", b64().encode(header.to_string()), parts.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_choose_their_signing_algorithm_and_keys_cannot_be_swapped() {
    let ts = TestSystem::start().await;
    ts.add_user("alba", "acme", "member").await;
    let jwks: serde_json::Value = ts.http.get(format!("{}/jwks", ts.issuer())).send().await.unwrap().json().await.unwrap();
    let published: HashMap<String, String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["alg"].as_str().unwrap().to_string(), k["kid"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(published.len(), 3, "one key per algorithm: {jwks}");
    for key in jwks["keys"].as_array().unwrap() {
        assert_eq!(key["use"], "sig");
        assert!(key.get("d").is_none() && key.get("p").is_none(), "no private members are published: {key}");
    }

    let me = |token: String| {
        let ts = &ts;
        async move { ts.http.get(format!("{}/api/v1/me", ts.gateway())).bearer_auth(token).send().await.unwrap().status() }
    };
    let mut access = HashMap::new();
    for alg in ["RS256", "ES256", "EdDSA"] {
        let client = format!("e2e-{}", alg.to_ascii_lowercase());
        identity::add_client(&ts.config, &client, vec![REDIRECT_URI.into()], None, alg).await.unwrap();
        let tokens = ts.sign_in_with(&client, "alba", &password_of("alba")).await;
        for token in [&tokens.access_token, &tokens.id_token] {
            let header = header_of(token);
            assert_eq!(header["alg"], alg, "{client}: {header}");
            assert_eq!(header["kid"].as_str(), Some(published[alg].as_str()));
        }
        // The ID token verifies from the JWKS alone, as any relying party does it.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(
            jwks["keys"].as_array().unwrap().iter().find(|k| k["alg"] == alg).unwrap().clone(),
        )
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(alg.parse().unwrap());
        validation.set_audience(&[client.as_str()]);
        validation.set_issuer(&[ts.issuer()]);
        let decoded = jsonwebtoken::decode::<serde_json::Value>(&tokens.id_token, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &validation);
        assert_eq!(decoded.unwrap().claims["preferred_username"], "alba");
        assert_eq!(me(tokens.access_token.clone()).await, StatusCode::OK, "the gateway accepts {alg} access tokens");
        access.insert(alg, tokens.access_token);
    }

    // Algorithm confusion: a token may not claim another algorithm or another key.
    for (alg, token) in &access {
        for (other_alg, other_kid) in &published {
            if other_alg == alg {
                continue;
            }
            let mut header = header_of(token);
            header["kid"] = serde_json::json!(other_kid);
            assert_eq!(me(with_header(token, &header)).await, StatusCode::UNAUTHORIZED, "{alg} token under the {other_alg} key");
            let mut header = header_of(token);
            header["alg"] = serde_json::json!(other_alg);
            assert_eq!(me(with_header(token, &header)).await, StatusCode::UNAUTHORIZED, "{alg} token relabelled {other_alg}");
        }
        let mut header = header_of(token);
        header["alg"] = serde_json::json!("HS256");
        assert_eq!(me(with_header(token, &header)).await, StatusCode::UNAUTHORIZED);
    }
    let refused = identity::add_client(&ts.config, "e2e-hs", vec![REDIRECT_URI.into()], None, "HS256").await;
    assert!(refused.unwrap_err().to_string().contains("RS256, ES256 or EdDSA"));
    ts.system.stop().await;
}

/// A browser at identity's pages: keeps identity's session cookie between requests.
struct Browser {
    http: reqwest::Client,
    issuer: String,
    cookie: Option<String>,
}

struct Authorize<'a> {
    client_id: &'a str,
    extra: Vec<(&'a str, &'a str)>,
}

impl Browser {
    fn new(ts: &TestSystem) -> Browser {
        Browser { http: ts.http.clone(), issuer: ts.issuer(), cookie: None }
    }

    fn params(request: &Authorize<'_>) -> Vec<(String, String)> {
        let challenge = b64().encode(sha2::Sha256::digest(b"sso-verifier-0123456789-abcdefghijklmnopqrstuvwxyz"));
        let mut params: Vec<(String, String)> = [
            ("response_type", "code"),
            ("client_id", request.client_id),
            ("redirect_uri", REDIRECT_URI),
            ("scope", "openid profile"),
            ("state", "st"),
            ("nonce", "n"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        params.extend(request.extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        params
    }

    async fn get(&self, url: &str, query: &[(String, String)]) -> reqwest::Response {
        let mut request = self.http.get(url).query(query);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", format!("echo_idp={cookie}"));
        }
        request.send().await.unwrap()
    }

    fn remember(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all("set-cookie") {
            let value = value.to_str().unwrap();
            if let Some(rest) = value.strip_prefix("echo_idp=") {
                let id = rest.split(';').next().unwrap().to_string();
                self.cookie = (!id.is_empty()).then_some(id);
            }
        }
    }

    async fn authorize(&self, request: &Authorize<'_>) -> reqwest::Response {
        self.get(&format!("{}/authorize", self.issuer), &Self::params(request)).await
    }

    /// Submits the login form a page showed, as the person would.
    async fn log_in(&mut self, page: String, username: &str) -> reqwest::Response {
        let mut form: Vec<(String, String)> = Vec::new();
        for name in ["response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge", "code_challenge_method", "prompt", "max_age", "form_token"] {
            if let Some(value) = hidden_value(&page, name) {
                form.push((name.into(), value));
            }
        }
        form.push(("username".into(), username.into()));
        form.push(("password".into(), password_of(username)));
        let response = self.http.post(format!("{}/login", self.issuer)).form(&form).send().await.unwrap();
        self.remember(&response);
        response
    }
}

fn code_of(response: &reqwest::Response) -> Option<String> {
    let location = url::Url::parse(response.headers().get("location")?.to_str().ok()?).ok()?;
    location.query_pairs().find(|(k, _)| k == "code").map(|(_, v)| v.into_owned())
}

fn error_of(response: &reqwest::Response) -> Option<String> {
    let location = url::Url::parse(response.headers().get("location")?.to_str().ok()?).ok()?;
    location.query_pairs().find(|(k, _)| k == "error").map(|(_, v)| v.into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sign_on_honours_prompt_and_max_age() {
    let ts = TestSystem::start().await;
    ts.add_user("sso", "acme", "member").await;
    for client in ["app-one", "app-two"] {
        identity::add_client(&ts.config, client, vec![REDIRECT_URI.into()], None, "RS256").await.unwrap();
    }
    let mut browser = Browser::new(&ts);
    let none = Authorize { client_id: "app-one", extra: vec![("prompt", "none")] };
    let answer = browser.authorize(&none).await;
    assert_eq!(answer.status(), StatusCode::SEE_OTHER);
    assert_eq!(error_of(&answer).as_deref(), Some("login_required"), "prompt=none without a session goes back with an error");

    let page = browser.authorize(&Authorize { client_id: "app-one", extra: vec![] }).await;
    assert_eq!(page.status(), StatusCode::OK, "the first application shows the login form");
    let signed_in = browser.log_in(page.text().await.unwrap(), "sso").await;
    assert!(code_of(&signed_in).is_some() && browser.cookie.is_some());

    // The second application: no form, straight back with a code.
    let second = browser.authorize(&Authorize { client_id: "app-two", extra: vec![] }).await;
    assert_eq!(second.status(), StatusCode::SEE_OTHER, "SSO: no password the second time");
    assert!(code_of(&second).is_some());
    assert!(code_of(&browser.authorize(&none).await).is_some(), "prompt=none succeeds while the session lives");

    // prompt=login asks again, and the re-posted form (carrying prompt) works.
    let again = browser.authorize(&Authorize { client_id: "app-two", extra: vec![("prompt", "login")] }).await;
    assert_eq!(again.status(), StatusCode::OK, "prompt=login forces the form");
    let html = again.text().await.unwrap();
    assert_eq!(hidden_value(&html, "prompt").as_deref(), Some("login"));
    let reauthenticated = browser.log_in(html, "sso").await;
    assert_eq!(reauthenticated.status(), StatusCode::SEE_OTHER);
    assert!(code_of(&reauthenticated).is_some(), "re-authentication completes");

    // max_age: a session older than allowed must sign in again.
    let recent = browser.authorize(&Authorize { client_id: "app-one", extra: vec![("max_age", "3600")] }).await;
    assert_eq!(recent.status(), StatusCode::SEE_OTHER, "a fresh session satisfies max_age=3600");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = browser.authorize(&Authorize { client_id: "app-one", extra: vec![("max_age", "1")] }).await;
    assert_eq!(stale.status(), StatusCode::OK, "a session older than max_age shows the form");
    let html = stale.text().await.unwrap();
    assert_eq!(hidden_value(&html, "max_age").as_deref(), Some("1"));
    assert_eq!(browser.log_in(html, "sso").await.status(), StatusCode::SEE_OTHER, "and the form with max_age completes");

    // A bare link to logout (another site's <img src>, say) only asks; the session stays.
    let cookie = browser.cookie.clone().unwrap();
    let asked = browser.get(&format!("{}/logout", ts.issuer()), &[]).await;
    assert_eq!(asked.status(), StatusCode::OK);
    let page = asked.text().await.unwrap();
    assert!(page.contains("Sign out of Echo?"), "{page}");
    assert_eq!(browser.authorize(&Authorize { client_id: "app-two", extra: vec![] }).await.status(), StatusCode::SEE_OTHER, "still signed in");
    // A forged confirmation is refused; the page's own form signs out.
    let forged = ts.http.post(format!("{}/logout", ts.issuer())).header("cookie", format!("echo_idp={cookie}")).form(&[("logout_token", "1.00")]).send().await.unwrap();
    assert_eq!(forged.status(), StatusCode::OK, "asked again");
    assert_eq!(browser.authorize(&Authorize { client_id: "app-two", extra: vec![] }).await.status(), StatusCode::SEE_OTHER, "still signed in");
    let token = hidden_value(&page, "logout_token").unwrap();
    let confirmed = ts.http.post(format!("{}/logout", ts.issuer())).header("cookie", format!("echo_idp={cookie}")).form(&[("logout_token", token.as_str())]).send().await.unwrap();
    assert!(confirmed.text().await.unwrap().contains("You are signed out"));
    browser.cookie = Some(cookie);
    assert_eq!(browser.authorize(&Authorize { client_id: "app-two", extra: vec![] }).await.status(), StatusCode::OK, "the old cookie no longer signs in");
    ts.system.stop().await;
}

/// A real SMTP conversation on a socket, recording each message's DATA. It speaks
/// just enough of RFC 5321 for a client to deliver: greeting, EHLO, MAIL, RCPT,
/// DATA, QUIT.
struct SmtpSink {
    port: u16,
    messages: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpSink {
    async fn start() -> SmtpSink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let store = messages.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    write.write_all(b"220 sink.test ESMTP\r\n").await.unwrap();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let verb = line.split_whitespace().next().unwrap_or_default().to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250-sink.test\r\n250 8BITMIME\r\n",
                            "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 OK\r\n",
                            "DATA" => {
                                write.write_all(b"354 go ahead\r\n").await.unwrap();
                                let mut data = String::new();
                                while let Ok(Some(line)) = lines.next_line().await {
                                    if line == "." {
                                        break;
                                    }
                                    data.push_str(&line);
                                    data.push('\n');
                                }
                                store.lock().unwrap().push(data);
                                b"250 queued\r\n"
                            }
                            "QUIT" => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                break;
                            }
                            _ => b"502 not implemented\r\n",
                        };
                        if write.write_all(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SmtpSink { port, messages, task }
    }
}

/// Undoes quoted-printable (RFC 2045 §6.7) as a mail reader does: soft line breaks
/// and `=XX` escapes.
fn decode_quoted_printable(body: &str) -> String {
    let joined = body.replace("=\r\n", "").replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() && joined.is_char_boundary(i + 3) && u8::from_str_radix(&joined[i + 1..i + 3], 16).is_ok() {
            out.push(u8::from_str_radix(&joined[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn reset_token_in(mail: &str) -> String {
    let mail = if mail.contains("Content-Transfer-Encoding: quoted-printable") { decode_quoted_printable(mail) } else { mail.to_string() };
    let start = mail.find("token=").expect("a reset link") + "token=".len();
    mail[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_sign_up_and_reset_mail_over_smtp_with_the_outbox_as_fallback() {
    let sink = SmtpSink::start().await;
    let smtp_url = format!("smtp://127.0.0.1:{}", sink.port);
    let ts = TestSystem::start_with(|config| {
        config.identity.open_signup = true;
        config.identity.signup_org = "community".into();
        config.identity.smtp_url = common::config::Secret(smtp_url);
    })
    .await;
    let browser = Browser::new(&ts);
    let login = browser.authorize(&Authorize { client_id: crate::helpers::CLIENT_ID, extra: vec![] }).await.text().await.unwrap();
    let marker = "New to Echo? <a href=\"";
    let start = login.find(marker).expect("the login page offers sign-up") + marker.len();
    let href = login[start..login[start..].find('"').unwrap() + start].replace("&#38;", "&").replace("&amp;", "&").replace("&#x2f;", "/").replace("&#x2F;", "/");
    let form_page = ts.http.get(&href).send().await.unwrap();
    assert_eq!(form_page.status(), StatusCode::OK);
    let html = form_page.text().await.unwrap();
    assert!(html.contains("community"), "the page says which org a new account joins");

    let submit = |username: &'static str, email: &'static str, password: &'static str| {
        let mut form: Vec<(String, String)> = Vec::new();
        for name in ["response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge", "code_challenge_method", "form_token"] {
            if let Some(value) = hidden_value(&html, name) {
                form.push((name.into(), value));
            }
        }
        form.extend([("username".into(), username.into()), ("email".into(), email.into()), ("password".into(), password.into())]);
        let request = ts.http.post(format!("{}/signup", ts.issuer())).form(&form);
        async move { request.send().await.unwrap() }
    };
    assert_eq!(submit("newbie", "newbie@example.org", "short").await.status(), StatusCode::BAD_REQUEST, "the password policy applies");
    assert_eq!(submit("newbie", "not-an-address", "newbie-password-2026").await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(submit("bad name!", "", "newbie-password-2026").await.status(), StatusCode::BAD_REQUEST);
    let created = submit("newbie", "newbie@example.org", "newbie-password-2026").await;
    assert_eq!(created.status(), StatusCode::SEE_OTHER, "sign-up signs the new user in and continues to the app");
    assert!(code_of(&created).is_some());
    assert!(created.headers().get_all("set-cookie").iter().any(|v| v.to_str().unwrap().starts_with("echo_idp=")));
    assert_eq!(submit("newbie", "", "another-password-2026").await.status(), StatusCode::CONFLICT, "usernames are unique");

    let tokens = ts.sign_in("newbie", "newbie-password-2026").await;
    let me: serde_json::Value =
        ts.http.get(format!("{}/api/v1/me", ts.gateway())).bearer_auth(&tokens.access_token).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["org"], "community");
    assert_eq!(me["roles"], serde_json::json!(["member"]), "self-registered users are plain members: {me}");

    // The reset mail goes over SMTP.
    let forgot = ts.http.post(format!("{}/forgot", ts.issuer())).form(&[("username", "newbie")]).send().await.unwrap();
    assert_eq!(forgot.status(), StatusCode::OK);
    let mail = eventually("the mail at the SMTP server", Duration::from_secs(15), || {
        let messages = sink.messages.clone();
        async move { messages.lock().unwrap().first().cloned() }
    })
    .await;
    assert!(mail.contains("To: newbie@example.org") && mail.contains("Subject: Reset your Echo password"), "{mail}");
    let token = reset_token_in(&mail);
    let reset = ts.http.post(format!("{}/reset", ts.issuer())).form(&[("token", token.as_str()), ("password", "newbie-renewed-2026")]).send().await.unwrap();
    assert_eq!(reset.status(), StatusCode::OK);
    ts.sign_in("newbie", "newbie-renewed-2026").await;
    let outbox = ts.config.data_dir.join("outbox");
    assert_eq!(std::fs::read_dir(&outbox).map(|d| d.count()).unwrap_or(0), 0, "delivered mail is not also kept");

    // The mail server goes away: the message waits in the outbox instead of being lost.
    sink.task.abort();
    let _ = sink.task.await;
    let forgot = ts.http.post(format!("{}/forgot", ts.issuer())).form(&[("username", "newbie")]).send().await.unwrap();
    assert_eq!(forgot.status(), StatusCode::OK);
    let kept = eventually("the mail in the outbox", Duration::from_secs(30), || {
        let outbox = outbox.clone();
        async move {
            let message = std::fs::read_dir(&outbox).ok()?.filter_map(Result::ok).find(|e| e.file_name().to_string_lossy().ends_with(".eml"))?;
            Some(std::fs::read_to_string(message.path()).unwrap())
        }
    })
    .await;
    assert!(kept.contains("To: newbie@example.org") && !reset_token_in(&kept).is_empty());
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_up_is_closed_by_default_and_only_operators_rotate_keys_or_reload_policies() {
    let ts = TestSystem::start().await;
    let closed = ts.http.get(format!("{}/signup", ts.issuer())).send().await.unwrap();
    assert_eq!(closed.status(), StatusCode::NOT_FOUND);
    assert!(closed.text().await.unwrap().contains("Ask them for one"));
    let login = ts.http.get(format!("{}/authorize", ts.issuer())).query(&Browser::params(&Authorize { client_id: crate::helpers::CLIENT_ID, extra: vec![] })).send().await.unwrap();
    assert!(!login.text().await.unwrap().contains("Create an account"));

    let admin = identity::list_users(&ts.config).await.unwrap().into_iter().find(|u| u.username == "admin").unwrap();
    assert_eq!(admin.roles, ["owner", "operator"], "the installation's first admin is its operator");
    ts.add_user("boss", "acme", "owner").await;
    ts.add_user("ops", "acme", "member").await;
    let post = |token: String, path: &'static str| {
        let ts = &ts;
        async move { ts.http.post(format!("{}/api/v1{path}", ts.gateway())).bearer_auth(token).json(&serde_json::json!({"lead_secs": 30})).send().await.unwrap() }
    };
    let owner = ts.sign_in("boss", &password_of("boss")).await;
    let forbidden = post(owner.access_token.clone(), "/admin/keys/rotate").await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN, "an org owner is not an operator");
    assert_eq!(forbidden.json::<serde_json::Value>().await.unwrap()["code"], "auth.operator_required");
    assert_eq!(post(owner.access_token, "/admin/policies/reload").await.status(), StatusCode::FORBIDDEN);

    let granted = identity::set_operator(&ts.config, "ops", true).await.unwrap();
    assert!(granted.roles.contains(&"operator".to_string()));
    let operator = ts.sign_in("ops", &password_of("ops")).await;
    let rotated = post(operator.access_token.clone(), "/admin/keys/rotate").await;
    assert_eq!(rotated.status(), StatusCode::OK);
    let rotated: serde_json::Value = rotated.json().await.unwrap();
    assert_eq!(rotated["kids"].as_array().unwrap().len(), 3, "a new key for every algorithm: {rotated}");
    let jwks: serde_json::Value = ts.http.get(format!("{}/jwks", ts.issuer())).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 6, "new keys are published ahead of use, old ones kept");
    // Tokens signed before keep working; new ones are still signed by the old keys until the lead passes.
    assert_eq!(ts.http.get(format!("{}/api/v1/me", ts.gateway())).bearer_auth(&operator.access_token).send().await.unwrap().status(), StatusCode::OK);
    let fresh = ts.sign_in("ops", &password_of("ops")).await;
    assert!(!rotated["kids"].as_array().unwrap().contains(&header_of(&fresh.access_token)["kid"]), "the new key waits for its lead time");

    let reloaded = post(operator.access_token.clone(), "/admin/policies/reload").await;
    assert_eq!(reloaded.status(), StatusCode::OK);
    assert_eq!(reloaded.json::<serde_json::Value>().await.unwrap()["reloaded"], true);

    // Revoked: the next token has no operator role and the API says no again.
    identity::set_operator(&ts.config, "ops", false).await.unwrap();
    let after = ts.sign_in("ops", &password_of("ops")).await;
    assert_eq!(post(after.access_token, "/admin/keys/rotate").await.status(), StatusCode::FORBIDDEN);

    // Each step is in the audit log, attributed to whoever did it. Org admins see
    // their org's records only; what no org owns (the CLI's grants) only operators see.
    let ops_id = identity::list_users(&ts.config).await.unwrap().into_iter().find(|u| u.username == "ops").unwrap().id;
    ts.add_user("watcher", "infra", "member").await;
    identity::set_operator(&ts.config, "watcher", true).await.unwrap();
    ts.add_user("rival", "globex", "owner").await;
    let audit_of = |username: &'static str| {
        let ts = &ts;
        async move {
            let token = ts.sign_in(username, &password_of(username)).await.access_token;
            let answer = ts.http.get(format!("{}/api/v1/audit?limit=1000", ts.gateway())).bearer_auth(token).send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::OK, "{username} reads the audit log");
            answer.json::<serde_json::Value>().await.unwrap()["records"].as_array().unwrap().clone()
        }
    };
    let has = |records: &[serde_json::Value], action: &str, actor: &str| records.iter().any(|r| r["action"] == action && r["actor"] == actor);
    let operator_view = eventually("operator actions audited", Duration::from_secs(20), || async {
        let records = audit_of("watcher").await;
        (has(&records, "identity.operator_granted", "cli")
            && has(&records, "identity.operator_revoked", "cli")
            && has(&records, "identity.key_rotated", &ops_id)
            && has(&records, "authz.policies_reloaded", &ops_id)
            // Records reach the audit log over the bus: wait for globex's too.
            && records.iter().any(|r| r["org"] == "acme")
            && records.iter().any(|r| r["org"] == "globex"))
        .then_some(records)
    })
    .await;
    assert!(operator_view.iter().any(|r| r["org"] == "acme") && operator_view.iter().any(|r| r["org"] == "globex"), "operators see every org");
    let owner_view = audit_of("boss").await;
    assert!(has(&owner_view, "identity.key_rotated", &ops_id), "acme's owner sees what acme's users did");
    assert!(owner_view.iter().all(|r| r["org"] == "acme"), "and nothing else");
    assert!(!has(&owner_view, "identity.operator_granted", "cli"));
    let rival_view = audit_of("rival").await;
    assert!(!rival_view.is_empty() && rival_view.iter().all(|r| r["org"] == "globex"), "another org's owner sees only theirs");
    let forced = ts
        .http
        .get(format!("{}/api/v1/audit?org=acme", ts.gateway()))
        .bearer_auth(ts.sign_in("rival", &password_of("rival")).await.access_token)
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert!(forced["records"].as_array().unwrap().iter().all(|r| r["org"] == "globex"), "asking for another org's records changes nothing");
    ts.system.stop().await;
}
