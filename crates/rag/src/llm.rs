//! The language model client: OpenAI-compatible `POST {base}/chat/completions` (OpenAI,
//! vLLM, llama.cpp's server, Ollama's `/v1`) or Ollama's native `POST {base}/api/chat`,
//! always streamed. A call is retried with exponential backoff while nothing has been
//! streamed yet (connection refused, 408/429/5xx); after `breaker_failures` failures in
//! a row the model is not called for `breaker_cooldown_secs`. Every attempt is bounded
//! by `timeout_secs`, and dropping the stream closes the connection, which is how a
//! client that goes away cancels the model's work. Metrics: calls by outcome, latency,
//! time to first token, tokens.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use common::config::LlmConfig;
use common::sse::{self, StreamError};
use common::wire::Usage;

/// Which protocol the configured model speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    OpenAi,
    Ollama,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LlmError {
    #[error("the language model is not answering (circuit open after repeated failures; retrying in {0} s)")]
    CircuitOpen(u64),
    #[error("the language model did not answer within {0} s")]
    Timeout(u64),
    #[error("the language model is unreachable: {0}")]
    Unreachable(String),
    #[error("the language model refused the request ({status}): {detail}")]
    Refused { status: u16, detail: String },
    #[error("the language model's stream broke off: {0}")]
    Stream(String),
}

/// A chat message as both protocols take it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) role: String,
    pub(crate) content: String,
}

impl Message {
    pub(crate) fn new(role: &str, content: impl Into<String>) -> Message {
        Message { role: role.to_string(), content: content.into() }
    }
}

/// What a streamed call yields.
#[derive(Debug, PartialEq)]
pub(crate) enum Piece {
    Text(String),
    Usage(Usage),
}

pub(crate) type PieceStream = Pin<Box<dyn Stream<Item = Result<Piece, LlmError>> + Send>>;

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

#[derive(Clone)]
pub(crate) struct Llm {
    http: reqwest::Client,
    config: LlmConfig,
    protocol: Protocol,
    breaker: Arc<Mutex<Breaker>>,
}

impl Llm {
    /// The configured model, or `None` for `provider: none`.
    pub(crate) fn from_config(config: &LlmConfig) -> anyhow::Result<Option<Llm>> {
        let protocol = match config.provider.as_str() {
            "" | "none" => return Ok(None),
            "openai" => Protocol::OpenAi,
            "ollama" => Protocol::Ollama,
            other => anyhow::bail!("llm.provider `{other}` is not one of none, openai, ollama"),
        };
        if config.base_url.trim().is_empty() || config.model.trim().is_empty() {
            anyhow::bail!("llm.provider `{}` needs llm.base_url and llm.model", config.provider);
        }
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
        Ok(Some(Llm { http, config: config.clone(), protocol, breaker: Arc::new(Mutex::new(Breaker::default())) }))
    }

    pub(crate) fn describe(&self) -> String {
        format!("answers are written by `{}` at {} ({:?} protocol)", self.config.model, self.config.base_url, self.protocol)
    }

    fn url(&self) -> String {
        let base = self.config.base_url.trim_end_matches('/');
        match self.protocol {
            Protocol::OpenAi => format!("{base}/chat/completions"),
            // Ollama's native API sits beside its `/v1`.
            Protocol::Ollama => format!("{}/api/chat", base.strip_suffix("/v1").unwrap_or(base)),
        }
    }

    fn body(&self, messages: &[Message], max_tokens: u32) -> serde_json::Value {
        match self.protocol {
            Protocol::OpenAi => serde_json::json!({
                "model": self.config.model,
                "messages": messages,
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": max_tokens,
                "temperature": self.config.temperature,
            }),
            Protocol::Ollama => serde_json::json!({
                "model": self.config.model,
                "messages": messages,
                "stream": true,
                "options": {"temperature": self.config.temperature, "num_predict": max_tokens},
            }),
        }
    }

    fn check_breaker(&self) -> Result<(), LlmError> {
        let breaker = self.breaker.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match breaker.open_until {
            Some(until) if until > Instant::now() => Err(LlmError::CircuitOpen(until.saturating_duration_since(Instant::now()).as_secs().max(1))),
            _ => Ok(()),
        }
    }

