//! `echod ingest PATH… [--collection C] [--recursive]`: many files into a running Echo
//! through the public API, as a person (the same sign-in as `echod ask`). Files whose
//! content is already there are skipped before upload (SHA-256 against the listing),
//! so a run cut short with Ctrl-C is resumed by running it again. A progress bar while
//! uploading and while Echo indexes; then a summary of what failed and why.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use sha2::Digest;

use common::EchoConfig;

/// How long one file's upload keeps waiting on Echo's "come back later" answers.
const MAX_UPLOAD_WAIT: Duration = Duration::from_secs(600);

pub struct IngestArgs {
    pub paths: Vec<PathBuf>,
    pub collection: Option<String>,
    pub recursive: bool,
    pub token: Option<String>,
    pub user: Option<String>,
    /// Uploads at once.
    pub parallel: usize,
}

/// The files named, and with `--recursive` those under named directories (hidden ones
/// skipped), in a stable order.
fn files(paths: &[PathBuf], recursive: bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = paths.iter().rev().cloned().collect();
    while let Some(path) = stack.pop() {
        let metadata = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
        if metadata.is_file() {
            out.push(path);
        } else if metadata.is_dir() {
            anyhow::ensure!(recursive, "{} is a directory: add --recursive to take the files under it", path.display());
            let mut children: Vec<PathBuf> = std::fs::read_dir(&path)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
                .collect();
            children.sort();
            stack.extend(children.into_iter().rev());
        }
    }
    Ok(out)
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every document the user can see: (id, collection, sha256, status, error).
async fn listing(http: &reqwest::Client, gateway: &str, token: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut all = Vec::new();
    loop {
        let page: serde_json::Value = http
            .get(format!("{gateway}/api/v1/documents?limit=500&offset={}", all.len()))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let documents = page["documents"].as_array().cloned().unwrap_or_default();
        let n = documents.len();
        all.extend(documents);
        if n < 500 {
            return Ok(all);
        }
    }
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta})").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(what.to_string());
    bar
}

/// Runs the bulk ingest; exit code 0 when everything is in, 1 when some files failed.
pub async fn run(config: EchoConfig, args: IngestArgs) -> anyhow::Result<i32> {
    let files = files(&args.paths, args.recursive)?;
    anyhow::ensure!(!files.is_empty(), "no files to ingest");
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let token = crate::ask::token(&config, &http, args.token.as_deref(), args.user.as_deref()).await?;
    let gateway = config.url(common::ServiceName::Gateway);
    let known: HashSet<(String, String)> = listing(&http, &gateway, &token)
        .await
        .with_context(|| format!("Echo is not answering at {gateway} (is `echod up` running?)"))?
        .iter()
        .filter(|d| d["status"] != "failed")
        .map(|d| (d["collection"].as_str().unwrap_or_default().to_string(), d["sha256"].as_str().unwrap_or_default().to_string()))
        .collect();
    let already = |sha: &str| match &args.collection {
        Some(collection) => known.contains(&(collection.clone(), sha.to_string())),
        None => known.iter().any(|(_, s)| s == sha),
    };

    let mut to_send = Vec::new();
    let mut skipped = 0usize;
    for path in &files {
        let sha = sha256_of(path).with_context(|| format!("reading {}", path.display()))?;
        if already(&sha) {
            skipped += 1;
        } else {
            to_send.push(path.clone());
        }
    }
    println!("{} files: {skipped} already in Echo, {} to upload", files.len(), to_send.len());

    let uploading = bar(to_send.len() as u64, "uploading");
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let mut sent: Vec<(String, String)> = Vec::new(); // (document id, path)
    let uploads = futures_util::stream::iter(to_send.iter().cloned())
        .map(|path| {
            let (http, token, gateway, collection) = (&http, &token, &gateway, &args.collection);
            async move {
                let outcome = async {
                    let bytes = tokio::fs::read(&path).await?;
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "upload".into());
                    // Echo's upload budget (429) and a busy moment (503) say when to come
                    // back: a bulk load waits as told instead of giving files up.
                    let mut waited = Duration::ZERO;
                    loop {
                        // The collection is named before the file it applies to.
                        let mut form = reqwest::multipart::Form::new();
                        if let Some(collection) = collection {
                            form = form.text("collection", collection.clone());
                        }
                        let form = form.part("file", reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()));
                        let response = http.post(format!("{gateway}/api/v1/documents")).bearer_auth(token).multipart(form).send().await?;
                        let status = response.status();
                        let retry_after = response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
                        let body: serde_json::Value = response.json().await.unwrap_or_default();
                        if status.is_success() {
                            return Ok(body["id"].as_str().unwrap_or_default().to_string());
                        }
                        let busy = matches!(status, reqwest::StatusCode::TOO_MANY_REQUESTS | reqwest::StatusCode::SERVICE_UNAVAILABLE);
                        if busy && waited < MAX_UPLOAD_WAIT {
                            let pause = Duration::from_secs(retry_after.unwrap_or(1).clamp(1, 60));
                            waited += pause;
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        anyhow::bail!("{}", body["detail"].as_str().unwrap_or(status.as_str()));
                    }
                }
                .await;
                (path, outcome)
            }
        })
        .buffer_unordered(args.parallel.max(1));
    futures_util::pin_mut!(uploads);
    while let Some((path, outcome)) = uploads.next().await {
        match outcome {
            Ok(id) => sent.push((id, path.display().to_string())),
            Err(error) => {
                failed.insert(path.display().to_string(), format!("upload refused: {error:#}"));
            }
        }
        uploading.inc(1);
    }
    uploading.finish();

    // Then follow the jobs until each is done or failed.
    let indexing = bar(sent.len() as u64, "indexing");
    let mut open: Vec<(String, String)> = sent;
    while !open.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let documents = listing(&http, &gateway, &token).await?;
        let status: std::collections::HashMap<&str, &serde_json::Value> = documents.iter().map(|d| (d["id"].as_str().unwrap_or_default(), d)).collect();
        open.retain(|(id, path)| match status.get(id.as_str()).map(|d| (d["status"].as_str().unwrap_or_default(), d["error"].as_str())) {
            Some(("done", _)) => {
                indexing.inc(1);
                false
            }
            Some(("failed", error)) => {
                failed.insert(path.clone(), error.unwrap_or("failed").to_string());
                indexing.inc(1);
                false
            }
            None => {
                failed.insert(path.clone(), "deleted while it was being indexed".into());
                indexing.inc(1);
                false
            }
            _ => true,
        });
    }
    indexing.finish();
    println!("{} uploaded and indexed, {skipped} skipped (already there), {} failed", to_send.len() - failed.len(), failed.len());
    for (path, reason) in &failed {
        println!("  failed: {path}: {reason}");
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}
