//! authz over HTTP, started by its real `run` on a free port: personal collections,
//! decisions with policy ids, and tenant isolation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::{Collection, Decision, DecisionRequest, Principal, ReadableCollections};
use echod::testing::TestEcho;

fn user(sub: &str, org: &str) -> Principal {
    Principal { sub: sub.into(), username: sub.into(), org: org.into(), roles: vec!["member".into()] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_name_their_policies_and_never_cross_orgs() {
    let echo = TestEcho::start().await;
    let peers = echo.peers_as(ServiceName::Gateway);
    let ann = user("ann", "acme");
    let mallory = user("mallory", "globex");
    let collections: Vec<Collection> = peers.get_json(ServiceName::Authz, "/v1/collections", Some(&ann)).await.unwrap();
    assert_eq!(collections.len(), 1);
    let personal = &collections[0];
    assert!(personal.personal);
    assert_eq!(personal.role.as_deref(), Some("owner"));

    let ask = |principal: Principal, action: &str| {
        let peers = peers.clone();
        let request = DecisionRequest { action: action.into(), resource_type: "Collection".into(), resource_id: personal.id.clone() };
        async move { peers.post_json::<_, Decision>(ServiceName::Authz, "/v1/decide", Some(&principal), &request).await.unwrap() }
    };
    let allowed = ask(ann.clone(), "document:read_chunks").await;
    assert!(allowed.allowed);
    assert_eq!(allowed.policies, vec!["owner-full-control".to_string()]);
    let denied = ask(mallory.clone(), "document:read_chunks").await;
    assert!(!denied.allowed);

    let readable: ReadableCollections = peers.post_json(ServiceName::Authz, "/v1/readable", Some(&mallory), &serde_json::json!({})).await.unwrap();
    assert!(!readable.collections.contains(&personal.id));
    let hidden = peers.get_json::<Collection>(ServiceName::Authz, &format!("/v1/collections/{}", personal.id), Some(&mallory)).await.unwrap_err();
    assert_eq!(hidden.code, "authz.collection_not_found");
    echo.stop().await;
}
