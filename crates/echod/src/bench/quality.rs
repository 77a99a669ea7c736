//! `echod bench quality`: retrieval quality on a known-item set, Echo beside LlamaIndex
//! on the same files in the same run.
//!
//! Echo is measured as a user meets it: a real system (embedding model installed),
//! every file uploaded through the gateway API and taken through the whole pipeline
//! (parse → chunk → embed → index), every question asked through the authenticated
//! `POST /api/v1/search` in each mode (bm25, vector, hybrid). LlamaIndex runs
//! `tests/bench/llamaindex_quality.py` on the same files with the same model. Each
//! system's top 10 per question is scored the same way: recall@10 (a gold file or
//! page among them), top-1, MRR@10, nDCG@10 (binary gain, each gold counted once),
//! and answer@3 (an answer string in the text of the first three hits).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;

use common::EchoConfig;
use common::config::Switch;

use super::corpus::{EvalSet, Question, Target};

const CLIENT: &str = "bench-quality";
const REDIRECT: &str = "http://127.0.0.1:9/cb";
const USER: &str = "evaluator";
const PASSWORD: &str = "bench-password-123";
const K: usize = 10;

pub struct QualityArgs {
    /// An Echo evaluation file (default `tests/eval/debian-docs.json`).
    pub eval: Option<PathBuf>,
    /// A BEIR directory instead.
    pub beir: Option<PathBuf>,
    /// At most this many questions (0: all).
    pub limit: usize,
    pub baselines: bool,
    /// Keep Echo's data dir here, and reuse it when it already holds this corpus.
    pub data_dir: Option<PathBuf>,
    pub rerank_url: Option<String>,
    /// Fusion settings to try (default: Echo's defaults).
    pub rrf_k: Option<f32>,
    pub bm25_weight: Option<f32>,
    pub vector_weight: Option<f32>,
    /// Write every system's ranked lists here (JSON).
    pub out: Option<PathBuf>,
    /// Also answer in LLM mode: `smollm2` (a real 135M model from PyPI, run here) or the
    /// base URL of any OpenAI-compatible endpoint.
    pub llm: Option<String>,
    pub llm_model: Option<String>,
    pub llm_context_tokens: Option<usize>,
    /// Skip the retrieval modes (answers only).
    pub answers_only: bool,
    /// With `out`: the BM25 and vector lists unfused, this deep, every chunk, scored.
    pub raw_depth: usize,
    /// Keep the chunks in this PostgreSQL (full-text search and pgvector) instead of the
    /// embedded index (`search.url`).
    pub search_url: Option<String>,
}

/// One hit as scored: where it points and its text.
#[derive(Clone, Debug, Deserialize)]
struct Ranked {
    file: Option<String>,
    page: Option<u32>,
    #[serde(default)]
    text: String,
    #[serde(default)]
    chunk: Option<String>,
}

#[derive(Default, Clone, Copy)]
struct Scores {
    n: usize,
    recall: usize,
    top1: usize,
    mrr: f64,
    ndcg: f64,
    answer3: usize,
    with_answers: usize,
}

impl Scores {
    fn add(&mut self, question: &Question, ranked: &[Ranked]) {
        let targets: Vec<Target> = question.gold.iter().map(|g| Target::parse(g)).collect();
        self.n += 1;
        let mut seen: HashSet<usize> = HashSet::new();
        let mut first: Option<usize> = None;
        let mut dcg = 0.0;
        for (rank, hit) in ranked.iter().take(K).enumerate() {
            let Some(file) = &hit.file else { continue };
            if let Some(target) = targets.iter().position(|t| t.matches(file, hit.page)) {
                first.get_or_insert(rank);
                if seen.insert(target) {
                    dcg += 1.0 / ((rank + 2) as f64).log2();
                }
            }
        }
        let ideal: f64 = (0..targets.len().min(K)).map(|i| 1.0 / ((i + 2) as f64).log2()).sum();
        if let Some(rank) = first {
            self.recall += 1;
            self.top1 += usize::from(rank == 0);
            self.mrr += 1.0 / (rank + 1) as f64;
        }
        self.ndcg += if ideal > 0.0 { dcg / ideal } else { 0.0 };
        if !question.answers.is_empty() {
            self.with_answers += 1;
            let top: String = ranked.iter().take(3).map(|h| h.text.to_lowercase()).collect::<Vec<_>>().join("\n");
            if question.answers.iter().any(|a| top.contains(&a.to_lowercase())) {
                self.answer3 += 1;
            }
        }
    }

