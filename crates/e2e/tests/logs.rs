//! Central logs across services. Its own test binary (its own process), because log
//! shipping is per process: one process, one system, as in production.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "system/helpers.rs"]
mod helpers;

use std::time::Duration;

use serde_json::Value;

use helpers::{TestSystem, eventually, password_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_ships_its_records_to_the_logs_service() {
    let ts = TestSystem::start().await;
    ts.add_user("ops", "infra", "member").await;
    identity::set_operator(&ts.config, "ops", true).await.unwrap();
    ts.add_user("adam", "acme", "admin").await;
    ts.add_user("mia", "acme", "member").await;
    let ops = ts.sign_in("ops", &password_of("ops")).await;
    let adam = ts.sign_in("adam", &password_of("adam")).await;
    let mia = ts.sign_in("mia", &password_of("mia")).await;
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"Ship logs please.".to_vec()).file_name("note.txt").mime_str("text/plain").unwrap(),
    );
    let created: Value = ts.http.post(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ops.access_token).multipart(form).send().await.unwrap().json().await.unwrap();
    assert!(created["job_id"].is_string(), "{created}");
    let records = eventually("the ingest worker's record in the logs", Duration::from_secs(30), || async {
        let logs: Value = ts
            .http
            .get(format!("{}/api/v1/logs?service=ingest&q=indexed", ts.gateway()))
            .bearer_auth(&ops.access_token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let records = logs["records"].as_array()?.clone();
        (!records.is_empty()).then_some(records)
    })
    .await;
    assert_eq!(records[0]["level"], "info");
    assert!(records[0]["message"].as_str().unwrap().contains("indexed"));
    // An org admin reads only records of their org: the worker's record names none.
    let scoped: Value = ts
        .http
        .get(format!("{}/api/v1/logs?service=ingest&q=indexed", ts.gateway()))
        .bearer_auth(&adam.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(scoped["records"].as_array().unwrap().iter().all(|r| r["fields"]["org"] == "acme"), "{scoped}");
    assert!(scoped["records"].as_array().unwrap().is_empty(), "records of no org are for operators only");
    let denied = ts.http.get(format!("{}/api/v1/logs", ts.gateway())).bearer_auth(&mia.access_token).send().await.unwrap();
    assert_eq!(denied.status(), 403, "members may not read logs");
    ts.system.stop().await;
}
