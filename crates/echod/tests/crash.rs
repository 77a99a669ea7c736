//! Crash tests for the event bus. The queue, and separately a consumer (the audit
//! service), run as real `echod serve` processes and are killed with SIGKILL at random
//! moments while publishers and consumers keep working; each is restarted on the same
//! data dir. Afterwards a checker reads the whole recorded history:
//!
//! - no publish the queue acknowledged is lost: every subscription delivers it;
//! - no pull begun after a successful ack of a message brings that message again (so
//!   only messages in flight at a kill come twice). JetStream answers an ack with an
//!   out-of-date lease and may ignore it, so over NATS this is counted, not failed;
//! - the killed consumer ends with every acknowledged event exactly once in its
//!   hash-chained log, and the chain verifies.
//!
//! The queue phase runs once per backend: the embedded SQLite file, and — through the
//! same REST facade, the queue process being what is killed — PostgreSQL and NATS
//! JetStream on the machine's servers (skipped with a reason when absent, except
//! under CI).
//!
//! `ECHO_CRASH_TRIALS` kills per phase (default 12; CI runs the default). The long run:
//! `ECHO_CRASH_TRIALS=1000 cargo test -p echod --test crash -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bus::{Bus, PublishMessage, SubscriptionSpec};
use common::wire::{AuditEvent, events};
use common::{EchoConfig, ServiceContext, ServiceName};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = events::AUDIT_RECORDED;
/// The source of the probes (the load generator speaks as the gateway).
const PROBE_SOURCE: &str = "echo/gateway";

