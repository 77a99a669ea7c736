//! `echod bench search` (B4 index, B5 query): Echo's embedded index (Tantivy BM25 +
//! the vector table, hybrid by reciprocal rank fusion, snippets) beside LlamaIndex's
//! BM25Retriever + VectorStoreIndex fused by QueryFusionRetriever, on the same chunks,
//! the same vectors and the same queries, in the same run.
//!
//! The chunks are what the ingest chunker makes of the evaluation set's manuals
//! (HTML and PDF), embedded once with the local model (cached in the bench data).
//! Larger sizes repeat them with a replica word and a small seeded perturbation of
//! each vector (renormalised), so every chunk is distinct in both rankings.
//! Documents hold 100 chunks each (one commit per document, as ingest does); ten
//! collections, all readable by the searcher. Queries: the evaluation questions,
//! then six-word phrases from random chunks; their embedding is timed apart.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;

use common::wire::{Chunk, SearchMode};

use super::percentile;

const CHUNKS_PER_DOCUMENT: usize = 100;
const COLLECTIONS: usize = 10;
const K: usize = 10;

pub struct SearchArgs {
    pub sizes: Vec<usize>,
    pub queries: usize,
    pub baselines: bool,
    /// LlamaIndex answers at most this many of the queries (it is slow at 100k).
    pub baseline_queries: usize,
    /// Distinct chunks embedded; larger sizes are perturbed replicas of them.
    pub unique: usize,
}

/// xorshift64*: seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Roughly uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    vector.iter_mut().for_each(|x| *x /= norm);
}

/// The chunk texts of the evaluation set's files, up to `limit`.
fn corpus_texts(limit: usize) -> anyhow::Result<Vec<String>> {
    let cache = super::python::bench_data();
    let set = super::corpus::load_eval(&super::python::repo_root().join("tests/eval/debian-docs.json"), &cache)?;
    let config = common::EchoConfig::default();
    let mut texts = Vec::new();
    for file in &set.files {
        let format = if file.ends_with(".pdf") { parser::Format::Pdf } else if file.ends_with(".html") { parser::Format::Html } else { continue };
        let bytes = std::fs::read(set.dir.join(file))?;
        let Ok(parsed) = parser::extract(format, &bytes) else { continue };
        texts.extend(ingest::chunk_texts(&parsed.blocks, config.ingest.chunk_chars, config.ingest.chunk_overlap_chars));
        if texts.len() >= limit {
            break;
        }
    }
    texts.truncate(limit);
    Ok(texts)
}

fn read_vectors(path: &std::path::Path, dimension: usize) -> Option<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).ok()?;
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Some(floats.chunks_exact(dimension).map(<[f32]>::to_vec).collect())
}

fn write_vectors(path: &std::path::Path, vectors: &[Vec<f32>]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = vectors.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
    Ok(std::fs::write(path, bytes)?)
}

/// The unique chunks and their vectors, embedded once and cached.
async fn embedded_corpus(limit: usize) -> anyhow::Result<(Vec<String>, Vec<Vec<f32>>)> {
    let texts = corpus_texts(limit)?;
    let model_dir = super::python::bench_model().await?;
    let fingerprint = common::rand::sha256_hex(texts.join("\u{1e}").as_bytes());
    let cache = super::python::bench_data().join(format!("search-vectors-{}.f32", &fingerprint[..16]));
    if let Some(vectors) = read_vectors(&cache, 384).filter(|v| v.len() == texts.len()) {
        return Ok((texts, vectors));
    }
    eprintln!("  embedding {} unique chunks with the local model (once; cached in {})…", texts.len(), cache.display());
    let (dir, batch) = (model_dir.clone(), texts.clone());
    let vectors = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Vec<f32>>> { Ok(search::LocalModel::load(&dir, 256)?.embed(&batch, 32)?) }).await??;
    write_vectors(&cache, &vectors)?;
    Ok((texts, vectors))
}

/// `n` chunks: the unique ones, then replicas with a word and a perturbed vector.
fn grow(texts: &[String], vectors: &[Vec<f32>], n: usize) -> (Vec<String>, Vec<Vec<f32>>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut out_texts, mut out_vectors) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let (source, replica) = (i % texts.len(), i / texts.len());
        if replica == 0 {
            out_texts.push(texts[source].clone());
            out_vectors.push(vectors[source].clone());
        } else {
            out_texts.push(format!("{} replica{replica}", texts[source]));
            let mut vector: Vec<f32> = vectors[source].iter().map(|x| x + 0.02 * rng.unit()).collect();
            normalise(&mut vector);
            out_vectors.push(vector);
        }
    }
    (out_texts, out_vectors)
}

