//! The chat service over HTTP, started by its real `run` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::Principal;
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_keep_their_history_and_only_their_members_see_it() {
    rooms_and_history(TestEcho::start().await).await;
}

/// The same with rooms and messages in PostgreSQL (`chat.database_url`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_database_url_rooms_and_messages_live_in_postgresql() {
    let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
    let url = server.url.clone();
    rooms_and_history(TestEcho::start_with(|config| config.chat.database_url = common::config::Secret(url)).await).await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&server.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat.messages").fetch_one(&mut conn).await.unwrap();
    assert_eq!(n, 2);
    drop(conn);
    server.cleanup().await;
}

async fn rooms_and_history(echo: TestEcho) {
    let peers = echo.peers_as(ServiceName::Gateway);
    let ann = Principal { sub: "ann".into(), username: "ann".into(), org: "acme".into(), roles: vec![] };
    let room: serde_json::Value = peers.post_json(ServiceName::Chat, "/v1/rooms", Some(&ann), &serde_json::json!({"name": "general"})).await.unwrap();
    let room_id = room["id"].as_str().unwrap();
    for body in ["first", "second"] {
        let _: serde_json::Value = peers.post_json(ServiceName::Chat, &format!("/v1/rooms/{room_id}/messages"), Some(&ann), &serde_json::json!({"body": body})).await.unwrap();
    }
    let history: Vec<serde_json::Value> = peers.get_json(ServiceName::Chat, &format!("/v1/rooms/{room_id}/messages"), Some(&ann)).await.unwrap();
    assert_eq!(history.iter().map(|m| m["body"].as_str().unwrap()).collect::<Vec<_>>(), ["first", "second"]);
    // Someone of the same org who is not in the room sees nothing of it either.
    let colleague = Principal { sub: "bob".into(), username: "bob".into(), org: "acme".into(), roles: vec!["owner".into()] };
    let hidden = peers.get_json::<serde_json::Value>(ServiceName::Chat, &format!("/v1/rooms/{room_id}/messages"), Some(&colleague)).await.unwrap_err();
    assert_eq!(hidden.code, "chat.room_not_found");
    let posted: common::ApiError = peers.post_json::<serde_json::Value, serde_json::Value>(ServiceName::Chat, &format!("/v1/rooms/{room_id}/messages"), Some(&colleague), &serde_json::json!({"body": "hi"})).await.unwrap_err();
    assert_eq!(posted.code, "chat.room_not_found");
    let rooms: Vec<serde_json::Value> = peers.get_json(ServiceName::Chat, "/v1/rooms", Some(&colleague)).await.unwrap();
    assert!(rooms.is_empty(), "{rooms:?}");
    let outsider = Principal { sub: "eve".into(), username: "eve".into(), org: "globex".into(), roles: vec![] };
    let hidden = peers.get_json::<serde_json::Value>(ServiceName::Chat, &format!("/v1/rooms/{room_id}/messages"), Some(&outsider)).await.unwrap_err();
    assert_eq!(hidden.code, "chat.room_not_found");
    let rooms: Vec<serde_json::Value> = peers.get_json(ServiceName::Chat, "/v1/rooms", Some(&outsider)).await.unwrap();
    assert!(rooms.is_empty());
    echo.stop().await;
}