    fn line(&self, name: &str) -> String {
        let n = self.n.max(1) as f64;
        format!(
            "| {name} | {}/{} | {}/{} | {:.3} | {:.3} | {}/{} |",
            self.recall,
            self.n,
            self.top1,
            self.n,
            self.mrr / n,
            self.ndcg / n,
            self.answer3,
            self.with_answers
        )
    }
}

/// The subsets reported apart: questions whose gold is a PDF page, and the others.
fn subset_of(question: &Question) -> &'static str {
    if question.gold.iter().any(|g| g.to_lowercase().contains(".pdf")) { "pdf" } else { "html/text" }
}

/// A whole Echo started for a benchmark, with one signed-in member of org `bench`.
pub(crate) struct Echo {
    pub(crate) system: crate::System,
    pub(crate) http: reqwest::Client,
    pub(crate) token: String,
    pub(crate) gateway: String,
}

impl Echo {
    pub(crate) async fn start(config: EchoConfig, fresh: bool) -> anyhow::Result<Echo> {
        let system = crate::up(config).await?;
        crate::wait_ready(&system.config, Duration::from_secs(60)).await?;
        let config = (*system.config).clone();
        if fresh {
            identity::add_client(&config, CLIENT, vec![REDIRECT.into()], None, "RS256").await?;
            identity::add_user(&config, USER, PASSWORD, "bench", "member", None).await?;
        }
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).pool_max_idle_per_host(64).build()?;
        let token = super::sign_in(&http, &config.issuer(), CLIENT, REDIRECT, USER, PASSWORD).await?;
        let gateway = config.url(common::ServiceName::Gateway);
        Ok(Echo { system, http, token, gateway })
    }

    /// Uploads every file (4 at a time); returns document id → corpus path.
    pub(crate) async fn upload(&self, set: &EvalSet) -> anyhow::Result<HashMap<String, String>> {
        use futures_util::StreamExt;
        let uploads = futures_util::stream::iter(set.files.iter().cloned())
            .map(|relative| async move {
                let bytes = tokio::fs::read(set.dir.join(&relative)).await?;
                let part = reqwest::multipart::Part::bytes(bytes).file_name(relative.replace('/', "__"));
                let form = reqwest::multipart::Form::new().part("file", part);
                let response = self.http.post(format!("{}/api/v1/documents", self.gateway)).bearer_auth(&self.token).multipart(form).send().await?;
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                anyhow::ensure!(status.is_success(), "uploading {relative}: {status} {body}");
                Ok::<_, anyhow::Error>((body["id"].as_str().unwrap_or_default().to_string(), relative))
            })
            .buffer_unordered(4);
        let mut ids = HashMap::new();
        futures_util::pin_mut!(uploads);
        while let Some(uploaded) = uploads.next().await {
            let (id, relative) = uploaded?;
            // Identical files are one document: the first path names it.
            ids.entry(id).or_insert(relative);
        }
        Ok(ids)
    }

    /// Waits until no document is still being processed; returns (indexed, failed).
    pub(crate) async fn wait_indexed(&self, expected: usize) -> anyhow::Result<(usize, Vec<String>)> {
        let started = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
            let mut failed = Vec::new();
            let mut offset = 0;
            loop {
                let page: serde_json::Value = self
                    .http
                    .get(format!("{}/api/v1/documents?limit=500&offset={offset}", self.gateway))
                    .bearer_auth(&self.token)
                    .send()
                    .await?
                    .json()
                    .await?;
                let documents = page["documents"].as_array().cloned().unwrap_or_default();
                for document in &documents {
                    let status = document["status"].as_str().unwrap_or_default().to_string();
                    if status == "failed" {
                        failed.push(format!("{}: {}", document["filename"], document["error"]));
                    }
                    *statuses.entry(status).or_default() += 1;
                }
                offset += documents.len();
                if documents.len() < 500 {
                    break;
                }
            }
            let done = statuses.get("done").copied().unwrap_or(0) + failed.len();
            if done >= expected {
                return Ok((statuses.get("done").copied().unwrap_or(0), failed));
            }
            if last_report.elapsed() > Duration::from_secs(30) {
                eprintln!("  {:.0} s: {statuses:?}", started.elapsed().as_secs_f64());
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn search(&self, query: &str, mode: &str, rerank: bool, ids: &HashMap<String, String>) -> anyhow::Result<Vec<Ranked>> {
        let body = serde_json::json!({"query": query, "k": K, "mode": mode, "full_text": true, "rerank": rerank});
        let response = self.http.post(format!("{}/api/v1/search", self.gateway)).bearer_auth(&self.token).json(&body).send().await?;
        let status = response.status();
        let hits: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "search failed: {status} {hits}");
        Ok(hits["hits"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|hit| Ranked {
                file: hit["document_id"].as_str().and_then(|id| ids.get(id)).cloned(),
                page: hit["page"].as_u64().map(|p| p as u32),
                text: hit["text"].as_str().unwrap_or_default().to_string(),
                chunk: hit["chunk_id"].as_str().map(str::to_string),
            })
            .collect())
    }

    /// One mode's list as the index ranks it: `depth` chunks, any number per page,
    /// each with its score (and cosine, for vectors).
    async fn search_raw(&self, query: &str, mode: &str, depth: usize, ids: &HashMap<String, String>) -> anyhow::Result<Vec<serde_json::Value>> {
        let body = serde_json::json!({"query": query, "k": depth, "mode": mode, "per_page": 0});
        let response = self.http.post(format!("{}/api/v1/search", self.gateway)).bearer_auth(&self.token).json(&body).send().await?;
        let status = response.status();
        let hits: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "search failed: {status} {hits}");
        Ok(hits["hits"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|hit| {
                let file = hit["document_id"].as_str().and_then(|id| ids.get(id)).cloned();
                serde_json::json!({"file": file, "page": hit["page"], "chunk": hit["chunk_id"], "score": hit["score"], "similarity": hit["similarity"], "section": hit["section"]})
            })
            .collect())
    }

    async fn ask(&self, question: &str) -> anyhow::Result<serde_json::Value> {
        let response = self.http.post(format!("{}/api/v1/ask", self.gateway)).bearer_auth(&self.token).json(&serde_json::json!({"question": question})).send().await?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "ask failed: {status} {answer}");
        Ok(answer)
    }
}

