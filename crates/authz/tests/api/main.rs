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
        let request = DecisionRequest { action: action.into(), resource_type: "Collection".into(), resource_id: personal.id.clone(), classification: None, new_role: None };
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reload_from_their_directory_and_an_invalid_set_is_refused_with_its_line() {
    let policies = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    for name in ["echo.cedarschema", "echo.cedar"] {
        std::fs::copy(root.join(name), policies.path().join(name)).unwrap();
    }
    let dir = policies.path().to_path_buf();
    let echo = TestEcho::start_with(|config| config.authz.policy_dir = Some(dir)).await;
    let peers = echo.peers_as(ServiceName::Gateway);
    let ann = user("ann", "acme");
    let collections: Vec<Collection> = peers.get_json(ServiceName::Authz, "/v1/collections", Some(&ann)).await.unwrap();
    let decide = || {
        let peers = peers.clone();
        let ann = ann.clone();
        let request = DecisionRequest { action: "document:read_chunks".into(), resource_type: "Collection".into(), resource_id: collections[0].id.clone(), classification: None, new_role: None };
        async move { peers.post_json::<_, Decision>(ServiceName::Authz, "/v1/decide", Some(&ann), &request).await.unwrap() }
    };
    assert!(decide().await.allowed);

    std::fs::write(policies.path().join("broken.cedar"), "@id(\"broken\")\npermit (principal, action, resource)\nwhen { resource.no_such_attribute };\n").unwrap();
    let refused = peers.post_json::<_, serde_json::Value>(ServiceName::Authz, "/v1/policies/reload", None, &serde_json::json!({})).await.unwrap_err();
    assert_eq!(refused.code, "authz.invalid_policies");
    assert!(refused.detail.contains("broken.cedar") && refused.detail.contains("line 3"), "{}", refused.detail);
    assert!(decide().await.allowed, "the previous policies stay in force");

    std::fs::write(policies.path().join("broken.cedar"), "@id(\"freeze-reading\")\nforbid (principal, action == Echo::Action::\"document:read_chunks\", resource);\n").unwrap();
    let _: serde_json::Value = peers.post_json(ServiceName::Authz, "/v1/policies/reload", None, &serde_json::json!({})).await.unwrap();
    let frozen = decide().await;
    assert!(!frozen.allowed, "the reloaded forbid applies on the next decision");
    echo.stop().await;
}

/// The readable list is cached per principal; every relationship change and every
/// policy reload must show in the very next answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readable_list_follows_every_share_group_and_policy_change_at_once() {
    readable_list_follows_changes(TestEcho::start().await).await;
}

/// The same with relationships in PostgreSQL (`authz.database_url`): the version its
/// triggers bump invalidates cached answers just as SQLite's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_database_url_relationships_live_in_postgresql() {
    let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
    let url = server.url.clone();
    readable_list_follows_changes(TestEcho::start_with(|config| config.authz.database_url = common::config::Secret(url)).await).await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&server.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM authz.collections").fetch_one(&mut conn).await.unwrap();
    assert!(n > 0);
    drop(conn);
    server.cleanup().await;
}

async fn readable_list_follows_changes(echo: TestEcho) {
    let peers = echo.peers_as(ServiceName::Gateway);
    let owner = Principal { roles: vec!["owner".into()], ..user("olga", "acme") };
    let rob = identity::add_user(&echo.config, "rob", "rob-password-2026", "acme", "member", None).await.unwrap();
    let reader = Principal { sub: rob.id.clone(), ..user("rob", "acme") };
    let readable = |principal: Principal| {
        let peers = peers.clone();
        async move { peers.post_json::<_, ReadableCollections>(ServiceName::Authz, "/v1/readable", Some(&principal), &serde_json::json!({})).await.unwrap().collections }
    };
    let created: Collection = peers.post_json(ServiceName::Authz, "/v1/collections", Some(&owner), &serde_json::json!({"name": "plans"})).await.unwrap();
    let before = readable(reader.clone()).await;
    assert!(!before.contains(&created.id));
    assert_eq!(readable(reader.clone()).await, before, "a repeated question gets the same answer");

    let share = |members: serde_json::Value| {
        let (peers, owner, id) = (peers.clone(), owner.clone(), created.id.clone());
        async move { peers.put_json::<_, serde_json::Value>(ServiceName::Authz, &format!("/v1/collections/{id}/members"), Some(&owner), &serde_json::json!({"members": members})).await.unwrap() }
    };
    share(serde_json::json!([{"user": rob.id, "role": "viewer"}])).await;
    assert!(readable(reader.clone()).await.contains(&created.id), "a new share shows at once");
    share(serde_json::json!([])).await;
    assert!(!readable(reader.clone()).await.contains(&created.id), "an unshare shows at once");

    let group: serde_json::Value = peers.post_json(ServiceName::Authz, "/v1/groups", Some(&owner), &serde_json::json!({"name": "planners"})).await.unwrap();
    let group_id = group["id"].as_str().unwrap().to_string();
    share(serde_json::json!([{"group": group_id, "role": "answers"}])).await;
    assert!(!readable(reader.clone()).await.contains(&created.id));
    let members_path = format!("/v1/groups/{group_id}/members");
    peers.put_json::<_, serde_json::Value>(ServiceName::Authz, &members_path, Some(&owner), &serde_json::json!({"users": [rob.id]})).await.unwrap();
    assert!(readable(reader.clone()).await.contains(&created.id), "joining a group shows at once");
    peers.put_json::<_, serde_json::Value>(ServiceName::Authz, &members_path, Some(&owner), &serde_json::json!({"users": []})).await.unwrap();
    assert!(!readable(reader.clone()).await.contains(&created.id), "leaving it too");
    echo.stop().await;
}
