//! Office documents (DOCX, PPTX, XLSX, read by `undoc`), delimited tables (CSV, TSV)
//! and JSON into `TextBlock`s that keep where the text is: a Word heading path, a slide
//! number (as the page) and title, a sheet and its rows. Table rows become
//! `Header: value` text with their header carried into every row, so a row found alone
//! still says what its numbers are. Pure functions over bytes; the caller bounds time.

use common::wire::TextBlock;

use crate::formats::{ParseError, push_heading, section_path};

/// Rows (or JSON leaves) per block, and the characters a block grows to at most.
const ROWS_PER_BLOCK: usize = 25;
const BLOCK_CHARS: usize = 2_000;
/// What an Office file may decompress to in all (its entries' declared sizes); a zip
/// bomb is refused before anything is inflated, and the worker's memory limit stops one
/// that lies about its sizes.
const MAX_UNZIPPED: u64 = 512 * 1024 * 1024;
const MAX_ENTRIES: usize = 20_000;

/// A table as rows of cell texts: each row `Header: value; …` (the header row named by
/// the table, else its first row), grouped into blocks under `location(first, last)`.
pub(crate) fn table_blocks(rows: &[Vec<String>], header_row: Option<usize>, page: Option<u32>, location: &dyn Fn(usize, usize) -> String) -> Vec<TextBlock> {
    let header: Option<&Vec<String>> = header_row.and_then(|i| rows.get(i));
    let mut blocks = Vec::new();
    let mut text = String::new();
    let mut first = None;
    let mut last = 0;
    for (i, row) in rows.iter().enumerate() {
        if Some(i) == header_row || row.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .filter(|(_, cell)| !cell.trim().is_empty())
            .map(|(c, cell)| match header.and_then(|h| h.get(c)).filter(|h| !h.trim().is_empty()) {
                Some(name) => format!("{}: {}", name.trim(), cell.trim()),
                None => cell.trim().to_string(),
            })
            .collect();
        let line = line.join("; ");
        if first.is_some() && (i - first.unwrap_or(i) >= ROWS_PER_BLOCK || text.len() + line.len() > BLOCK_CHARS) {
            blocks.push(TextBlock { text: std::mem::take(&mut text), page, section: Some(location(first.unwrap_or(i), last)) });
            first = None;
        }
        first.get_or_insert(i);
        last = i;
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&line);
    }
    if let Some(first) = first {
        blocks.push(TextBlock { text, page, section: Some(location(first, last)) });
    }
    blocks
}

/// Refuses an archive whose entries would inflate past the limits.
pub(crate) fn check_archive(bytes: &[u8]) -> Result<(), ParseError> {
    let archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| ParseError::Corrupt(format!("not a readable Office file (zip): {e}")))?;
    if archive.len() > MAX_ENTRIES {
        return Err(ParseError::Corrupt(format!("the file holds {} parts; at most {MAX_ENTRIES} are read", archive.len())));
    }
    let mut archive = archive;
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| ParseError::Corrupt(e.to_string()))?;
        if entry.encrypted() {
            return Err(ParseError::Encrypted);
        }
        total = total.saturating_add(entry.size());
    }
    if total > MAX_UNZIPPED {
        return Err(ParseError::TooLarge(MAX_UNZIPPED as usize));
    }
    Ok(())
}

fn undoc_error(error: undoc::Error) -> ParseError {
    match error {
        undoc::Error::Encrypted => ParseError::Encrypted,
        other => ParseError::Corrupt(other.to_string().chars().take(200).collect()),
    }
}

/// The paragraphs' text; list items marked as such.
fn paragraph_text(paragraph: &undoc::model::Paragraph) -> String {
    let text = paragraph.plain_text();
    let text = text.trim();
    // Numbering, or a list style (python-docx and many templates number by style).
    let listed = paragraph.is_list_item() || [&paragraph.style_name, &paragraph.style_id].iter().any(|s| s.as_deref().is_some_and(|s| s.starts_with("List") || s.starts_with("ListParagraph")));
    if listed && !text.is_empty() { format!("- {text}") } else { text.to_string() }
}

fn cells(table: &undoc::model::Table) -> (Vec<Vec<String>>, Option<usize>) {
    let rows: Vec<Vec<String>> = table.rows.iter().map(|row| row.cells.iter().map(|c| c.plain_text().split_whitespace().collect::<Vec<_>>().join(" ")).collect()).collect();
    let header = table.rows.iter().position(|r| r.is_header).or((rows.len() > 1).then_some(0));
    (rows, header)
}

