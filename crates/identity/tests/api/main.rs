//! Identity over HTTP, started by its real `run` on a free port: discovery, JWKS,
//! client credentials with audience binding, and refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_jwks_and_service_tokens_work_and_wrong_secrets_do_not() {
    let echo = TestEcho::start().await;
    let http = reqwest::Client::new();
    let issuer = echo.config.issuer();
    let discovery: serde_json::Value = http.get(format!("{issuer}/.well-known/openid-configuration")).send().await.unwrap().json().await.unwrap();
    assert_eq!(discovery["issuer"], issuer.as_str());
    assert_eq!(discovery["code_challenge_methods_supported"], serde_json::json!(["S256"]));
    let jwks: serde_json::Value = http.get(discovery["jwks_uri"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
    let mut algs: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["alg"].as_str().unwrap()).collect();
    algs.sort_unstable();
    assert_eq!(algs, ["ES256", "EdDSA", "RS256"], "one published key per signing algorithm");
    assert!(jwks["keys"].as_array().unwrap().iter().all(|k| k["kid"].is_string() && k["use"] == "sig"));
    assert_eq!(discovery["id_token_signing_alg_values_supported"], serde_json::json!(["RS256", "ES256", "EdDSA"]));

    let secret = std::fs::read_to_string(echo.config.service_secret_path(ServiceName::Rag)).unwrap();
    let token = |secret: String, audience: &'static str| {
        let http = http.clone();
        let url = format!("{issuer}/token");
        async move {
            http.post(url)
                .basic_auth("svc-rag", Some(secret))
                .form(&[("grant_type", "client_credentials"), ("audience", audience)])
                .send()
                .await
                .unwrap()
        }
    };
    let granted = token(secret.clone(), "echo:search").await;
    assert_eq!(granted.status(), 200);
    let body: serde_json::Value = granted.json().await.unwrap();
    let access = body["access_token"].as_str().unwrap().to_string();
    let verifier = common::auth::TokenVerifier::new(&issuer, &issuer, reqwest::Client::new());
    let claims = verifier.verify(&access, "echo:search").await.unwrap();
    assert_eq!(claims.sub, "svc-rag");
    assert!(verifier.verify(&access, "echo:authz").await.is_err(), "a token for search is not a token for authz");

    // A token for search does not open authz's internal API.
    let refused = http.get(format!("{}/v1/collections", echo.url(ServiceName::Authz))).bearer_auth(&access).send().await.unwrap();
    assert_eq!(refused.status(), 401);

    assert_eq!(token("wrong".into(), "echo:search").await.status(), 401);
    let not_a_service = token(secret, "https://evil.example").await;
    assert_eq!(not_a_service.status(), 400);
    assert_eq!(not_a_service.json::<serde_json::Value>().await.unwrap()["error"], "invalid_target");
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_verifying_through_a_key_rotation() {
    let echo = TestEcho::start().await;
    let issuer = echo.config.issuer();
    let secret = std::fs::read_to_string(echo.config.service_secret_path(ServiceName::Rag)).unwrap();
    let http = reqwest::Client::new();
    let mint = || {
        let (http, issuer, secret) = (http.clone(), issuer.clone(), secret.clone());
        async move {
            let answer: serde_json::Value = http
                .post(format!("{issuer}/token"))
                .basic_auth("svc-rag", Some(secret))
                .form(&[("grant_type", "client_credentials"), ("audience", "echo:search")])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            answer["access_token"].as_str().unwrap().to_string()
        }
    };
    let kid = |token: &str| jsonwebtoken_kid(token);
    // A verifier like every service's: it caches the JWKS and refetches on an unknown kid.
    let verifier = common::auth::TokenVerifier::new(&issuer, &issuer, reqwest::Client::new());
    let before = mint().await;
    verifier.verify(&before, "echo:search").await.unwrap();

    // Rotated from outside (as `echod keys rotate` does); the running identity picks the
    // key up within its 2 s reload. The lead must exceed that plus the verifiers'
    // minimum refetch interval (5 s).
    identity::rotate_keys(&echo.config, 8).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(18);
    let mut published = false;
    let (mut checked, mut failures, mut kids) = (0, 0, std::collections::BTreeSet::new());
    while tokio::time::Instant::now() < deadline {
        if !published {
            let jwks: serde_json::Value = http.get(format!("{issuer}/jwks")).send().await.unwrap().json().await.unwrap();
            published = jwks["keys"].as_array().unwrap().len() == 6;
            if published {
                assert_eq!(kids.len(), 1, "the new key is published before it signs");
            }
        }
        let token = mint().await;
        kids.insert(kid(&token));
        for token in [&token, &before] {
            checked += 1;
            if verifier.verify(token, "echo:search").await.is_err() {
                failures += 1;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(failures, 0, "{failures} of {checked} verifications failed during the rotation");
    assert_eq!(kids.len(), 2, "tokens were signed by the old key, then by the new one: {kids:?}");
    let published_after: serde_json::Value = http.get(format!("{issuer}/jwks")).send().await.unwrap().json().await.unwrap();
    assert_eq!(published_after["keys"].as_array().unwrap().len(), 6, "the old keys stay published while their tokens live");
    echo.stop().await;
}

fn jsonwebtoken_kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_string()
}