    fn record(&self, ok: bool) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if ok {
            *breaker = Breaker::default();
            return;
        }
        breaker.failures += 1;
        if breaker.failures >= self.config.breaker_failures.max(1) {
            breaker.open_until = Some(Instant::now() + Duration::from_secs(self.config.breaker_cooldown_secs));
            breaker.failures = 0;
            tracing::warn!(cooldown_secs = self.config.breaker_cooldown_secs, "the language model failed repeatedly; not calling it for a while");
        }
    }

    /// Starts a streamed completion of `messages`: retried until the model answers
    /// 2xx, then its pieces as they arrive, the whole within `timeout_secs`.
    pub(crate) async fn stream(&self, messages: &[Message], max_tokens: u32) -> Result<PieceStream, LlmError> {
        self.check_breaker()?;
        let started = Instant::now();
        let timeout = Duration::from_secs(self.config.timeout_secs.max(1));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut attempt = 0u32;
        let response = loop {
            let mut request = self.http.post(self.url()).json(&self.body(messages, max_tokens));
            if !self.config.api_key.is_empty() {
                request = request.bearer_auth(self.config.api_key.expose());
            }
            let outcome = match tokio::time::timeout_at(deadline, request.send()).await {
                Err(_) => Err((LlmError::Timeout(timeout.as_secs()), false)),
                Ok(Err(error)) => Err((LlmError::Unreachable(without_url(error)), true)),
                Ok(Ok(response)) if response.status().is_success() => Ok(response),
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    let detail = tokio::time::timeout_at(deadline, response.text()).await.ok().and_then(Result::ok).unwrap_or_default();
                    let detail: String = detail.chars().take(300).collect();
                    Err((LlmError::Refused { status, detail }, matches!(status, 408 | 429 | 500..=599)))
                }
            };
            match outcome {
                Ok(response) => break response,
                Err((error, retryable)) => {
                    metrics::counter!("echo_llm_attempt_failures_total").increment(1);
                    if !retryable || attempt >= self.config.max_retries {
                        self.record(false);
                        metrics::counter!("echo_llm_requests_total", "outcome" => "error").increment(1);
                        return Err(error);
                    }
                    let backoff = Duration::from_millis(self.config.retry_backoff_ms.saturating_mul(1 << attempt.min(10)));
                    tracing::warn!(attempt, error = %error, "language model call failed; retrying");
                    if tokio::time::Instant::now() + backoff >= deadline {
                        self.record(false);
                        return Err(LlmError::Timeout(timeout.as_secs()));
                    }
                    tokio::time::sleep(backoff).await;
                    attempt += 1;
                }
            }
        };
        let pieces: PieceStream = match self.protocol {
            Protocol::OpenAi => Box::pin(sse::events(response.bytes_stream()).filter_map(|event| async move {
                match event {
                    Err(error) => Some(Err(stream_error(error))),
                    Ok(event) if event.data.trim() == "[DONE]" => None,
                    Ok(event) => openai_piece(&event.data).transpose(),
                }
            })),
            Protocol::Ollama => Box::pin(sse::lines(response.bytes_stream()).filter_map(|line| async move {
                match line {
                    Err(error) => Some(Err(stream_error(error))),
                    Ok(line) if line.trim().is_empty() => None,
                    Ok(line) => ollama_piece(&line).transpose(),
                }
            })),
        };
        Ok(Box::pin(Timed {
            inner: pieces,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            timeout,
            started,
            first: true,
            llm: self.clone(),
            done: false,
            trace: common::trace::current(),
            started_at: std::time::SystemTime::now(),
            usage: None,
        }))
    }
}

/// An error's words without the URL (which may carry a key in a query string).
fn without_url(error: reqwest::Error) -> String {
    error.without_url().to_string()
}

fn stream_error(error: StreamError) -> LlmError {
    LlmError::Stream(error.to_string())
}

