//! `echod bench api` (B7): authenticated search through the public edge under wrk —
//! Echo's gateway (RS256 access token verified, revocation and scope checked, per-user
//! readable collections from authz, the search service's hybrid ranking, compact hits)
//! beside FastAPI + PyJWT + a Python policy check + LlamaIndex BM25 on the same HTML
//! manual, with the same token, the same wrk script and the same queries, in the same
//! run. Run it pinned to one core (`taskset -c 0 echod bench api`): Echo and the
//! baseline then share that core, and wrk runs on another (`--wrk-core`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use common::config::Switch;
use common::{EchoConfig, ServiceName};

use super::corpus::EvalSet;
use super::quality::Echo;

pub struct ApiArgs {
    pub seconds: u64,
    pub connections: usize,
    pub wrk_core: usize,
    pub baseline: bool,
    /// BM25 only (no embedding model), like the baseline.
    pub bm25_only: bool,
    /// Every request searched afresh (`search.result_cache_entries: 0`).
    pub no_result_cache: bool,
}

/// What wrk printed: requests per second and latency percentiles (ms).
#[derive(Debug)]
struct WrkResult {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: String,
}

fn milliseconds(value: &str) -> Option<f64> {
    let value = value.trim();
    let (number, scale) = if let Some(v) = value.strip_suffix("us") {
        (v, 1e-3)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = value.strip_suffix('s') {
        (v, 1e3)
    } else {
        (value, 1.0)
    };
    number.trim().parse::<f64>().ok().map(|n| n * scale)
}

fn parse_wrk(output: &str) -> anyhow::Result<WrkResult> {
    let field = |prefix: &str| output.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix).map(|rest| rest.trim().to_string()));
    let requests_per_second = field("Requests/sec:").and_then(|v| v.parse().ok()).with_context(|| format!("wrk printed no rate:\n{output}"))?;
    let p50_ms = field("50%").and_then(|v| milliseconds(&v)).unwrap_or(f64::NAN);
    let p99_ms = field("99%").and_then(|v| milliseconds(&v)).unwrap_or(f64::NAN);
    let errors = output.lines().filter(|l| l.contains("Non-2xx") || l.contains("Socket errors")).map(str::trim).collect::<Vec<_>>().join("; ");
    Ok(WrkResult { requests_per_second, p50_ms, p99_ms, errors })
}

/// A wrk script that cycles through `queries`, each a POST with the bearer token.
fn wrk_script(token: &str, queries: &[String]) -> String {
    let bodies: Vec<String> = queries.iter().map(|q| format!("  [==[{}]==],", serde_json::json!({"query": q, "k": 10}))).collect();
    format!(
        "local bodies = {{\n{}\n}}\nlocal i = 0\nwrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\nrequest = function()\n  i = i + 1\n  return wrk.format(nil, \"/api/v1/search\", nil, bodies[(i % #bodies) + 1])\nend\n",
        bodies.join("\n")
    )
}

fn wrk(args: &ApiArgs, script: &Path, url: &str) -> anyhow::Result<WrkResult> {
    let output = Command::new("taskset")
        .args(["-c", &args.wrk_core.to_string(), "wrk", "-t1", &format!("-c{}", args.connections), &format!("-d{}s", args.seconds), "--latency", "-s"])
        .arg(script)
        .arg(url)
        .stderr(Stdio::inherit())
        .output()
        .context("running wrk (Debian's `wrk` and `taskset` from util-linux)")?;
    anyhow::ensure!(
        output.status.success(),
        "wrk failed (is Debian's `wrk` installed? `apt-get install wrk`): {}{}",
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    );
    parse_wrk(&String::from_utf8_lossy(&output.stdout))
}

