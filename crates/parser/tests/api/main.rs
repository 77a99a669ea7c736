//! The parser service over HTTP, started by its real `run` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::ParsedDocument;
use echod::testing::TestEcho;

mod fuzz;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parses_markdown_and_refuses_what_it_cannot_read() {
    let echo = TestEcho::start().await;
    let peers = echo.peers_as(ServiceName::Ingest);
    let send = |query: &'static str, body: &'static [u8]| {
        let peers = peers.clone();
        async move {
            let request = peers.request(ServiceName::Parser, reqwest::Method::POST, query, None).await.unwrap().body(body);
            peers.send(ServiceName::Parser, request).await
        }
    };
    let parsed: ParsedDocument = send("/v1/parse?content_type=text/markdown&filename=a.md", b"# Title\n\nBody text.").await.unwrap().json().await.unwrap();
    assert_eq!(parsed.format, "markdown");
    assert_eq!(parsed.blocks[0].section.as_deref(), Some("Title"));
    let unsupported = send("/v1/parse?content_type=application/x-msdownload&filename=setup.exe", b"MZ\x90\0\x03\0\0\0").await.unwrap_err();
    assert_eq!(unsupported.code, "parser.unsupported_type");
    let corrupt = send("/v1/parse?content_type=application/pdf&filename=a.pdf", b"%PDF-1.7 broken").await.unwrap_err();
    assert_eq!(corrupt.code, "parser.corrupt");
    let empty = send("/v1/parse?content_type=text/plain&filename=a.txt", b"").await.unwrap_err();
    assert_eq!(empty.code, "parser.empty");
    echo.stop().await;
}

/// The Python with the Office writers (`.ci/run` installs them), or `None` after saying
/// why the test is skipped; under CI their absence fails the test.
fn office_writers() -> Option<String> {
    let python = std::env::var("ECHO_INTEROP_PYTHON").ok().filter(|p| {
        std::process::Command::new(p).args(["-c", "import docx, openpyxl, pptx, odf, ebooklib"]).output().is_ok_and(|o| o.status.success())
    });
    if python.is_none() {
        let reason = "python-docx, openpyxl, python-pptx, odfpy and EbookLib are not installed (ECHO_INTEROP_PYTHON; .ci/run installs them)";
        assert!(std::env::var_os("CI").is_none(), "CI must run the Office golden test: {reason}");
        println!("SKIPPED: {reason}");
    }
    python
}

