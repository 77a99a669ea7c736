//! Interop with the Rust `openidconnect` crate (a third-party client library): discovery,
//! code + PKCE through the login form, the ID token verified by the crate's own JOSE
//! code against the JWKS (signature, issuer, audience, nonce, expiry, `at_hash`), and a
//! refresh — once per signing algorithm a client can choose (RS256, ES256, EdDSA). The
//! crate speaks HTTP through reqwest 0.13 here, via its closure client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "system/helpers.rs"]
mod helpers;

use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreJwsSigningAlgorithm, CoreProviderMetadata};
use openidconnect::{
    AccessTokenHash, AuthorizationCode, ClientId, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, RedirectUrl, Scope,
    TokenResponse,
};

use helpers::{TestSystem, hidden_value, password_of};

#[derive(Debug)]
struct HttpError(String);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpError {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openidconnect_crate_signs_in_and_verifies_the_id_token() {
    let ts = TestSystem::start().await;
    ts.add_user("oli", "acme", "member").await;
    for (alg, expected) in [
        ("RS256", CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256),
        ("ES256", CoreJwsSigningAlgorithm::EcdsaP256Sha256),
        ("EdDSA", CoreJwsSigningAlgorithm::EdDsa),
    ] {
        sign_in_and_verify(&ts, alg, expected).await;
    }
    ts.system.stop().await;
}

async fn sign_in_and_verify(ts: &TestSystem, alg: &str, expected: CoreJwsSigningAlgorithm) {
    let redirect = "http://127.0.0.1:9/rust-callback";
    let client_id = format!("oidc-rs-{}", alg.to_ascii_lowercase());
    identity::add_client(&ts.config, &client_id, vec![redirect.into()], None, alg).await.unwrap();

    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let transport = http.clone();
    let http_client = move |request: openidconnect::HttpRequest| {
        let transport = transport.clone();
        async move {
            let (parts, body) = request.into_parts();
            let response = transport
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| HttpError(e.to_string()))?;
            let mut builder = http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let bytes = response.bytes().await.map_err(|e| HttpError(e.to_string()))?;
            builder.body(bytes.to_vec()).map_err(|e| HttpError(e.to_string()))
        }
    };

    let metadata = CoreProviderMetadata::discover_async(IssuerUrl::new(ts.issuer()).unwrap(), &http_client).await.expect("discovery");
    let client = CoreClient::from_provider_metadata(metadata, ClientId::new(client_id.clone()), None).set_redirect_uri(RedirectUrl::new(redirect.into()).unwrap());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf, nonce) = client
        .authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
        .add_scope(Scope::new("profile".into()))
        .add_scope(Scope::new("offline_access".into()))
        .add_scope(Scope::new("echo".into()))
        .set_pkce_challenge(challenge)
        .url();

    // The person at the login form.
    let page = http.get(url.as_str()).send().await.unwrap().text().await.unwrap();
    let names = ["response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge", "code_challenge_method", "form_token"];
    let mut form: Vec<(String, String)> = names.iter().map(|n| (n.to_string(), hidden_value(&page, n).unwrap())).collect();
    form.push(("username".into(), "oli".into()));
    form.push(("password".into(), password_of("oli")));
    let back = http.post(format!("{}/login", ts.issuer())).form(&form).send().await.unwrap();
    let location = url::Url::parse(back.headers()["location"].to_str().unwrap()).unwrap();
    let query: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(query["state"], *csrf.secret());

    let tokens = client
        .exchange_code(AuthorizationCode::new(query["code"].clone()))
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http_client)
        .await
        .expect("code exchange");
    let id_token = tokens.id_token().expect("an ID token");
    assert_eq!(id_token.signing_alg().unwrap(), &expected, "{client_id} gets tokens signed with its algorithm");
    // The crate accepts only RS256 unless told otherwise, as a careful client does.
    let id_verifier = client.id_token_verifier().set_allowed_algs(vec![expected.clone()]);
    let claims = id_token.claims(&id_verifier, &nonce).expect("the ID token verifies against the JWKS");
    assert_eq!(claims.preferred_username().map(|u| u.as_str()), Some("oli"));
    let expected_hash = claims.access_token_hash().expect("at_hash");
    let actual_hash = AccessTokenHash::from_token(tokens.access_token(), id_token.signing_alg().unwrap(), id_token.signing_key(&id_verifier).unwrap()).unwrap();
    assert_eq!(&actual_hash, expected_hash);
    assert!(id_token.claims(&id_verifier, &Nonce::new("another".into())).is_err(), "a wrong nonce is refused by the client");

    let refreshed = client.exchange_refresh_token(tokens.refresh_token().unwrap()).unwrap().request_async(&http_client).await.expect("refresh");
    assert_ne!(refreshed.access_token().secret(), tokens.access_token().secret());
    // The gateway accepts the access token, whatever the algorithm.
    let me = http.get(format!("{}/api/v1/me", ts.gateway())).bearer_auth(refreshed.access_token().secret()).send().await.unwrap();
    assert_eq!(me.status(), 200, "{alg} access token accepted by the gateway");
}
