//! The one configuration file (`echo.yaml`), its defaults and environment overrides.
//!
//! Loading order: built-in defaults, then the YAML file, then `ECHO__SECTION__KEY`
//! environment variables. Validation names the offending key. No IO beyond reading
//! the file; nothing here knows what a service does with its settings.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Yaml};
use serde::{Deserialize, Serialize};

/// Every service Echo runs, in start-up order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceName {
    Identity,
    Queue,
    Logs,
    Audit,
    Authz,
    Storage,
    Parser,
    Search,
    Ingest,
    Rag,
    Profile,
    Chat,
    Gateway,
}

impl ServiceName {
    pub const ALL: [ServiceName; 13] = [
        ServiceName::Identity,
        ServiceName::Queue,
        ServiceName::Logs,
        ServiceName::Audit,
        ServiceName::Authz,
        ServiceName::Storage,
        ServiceName::Parser,
        ServiceName::Search,
        ServiceName::Ingest,
        ServiceName::Rag,
        ServiceName::Profile,
        ServiceName::Chat,
        ServiceName::Gateway,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::Identity => "identity",
            ServiceName::Queue => "queue",
            ServiceName::Logs => "logs",
            ServiceName::Audit => "audit",
            ServiceName::Authz => "authz",
            ServiceName::Storage => "storage",
            ServiceName::Parser => "parser",
            ServiceName::Search => "search",
            ServiceName::Ingest => "ingest",
            ServiceName::Rag => "rag",
            ServiceName::Profile => "profile",
            ServiceName::Chat => "chat",
            ServiceName::Gateway => "gateway",
        }
    }

    /// The default loopback port of `echod up` (SPEC §2).
    pub fn default_port(self) -> u16 {
        match self {
            ServiceName::Gateway => 8080,
            ServiceName::Identity => 8081,
            ServiceName::Authz => 8082,
            ServiceName::Queue => 8083,
            ServiceName::Storage => 8084,
            ServiceName::Parser => 8085,
            ServiceName::Ingest => 8086,
            ServiceName::Search => 8087,
            ServiceName::Rag => 8088,
            ServiceName::Logs => 8089,
            ServiceName::Audit => 8090,
            ServiceName::Profile => 8091,
            ServiceName::Chat => 8092,
        }
    }

    /// The OAuth client id this service authenticates as.
    pub fn client_id(self) -> String {
        format!("svc-{}", self.as_str())
    }

    /// The token audience of this service as a callee.
    pub fn audience(self) -> String {
        format!("echo:{}", self.as_str())
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceName::ALL
            .into_iter()
            .find(|name| name.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ServiceName::ALL.iter().map(|n| n.as_str()).collect();
                format!("unknown service `{s}`; expected one of {}", names.join(", "))
            })
    }
}

/// The audience of user access tokens, accepted by the gateway.
pub const API_AUDIENCE: &str = "echo-api";
/// The OAuth client the gateway's web UI signs users in with.
pub const WEB_CLIENT_ID: &str = "echo-web";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EchoConfig {
    /// Where every embedded database, blob, index and key lives.
    pub data_dir: PathBuf,
    /// Address the gateway and identity bind to; the other services always bind loopback.
    pub bind: String,
    /// Port per service; 0 picks a free port.
    pub ports: BTreeMap<ServiceName, u16>,
    /// Base URL per service, for `echod serve` where peers run elsewhere.
    pub urls: BTreeMap<ServiceName, String>,
    /// The OIDC issuer; defaults to identity's URL.
    pub issuer: Option<String>,
    /// The URL users open; defaults to the gateway's URL.
    pub public_url: Option<String>,
    /// Start even when a file under `secrets/` is readable by other users (it is then
    /// tightened). Off: such a start is refused, since the secret may have been read.
    pub allow_exposed_secrets: bool,
    /// Addresses of the reverse proxies in front of the gateway and identity (TLS
    /// terminators): from these, the client's address is read from `X-Forwarded-For`
    /// for sign-in throttling and rate limits. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// A bearer token that lets Prometheus scrape `/metrics` from another machine;
    /// without it only the machine itself (loopback, not through a proxy) may.
    pub metrics_token: Secret,
    pub log: LogConfig,
    pub identity: IdentityConfig,
    pub gateway: GatewayConfig,
    pub queue: QueueConfig,
    pub storage: StorageConfig,
    pub parser: ParserConfig,
    pub ingest: IngestConfig,
    pub search: SearchConfig,
    pub embeddings: EmbeddingsConfig,
    pub llm: LlmConfig,
    pub rag: RagConfig,
    pub logs: LogsConfig,
    pub audit: AuditConfig,
    pub authz: AuthzConfig,
    pub chat: ChatConfig,
    pub telemetry: TelemetryConfig,
    pub database: DatabaseConfig,
    pub profile: ProfileConfig,
}

