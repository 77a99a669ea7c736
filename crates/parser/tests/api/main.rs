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
