//! `echod bench parse` (B1) and `echod bench chunk` (B2), each beside the baseline a
//! user would pick instead, in the same run, on the same files, one core each.
//!
//! - B1: Echo's extractors (in-process, one thread) over the real files of an
//!   evaluation corpus (PDF manuals and an HTML manual from pinned Debian packages),
//!   pages per second by format, beside LlamaIndex's `SimpleDirectoryReader` with pypdf;
//!   and each PDF's completeness against pypdf: the share of pypdf's letters and digits
//!   (a multiset, case folded) that Echo's text holds too.
//! - B2: Echo's chunker over ~50 MB of mixed text (the corpus' extracted documents,
//!   repeated) and one 10 MB hard-wrapped document, MB/s beside LangChain's
//!   `RecursiveCharacterTextSplitter` with the same size and overlap.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use common::wire::TextBlock;

use super::{corpus, python};

fn eval_set(eval: Option<PathBuf>) -> anyhow::Result<corpus::EvalSet> {
    let eval = eval.unwrap_or_else(|| python::repo_root().join("tests/eval/debian-docs.json"));
    corpus::load_eval(&eval, &python::bench_data())
}

/// Letters and digits, case folded, counted.
fn letters(text: &str) -> HashMap<char, u64> {
    let mut counts = HashMap::new();
    for c in text.chars().filter(|c| c.is_alphanumeric()) {
        for lower in c.to_lowercase() {
            *counts.entry(lower).or_default() += 1;
        }
    }
    counts
}

/// The share of `reference`'s letters that `text` holds too.
fn recall(text: &str, reference: &str) -> f64 {
    let (ours, theirs) = (letters(text), letters(reference));
    let total: u64 = theirs.values().sum();
    if total == 0 {
        return 1.0;
    }
    let held: u64 = theirs.iter().map(|(c, n)| (*n).min(ours.get(c).copied().unwrap_or(0))).sum();
    held as f64 / total as f64
}

#[derive(Default)]
struct Tally {
    files: usize,
    pages: u64,
    bytes: u64,
    seconds: f64,
    failed: usize,
}

