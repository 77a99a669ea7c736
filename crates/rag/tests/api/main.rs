//! The rag service over HTTP, started by its real `run` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::{Answer, AskRequest, Principal};
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_readable_it_says_so_and_keeps_the_conversation() {
    says_so_and_keeps_the_conversation(TestEcho::start().await).await;
}

/// The same with conversations in PostgreSQL (`rag.database_url`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_database_url_conversations_live_in_postgresql() {
    let Some(server) = echod::testing::ScratchServer::postgres().await else { return };
    let url = server.url.clone();
    says_so_and_keeps_the_conversation(TestEcho::start_with(|config| config.rag.database_url = common::config::Secret(url)).await).await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&server.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM rag.messages").fetch_one(&mut conn).await.unwrap();
    assert_eq!(n, 2);
    drop(conn);
    server.cleanup().await;
}

async fn says_so_and_keeps_the_conversation(echo: TestEcho) {
    let peers = echo.peers_as(ServiceName::Gateway);
    let ann = Principal { sub: "ann".into(), username: "ann".into(), org: "acme".into(), roles: vec![] };
    let request = AskRequest { question: "What is the launch code?".into(), collections: None, conversation_id: None, history: vec![] };
    let answer: Answer = peers.post_json(ServiceName::Rag, "/v1/ask", Some(&ann), &request).await.unwrap();
    assert_eq!(answer.mode, "extractive");
    assert!(answer.citations.is_empty());
    assert!(answer.answer.contains("could not find"));
    let conversation: serde_json::Value = peers.get_json(ServiceName::Rag, &format!("/v1/conversations/{}", answer.conversation_id), Some(&ann)).await.unwrap();
    assert_eq!(conversation["messages"].as_array().unwrap().len(), 2);
    let bob = Principal { sub: "bob".into(), ..ann.clone() };
    let hidden = peers.get_json::<serde_json::Value>(ServiceName::Rag, &format!("/v1/conversations/{}", answer.conversation_id), Some(&bob)).await.unwrap_err();
    assert_eq!(hidden.code, "rag.conversation_not_found");
    let empty = AskRequest { question: "   ".into(), collections: None, conversation_id: None, history: vec![] };
    assert_eq!(peers.post_json::<_, Answer>(ServiceName::Rag, "/v1/ask", Some(&ann), &empty).await.unwrap_err().code, "rag.invalid_question");
    echo.stop().await;
}
