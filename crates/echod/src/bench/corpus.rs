//! Evaluation sets for `echod bench quality` (and the corpora of the speed benches):
//! a known-item set in Echo's format (`tests/eval/*.json`: Debian packages pinned by
//! version, the files taken from them, questions with gold files or pages and answer
//! strings), built deterministically with `apt-get download` + `dpkg-deb -x`; or any
//! BEIR-format directory (`corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv`), whose
//! documents become one Markdown file each.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde::Deserialize;

#[derive(Deserialize)]
struct EvalFile {
    packages: Vec<Package>,
    questions: Vec<Question>,
    /// Questions the corpus does not answer ("not in your documents" expected).
    #[serde(default)]
    off_topic: Vec<String>,
}

#[derive(Clone, Deserialize)]
struct Package {
    name: String,
    version: String,
    /// A file or a directory inside the package.
    take: String,
    /// For a directory: the file names to take (`*.html`).
    #[serde(default)]
    pattern: Option<String>,
    /// The name (file or directory) it gets in the corpus.
    #[serde(rename = "as")]
    name_as: String,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Question {
    pub(crate) q: String,
    /// `path` (any part of the file) or `path#page` (a page of a PDF).
    pub(crate) gold: Vec<String>,
    #[serde(default)]
    pub(crate) answers: Vec<String>,
}

/// A corpus on disk and its questions.
pub(crate) struct EvalSet {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    /// Paths relative to `dir`, sorted.
    pub(crate) files: Vec<String>,
    pub(crate) questions: Vec<Question>,
    pub(crate) off_topic: Vec<String>,
}

/// A gold target: a file, or one page of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Target {
    pub(crate) file: String,
    pub(crate) page: Option<u32>,
}

impl Target {
    pub(crate) fn parse(gold: &str) -> Target {
        match gold.rsplit_once('#') {
            Some((file, page)) if page.parse::<u32>().is_ok() => Target { file: file.to_string(), page: page.parse().ok() },
            _ => Target { file: gold.to_string(), page: None },
        }
    }

    /// Whether a hit in `file` on `page` is this target.
    pub(crate) fn matches(&self, file: &str, page: Option<u32>) -> bool {
        self.file == file && (self.page.is_none() || self.page == page)
    }
}

/// Loads an Echo evaluation file, building its corpus under `cache` if needed.
pub(crate) fn load_eval(path: &Path, cache: &Path) -> anyhow::Result<EvalSet> {
    let eval: EvalFile = serde_json::from_slice(&std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
        .with_context(|| format!("{} is not an evaluation file", path.display()))?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "eval".into());
    let pins: String = eval.packages.iter().map(|p| format!("{}={};", p.name, p.version)).collect();
    let dir = cache.join(format!("corpus-{name}-{}", &common::rand::sha256_hex(pins.as_bytes())[..12]));
    if !dir.join(".complete").exists() {
        build_corpus(&eval.packages, cache, &dir)?;
    }
    let files = list_files(&dir)?;
    Ok(EvalSet { name, dir, files, questions: eval.questions, off_topic: eval.off_topic })
}

fn build_corpus(packages: &[Package], cache: &Path, dir: &Path) -> anyhow::Result<()> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    for package in packages {
        let pin = format!("{}={}", package.name, package.version);
        let deb = find_deb(&debs, &package.name, &package.version);
        let deb = match deb {
            Some(deb) => deb,
            None => {
                eprintln!("  apt-get download {pin}");
                let status = Command::new("apt-get").arg("download").arg(&pin).current_dir(&debs).status().context("apt-get download")?;
                anyhow::ensure!(status.success(), "apt-get download {pin} failed (is that version still in the archive? `apt-cache policy {}`)", package.name);
                find_deb(&debs, &package.name, &package.version).ok_or_else(|| anyhow::anyhow!("apt-get download {pin} left no .deb"))?
            }
        };
        let unpacked = cache.join("unpacked").join(&package.name);
        if !unpacked.exists() {
            std::fs::create_dir_all(&unpacked)?;
            let status = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked).status().context("dpkg-deb -x")?;
            anyhow::ensure!(status.success(), "dpkg-deb -x {} failed", deb.display());
        }
        let source = unpacked.join(&package.take);
        let target = dir.join(&package.name_as);
        if source.is_dir() {
            let suffix = package.pattern.as_deref().unwrap_or("*").trim_start_matches('*').to_string();
            copy_tree(&source, &target, &suffix)?;
        } else {
            let source = resolve_link(&source, &unpacked);
            std::fs::copy(&source, &target).with_context(|| format!("cannot copy {}", source.display()))?;
        }
    }
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(())
}

/// Debian docs often ship symlinks into other paths of the same package.
fn resolve_link(path: &Path, root: &Path) -> PathBuf {
    match std::fs::read_link(path) {
        Ok(link) if link.is_absolute() => root.join(link.strip_prefix("/").unwrap_or(&link)),
        Ok(link) => path.parent().map(|p| p.join(link)).unwrap_or_else(|| path.to_path_buf()),
        Err(_) => path.to_path_buf(),
    }
}