fn queries(texts: &[String], n: usize) -> anyhow::Result<Vec<String>> {
    let eval: serde_json::Value = serde_json::from_slice(&std::fs::read(super::python::repo_root().join("tests/eval/debian-docs.json"))?)?;
    let mut queries: Vec<String> = eval["questions"].as_array().context("questions")?.iter().filter_map(|q| q["q"].as_str().map(str::to_string)).collect();
    let mut rng = Rng(42);
    while queries.len() < n {
        let words: Vec<&str> = texts[(rng.next() % texts.len() as u64) as usize].split_whitespace().filter(|w| w.chars().all(char::is_alphanumeric)).collect();
        if words.len() >= 6 {
            let start = (rng.next() % (words.len() as u64 - 5)) as usize;
            queries.push(words[start..start + 6].join(" "));
        }
    }
    queries.truncate(n);
    Ok(queries)
}

fn line(name: &str, latencies: &mut [Duration]) -> String {
    latencies.sort();
    let total: f64 = latencies.iter().map(Duration::as_secs_f64).sum();
    format!(
        "| {name} | {:.2} ms | {:.2} ms | {:.0} |",
        percentile(latencies, 0.5).as_secs_f64() * 1e3,
        percentile(latencies, 0.99).as_secs_f64() * 1e3,
        latencies.len() as f64 / total.max(1e-9)
    )
}

