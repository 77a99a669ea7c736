//! The optional reranker: an HTTP service that scores (query, passage) pairs with a
//! cross-encoder and reorders the fused hits. Two request shapes are spoken, chosen by
//! the URL: Hugging Face TEI's `POST …/rerank` (`{"query", "texts"}` →
//! `[{"index", "score"}]`) and the Jina/Cohere `POST …/v1/rerank` (`{"model", "query",
//! "documents"}` → `{"results": [{"index", "relevance_score"}]}`). Off unless
//! `search.rerank_url` is set. A reranker that fails or is slow never fails a search:
//! the fused order stands and a warning is logged. The key is a `Secret`.

use std::time::Duration;

use serde::Deserialize;

use common::config::{SearchConfig, Secret};

/// How long a rerank call may take before the fused order is used instead.
const RERANK_TIMEOUT: Duration = Duration::from_secs(5);
/// Characters of a passage sent to the reranker (cross-encoders read ~512 tokens).
const MAX_PASSAGE_CHARS: usize = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// TEI: `{"query", "texts"}` → `[{"index", "score"}]`.
    Tei,
    /// Jina / Cohere: `{"model", "query", "documents"}` → `{"results": [{"index", "relevance_score"}]}`.
    Jina,
}

pub(crate) struct Reranker {
    http: reqwest::Client,
    url: String,
    shape: Shape,
    model: String,
    api_key: Secret,
    /// How many fused hits are reordered.
    pub(crate) candidates: usize,
}

#[derive(Deserialize)]
struct Scored {
    index: usize,
    #[serde(alias = "relevance_score")]
    score: f32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Answer {
    Tei(Vec<Scored>),
    Jina { results: Vec<Scored> },
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RerankError {
    #[error("the reranker is unreachable: {0}")]
    Unreachable(String),
    #[error("the reranker answered {0}")]
    Status(String),
    #[error("the reranker's answer is unreadable: {0}")]
    Unreadable(String),
}

impl Reranker {
    /// The reranker `config` names, if any.
    pub(crate) fn from_config(config: &SearchConfig) -> Option<Reranker> {
        let url = config.rerank_url.trim().trim_end_matches('/');
        if url.is_empty() {
            return None;
        }
        let shape = if url.ends_with("/v1/rerank") { Shape::Jina } else { Shape::Tei };
        let url = if url.ends_with("/rerank") { url.to_string() } else { format!("{url}/rerank") };
        Some(Reranker {
            http: reqwest::Client::new(),
            url,
            shape,
            model: config.rerank_model.clone(),
            api_key: config.rerank_api_key.clone(),
            candidates: config.rerank_candidates.max(1),
        })
    }

    pub(crate) fn describe(&self) -> String {
        format!("reranking the top {} with {}", self.candidates, self.url)
    }

    /// The indices of `passages`, best first, with their scores.
    pub(crate) async fn rank(&self, query: &str, passages: &[&str]) -> Result<Vec<(usize, f32)>, RerankError> {
        let texts: Vec<String> = passages.iter().map(|p| p.chars().take(MAX_PASSAGE_CHARS).collect()).collect();
        let body = match self.shape {
            Shape::Tei => serde_json::json!({"query": query, "texts": texts, "truncate": true}),
            Shape::Jina => serde_json::json!({"model": self.model, "query": query, "documents": texts}),
        };
        let mut request = self.http.post(&self.url).timeout(RERANK_TIMEOUT).json(&body);
        if !self.api_key.is_empty() {
            request = request.bearer_auth(self.api_key.expose());
        }
        let response = request.send().await.map_err(|e| RerankError::Unreachable(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(RerankError::Status(status.to_string()));
        }
        let answer: Answer = response.json().await.map_err(|e| RerankError::Unreadable(e.to_string()))?;
        let scored = match answer {
            Answer::Tei(scored) | Answer::Jina { results: scored } => scored,
        };
        order(scored, passages.len())
    }
}

/// The scored indices best first; every index once and in range, or the answer is
/// refused (a partial order would silently drop hits).
fn order(mut scored: Vec<Scored>, n: usize) -> Result<Vec<(usize, f32)>, RerankError> {
    let mut seen = vec![false; n];
    for item in &scored {
        match seen.get_mut(item.index) {
            Some(slot) if !*slot && item.score.is_finite() => *slot = true,
            _ => return Err(RerankError::Unreadable(format!("index {} is out of range, repeated or unscored", item.index))),
        }
    }
    if seen.iter().any(|s| !s) {
        return Err(RerankError::Unreadable(format!("{} of {n} passages were scored", scored.len())));
    }
    scored.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    Ok(scored.into_iter().map(|s| (s.index, s.score)).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn config(url: &str) -> SearchConfig {
        SearchConfig { rerank_url: url.into(), ..SearchConfig::default() }
    }

    #[test]
    fn the_url_chooses_the_shape() {
        assert!(Reranker::from_config(&config("")).is_none());
        let tei = Reranker::from_config(&config("http://127.0.0.1:8080")).unwrap();
        assert_eq!((tei.shape, tei.url.as_str()), (Shape::Tei, "http://127.0.0.1:8080/rerank"));
        let jina = Reranker::from_config(&config("https://api.example/v1/rerank/")).unwrap();
        assert_eq!((jina.shape, jina.url.as_str()), (Shape::Jina, "https://api.example/v1/rerank"));
    }

    #[test]
    fn both_answers_are_read_and_partial_answers_refused() {
        let tei: Answer = serde_json::from_str(r#"[{"index":1,"score":0.9},{"index":0,"score":0.1}]"#).unwrap();
        let jina: Answer = serde_json::from_str(r#"{"results":[{"index":0,"relevance_score":0.2},{"index":1,"relevance_score":0.7}]}"#).unwrap();
        for answer in [tei, jina] {
            let (Answer::Tei(scored) | Answer::Jina { results: scored }) = answer;
            assert_eq!(order(scored, 2).unwrap().iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 0]);
        }
        let partial = vec![Scored { index: 0, score: 1.0 }];
        assert!(order(partial, 2).is_err(), "a passage left unscored");
        let repeated = vec![Scored { index: 0, score: 1.0 }, Scored { index: 0, score: 0.5 }];
        assert!(order(repeated, 2).is_err());
        let outside = vec![Scored { index: 0, score: 1.0 }, Scored { index: 7, score: 0.5 }];
        assert!(order(outside, 2).is_err());
    }
}