/// DOCX, PPTX or XLSX.
pub(crate) fn office(bytes: &[u8]) -> Result<(Vec<TextBlock>, Option<String>), ParseError> {
    if !bytes.starts_with(b"PK\x03\x04") {
        // An encrypted Office file is an OLE compound file holding the encrypted package.
        if bytes.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
            return Err(ParseError::Encrypted);
        }
        return Err(ParseError::Corrupt("not an Office Open XML file (no zip header)".into()));
    }
    check_archive(bytes)?;
    let document = undoc::parse_bytes(bytes).map_err(undoc_error)?;
    let title = document.metadata.title.clone().filter(|t| !t.trim().is_empty());
    let mut blocks = Vec::new();
    match document.format {
        undoc::FormatType::Docx => {
            let mut headings: Vec<(u8, String)> = Vec::new();
            let mut current = String::new();
            let flush = |blocks: &mut Vec<TextBlock>, current: &mut String, headings: &[(u8, String)]| {
                if !current.trim().is_empty() {
                    blocks.push(TextBlock { text: current.trim().to_string(), page: None, section: section_path(headings) });
                }
                current.clear();
            };
            for section in &document.sections {
                for block in &section.content {
                    match block {
                        undoc::model::Block::Paragraph(paragraph) => {
                            let text = paragraph_text(paragraph);
                            if text.is_empty() {
                                continue;
                            }
                            if paragraph.heading.is_heading() {
                                flush(&mut blocks, &mut current, &headings);
                                push_heading(&mut headings, paragraph.heading.level(), text.clone());
                            }
                            current.push_str(&text);
                            current.push_str("\n\n");
                        }
                        undoc::model::Block::Table(table) => {
                            // A heading with only this table under it is in the rows' path already.
                            if headings.last().is_some_and(|(_, h)| current.trim() == h.as_str()) {
                                current.clear();
                            }
                            flush(&mut blocks, &mut current, &headings);
                            let (rows, header) = cells(table);
                            let path = section_path(&headings);
                            let place = |first: usize, last: usize| {
                                let rows = if first == last { format!("table row {}", first + 1) } else { format!("table rows {}–{}", first + 1, last + 1) };
                                path.as_ref().map_or(rows.clone(), |p| format!("{p} › {rows}"))
                            };
                            blocks.extend(table_blocks(&rows, header, None, &place));
                        }
                        undoc::model::Block::Note { label, content } => {
                            let text: Vec<String> = content.iter().map(paragraph_text).filter(|t| !t.is_empty()).collect();
                            if !text.is_empty() {
                                current.push_str(&format!("Note {label}: {}\n\n", text.join(" ")));
                            }
                        }
                        _ => {}
                    }
                }
            }
            flush(&mut blocks, &mut current, &headings);
        }
        undoc::FormatType::Pptx => {
            for section in &document.sections {
                let slide = section.index as u32 + 1;
                // The slide's title: its name when the deck gave one, else its title
                // placeholder (read as a heading), else its first line.
                let paragraphs = || section.content.iter().filter_map(|b| if let undoc::model::Block::Paragraph(p) = b { Some(p) } else { None });
                let given = section.name.clone().filter(|n| !n.trim().is_empty() && *n != format!("Slide {slide}"));
                let name = given
                    .or_else(|| paragraphs().find(|p| p.is_heading()).map(paragraph_text))
                    .or_else(|| paragraphs().map(paragraph_text).find(|t| !t.is_empty()))
                    .filter(|n| !n.is_empty())
                    .map(|n| n.chars().take(120).collect::<String>());
                let label = name.clone().map_or(format!("Slide {slide}"), |n| format!("Slide {slide}: {n}"));
                let mut text = String::new();
                for block in &section.content {
                    match block {
                        undoc::model::Block::Paragraph(paragraph) => {
                            let line = paragraph_text(paragraph);
                            if !line.is_empty() {
                                text.push_str(&line);
                                text.push('\n');
                            }
                        }
                        undoc::model::Block::Table(table) => {
                            let (rows, header) = cells(table);
                            for block in table_blocks(&rows, header, Some(slide), &|_, _| label.clone()) {
                                text.push_str(&block.text);
                                text.push('\n');
                            }
                        }
                        _ => {}
                    }
                }
                if let Some(notes) = &section.notes {
                    let notes: Vec<String> = notes.iter().map(paragraph_text).filter(|t| !t.is_empty()).collect();
                    if !notes.is_empty() {
                        text.push_str(&format!("Speaker notes: {}\n", notes.join(" ")));
                    }
                }
                if !text.trim().is_empty() {
                    blocks.push(TextBlock { text: text.trim().to_string(), page: Some(slide), section: Some(label) });
                }
            }
        }
        undoc::FormatType::Xlsx => {
            for section in &document.sections {
                let sheet = section.name.clone().unwrap_or_else(|| format!("Sheet {}", section.index + 1));
                for block in &section.content {
                    if let undoc::model::Block::Table(table) = block {
                        let (rows, header) = cells(table);
                        let place = |first: usize, last: usize| if first == last { format!("{sheet} › row {}", first + 1) } else { format!("{sheet} › rows {}–{}", first + 1, last + 1) };
                        blocks.extend(table_blocks(&rows, header, None, &place));
                    }
                }
            }
        }
        other => return Err(ParseError::Unsupported(format!("{other:?}"))),
    }
    Ok((blocks, title))
}