#[derive(Deserialize)]
struct OpenAiChunk {
    #[serde(default)]
    choices: Vec<OpenAiChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OpenAiChoice {
    #[serde(default)]
    delta: Option<OpenAiDelta>,
    #[serde(default)]
    message: Option<OpenAiDelta>,
}

#[derive(Deserialize)]
struct OpenAiDelta {
    #[serde(default)]
    content: Option<String>,
}

/// One OpenAI stream chunk: text, the usage chunk, an error, or nothing of interest.
fn openai_piece(data: &str) -> Result<Option<Piece>, LlmError> {
    let chunk: OpenAiChunk = serde_json::from_str(data).map_err(|e| LlmError::Stream(format!("not an OpenAI chunk: {e}")))?;
    if let Some(error) = chunk.error {
        return Err(LlmError::Stream(error.get("message").and_then(|m| m.as_str()).unwrap_or("error").chars().take(300).collect()));
    }
    let text: String = chunk.choices.iter().filter_map(|c| c.delta.as_ref().or(c.message.as_ref())?.content.clone()).collect();
    if !text.is_empty() {
        return Ok(Some(Piece::Text(text)));
    }
    Ok(chunk.usage.map(Piece::Usage))
}

#[derive(Deserialize)]
struct OllamaLine {
    #[serde(default)]
    message: Option<OpenAiDelta>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    prompt_eval_count: u64,
    #[serde(default)]
    eval_count: u64,
    #[serde(default)]
    error: Option<String>,
}

/// One line of Ollama's NDJSON stream.
fn ollama_piece(line: &str) -> Result<Option<Piece>, LlmError> {
    let parsed: OllamaLine = serde_json::from_str(line).map_err(|e| LlmError::Stream(format!("not an Ollama line: {e}")))?;
    if let Some(error) = parsed.error {
        return Err(LlmError::Stream(error.chars().take(300).collect()));
    }
    if parsed.done {
        let usage = Usage { prompt_tokens: parsed.prompt_eval_count, completion_tokens: parsed.eval_count, total_tokens: parsed.prompt_eval_count + parsed.eval_count };
        return Ok(Some(Piece::Usage(usage)));
    }
    Ok(parsed.message.and_then(|m| m.content).filter(|t| !t.is_empty()).map(Piece::Text))
}

/// The pieces, ended with a timeout error at the deadline; records the call's outcome
/// and latency once.
struct Timed {
    inner: PieceStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    started: Instant,
    first: bool,
    llm: Llm,
    done: bool,
    /// The ask's trace: the call is recorded as its child span.
    trace: Option<common::trace::TraceContext>,
    started_at: std::time::SystemTime,
    usage: Option<Usage>,
}

impl Timed {
    /// The call as a span of the ask's trace (model, tokens, outcome — never the prompt
    /// or the answer), and a record in the logs.
    fn finish(&mut self, outcome: &str) {
        let model = self.llm.config.model.clone();
        let (prompt, completion) = self.usage.as_ref().map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
        let ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(%model, prompt_tokens = prompt, completion_tokens = completion, elapsed_ms = ms, %outcome, "model answered");
        if let Some(parent) = &self.trace {
            let call = parent.child();
            common::otlp::record(common::otlp::Finished {
                service: "rag",
                name: format!("chat {model}"),
                kind: common::otlp::Kind::Client,
                context: &call,
                parent_span_id: Some(parent.span_id()),
                started: self.started_at,
                attributes: vec![
                    common::otlp::Attribute::new("gen_ai.request.model", model),
                    common::otlp::Attribute::new("gen_ai.usage.input_tokens", prompt as i64),
                    common::otlp::Attribute::new("gen_ai.usage.output_tokens", completion as i64),
                    common::otlp::Attribute::new("echo.outcome", outcome.to_string()),
                ],
                error: outcome != "ok",
            });
        }
    }
}

impl Stream for Timed {
    type Item = Result<Piece, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.done = true;
            self.llm.record(false);
            self.finish("timeout");
            metrics::counter!("echo_llm_requests_total", "outcome" => "timeout").increment(1);
            return Poll::Ready(Some(Err(LlmError::Timeout(self.timeout.as_secs()))));
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(piece))) => {
                if self.first {
                    self.first = false;
                    metrics::histogram!("echo_llm_first_token_seconds").record(self.started.elapsed().as_secs_f64());
                }
                if let Piece::Usage(usage) = &piece {
                    metrics::counter!("echo_llm_tokens_total", "kind" => "prompt").increment(usage.prompt_tokens);
                    metrics::counter!("echo_llm_tokens_total", "kind" => "completion").increment(usage.completion_tokens);
                    self.usage = Some(*usage);
                }
                Poll::Ready(Some(Ok(piece)))
            }
            Poll::Ready(Some(Err(error))) => {
                self.done = true;
                self.llm.record(false);
                self.finish("error");
                metrics::counter!("echo_llm_requests_total", "outcome" => "error").increment(1);
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                self.done = true;
                self.llm.record(true);
                self.finish("ok");
                metrics::counter!("echo_llm_requests_total", "outcome" => "ok").increment(1);
                metrics::histogram!("echo_llm_seconds").record(self.started.elapsed().as_secs_f64());
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn openai_chunks_give_text_usage_or_nothing() {
        assert_eq!(openai_piece(r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#).unwrap(), Some(Piece::Text("Hel".into())));
        assert_eq!(openai_piece(r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#).unwrap(), None);
        assert_eq!(
            openai_piece(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#).unwrap(),
            Some(Piece::Usage(Usage { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 }))
        );
        assert!(openai_piece(r#"{"error":{"message":"overloaded"}}"#).is_err());
        assert!(openai_piece("not json").is_err());
    }

    #[test]
    fn ollama_lines_give_text_then_usage() {
        assert_eq!(ollama_piece(r#"{"message":{"role":"assistant","content":"Hi"},"done":false}"#).unwrap(), Some(Piece::Text("Hi".into())));
        assert_eq!(
            ollama_piece(r#"{"message":{"role":"assistant","content":""},"done":true,"prompt_eval_count":9,"eval_count":3}"#).unwrap(),
            Some(Piece::Usage(Usage { prompt_tokens: 9, completion_tokens: 3, total_tokens: 12 }))
        );
    }

    #[test]
    fn the_native_ollama_url_sits_beside_its_v1() {
        let config = LlmConfig { provider: "ollama".into(), base_url: "http://127.0.0.1:11434/v1/".into(), model: "m".into(), ..LlmConfig::default() };
        assert_eq!(Llm::from_config(&config).unwrap().unwrap().url(), "http://127.0.0.1:11434/api/chat");
        let config = LlmConfig { provider: "openai".into(), ..config };
        assert_eq!(Llm::from_config(&config).unwrap().unwrap().url(), "http://127.0.0.1:11434/v1/chat/completions");
        assert!(Llm::from_config(&LlmConfig { provider: "gpt".into(), ..LlmConfig::default() }).is_err());
        assert!(Llm::from_config(&LlmConfig::default()).unwrap().is_none());
    }
}