pub async fn run_parse(eval: Option<PathBuf>, baseline: bool) -> anyhow::Result<()> {
    let set = eval_set(eval)?;
    println!("B1 — parsing {} files of `{}` ({}), one thread", set.files.len(), set.name, set.dir.display());
    let mut by_format: std::collections::BTreeMap<&'static str, Tally> = Default::default();
    let mut pdf_text: HashMap<String, String> = HashMap::new();
    let started = Instant::now();
    for file in &set.files {
        let path = set.dir.join(file);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let Ok(format) = parser::detect("", file, &bytes) else { continue };
        let t = Instant::now();
        let parsed = parser::extract(format, &bytes);
        let seconds = t.elapsed().as_secs_f64();
        let tally = by_format.entry(format.as_str()).or_default();
        tally.files += 1;
        tally.bytes += bytes.len() as u64;
        tally.seconds += seconds;
        match parsed {
            Ok(doc) => {
                tally.pages += u64::from(doc.n_pages.unwrap_or(1));
                if format == parser::Format::Pdf {
                    let text: Vec<&str> = doc.blocks.iter().map(|b| b.text.as_str()).collect();
                    pdf_text.insert(path.to_string_lossy().into_owned(), text.join("\n"));
                }
            }
            Err(_) => tally.failed += 1,
        }
    }
    let echo_seconds = started.elapsed().as_secs_f64();
    let (pages, files): (u64, usize) = by_format.values().fold((0, 0), |(p, f), t| (p + t.pages, f + t.files));
    println!("{:<8} {:>6} {:>8} {:>9} {:>9} {:>11}", "format", "files", "pages", "MB", "seconds", "pages/s");
    for (format, t) in &by_format {
        println!("{:<8} {:>6} {:>8} {:>9.1} {:>9.2} {:>11.0}{}", format, t.files, t.pages, t.bytes as f64 / 1e6, t.seconds, t.pages as f64 / t.seconds.max(1e-9), if t.failed > 0 { format!("  ({} failed)", t.failed) } else { String::new() });
    }
    println!("Echo, one thread: {files} files, {pages} pages in {echo_seconds:.2} s: {:.0} pages/s", pages as f64 / echo_seconds);
    // The same files on every core, as the ingest workers parse them.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(file) = set.files.get(i) else { break };
                    if let Ok(bytes) = std::fs::read(set.dir.join(file))
                        && let Ok(format) = parser::detect("", file, &bytes)
                    {
                        let _ = parser::extract(format, &bytes);
                    }
                }
            });
        }
    });
    let parallel_seconds = started.elapsed().as_secs_f64();
    println!("Echo, {threads} threads: {pages} pages in {parallel_seconds:.2} s: {:.0} pages/s", pages as f64 / parallel_seconds);
    if !baseline {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let list = work.path().join("files.txt");
    let paths: Vec<String> = set.files.iter().map(|f| set.dir.join(f).to_string_lossy().into_owned()).collect();
    std::fs::write(&list, paths.join("\n"))?;
    let out = work.path().join("pypdf.json");
    let result = python::run_script("llamaindex_parse.py", &[list.as_os_str(), out.as_os_str()])?;
    let seconds = result["seconds"].as_f64().unwrap_or(f64::NAN);
    println!("LlamaIndex SimpleDirectoryReader (pypdf): {} documents in {seconds:.2} s: {:.0} pages/s (Echo's page count)", result["documents"], pages as f64 / seconds);
    println!("Echo / LlamaIndex: {:.1}× on one thread, {:.1}× on {threads} threads", seconds / echo_seconds, seconds / parallel_seconds);
    let theirs: HashMap<String, String> = serde_json::from_slice(&std::fs::read(&out)?)?;
    println!("PDF completeness against pypdf (share of pypdf's letters and digits Echo's text holds):");
    let (mut held, mut total) = (0.0, 0.0);
    let mut names: Vec<&String> = theirs.keys().collect();
    names.sort();
    for name in names {
        let reference = &theirs[name];
        let ours = pdf_text.get(name).map(String::as_str).unwrap_or("");
        let r = recall(ours, reference);
        let n: u64 = letters(reference).values().sum();
        held += r * n as f64;
        total += n as f64;
        println!("  {:<40} {:.4}  ({} letters in pypdf's text)", Path::new(name).file_name().unwrap_or_default().to_string_lossy(), r, n);
    }
    if total > 0.0 {
        println!("  all PDFs: {:.4}", held / total);
    }
    Ok(())
}

/// Text wrapped at `width` columns with single newlines, paragraphs run together: how
/// a plain-text export or an e-mail archive looks.
fn hard_wrap(text: &str, width: usize) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / width);
    let mut line = 0;
    for word in text.split_whitespace() {
        if line > 0 && line + 1 + word.len() > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out
}

