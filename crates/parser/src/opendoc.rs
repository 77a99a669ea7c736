//! OpenDocument text (ODT, its `content.xml` read with quick-xml), OpenDocument
//! spreadsheets (ODS, read by calamine: cached values, never formulas), EPUB (rbook:
//! spine order, each chapter's XHTML through the HTML extractor, the table of contents'
//! label as the chapter's section) and RTF (rtf-parser) into `TextBlock`s. Pure
//! functions over bytes; archives are checked for zip bombs first, and the caller bounds
//! time and catches a library's panic.

use std::collections::HashMap;
use std::io::Read;

use common::wire::TextBlock;
use quick_xml::events::Event;

use crate::formats::{ParseError, plain_text, push_heading, section_path};
use crate::office::{check_archive, table_blocks};

/// The most of one archive entry read into memory (an ODT's `content.xml`).
const MAX_ENTRY: u64 = 256 * 1024 * 1024;

fn zip_entry(bytes: &[u8], name: &str) -> Result<Option<String>, ParseError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| ParseError::Corrupt(format!("not a readable OpenDocument file (zip): {e}")))?;
    let mut entry = match archive.by_name(name) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(zip::result::ZipError::UnsupportedArchive(m)) if m.contains("ncrypt") || m.contains("assword") => return Err(ParseError::Encrypted),
        Err(e) => return Err(ParseError::Corrupt(e.to_string())),
    };
    let mut text = String::new();
    (&mut entry).take(MAX_ENTRY).read_to_string(&mut text).map_err(|e| ParseError::Corrupt(format!("{name}: {e}")))?;
    Ok(Some(text))
}

fn opendocument_archive(bytes: &[u8]) -> Result<(), ParseError> {
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err(ParseError::Corrupt("not an OpenDocument file (no zip header)".into()));
    }
    check_archive(bytes)?;
    // An encrypted OpenDocument file says so in its manifest.
    if zip_entry(bytes, "META-INF/manifest.xml")?.is_some_and(|m| m.contains("encryption-data")) {
        return Err(ParseError::Encrypted);
    }
    Ok(())
}

/// The document's `<dc:title>` from `meta.xml`.
fn opendocument_title(bytes: &[u8]) -> Option<String> {
    let meta = zip_entry(bytes, "meta.xml").ok()??;
    let mut reader = quick_xml::Reader::from_str(&meta);
    let mut inside = false;
    let mut title = String::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) if e.name().as_ref() == "dc:title" => inside = true,
            Ok(Event::End(e)) if e.name().as_ref() == "dc:title" => break,
            Ok(Event::Text(t)) if inside => title.push_str(&t.xml10_content()),
            Ok(Event::GeneralRef(r)) if inside => push_reference(&mut title, &r),
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
    (!title.is_empty()).then_some(title)
}

fn push_reference(out: &mut String, reference: &quick_xml::events::BytesRef<'_>) {
    if let Ok(Some(c)) = reference.resolve_char_ref() {
        out.push(c);
        return;
    }
    out.push_str(match &**reference {
        "amp" => "&",
        "lt" => "<",
        "gt" => ">",
        "quot" => "\"",
        "apos" => "'",
        _ => "",
    });
}

fn attribute(e: &quick_xml::events::BytesStart<'_>, name: &str) -> Option<String> {
    e.attributes().flatten().find(|a| a.key.as_ref() == name).map(|a| a.value.to_string())
}

/// Where a paragraph's text goes while `content.xml` is walked.
#[derive(Default)]
struct OdtWalk {
    blocks: Vec<TextBlock>,
    headings: Vec<(u8, String)>,
    /// Text under the current heading path, not yet a block.
    current: String,
    /// The paragraph or heading being read, and the heading's level.
    paragraph: String,
    heading: Option<u8>,
    /// How deep in lists the paragraph is.
    lists: usize,
    /// Tables being read (nested tables flatten into their cell), with the header rows seen.
    tables: Vec<(Vec<Vec<String>>, usize)>,
    in_header_rows: bool,
    /// A footnote being read: its citation and body; finished notes wait for their paragraph's end.
    note: Option<(String, String)>,
    in_citation: bool,
    notes: Vec<String>,
}