/// How Echo's answers fare: the asked-for fact in the answer's text, a citation of a
/// gold file or page, every citation a retrieved chunk, and "not in your documents"
/// where (and only where) the corpus does not answer.
#[derive(Default)]
struct AnswerScores {
    n: usize,
    with_answers: usize,
    fact: usize,
    cites_gold: usize,
    wrongly_not_found: usize,
    citations: usize,
    citations_retrieved: usize,
    off_topic: usize,
    off_topic_refused: usize,
    chars: usize,
    mode: String,
}

impl AnswerScores {
    fn add(&mut self, question: &Question, answer: &serde_json::Value, retrieved: &[Ranked], ids: &HashMap<String, String>) {
        self.n += 1;
        self.mode = answer["mode"].as_str().unwrap_or_default().to_string();
        let text = answer["answer"].as_str().unwrap_or_default();
        self.chars += text.chars().count();
        if !question.answers.is_empty() {
            self.with_answers += 1;
            let lower = text.to_lowercase();
            if question.answers.iter().any(|a| lower.contains(&a.to_lowercase())) {
                self.fact += 1;
            }
        }
        if answer["not_found"].as_bool().unwrap_or(false) {
            self.wrongly_not_found += 1;
        }
        let targets: Vec<Target> = question.gold.iter().map(|g| Target::parse(g)).collect();
        let citations = answer["citations"].as_array().cloned().unwrap_or_default();
        let gold_cited = citations.iter().any(|c| {
            let file = c["document_id"].as_str().and_then(|id| ids.get(id));
            let page = c["page"].as_u64().map(|p| p as u32);
            file.is_some_and(|file| targets.iter().any(|t| t.matches(file, page)))
        });
        if gold_cited {
            self.cites_gold += 1;
        }
        for citation in &citations {
            self.citations += 1;
            if retrieved.iter().any(|r| r.chunk.as_deref() == citation["chunk_id"].as_str()) {
                self.citations_retrieved += 1;
            }
        }
    }

