//! OCR with Debian's `tesseract-ocr` (and `pdftoppm` from `poppler-utils` to rasterise
//! PDF pages), each run as a child process that the job's deadline kills: images, and
//! the pages of a PDF that have no text layer (a scan, or a scanned page in a typed
//! document). When the programs are not installed, the job fails saying exactly that.
//! Runs in the parser service, not in a parse worker, so that killing on time reaches
//! the OCR process itself.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;
use tokio::time::Instant;

use common::wire::{ParsedDocument, TextBlock};

use crate::formats::ParseError;

/// Pages of one PDF read by OCR at most (a scan longer than this is read in part).
pub(crate) const MAX_OCR_PAGES: usize = 300;
/// Rasterising resolution: tesseract reads 200 dpi body text reliably.
const DPI: &str = "200";

fn missing(program: &str, package: &str) -> ParseError {
    ParseError::OcrUnavailable(format!("this file needs OCR, and `{program}` is not installed on the server (Debian/Ubuntu: apt-get install {package})"))
}

/// Runs `program` with `args` until `deadline`; its standard output.
async fn run(program: &str, package: &str, args: &[&std::ffi::OsStr], deadline: Instant, limit_ms: u64) -> Result<Vec<u8>, ParseError> {
    let child = Command::new(program)
        .args(args)
        // One thread per OCR: the parser runs several at once on few cores.
        .env("OMP_THREAD_LIMIT", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| if error.kind() == std::io::ErrorKind::NotFound { missing(program, package) } else { ParseError::Corrupt(format!("cannot run {program}: {error}")) })?;
    match tokio::time::timeout_at(deadline, child.wait_with_output()).await {
        // Dropping the future drops the child, which kills it.
        Err(_) => Err(ParseError::Timeout(limit_ms)),
        Ok(Err(error)) => Err(ParseError::Corrupt(format!("{program} failed: {error}"))),
        Ok(Ok(output)) if !output.status.success() => {
            let detail = String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or_default().chars().take(200).collect::<String>();
            Err(ParseError::Corrupt(format!("{program} could not read the file: {detail}")))
        }
        Ok(Ok(output)) => Ok(output.stdout),
    }
}

async fn tesseract(image: &Path, deadline: Instant, limit_ms: u64) -> Result<String, ParseError> {
    let out = run("tesseract", "tesseract-ocr", &[image.as_os_str(), "stdout".as_ref(), "-l".as_ref(), "eng".as_ref()], deadline, limit_ms).await?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

fn temp_dir() -> Result<tempfile::TempDir, ParseError> {
    tempfile::tempdir().map_err(|e| ParseError::Corrupt(format!("no room for OCR: {e}")))
}

/// A PNG, JPEG or TIFF read by OCR.
pub(crate) async fn image(bytes: &[u8], deadline: Instant, limit_ms: u64) -> Result<ParsedDocument, ParseError> {
    let dir = temp_dir()?;
    let path = dir.path().join("image");
    std::fs::write(&path, bytes).map_err(|e| ParseError::Corrupt(e.to_string()))?;
    let text = tesseract(&path, deadline, limit_ms).await?;
    if text.chars().filter(|c| c.is_alphanumeric()).count() < 3 {
        return Err(ParseError::NoText);
    }
    Ok(ParsedDocument { format: "image".into(), blocks: vec![TextBlock { text, page: Some(1), section: None }], n_pages: Some(1), title: None })
}

/// The given pages of a PDF, rasterised and read by OCR, in page order.
pub(crate) async fn pdf_pages(bytes: &[u8], pages: &[u32], deadline: Instant, limit_ms: u64) -> Result<Vec<TextBlock>, ParseError> {
    let dir = temp_dir()?;
    let pdf = dir.path().join("document.pdf");
    std::fs::write(&pdf, bytes).map_err(|e| ParseError::Corrupt(e.to_string()))?;
    let mut blocks = Vec::new();
    for &page in pages.iter().take(MAX_OCR_PAGES) {
        let prefix = dir.path().join(format!("page-{page}"));
        let n = page.to_string();
        let args: [&std::ffi::OsStr; 11] = ["-r".as_ref(), DPI.as_ref(), "-f".as_ref(), n.as_ref(), "-l".as_ref(), n.as_ref(), "-png".as_ref(), "-singlefile".as_ref(), "-q".as_ref(), pdf.as_os_str(), prefix.as_os_str()];
        run("pdftoppm", "poppler-utils", &args, deadline, limit_ms).await?;
        let image = prefix.with_extension("png");
        let text = tesseract(&image, deadline, limit_ms).await?;
        let _ = std::fs::remove_file(&image);
        if !text.is_empty() {
            blocks.push(TextBlock { text, page: Some(page), section: None });
        }
    }
    Ok(blocks)
}
