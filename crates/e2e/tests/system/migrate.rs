//! Moving up: an embedded installation in use (a user, an indexed upload, a
//! conversation, audit records) is moved with `echod migrate` to PostgreSQL and an S3
//! bucket, started again on them, and everything is still there.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestSystem, password_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_installation_moves_to_postgresql_and_s3_without_loss() {
    let Some(postgres) = echod::testing::ScratchServer::postgres().await else { return };
    let Some(s3) = echod::testing::ScratchS3::start().await else { return };
    let ts = TestSystem::start().await;
    ts.add_user("ann", "acme", "member").await;
    let ann = ts.sign_in("ann", &password_of("ann")).await;
    let bytes = b"# Boiler\n\nThe boiler's reset code is juniper-5512.\n".to_vec();
    let created = ts.upload(&ann.access_token, "boiler.md", "text/markdown", bytes.clone()).await;
    ts.wait_indexed(&ann.access_token, &created).await;
    let document = created["id"].as_str().expect("id").to_string();
    let asked: Value = ts.http.post(format!("{}/api/v1/ask", ts.gateway())).bearer_auth(&ann.access_token).json(&json!({"question": "What is the boiler's reset code?"})).send().await.unwrap().json().await.unwrap();
    assert!(asked["answer"].as_str().unwrap().contains("juniper-5512"));
    let conversation = asked["conversation_id"].as_str().unwrap().to_string();
    // The audit service has chained what happened before it stops.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (to, storage) = (postgres.url.clone(), s3.config());
    let mut report = None;
    let ts = ts
        .restart_keeping_ports_with(|config| {
            let moved = tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(echod::migrate::run(config, &to, Some(storage.clone()))));
            report = Some(moved.expect("migrate"));
            config.database.url = common::config::Secret(to.clone());
            config.storage = common::config::StorageConfig { quota_bytes_per_user: config.storage.quota_bytes_per_user, max_blob_bytes: config.storage.max_blob_bytes, ..storage };
        })
        .await;
    let report = report.expect("the report");
    let rows = |table: &str| report.tables.iter().find(|(t, _)| t == table).map(|(_, n)| *n).unwrap_or(0);
    assert!(rows("identity.users") >= 2, "the admin and ann: {report:?}");
    assert_eq!(rows("ingest.documents"), 1);
    assert_eq!(rows("storage.blobs"), 1);
    assert_eq!(rows("rag.messages"), 2);
    assert!(rows("audit.records") >= 3 && report.audit_records as u64 == rows("audit.records"), "{report:?}");
    assert_eq!((report.blobs, report.blob_bytes), (1, bytes.len() as u64));
    assert_eq!(s3.keys().await.len(), 1);

    // Started on PostgreSQL and S3: the same person signs in with the same password and
    // finds everything where it was.
    let ann = ts.sign_in("ann", &password_of("ann")).await;
    let got = ts.http.get(format!("{}/api/v1/documents/{document}/content", ts.gateway())).bearer_auth(&ann.access_token).send().await.unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice(), "the file, from the bucket");
    let kept: Value = ts.http.get(format!("{}/api/v1/conversations/{conversation}", ts.gateway())).bearer_auth(&ann.access_token).send().await.unwrap().json().await.unwrap();
    assert_eq!(kept["messages"].as_array().map(Vec::len), Some(2), "{kept}");
    let hits: Value = ts.http.post(format!("{}/api/v1/search", ts.gateway())).bearer_auth(&ann.access_token).json(&json!({"query": "boiler reset code"})).send().await.unwrap().json().await.unwrap();
    assert_eq!(hits["hits"][0]["document_id"], document.as_str());
    ts.add_user("root", "acme", "admin").await;
    let root = ts.sign_in("root", &password_of("root")).await;
    let verified: Value = ts.http.get(format!("{}/api/v1/audit/verify", ts.gateway())).bearer_auth(&root.access_token).send().await.unwrap().json().await.unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    // And it goes on: a new upload lands in the bucket, the chain grows on PostgreSQL.
    let again = ts.upload(&ann.access_token, "second.md", "text/markdown", b"# Second\n\nAnother file.\n".to_vec()).await;
    ts.wait_indexed(&ann.access_token, &again).await;
    assert_eq!(s3.keys().await.len(), 2);
    // Migrating into a database that is no longer empty is refused.
    let config = ts.config.clone();
    ts.system.stop().await;
    let embedded = common::EchoConfig { database: Default::default(), ..config };
    let refused = echod::migrate::run(&embedded, &postgres.url, None).await.unwrap_err();
    assert!(format!("{refused:#}").contains("already holds"), "{refused:#}");
    postgres.cleanup().await;
}