    fn add_off_topic(&mut self, answer: &serde_json::Value) {
        self.off_topic += 1;
        if answer["not_found"].as_bool().unwrap_or(false) && answer["citations"].as_array().is_none_or(Vec::is_empty) {
            self.off_topic_refused += 1;
        }
    }
}

fn corpus_fingerprint(set: &EvalSet) -> String {
    common::rand::sha256_hex(set.files.join("\n").as_bytes())
}

pub async fn run(args: QualityArgs) -> anyhow::Result<()> {
    let cache = super::python::bench_data();
    std::fs::create_dir_all(&cache)?;
    let mut set = match &args.beir {
        Some(dir) => super::corpus::load_beir(dir, &cache, args.limit)?,
        None => {
            let eval = args.eval.clone().unwrap_or_else(|| super::python::repo_root().join("tests/eval/debian-docs.json"));
            super::corpus::load_eval(&eval, &cache)?
        }
    };
    if args.limit > 0 {
        set.questions.truncate(args.limit);
    }
    println!("quality: {} — {} files, {} questions ({})", set.name, set.files.len(), set.questions.len(), set.dir.display());
    let model_dir = super::python::bench_model().await?;

    // Echo: a data dir of its own (kept with --data-dir, and reused if it holds this corpus).
    let temporary = tempfile::tempdir()?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&data_dir)?;
    let marker = data_dir.join("bench-corpus.json");
    let fingerprint = corpus_fingerprint(&set);
    let reuse: Option<HashMap<String, String>> = std::fs::read(&marker)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .filter(|v| v["fingerprint"] == fingerprint.as_str())
        .and_then(|v| serde_json::from_value(v["ids"].clone()).ok());
    let mut config = EchoConfig::for_test(&data_dir);
    config.log.ship = false;
    config.log.level = "warn".into();
    config.gateway.rate_limits = Switch::Off;
    // Ingesting the corpus with embeddings outlasts a 10-minute access token.
    config.identity.access_token_ttl_secs = 86_400;
    config.storage.quota_bytes_per_user = 100 * 1024 * 1024 * 1024;
    config.embeddings.provider = Some("local".into());
    config.embeddings.model_dir = Some(model_dir.clone());
    if let Some(url) = &args.rerank_url {
        config.search.rerank_url = url.clone();
    }
    if let Some(url) = &args.search_url {
        config.search.url = common::config::Secret(url.clone());
    }
    if let Some(v) = args.rrf_k {
        config.search.rrf_k = v;
    }
    if let Some(v) = args.bm25_weight {
        config.search.bm25_weight = v;
    }
    if let Some(v) = args.vector_weight {
        config.search.vector_weight = v;
    }
    let echo = Echo::start(config, reuse.is_none()).await?;
    let ids = match reuse {
        Some(ids) => {
            println!("  reusing the indexed corpus in {}", data_dir.display());
            ids
        }
        None => {
            let started = Instant::now();
            let ids = echo.upload(&set).await?;
            let (indexed, failed) = echo.wait_indexed(ids.len()).await?;
            let seconds = started.elapsed().as_secs_f64();
            println!("  Echo ingested {} files ({} documents: {indexed} indexed, {} failed) in {seconds:.0} s ({:.2} files/s), embedding included", set.files.len(), ids.len(), failed.len(), set.files.len() as f64 / seconds);
            for failure in failed.iter().take(10) {
                println!("    failed: {failure}");
            }
            if args.data_dir.is_some() {
                std::fs::write(&marker, serde_json::to_vec(&serde_json::json!({"fingerprint": fingerprint, "ids": ids}))?)?;
            }
            ids
        }
    };
    let mut systems: Vec<(String, Vec<Vec<Ranked>>)> = Vec::new();
    let mut modes = if args.answers_only { vec![] } else { vec!["bm25", "vector", "hybrid"] };
    if args.rerank_url.is_some() && !args.answers_only {
        modes.push("hybrid+rerank");
    }
    for mode in modes {
        let wire_mode = mode.trim_end_matches("+rerank");
        let started = Instant::now();
        let mut lists = Vec::with_capacity(set.questions.len());
        for question in &set.questions {
            lists.push(echo.search(&question.q, wire_mode, mode.ends_with("+rerank"), &ids).await?);
        }
        let per_query = started.elapsed().as_secs_f64() * 1000.0 / set.questions.len().max(1) as f64;
        println!("  echo-{mode}: {per_query:.1} ms per search through the gateway (first asks embed the query)");
        systems.push((format!("echo-{mode}"), lists));
    }
    let mut raw: BTreeMap<&str, Vec<Vec<serde_json::Value>>> = BTreeMap::new();
    if args.out.is_some() && args.raw_depth > 0 {
        for mode in ["bm25", "vector"] {
            let mut lists = Vec::with_capacity(set.questions.len());
            for question in &set.questions {
                lists.push(echo.search_raw(&question.q, mode, args.raw_depth, &ids).await?);
            }
            raw.insert(mode, lists);
        }
    }
    // Answers: the whole ask path, as a user meets it, beside the retrieval it rests on.
    let mut passes = vec![answer_pass(&echo, &set, &ids).await?];
    // Printed as soon as measured (the model's pass and the baselines take long).
    print_answers(&set, &passes[0], None);
    let running_config = (*echo.system.config).clone();
    echo.system.stop().await;
    if let Some(llm) = &args.llm {
        // The same index, answered by a model: Echo restarted with `llm.*` set.
        let (_model_server, url) = if llm == "smollm2" {
            let (child, url) = super::smollm::spawn_server().await?;
            (Some(child), url)
        } else {
            (None, llm.clone())
        };
        let mut config = running_config;
        config.llm.provider = "openai".into();
        config.llm.base_url = url.clone();
        config.llm.model = if llm == "smollm2" { "smollm2-135m".into() } else { args.llm_model.clone().unwrap_or_default() };
        config.llm.timeout_secs = 600;
        if llm == "smollm2" {
            // A 135M model on two cores: short answers keep the pass under an hour.
            config.llm.max_answer_tokens = 200;
        }
        if let Some(tokens) = args.llm_context_tokens {
            config.llm.context_tokens = tokens;
        }
        println!("  LLM mode: {url} (model {}, context budget {} tokens, answers up to {} tokens)", config.llm.model, config.llm.context_tokens, config.llm.max_answer_tokens);
        let echo = Echo::start(config, false).await?;
        // The model failing does not lose the rest of the run.
        match answer_pass(&echo, &set, &ids).await {
            Ok(pass) => {
                print_answers(&set, &pass, None);
                passes.push(pass);
            }
            Err(error) => eprintln!("  the LLM-mode pass failed: {error:#}"),
        }
        echo.system.stop().await;
    }

    if args.baselines && !args.answers_only {
        let manifest = serde_json::json!({
            "dir": set.dir,
            "files": set.files,
            "questions": set.questions.iter().map(|q| q.q.clone()).collect::<Vec<_>>(),
            "model_dir": model_dir,
            "k": K,
        });
        let work = tempfile::tempdir()?;
        let (manifest_path, out_path) = (work.path().join("manifest.json"), work.path().join("out.json"));
        std::fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
        eprintln!("  running LlamaIndex on the same files (embedding every node with sentence-transformers)…");
        let summary = tokio::task::spawn_blocking(move || super::python::run_script("llamaindex_quality.py", &[manifest_path.as_os_str(), out_path.as_os_str()]).map(|s| (s, out_path))).await??;
        let (summary, out_path) = summary;
        println!("  LlamaIndex: {summary}");
        #[derive(Deserialize)]
        struct Out {
            systems: BTreeMap<String, Vec<Vec<Ranked>>>,
        }
        let out: Out = serde_json::from_slice(&std::fs::read(&out_path)?).context("the LlamaIndex results")?;
        systems.extend(out.systems);
    }

    for subset in [None, Some("html/text"), Some("pdf")] {
        let chosen: Vec<usize> = (0..set.questions.len()).filter(|&i| subset.is_none_or(|s| subset_of(&set.questions[i]) == s)).collect();
        if chosen.is_empty() || (subset.is_some() && chosen.len() == set.questions.len()) {
            continue;
        }
        println!();
        println!("{} — {} questions{}", set.name, chosen.len(), subset.map(|s| format!(" ({s} gold)")).unwrap_or_default());
        println!("| system | recall@10 | top-1 | MRR@10 | nDCG@10 | answer@3 |");
        println!("|---|---|---|---|---|---|");
        for (name, lists) in &systems {
            let mut scores = Scores::default();
            for &i in &chosen {
                scores.add(&set.questions[i], lists.get(i).map(Vec::as_slice).unwrap_or_default());
            }
            println!("{}", scores.line(name));
        }
    }
    println!();
    let first_hit_fact = systems.iter().find(|(name, _)| name == "llamaindex-fusion").map(|(_, lists)| {
        set.questions
            .iter()
            .enumerate()
            .filter(|(i, q)| !q.answers.is_empty() && lists.get(*i).and_then(|l| l.first()).is_some_and(|hit| q.answers.iter().any(|a| hit.text.to_lowercase().contains(&a.to_lowercase()))))
            .count()
    });
    if let Some(n) = first_hit_fact {
        let with_answers = passes.first().map_or(0, |p| p.scores.with_answers);
        println!();
        println!("baseline for the answers: the asked-for fact is in LlamaIndex fusion's top-1 chunk for {n}/{with_answers} questions");
    }
    if let Some(out) = &args.out {
        let dump: BTreeMap<&str, Vec<Vec<serde_json::Value>>> = systems
            .iter()
            .map(|(name, lists)| {
                (name.as_str(), lists.iter().map(|l| l.iter().map(|h| serde_json::json!({"file": h.file, "page": h.page})).collect()).collect())
            })
            .collect();
        let questions: Vec<_> = set.questions.iter().map(|q| serde_json::json!({"q": q.q, "gold": q.gold, "answers": q.answers})).collect();
        std::fs::write(out, serde_json::to_vec_pretty(&serde_json::json!({"questions": questions, "systems": dump, "raw": raw}))?)?;
    }
    Ok(())
}

