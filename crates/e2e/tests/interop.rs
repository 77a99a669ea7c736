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
