//! The parser service over HTTP, started by its real `run` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use common::wire::ParsedDocument;
use echod::testing::TestEcho;

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
    let unsupported = send("/v1/parse?content_type=image/png&filename=a.png", b"\x89PNG\r\n\x1a\n\0\0").await.unwrap_err();
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
        std::process::Command::new(p).args(["-c", "import docx, openpyxl, pptx"]).output().is_ok_and(|o| o.status.success())
    });
    if python.is_none() {
        let reason = "python-docx, openpyxl and python-pptx are not installed (ECHO_INTEROP_PYTHON; .ci/run installs them)";
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
}