/// One pass of every question (and every off-topic question) through `POST /api/v1/ask`.
struct AnswerPass {
    scores: AnswerScores,
    /// Per question: whether the fact was in the answer.
    rows: Vec<(usize, bool)>,
    per_ask_ms: f64,
}

async fn answer_pass(echo: &Echo, set: &EvalSet, ids: &HashMap<String, String>) -> anyhow::Result<AnswerPass> {
    let mut answers = AnswerScores::default();
    let mut rows: Vec<(usize, bool)> = Vec::new();
    let top_k = echo.system.config.rag.top_k;
    let started = Instant::now();
    for question in &set.questions {
        let answer = echo.ask(&question.q).await?;
        // What rag retrieved: the same question, depth and hits per page.
        let body = serde_json::json!({"query": question.q, "k": top_k, "mode": "hybrid", "full_text": true, "per_page": rag::HITS_PER_PAGE});
        let response = echo.http.post(format!("{}/api/v1/search", echo.gateway)).bearer_auth(&echo.token).json(&body).send().await?;
        let hits: serde_json::Value = response.json().await?;
        let retrieved: Vec<Ranked> = hits["hits"].as_array().cloned().unwrap_or_default().iter().map(|h| Ranked { file: None, page: None, text: String::new(), chunk: h["chunk_id"].as_str().map(str::to_string) }).collect();
        let before = answers.fact;
        answers.add(question, &answer, &retrieved, ids);
        rows.push((answers.n - 1, answers.fact > before));
    }
    for question in &set.off_topic {
        let answer = echo.ask(question).await?;
        answers.add_off_topic(&answer);
    }
    let per_ask_ms = started.elapsed().as_secs_f64() * 1000.0 / (set.questions.len() + set.off_topic.len()).max(1) as f64;
    Ok(AnswerPass { scores: answers, rows, per_ask_ms })
}