fn trials() -> usize {
    std::env::var("ECHO_CRASH_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(12)
}

/// xorshift64*, seeded from the clock (printed) or `ECHO_CRASH_SEED`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The processes' shared settings: one data dir, fixed ports for the three services.
struct Layout {
    dir: tempfile::TempDir,
    ports: BTreeMap<ServiceName, u16>,
    /// `queue.url` for the queue process (`None`: the embedded SQLite file).
    queue_url: Option<String>,
}

impl Layout {
    fn new() -> Layout {
        Layout::with_queue(None)
    }

    fn with_queue(queue_url: Option<String>) -> Layout {
        let ports = [ServiceName::Identity, ServiceName::Queue, ServiceName::Audit].into_iter().map(|s| (s, free_port())).collect();
        Layout { dir: tempfile::tempdir().unwrap(), ports, queue_url }
    }

    fn config(&self) -> EchoConfig {
        let mut config = EchoConfig::for_test(self.dir.path());
        for (service, port) in &self.ports {
            config.ports.insert(*service, *port);
        }
        config
    }

    fn url(&self, service: ServiceName) -> String {
        format!("http://127.0.0.1:{}", self.ports[&service])
    }

    /// `echod serve SERVICE` as a child process.
    fn spawn(&self, service: ServiceName) -> tokio::process::Child {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_echod"));
        command.args(["serve", service.as_str(), "--data-dir"]).arg(self.dir.path());
        for (service, port) in &self.ports {
            command.env(format!("ECHO__PORTS__{}", service.as_str().to_ascii_uppercase()), port.to_string());
        }
        if let Some(url) = &self.queue_url {
            command.env("ECHO__QUEUE__URL", url);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("{service}.log"))).unwrap();
        command
            .env("ECHO__LOG__SHIP", "false")
            .env("ECHO__LOG__LEVEL", "warn")
            .env("ECHO__QUEUE__LEASE_MS", "1000")

            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    async fn wait_ready(&self, service: ServiceName) {
        let url = format!("{}/readyz", self.url(service));
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = http.get(&url).timeout(Duration::from_secs(2)).send().await
                && response.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "{service} did not become ready: {}", read_log(self.dir.path(), service));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn read_log(dir: &Path, service: ServiceName) -> String {
    std::fs::read_to_string(dir.join(format!("{service}.log"))).unwrap_or_default()
}

/// Kills `child` with SIGKILL and reaps it.
async fn kill9(child: &mut tokio::process::Child) {
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

fn audit_event(bus: &Bus, marker: String) -> PublishMessage {
    let data = AuditEvent { actor: "crash-test".into(), action: "crash.probe".into(), resource: marker, outcome: "success".into(), context: serde_json::json!({}) };
    PublishMessage { event: bus.event(TOPIC, None, data), key: None, ordering_key: None, delay_ms: None }
}

/// What the publishers saw: ids the queue acknowledged, and ids whose answer was lost.
#[derive(Default)]
struct Published {
    acked: BTreeSet<String>,
    uncertain: BTreeSet<String>,
}

/// Publishes batches of 1–5 events until `stop`, `pause` apart, recording every outcome.
fn spawn_publisher(bus: Bus, published: Arc<Mutex<Published>>, stop: CancellationToken, seed: u64, pause: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = Rng(seed | 1);
        let mut n = 0u64;
        while !stop.is_cancelled() {
            let batch: Vec<PublishMessage> = (0..1 + rng.below(5))
                .map(|_| {
                    n += 1;
                    audit_event(&bus, format!("probe:{seed}:{n}"))
                })
                .collect();
            let ids: Vec<String> = batch.iter().map(|m| m.event.id.clone()).collect();
            match bus.publish(batch).await {
                Ok(_) => published.lock().unwrap().acked.extend(ids),
                Err(_) => {
                    published.lock().unwrap().uncertain.extend(ids);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    })
}

/// One delivery as a consumer saw it: when the pull that brought it began, and
/// whether (and when) its ack was answered with success.
struct Seen {
    id: String,
    pulled_at: Instant,
    acked_at: Option<Instant>,
}

fn spawn_consumer(bus: Bus, subscription: &'static str, history: Arc<Mutex<Vec<Seen>>>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let pulled_at = Instant::now();
            match bus.pull(subscription, 20, Duration::from_millis(200)).await {
                Ok(deliveries) => {
                    for delivery in deliveries {
                        let acked = bus.ack(subscription, &delivery).await.is_ok();
                        // Identity publishes audit events of its own: only ours are judged.
                        if delivery.event.source == PROBE_SOURCE {
                            let acked_at = acked.then(Instant::now);
                            history.lock().unwrap().push(Seen { id: delivery.event.id.clone(), pulled_at, acked_at });
                        }
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
}

fn seed() -> u64 {
    std::env::var("ECHO_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
}

/// The checker for one subscription's history against what was published.
fn check(subscription: &str, published: &Published, history: &[Seen]) -> Vec<String> {
    let mut violations = Vec::new();
    // The first answered ack of each message: a pull begun after it must not bring
    // the message again (the queue had the ack). A delivery pulled before it, whose
    // record lands later, was in flight at the time and is a permitted duplicate.
    let mut first_ack: BTreeMap<&str, Instant> = BTreeMap::new();
    for seen in history {
        if let Some(at) = seen.acked_at {
            first_ack.entry(seen.id.as_str()).and_modify(|t| *t = (*t).min(at)).or_insert(at);
        }
    }
    let mut delivered: BTreeSet<&str> = BTreeSet::new();
    for seen in history {
        if first_ack.get(seen.id.as_str()).is_some_and(|acked| seen.pulled_at > *acked) {
            violations.push(format!("{subscription}: {} delivered again by a pull begun after a successful ack", seen.id));
        }
        if !published.acked.contains(&seen.id) && !published.uncertain.contains(&seen.id) {
            violations.push(format!("{subscription}: {} delivered but never published", seen.id));
        }
        delivered.insert(seen.id.as_str());
    }
    for id in &published.acked {
        if !delivered.contains(id.as_str()) {
            violations.push(format!("{subscription}: acknowledged publish {id} never delivered"));
        }
    }
    violations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_queue_loses_no_acknowledged_message_and_duplicates_only_what_was_in_flight() {
    kill_the_queue("sqlite", None, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_queue_over_postgres_loses_no_acknowledged_message() {
    let Some(scratch) = echod::testing::ScratchServer::postgres().await else { return };
    kill_the_queue("postgres", Some(scratch.url.clone()), true).await;
    scratch.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_queue_over_nats_jetstream_loses_no_acknowledged_message() {
    let Some(scratch) = echod::testing::ScratchServer::nats().await else { return };
    // JetStream answers an ack carrying an out-of-date lease and may ignore it (the
    // message then comes again): at-least-once holds, "never again after an answered
    // ack" is not promised (`Capabilities::stale_leases_refused`), so such late
    // duplicates are counted and printed rather than failed.
    kill_the_queue("nats", Some(scratch.url.clone()), false).await;
    scratch.cleanup().await;
}

/// `acks_final`: whether an answered ack must end a message's deliveries (the
/// backend refuses stale leases) or only at-least-once is checked.
async fn kill_the_queue(backend: &str, queue_url: Option<String>, acks_final: bool) {
    let trials = trials();
    let seed = seed();
    println!("queue crash test ({backend}): seed {seed}, {trials} kills");
    let layout = Layout::with_queue(queue_url);
    let mut identity = layout.spawn(ServiceName::Identity);
    layout.wait_ready(ServiceName::Identity).await;
    let mut queue = layout.spawn(ServiceName::Queue);
    layout.wait_ready(ServiceName::Queue).await;

    let ctx = ServiceContext::new(Arc::new(layout.config()), ServiceName::Gateway, CancellationToken::new()).unwrap();
    let bus = ctx.bus.clone();
    for subscription in ["crash-a", "crash-b"] {
        let spec = SubscriptionSpec { topic: TOPIC.into(), max_deliveries: Some(100), lease_ms: Some(1000), ordered: None };
        bus.subscribe(subscription, &spec).await.unwrap();
    }
    let published = Arc::new(Mutex::new(Published::default()));
    let histories: BTreeMap<&'static str, Arc<Mutex<Vec<Seen>>>> = [("crash-a", Arc::default()), ("crash-b", Arc::default())].into_iter().collect();
    let stop_publishing = CancellationToken::new();
    let stop_consuming = CancellationToken::new();
    let publishers: Vec<_> = (0..2).map(|i| spawn_publisher(bus.clone(), published.clone(), stop_publishing.clone(), seed.wrapping_add(i), Duration::from_millis(10))).collect();
    let mut consumers = Vec::new();
    for (subscription, history) in &histories {
        // Two competing consumers per subscription.
        for _ in 0..2 {
            consumers.push(spawn_consumer(bus.clone(), subscription, history.clone(), stop_consuming.clone()));
        }
    }

    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    for _ in 0..trials {
        tokio::time::sleep(Duration::from_millis(20 + rng.below(180))).await;
        kill9(&mut queue).await;
        queue = layout.spawn(ServiceName::Queue);
        layout.wait_ready(ServiceName::Queue).await;
    }
    stop_publishing.cancel();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    // Drain: every acknowledged publish delivered to both subscriptions, and nothing
    // left ready or leased (deliveries leased at a kill come back after their 1 s lease).
    let (mut last_seen, mut last_progress) = (0usize, Instant::now());
    loop {
        let seen_now: usize = histories.values().map(|h| h.lock().unwrap().len()).sum();
        if seen_now != last_seen {
            (last_seen, last_progress) = (seen_now, Instant::now());
        }
        let delivered_all = {
            let published = published.lock().unwrap();
            histories.values().all(|history| {
                let history = history.lock().unwrap();
                let seen: BTreeSet<&str> = history.iter().map(|s| s.id.as_str()).collect();
                published.acked.iter().all(|id| seen.contains(id.as_str()))
            })
        };
        let stats: Result<serde_json::Value, _> = ctx.peers.get_json(ServiceName::Queue, "/v1/stats", None).await;
        let settled = stats.ok().and_then(|s| s["subscriptions"].as_array().cloned()).is_some_and(|subs| {
            subs.iter().filter(|s| s["subscription"].as_str().is_some_and(|n| n.starts_with("crash-"))).all(|s| s["depth"] == 0 && s["in_flight"] == 0)
        });
        if (delivered_all && settled) || last_progress.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A moment more, so a wrong redelivery would show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_consuming.cancel();
    for consumer in consumers {
        consumer.await.unwrap();
    }

    let (n_acked, n_uncertain, violations, summary) = {
        let published = published.lock().unwrap();
        let mut violations = Vec::new();
        let mut summary = Vec::new();
        for (subscription, history) in &histories {
            let history = history.lock().unwrap();
            let (late, others): (Vec<String>, Vec<String>) = check(subscription, &published, &history).into_iter().partition(|v| v.contains("after a successful ack"));
            if acks_final {
                violations.extend(late);
            } else {
                summary.push(format!("{subscription}: {} late duplicates after an answered ack (permitted here)", late.len()));
            }
            violations.extend(others);
            let distinct: BTreeSet<&str> = history.iter().map(|s| s.id.as_str()).collect();
            summary.push(format!("{subscription}: {} deliveries of {} messages ({} duplicates)", history.len(), distinct.len(), history.len() - distinct.len()));
        }
        (published.acked.len(), published.uncertain.len(), violations, summary)
    };
    println!(
        "queue crash test ({backend}): seed {seed}: {trials} SIGKILLs in {:.1} s; {n_acked} publishes acknowledged, {n_uncertain} uncertain; {}; {} violations",
        started.elapsed().as_secs_f64(),
        summary.join("; "),
        violations.len()
    );
    assert!(n_acked > 0, "the load generator published nothing");
    assert!(violations.is_empty(), "seed {seed}: {:?}", violations.iter().take(10).collect::<Vec<_>>());
    kill9(&mut queue).await;
    kill9(&mut identity).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_consumer_leaves_every_event_recorded_exactly_once() {
    let trials = trials();
    let seed = seed();
    println!("consumer crash test: seed {seed}, {trials} kills");
    let layout = Layout::new();
    let mut identity = layout.spawn(ServiceName::Identity);
    layout.wait_ready(ServiceName::Identity).await;
    let mut queue = layout.spawn(ServiceName::Queue);
    layout.wait_ready(ServiceName::Queue).await;
    // The audit service declares its subscription when it becomes ready.
    let mut audit = layout.spawn(ServiceName::Audit);
    layout.wait_ready(ServiceName::Audit).await;

    let ctx = ServiceContext::new(Arc::new(layout.config()), ServiceName::Gateway, CancellationToken::new()).unwrap();
    let published = Arc::new(Mutex::new(Published::default()));
    let stop = CancellationToken::new();
    // Paced to what one audit process appends (each record is a durable, chained write),
    // so the backlog at the end is drained in seconds, not minutes.
    let publisher = spawn_publisher(ctx.bus.clone(), published.clone(), stop.clone(), seed, Duration::from_millis(40));
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    for _ in 0..trials {
        tokio::time::sleep(Duration::from_millis(20 + rng.below(180))).await;
        kill9(&mut audit).await;
        audit = layout.spawn(ServiceName::Audit);
        layout.wait_ready(ServiceName::Audit).await;
    }
    stop.cancel();
    publisher.await.unwrap();

    let db: PathBuf = layout.config().db_path(ServiceName::Audit);
    let pool = common::db::open_sqlite(&db).await.unwrap();
    let (acked, uncertain) = {
        let published = published.lock().unwrap();
        (published.acked.clone(), published.uncertain.clone())
    };
    // Waits while the consumer makes progress; gives up after 60 s without any (a
    // delivery stranded at the last kill comes back when its 30 s lease expires).
    let (mut last_count, mut last_progress) = (0usize, Instant::now());
    let recorded: Vec<String> = loop {
        let recorded: Vec<String> = sqlx::query_scalar("SELECT event_id FROM records WHERE actor = 'crash-test'").fetch_all(&pool).await.unwrap();
        let set: BTreeSet<&str> = recorded.iter().map(String::as_str).collect();
        if acked.iter().all(|id| set.contains(id.as_str())) || last_progress.elapsed() > Duration::from_secs(60) {
            break recorded;
        }
        if recorded.len() != last_count {
            (last_count, last_progress) = (recorded.len(), Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let distinct: BTreeSet<&str> = recorded.iter().map(String::as_str).collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !distinct.contains(id.as_str())).collect();
    let strangers: Vec<&&str> = distinct.iter().filter(|id| !acked.contains(**id) && !uncertain.contains(**id)).collect();
    let verification = audit::verify(&layout.config()).await.unwrap();
    println!(
        "consumer crash test: seed {seed}: {trials} SIGKILLs of the audit service in {:.1} s; {} events acknowledged, {} uncertain; {} records, {} distinct; {} missing; chain {}",
        started.elapsed().as_secs_f64(),
        acked.len(),
        uncertain.len(),
        recorded.len(),
        distinct.len(),
        missing.len(),
        if verification.ok { "intact" } else { "BROKEN" }
    );
    assert!(!acked.is_empty());
    assert!(missing.is_empty(), "seed {seed}: {} acknowledged events never recorded, e.g. {:?}", missing.len(), missing.iter().take(5).collect::<Vec<_>>());
    assert_eq!(recorded.len(), distinct.len(), "every event is recorded once");
    assert!(strangers.is_empty(), "records nobody published: {strangers:?}");
    assert!(verification.ok, "the audit chain verifies after the kills: {:?}", verification.reason);
    kill9(&mut audit).await;
    kill9(&mut queue).await;
    kill9(&mut identity).await;
}

// The parser's worker processes: a time limit that stops the work, a crash that costs
// one file.

/// CPU seconds (user + system) used so far by this process's `parse-worker` children.
fn parse_worker_cpu_seconds() -> f64 {
    let me = std::process::id().to_string();
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if !String::from_utf8_lossy(&cmdline).contains("parse-worker") {
            continue;
        }
        // Fields after the command name's closing parenthesis: state ppid … utime stime.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) != Some(&me.as_str()) {
            continue;
        }
        let utime: f64 = fields[11].parse().unwrap_or(0.0);
        let stime: f64 = fields[12].parse().unwrap_or(0.0);
        total += (utime + stime) / ticks;
    }
    total
}

fn worker_pool(memory_mb: u64) -> parser::isolate::Pool {
    let command = parser::isolate::WorkerCommand { program: PathBuf::from(env!("CARGO_BIN_EXE_echod")), memory_mb };
    parser::isolate::Pool::new(command, 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parse_time_limit_kills_the_work_and_the_next_file_parses() {
    // Deeply nested markup: far more work than the limit allows.
    let html = format!("<html><body>{}</body></html>", "<div><p>nested paragraph text</p>".repeat(100_000));
    let pool = worker_pool(2048);
    let started = Instant::now();
    let outcome = pool.extract(parser::Format::Html, html.as_bytes(), 1_000_000, Duration::from_millis(300)).await;
    let elapsed = started.elapsed();
    assert_eq!(outcome.unwrap_err(), parser::ParseError::Timeout(300));
    assert!(elapsed < Duration::from_secs(3), "the limit answered after {elapsed:?}");
    // Nothing keeps working on the abandoned file.
    let before = parse_worker_cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burnt = parse_worker_cpu_seconds() - before;
    assert!(burnt < 0.2, "parse workers used {burnt:.2} s of CPU in the second after the time limit");
    let parsed = pool.extract(parser::Format::Markdown, b"# Next\n\nThe next file parses.", 1_000_000, Duration::from_secs(10)).await.unwrap();
    assert!(parsed.blocks[0].text.contains("The next file parses."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_exhausts_the_memory_limit_costs_that_file_alone() {
    // A 32 MB page of tiny paragraphs: its DOM needs far more than 512 MB.
    let html = format!("<html><body>{}</body></html>", "<p>x</p>".repeat(4_000_000));
    let pool = worker_pool(512);
    let error = pool.extract(parser::Format::Html, html.as_bytes(), 100_000_000, Duration::from_secs(120)).await.unwrap_err();
    match error {
        parser::ParseError::Corrupt(message) => assert!(message.contains("512 MB"), "{message}"),
        other => panic!("expected a crash reported as such, got {other:?}"),
    }
    for round in 0..3 {
        let text = format!("# Round {round}\n\nStill parsing after a worker died.");
        let parsed = pool.extract(parser::Format::Markdown, text.as_bytes(), 1_000_000, Duration::from_secs(10)).await.unwrap();
        assert!(parsed.blocks[0].text.contains("Still parsing"));
    }
}

// The whole of Echo killed with an upload in flight.

/// `echod up` on `dir` with every service on the port `ports` gives it.
fn spawn_up(dir: &Path, ports: &BTreeMap<ServiceName, u16>) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_echod"));
    command.arg("up").arg("--data-dir").arg(dir);
    for (service, port) in ports {
        command.env(format!("ECHO__PORTS__{}", service.as_str().to_ascii_uppercase()), port.to_string());
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("up.log")).unwrap();
    command
        .env("ECHO__LOG__SHIP", "false")
        .env("ECHO__LOG__LEVEL", "warn")
        .env("ECHO__GATEWAY__RATE_LIMITS", "off")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn documents(http: &reqwest::Client, gateway: &str, token: &str) -> Vec<serde_json::Value> {
    let page: serde_json::Value = http.get(format!("{gateway}/api/v1/documents?limit=500")).bearer_auth(token).send().await.unwrap().json().await.unwrap();
    page["documents"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_in_flight_when_echo_is_killed_is_done_within_30_s_of_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ports: BTreeMap<ServiceName, u16> = ServiceName::ALL.iter().map(|s| (*s, free_port())).collect();
    let mut config = EchoConfig::for_test(dir.path());
    config.ports = ports.clone();
    let (client, redirect) = ("crash-test", "http://127.0.0.1:9/cb");
    identity::add_client(&config, client, vec![redirect.into()], None, "RS256").await.unwrap();
    identity::add_user(&config, "kim", "crash-test-password-1", "acme", "member", None).await.unwrap();
    let gateway = format!("http://127.0.0.1:{}", ports[&ServiceName::Gateway]);
    let issuer = format!("http://127.0.0.1:{}", ports[&ServiceName::Identity]);
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let wait_ready = || async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http.get(format!("{gateway}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            assert!(Instant::now() < deadline, "Echo did not become ready: {}", std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let mut echo = spawn_up(dir.path(), &ports);
    wait_ready().await;
    let token = echod::bench::sign_in(&http, &issuer, client, redirect, "kim", "crash-test-password-1").await.unwrap();
    // Documents large enough that parsing, chunking and indexing take a while each.
    let paragraph = "Operators rotate the reactor keys every spring and record the rotation in the ledger. ";
    for n in 0..12 {
        let text = format!("# Report {n}\n\nmarker{n}x appears here once.\n\n{}", paragraph.repeat(8_000));
        let part = reqwest::multipart::Part::bytes(text.into_bytes()).file_name(format!("report-{n}.md")).mime_str("text/markdown").unwrap();
        let response = http.post(format!("{gateway}/api/v1/documents")).bearer_auth(&token).multipart(reqwest::multipart::Form::new().part("file", part)).send().await.unwrap();
        assert!(response.status().is_success(), "upload {n}: {}", response.text().await.unwrap());
    }
    // Kill it the moment a job is being worked on.
    let busy = ["parsing", "chunking", "embedding", "indexing"];
    let deadline = Instant::now() + Duration::from_secs(60);
    let in_flight: Vec<String> = loop {
        let working: Vec<String> =
            documents(&http, &gateway, &token).await.iter().filter(|d| busy.contains(&d["status"].as_str().unwrap_or_default())).map(|d| d["id"].as_str().unwrap().to_string()).collect();
        if !working.is_empty() {
            break working;
        }
        assert!(Instant::now() < deadline, "no job was ever seen in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    kill9(&mut echo).await;

    let mut echo = spawn_up(dir.path(), &ports);
    wait_ready().await;
    let restarted = Instant::now();
    let token = echod::bench::sign_in(&http, &issuer, client, redirect, "kim", "crash-test-password-1").await.unwrap();
    loop {
        let all = documents(&http, &gateway, &token).await;
        assert_eq!(all.len(), 12);
        assert!(all.iter().all(|d| d["status"] != "failed"), "nothing fails: {all:#?}");
        if all.iter().all(|d| d["status"] == "done") {
            break;
        }
        assert!(restarted.elapsed() < Duration::from_secs(30), "still not done {:?} after the restart: {all:#?}", restarted.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("every document done {:.1} s after the restart ({} were in flight at the kill)", restarted.elapsed().as_secs_f64(), in_flight.len());
    // Redone once: each report's marker is found, in its own document only.
    for n in 0..12 {
        let hits: serde_json::Value =
            http.post(format!("{gateway}/api/v1/search")).bearer_auth(&token).json(&serde_json::json!({"query": format!("marker{n}x"), "k": 20})).send().await.unwrap().json().await.unwrap();
        let hits = hits["hits"].as_array().unwrap();
        assert_eq!(hits.len(), 1, "report {n}'s marker is in one chunk of one document: {hits:?}");
    }
    kill9(&mut echo).await;
}

// A bounded fuzz run through the real worker pool: mutated files of every format.

/// A small but complete Word file, built part by part.
fn minimal_docx() -> Vec<u8> {
    use std::io::Write;
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default();
        let parts = [
            ("[Content_Types].xml", r#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#),
            ("_rels/.rels", r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>"#),
            ("word/document.xml", r#"<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>The console listens on port 7341.</w:t></w:r></w:p><w:tbl><w:tr><w:tc><w:p><w:r><w:t>Shift</w:t></w:r></w:p></w:tc></w:tr><w:tr><w:tc><w:p><w:r><w:t>Night</w:t></w:r></w:p></w:tc></w:tr></w:tbl></w:body></w:document>"#),
        ];
        for (name, text) in parts {
            zip.start_file(name, options).unwrap();
            zip.write_all(text.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
    }
    buffer.into_inner()
}

/// An OpenDocument text as small as it gets, its parts stored uncompressed so that
/// mutations reach the XML.
fn minimal_odt() -> Vec<u8> {
    use std::io::Write;
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let parts = [
            ("mimetype", "application/vnd.oasis.opendocument.text"),
            ("content.xml", r#"<?xml version="1.0" encoding="UTF-8"?><office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0"><office:body><office:text><text:h text:outline-level="1">Console</text:h><text:p>Port <text:span>7341</text:span>&amp;<text:s text:c="3"/>more.<text:note><text:note-citation>1</text:note-citation><text:note-body><text:p>Fixed.</text:p></text:note-body></text:note></text:p><table:table><table:table-row><table:table-cell><text:p>Shift</text:p></table:table-cell></table:table-row><table:table-row><table:table-cell table:number-columns-repeated="3"/></table:table-row></table:table></office:text></office:body></office:document-content>"#),
        ];
        for (name, text) in parts {
            zip.start_file(name, options).unwrap();
            zip.write_all(text.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
    }
    buffer.into_inner()
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..=rng.below(4) {
        if bytes.is_empty() {
            bytes.push(rng.below(256) as u8);
            continue;
        }
        let at = rng.below(bytes.len() as u64) as usize;
        match rng.below(5) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.below(256) as u8,
            2 => bytes.truncate(at),
            3 => {
                let end = (at + 1 + rng.below(64) as usize).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            _ => bytes.insert(at, rng.below(256) as u8),
        }
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_files_of_every_format_never_take_the_parser_down() {
    let runs: u64 = std::env::var("ECHO_FUZZ_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let pdf = {
        let content = "BT /F1 24 Tf 72 700 Td (The console listens on port 7341.) Tj ET";
        let objects = [
            "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
            format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_string(),
        ];
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, object) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
        }
        let xref = out.len();
        out.extend(b"xref\n0 6\n0000000000 65535 f \n");
        for offset in offsets {
            out.extend(format!("{offset:010} 00000 n \n").as_bytes());
        }
        out.extend(format!("trailer\n<< /Size 6 /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n").as_bytes());
        out
    };
    let seeds: Vec<(parser::Format, Vec<u8>)> = vec![
        (parser::Format::Pdf, pdf),
        (parser::Format::Docx, minimal_docx()),
        (parser::Format::Html, b"<html><head><title>T</title></head><body><h1>Console</h1><p>Port <code>7341</code>.</p><table><tr><td>a</td></tr></table></body></html>".to_vec()),
        (parser::Format::Markdown, b"# Console\n\nPort 7341.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n".to_vec()),
        (parser::Format::Csv, b"name,port\nconsole,7341\n\"quoted, cell\",2\n".to_vec()),
        (parser::Format::Json, br#"{"server": {"port": 7341, "hosts": ["a", {"b": null}]}}"#.to_vec()),
        (parser::Format::Odt, minimal_odt()),
        (parser::Format::Rtf, br"{\rtf1\ansi\ansicpg1252\uc1{\fonttbl{\f0 Arial;}}{\*\generator x}\pard Caf\'e9\par The console\u8217?s port is 7341.\par{\field{\*\fldinst HYPERLINK}{\fldrslt link}}}".to_vec()),
    ];
    let seed = std::env::var("ECHO_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_cafe_u64);
    println!("fuzz seed {seed}, {runs} mutations per format");
    let mut rng = Rng(seed);
    let pool = worker_pool(1024);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (format, original) in &seeds {
        for _ in 0..runs {
            let file = mutate(original, &mut rng);
            let outcome = pool.extract(*format, &file, 1_000_000, Duration::from_secs(10)).await;
            let label = match &outcome {
                Ok(_) => "parsed".to_string(),
                Err(parser::ParseError::Timeout(_)) => panic!("a {} of {} bytes took longer than 10 s", format.as_str(), file.len()),
                Err(error) => format!("{error:?}").split('(').next().unwrap_or_default().to_string(),
            };
            *outcomes.entry(format!("{} {label}", format.as_str())).or_default() += 1;
        }
    }
    println!("{outcomes:#?}");
    // After all of it, a plain file still parses.
    let parsed = pool.extract(parser::Format::Markdown, b"# Still\n\nworking.", 1_000, Duration::from_secs(10)).await.unwrap();
    assert!(parsed.blocks[0].text.contains("working."));
}