impl OdtWalk {
    fn text(&mut self, s: &str) {
        match (&mut self.note, self.in_citation) {
            (Some((citation, _)), true) => citation.push_str(s),
            (Some((_, body)), false) => body.push_str(s),
            (None, _) => self.paragraph.push_str(s),
        }
    }

    fn flush(&mut self) {
        let text = self.current.trim();
        if !text.is_empty() {
            self.blocks.push(TextBlock { text: text.to_string(), page: None, section: section_path(&self.headings) });
        }
        self.current.clear();
    }

    fn end_paragraph(&mut self) {
        if self.note.is_some() {
            if let Some((_, body)) = &mut self.note {
                body.push(' ');
            }
            return;
        }
        let mut text = self.paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
        self.paragraph.clear();
        for note in self.notes.drain(..) {
            text.push_str(&format!(" ({note})"));
        }
        if text.is_empty() {
            return;
        }
        if let Some((rows, _)) = self.tables.last_mut() {
            if let Some(cell) = rows.last_mut().and_then(|row| row.last_mut()) {
                if !cell.is_empty() {
                    cell.push(' ');
                }
                cell.push_str(&text);
            }
            return;
        }
        if let Some(level) = self.heading.take() {
            self.flush();
            push_heading(&mut self.headings, level, text.clone());
        } else if self.lists > 0 {
            text.insert_str(0, "- ");
        }
        self.current.push_str(&text);
        self.current.push_str("\n\n");
    }

    fn end_table(&mut self) {
        let Some((rows, header_rows)) = self.tables.pop() else { return };
        if let Some((outer, _)) = self.tables.last_mut() {
            // A table inside a cell: its text joins the cell.
            let text: Vec<String> = rows.into_iter().map(|r| r.join(" ")).collect();
            if let Some(cell) = outer.last_mut().and_then(|row| row.last_mut()) {
                cell.push_str(&text.join(" "));
            }
            return;
        }
        // A heading with nothing under it but this table is already in the rows' section
        // path: it does not become a chunk of its own.
        if self.headings.last().is_some_and(|(_, h)| self.current.trim() == h.as_str()) {
            self.current.clear();
        }
        self.flush();
        let header = if header_rows > 0 { Some(header_rows - 1) } else { (rows.len() > 1).then_some(0) };
        let path = section_path(&self.headings);
        let place = |first: usize, last: usize| {
            let rows = if first == last { format!("table row {}", first + 1) } else { format!("table rows {}–{}", first + 1, last + 1) };
            path.as_ref().map_or(rows.clone(), |p| format!("{p} › {rows}"))
        };
        self.blocks.extend(table_blocks(&rows, header, None, &place));
    }
}

