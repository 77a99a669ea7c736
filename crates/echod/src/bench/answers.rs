//! `echod bench answers` (B9): end-to-end answers against a stub language model that
//! speaks the OpenAI protocol over a real socket and streams at a fixed rate (its first
//! token after `first_token_ms`, then one token every `1/token_rate` s). Echo (gateway →
//! rag → search → the stub, SSE back) and LlamaIndex's query engine (the same files,
//! BM25 + MiniLM fusion, `OpenAILike` pointed at the same stub, streaming) each answer
//! the same questions from `clients` concurrent clients. Reported: time to first token
//! at the client, and the platform's overhead on it (that minus the stub's own first-
//! token delay), p50 and p95; and for Echo, that every citation is a chunk its search
//! returns for that question (the stub cites passages [1] and [2] and invents [9]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde::Deserialize;

use common::EchoConfig;
use common::config::Switch;
use common::wire::{ASK_EVENT_ANSWER, ASK_EVENT_DELTA, ASK_EVENT_ERROR, Answer};

use super::corpus::EvalSet;
use super::quality::Echo;

pub struct AnswersArgs {
    pub questions: usize,
    pub clients: usize,
    pub files: usize,
    pub first_token_ms: u64,
    pub token_rate: f64,
    pub answer_tokens: usize,
    pub baseline: bool,
}

/// The stub's timing, shared with its handler.
#[derive(Clone)]
struct Stub {
    first_token: Duration,
    gap: Duration,
    tokens: usize,
    calls: Arc<AtomicUsize>,
}

async fn stub_completions(axum::extract::State(stub): axum::extract::State<Stub>, axum::Json(body): axum::Json<serde_json::Value>) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, Sse};
    stub.calls.fetch_add(1, Ordering::Relaxed);
    let words: Vec<String> = (0..stub.tokens)
        .map(|i| match i {
            3 => " [1]".to_string(),
            7 => " [2]".to_string(),
            11 => " [9]".to_string(),
            _ => format!(" word{i}"),
        })
        .collect();
    if body["stream"] != true {
        tokio::time::sleep(stub.first_token + stub.gap * stub.tokens as u32).await;
        return axum::Json(serde_json::json!({
            "id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": words.concat()}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 500, "completion_tokens": stub.tokens, "total_tokens": 500 + stub.tokens},
        }))
        .into_response();
    }
    let n = words.len();
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let words = words.clone();
        let stub = stub.clone();
        async move {
            if i > n + 1 {
                return None;
            }
            tokio::time::sleep(if i == 0 { stub.first_token } else if i < n { stub.gap } else { Duration::ZERO }).await;
            let data = if i < n {
                serde_json::json!({"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": "stub", "choices": [{"index": 0, "delta": {"content": words[i]}, "finish_reason": null}]}).to_string()
            } else if i == n {
                serde_json::json!({"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": "stub", "choices": [], "usage": {"prompt_tokens": 500, "completion_tokens": n, "total_tokens": 500 + n}}).to_string()
            } else {
                "[DONE]".to_string()
            };
            Some((Ok::<_, std::convert::Infallible>(Event::default().data(data)), i + 1))
        }
    });
    Sse::new(stream).into_response()
}

async fn start_stub(stub: Stub) -> anyhow::Result<String> {
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(stub_completions)).with_state(stub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One answered question as the client saw it.
struct Asked {
    question: String,
    first_token: Duration,
    answer: Answer,
}

async fn ask_streaming(echo: &Echo, question: &str) -> anyhow::Result<Asked> {
    let started = Instant::now();
    let response = echo
        .http
        .post(format!("{}/api/v1/ask", echo.gateway))
        .bearer_auth(&echo.token)
        .header("accept", "text/event-stream")
        .json(&serde_json::json!({"question": question}))
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "ask failed: {}", response.status());
    let mut events = Box::pin(common::sse::events(response.bytes_stream()));
    let mut first_token = None;
    while let Some(event) = events.next().await {
        let event = event?;
        match event.event.as_str() {
            ASK_EVENT_DELTA if first_token.is_none() => first_token = Some(started.elapsed()),
            ASK_EVENT_ANSWER => {
                let answer: Answer = serde_json::from_str(&event.data)?;
                return Ok(Asked { question: question.to_string(), first_token: first_token.unwrap_or_else(|| started.elapsed()), answer });
            }
            ASK_EVENT_ERROR => anyhow::bail!("ask failed: {}", event.data),
            _ => {}
        }
    }
    anyhow::bail!("the answer stream ended early")
}