pub async fn run_chunk(eval: Option<PathBuf>, mixed_mb: usize, wrapped_mb: usize, baseline: bool) -> anyhow::Result<()> {
    let set = eval_set(eval)?;
    let chunk_chars = common::EchoConfig::default().ingest.chunk_chars;
    let overlap = common::EchoConfig::default().ingest.chunk_overlap_chars;
    // The corpus' documents as extracted text.
    let mut documents: Vec<String> = Vec::new();
    for file in &set.files {
        let bytes = std::fs::read(set.dir.join(file))?;
        let Ok(format) = parser::detect("", file, &bytes) else { continue };
        if let Ok(doc) = parser::extract(format, &bytes) {
            documents.push(doc.blocks.iter().map(|b| b.text.as_str()).collect::<Vec<_>>().join("\n\n"));
        }
    }
    anyhow::ensure!(!documents.is_empty(), "no documents in {}", set.dir.display());
    let work = tempfile::tempdir()?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut total = 0;
    for (i, text) in documents.iter().cycle().enumerate() {
        if total >= mixed_mb * 1_000_000 {
            break;
        }
        let path = work.path().join(format!("mixed-{i:05}.txt"));
        std::fs::write(&path, text)?;
        total += text.len();
        files.push(path);
    }
    let mut wrapped = String::new();
    for text in documents.iter().cycle() {
        if wrapped.len() >= wrapped_mb * 1_000_000 {
            break;
        }
        wrapped.push_str(&hard_wrap(text, 72));
        wrapped.push('\n');
    }
    let wrapped_path = work.path().join("hard-wrapped.txt");
    std::fs::write(&wrapped_path, &wrapped)?;
    println!("B2 — chunking {} files, {:.1} MB of mixed text, and one hard-wrapped document of {:.1} MB; {chunk_chars} characters, {overlap} overlap; one thread", files.len(), total as f64 / 1e6, wrapped.len() as f64 / 1e6);

    let chunk = |path: &Path| -> anyhow::Result<(f64, usize)> {
        let text = std::fs::read_to_string(path)?;
        let t = Instant::now();
        let chunks = ingest::chunk_texts(&[TextBlock { text, page: None, section: None }], chunk_chars, overlap);
        Ok((t.elapsed().as_secs_f64(), chunks.len()))
    };
    let (mut mixed_seconds, mut mixed_chunks) = (0.0, 0);
    for path in &files {
        let (s, n) = chunk(path)?;
        mixed_seconds += s;
        mixed_chunks += n;
    }
    let (wrapped_seconds, wrapped_chunks) = chunk(&wrapped_path)?;
    println!("Echo:      mixed {:.1} MB/s ({mixed_chunks} chunks, {mixed_seconds:.2} s); hard-wrapped {wrapped_seconds:.3} s ({wrapped_chunks} chunks, {:.1} MB/s)", total as f64 / 1e6 / mixed_seconds, wrapped.len() as f64 / 1e6 / wrapped_seconds);
    if !baseline {
        return Ok(());
    }
    let list = work.path().join("files.txt");
    let mut paths: Vec<String> = files.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    paths.push(wrapped_path.to_string_lossy().into_owned());
    std::fs::write(&list, paths.join("\n"))?;
    let result = python::run_script("langchain_chunk.py", &[chunk_chars.to_string().as_ref(), overlap.to_string().as_ref(), list.as_os_str()])?;
    let results = result["results"].as_array().cloned().unwrap_or_default();
    let (theirs_mixed, theirs_wrapped) = results.split_at(results.len().saturating_sub(1));
    let seconds: f64 = theirs_mixed.iter().filter_map(|r| r["seconds"].as_f64()).sum();
    let chunks: u64 = theirs_mixed.iter().filter_map(|r| r["chunks"].as_u64()).sum();
    let wrapped_theirs = theirs_wrapped.first().and_then(|r| r["seconds"].as_f64()).unwrap_or(f64::NAN);
    let wrapped_theirs_chunks = theirs_wrapped.first().and_then(|r| r["chunks"].as_u64()).unwrap_or(0);
    println!("LangChain: mixed {:.1} MB/s ({chunks} chunks, {seconds:.2} s); hard-wrapped {wrapped_theirs:.3} s ({wrapped_theirs_chunks} chunks)", total as f64 / 1e6 / seconds);
    println!("Echo / LangChain: mixed {:.1}×, hard-wrapped {:.1}×", seconds / mixed_seconds, wrapped_theirs / wrapped_seconds);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn completeness_counts_letters_not_layout() {
        assert_eq!(recall("The port is 7341", "the\nport is 7341"), 1.0);
        assert!((recall("port", "port 7341") - 0.5).abs() < 1e-9);
        assert_eq!(hard_wrap("aaa bbb ccc", 7), "aaa bbb\nccc");
    }
}
