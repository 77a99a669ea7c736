//! Interop with a third-party OIDC client: Authlib (Python) runs code + PKCE against a
//! running Echo, submits the login form, validates the ID token with its own JOSE code
//! against the JWKS, calls userinfo, rotates a refresh token, introspects and revokes
//! tokens, and logs out. Needs a Python with
//! Authlib named by `ECHO_INTEROP_PYTHON` (`.ci/run` creates one); skipped otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "system/helpers.rs"]
mod helpers;

use helpers::{TestSystem, password_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_completes_code_and_pkce_and_validates_the_id_token() {
    let Ok(python) = std::env::var("ECHO_INTEROP_PYTHON") else {
        let reason = "set ECHO_INTEROP_PYTHON to a Python with authlib and requests (.ci/run does) to run the Authlib interop test";
        assert!(std::env::var_os("CI").is_none(), "CI must run the interop test: {reason}");
        println!("SKIPPED: {reason}");
        return;
    };
    let ts = TestSystem::start().await;
    ts.add_user("ivy", "acme", "member").await;
    let redirect = "http://127.0.0.1:9/authlib-callback";
    identity::add_client(&ts.config, "authlib-backend", vec!["http://127.0.0.1:9/unused".into()], Some("backend-secret-0123456789"), "RS256").await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/oidc_authlib.py");
    let issuer = ts.issuer();
    let password = password_of("ivy");
    // One public client per algorithm a client may choose; Authlib validates each.
    for alg in ["RS256", "ES256", "EdDSA"] {
        let client_id = format!("authlib-{}", alg.to_ascii_lowercase());
        identity::add_client(&ts.config, &client_id, vec![redirect.into()], None, alg).await.unwrap();
        let output = tokio::process::Command::new(&python)
            .args([script, issuer.as_str(), client_id.as_str(), redirect, "ivy", password.as_str(), "authlib-backend", "backend-secret-0123456789"])
            .output()
            .await
            .expect("python runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "authlib interop failed for {alg}:\n{stdout}\n{stderr}");
        assert!(stdout.contains(&format!("validated against the JWKS (alg {alg},")), "{stdout}");
        assert!(stdout.contains("refresh-token rotation"), "{stdout}");
        assert!(stdout.contains("ok: introspection, revocation"), "{stdout}");
        assert!(stdout.contains("ok: RP-initiated logout"), "{stdout}");
    }
    ts.system.stop().await;
}

/// The strict third-party relying party: panva's openid-client 6 (npm) drives code +
/// PKCE for each signing algorithm with signature checks, scopes at the gateway,
/// refresh rotation and reuse, revocation, logout, CORS, the authorization endpoint's
/// edge cases (POST, request objects, `iss` on errors, prompt combinations), RFC 8252
/// loopback redirects, client credentials, and consent. Needs a directory holding
/// `node_modules/openid-client`, named by `ECHO_INTEROP_NODE_DIR` (`.ci/run` makes one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openid_client_passes_the_whole_conformance_suite() {
    let Ok(node_dir) = std::env::var("ECHO_INTEROP_NODE_DIR") else {
        let reason = "set ECHO_INTEROP_NODE_DIR to a directory with node_modules/openid-client (.ci/run makes one) to run the openid-client suite";
        assert!(std::env::var_os("CI").is_none(), "CI must run the openid-client suite: {reason}");
        println!("SKIPPED: {reason}");
        return;
    };
    let node_dir = std::path::PathBuf::from(node_dir);
    assert!(node_dir.join("node_modules/openid-client").exists(), "no openid-client under {}", node_dir.display());
    let ts = TestSystem::start().await;
    identity::add_user(&ts.config, "oscar", &password_of("oscar"), "acme", "member", Some("oscar@example.org".into())).await.unwrap();
    let redirect = "http://127.0.0.1:9/openid-client-callback";
    let mut public_clients = serde_json::Map::new();
    for alg in ["RS256", "ES256", "EdDSA"] {
        let client_id = format!("oc-{}", alg.to_ascii_lowercase());
        identity::add_client(&ts.config, &client_id, vec![redirect.into()], None, alg).await.unwrap();
        public_clients.insert(alg.into(), client_id.into());
    }
    identity::add_client(&ts.config, "oc-native", vec!["http://127.0.0.1/callback".into()], None, "RS256").await.unwrap();
    identity::add_client(&ts.config, "oc-machine", vec!["https://machine.example/unused".into()], Some("machine-secret-0123456789"), "ES256").await.unwrap();
    let consent = identity::NewClient { client_id: "oc-consent", redirect_uris: vec![redirect.into()], secret: None, signing_alg: "RS256", consent: true };
    identity::register_client(&ts.config, consent).await.unwrap();
    let setup = serde_json::json!({
        "issuer": ts.issuer(),
        "gateway": ts.gateway(),
        "username": "oscar",
        "password": password_of("oscar"),
        "email": "oscar@example.org",
        "redirect_uri": redirect,
        "public_clients": public_clients,
        "loopback_client": "oc-native",
        "confidential": {"client_id": "oc-machine", "secret": "machine-secret-0123456789"},
        "consent_client": "oc-consent",
    });
    let work = tempfile::tempdir().unwrap();
    let setup_path = work.path().join("setup.json");
    std::fs::write(&setup_path, setup.to_string()).unwrap();
    // Node resolves packages from the script's own directory upwards.
    let script = node_dir.join("openid_client.mjs");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/openid_client.mjs"), &script).unwrap();
    let output = tokio::process::Command::new("node").arg(&script).arg(&setup_path).output().await.expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "openid-client suite failed:\n{stdout}\n{stderr}");
    for check in ["with RS256", "with ES256", "with EdDSA", "ok: scopes", "ok: refresh rotation", "ok: RP-initiated logout", "ok: CORS", "ok: POST /authorize", "ok: RFC 8252", "ok: client_credentials", "ok: consent"] {
        assert!(stdout.contains(check), "missing check `{check}`:\n{stdout}");
    }
    ts.system.stop().await;
}