/// The HTML pages the questions' gold names, then others in order, up to `n`.
fn chosen_files(set: &EvalSet, n: usize) -> Vec<String> {
    let mut files: Vec<String> = Vec::new();
    for question in &set.questions {
        for gold in &question.gold {
            let file = gold.split('#').next().unwrap_or_default().to_string();
            if file.ends_with(".html") && set.files.contains(&file) && !files.contains(&file) {
                files.push(file);
            }
        }
    }
    for file in set.files.iter().filter(|f| f.ends_with(".html")) {
        if files.len() >= n {
            break;
        }
        if !files.contains(file) {
            files.push(file.clone());
        }
    }
    files.truncate(n.max(1));
    files.sort();
    files
}

pub async fn run(args: AnswersArgs) -> anyhow::Result<()> {
    let cache = super::python::bench_data();
    let full = super::corpus::load_eval(&super::python::repo_root().join("tests/eval/debian-docs.json"), &cache)?;
    let files = chosen_files(&full, args.files);
    let answerable: Vec<String> = full.questions.iter().filter(|q| q.gold.iter().any(|g| files.contains(g))).map(|q| q.q.clone()).collect();
    anyhow::ensure!(!answerable.is_empty(), "no question is answered by the chosen files");
    let questions: Vec<String> = (0..args.questions).map(|i| answerable[i % answerable.len()].clone()).collect();
    let set = EvalSet { files, ..full };
    let gap = Duration::from_secs_f64(1.0 / args.token_rate.max(0.001));
    let stub = Stub { first_token: Duration::from_millis(args.first_token_ms), gap, tokens: args.answer_tokens.max(12), calls: Arc::default() };
    let stub_url = start_stub(stub.clone()).await?;
    println!(
        "B9 answers: {} HTML pages, {} questions ({} distinct) from {} concurrent clients; the stub LLM's first token after {} ms, then {:.0} tokens/s, {} tokens",
        set.files.len(),
        questions.len(),
        answerable.len(),
        args.clients,
        args.first_token_ms,
        args.token_rate,
        stub.tokens
    );

    let dir = tempfile::tempdir()?;
    let model_dir = super::python::bench_model().await?;
    let mut config = EchoConfig::for_test(dir.path());
    config.log.ship = false;
    config.log.level = "warn".into();
    config.gateway.rate_limits = Switch::Off;
    config.identity.access_token_ttl_secs = 86_400;
    config.storage.quota_bytes_per_user = 100 * 1024 * 1024 * 1024;
    config.embeddings.provider = Some("local".into());
    config.embeddings.model_dir = Some(model_dir.clone());
    config.llm.provider = "openai".into();
    config.llm.base_url = stub_url.clone();
    config.llm.model = "stub".into();
    config.llm.timeout_secs = 120;
    let echo = Echo::start(config, true).await?;
    let started = Instant::now();
    let ids = echo.upload(&set).await?;
    let (indexed, failed) = echo.wait_indexed(ids.len()).await?;
    println!("  Echo indexed {indexed} documents ({} failed) in {:.0} s", failed.len(), started.elapsed().as_secs_f64());
    // Warm: each distinct question once (query embeddings cached, pages in memory).
    for question in &answerable {
        ask_streaming(&echo, question).await?;
    }

    let queue = Arc::new(std::sync::Mutex::new(questions.clone()));
    let echo = Arc::new(echo);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients.max(1) {
        let (queue, echo) = (queue.clone(), echo.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop();
                let Some(question) = next else { break };
                done.push(ask_streaming(&echo, &question).await?);
            }
            Ok::<_, anyhow::Error>(done)
        }));
    }
    let mut asked: Vec<Asked> = Vec::new();
    for task in tasks {
        asked.extend(task.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    // Citations against what search returns for the same question (the same ranking rag uses).
    let top_k = echo.system.config.rag.top_k;
    let mut retrieved: HashMap<String, Vec<String>> = HashMap::new();
    for question in &answerable {
        let hits: serde_json::Value = echo
            .http
            .post(format!("{}/api/v1/search", echo.gateway))
            .bearer_auth(&echo.token)
            .json(&serde_json::json!({"query": question, "k": top_k, "full_text": true}))
            .send()
            .await?
            .json()
            .await?;
        retrieved.insert(question.clone(), hits["hits"].as_array().cloned().unwrap_or_default().iter().filter_map(|h| h["chunk_id"].as_str().map(str::to_string)).collect());
    }
    let (mut citations, mut citations_retrieved, mut invented_shown) = (0usize, 0usize, 0usize);
    for a in &asked {
        let permitted = retrieved.get(&a.question).cloned().unwrap_or_default();
        for citation in &a.answer.citations {
            citations += 1;
            if permitted.contains(&citation.chunk_id) {
                citations_retrieved += 1;
            }
        }
        if a.answer.answer.contains("[9]") {
            invented_shown += 1;
        }
    }
    let first_token_ms = args.first_token_ms as f64;
    // "Not in your documents" is answered without the model: not a model answer to time.
    let declined = asked.iter().filter(|a| a.answer.not_found).count();
    let mut ttft: Vec<f64> = asked.iter().filter(|a| !a.answer.not_found).map(|a| a.first_token.as_secs_f64() * 1000.0).collect();
    ttft.sort_by(f64::total_cmp);
    let overhead: Vec<f64> = ttft.iter().map(|t| t - first_token_ms).collect();
    let echo_line = format!(
        "| Echo (gateway → rag → search → stub, SSE) | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        ttft.len(),
        percentile(&ttft, 0.5),
        percentile(&ttft, 0.95),
        percentile(&overhead, 0.5),
        percentile(&overhead, 0.95),
        asked.len() as f64 / wall
    );
    let echo = Arc::try_unwrap(echo).map_err(|_| anyhow::anyhow!("clients still hold Echo"))?;
    echo.system.stop().await;

    let mut baseline_line = "| LlamaIndex query engine (not run) | | | | | | |".to_string();
    if args.baseline {
        let work = tempfile::tempdir()?;
        let manifest = serde_json::json!({
            "dir": set.dir, "files": set.files, "questions": questions, "warm": answerable, "model_dir": model_dir,
            "llm_url": stub_url, "clients": args.clients, "k": top_k,
        });
        let path = work.path().join("manifest.json");
        std::fs::write(&path, serde_json::to_vec(&manifest)?)?;
        eprintln!("  running LlamaIndex's query engine against the same stub…");
        let out = tokio::task::spawn_blocking(move || super::python::run_script("llamaindex_answers.py", &[path.as_os_str()])).await??;
        #[derive(Deserialize)]
        struct Out {
            first_token_ms: Vec<f64>,
            seconds: f64,
        }
        let out: Out = serde_json::from_value(out).context("the LlamaIndex results")?;
        let mut ttft = out.first_token_ms;
        ttft.sort_by(f64::total_cmp);
        let overhead: Vec<f64> = ttft.iter().map(|t| t - first_token_ms).collect();
        baseline_line = format!(
            "| LlamaIndex query engine (BM25 + MiniLM fusion, OpenAILike, streaming) | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            ttft.len(),
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.95),
            percentile(&overhead, 0.5),
            percentile(&overhead, 0.95),
            ttft.len() as f64 / out.seconds
        );
    }
    println!();
    println!("| system | answers | TTFT p50 ms | TTFT p95 ms | overhead p50 ms | overhead p95 ms | answers/s |");
    println!("|---|---|---|---|---|---|---|");
    println!("{echo_line}");
    println!("{baseline_line}");
    println!();
    println!(
        "Echo citations that are retrieved chunks: {citations_retrieved}/{citations}; answers still showing the invented [9]: {invented_shown}/{}; declined as not in the documents (not timed): {declined}; stub calls: {}",
        asked.len(),
        stub.calls.load(Ordering::Relaxed)
    );
    Ok(())
}
