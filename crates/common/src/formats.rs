//! File formats Echo understands, and how an upload is recognised: declared content
//! type, then extension, then the first bytes. Shared by the gateway (to refuse an
//! unsupported upload at once) and the parser (to pick an extractor). No IO.

/// The upload is of a type Echo cannot read; carries what was seen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unsupported file type `{0}`; supported: PDF, Word (.docx), PowerPoint (.pptx), Excel (.xlsx), OpenDocument text and spreadsheets (.odt, .ods), EPUB, RTF, CSV/TSV, JSON, HTML, Markdown, plain text, and PNG/JPEG/TIFF images (read by OCR)")]
pub struct Unsupported(pub String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
    Docx,
    Pptx,
    Xlsx,
    Csv,
    Tsv,
    Json,
    /// PNG, JPEG or TIFF: read by OCR.
    Image,
    Odt,
    Ods,
    Epub,
    Rtf,
}

const ALL: [Format; 15] = [
    Format::Text,
    Format::Markdown,
    Format::Html,
    Format::Pdf,
    Format::Docx,
    Format::Pptx,
    Format::Xlsx,
    Format::Csv,
    Format::Tsv,
    Format::Json,
    Format::Image,
    Format::Odt,
    Format::Ods,
    Format::Epub,
    Format::Rtf,
];

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Markdown => "markdown",
            Format::Html => "html",
            Format::Pdf => "pdf",
            Format::Docx => "docx",
            Format::Pptx => "pptx",
            Format::Xlsx => "xlsx",
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Json => "json",
            Format::Image => "image",
            Format::Odt => "odt",
            Format::Ods => "ods",
            Format::Epub => "epub",
            Format::Rtf => "rtf",
        }
    }

    /// The format `as_str` names.
    pub fn parse(name: &str) -> Option<Format> {
        ALL.into_iter().find(|f| f.as_str() == name)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain",
            Format::Markdown => "text/markdown",
            Format::Html => "text/html",
            Format::Pdf => "application/pdf",
            Format::Docx => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            Format::Pptx => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            Format::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            Format::Csv => "text/csv",
            Format::Tsv => "text/tab-separated-values",
            Format::Json => "application/json",
            Format::Image => "image/png",
            Format::Odt => "application/vnd.oasis.opendocument.text",
            Format::Ods => "application/vnd.oasis.opendocument.spreadsheet",
            Format::Epub => "application/epub+zip",
            Format::Rtf => "application/rtf",
        }
    }
}

/// A filename as Echo keeps and shows it: only its last path component, without
/// control characters, bidirectional overrides and isolates (U+202E can make
/// `invoice<U+202E>fdp.exe` read as `invoiceexe.pdf`), zero-width characters or a byte-order
/// mark, trimmed, at most 255 bytes; `upload` when nothing is left.
pub fn clean_filename(raw: &str) -> String {
    let invisible = |c: char| {
        c.is_control()
            || matches!(c, '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
    };
    let base = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !invisible(*c)).collect();
    let mut cleaned = cleaned.trim().trim_start_matches('.').trim().to_string();
    while cleaned.len() > 255 {
        cleaned.pop();
    }
    if cleaned.is_empty() { "upload".to_string() } else { cleaned }
}

/// Decides the format from the declared content type, then the file extension, then
/// the first bytes. Returns `Unsupported` naming what was seen.
pub fn detect(content_type: &str, filename: &str, head: &[u8]) -> Result<Format, Unsupported> {
    let mime = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let extension = filename.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    let by_mime = match mime.as_str() {
        "application/pdf" => Some(Format::Pdf),
        "text/markdown" | "text/x-markdown" => Some(Format::Markdown),
        "text/html" | "application/xhtml+xml" => Some(Format::Html),
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => Some(Format::Docx),
        "application/vnd.openxmlformats-officedocument.presentationml.presentation" => Some(Format::Pptx),
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" => Some(Format::Xlsx),
        "text/csv" => Some(Format::Csv),
        "text/tab-separated-values" => Some(Format::Tsv),
        "application/json" => Some(Format::Json),
        "image/png" | "image/jpeg" | "image/tiff" => Some(Format::Image),
        "application/vnd.oasis.opendocument.text" => Some(Format::Odt),
        "application/vnd.oasis.opendocument.spreadsheet" => Some(Format::Ods),
        "application/epub+zip" => Some(Format::Epub),
        "application/rtf" | "text/rtf" => Some(Format::Rtf),
        "text/plain" => None, // browsers send text/plain for .md too: let the extension decide
        _ => None,
    };
    let by_extension = match extension.as_str() {
        "pdf" => Some(Format::Pdf),
        "md" | "markdown" | "mdown" | "mkd" => Some(Format::Markdown),
        "html" | "htm" | "xhtml" => Some(Format::Html),
        "txt" | "text" | "log" | "rst" | "adoc" => Some(Format::Text),
        "docx" => Some(Format::Docx),
        "pptx" => Some(Format::Pptx),
        "xlsx" => Some(Format::Xlsx),
        "csv" => Some(Format::Csv),
        "tsv" | "tab" => Some(Format::Tsv),
        "json" => Some(Format::Json),
        "png" | "jpg" | "jpeg" | "tif" | "tiff" => Some(Format::Image),
        "odt" => Some(Format::Odt),
        "ods" => Some(Format::Ods),
        "epub" => Some(Format::Epub),
        "rtf" => Some(Format::Rtf),
        _ => None,
    };
    if let Some(format) = by_mime.or(by_extension) {
        return Ok(format);
    }
    if head.starts_with(b"%PDF-") {
        return Ok(Format::Pdf);
    }
    if head.starts_with(b"{\\rtf") {
        return Ok(Format::Rtf);
    }
    // OpenDocument and EPUB zips name their type in a first, stored `mimetype` entry.
    if head.starts_with(b"PK\x03\x04") && head.get(30..38) == Some(b"mimetype") {
        let kind = &head[38..head.len().min(100)];
        for (name, format) in [
            (&b"application/vnd.oasis.opendocument.text"[..], Format::Odt),
            (b"application/vnd.oasis.opendocument.spreadsheet", Format::Ods),
            (b"application/epub+zip", Format::Epub),
        ] {
            if kind.starts_with(name) {
                return Ok(format);
            }
        }
    }
    if head.starts_with(b"\x89PNG\r\n\x1a\n") || head.starts_with(&[0xFF, 0xD8, 0xFF]) || head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        return Ok(Format::Image);
    }
    if mime == "text/plain" || (mime.is_empty() || mime == "application/octet-stream") && looks_like_text(head) {
        return Ok(Format::Text);
    }
    let seen = if mime.is_empty() { format!(".{extension}") } else { mime };
    Err(Unsupported(seen))
}