/// OpenDocument text: headings (`text:h` with their outline level) as section paths,
/// list items marked, tables as `Header: value` rows, footnotes after their paragraph.
pub(crate) fn odt(bytes: &[u8]) -> Result<(Vec<TextBlock>, Option<String>), ParseError> {
    opendocument_archive(bytes)?;
    let content = zip_entry(bytes, "content.xml")?.ok_or_else(|| ParseError::Corrupt("no content.xml: not an OpenDocument text".into()))?;
    let mut reader = quick_xml::Reader::from_str(&content);
    let mut walk = OdtWalk::default();
    loop {
        let event = reader.read_event().map_err(|e| ParseError::Corrupt(format!("content.xml: {e}")))?;
        match event {
            Event::Start(e) => match e.name().as_ref() {
                "text:h" => {
                    walk.heading = Some(attribute(&e, "text:outline-level").and_then(|l| l.parse().ok()).unwrap_or(1).clamp(1, 6));
                }
                "text:list" => walk.lists += 1,
                "table:table" => walk.tables.push((Vec::new(), 0)),
                "table:table-header-rows" => walk.in_header_rows = true,
                "table:table-row" => {
                    if let Some((rows, header_rows)) = walk.tables.last_mut() {
                        rows.push(Vec::new());
                        if walk.in_header_rows {
                            *header_rows = rows.len();
                        }
                    }
                }
                "table:table-cell" | "table:covered-table-cell" => {
                    if let Some(row) = walk.tables.last_mut().and_then(|(rows, _)| rows.last_mut()) {
                        row.push(String::new());
                    }
                }
                "text:note" => walk.note = Some((String::new(), String::new())),
                "text:note-citation" => walk.in_citation = true,
                // Tracked deletions are not the document's text.
                "text:tracked-changes" | "office:annotation" => {
                    reader.read_to_end(e.name()).map_err(|e| ParseError::Corrupt(format!("content.xml: {e}")))?;
                }
                _ => {}
            },
            Event::Empty(e) => match e.name().as_ref() {
                "text:s" => {
                    let n = attribute(&e, "text:c").and_then(|c| c.parse::<usize>().ok()).unwrap_or(1).min(8);
                    walk.text(&" ".repeat(n));
                }
                "text:tab" | "text:line-break" => walk.text(" "),
                "table:table-cell" | "table:covered-table-cell" => {
                    if let Some(row) = walk.tables.last_mut().and_then(|(rows, _)| rows.last_mut()) {
                        // Runs of empty cells are written once with a repeat count; beyond
                        // the last filled cell they do not matter.
                        let repeat = attribute(&e, "table:number-columns-repeated").and_then(|c| c.parse::<usize>().ok()).unwrap_or(1).min(64);
                        row.extend(std::iter::repeat_n(String::new(), repeat));
                    }
                }
                _ => {}
            },
            Event::Text(t) => walk.text(&t.xml10_content()),
            Event::GeneralRef(r) => {
                let mut s = String::new();
                push_reference(&mut s, &r);
                walk.text(&s);
            }
            Event::End(e) => match e.name().as_ref() {
                "text:p" | "text:h" => walk.end_paragraph(),
                "text:list" => walk.lists = walk.lists.saturating_sub(1),
                "table:table" => walk.end_table(),
                "table:table-header-rows" => walk.in_header_rows = false,
                "text:note-citation" => walk.in_citation = false,
                "text:note" => {
                    if let Some((citation, body)) = walk.note.take() {
                        let body = body.split_whitespace().collect::<Vec<_>>().join(" ");
                        walk.notes.push(format!("Note {}: {body}", citation.trim()));
                    }
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    walk.flush();
    Ok((walk.blocks, opendocument_title(bytes)))
}

/// OpenDocument spreadsheet: each sheet's rows as `Header: value` (the first non-empty
/// row is the header), located by sheet and row number.
pub(crate) fn ods(bytes: &[u8]) -> Result<(Vec<TextBlock>, Option<String>), ParseError> {
    use calamine::Reader as _;
    opendocument_archive(bytes)?;
    let mut workbook = calamine::Ods::new(std::io::Cursor::new(bytes)).map_err(|e| match e {
        calamine::OdsError::Password => ParseError::Encrypted,
        other => ParseError::Corrupt(other.to_string().chars().take(200).collect()),
    })?;
    let mut blocks = Vec::new();
    for sheet in workbook.sheet_names() {
        let range = workbook.worksheet_range(&sheet).map_err(|e| ParseError::Corrupt(e.to_string().chars().take(200).collect()))?;
        let first_row = range.start().map_or(0, |(row, _)| row as usize);
        let rows: Vec<Vec<String>> = range.rows().map(|row| row.iter().map(|cell| cell.to_string()).collect()).collect();
        let header = rows.iter().position(|r| r.iter().any(|c| !c.trim().is_empty()));
        let header = header.filter(|h| rows.len() > h + 1);
        let place = |first: usize, last: usize| {
            let (first, last) = (first_row + first + 1, first_row + last + 1);
            if first == last { format!("{sheet} › row {first}") } else { format!("{sheet} › rows {first}–{last}") }
        };
        blocks.extend(table_blocks(&rows, header, None, &place));
    }
    Ok((blocks, opendocument_title(bytes)))
}

/// EPUB: the spine's chapters in reading order, each through the HTML extractor, its
/// sections under the chapter's label from the table of contents.
pub(crate) fn epub(bytes: &[u8]) -> Result<(Vec<TextBlock>, Option<String>), ParseError> {
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err(ParseError::Corrupt("not an EPUB (no zip header)".into()));
    }
    check_archive(bytes)?;
    if zip_entry(bytes, "META-INF/encryption.xml")?.is_some_and(|m| m.contains("EncryptedData") && !m.contains("font")) {
        return Err(ParseError::Encrypted);
    }
    let book = rbook::Epub::read(std::io::Cursor::new(bytes.to_vec())).map_err(|e| ParseError::Corrupt(e.to_string().chars().take(200).collect()))?;
    let title = book.metadata().title().map(|t| t.value().trim().to_string()).filter(|t| !t.is_empty());
    // Chapter labels by the file they open (without a fragment).
    let mut labels: HashMap<String, String> = HashMap::new();
    if let Some(root) = book.toc().contents() {
        for entry in root.flatten() {
            if let Some(item) = entry.manifest_entry() {
                let label = entry.label().split_whitespace().collect::<Vec<_>>().join(" ");
                if !label.is_empty() {
                    labels.entry(item.href().as_str().to_string()).or_insert(label);
                }
            }
        }
    }
    let mut blocks = Vec::new();
    for content in book.reader() {
        let content = content.map_err(|e| ParseError::Corrupt(e.to_string().chars().take(200).collect()))?;
        let href = content.manifest_entry().href().as_str().to_string();
        let (chapter_blocks, chapter_title) = crate::formats::html(content.content());
        let chapter = labels.get(&href).cloned().or(chapter_title);
        for mut block in chapter_blocks {
            block.section = match (&chapter, block.section.take()) {
                (Some(chapter), Some(section)) if section == *chapter || section.starts_with(&format!("{chapter} > ")) => Some(section),
                (Some(chapter), Some(section)) => Some(format!("{chapter} > {section}")),
                (Some(chapter), None) => Some(chapter.clone()),
                (None, section) => section,
            };
            blocks.push(block);
        }
    }
    Ok((blocks, title))
}

/// Groups whose text is not the document's: fonts, colours, styles, metadata,
/// pictures and objects, fields' instructions.
const RTF_SKIPPED: [&str; 14] =
    ["fonttbl", "colortbl", "stylesheet", "info", "pict", "object", "fldinst", "themedata", "colorschememapping", "latentstyles", "datastore", "xmlnstbl", "listtable", "listoverridetable"];

/// The most nested groups an RTF file may open.
const RTF_MAX_DEPTH: usize = 1_000;

/// RTF: its text, paragraphs kept (`\par`), escaped characters decoded (`\'e9` in the
/// file's code page, `\u8217?` with its fallback skipped), and the groups that are not
/// text (font tables, pictures, metadata, `\*` destinations) left out. A small
/// tokenizer over the bytes: the crates that exist drop `\u` characters and paragraph
/// breaks.
pub(crate) fn rtf(bytes: &[u8]) -> Result<Vec<TextBlock>, ParseError> {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(0);
    if !bytes[start..].starts_with(b"{\\rtf") {
        return Err(ParseError::Corrupt("not an RTF file (no {\\rtf header)".into()));
    }
    struct Group {
        skip: bool,
        /// Characters to skip after a `\u` (`\ucN`).
        uc: usize,
    }
    let mut codepage = encoding_rs::WINDOWS_1252;
    let mut stack: Vec<Group> = vec![Group { skip: false, uc: 1 }];
    let mut text = String::new();
    let mut pending: Vec<u8> = Vec::new(); // `\'hh` bytes not yet decoded
    let mut skip_fallback = 0usize;
    let mut i = start;
    let flush = |pending: &mut Vec<u8>, text: &mut String, codepage: &'static encoding_rs::Encoding| {
        if !pending.is_empty() {
            text.push_str(&codepage.decode_without_bom_handling(pending).0);
            pending.clear();
        }
    };
    while i < bytes.len() {
        let b = bytes[i];
        let skipping = stack.last().is_some_and(|g| g.skip);
        match b {
            b'{' => {
                flush(&mut pending, &mut text, codepage);
                if stack.len() >= RTF_MAX_DEPTH {
                    return Err(ParseError::Corrupt(format!("RTF groups nested deeper than {RTF_MAX_DEPTH}")));
                }
                let uc = stack.last().map_or(1, |g| g.uc);
                stack.push(Group { skip: skipping, uc });
                // `{\*\dest …}`: an optional destination a reader may ignore.
                if bytes[i + 1..].starts_with(b"\\*")
                    && let Some(top) = stack.last_mut()
                {
                    top.skip = true;
                }
                i += 1;
            }
            b'}' => {
                flush(&mut pending, &mut text, codepage);
                stack.pop();
                if stack.is_empty() {
                    break;
                }
                i += 1;
            }
            b'\\' => {
                let Some(&next) = bytes.get(i + 1) else { break };
                if next == b'\'' {
                    // A byte in the code page.
                    let hex = bytes.get(i + 2..i + 4).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
                    i += 4;
                    if skip_fallback > 0 {
                        skip_fallback -= 1;
                    } else if let (Some(byte), false) = (hex, skipping) {
                        pending.push(byte);
                    }
                    continue;
                }
                flush(&mut pending, &mut text, codepage);
                if !next.is_ascii_alphabetic() {
                    // A control symbol: an escaped character or a special space.
                    if !skipping && skip_fallback == 0 {
                        match next {
                            b'\\' | b'{' | b'}' => text.push(next as char),
                            b'~' => text.push('\u{a0}'),
                            b'-' => {}
                            b'_' => text.push('-'),
                            b'\n' | b'\r' => text.push('\n'),
                            _ => {}
                        }
                    } else {
                        skip_fallback = skip_fallback.saturating_sub(1);
                    }
                    i += 2;
                    continue;
                }
                // A control word: letters, an optional signed number, an optional space.
                let mut j = i + 1;
                while j < bytes.len() && bytes[j].is_ascii_alphabetic() && j - i < 34 {
                    j += 1;
                }
                let word = std::str::from_utf8(&bytes[i + 1..j]).unwrap_or_default();
                let number_start = j;
                if j < bytes.len() && bytes[j] == b'-' {
                    j += 1;
                }
                while j < bytes.len() && bytes[j].is_ascii_digit() && j - number_start < 11 {
                    j += 1;
                }
                let number: Option<i64> = std::str::from_utf8(&bytes[number_start..j]).ok().and_then(|n| n.parse().ok());
                if j < bytes.len() && bytes[j] == b' ' {
                    j += 1;
                }
                i = j;
                if RTF_SKIPPED.contains(&word) {
                    if let Some(top) = stack.last_mut() {
                        top.skip = true;
                    }
                    continue;
                }
                match word {
                    "ansicpg" => {
                        let label = format!("windows-{}", number.unwrap_or(1252));
                        codepage = encoding_rs::Encoding::for_label(label.as_bytes()).unwrap_or(encoding_rs::WINDOWS_1252);
                    }
                    "uc" => {
                        if let Some(top) = stack.last_mut() {
                            top.uc = number.unwrap_or(1).clamp(0, 8) as usize;
                        }
                    }
                    "u" if !skipping => {
                        // A UTF-16 unit, signed; surrogate pairs come as two `\u`.
                        let unit = number.unwrap_or(0).rem_euclid(65_536) as u32;
                        if (0xD800..0xDC00).contains(&unit) {
                            pending.clear();
                            text.push('\u{fffd}');
                        } else if (0xDC00..0xE000).contains(&unit) {
                            if text.ends_with('\u{fffd}') {
                                text.pop();
                            }
                        } else if let Some(c) = char::from_u32(unit) {
                            text.push(c);
                        }
                        skip_fallback = stack.last().map_or(1, |g| g.uc);
                    }
                    "par" | "line" | "sect" | "page" | "row" if !skipping => text.push('\n'),
                    "tab" | "cell" if !skipping => text.push('\t'),
                    "emdash" if !skipping => text.push('—'),
                    "endash" if !skipping => text.push('–'),
                    "lquote" if !skipping => text.push('‘'),
                    "rquote" if !skipping => text.push('’'),
                    "ldblquote" if !skipping => text.push('“'),
                    "rdblquote" if !skipping => text.push('”'),
                    "bullet" if !skipping => text.push('•'),
                    _ => {}
                }
            }
            b'\r' | b'\n' => i += 1,
            _ => {
                if skip_fallback > 0 {
                    skip_fallback -= 1;
                } else if !skipping {
                    flush(&mut pending, &mut text, codepage);
                    // Plain text runs up to the next control character.
                    let end = bytes[i..].iter().position(|c| matches!(c, b'\\' | b'{' | b'}' | b'\r' | b'\n')).map_or(bytes.len(), |p| i + p);
                    text.push_str(&codepage.decode_without_bom_handling(&bytes[i..end]).0);
                    i = end;
                    continue;
                }
                i += 1;
            }
        }
    }
    flush(&mut pending, &mut text, codepage);
    let paragraphs: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    Ok(plain_text(&paragraphs.join("\n\n")))
}