#[test]
fn office_files_written_by_their_own_tools_keep_their_structure() {
    let Some(python) = office_writers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/make_office.py");
    let made = std::process::Command::new(python).arg(script).arg(dir.path()).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let blocks = |doc: &ParsedDocument| doc.blocks.iter().map(|b| (b.page, b.section.clone().unwrap_or_default(), b.text.clone())).collect::<Vec<_>>();

    // Word: headings become section paths, list items stay items, table rows carry their header.
    let word = parser::extract(parser::Format::Docx, &read("handbook.docx")).unwrap();
    assert_eq!(word.title.as_deref(), Some("Reactor handbook"));
    let word = blocks(&word);
    let find = |all: &[(Option<u32>, String, String)], needle: &str| all.iter().find(|(_, _, t)| t.contains(needle)).cloned().unwrap_or_else(|| panic!("{needle} in {all:#?}"));
    assert_eq!(find(&word, "port 7341").1, "Reactor handbook > Console");
    assert!(find(&word, "port 7341").2.contains("- Check the console logs every morning"), "{word:#?}");
    let shifts = find(&word, "Shift: Morning");
    assert_eq!(shifts.2, "Shift: Morning; Lead: Ana; Starts: 06:00\nShift: Night; Lead: Ivo; Starts: 22:00");
    assert_eq!(shifts.1, "Reactor handbook > Shifts › table rows 2–3");
    assert_eq!(find(&word, "tangerine-42").1, "Reactor handbook > Shifts > Launch");
    assert!(!word.iter().any(|(_, _, t)| t.trim() == "Shifts"), "a heading over only a table is no chunk of its own: {word:#?}");

    // PowerPoint: one block per slide, the slide number as the page, its title, notes.
    let deck = parser::extract(parser::Format::Pptx, &read("briefing.pptx")).unwrap();
    assert_eq!(deck.n_pages, Some(2));
    let deck = blocks(&deck);
    let first = find(&deck, "Revenue grew by 12 percent");
    assert_eq!((first.0, first.1.as_str()), (Some(1), "Slide 1: Quarterly review"));
    assert!(first.2.contains("Speaker notes: Mention the new office in Porto."), "{first:?}");
    let budget = find(&deck, "Team: Research");
    assert_eq!(budget.0, Some(2));
    assert!(budget.2.contains("Team: Research; Budget: 1.2M") && budget.2.contains("Team: Support; Budget: 0.4M"), "{budget:?}");

    // Excel: the sheet and rows as the location, the header carried into each row.
    let book = blocks(&parser::extract(parser::Format::Xlsx, &read("inventory.xlsx")).unwrap());
    let parts = find(&book, "Part: valve");
    assert_eq!(parts.1, "Parts › rows 2–3");
    assert_eq!(parts.2, "Part: valve; Count: 4; Unit price: 12.5\nPart: pump; Count: 2; Unit price: 240");
    assert_eq!(find(&book, "Nordflow").2, "Supplier: Nordflow; City: Bergen");
    assert_eq!(find(&book, "Nordflow").1, "Suppliers › row 2");

    // OpenDocument text (odfpy): the same structure, a footnote after its paragraph,
    // entities and `text:s` spaces read as text.
    let odt = parser::extract(parser::Format::Odt, &read("handbook.odt")).unwrap();
    assert_eq!(odt.title.as_deref(), Some("Reactor handbook"));
    let odt = blocks(&odt);
    let console = find(&odt, "port 7341");
    assert_eq!(console.1, "Reactor handbook > Console");
    assert!(console.2.contains("The reactor console listens on port 7341. (Note 1: Port 7341 is fixed in firmware.)"), "{console:?}");
    assert!(console.2.contains("Keys & logs <daily>"), "{console:?}");
    assert!(console.2.contains("- Check the console logs every morning\n\n- Rotate the console keys every spring"), "{console:?}");
    let shifts = find(&odt, "Shift: Morning");
    assert_eq!(shifts.1, "Reactor handbook > Shifts › table rows 2–3");
    assert_eq!(shifts.2, "Shift: Morning; Lead: Ana; Starts: 06:00\nShift: Night; Lead: Ivo; Starts: 22:00");
    assert_eq!(find(&odt, "tangerine-42").1, "Reactor handbook > Shifts > Launch");
    assert!(!odt.iter().any(|(_, _, t)| t.trim() == "Shifts"), "{odt:#?}");

    // OpenDocument spreadsheet: cached values of formulas, never the formulas.
    let sheet = blocks(&parser::extract(parser::Format::Ods, &read("inventory.ods")).unwrap());
    let parts = find(&sheet, "Part: valve");
    assert_eq!(parts.1, "Parts › rows 2–3");
    assert_eq!(parts.2, "Part: valve; Count: 4; Unit price: 12.5; Total: 50\nPart: pump; Count: 2; Unit price: 240; Total: 480");
    assert!(!sheet.iter().any(|(_, _, t)| t.contains("of:=")), "{sheet:#?}");
    assert_eq!(find(&sheet, "Nordflow").1, "Suppliers › row 2");

    // EPUB (EbookLib): chapters in reading order, each under its label from the contents.
    let book = parser::extract(parser::Format::Epub, &read("guide.epub")).unwrap();
    assert_eq!(book.title.as_deref(), Some("Operator guide"));
    let book = blocks(&book);
    assert_eq!(find(&book, "starts at 06:00").1, "Getting started > First shift");
    assert_eq!(find(&book, "amber lever").1, "Emergencies");
    let order: Vec<usize> = ["north console", "06:00", "amber lever"].iter().map(|n| book.iter().position(|(_, _, t)| t.contains(n)).unwrap()).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "reading order: {book:#?}");
}

/// RTF as WordPad writes it: a font table, escaped accents (`\'e9`, `\u8217?`), paragraphs.
#[test]
fn rtf_text_keeps_its_accents_and_paragraphs() {
    let rtf = br"{\rtf1\ansi\ansicpg1252\deff0{\fonttbl{\f0\fnil\fcharset0 Calibri;}}
{\*\generator Riched20 10.0.19041}\viewkind4\uc1
\pard\sa200\sl276\slmult1\f0\fs22\lang9 Caf\'e9 menu\par
The reactor\u8217?s console listens on port 7341.\par
}";
    let doc = parser::extract(parser::Format::Rtf, rtf).unwrap();
    let text: String = doc.blocks.iter().map(|b| b.text.clone()).collect();
    assert!(text.contains("Café menu"), "{text:?}");
    assert!(text.contains("reactor’s console listens on port 7341."), "{text:?}");
    assert!(!text.contains("Calibri") && !text.contains("Riched20"), "no header text: {text:?}");
    assert!(matches!(parser::extract(parser::Format::Rtf, b"{\\rtf1 {\\b unclosed"), Ok(_) | Err(parser::ParseError::Corrupt(_) | parser::ParseError::NoText)));
    assert!(matches!(parser::extract(parser::Format::Rtf, b"plain words"), Err(parser::ParseError::Corrupt(_))));
}

