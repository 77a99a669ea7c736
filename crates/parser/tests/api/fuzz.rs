//! A bounded fuzz run of every format's extractor, in CI on every change: seeded
//! mutations (bytes flipped, cut, repeated, deleted, syntax inserted; for the ZIP-based
//! formats, the XML inside mutated and zipped again) of small valid files of each
//! format, each extracted in-process. Every case must end, within its limit, in text or
//! in a `ParseError`; a panic in our own code fails the run. A panic inside a
//! third-party parser is what the parse workers contain (one job fails, see
//! `isolate.rs`); such panics are printed, with the case to replay, not failed on.
//! The long, coverage-guided runs are the cargo-fuzz targets in `fuzz/`.

use std::cell::RefCell;
use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parser::Format;

/// Cases per seed: 17 seeds × this, a few seconds in all on two cores.
const CASES: u64 = 400;
/// A case that takes longer has hung (the seeds parse in milliseconds).
const CASE_LIMIT: Duration = Duration::from_secs(20);

enum Seed {
    Raw(Vec<u8>),
    /// A ZIP package: its entries, mutated one by one before zipping.
    Zip(Vec<(&'static str, String)>),
    /// A PDF's objects, one mutated before the file (and its cross-reference table)
    /// is written: past the xref check, into the object and outline readers.
    Pdf(Vec<String>),
}

fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut file = std::io::Cursor::new(Vec::new());
    {
        let mut writer = zip::ZipWriter::new(&mut file);
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            writer.start_file(*name, options).unwrap();
            writer.write_all(bytes).unwrap();
        }
        writer.finish().unwrap();
    }
    file.into_inner()
}

/// `[Content_Types].xml` naming the package's main parts.
fn content_types(parts: &[(&str, &str)]) -> String {
    let overrides: String = parts.iter().map(|(part, kind)| format!(r#"<Override PartName="/{part}" ContentType="application/vnd.openxmlformats-officedocument.{kind}+xml"/>"#)).collect();
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>{overrides}</Types>"#
    )
}

fn package_rels(target: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="{target}"/></Relationships>"#
    )
}