/// CSV or TSV with a header row; each row as `Header: value`.
pub(crate) fn delimited(bytes: &[u8], delimiter: u8) -> Result<Vec<TextBlock>, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ParseError::NotUtf8)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).has_headers(false).flexible(true).from_reader(text.as_bytes());
    let mut rows: Vec<Vec<String>> = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| ParseError::Corrupt(e.to_string()))?;
        rows.push(record.iter().map(str::to_string).collect());
    }
    let header = (rows.len() > 1).then_some(0);
    Ok(table_blocks(&rows, header, None, &|first, last| if first == last { format!("row {}", first + 1) } else { format!("rows {}–{}", first + 1, last + 1) }))
}

/// JSON as `key.path: value` lines, grouped under each top-level key (or array item).
pub(crate) fn json(bytes: &[u8]) -> Result<Vec<TextBlock>, ParseError> {
    // serde_json refuses nesting deeper than 128 by itself.
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| ParseError::Corrupt(format!("not valid JSON: {e}")))?;
    let mut leaves: Vec<(String, String)> = Vec::new();
    flatten(&value, String::new(), &mut leaves);
    let mut blocks: Vec<TextBlock> = Vec::new();
    let top = |path: &str| path.split(['.', '[']).next().unwrap_or_default().to_string();
    for (path, leaf) in leaves {
        let section = top(&path);
        let line = if path.is_empty() { leaf } else { format!("{path}: {leaf}") };
        match blocks.last_mut() {
            Some(block) if block.section.as_deref() == Some(section.as_str()) && block.text.len() + line.len() < BLOCK_CHARS => {
                block.text.push('\n');
                block.text.push_str(&line);
            }
            _ => blocks.push(TextBlock { text: line, page: None, section: (!section.is_empty()).then_some(section) }),
        }
    }
    Ok(blocks)
}

fn flatten(value: &serde_json::Value, path: String, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                let next = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                flatten(child, next, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                flatten(child, format!("{path}[{i}]"), out);
            }
        }
        serde_json::Value::String(s) => out.push((path, s.clone())),
        serde_json::Value::Null => {}
        other => out.push((path, other.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_carry_their_header_and_their_row_numbers() {
        let blocks = delimited(b"name,port,notes\nconsole,7341,\"main, admin\"\nbackup,7342,\n", b',').unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].text, "name: console; port: 7341; notes: main, admin\nname: backup; port: 7342");
        assert_eq!(blocks[0].section.as_deref(), Some("rows 2–3"));
        let tsv = delimited(b"a\tb\n1\t2\n", b'\t').unwrap();
        assert_eq!(tsv[0].text, "a: 1; b: 2");
    }

    #[test]
    fn large_tables_are_cut_into_blocks_of_rows() {
        let mut csv = String::from("id,value\n");
        for i in 0..60 {
            csv.push_str(&format!("{i},v{i}\n"));
        }
        let blocks = delimited(csv.as_bytes(), b',').unwrap();
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[1].section.as_deref(), Some("rows 27–51"));
        assert!(blocks[1].text.starts_with("id: 25; value: v25"));
    }

    #[test]
    fn json_leaves_keep_their_key_paths() {
        let blocks = json(br#"{"server": {"port": 7341, "hosts": ["a", "b"]}, "owner": "ops", "none": null}"#).unwrap();
        let all: Vec<(&str, &str)> = blocks.iter().map(|b| (b.section.as_deref().unwrap(), b.text.as_str())).collect();
        assert_eq!(all, [("server", "server.port: 7341\nserver.hosts[0]: a\nserver.hosts[1]: b"), ("owner", "owner: ops")]);
        assert!(matches!(json(b"{not json").unwrap_err(), ParseError::Corrupt(_)));
    }

    #[test]
    fn office_files_that_are_not_zips_or_are_encrypted_get_clear_errors() {
        assert!(matches!(office(b"plain words").unwrap_err(), ParseError::Corrupt(_)));
        assert_eq!(office(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1, 0, 0]).unwrap_err(), ParseError::Encrypted);
    }

    #[test]
    fn a_zip_bomb_is_refused_from_its_declared_sizes() {
        use std::io::Write;
        let mut buffer = std::io::Cursor::new(Vec::new());
        {
            let mut writer = zip::ZipWriter::new(&mut buffer);
            let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            for i in 0..3 {
                writer.start_file(format!("word/part{i}.xml"), options).unwrap();
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..200 {
                    writer.write_all(&zeros).unwrap();
                }
            }
            writer.finish().unwrap();
        }
        let bytes = buffer.into_inner();
        assert!(bytes.len() < 2 << 20, "the bomb is small: {}", bytes.len());
        assert_eq!(office(&bytes).unwrap_err(), ParseError::TooLarge(MAX_UNZIPPED as usize));
    }
}