/// The profile service.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// A `postgres://` URL for profiles alone (else `database.url`, else `profile.db`).
    pub database_url: Secret,
}

/// Where services keep their data (SPEC §7 `database.url`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Empty: one SQLite file per service in the data dir. A `postgres://` URL: every
    /// service that supports it keeps its data there, in a schema named after the
    /// service (a service's own `database_url` overrides it). Never logged.
    pub url: Secret,
}

/// Export to an OpenTelemetry collector. Nothing is exported unless `otlp_endpoint` is set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's base URL: with `http/protobuf`, its OTLP/HTTP port
    /// (`http://collector:4318`; spans, logs and metrics go to `…/v1/traces`,
    /// `…/v1/logs`, `…/v1/metrics`); with `grpc`, its OTLP/gRPC port
    /// (`http://collector:4317`). Empty: nothing is exported.
    pub otlp_endpoint: String,
    /// `http/protobuf` (the default) or `grpc`, as OpenTelemetry's
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names them.
    pub otlp_protocol: String,
    /// How often the metrics are exported (the OpenTelemetry default: a minute).
    pub metrics_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { otlp_endpoint: String::new(), otlp_protocol: "http/protobuf".into(), metrics_interval_ms: 60_000 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzConfig {
    /// A directory with `echo.cedarschema` and `*.cedar` to use instead of the policies
    /// built into the binary; re-read on SIGHUP and on `POST /v1/policies/reload`.
    pub policy_dir: Option<PathBuf>,
    /// Collections one person may own (besides their personal one).
    pub max_collections_per_user: i64,
    /// Groups one org may have.
    pub max_groups_per_org: i64,
    /// Repeated identical denials (same person, action and resource) within this many
    /// seconds become one audit record with a count.
    pub denial_audit_window_secs: u64,
    /// A `postgres://` URL for relationships alone (else `database.url`, else `authz.db`).
    pub database_url: Secret,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        AuthzConfig { policy_dir: None, max_collections_per_user: 1000, max_groups_per_org: 500, denial_audit_window_secs: 60, database_url: Secret::default() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Rooms one person may create.
    pub max_rooms_per_user: i64,
    /// A `postgres://` URL for chat alone (else `database.url`, else `chat.db`).
    pub database_url: Secret,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig { max_rooms_per_user: 500, database_url: Secret::default() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: String,
    /// A `tracing` filter such as `info` or `info,ingest=debug`.
    pub level: String,
    /// Ship every record to the logs service over the bus.
    pub ship: bool,
    /// New traces a second recorded request by request in every service they cross
    /// (a "request served" record per hop); every request still carries a trace id.
    pub traced_requests_per_second: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    pub access_token_ttl_secs: i64,
    pub id_token_ttl_secs: i64,
    pub code_ttl_secs: i64,
    pub refresh_token_ttl_days: i64,
    pub session_ttl_hours: i64,
    pub service_token_ttl_secs: i64,
    /// Anyone may create an account (a `member` of `signup_org`) from the sign-in page.
    pub open_signup: bool,
    pub signup_org: String,
    /// `smtp://host:port` (STARTTLS when offered), `smtps://…` (TLS) or
    /// `smtp://user:password@host:port?tls=required`; empty writes mail to
    /// `data_dir/outbox`. Carries credentials: set it through `ECHO__IDENTITY__SMTP_URL`.
    pub smtp_url: Secret,
    pub mail_from: String,
    /// A file holding the key that encrypts the signing keys at rest (base64 of 32
    /// bytes; a mounted secret at scale). Unset: `secrets/identity.kek` in the data
    /// dir, made on first run. The environment variable `ECHO_IDENTITY_KEK` wins over both.
    pub kek_file: Option<PathBuf>,
    /// A `postgres://` URL for identity alone (else `database.url`, else `identity.db`).
    /// Replicas sharing it must share the key-encryption key too.
    pub database_url: Secret,
}

/// A configuration value that must never be printed (credentials in URLs).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_empty() { "\"\"" } else { "\"<redacted>\"" })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub max_upload_bytes: u64,
    pub max_json_bytes: usize,
    pub request_timeout_secs: u64,
    /// `auto` (Secure unless plain-HTTP), `always` or `never`.
    pub secure_cookies: String,
    pub session_ttl_hours: i64,
    /// `on` (default): per-user and per-address budgets; `off`: none (benchmarks only).
    pub rate_limits: Switch,
    /// The budgets when `rate_limits` is on.
    pub rate_limit: RateBudgets,
    /// A `postgres://` URL for sessions, sign-ins and revocations alone (else
    /// `database.url`, else `gateway.db`); shared, every gateway replica honours them.
    pub database_url: Secret,
}

/// `on` or `off` (YAML booleans are read too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Word(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Flag(true) => Ok(Switch::On),
            Raw::Flag(false) => Ok(Switch::Off),
            Raw::Word(word) => match word.to_ascii_lowercase().as_str() {
                "on" | "true" | "yes" => Ok(Switch::On),
                "off" | "false" | "no" => Ok(Switch::Off),
                other => Err(serde::de::Error::custom(format!("`{other}` is neither `on` nor `off`"))),
            },
        }
    }
}

