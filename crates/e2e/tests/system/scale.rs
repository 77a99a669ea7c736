//! The scale topology as separate processes on this machine: every service its own
//! `echod serve NAME` process — two replicas of the gateway, each with its own search
//! replica over one index in PostgreSQL with pgvector (`search.url`), and two
//! `ingest-worker` processes apart from the ingest API (`ingest.workers: 0`; the workers
//! compete for the bus's deliveries) — over PostgreSQL (`database.url`), NATS
//! JetStream (`queue.url`) and an S3-protocol server (`storage.url`). A user signs in,
//! uploads through both gateways while one ingest worker is killed with SIGKILL, and
//! every accepted upload is indexed once and answered from; a browser session and a
//! revocation hold at both gateways.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use common::{EchoConfig, ServiceName};

use crate::helpers::{CLIENT_ID, Edge, REDIRECT_URI, eventually, password_of};

/// `target/*/echod`, beside the directory of this test binary.
fn echod_program() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let deps = exe.parent().expect("deps dir");
    [deps.join("echod"), deps.parent().expect("target dir").join("echod")]
        .into_iter()
        .find(|p| p.is_file())
        .expect("the echod binary (cargo test builds it)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

struct Replica {
    label: String,
    log: PathBuf,
    child: tokio::process::Child,
}

struct Topology {
    dir: tempfile::TempDir,
    config_file: PathBuf,
    replicas: Vec<Replica>,
}

impl Topology {
    /// `echod serve SERVICE` with the shared configuration, `overrides` as environment.
    fn spawn(&mut self, service: ServiceName, label: &str, overrides: &[(&str, String)]) {
        self.spawn_named(service.as_str(), label, overrides);
    }

    /// `echod serve NAME` (a service, or `ingest-worker`).
    fn spawn_named(&mut self, name: &str, label: &str, overrides: &[(&str, String)]) {
        let log = self.dir.path().join(format!("{label}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = tokio::process::Command::new(echod_program());
        command.args(["serve", name, "--config"]).arg(&self.config_file);
        for (key, value) in overrides {
            command.env(key, value);
        }
        let child = command
            .env("ECHO__LOG__FORMAT", "json")
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("echod serve");
        self.replicas.push(Replica { label: label.to_string(), log, child });
    }

    /// SIGKILL, as a crashed machine would stop it.
    async fn kill(&mut self, label: &str) {
        let replica = self.replicas.iter_mut().find(|r| r.label == label).expect("replica");
        replica.child.start_kill().expect("SIGKILL");
        replica.child.wait().await.expect("reaped");
    }

    /// The last lines of every replica's log (for a failure's message).
    fn tails(&self) -> String {
        self.replicas
            .iter()
            .map(|r| {
                let text = std::fs::read_to_string(&r.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().rev().take(5).collect();
                format!("--- {}\n{}", r.label, lines.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn wait_ok(http: &reqwest::Client, url: &str, timeout: Duration, topology: &Topology) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(answer) = http.get(url).timeout(Duration::from_secs(3)).send().await
            && answer.status().is_success()
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{url} did not answer within {timeout:?}\n{}", topology.tails());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn upload(edge: &Edge, token: &str, name: &str, text: String) -> Value {
    let part = reqwest::multipart::Part::bytes(text.into_bytes()).file_name(name.to_string()).mime_str("text/markdown").expect("mime");
    let answer = edge.http.post(format!("{}/api/v1/documents", edge.gateway())).bearer_auth(token).multipart(reqwest::multipart::Form::new().part("file", part)).send().await.expect("upload");
    assert_eq!(answer.status(), StatusCode::ACCEPTED, "accepted");
    answer.json().await.expect("created")
}

async fn search(edge: &Edge, token: &str, query: &str) -> Vec<String> {
    let hits: Value = edge.http.post(format!("{}/api/v1/search", edge.gateway())).bearer_auth(token).json(&json!({"query": query, "k": 10})).send().await.expect("search").json().await.expect("hits");
    hits["hits"].as_array().expect("hits").iter().filter_map(|h| h["document_id"].as_str().map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_with_two_gateways_and_two_ingest_workers_lose_nothing_when_one_is_killed() {
    let Some(postgres) = echod::testing::ScratchServer::postgres().await else { return };
    let Some(nats) = echod::testing::ScratchServer::nats().await else { return };
    let Some(s3) = echod::testing::ScratchS3::start().await else { return };
    let Some(pgvector) = echod::testing::ScratchPgvector::start().await else { return };

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = EchoConfig::for_test(dir.path());
    for service in ServiceName::ALL {
        config.ports.insert(service, free_port());
    }
    config.database.url = common::config::Secret(postgres.url.clone());
    config.queue.url = Some(common::config::Secret(nats.url.clone()));
    config.storage = common::config::StorageConfig { quota_bytes_per_user: config.storage.quota_bytes_per_user, max_blob_bytes: config.storage.max_blob_bytes, ..s3.config() };
    config.search.url = common::config::Secret(pgvector.url.clone());
    config.ingest.workers = 2;
    config.log.level = "info,tantivy=warn".into();
    config.gateway.rate_limits = common::config::Switch::Off;
    // JSON is YAML: the processes read exactly this configuration.
    let config_file = dir.path().join("echo.yaml");
    std::fs::write(&config_file, serde_json::to_vec_pretty(&config).expect("config")).expect("write config");
    let mut topology = Topology { dir, config_file, replicas: Vec::new() };
    let http = reqwest::Client::new();

    // Identity first: it registers every service's credentials (files in the shared data
    // dir's secrets/) that the others present.
    topology.spawn(ServiceName::Identity, "identity", &[]);
    wait_ok(&http, &format!("{}/healthz", config.url(ServiceName::Identity)), Duration::from_secs(90), &topology).await;
    for service in ServiceName::ALL.into_iter().filter(|s| *s != ServiceName::Identity) {
        // The ingest API alone: two ingest-worker processes do the documents.
        let overrides = if service == ServiceName::Ingest { vec![("ECHO__INGEST__WORKERS", "0".to_string())] } else { vec![] };
        topology.spawn(service, service.as_str(), &overrides);
    }
    // A second search replica on the same PostgreSQL index, which the second gateway
    // uses: what ingest indexes through the first is found through the second.
    let (gateway_b, search_b, worker_a, worker_port) = (free_port(), free_port(), free_port(), free_port());
    topology.spawn(ServiceName::Search, "search-b", &[("ECHO__PORTS__SEARCH", search_b.to_string())]);
    topology.spawn(ServiceName::Gateway, "gateway-b", &[("ECHO__PORTS__GATEWAY", gateway_b.to_string()), ("ECHO__PORTS__SEARCH", search_b.to_string())]);
    topology.spawn_named("ingest-worker", "ingest-worker-a", &[("ECHO__INGEST__WORKER_PORT", worker_a.to_string())]);
    topology.spawn_named("ingest-worker", "ingest-worker", &[("ECHO__INGEST__WORKER_PORT", worker_port.to_string())]);
    let a = Edge::new(config.clone());
    let mut config_b = config.clone();
    config_b.ports.insert(ServiceName::Gateway, gateway_b);
    config_b.ports.insert(ServiceName::Search, search_b);
    let b = Edge::new(config_b);
    wait_ok(&http, &format!("{}/readyz", a.gateway()), Duration::from_secs(120), &topology).await;
    wait_ok(&http, &format!("{}/readyz", b.gateway()), Duration::from_secs(60), &topology).await;
    wait_ok(&http, &format!("http://127.0.0.1:{worker_a}/readyz"), Duration::from_secs(60), &topology).await;
    wait_ok(&http, &format!("http://127.0.0.1:{worker_port}/readyz"), Duration::from_secs(60), &topology).await;

    identity::add_client(&config, CLIENT_ID, vec![REDIRECT_URI.into()], None, "RS256").await.expect("client");
    identity::add_user(&config, "ann", &password_of("ann"), "acme", "member", None).await.expect("user");
    let ann = a.sign_in("ann", &password_of("ann")).await;

    // Uploads through both gateways; one ingest worker dies half-way through.
    let mut created = Vec::new();
    for i in 0..10 {
        let edge = if i % 2 == 0 { &a } else { &b };
        let text = format!("# Valve {i}\n\nThe service code of valve {i} is marigold-{i}-{}.\n", 1000 + i * 7);
        created.push(upload(edge, &ann.access_token, &format!("valve-{i}.md"), text).await);
        if i == 4 {
            // Once the ingest worker has taken work from the bus, it dies mid-stream.
            let log = topology.dir.path().join("ingest-worker.log");
            eventually("the ingest worker to take an upload", Duration::from_secs(30), || async {
                std::fs::read_to_string(&log).ok()?.contains(r#""subscription":"ingest-worker""#).then_some(())
            })
            .await;
            topology.kill("ingest-worker").await;
        }
    }
    for (i, document) in created.iter().enumerate() {
        let job = document["job_id"].as_str().expect("job id").to_string();
        let edge = if i % 2 == 0 { &b } else { &a };
        eventually(&format!("upload {i} indexed"), Duration::from_secs(120), || async {
            let job: Value = edge.http.get(format!("{}/api/v1/jobs/{job}", edge.gateway())).bearer_auth(&ann.access_token).send().await.ok()?.json().await.ok()?;
            assert_ne!(job["status"], "failed", "{job}\n{}", topology.tails());
            (job["status"] == "done").then_some(())
        })
        .await;
    }
    // Each document is found first for its own code through either gateway, and every
    // document is in the index once (one chunk each: no upload was indexed twice).
    for (i, document) in created.iter().enumerate() {
        let id = document["id"].as_str().expect("id");
        for edge in [&a, &b] {
            let found = search(edge, &ann.access_token, &format!("marigold-{i}-{}", 1000 + i * 7)).await;
            assert_eq!(found.first().map(String::as_str), Some(id), "valve {i} first at {}", edge.gateway());
            assert_eq!(found.iter().filter(|d| *d == id).count(), 1, "valve {i} indexed once: {found:?}");
        }
    }
    let everything = search(&a, &ann.access_token, "marigold service code valve").await;
    assert_eq!(everything.len(), 10, "ten uploads, ten documents in the index: {everything:?}");
    let answer: Value = b.http.post(format!("{}/api/v1/ask", b.gateway())).bearer_auth(&ann.access_token).json(&json!({"question": "What is the service code of valve 7?"})).send().await.expect("ask").json().await.expect("answer");
    assert!(answer["answer"].as_str().unwrap_or_default().contains("marigold-7-1049"), "{answer}");

    // A browser session opened through one gateway is good at the other, and a logout
    // at one ends it at both.
    let (session, csrf) = a.browser_session("ann").await;
    let page = b.http.get(format!("{}/documents", b.gateway())).header("cookie", &session).send().await.expect("page at b");
    assert_eq!(page.status(), StatusCode::OK, "the session opened at a is good at b");
    let out = b.http.post(format!("{}/auth/logout", b.gateway())).header("cookie", &session).form(&[("csrf", csrf.as_str())]).send().await.expect("logout at b");
    assert!(out.status().is_redirection());
    let after = a.http.get(format!("{}/documents", a.gateway())).header("cookie", &session).send().await.expect("page at a");
    assert_eq!(after.status(), StatusCode::SEE_OTHER, "signed out at b, signed out at a");

    // A revoked token is refused by both gateways (the announcement reaches one; the
    // other merges the stored list within a second).
    let revoked = http.post(format!("{}/revoke", config.issuer())).form(&[("token", ann.access_token.as_str()), ("client_id", CLIENT_ID)]).send().await.expect("revoke");
    assert!(revoked.status().is_success());
    for edge in [&a, &b] {
        eventually("the revocation at both gateways", Duration::from_secs(10), || async {
            let me = edge.http.get(format!("{}/api/v1/me", edge.gateway())).bearer_auth(&ann.access_token).send().await.ok()?;
            (me.status() == StatusCode::UNAUTHORIZED).then_some(())
        })
        .await;
    }

    // Both search replicas answered from the one index in PostgreSQL.
    let replica_log = std::fs::read_to_string(topology.dir.path().join("search-b.log")).unwrap_or_default();
    assert!(replica_log.contains("PostgreSQL full-text search and pgvector"), "search-b: {replica_log}");

    // Nothing of it lives in the data dir but the secrets.
    for file in ["identity.db", "authz.db", "gateway.db", "ingest.db", "rag.db", "audit.db", "storage.db", "queue.db", "index"] {
        assert!(!topology.dir.path().join(file).exists(), "{file} was made");
    }
    assert_eq!(s3.keys().await.len(), 10, "every upload's bytes are in the bucket");
    drop(topology);
    postgres.cleanup().await;
    nats.cleanup().await;
}