pub async fn run(args: ApiArgs) -> anyhow::Result<()> {
    let cache = super::python::bench_data();
    let full = super::corpus::load_eval(&super::python::repo_root().join("tests/eval/debian-docs.json"), &cache)?;
    let set = EvalSet { files: full.files.iter().filter(|f| f.ends_with(".html")).cloned().collect(), ..full };
    let queries: Vec<String> = set.questions.iter().map(|q| q.q.clone()).collect();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("B7 api: {} HTML pages of the manual, {} queries in turn, wrk -c{} for {} s on core {}; this process may use {cores} core(s)", set.files.len(), queries.len(), args.connections, args.seconds, args.wrk_core);

    let dir = tempfile::tempdir()?;
    let mut config = EchoConfig::for_test(dir.path());
    config.log.ship = false;
    config.log.level = "warn".into();
    config.gateway.rate_limits = Switch::Off;
    config.identity.access_token_ttl_secs = 86_400;
    config.storage.quota_bytes_per_user = 100 * 1024 * 1024 * 1024;
    if args.bm25_only {
        config.embeddings.provider = Some("none".into());
    } else {
        config.embeddings.provider = Some("local".into());
        config.embeddings.model_dir = Some(super::python::bench_model().await?);
    }
    if args.no_result_cache {
        config.search.result_cache_entries = 0;
    }
    println!(
        "  echo's search: {}; result cache {}",
        if args.bm25_only { "BM25 only" } else { "hybrid (BM25 + local MiniLM vectors)" },
        if args.no_result_cache { "off (every request searched afresh)" } else { "on (the 79 questions repeat, so answers come from it)" }
    );
    let echo = Echo::start(config, true).await?;
    let started = Instant::now();
    let ids = echo.upload(&set).await?;
    let (indexed, failed) = echo.wait_indexed(ids.len()).await?;
    println!("  indexed {indexed} documents ({} failed) in {:.0} s", failed.len(), started.elapsed().as_secs_f64());

    let work = tempfile::tempdir()?;
    let script = work.path().join("search.lua");
    std::fs::write(&script, wrk_script(&echo.token, &queries))?;
    // Warm: every query once (embeddings cached, pages in memory), as a server would be.
    for query in &queries {
        let _ = echo.http.post(format!("{}/api/v1/search", echo.gateway)).bearer_auth(&echo.token).json(&serde_json::json!({"query": query, "k": 10})).send().await?;
    }
    let check = echo.http.post(format!("{}/api/v1/search", echo.gateway)).bearer_auth(&echo.token).json(&serde_json::json!({"query": queries[0], "k": 10})).send().await?;
    let bytes = check.bytes().await?.len();
    let (args_ref, script_ref, url) = (&args, script.clone(), echo.gateway.clone());
    let ours = tokio::task::block_in_place(|| wrk(args_ref, &script_ref, &url))?;
    println!("  echo:     {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  ({bytes} bytes a response) {}", ours.requests_per_second, ours.p50_ms, ours.p99_ms, ours.errors);

    if args.baseline {
        let config = (*echo.system.config).clone();
        let manifest = serde_json::json!({
            "dir": set.dir, "files": set.files,
            "jwks_url": format!("{}/jwks", config.url(ServiceName::Identity)),
            "issuer": config.issuer(), "audience": common::config::API_AUDIENCE,
        });
        let manifest_path = work.path().join("manifest.json");
        std::fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let python = super::python::python()?;
        let mut child = Command::new(&python)
            .arg(super::python::repo_root().join("tests/bench/fastapi_search.py"))
            .arg(&manifest_path)
            .arg(port.to_string())
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::null())
            .spawn()
            .context("starting the FastAPI baseline")?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(600);
        let ready = loop {
            if echo.http.get(format!("{url}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
                break true;
            }
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if ready {
            let check = echo.http.post(format!("{url}/api/v1/search")).bearer_auth(&echo.token).json(&serde_json::json!({"query": queries[0], "k": 10})).send().await?;
            let status = check.status();
            let bytes = check.bytes().await?.len();
            anyhow::ensure!(status.is_success(), "the baseline refused Echo's token: {status}");
            let theirs = tokio::task::block_in_place(|| wrk(&args, &script, &url));
            let _ = child.kill();
            let theirs = theirs?;
            println!("  baseline: {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  ({bytes} bytes a response) {}", theirs.requests_per_second, theirs.p50_ms, theirs.p99_ms, theirs.errors);
            println!("  echo answers {:.1}x the baseline's requests per second", ours.requests_per_second / theirs.requests_per_second);
        } else {
            let _ = child.kill();
            println!("  the baseline did not start");
        }
    }
    echo.system.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let output = "  Latency Distribution\n     50%    1.25ms\n     75%    2.00ms\n     90%    3.00ms\n     99%   10.50ms\n  1000 requests in 1.00s, 1.00MB read\nRequests/sec:   1456.32\nTransfer/sec:      1.00MB\n";
        let result = parse_wrk(output).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((result.requests_per_second, result.p50_ms, result.p99_ms), (1456.32, 1.25, 10.5));
        assert_eq!(milliseconds("850.00us"), Some(0.85));
        assert_eq!(milliseconds("1.20s"), Some(1200.0));
    }
}
