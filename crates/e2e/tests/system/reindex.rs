//! `echod reindex` from outside: after a change of chunking, a rebuild runs beside the
//! live index (searches keep answering from the old one), is interrupted by a stop,
//! resumes at the next start from where it was (no document done twice), picks up an
//! upload made meanwhile, and takes over.

use std::time::Duration;

use serde_json::{Value, json};

use common::ServiceName;
use common::wire::{RebuildStatus, ReindexRun};

use crate::helpers::{TestSystem, eventually, password_of};

const DOCUMENTS: usize = 60;

/// A document of about 3,000 characters in short paragraphs, found by its marker.
fn document(n: usize) -> String {
    let mut text = format!("# Pump report {n}\n\nThe marker of this report is rx{n:03}q.\n\n");
    for p in 0..12 {
        text.push_str(&format!("Paragraph {p} of report {n} describes the cooling loop, its valves, the pressure readings of the week and what the crew changed.\n\n"));
    }
    text
}

async fn chunks_of(ts: &TestSystem, id: &str) -> u64 {
    let answer: Value = ts.peers_as(ServiceName::Ingest).get_json(ServiceName::Search, &format!("/v1/documents/{id}"), None).await.expect("chunk count");
    answer["chunks"].as_u64().expect("chunks")
}

async fn reindex_status(ts: &TestSystem) -> ReindexRun {
    ts.peers_as(ServiceName::Ingest).get_json(ServiceName::Ingest, "/v1/reindex", None).await.expect("reindex status")
}

async fn finds(ts: &TestSystem, token: &str, marker: &str) -> Vec<String> {
    let hits: Value = ts.http.post(format!("{}/api/v1/search", ts.gateway())).bearer_auth(token).json(&json!({"query": marker, "k": 5})).send().await.unwrap().json().await.unwrap();
    hits["hits"].as_array().unwrap().iter().map(|h| h["document_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_runs_beside_the_live_index_resumes_after_a_stop_and_takes_over() {
    let ts = TestSystem::start_with(|config| {
        config.ingest.chunk_chars = 1200;
        config.gateway.rate_limits = common::config::Switch::Off;
    })
    .await;
    ts.add_user("rita", "acme", "member").await;
    let token = ts.sign_in("rita", &password_of("rita")).await.access_token;
    let mut created = Vec::new();
    for n in 0..DOCUMENTS {
        created.push(ts.upload(&token, &format!("report-{n}.md"), "text/markdown", document(n).into_bytes()).await);
    }
    for document in &created {
        ts.wait_indexed(&token, document).await;
    }
    let ids: Vec<String> = created.iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    let before = chunks_of(&ts, &ids[0]).await;
    assert!(before >= 2, "{before} chunks at 1,200 characters");
    let answer = ts.peers_as(ServiceName::Ingest).get_json::<Value>(ServiceName::Ingest, "/v1/reindex", None).await;
    assert!(answer.is_err(), "no rebuild has run yet");

    // Smaller chunks from the next start: the index must be rebuilt to have them.
    let ts = ts.restart_keeping_ports_with(|config| config.ingest.chunk_chars = 400).await;
    let started: ReindexRun = ts.peers_as(ServiceName::Ingest).post_json(ServiceName::Ingest, "/v1/reindex", None, &json!({})).await.expect("start");
    assert_eq!((started.status.as_str(), started.total), ("running", DOCUMENTS as i64));
    let partway = eventually("the rebuild to get going", Duration::from_secs(60), || async {
        let run = reindex_status(&ts).await;
        (run.done >= 3).then_some(run)
    })
    .await;
    assert!(partway.done < DOCUMENTS as i64, "the rebuild finished before it could be interrupted: {partway:?}");
    // Meanwhile searches answer from the live index, with the old chunks.
    assert_eq!(chunks_of(&ts, &ids[0]).await, before, "the live index is untouched while the new one is built");
    assert_eq!(finds(&ts, &token, "rx001q").await.first(), Some(&ids[1]));
    let building: RebuildStatus = ts.peers_as(ServiceName::Ingest).get_json(ServiceName::Search, "/v1/rebuild", None).await.unwrap();
    assert!(building.building, "{building:?}");

    // A stop in the middle; the next start resumes the rebuild by itself.
    let ts = ts.restart_keeping_ports().await;
    let resumed = reindex_status(&ts).await;
    assert!(resumed.done >= partway.done, "the cursor survived the stop: {resumed:?} after {partway:?}");
    let late = ts.upload(&token, "late.md", "text/markdown", document(999).into_bytes()).await;
    ts.wait_indexed(&token, &late).await;
    let finished = eventually("the rebuild to finish", Duration::from_secs(120), || async {
        let run = reindex_status(&ts).await;
        assert_ne!(run.status, "stopped", "{run:?}");
        (run.status == "done").then_some(run)
    })
    .await;
    // Every document once; none twice (a rebuild started over would count the first
    // `partway.done` again). The late upload may be counted too, if it came after the
    // cursor.
    assert_eq!(finished.failed, 0, "{finished:?}");
    assert!((DOCUMENTS as i64..=DOCUMENTS as i64 + 1).contains(&finished.done), "every document once, none twice: {finished:?} after {partway:?}");
    let after = chunks_of(&ts, &ids[0]).await;
    assert!(after > before, "the live index now has the smaller chunks: {after} vs {before}");
    for (n, id) in ids.iter().enumerate().step_by(7) {
        assert_eq!(finds(&ts, &token, &format!("rx{n:03}q")).await.first(), Some(id), "report {n} is found in the rebuilt index");
    }
    let late_id = late["id"].as_str().unwrap();
    assert_eq!(finds(&ts, &token, "rx999q").await.first().map(String::as_str), Some(late_id), "an upload during the rebuild is in the new index");
    let live: RebuildStatus = ts.peers_as(ServiceName::Ingest).get_json(ServiceName::Search, "/v1/rebuild", None).await.unwrap();
    assert!(!live.building && live.live != building.live, "{live:?}");
    ts.system.stop().await;
}
