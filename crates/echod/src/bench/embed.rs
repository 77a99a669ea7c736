//! `echod bench embed` (B3): Echo's local encoder beside sentence-transformers on the
//! same chunk texts, same model files, fp32, every core, in the same run. The texts
//! are the first `chunks` chunks the ingest chunker makes of the Python manual of
//! the evaluation set (real prose and code, 1,200-character budget, cut at 256
//! tokens like the model). Both of Echo's engines are measured — ONNX Runtime (the
//! default when its library is installed beside the model) and candle (the pure-Rust
//! fallback). Reports chunks/s for each and the cosine of each Echo vector to
//! sentence-transformers' (minimum and mean).

use std::time::Instant;

use anyhow::Context;

/// One engine's run: its name, the vectors, the seconds they took, each text's tokens.
type EngineRun = (&'static str, Vec<Vec<f32>>, f64, Vec<usize>);

pub async fn run(chunks: usize, batch: usize) -> anyhow::Result<()> {
    let cache = super::python::bench_data();
    let eval = super::python::repo_root().join("tests/eval/debian-docs.json");
    let set = super::corpus::load_eval(&eval, &cache)?;
    let config = common::EchoConfig::default();
    let mut texts = Vec::with_capacity(chunks);
    for file in set.files.iter().filter(|f| f.ends_with(".html")) {
        let bytes = std::fs::read(set.dir.join(file))?;
        let Ok(parsed) = parser::extract(parser::Format::Html, &bytes) else { continue };
        texts.extend(ingest::chunk_texts(&parsed.blocks, config.ingest.chunk_chars, config.ingest.chunk_overlap_chars));
        if texts.len() >= chunks {
            break;
        }
    }
    texts.truncate(chunks);
    let model_dir = super::python::bench_model().await?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("B3 embed: {} chunks of the Python manual (mean {} chars), batch {batch}, {threads} threads, model {}", texts.len(), texts.iter().map(String::len).sum::<usize>() / texts.len().max(1), model_dir.display());

    let mut runs = Vec::new();
    let mut work_flops = 0.0;
    for runtime in [search::Runtime::OnnxRuntime { library: model_dir.join(search::ONNXRUNTIME_LIBRARY_FILE) }, search::Runtime::Candle] {
        let (dir, work) = (model_dir.clone(), texts.clone());
        let measured = tokio::task::spawn_blocking(move || -> anyhow::Result<EngineRun> {
            let model = search::LocalModel::load_with(&dir, 256, &runtime)?;
            let tokens = model.token_counts(&work)?;
            model.embed(&work[..8.min(work.len())], batch)?;
            let started = Instant::now();
            let vectors = model.embed(&work, batch)?;
            Ok((model.engine(), vectors, started.elapsed().as_secs_f64(), tokens))
        })
        .await?;
        match measured {
            Ok((engine, vectors, seconds, tokens)) => {
                // The work: all-MiniLM-L6-v2's matrix products (6 layers of 4·h² + 2·h·4h
                // multiply-adds per token, h = 384) and attention (2·L·h per token per layer).
                let hidden = vectors.first().map_or(384, Vec::len) as f64;
                let flops: f64 = tokens.iter().map(|&l| 6.0 * 2.0 * (12.0 * hidden * hidden + 2.0 * l as f64 * hidden) * l as f64).sum();
                println!(
                    "  echo ({engine:<11}):               {:>7.1} chunks/s  ({seconds:.1} s; mean {:.0} tokens; {:.0} GFLOP/s)",
                    texts.len() as f64 / seconds,
                    tokens.iter().sum::<usize>() as f64 / tokens.len().max(1) as f64,
                    flops / seconds / 1e9
                );
                work_flops = flops;
                runs.push((engine, vectors, seconds));
            }
            Err(error) => println!("  echo: an engine did not load: {error}"),
        }
    }
    anyhow::ensure!(!runs.is_empty(), "no engine of Echo's ran");

    let work = tempfile::tempdir()?;
    let (texts_path, out_path) = (work.path().join("texts.jsonl"), work.path().join("vectors.f32"));
    let lines: Vec<String> = texts.iter().map(|t| serde_json::to_string(t).unwrap_or_default()).collect();
    std::fs::write(&texts_path, lines.join("\n") + "\n")?;
    let (model_arg, batch_arg) = (model_dir.clone().into_os_string(), std::ffi::OsString::from(batch.to_string()));
    let (t, o) = (texts_path.clone(), out_path.clone());
    let summary = tokio::task::spawn_blocking(move || super::python::run_script("st_embed.py", &[t.as_os_str(), &model_arg, o.as_os_str(), &batch_arg])).await??;
    let st_seconds = summary["seconds"].as_f64().context("st_embed.py printed no time")?;
    println!(
        "  sentence-transformers (torch {}): {:>7.1} chunks/s  ({st_seconds:.1} s, {} threads; {:.0} GFLOP/s)",
        summary["torch"].as_str().unwrap_or("?"),
        texts.len() as f64 / st_seconds,
        summary["threads"],
        work_flops / st_seconds / 1e9
    );

    let bytes = std::fs::read(&out_path)?;
    let dimension = runs[0].1.first().map(Vec::len).unwrap_or(0);
    anyhow::ensure!(dimension > 0 && bytes.len() == texts.len() * dimension * 4, "sentence-transformers wrote {} bytes for {} vectors of {dimension}", bytes.len(), texts.len());
    let reference: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    for (engine, vectors, seconds) in &runs {
        let mut cosines: Vec<f64> = vectors
            .iter()
            .zip(reference.chunks_exact(dimension))
            .map(|(a, b)| {
                let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
                let norms = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt() * b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                dot / norms.max(1e-12)
            })
            .collect();
        cosines.sort_by(f64::total_cmp);
        let mean = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
        println!("  {engine}: {:.2}x sentence-transformers; cosine to its vectors: min {:.6}, mean {:.6}", st_seconds / seconds, cosines.first().copied().unwrap_or(0.0), mean);
    }
    Ok(())
}