/// A small valid file of each format: headings, paragraphs, a table, a list.
fn seeds() -> Vec<(Format, Seed)> {
    let text = "Pump manual\n\nInstall the pump before the valve. Torque: 12 Nm.\n".to_string();
    vec![
        (Format::Text, Seed::Raw(text.into_bytes())),
        (Format::Markdown, Seed::Raw(b"# Pumps\n\nInstall the *pump*.\n\n## Valves\n\n- one\n- two\n\n| Part | Torque |\n|---|---|\n| Valve | 12 Nm |\n\n```\ncode\n```\n".to_vec())),
        (
            Format::Html,
            Seed::Raw(b"<!doctype html><html><head><title>Pumps</title><script>x()</script></head><body><nav>menu</nav><h1>Pumps</h1><p>Install the <b>pump</b>.</p><h2>Valves</h2><table><tr><th>Part</th><th>Torque</th></tr><tr><td>Valve</td><td>12 Nm</td></tr></table><ul><li>one</li></ul></body></html>".to_vec()),
        ),
        (Format::Pdf, Seed::Raw(super::text_pdf("Install the pump before the valve."))),
        (Format::Pdf, Seed::Pdf(super::text_pdf_objects("Install the pump before the valve."))),
        (Format::Pdf, Seed::Pdf(super::outlined_pdf_objects())),
        (Format::Csv, Seed::Raw(b"part,torque,note\nvalve,12,\"tight, dry\"\npump,30,\n".to_vec())),
        (Format::Tsv, Seed::Raw(b"part\ttorque\nvalve\t12\npump\t30\n".to_vec())),
        (Format::Json, Seed::Raw(br#"{"pump": {"torque": 12, "parts": ["valve", "seal"], "note": "Install first"}, "ok": true, "n": null}"#.to_vec())),
        (Format::Rtf, Seed::Raw(br"{\rtf1\ansi{\fonttbl{\f0 Times;}}{\b Pumps}\par Install the pump caf\'e9.\par{\*\ignored x}\u233?t\par}".to_vec())),
        (
            Format::Docx,
            Seed::Zip(vec![
                ("[Content_Types].xml", content_types(&[("word/document.xml", "wordprocessingml.document.main")])),
                ("_rels/.rels", package_rels("word/document.xml")),
                (
                    "word/document.xml",
                    r#"<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:pPr><w:pStyle w:val="Heading1"/></w:pPr><w:r><w:t>Pumps</w:t></w:r></w:p><w:p><w:r><w:t xml:space="preserve">Install the pump. </w:t></w:r><w:r><w:rPr><w:b/></w:rPr><w:t>Carefully.</w:t></w:r></w:p><w:tbl><w:tr><w:tc><w:p><w:r><w:t>Part</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>Torque</w:t></w:r></w:p></w:tc></w:tr><w:tr><w:tc><w:p><w:r><w:t>Valve</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>12 Nm</w:t></w:r></w:p></w:tc></w:tr></w:tbl></w:body></w:document>"#.into(),
                ),
            ]),
        ),
        (
            Format::Xlsx,
            Seed::Zip(vec![
                ("[Content_Types].xml", content_types(&[("xl/workbook.xml", "spreadsheetml.sheet.main"), ("xl/worksheets/sheet1.xml", "spreadsheetml.worksheet")])),
                ("_rels/.rels", package_rels("xl/workbook.xml")),
                (
                    "xl/workbook.xml",
                    r#"<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"><sheets><sheet name="Parts" sheetId="1" r:id="rId1"/></sheets></workbook>"#.into(),
                ),
                (
                    "xl/_rels/workbook.xml.rels",
                    r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>"#.into(),
                ),
                (
                    "xl/worksheets/sheet1.xml",
                    r#"<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData><row r="1"><c r="A1" t="inlineStr"><is><t>Part</t></is></c><c r="B1" t="inlineStr"><is><t>Torque</t></is></c></row><row r="2"><c r="A2" t="inlineStr"><is><t>Valve</t></is></c><c r="B2"><f>6*2</f><v>12</v></c></row></sheetData></worksheet>"#.into(),
                ),
            ]),
        ),
        (
            Format::Pptx,
            Seed::Zip(vec![
                ("[Content_Types].xml", content_types(&[("ppt/presentation.xml", "presentationml.presentation.main"), ("ppt/slides/slide1.xml", "presentationml.slide")])),
                ("_rels/.rels", package_rels("ppt/presentation.xml")),
                (
                    "ppt/presentation.xml",
                    r#"<?xml version="1.0" encoding="UTF-8"?><p:presentation xmlns:p="http://schemas.openxmlformats.org/presentationml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"><p:sldIdLst><p:sldId id="256" r:id="rId2"/></p:sldIdLst></p:presentation>"#.into(),
                ),
                (
                    "ppt/_rels/presentation.xml.rels",
                    r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId2" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/slide" Target="slides/slide1.xml"/></Relationships>"#.into(),
                ),
                (
                    "ppt/slides/slide1.xml",
                    r#"<?xml version="1.0" encoding="UTF-8"?><p:sld xmlns:p="http://schemas.openxmlformats.org/presentationml/2006/main" xmlns:a="http://schemas.openxmlformats.org/drawingml/2006/main"><p:cSld><p:spTree><p:sp><p:nvSpPr><p:nvPr><p:ph type="title"/></p:nvPr></p:nvSpPr><p:txBody><a:p><a:r><a:t>Pumps</a:t></a:r></a:p></p:txBody></p:sp><p:sp><p:txBody><a:p><a:r><a:t>Install the pump.</a:t></a:r></a:p></p:txBody></p:sp></p:spTree></p:cSld></p:sld>"#.into(),
                ),
            ]),
        ),
        (
            Format::Odt,
            Seed::Zip(vec![
                ("mimetype", "application/vnd.oasis.opendocument.text".into()),
                (
                    "content.xml",
                    r#"<?xml version="1.0" encoding="UTF-8"?><office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0"><office:body><office:text><text:h text:outline-level="1">Pumps</text:h><text:p>Install the <text:span>pump</text:span>.</text:p><table:table><table:table-row><table:table-cell><text:p>Valve</text:p></table:table-cell><table:table-cell><text:p>12 Nm</text:p></table:table-cell></table:table-row></table:table></office:text></office:body></office:document-content>"#.into(),
                ),
            ]),
        ),
        (
            Format::Ods,
            Seed::Zip(vec![
                ("mimetype", "application/vnd.oasis.opendocument.spreadsheet".into()),
                (
                    "META-INF/manifest.xml",
                    r#"<?xml version="1.0" encoding="UTF-8"?><manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2"><manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/><manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/></manifest:manifest>"#.into(),
                ),
                (
                    "content.xml",
                    r#"<?xml version="1.0" encoding="UTF-8"?><office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0"><office:body><office:spreadsheet><table:table table:name="Parts"><table:table-row><table:table-cell office:value-type="string"><text:p>Part</text:p></table:table-cell><table:table-cell office:value-type="string"><text:p>Torque</text:p></table:table-cell></table:table-row><table:table-row table:number-rows-repeated="2"><table:table-cell office:value-type="string"><text:p>Valve</text:p></table:table-cell><table:table-cell office:value-type="float" office:value="12"><text:p>12</text:p></table:table-cell></table:table-row></table:table></office:spreadsheet></office:body></office:document-content>"#.into(),
                ),
            ]),
        ),
        (
            Format::Epub,
            Seed::Zip(vec![
                ("mimetype", "application/epub+zip".into()),
                (
                    "META-INF/container.xml",
                    r#"<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles></container>"#.into(),
                ),
                (
                    "OEBPS/content.opf",
                    r#"<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:identifier id="id">pumps</dc:identifier><dc:title>Pumps</dc:title><dc:language>en</dc:language></metadata><manifest><item id="c1" href="chapter.xhtml" media-type="application/xhtml+xml"/><item id="nav" href="nav.xhtml" media-type="application/xhtml+xml" properties="nav"/></manifest><spine><itemref idref="c1"/></spine></package>"#.into(),
                ),
                ("OEBPS/nav.xhtml", r#"<html xmlns="http://www.w3.org/1999/xhtml" xmlns:epub="http://www.idpf.org/2007/ops"><body><nav epub:type="toc"><ol><li><a href="chapter.xhtml">Pumps</a></li></ol></nav></body></html>"#.into()),
                ("OEBPS/chapter.xhtml", r#"<html xmlns="http://www.w3.org/1999/xhtml"><head><title>Pumps</title></head><body><h1>Pumps</h1><p>Install the pump.</p></body></html>"#.into()),
            ]),
        ),
    ]
}

/// xorshift64*: the same cases on every run, any case replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

/// Fragments of the formats' own syntax, so mutations reach past the first check.
const TOKENS: [&[u8]; 24] = [
    b"<", b">", b"&", b"&amp;", b"\"", b"{", b"}", b"[", b"]", b"\\", b"\0", "\u{FFFD}".as_bytes(), b"((((", b"<<", b">>", b" 0 R", b"obj", b"endobj",
    b"9999999999", b"-1", "é".as_bytes(), b"<!ENTITY x \"xx\">", b"\\u65535?", b"]]>",
];

fn mutate(bytes: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(5) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    if !bytes.is_empty() {
                        let i = rng.below(bytes.len());
                        bytes[i] = rng.next() as u8;
                    }
                }
            }
            1 => bytes.truncate(at),
            2 => {
                let len = rng.below(64).min(bytes.len() - at.min(bytes.len()));
                let copy: Vec<u8> = bytes[at..at + len].to_vec();
                let to = rng.below(bytes.len() + 1);
                bytes.splice(to..to, copy.iter().copied().cycle().take(len * (1 + rng.below(8))));
            }
            3 => {
                let len = rng.below(32).min(bytes.len() - at.min(bytes.len()));
                bytes.drain(at..at + len);
            }
            _ => {
                let token = TOKENS[rng.below(TOKENS.len())];
                bytes.splice(at..at, token.iter().copied());
            }
        }
    }
}

