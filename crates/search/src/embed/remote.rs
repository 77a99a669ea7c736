//! An OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, Ollama's `/v1`, vLLM, TEI,
//! llama.cpp server): `{"model", "input": [texts]}` → `{"data": [{"index", "embedding"}]}`.
//! The key is a `Secret`, never logged; every call has a time limit.

use std::time::Duration;

use serde::Deserialize;

use common::config::{EmbeddingsConfig, Secret};

use super::{EmbedError, normalise};

pub(super) struct RemoteEmbeddings {
    http: reqwest::Client,
    url: String,
    base_url: String,
    model: String,
    api_key: Secret,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct Answer {
    data: Vec<Item>,
}

impl RemoteEmbeddings {
    pub(super) fn new(config: &EmbeddingsConfig) -> RemoteEmbeddings {
        let base_url = config.base_url.trim_end_matches('/').to_string();
        let url = if base_url.ends_with("/embeddings") { base_url.clone() } else { format!("{base_url}/embeddings") };
        RemoteEmbeddings {
            http: reqwest::Client::new(),
            url,
            base_url,
            model: config.model.clone(),
            api_key: config.api_key.clone(),
            timeout: Duration::from_secs(config.timeout_secs.max(1)),
        }
    }

    pub(super) fn model(&self) -> &str {
        &self.model
    }

    pub(super) fn base_url(&self) -> &str {
        &self.base_url
    }

    pub(super) async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut request = self.http.post(&self.url).timeout(self.timeout).json(&serde_json::json!({"model": self.model, "input": texts}));
        if !self.api_key.is_empty() {
            request = request.bearer_auth(self.api_key.expose());
        }
        let response = request.send().await.map_err(|e| EmbedError::Remote(format!("{} unreachable: {e}", self.base_url)))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(EmbedError::Remote(format!("{} answered {status}: {}", self.base_url, body.chars().take(200).collect::<String>())));
        }
        let answer: Answer = response.json().await.map_err(|e| EmbedError::Remote(format!("unreadable answer: {e}")))?;
        if answer.data.len() != texts.len() {
            return Err(EmbedError::Remote(format!("asked for {} embeddings, got {}", texts.len(), answer.data.len())));
        }
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for (position, item) in answer.data.into_iter().enumerate() {
            let slot = item.index.unwrap_or(position);
            let mut vector = item.embedding;
            normalise(&mut vector);
            if let Some(entry) = vectors.get_mut(slot) {
                *entry = vector;
            }
        }
        if vectors.iter().any(|v| v.is_empty()) || vectors.windows(2).any(|w| w[0].len() != w[1].len()) {
            return Err(EmbedError::Remote("the answer's vectors are missing or of different lengths".into()));
        }
        Ok(vectors)
    }
}
