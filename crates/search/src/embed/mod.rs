//! Embeddings for chunks and queries, from the provider `embeddings.*` names: the
//! local model on CPU (loaded on first use, so an idle Echo does not hold it), any
//! OpenAI-compatible `/v1/embeddings` endpoint, or none (BM25 only). The local model
//! runs one batch at a time on the blocking pool (it uses every core); query
//! embeddings are cached. Every vector comes back unit-length, so a dot product is
//! the cosine.

pub(crate) mod install;
mod local;
mod onnx;
mod remote;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{OnceCell, Semaphore};

use common::EchoConfig;

pub use local::{LocalModel, LocalModelError, Runtime};
pub use onnx::LIBRARY_FILE as ONNXRUNTIME_LIBRARY_FILE;

/// The name recorded with vectors made by the local default model.
pub const LOCAL_MODEL_NAME: &str = "all-MiniLM-L6-v2";

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Local(#[from] LocalModelError),
    #[error("the embeddings endpoint failed: {0}")]
    Remote(String),
    #[error("no embedding provider is configured")]
    Disabled,
}

/// Which model made a vector: recorded with the index, compared at start.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelId {
    pub name: String,
    pub dimension: usize,
}

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} dimensions)", self.name, self.dimension)
    }
}

enum Provider {
    None,
    Local { dir: std::path::PathBuf, max_tokens: usize, runtime: Runtime, model: OnceCell<Arc<LocalModel>> },
    Remote(remote::RemoteEmbeddings),
}

/// A small least-recently-inserted cache of query vectors.
struct QueryCache {
    entries: HashMap<String, Arc<Vec<f32>>>,
    order: VecDeque<String>,
}

const QUERY_CACHE_ENTRIES: usize = 2048;

pub struct Embedder {
    provider: Provider,
    batch_size: usize,
    /// One local batch at a time: each already uses every core.
    running: Semaphore,
    cache: Mutex<QueryCache>,
}

impl Embedder {
    pub fn from_config(config: &EchoConfig) -> Embedder {
        let embeddings = &config.embeddings;
        let provider = match config.embedding_provider() {
            "local" => {
                let dir = config.model_dir();
                let runtime = Runtime::from_config(&embeddings.runtime, embeddings.onnxruntime_library.as_deref(), &dir);
                Provider::Local { dir, max_tokens: embeddings.max_tokens, runtime, model: OnceCell::new() }
            }
            "openai" => Provider::Remote(remote::RemoteEmbeddings::new(embeddings)),
            _ => Provider::None,
        };
        Embedder {
            provider,
            batch_size: embeddings.batch_size,
            running: Semaphore::new(1),
            cache: Mutex::new(QueryCache { entries: HashMap::new(), order: VecDeque::new() }),
        }
    }

    /// An embedder that embeds nothing (BM25 only).
    pub fn none() -> Embedder {
        Embedder { provider: Provider::None, batch_size: 1, running: Semaphore::new(1), cache: Mutex::new(QueryCache { entries: HashMap::new(), order: VecDeque::new() }) }
    }

    pub fn enabled(&self) -> bool {
        !matches!(self.provider, Provider::None)
    }

    /// What this embedder's vectors are, as recorded with an index; `None` when off.
    /// For the local model the dimension is read from its `config.json`.
    pub fn model_id(&self) -> Option<ModelId> {
        match &self.provider {
            Provider::None => None,
            Provider::Local { dir, .. } => {
                let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
                let dimension = config["hidden_size"].as_u64()? as usize;
                let name = match install::installed(dir) {
                    Some(record) => record.name,
                    None => dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| LOCAL_MODEL_NAME.into()),
                };
                Some(ModelId { name, dimension })
            }
            Provider::Remote(remote) => Some(ModelId { name: remote.model().to_string(), dimension: 0 }),
        }
    }

    /// A description for the start-up log.
    pub fn describe(&self) -> String {
        match &self.provider {
            Provider::None => "no embedding model: search is BM25 only (install one with `echod models install`)".into(),
            Provider::Local { dir, runtime, .. } => {
                let engine = match runtime {
                    Runtime::Candle => "candle".to_string(),
                    Runtime::OnnxRuntime { library } => format!("ONNX Runtime from {}", library.display()),
                    Runtime::Auto { library } => {
                        let library = library.clone().unwrap_or_else(|| dir.join(onnx::LIBRARY_FILE));
                        if library.is_file() { format!("ONNX Runtime from {}", library.display()) } else { "candle (no ONNX Runtime library beside it)".to_string() }
                    }
                };
                format!("local embedding model in {} on {engine}", dir.display())
            }
            Provider::Remote(remote) => format!("embeddings from {} (model {})", remote.base_url(), remote.model()),
        }
    }

    async fn local(&self) -> Result<Arc<LocalModel>, EmbedError> {
        let Provider::Local { dir, max_tokens, runtime, model } = &self.provider else { return Err(EmbedError::Disabled) };
        let loaded = model
            .get_or_try_init(|| async {
                let (dir, max_tokens, runtime) = (dir.clone(), *max_tokens, runtime.clone());
                let started = std::time::Instant::now();
                let loaded = tokio::task::spawn_blocking(move || LocalModel::load_with(&dir, max_tokens, &runtime))
                    .await
                    .map_err(|e| EmbedError::Remote(e.to_string()))??;
                tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, engine = loaded.engine(), "embedding model loaded");
                Ok::<_, EmbedError>(Arc::new(loaded))
            })
            .await?;
        Ok(loaded.clone())
    }

    /// Embeds chunk texts, in order.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(vec![]);
        }
        let started = std::time::Instant::now();
        let n = texts.len();
        let vectors = match &self.provider {
            Provider::None => return Err(EmbedError::Disabled),
            Provider::Local { .. } => {
                let model = self.local().await?;
                let _turn = self.running.acquire().await.map_err(|e| EmbedError::Remote(e.to_string()))?;
                let batch_size = self.batch_size;
                tokio::task::spawn_blocking(move || model.embed(&texts, batch_size)).await.map_err(|e| EmbedError::Remote(e.to_string()))??
            }
            Provider::Remote(remote) => {
                let mut all = Vec::with_capacity(n);
                for batch in texts.chunks(self.batch_size) {
                    all.extend(remote.embed(batch).await?);
                }
                all
            }
        };
        metrics::counter!("echo_embeddings_total").increment(n as u64);
        metrics::histogram!("echo_embedding_seconds").record(started.elapsed().as_secs_f64());
        Ok(vectors)
    }

    /// The vector of a query, from the cache when it was asked recently.
    pub async fn embed_query(&self, query: &str) -> Result<Arc<Vec<f32>>, EmbedError> {
        if let Some(hit) = self.cache.lock().ok().and_then(|c| c.entries.get(query).cloned()) {
            metrics::counter!("echo_query_embedding_cache_hits_total").increment(1);
            return Ok(hit);
        }
        let vector = Arc::new(self.embed(vec![query.to_string()]).await?.into_iter().next().unwrap_or_default());
        if let Ok(mut cache) = self.cache.lock() {
            if cache.order.len() >= QUERY_CACHE_ENTRIES
                && let Some(oldest) = cache.order.pop_front()
            {
                cache.entries.remove(&oldest);
            }
            if cache.entries.insert(query.to_string(), vector.clone()).is_none() {
                cache.order.push_back(query.to_string());
            }
        }
        Ok(vector)
    }
}

/// Unit length, so that a dot product is the cosine (remote providers do not all
/// normalise).
pub(crate) fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}
