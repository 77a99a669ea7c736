//! The profile service over HTTP, started by its real `run` on a free port, with
//! `profile.db` and with the profiles in PostgreSQL (`database.url`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::Principal;
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_created_on_first_use_edited_and_private_to_the_org() {
    let echo = TestEcho::start().await;
    profiles_behave(&echo).await;
    echo.stop().await;
}

/// The same with `database.url` naming a PostgreSQL: the profiles are in its `profile`
/// schema, and there is no `profile.db`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_database_url_profiles_live_in_postgresql() {
    let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
    let url = server.url.clone();
    let echo = TestEcho::start_with(|config| config.database.url = common::config::Secret(url)).await;
    profiles_behave(&echo).await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&server.url).await.unwrap();
    let name: String = sqlx::query_scalar("SELECT display_name FROM profile.profiles WHERE user_id = 'ann'").fetch_one(&mut conn).await.unwrap();
    assert_eq!(name, "Ann Lee");
    assert!(!echo.config.db_path(ServiceName::Profile).exists());
    drop(conn);
    echo.stop().await;
    server.cleanup().await;
}

async fn profiles_behave(echo: &TestEcho) {
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
}