pub async fn run(args: SearchArgs) -> anyhow::Result<()> {
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    let (unique_texts, unique_vectors) = embedded_corpus(largest.min(args.unique.max(1))).await?;
    let (texts, vectors) = grow(&unique_texts, &unique_vectors, largest);
    let queries = queries(&unique_texts, args.queries)?;
    println!("B4/B5 search: {} unique chunks of the evaluation manuals, grown to {largest}; {} queries; top {K}", unique_texts.len(), queries.len());

    // Query embedding, apart: each query alone, as a search does it.
    let model_dir = super::python::bench_model().await?;
    let (dir, batch) = (model_dir.clone(), queries.clone());
    let (query_vectors, mut embed_latencies) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<Vec<f32>>, Vec<Duration>)> {
        let model = search::LocalModel::load(&dir, 256)?;
        let (mut vectors, mut latencies) = (Vec::new(), Vec::new());
        for query in &batch {
            let started = Instant::now();
            vectors.extend(model.embed(std::slice::from_ref(query), 1)?);
            latencies.push(started.elapsed());
        }
        Ok((vectors, latencies))
    })
    .await??;
    println!("\nquery embedding alone (local model, one query at a time)\n| | p50 | p99 | per s |\n|---|---|---|---|\n{}", line("echo", &mut embed_latencies));

    let collections: Vec<String> = (0..COLLECTIONS).map(|c| format!("c{c}")).collect();
    let mut echo_runs = Vec::new();
    for &size in &args.sizes {
        let dir = tempfile::tempdir()?;
        let (path, texts, vectors, queries, query_vectors, collections) = (dir.path().to_path_buf(), texts.clone(), vectors.clone(), queries.clone(), query_vectors.clone(), collections.clone());
        let run = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, f64, Vec<Duration>, Vec<Duration>)> {
            let index = search::ChunkIndex::open(&path, 256)?;
            index.check_model(&search::ModelId { name: search::LOCAL_MODEL_NAME.into(), dimension: 384 })?;
            // As ingest writes: `ingest.workers` documents at once, whose commits group.
            let writers = common::config::EchoConfig::default().ingest.workers.max(1);
            let next_document = std::sync::atomic::AtomicUsize::new(0);
            let documents = size.div_ceil(CHUNKS_PER_DOCUMENT);
            let write_one = |document: usize| -> anyhow::Result<()> {
                let start = document * CHUNKS_PER_DOCUMENT;
                let id = format!("d{document}");
                let chunks: Vec<Chunk> = (start..(start + CHUNKS_PER_DOCUMENT).min(size))
                    .map(|i| Chunk {
                        chunk_id: format!("{id}-{i}"),
                        document_id: id.clone(),
                        collection_id: collections[document % COLLECTIONS].clone(),
                        ordinal: (i - start) as u32,
                        text: texts[i].clone(),
                        page: None,
                        section: None,
                        char_start: 0,
                        char_end: texts[i].len() as u64,
                        classification: common::wire::default_classification(),
                        title: None,
                        embedding: Some(common::wire::encode_vector(&vectors[i])),
                    })
                    .collect();
                index.replace_document(&id, &chunks)?;
                Ok(())
            };
            let started = Instant::now();
            std::thread::scope(|scope| -> anyhow::Result<()> {
                let workers: Vec<_> = (0..writers)
                    .map(|_| {
                        scope.spawn(|| -> anyhow::Result<()> {
                            loop {
                                let document = next_document.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if document >= documents {
                                    return Ok(());
                                }
                                write_one(document)?;
                            }
                        })
                    })
                    .collect();
                for worker in workers {
                    worker.join().map_err(|_| anyhow::anyhow!("an indexing thread panicked"))??;
                }
                Ok(())
            })?;
            let index_seconds = started.elapsed().as_secs_f64();
            // Searchable already (vectors not in the graph yet are scored exactly); the
            // queries below are timed once the graph thread has caught up.
            while index.vector_graph_pending() > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            let graph_seconds = started.elapsed().as_secs_f64();
            let restricted = BTreeMap::new();
            let mut latencies = BTreeMap::<&str, Vec<Duration>>::new();
            for (mode, name) in [(SearchMode::Hybrid, "hybrid"), (SearchMode::Bm25, "bm25")] {
                for (query, vector) in queries.iter().zip(&query_vectors) {
                    let request = search::SearchRequest { query, vector: Some(vector), collections: &collections, restricted: &restricted, k: K, mode, fusion: search::Fusion::default(), per_page: 1 };
                    let started = Instant::now();
                    let hits = index.search(&request)?;
                    latencies.entry(name).or_default().push(started.elapsed());
                    anyhow::ensure!(!hits.is_empty() || mode == SearchMode::Bm25, "a hybrid search found nothing");
                }
            }
            Ok((index_seconds, graph_seconds, latencies.remove("hybrid").unwrap_or_default(), latencies.remove("bm25").unwrap_or_default()))
        })
        .await??;
        echo_runs.push((size, run));
    }

    let mut baseline_runs: Vec<serde_json::Value> = Vec::new();
    if args.baselines {
        let work = tempfile::tempdir()?;
        let lines = |items: &[String]| items.iter().map(|t| serde_json::to_string(t).unwrap_or_default()).collect::<Vec<_>>().join("\n") + "\n";
        std::fs::write(work.path().join("chunks.jsonl"), lines(&texts))?;
        std::fs::write(work.path().join("queries.jsonl"), lines(&queries))?;
        write_vectors(&work.path().join("vectors.f32"), &vectors)?;
        write_vectors(&work.path().join("query_vectors.f32"), &query_vectors)?;
        let manifest = serde_json::json!({
            "chunks": work.path().join("chunks.jsonl"), "vectors": work.path().join("vectors.f32"), "dimension": 384,
            "sizes": args.sizes, "queries": work.path().join("queries.jsonl"), "query_vectors": work.path().join("query_vectors.f32"),
            "k": K, "max_queries": args.baseline_queries,
        });
        let manifest_path = work.path().join("manifest.json");
        std::fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
        eprintln!("  running LlamaIndex on the same chunks, vectors and queries…");
        let out = tokio::task::spawn_blocking(move || super::python::run_script("llamaindex_search.py", &[manifest_path.as_os_str()])).await??;
        baseline_runs = out["runs"].as_array().cloned().unwrap_or_default();
    }

    for (size, (index_seconds, graph_seconds, hybrid, bm25)) in &mut echo_runs {
        println!("\n{size} chunks ({} documents of {CHUNKS_PER_DOCUMENT}, {COLLECTIONS} collections)", size.div_ceil(CHUNKS_PER_DOCUMENT));
        let baseline = baseline_runs.iter().find(|r| r["chunks"].as_u64() == Some(*size as u64));
        let echo_rate = *size as f64 / *index_seconds;
        println!("B4 index (BM25 + 384-d vectors, durable; {} documents written at once as ingest does, their commits grouped): echo {echo_rate:.0} chunks/s ({index_seconds:.1} s, durable and searchable; the vector graph complete after {graph_seconds:.1} s)", common::config::EchoConfig::default().ingest.workers);
        if let Some(seconds) = baseline.and_then(|b| b["index_seconds"].as_f64()) {
            let rate = *size as f64 / seconds;
            println!("  LlamaIndex BM25Retriever + VectorStoreIndex (in memory, nothing persisted): {rate:.0} chunks/s ({seconds:.1} s); echo {:.1}x", echo_rate / rate);
        }
        println!("B5 query, top {K} (echo with snippets)\n| system | p50 | p99 | queries/s (one thread) |\n|---|---|---|---|");
        println!("{}", line("echo hybrid", hybrid));
        println!("{}", line("echo bm25", bm25));
        if let Some(latencies) = baseline.and_then(|b| b["query_seconds"].as_array()) {
            let mut latencies: Vec<Duration> = latencies.iter().filter_map(|s| s.as_f64()).map(Duration::from_secs_f64).collect();
            let theirs = latencies.len() as f64 / latencies.iter().map(Duration::as_secs_f64).sum::<f64>().max(1e-9);
            println!("{}", line(&format!("LlamaIndex QueryFusionRetriever ({} queries)", latencies.len()), &mut latencies));
            let ours = hybrid.len() as f64 / hybrid.iter().map(Duration::as_secs_f64).sum::<f64>().max(1e-9);
            println!("echo hybrid answers {:.1}x the queries per second", ours / theirs);
        }
    }
    Ok(())
}