/// A one-page PDF saying `line` in 28-point Helvetica, with a correct cross-reference table.
fn text_pdf(line: &str) -> Vec<u8> {
    pdf_of(&text_pdf_objects(line))
}

fn text_pdf_objects(line: &str) -> Vec<String> {
    let content = format!("BT /F1 28 Tf 60 700 Td ({line}) Tj ET");
    vec![
        "<< /Type /Catalog /Pages 2 0 R >>".into(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".into(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".into(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".into(),
    ]
}

/// Three pages under an outline of explicit, named and string destinations, whose last
/// entry's /Next leads back to the first.
fn outlined_pdf() -> Vec<u8> {
    pdf_of(&outlined_pdf_objects())
}

fn outlined_pdf_objects() -> Vec<String> {
    let page = |lines: &[&str]| {
        let shown: Vec<String> = lines.iter().map(|l| format!("({l}) Tj 0 -24 Td")).collect();
        let content = format!("BT /F1 14 Tf 60 700 Td {} ET", shown.join(" "));
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len())
    };
    vec![
        "<< /Type /Catalog /Pages 2 0 R /Outlines 9 0 R /Dests 14 0 R /Names << /Dests 13 0 R >> >>".into(),
        "<< /Type /Pages /Kids [3 0 R 4 0 R 5 0 R] /Count 3 >>".into(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 6 0 R /Resources << /Font << /F1 15 0 R >> >> >>".into(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 7 0 R /Resources << /Font << /F1 15 0 R >> >> >>".into(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 8 0 R /Resources << /Font << /F1 15 0 R >> >> >>".into(),
        page(&["Chapter One", "The first words of the manual."]),
        page(&["More words of chapter one.", "Setting Up the Pump", "Install the pump before the valve."]),
        page(&["Chapter Two", "The end of it all."]),
        "<< /Type /Outlines /First 10 0 R /Last 12 0 R /Count 3 >>".into(),
        // An explicit destination; a child with a named one (the /Dests dictionary);
        // a UTF-16 title opening a string destination (the /Names tree) through a GoTo
        // action, whose /Next leads back to the first entry: a cycle the walk must end.
        "<< /Title (Chapter One) /Parent 9 0 R /Next 12 0 R /First 11 0 R /Last 11 0 R /Dest [3 0 R /Fit] >>".into(),
        "<< /Title (Setting Up the Pump) /Parent 10 0 R /Dest /setup >>".into(),
        "<< /Title <FEFF0043006800610070007400650072002000540077006F> /Parent 9 0 R /Prev 10 0 R /Next 10 0 R /A << /S /GoTo /D (two) >> >>".into(),
        "<< /Names [(two) [5 0 R /Fit]] >>".into(),
        "<< /setup [4 0 R /XYZ 0 700 0] >>".into(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".into(),
    ]
}

#[test]
fn a_pdf_outline_gives_each_page_its_heading_path() {
    let parsed = parser::extract(parser::Format::Pdf, &outlined_pdf()).unwrap();
    let blocks: Vec<(Option<u32>, Option<&str>, &str)> = parsed.blocks.iter().map(|b| (b.page, b.section.as_deref(), b.text.lines().next().unwrap_or_default())).collect();
    assert_eq!(
        blocks,
        vec![
            (Some(1), Some("Chapter One"), "Chapter One"),
            (Some(2), Some("Chapter One"), "More words of chapter one."),
            (Some(2), Some("Chapter One > Setting Up the Pump"), "Setting Up the Pump"),
            (Some(3), Some("Chapter Two"), "Chapter Two"),
        ],
        "{:#?}",
        parsed.blocks
    );
    assert_eq!(parsed.n_pages, Some(3));
}

/// A one-page PDF of 10-point Helvetica lines, each `(x, y, text)` in its own text
/// object, in the order given (the content stream's order).
fn placed_pdf(lines: &[(u32, u32, String)]) -> Vec<u8> {
    let shown: Vec<String> = lines.iter().map(|(x, y, text)| format!("BT /F1 10 Tf {x} {y} Td ({text}) Tj ET")).collect();
    let content = shown.join("\n");
    pdf_of(&[
        "<< /Type /Catalog /Pages 2 0 R >>".into(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".into(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".into(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".into(),
    ])
}

fn pdf_text(bytes: &[u8]) -> String {
    parser::extract(parser::Format::Pdf, bytes).unwrap().blocks.iter().map(|b| b.text.as_str()).collect::<Vec<_>>().join("\n")
}

#[test]
fn two_columns_are_read_one_after_the_other_whatever_the_stream_order() {
    // Prose lines of about 40 characters: 10-point Helvetica fills ~200 of the 230
    // points each column has (left at 50, right at 330).
    // The first left line is longer than the others and reaches into the gutter (it
    // must stay in its column, not take the right column's first line with it).
    let line = |column: &str, i: u32| {
        let longer = if column == "Left" && i == 0 { " too" } else { "" };
        format!("{column} column sentence number {i:02} reads on here{longer}")
    };
    let title = (50, 740, "Two Columns of Prose in One Page Title Across Both Of Them".to_string());
    let mut interleaved = vec![title.clone()];
    let mut column_major = vec![title];
    for i in 0..24 {
        interleaved.push((50, 700 - 14 * i, line("Left", i)));
        interleaved.push((330, 700 - 14 * i, line("Right", i)));
    }
    column_major.extend((0..24).map(|i| (50, 700 - 14 * i, line("Left", i))));
    column_major.extend((0..24).map(|i| (330, 700 - 14 * i, line("Right", i))));
    let expected: Vec<String> = (0..24).map(|i| line("Left", i)).chain((0..24).map(|i| line("Right", i))).collect();
    for (name, lines) in [("interleaved", interleaved), ("column after column", column_major)] {
        let text = pdf_text(&placed_pdf(&lines));
        let read: Vec<&str> = text.lines().map(str::trim).filter(|l| l.contains("column sentence")).collect();
        assert_eq!(read, expected, "{name}: {text}");
        assert!(text.trim_start().starts_with("Two Columns of Prose"), "{name}: the title across both columns comes first: {text}");
    }

    // A two-column table — short names beside long descriptions — keeps its rows.
    let mut table = Vec::new();
    for i in 0..24 {
        table.push((50, 700 - 14 * i, format!("name{i:02}")));
        table.push((330, 700 - 14 * i, format!("Description of entry {i:02} which runs on and on")));
    }
    let text = pdf_text(&placed_pdf(&table));
    let rows: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 24, "{text}");
    for (i, row) in rows.iter().enumerate() {
        assert!(row.starts_with(&format!("name{i:02}")) && row.ends_with(&format!("entry {i:02} which runs on and on")), "row {i}: {row:?}");
    }
}

fn pdf_of(objects: &[String]) -> Vec<u8> {
    pdf_with_streams(&objects.iter().map(|o| o.as_bytes().to_vec()).collect::<Vec<_>>())
}

fn pdf_with_streams(objects: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend(object);
        out.extend(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for offset in offsets {
        out.extend(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend(format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).as_bytes());
    out
}

/// `pdftoppm` and `tesseract`, or `None` after saying why the test is skipped; under CI
/// (where `.ci/run` installs them) their absence fails the test.
fn ocr_tools() -> bool {
    let present = ["pdftoppm", "tesseract"].iter().all(|p| std::process::Command::new(p).arg("-v").output().is_ok());
    if !present {
        let reason = "tesseract-ocr and poppler-utils are not installed (apt-get install tesseract-ocr poppler-utils; .ci/run does)";
        assert!(std::env::var_os("CI").is_none(), "CI must run the OCR test: {reason}");
        println!("SKIPPED: {reason}");
    }
    present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_and_scanned_pdfs_are_read_by_ocr() {
    if !ocr_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let typed = text_pdf("The reactor console listens on port 7341.");
    std::fs::write(dir.path().join("typed.pdf"), &typed).unwrap();
    // The page as a picture (PNG), and as raw grey pixels for a scanned PDF.
    for flag in ["-png", "-gray"] {
        let status = std::process::Command::new("pdftoppm").args(["-r", "100", flag, "-singlefile"]).arg(dir.path().join("typed.pdf")).arg(dir.path().join("page")).status().unwrap();
        assert!(status.success());
    }
    let png = std::fs::read(dir.path().join("page.png")).unwrap();
    let pgm = std::fs::read(dir.path().join("page.pgm")).unwrap();
    // P5\n<width> <height>\n255\n<pixels>
    let header: Vec<&[u8]> = pgm.splitn(4, |b| b.is_ascii_whitespace()).collect();
    let (width, height): (usize, usize) = (std::str::from_utf8(header[1]).unwrap().parse().unwrap(), std::str::from_utf8(header[2]).unwrap().parse().unwrap());
    let pixels = &pgm[pgm.len() - width * height..];
    let content = "q 612 0 0 792 0 0 cm /Im1 Do Q";
    let mut image = format!("<< /Type /XObject /Subtype /Image /Width {width} /Height {height} /ColorSpace /DeviceGray /BitsPerComponent 8 /Length {} >>\nstream\n", pixels.len()).into_bytes();
    image.extend(pixels);
    image.extend(b"\nendstream");
    let scanned = pdf_with_streams(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /XObject << /Im1 5 0 R >> >> >>".to_vec(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()).into_bytes(),
        image,
    ]);

    let echo = TestEcho::start().await;
    let peers = echo.peers_as(ServiceName::Ingest);
    let parse = |query: &'static str, body: Vec<u8>| {
        let peers = peers.clone();
        async move {
            let request = peers.request(ServiceName::Parser, reqwest::Method::POST, query, None).await.unwrap().body(body);
            peers.send(ServiceName::Parser, request).await
        }
    };
    let words = |doc: &ParsedDocument| doc.blocks.iter().map(|b| b.text.clone()).collect::<Vec<_>>().join(" ");
    let typed: ParsedDocument = parse("/v1/parse?content_type=application/pdf&filename=typed.pdf", typed).await.unwrap().json().await.unwrap();
    assert!(words(&typed).contains("port 7341"), "{typed:?}");
    let image: ParsedDocument = parse("/v1/parse?content_type=image/png&filename=page.png", png).await.unwrap().json().await.unwrap();
    assert_eq!(image.format, "image");
    assert!(words(&image).contains("reactor console") && words(&image).contains("7341"), "OCR of the picture: {image:?}");
    let scan: ParsedDocument = parse("/v1/parse?content_type=application/pdf&filename=scan.pdf", scanned).await.unwrap().json().await.unwrap();
    assert_eq!(scan.blocks[0].page, Some(1));
    assert!(words(&scan).contains("reactor console") && words(&scan).contains("7341"), "OCR of the scanned PDF: {scan:?}");
    // A picture with no words is a failure with a reason, never an empty document.
    let blank = std::process::Command::new("pdftoppm").args(["-r", "20", "-png", "-singlefile"]).arg(dir.path().join("typed.pdf")).arg(dir.path().join("tiny")).status().unwrap();
    assert!(blank.success());
    let empty = parse("/v1/parse?content_type=image/png&filename=tiny.png", std::fs::read(dir.path().join("tiny.png")).unwrap()).await.unwrap_err();
    assert_eq!(empty.code, "parser.no_text");
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_each_get_a_clear_outcome_and_the_parser_stays_ready() {
    use std::io::Write;
    // A Word file (and an EPUB) that inflates to 600 MB from a few hundred kilobytes.
    let bomb_named = |name: &str| {
        let mut bomb = std::io::Cursor::new(Vec::new());
        {
            let mut writer = zip::ZipWriter::new(&mut bomb);
            let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            writer.start_file(name, options).unwrap();
            let zeros = vec![b' '; 1 << 20];
            for _ in 0..600 {
                writer.write_all(&zeros).unwrap();
            }
            writer.finish().unwrap();
        }
        bomb.into_inner()
    };
    let bomb = std::io::Cursor::new(bomb_named("word/document.xml"));
    // OpenDocument texts: one whose XML defines "billion laughs" entities, one whose
    // manifest says it is encrypted.
    let odt = |parts: &[(&str, String)]| {
        let mut file = std::io::Cursor::new(Vec::new());
        {
            let mut writer = zip::ZipWriter::new(&mut file);
            let options = zip::write::SimpleFileOptions::default();
            for (name, text) in parts {
                writer.start_file(*name, options).unwrap();
                writer.write_all(text.as_bytes()).unwrap();
            }
            writer.finish().unwrap();
        }
        file.into_inner()
    };
    let mut entities = String::from("<!ENTITY lol0 \"lol\">");
    for i in 1..10 {
        entities.push_str(&format!("<!ENTITY lol{i} \"{}\">", format!("&lol{};", i - 1).repeat(10)));
    }
    let laughs = odt(&[
        ("mimetype", "application/vnd.oasis.opendocument.text".into()),
        ("content.xml", format!("<?xml version=\"1.0\"?><!DOCTYPE d [{entities}]><office:document-content xmlns:office=\"urn:oasis:names:tc:opendocument:xmlns:office:1.0\" xmlns:text=\"urn:oasis:names:tc:opendocument:xmlns:text:1.0\"><office:body><office:text><text:p>&lol9;</text:p></office:text></office:body></office:document-content>")),
    ]);
    let locked_odt = odt(&[
        ("mimetype", "application/vnd.oasis.opendocument.text".into()),
        ("META-INF/manifest.xml", "<manifest:manifest><manifest:file-entry manifest:full-path=\"content.xml\"><manifest:encryption-data/></manifest:file-entry></manifest:manifest>".into()),
        ("content.xml", "\u{1}\u{2} ciphertext".into()),
    ]);
    let deep_rtf = format!("{{\\rtf1 {}", "{".repeat(100_000)).into_bytes();
    let nested_json = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut truncated_pdf = text_pdf("A document cut short.");
    truncated_pdf.truncate(truncated_pdf.len() / 2);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("application/vnd.openxmlformats-officedocument.wordprocessingml.document&filename=bomb.docx", bomb.into_inner(), "parser.too_large"),
        ("application/vnd.openxmlformats-officedocument.wordprocessingml.document&filename=fake.docx", b"PK\x03\x04 not really a zip".to_vec(), "parser.corrupt"),
        ("application/vnd.openxmlformats-officedocument.wordprocessingml.document&filename=locked.docx", [0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1, 0, 0, 0, 0].to_vec(), "parser.encrypted"),
        ("application/json&filename=deep.json", nested_json.into_bytes(), "parser.corrupt"),
        ("application/pdf&filename=cut.pdf", truncated_pdf, "parser.corrupt"),
        ("application/pdf&filename=noise.pdf", (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect(), "parser.corrupt"),
        ("image/png&filename=noise.png", b"\x89PNG\r\n\x1a\n this is no picture".to_vec(), "parser.corrupt"),
        ("text/csv&filename=bad.csv", b"a,b\n\xff\xfe\x00".to_vec(), "parser.not_utf8"),
        ("application/x-msdownload&filename=tool.exe", b"MZ\x90\x00".to_vec(), "parser.unsupported_type"),
        ("application/epub%2Bzip&filename=bomb.epub", bomb_named("OEBPS/chapter.xhtml"), "parser.too_large"),
        ("application/epub%2Bzip&filename=fake.epub", b"PK\x03\x04 not an ebook".to_vec(), "parser.corrupt"),
        ("application/vnd.oasis.opendocument.text&filename=laughs.odt", laughs, "parser.no_text"),
        ("application/vnd.oasis.opendocument.text&filename=locked.odt", locked_odt, "parser.encrypted"),
        ("application/vnd.oasis.opendocument.spreadsheet&filename=fake.ods", b"PK\x03\x04 not a sheet".to_vec(), "parser.corrupt"),
        ("application/rtf&filename=deep.rtf", deep_rtf, "parser.corrupt"),
    ];
    let echo = TestEcho::start().await;
    let peers = echo.peers_as(ServiceName::Ingest);
    for (query, body, code) in cases {
        let path = format!("/v1/parse?content_type={query}");
        let request = peers.request(ServiceName::Parser, reqwest::Method::POST, &path, None).await.unwrap().body(body);
        let error = peers.send(ServiceName::Parser, request).await.expect_err(query);
        // OCR of noise may say there is no text rather than that the file is corrupt.
        let acceptable = error.code == code || (query.starts_with("image/png") && error.code == "parser.no_text");
        assert!(acceptable, "{query}: expected {code}, got {} ({})", error.code, error.detail);
        assert!(!error.detail.is_empty());
    }
    // Still parsing, and still ready.
    let request = peers.request(ServiceName::Parser, reqwest::Method::POST, "/v1/parse?content_type=text/markdown&filename=ok.md", None).await.unwrap().body(&b"# Fine\n\nStill here."[..]);
    let parsed: ParsedDocument = peers.send(ServiceName::Parser, request).await.unwrap().json().await.unwrap();
    assert!(parsed.blocks[0].text.contains("Still here."));
    echo.stop().await;
}