fn case(seed: &Seed, rng: &mut Rng) -> Vec<u8> {
    match seed {
        Seed::Raw(bytes) => {
            let mut bytes = bytes.clone();
            mutate(&mut bytes, rng);
            bytes
        }
        Seed::Zip(entries) => {
            let mut entries: Vec<(&str, Vec<u8>)> = entries.iter().map(|(name, text)| (*name, text.as_bytes().to_vec())).collect();
            let pick = rng.below(entries.len());
            mutate(&mut entries[pick].1, rng);
            if rng.below(4) == 0 {
                entries.remove(rng.below(entries.len()));
            }
            let mut zipped = zip_of(&entries);
            // Now and then the container itself.
            if rng.below(5) == 0 {
                mutate(&mut zipped, rng);
            }
            zipped
        }
        Seed::Pdf(objects) => {
            let mut objects: Vec<Vec<u8>> = objects.iter().map(|o| o.as_bytes().to_vec()).collect();
            for _ in 0..1 + rng.below(2) {
                let pick = rng.below(objects.len());
                mutate(&mut objects[pick], rng);
            }
            super::pdf_with_streams(&objects)
        }
    }
}

thread_local! {
    /// Where the last panic on this thread happened (fuzz case threads only).
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

const CASE_THREAD: &str = "parser-fuzz-case";

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(CASE_THREAD) {
                let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
                PANIC_AT.with(|cell| *cell.borrow_mut() = Some(format!("{at}: {}", info.payload_as_str().unwrap_or("(no message)"))));
            } else {
                previous(info);
            }
        }));
    });
}