fn find_deb(dir: &Path, name: &str, version: &str) -> Option<PathBuf> {
    // apt writes `name_version_arch.deb`, with `:` in versions as `%3a`.
    let version = version.replace(':', "%3a");
    std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{name}_{version}_")) && n.ends_with(".deb"))
    })
}

fn copy_tree(from: &Path, to: &Path, suffix: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(from)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap_or_default();
        let meta = std::fs::metadata(&path);
        if meta.as_ref().is_ok_and(|m| m.is_dir()) {
            copy_tree(&path, &to.join(name), suffix)?;
        } else if meta.is_ok() && path.to_string_lossy().ends_with(suffix) {
            std::fs::copy(&path, to.join(name)).with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    Ok(())
}

fn list_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else if let Ok(relative) = path.strip_prefix(root)
                && !relative.to_string_lossy().starts_with('.')
            {
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort();
    Ok(files)
}

#[derive(Deserialize)]
struct BeirDoc {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    title: String,
    text: String,
}

#[derive(Deserialize)]
struct BeirQuery {
    #[serde(rename = "_id")]
    id: String,
    text: String,
}

/// Loads a BEIR directory; its documents are written as `<id>.md` under `cache`.
/// `limit` keeps the first that many queries (all when 0).
pub(crate) fn load_beir(dir: &Path, cache: &Path, limit: usize) -> anyhow::Result<EvalSet> {
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "beir".into());
    let qrels_path = ["qrels/test.tsv", "qrels/dev.tsv"].iter().map(|p| dir.join(p)).find(|p| p.exists()).ok_or_else(|| anyhow::anyhow!("{} has no qrels/test.tsv", dir.display()))?;
    let mut qrels: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, line) in std::fs::read_to_string(&qrels_path)?.lines().enumerate() {
        let parts: Vec<&str> = line.split('\t').collect();
        if parts.len() < 3 || (i == 0 && parts[2].parse::<i32>().is_err()) {
            continue;
        }
        if parts[2].trim().parse::<i32>().unwrap_or(0) > 0 {
            qrels.entry(parts[0].to_string()).or_default().push(parts[1].to_string());
        }
    }
    let out = cache.join(format!("beir-{name}"));
    let file_name = |id: &str| format!("{}.md", id.replace(['/', '\\', '\0'], "_"));
    if !out.join(".complete").exists() {
        std::fs::create_dir_all(&out)?;
        let corpus = std::io::BufReader::new(std::fs::File::open(dir.join("corpus.jsonl")).context("corpus.jsonl")?);
        for line in corpus.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let doc: BeirDoc = serde_json::from_str(&line).context("a corpus.jsonl line")?;
            let body = if doc.title.is_empty() { doc.text } else { format!("# {}\n\n{}", doc.title, doc.text) };
            std::fs::write(out.join(file_name(&doc.id)), body)?;
        }
        std::fs::write(out.join(".complete"), b"")?;
    }
    let mut questions = Vec::new();
    let queries = std::io::BufReader::new(std::fs::File::open(dir.join("queries.jsonl")).context("queries.jsonl")?);
    let mut texts: HashMap<String, String> = HashMap::new();
    for line in queries.lines() {
        let line = line?;
        if let Ok(query) = serde_json::from_str::<BeirQuery>(&line) {
            texts.insert(query.id, query.text);
        }
    }
    for (id, gold) in &qrels {
        if let Some(text) = texts.get(id) {
            questions.push(Question { q: text.clone(), gold: gold.iter().map(|g| file_name(g)).collect(), answers: vec![] });
        }
        if limit > 0 && questions.len() >= limit {
            break;
        }
    }
    let files = list_files(&out)?;
    Ok(EvalSet { name, dir: out, files, questions, off_topic: vec![] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_files_or_pages() {
        let page = Target::parse("manual.pdf#19");
        assert!(page.matches("manual.pdf", Some(19)) && !page.matches("manual.pdf", Some(18)) && !page.matches("manual.pdf", None));
        let file = Target::parse("python/library/zipfile.html");
        assert!(file.matches("python/library/zipfile.html", None) && file.matches("python/library/zipfile.html", Some(3)));
        assert_eq!(Target::parse("odd#name.html").file, "odd#name.html");
    }

    #[test]
    fn beir_directories_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("corpus.jsonl"), "{\"_id\":\"d1\",\"title\":\"Kites\",\"text\":\"Kites fly in wind.\"}\n{\"_id\":\"d2\",\"text\":\"Boats float.\"}\n").unwrap();
        std::fs::write(dir.path().join("queries.jsonl"), "{\"_id\":\"q1\",\"text\":\"what flies\"}\n").unwrap();
        std::fs::create_dir(dir.path().join("qrels")).unwrap();
        std::fs::write(dir.path().join("qrels/test.tsv"), "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n").unwrap();
        let cache = tempfile::tempdir().unwrap();
        let set = load_beir(dir.path(), cache.path(), 0).unwrap();
        assert_eq!(set.files, ["d1.md", "d2.md"]);
        assert_eq!(set.questions.len(), 1);
        assert_eq!(set.questions[0].gold, ["d1.md"]);
        assert!(std::fs::read_to_string(set.dir.join("d1.md")).unwrap().starts_with("# Kites"));
    }
}