fn print_answers(set: &EvalSet, pass: &AnswerPass, first_hit_fact: Option<usize>) {
    let answers = &pass.scores;
    println!();
    println!("answers ({} mode, {:.0} ms per ask through the gateway)", answers.mode, pass.per_ask_ms);
    println!("| measure | Echo | baseline: the first hit's text |");
    println!("|---|---|---|");
    let baseline = first_hit_fact.map_or("not run".to_string(), |n| format!("{n}/{} (LlamaIndex fusion top-1 chunk)", answers.with_answers));
    println!("| fact in the answer | {}/{} | {baseline} |", answers.fact, answers.with_answers);
    println!("| cites a gold file/page | {}/{} | |", answers.cites_gold, answers.n);
    println!("| citations that are retrieved chunks | {}/{} | |", answers.citations_retrieved, answers.citations);
    println!("| answered \"not in your documents\" though the corpus answers | {}/{} | |", answers.wrongly_not_found, answers.n);
    println!("| off-topic questions refused with no citation | {}/{} | |", answers.off_topic_refused, answers.off_topic);
    println!("| mean answer length (chars) | {:.0} | |", answers.chars as f64 / answers.n.max(1) as f64);
    for subset in ["html/text", "pdf"] {
        let chosen: Vec<&(usize, bool)> = pass.rows.iter().filter(|(i, _)| set.questions.get(*i).is_some_and(|q| !q.answers.is_empty() && subset_of(q) == subset)).collect();
        if !chosen.is_empty() {
            println!("| fact in the answer, {subset} gold | {}/{} | |", chosen.iter().filter(|(_, hit)| *hit).count(), chosen.len());
        }
    }
    let missed: Vec<String> = pass.rows.iter().filter(|(_, hit)| !hit).filter_map(|(i, _)| set.questions.get(*i)).filter(|q| !q.answers.is_empty()).map(|q| q.q.chars().take(60).collect()).collect();
    if !missed.is_empty() {
        eprintln!("  facts missed ({} mode): {missed:#?}", answers.mode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question(gold: &[&str], answers: &[&str]) -> Question {
        Question { q: "?".into(), gold: gold.iter().map(|g| g.to_string()).collect(), answers: answers.iter().map(|a| a.to_string()).collect() }
    }

    fn hit(file: &str, page: Option<u32>, text: &str) -> Ranked {
        Ranked { file: Some(file.into()), page, text: text.into(), chunk: None }
    }

    #[test]
    fn scores_count_ranks_pages_and_answers() {
        let mut scores = Scores::default();
        scores.add(&question(&["a.html"], &["zip"]), &[hit("b.html", None, "no"), hit("a.html", None, "ZipFile here")]);
        scores.add(&question(&["m.pdf#3"], &[]), &[hit("m.pdf", Some(2), ""), hit("m.pdf", Some(4), "")]);
        scores.add(&question(&["m.pdf#3"], &[]), &[hit("m.pdf", Some(3), "")]);
        assert_eq!((scores.n, scores.recall, scores.top1), (3, 2, 1));
        assert!((scores.mrr - 1.5).abs() < 1e-9);
        assert_eq!((scores.answer3, scores.with_answers), (1, 1));
        let ndcg_second = 1.0 / 3f64.log2();
        assert!((scores.ndcg - (ndcg_second + 1.0)).abs() < 1e-9);
    }
}