enum Outcome {
    Text,
    /// What the user is told.
    Refused(String),
    /// Where it panicked, and why.
    Panicked(String),
}

fn run_case(format: Format, bytes: Vec<u8>) -> Option<Outcome> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(CASE_THREAD.into())
        .spawn(move || {
            let outcome = match std::panic::catch_unwind(|| parser::extract(format, &bytes)) {
                Ok(Ok(parsed)) => {
                    assert!(parsed.blocks.iter().all(|b| !b.text.trim().is_empty()), "a text block with no text");
                    Outcome::Text
                }
                Ok(Err(error)) => Outcome::Refused(error.to_string()),
                Err(_) => Outcome::Panicked(PANIC_AT.with(|cell| cell.borrow_mut().take()).unwrap_or_default()),
            };
            let _ = tx.send(outcome);
        })
        .unwrap();
    rx.recv_timeout(CASE_LIMIT).ok()
}

/// Our code: the workspace's crates (a panic's location is the caller's for
/// `unwrap`, indexing and the like, so an unchecked slice in `parser` is found here).
fn ours(location: &str) -> bool {
    !location.contains("/.cargo/registry/") && !location.contains("/rustc/") && !location.starts_with("/rustc")
}

#[test]
fn every_extractor_survives_mutated_files_with_a_clear_outcome() {
    install_panic_hook();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut contained = Vec::new();
    let mut tally = std::collections::BTreeMap::<String, [usize; 3]>::new();
    for (n, (format, seed)) in seeds().into_iter().enumerate() {
        // The unmutated seed is read (or, for a few, refused clearly: a minimal package
        // may lack a part a library insists on).
        let seed_bytes = case(&seed, &mut Rng(1)).len();
        assert!(seed_bytes > 0);
        for i in 0..CASES {
            let case_seed = 0x9E37_79B9_7F4A_7C15 ^ ((n as u64) << 32 | i);
            let bytes = case(&seed, &mut Rng(case_seed));
            let row = tally.entry(format.as_str().to_string()).or_default();
            match run_case(format, bytes) {
                None => failures.push(format!("{} case {case_seed:#x}: no outcome within {CASE_LIMIT:?}", format.as_str())),
                Some(Outcome::Text) => row[0] += 1,
                Some(Outcome::Refused(message)) => {
                    row[1] += 1;
                    if message.trim().is_empty() {
                        failures.push(format!("{} case {case_seed:#x}: refused without a reason", format.as_str()));
                    }
                }
                Some(Outcome::Panicked(at)) => {
                    row[2] += 1;
                    let case = format!("{} case {case_seed:#x}", format.as_str());
                    if ours(&at) { failures.push(format!("{case}: {at}")) } else { contained.push((case, at)) }
                }
            }
        }
    }
    for (format, [text, refused, panicked]) in &tally {
        println!("{format}: {text} read, {refused} refused, {panicked} panicked in a library (contained by the workers)");
    }
    // Grouped by where the library panicked, with one case to replay.
    let mut by_place = std::collections::BTreeMap::<&str, (usize, &str)>::new();
    for (case, at) in &contained {
        let place = at.split(": ").next().unwrap_or_default();
        by_place.entry(place).or_insert((0, case)).0 += 1;
    }
    for (place, (n, case)) in by_place {
        println!("contained: {n} panics at {place} (e.g. {case})");
    }
    println!("{} cases in {:.1} s", tally.values().map(|r| r.iter().sum::<usize>()).sum::<usize>(), started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn the_seeds_themselves_are_read() {
    for (format, seed) in seeds() {
        let bytes = match &seed {
            Seed::Raw(bytes) => bytes.clone(),
            Seed::Zip(entries) => zip_of(&entries.iter().map(|(n, t)| (*n, t.as_bytes().to_vec())).collect::<Vec<_>>()),
            Seed::Pdf(objects) => super::pdf_of(objects),
        };
        let parsed = parser::extract(format, &bytes).unwrap_or_else(|e| panic!("{}: {e}", format.as_str()));
        let text: String = parsed.blocks.iter().map(|b| b.text.as_str()).collect::<Vec<_>>().join("\n");
        assert!(text.contains("ump") || text.contains("Install") || text.contains("Part"), "{}: {text}", format.as_str());
    }
}