/// Echo as an OpenAI-compatible model, as the ecosystem's clients use it: the official
/// `openai` library (streamed and not, with usage, history for a follow-up) and
/// LangChain's `ChatOpenAI` (`tests/interop/openai_clients.py`, in the same virtualenv).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_library_and_langchain_talk_to_echo() {
    let Ok(python) = std::env::var("ECHO_INTEROP_PYTHON") else {
        let reason = "set ECHO_INTEROP_PYTHON to a Python with openai and langchain-openai (.ci/run does) to run the OpenAI-client interop test";
        assert!(std::env::var_os("CI").is_none(), "CI must run the interop test: {reason}");
        println!("SKIPPED: {reason}");
        return;
    };
    let ts = TestSystem::start().await;
    ts.add_user("oli", "acme", "member").await;
    let token = ts.sign_in("oli", &password_of("oli")).await.access_token;
    let handbook = "# Reactor handbook\n\n## Launch\n\nThe launch code is tangerine-42. Only the shift lead may enter the launch code.\n";
    let created = ts.upload(&token, "handbook.md", "text/markdown", handbook.as_bytes().to_vec()).await;
    ts.wait_indexed(&token, &created).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/openai_clients.py");
    let base = format!("{}/v1", ts.gateway());
    let output = tokio::process::Command::new(&python)
        .args([script, base.as_str(), token.as_str(), "What is the launch code?", "tangerine-42", "And who may enter it?", "shift lead"])
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "OpenAI-client interop failed:\n{stdout}\n{stderr}");
    for check in ["a completion reports usage", "include_usage adds the usage chunk", "a follow-up uses the history in messages", "LangChain ChatOpenAI.stream"] {
        assert!(stdout.contains(&format!("ok: {check}")), "{stdout}");
    }
    ts.system.stop().await;
}
