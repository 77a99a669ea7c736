//! The profile service over HTTP, started by its real `run` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::Principal;
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_created_on_first_use_edited_and_private_to_the_org() {
    let echo = TestEcho::start().await;
    let peers = echo.peers_as(ServiceName::Gateway);
    let ann = Principal { sub: "ann".into(), username: "ann".into(), org: "acme".into(), roles: vec![] };
    let me: serde_json::Value = peers.get_json(ServiceName::Profile, "/v1/me", Some(&ann)).await.unwrap();
    assert_eq!(me["display_name"], "ann");
    let request = peers.request(ServiceName::Profile, reqwest::Method::PATCH, "/v1/me", Some(&ann)).await.unwrap().json(&serde_json::json!({"display_name": "Ann Lee"}));
    let updated: serde_json::Value = peers.send(ServiceName::Profile, request).await.unwrap().json().await.unwrap();
    assert_eq!(updated["display_name"], "Ann Lee");
    let request = peers.request(ServiceName::Profile, reqwest::Method::PATCH, "/v1/me", Some(&ann)).await.unwrap().json(&serde_json::json!({"display_name": ""}));
    assert_eq!(peers.send(ServiceName::Profile, request).await.unwrap_err().code, "profile.invalid_display_name");
    let outsider = Principal { sub: "eve".into(), username: "eve".into(), org: "globex".into(), roles: vec![] };
    let hidden = peers.get_json::<serde_json::Value>(ServiceName::Profile, "/v1/profiles/ann", Some(&outsider)).await.unwrap_err();
    assert_eq!(hidden.code, "profile.not_found");
    echo.stop().await;
}