fn looks_like_text(head: &[u8]) -> bool {
    let sample = &head[..head.len().min(4096)];
    // A sample cut in the middle of a character is still text.
    let utf8 = match std::str::from_utf8(sample) {
        Ok(_) => true,
        Err(error) => error.error_len().is_none(),
    };
    !sample.is_empty() && !sample.contains(&0) && utf8
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn filenames_lose_paths_and_invisible_characters() {
        let cases = [
            ("invoice\u{202E}fdp.exe", "invoicefdp.exe"),
            ("report\u{2067}.pdf", "report.pdf"),
            ("../../etc/passwd", "passwd"),
            ("C:\\Users\\ann\\notes.md", "notes.md"),
            ("zero\u{200B}width\u{FEFF}.txt", "zerowidth.txt"),
            ("tab\tand\nnewline.txt", "tabandnewline.txt"),
            ("  .hidden  ", "hidden"),
            ("\u{202E}", "upload"),
            ("", "upload"),
            ("Résumé 2026.pdf", "Résumé 2026.pdf"),
        ];
        for (raw, clean) in cases {
            assert_eq!(clean_filename(raw), clean, "{raw:?}");
        }
        assert!(clean_filename(&"é".repeat(300)).len() <= 255);
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn detection_table() {
        let cases: &[(&str, &str, &[u8], Result<Format, ()>)] = &[
            ("application/pdf", "a.bin", b"", Ok(Format::Pdf)),
            ("text/plain", "notes.md", b"# hi", Ok(Format::Markdown)),
            ("", "page.HTML", b"<p>", Ok(Format::Html)),
            ("application/octet-stream", "x", b"%PDF-1.7", Ok(Format::Pdf)),
            ("application/octet-stream", "x", b"just words", Ok(Format::Text)),
            ("text/plain", "x.txt", b"words", Ok(Format::Text)),
            ("image/png", "x.png", b"\x89PNG\0\0", Ok(Format::Image)),
            ("application/octet-stream", "scan", b"\xFF\xD8\xFF\xE0", Ok(Format::Image)),
            ("image/gif", "x.gif", b"GIF89a", Err(())),
            ("application/octet-stream", "x.exe", b"MZ\0\0\0", Err(())),
            ("application/octet-stream", "report.DOCX", b"PK\x03\x04", Ok(Format::Docx)),
            ("application/octet-stream", "x", b"PK\x03\x04\x14\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x08\0\0\0mimetypeapplication/epub+zip", Ok(Format::Epub)),
            ("application/octet-stream", "x", b"PK\x03\x04\x14\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x08\0\0\0mimetypeapplication/vnd.oasis.opendocument.spreadsheet", Ok(Format::Ods)),
            ("", "letter.rtf", b"{\\rtf1", Ok(Format::Rtf)),
            ("application/octet-stream", "x", b"{\\rtf1\\ansi", Ok(Format::Rtf)),
            ("application/vnd.oasis.opendocument.text", "x", b"", Ok(Format::Odt)),
            ("text/csv", "x", b"a,b", Ok(Format::Csv)),
            ("", "data.tsv", b"a\tb", Ok(Format::Tsv)),
            ("application/json", "x", b"{}", Ok(Format::Json)),
        ];
        for (mime, name, head, expected) in cases {
            let got = detect(mime, name, head).map_err(|_| ());
            assert_eq!(&got, expected, "{mime} {name}");
        }
    }
}