/// Requests a budget allows: `per_minute` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

/// The gateway's budgets: per signed-in user, one per kind of request, and one per
/// client address for everything (before anyone is known).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateBudgets {
    /// Reading: `GET`s and searches.
    pub read: Rate,
    /// Changes: creating, sharing, deleting, posting.
    pub write: Rate,
    pub upload: Rate,
    /// Questions (`/ask`, `/v1/chat/completions`): each may cost an LLM call.
    pub ask: Rate,
    /// Every request from one client address, signed in or not.
    pub per_ip: Rate,
}

impl Default for RateBudgets {
    fn default() -> Self {
        RateBudgets {
            read: Rate { per_minute: 1200, burst: 200 },
            write: Rate { per_minute: 300, burst: 60 },
            // A folder of a thousand files goes in at once (`echod ingest`, the page's
            // folder upload); bytes are bounded by the storage quota, not by this.
            upload: Rate { per_minute: 3000, burst: 1000 },
            ask: Rate { per_minute: 60, burst: 20 },
            per_ip: Rate { per_minute: 6000, burst: 1000 },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Where messages live: unset or `sqlite:` (the embedded default, `queue.db` under
    /// the data dir), `sqlite:///path/to/file.db`, `postgres://user@host/db` or
    /// `nats://host:4222?stream=ECHO`. Passwords in it are never logged.
    pub url: Option<Secret>,
    pub max_deliveries: i64,
    pub lease_ms: i64,
    pub max_message_bytes: usize,
    /// How long a publish's idempotency key is remembered.
    pub idempotency_window_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub max_blob_bytes: u64,
    pub quota_bytes_per_user: u64,
    /// Where the bytes live: empty = files under the data dir (`blobs/`); `s3://BUCKET`
    /// (optionally `s3://BUCKET/PREFIX`) = an S3-compatible store.
    pub url: String,
    /// The S3 endpoint (`http://127.0.0.1:9000`); empty = AWS's for the region.
    pub s3_endpoint: String,
    pub s3_region: String,
    pub s3_access_key_id: Secret,
    pub s3_secret_access_key: Secret,
    /// A `postgres://` URL for the blob ledger (sizes, hashes, quota reservations) alone
    /// (else `database.url`, else `storage.db`).
    pub database_url: Secret,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParserConfig {
    pub max_input_bytes: usize,
    pub timeout_secs: u64,
    pub max_output_chars: usize,
    /// `process` (default): extraction runs in `echod parse-worker` child processes that
    /// the time limit kills; `thread`: in this process (a runaway parser then keeps its
    /// thread busy after its job failed).
    pub isolation: String,
    /// Parse workers at once (0: one per core).
    pub workers: usize,
    /// Each worker's address-space limit.
    pub max_memory_mb: u64,
    /// The program whose `parse-worker` command extracts (default: this `echod`).
    pub worker_program: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    pub workers: usize,
    pub chunk_chars: usize,
    pub chunk_overlap_chars: usize,
    pub max_attempts: i64,
    /// A `postgres://` URL for the catalog alone (else `database.url`, else `ingest.db`).
    pub database_url: Secret,
    /// Where `echod serve ingest-worker` answers `/healthz`, `/readyz` and `/metrics`.
    pub worker_port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    pub writer_memory_mb: usize,
    pub max_k: usize,
    /// Reciprocal rank fusion: each list adds `weight / (rrf_k + rank)` to a chunk.
    /// Vectors weigh 1.5 by default, except for a specific query — one whose words occur
    /// in fewer chunks than `candidates` (an identifier, an error code, a name) — where
    /// they weigh no more than BM25, and for a vector hit barely related to the query
    /// (cosine < 0.3). Without that exception, 1.5 let up to 31 vector-only hits outrank
    /// the one chunk holding an exact identifier (the leak test's marker searches missed
    /// 24 of 488); with it, `echod bench quality` measures 1.5 above equal weights.
    pub rrf_k: f32,
    pub bm25_weight: f32,
    pub vector_weight: f32,
    /// How deep each list (BM25, vectors) is read before fusion.
    pub candidates: usize,
    /// A reranker speaking the TEI/Jina `/rerank` shape (`{"query", "texts"}` →
    /// `[{"index", "score"}]`); empty: off.
    pub rerank_url: String,
    /// The model name sent with the Jina/Cohere shape (`…/v1/rerank`).
    pub rerank_model: String,
    pub rerank_api_key: Secret,
    /// How many fused hits the reranker reorders.
    pub rerank_candidates: usize,
    /// How long search reuses a user's readable-collections answer from authz. Any
    /// change of access (shares, groups, collections, policies) is announced on the
    /// bus and drops outdated answers at once; this bounds an answer's life should an
    /// announcement be lost. 0: ask authz on every search.
    pub readable_cache_secs: u64,
    /// Whole answers kept for questions asked again, under the index version and the
    /// asker's exact permissions (any commit or change of access is a new key); 0: off.
    pub result_cache_entries: usize,
    /// Where chunks live. Empty: the embedded index under `DATA_DIR/index` (one per
    /// search process). A `postgres://` URL: PostgreSQL full-text search and pgvector
    /// (the `vector` extension must be available), shared by every search replica,
    /// which then keep no index of their own. Never logged.
    pub url: Secret,
}

/// Where chunk and query embeddings come from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingsConfig {
    /// `none` (BM25 only), `local` (the model in `model_dir`, on CPU) or `openai`
    /// (any OpenAI-compatible `/v1/embeddings`). Unset: `local` when a model is
    /// installed in `model_dir` (`echod models install`), else `none`.
    pub provider: Option<String>,
    /// A directory with `config.json`, `model.safetensors` and `tokenizer.json`.
    /// Unset: `DATA_DIR/models/all-MiniLM-L6-v2`.
    pub model_dir: Option<PathBuf>,
    pub base_url: String,
    /// The remote model's name (`openai`); recorded with the index.
    pub model: String,
    pub api_key: Secret,
    /// Texts embedded per call.
    pub batch_size: usize,
    /// Longer texts are cut to this many tokens (the model's own limit is 256).
    pub max_tokens: usize,
    pub timeout_secs: u64,
    /// Which engine runs the local model: `auto` (ONNX Runtime when its library is
    /// found — `onnxruntime_library`, or `libonnxruntime.so` beside the model, which
    /// `echod models install` places — else candle), `candle` (pure Rust) or
    /// `onnxruntime` (fail when its library does not load).
    pub runtime: String,
    /// The ONNX Runtime shared library (≥ 1.22; the PyPI `onnxruntime` wheel's
    /// `onnxruntime/capi/libonnxruntime.so.*`). Unset: beside the model.
    pub onnxruntime_library: Option<PathBuf>,
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        EmbeddingsConfig {
            provider: None,
            model_dir: None,
            base_url: String::new(),
            model: String::new(),
            api_key: Secret::default(),
            batch_size: 32,
            max_tokens: 256,
            timeout_secs: 60,
            runtime: "auto".into(),
            onnxruntime_library: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RagConfig {
    pub top_k: usize,
    pub max_citations: usize,
    /// `hash` stores a SHA-256 of the question in audit records; `plain` stores it verbatim.
    pub audit_question: String,
    /// "Not in your documents" below this: the best hit's cosine similarity to the
    /// question (when embeddings are on), calibrated on the Debian evaluation set with
    /// all-MiniLM-L6-v2: every answerable question's best hit is ≥ 0.386, off-topic
    /// questions mostly ≤ 0.36 (18 of 20 refused at 0.35, none of 79 answerable ones).
    pub min_similarity: f32,
    /// …and below this share of the question's words (weighted by rarity) in the best
    /// passage; with embeddings off, this alone decides.
    pub min_coverage: f32,
    /// A `postgres://` URL for conversations alone (else `database.url`, else `rag.db`).
    pub database_url: Secret,
}

/// The language model answers are written by (`provider` `none`: extractive answers).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// `none`, `openai` (any OpenAI-compatible `/v1/chat/completions`: OpenAI, vLLM,
    /// llama.cpp's server, Ollama's `/v1`) or `ollama` (Ollama's native `/api/chat`).
    pub provider: String,
    /// e.g. `https://api.openai.com/v1`, `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key: Secret,
    /// One attempt's limit (the whole answer, streamed or not).
    pub timeout_secs: u64,
    /// Retries of a failed call (connection refused, 429, 5xx) before the first token,
    /// with exponential backoff from `retry_backoff_ms`.
    pub max_retries: u32,
    pub retry_backoff_ms: u64,
    /// After this many consecutive failures the model is not called for
    /// `breaker_cooldown_secs` (each ask fails fast, or falls back).
    pub breaker_failures: u32,
    pub breaker_cooldown_secs: u64,
    /// Tokens of document passages packed into the prompt (about 4 characters each).
    pub context_tokens: usize,
    pub max_answer_tokens: u32,
    pub temperature: f32,
    /// When the model fails, answer extractively instead of with an error.
    pub fallback_extractive: bool,
    /// Mark sentences whose words are mostly absent from the passage they cite.
    pub flag_unsupported: bool,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            provider: "none".into(),
            base_url: String::new(),
            model: String::new(),
            api_key: Secret::default(),
            timeout_secs: 120,
            max_retries: 2,
            retry_backoff_ms: 250,
            breaker_failures: 5,
            breaker_cooldown_secs: 30,
            context_tokens: 3000,
            max_answer_tokens: 700,
            temperature: 0.1,
            fallback_extractive: false,
            flag_unsupported: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogsConfig {
    /// Records older than this many days are deleted.
    pub retention_days: i64,
    /// Only the newest this many records are kept.
    pub max_records: i64,
    /// The oldest records are deleted while the records (with their text index) take
    /// more than this many MiB of `logs.db` (of the `logs` schema on PostgreSQL).
    pub max_megabytes: i64,
    /// A `postgres://` URL for the logs alone (else `database.url`, else `logs.db`).
    pub database_url: Secret,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub checkpoint_every: i64,
    /// A `postgres://` URL for the audit log alone (else `database.url`, else `audit.db`).
    pub database_url: Secret,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            data_dir: PathBuf::from("./echo-data"),
            bind: "127.0.0.1".into(),
            ports: ServiceName::ALL.iter().map(|s| (*s, s.default_port())).collect(),
            urls: BTreeMap::new(),
            issuer: None,
            public_url: None,
            allow_exposed_secrets: false,
            trusted_proxies: Vec::new(),
            metrics_token: Secret::default(),
            log: LogConfig::default(),
            identity: IdentityConfig::default(),
            gateway: GatewayConfig::default(),
            queue: QueueConfig::default(),
            storage: StorageConfig::default(),
            parser: ParserConfig::default(),
            ingest: IngestConfig::default(),
            search: SearchConfig::default(),
            embeddings: EmbeddingsConfig::default(),
            llm: LlmConfig::default(),
            rag: RagConfig::default(),
            logs: LogsConfig::default(),
            audit: AuditConfig::default(),
            authz: AuthzConfig::default(),
            chat: ChatConfig::default(),
            telemetry: TelemetryConfig::default(),
            database: DatabaseConfig::default(),
            profile: ProfileConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: "pretty".into(), level: "info".into(), ship: true, traced_requests_per_second: crate::trace::DEFAULT_SAMPLE_RATE }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            access_token_ttl_secs: 600,
            id_token_ttl_secs: 600,
            code_ttl_secs: 60,
            refresh_token_ttl_days: 30,
            session_ttl_hours: 12,
            service_token_ttl_secs: 600,
            open_signup: false,
            signup_org: "default".into(),
            smtp_url: Secret::default(),
            mail_from: "Echo <echo@localhost>".into(),
            kek_file: None,
            database_url: Secret::default(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_upload_bytes: 50 * 1024 * 1024,
            max_json_bytes: 256 * 1024,
            request_timeout_secs: 60,
            secure_cookies: "auto".into(),
            session_ttl_hours: 12,
            rate_limits: Switch::On,
            rate_limit: RateBudgets::default(),
            database_url: Secret::default(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { url: None, max_deliveries: 5, lease_ms: 60_000, max_message_bytes: 1024 * 1024, idempotency_window_secs: 24 * 3600 }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            max_blob_bytes: 50 * 1024 * 1024,
            quota_bytes_per_user: 5 * 1024 * 1024 * 1024,
            url: String::new(),
            s3_endpoint: String::new(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: Secret::default(),
            s3_secret_access_key: Secret::default(),
            database_url: Secret::default(),
        }
    }
}

impl Default for ParserConfig {
    fn default() -> Self {
        ParserConfig {
            max_input_bytes: 50 * 1024 * 1024,
            timeout_secs: 60,
            max_output_chars: 20_000_000,
            isolation: "process".into(),
            workers: 0,
            max_memory_mb: 2048,
            worker_program: None,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        // Documents in flight at once. The CPU-heavy stages are bounded on their own
        // (parse workers: one per core; the local embedder: one batch at a time), so the
        // rest — blob reads, HTTP hops, catalog writes, index commits shared by group
        // commit — overlap across documents (530 HTML pages: 19 s with 2, 8.6 s with 8).
        IngestConfig { workers: 8, chunk_chars: 1200, chunk_overlap_chars: 150, max_attempts: 5, database_url: Secret::default(), worker_port: 8093 }
    }
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            writer_memory_mb: 32,
            max_k: 100,
            rrf_k: 60.0,
            bm25_weight: 1.0,
            vector_weight: 1.5,
            candidates: 50,
            rerank_url: String::new(),
            rerank_model: String::new(),
            rerank_api_key: Secret::default(),
            rerank_candidates: 30,
            readable_cache_secs: 10,
            result_cache_entries: 1024,
            url: Secret::default(),
        }
    }
}

impl Default for RagConfig {
    fn default() -> Self {
        RagConfig { top_k: 8, max_citations: 4, audit_question: "hash".into(), min_similarity: 0.35, min_coverage: 0.5, database_url: Secret::default() }
    }
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig { retention_days: 14, max_records: 1_000_000, max_megabytes: 1024, database_url: Secret::default() }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { checkpoint_every: 1000, database_url: Secret::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(String),
    #[error("invalid configuration: `{key}` {message}")]
    Invalid { key: &'static str, message: String },
}

impl EchoConfig {
    /// Defaults, then `file` when given, then `ECHO__…` environment variables.
    pub fn load(file: Option<&Path>) -> Result<EchoConfig, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(EchoConfig::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Load(format!("config file {} does not exist", file.display())));
            }
            figment = figment.merge(Yaml::file(file));
        }
        figment = figment.merge(Env::prefixed("ECHO__").split("__").lowercase(true));
        let config: EchoConfig = figment.extract().map_err(|e| ConfigError::Load(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// A configuration for tests: every port 0, everything under `data_dir`.
    pub fn for_test(data_dir: &Path) -> EchoConfig {
        EchoConfig {
            data_dir: data_dir.to_path_buf(),
            ports: ServiceName::ALL.iter().map(|s| (*s, 0)).collect(),
            log: LogConfig { ship: true, ..LogConfig::default() },
            ..EchoConfig::default()
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.to_string() });
        if !matches!(self.log.format.as_str(), "pretty" | "json") {
            return invalid("log.format", "must be `pretty` or `json`");
        }
        for (key, url) in [("database.url", &self.database.url), ("logs.database_url", &self.logs.database_url), ("profile.database_url", &self.profile.database_url), ("storage.database_url", &self.storage.database_url), ("audit.database_url", &self.audit.database_url), ("chat.database_url", &self.chat.database_url), ("rag.database_url", &self.rag.database_url), ("gateway.database_url", &self.gateway.database_url), ("authz.database_url", &self.authz.database_url), ("ingest.database_url", &self.ingest.database_url), ("identity.database_url", &self.identity.database_url)] {
            let url = url.expose().trim();
            if !(url.is_empty() || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return invalid(key, "must be empty (SQLite in the data dir) or a postgres:// URL");
            }
        }
        let blobs = self.storage.url.trim();
        if !blobs.is_empty() {
            let bucket = blobs.strip_prefix("s3://").map(|rest| rest.split('/').next().unwrap_or_default()).unwrap_or_default();
            if bucket.is_empty() {
                return invalid("storage.url", "must be empty (files in the data dir) or s3://BUCKET[/PREFIX]");
            }
            let endpoint = self.storage.s3_endpoint.trim();
            if !(endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return invalid("storage.s3_endpoint", "must be empty (AWS) or an http:// or https:// URL");
            }
        }
        if !matches!(self.telemetry.otlp_protocol.as_str(), "http/protobuf" | "grpc") {
            return invalid("telemetry.otlp_protocol", "must be `http/protobuf` or `grpc`");
        }
        if self.telemetry.metrics_interval_ms < 100 {
            return invalid("telemetry.metrics_interval_ms", "must be at least 100");
        }
        let budgets = &self.gateway.rate_limit;
        for (key, rate) in [
            ("gateway.rate_limit.read", budgets.read),
            ("gateway.rate_limit.write", budgets.write),
            ("gateway.rate_limit.upload", budgets.upload),
            ("gateway.rate_limit.ask", budgets.ask),
            ("gateway.rate_limit.per_ip", budgets.per_ip),
        ] {
            if rate.per_minute == 0 || rate.burst == 0 {
                return invalid(key, "needs per_minute and burst of at least 1 (switch limits off with gateway.rate_limits: off)");
            }
        }
        if !matches!(self.gateway.secure_cookies.as_str(), "auto" | "always" | "never") {
            return invalid("gateway.secure_cookies", "must be `auto`, `always` or `never`");
        }
        if self.identity.code_ttl_secs <= 0 || self.identity.code_ttl_secs > 60 {
            return invalid("identity.code_ttl_secs", "must be between 1 and 60");
        }
        if self.identity.access_token_ttl_secs < 30 || self.identity.access_token_ttl_secs > 86_400 {
            return invalid("identity.access_token_ttl_secs", "must be between 30 and 86400");
        }
        if !self.identity.smtp_url.is_empty() {
            let scheme = url::Url::parse(self.identity.smtp_url.expose()).ok().map(|u| u.scheme().to_string());
            if !matches!(scheme.as_deref(), Some("smtp" | "smtps")) {
                // The value may hold a password: never echo it.
                return invalid("identity.smtp_url", "must be an smtp:// or smtps:// URL (the value is not shown)");
            }
        }
        let valid_org = |org: &str| !org.is_empty() && org.len() <= 64 && org.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        if !valid_org(&self.identity.signup_org) {
            return invalid("identity.signup_org", "must be 1 to 64 letters, digits, '_' or '-'");
        }
        if self.ingest.chunk_chars < 200 || self.ingest.chunk_overlap_chars >= self.ingest.chunk_chars / 2 {
            return invalid("ingest.chunk_chars", "must be at least 200 and more than twice chunk_overlap_chars");
        }
        if !matches!(self.parser.isolation.as_str(), "process" | "thread") {
            return invalid("parser.isolation", "must be `process` or `thread`");
        }
        if self.parser.workers > 64 || self.parser.max_memory_mb < 128 {
            return invalid("parser.workers", "must be at most 64, with max_memory_mb at least 128");
        }
        // 0: this ingest serves its API alone (`echod serve ingest-worker` processes).
        if self.ingest.workers > 64 {
            return invalid("ingest.workers", "must be between 0 and 64");
        }
        if let Some(provider) = self.embeddings.provider.as_deref()
            && !matches!(provider, "" | "none" | "local" | "openai")
        {
            return invalid("embeddings.provider", "must be `none`, `local` or `openai`");
        }
        if !matches!(self.embeddings.runtime.as_str(), "auto" | "candle" | "onnxruntime") {
            return invalid("embeddings.runtime", "must be `auto`, `candle` or `onnxruntime`");
        }
        if self.embeddings.provider.as_deref() == Some("openai") && (self.embeddings.base_url.is_empty() || self.embeddings.model.is_empty()) {
            return invalid("embeddings.base_url", "and embeddings.model are needed with provider `openai`");
        }
        if self.embeddings.batch_size == 0 || self.embeddings.batch_size > 256 {
            return invalid("embeddings.batch_size", "must be between 1 and 256");
        }
        if self.search.candidates == 0 || self.search.candidates > 1000 || self.search.rrf_k <= 0.0 {
            return invalid("search.candidates", "must be 1 to 1000, with rrf_k above 0");
        }
        let search_url = self.search.url.expose().trim();
        if !(search_url.is_empty() || search_url.starts_with("postgres://") || search_url.starts_with("postgresql://")) {
            return invalid("search.url", "must be empty (the embedded index) or a postgres:// URL");
        }
        if !matches!(self.rag.audit_question.as_str(), "hash" | "plain") {
            return invalid("rag.audit_question", "must be `hash` or `plain`");
        }
        if self.bind.parse::<std::net::IpAddr>().is_err() {
            return invalid("bind", "must be an IP address such as 127.0.0.1 or 0.0.0.0");
        }
        for (service, url) in &self.urls {
            if url::Url::parse(url).is_err() {
                return Err(ConfigError::Invalid { key: "urls", message: format!("{service}: `{url}` is not a URL") });
            }
        }
        Ok(())
    }

    pub fn port(&self, service: ServiceName) -> u16 {
        self.ports.get(&service).copied().unwrap_or_else(|| service.default_port())
    }

    /// The base URL at which `service` answers.
    pub fn url(&self, service: ServiceName) -> String {
        if let Some(url) = self.urls.get(&service) {
            return url.trim_end_matches('/').to_string();
        }
        format!("http://127.0.0.1:{}", self.port(service))
    }

    pub fn issuer(&self) -> String {
        self.issuer.clone().unwrap_or_else(|| self.url(ServiceName::Identity)).trim_end_matches('/').to_string()
    }

    pub fn public_url(&self) -> String {
        self.public_url.clone().unwrap_or_else(|| self.url(ServiceName::Gateway)).trim_end_matches('/').to_string()
    }

    /// The PostgreSQL URL `service` keeps its data in, when one is configured: the
    /// service's own `database_url`, else `database.url`. `None`: SQLite in the data dir.
    pub fn database_url<'a>(&'a self, own: &'a Secret) -> Option<&'a str> {
        [own, &self.database.url].into_iter().find(|url| !url.is_empty()).map(|url| url.expose().trim())
    }

    pub fn db_path(&self, service: ServiceName) -> PathBuf {
        self.data_dir.join(format!("{}.db", service.as_str()))
    }

    /// Where `echod models install` puts the default embedding model.
    pub fn default_model_dir(&self) -> PathBuf {
        self.data_dir.join("models").join("all-MiniLM-L6-v2")
    }

    /// The embedding model directory in force.
    pub fn model_dir(&self) -> PathBuf {
        self.embeddings.model_dir.clone().unwrap_or_else(|| self.default_model_dir())
    }

    /// The embedding provider in force: the configured one, else `local` when a model
    /// is installed, else `none`.
    pub fn embedding_provider(&self) -> &str {
        match self.embeddings.provider.as_deref() {
            Some(provider) if !provider.is_empty() => provider,
            _ if self.model_dir().join("model.safetensors").exists() => "local",
            _ => "none",
        }
    }

    pub fn secrets_dir(&self) -> PathBuf {
        self.data_dir.join("secrets")
    }

    pub fn service_secret_path(&self, service: ServiceName) -> PathBuf {
        self.secrets_dir().join(format!("{}.secret", service.client_id()))
    }
}

/// The commented default written to the data dir on first run.
pub const EXAMPLE_YAML: &str = include_str!("../../../echo.example.yaml");

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn example_yaml_parses_and_validates() {
        let config: EchoConfig = Figment::from(Serialized::defaults(EchoConfig::default()))
            .merge(Yaml::string(EXAMPLE_YAML))
            .extract()
            .unwrap();
        config.validate().unwrap();
        assert_eq!(config.port(ServiceName::Gateway), 8080);
        assert_eq!(config.issuer(), "http://127.0.0.1:8081");
        // The example says its values are the defaults: a changed default changes it too.
        let example_only: EchoConfig = Figment::from(Yaml::string(EXAMPLE_YAML)).extract().unwrap();
        assert_eq!(serde_json::to_value(&example_only).unwrap(), serde_json::to_value(EchoConfig::default()).unwrap());
    }

    #[test]
    fn invalid_values_name_their_key() {
        let mut config = EchoConfig::default();
        config.log.format = "xml".into();
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("log.format"), "{message}");
        let mut config = EchoConfig::default();
        config.database.url = Secret("mysql://db/echo".into());
        assert!(config.validate().unwrap_err().to_string().contains("database.url"));
        config.database.url = Secret("postgres://echo@db/echo".into());
        config.validate().unwrap();
        config.telemetry.otlp_protocol = "http/json".into();
        assert!(config.validate().unwrap_err().to_string().contains("telemetry.otlp_protocol"));
        // A service's own URL wins over database.url.
        let mut config = EchoConfig::default();
        assert_eq!(config.database_url(&config.logs.database_url), None);
        config.database.url = Secret("postgres://all@db/echo".into());
        config.logs.database_url = Secret("postgres://logs@db/logs".into());
        assert_eq!(config.database_url(&config.logs.database_url), Some("postgres://logs@db/logs"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let result: Result<EchoConfig, _> = Figment::from(Serialized::defaults(EchoConfig::default()))
            .merge(Yaml::string("gatewya:\n  max_upload_bytes: 3\n"))
            .extract();
        assert!(result.unwrap_err().to_string().contains("gatewya"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail wants its own error type
    fn lists_switches_and_budgets_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ECHO__TRUSTED_PROXIES", "[10.0.0.1, \"::1\"]");
            jail.set_env("ECHO__GATEWAY__RATE_LIMITS", "off");
            jail.set_env("ECHO__GATEWAY__RATE_LIMIT__ASK__PER_MINUTE", "5");
            let config = EchoConfig::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.trusted_proxies.len(), 2);
            assert_eq!(config.gateway.rate_limits, Switch::Off);
            assert_eq!(config.gateway.rate_limit.ask.per_minute, 5);
            assert_eq!(config.gateway.rate_limit.ask.burst, RateBudgets::default().ask.burst);
            Ok(())
        });
        let on: EchoConfig = Figment::from(Serialized::defaults(EchoConfig::default())).merge(Yaml::string("gateway:\n  rate_limits: on\n")).extract().unwrap();
        assert_eq!(on.gateway.rate_limits, Switch::On);
    }

    #[test]
    fn service_names_round_trip() {
        for name in ServiceName::ALL {
            assert_eq!(name.as_str().parse::<ServiceName>().unwrap(), name);
        }
        assert!("nope".parse::<ServiceName>().is_err());
    }
}
