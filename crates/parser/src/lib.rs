//! parser — text extraction with structure, as a pure library (`formats`) and a thin
//! stateless HTTP service (`POST /v1/parse`).
//!
//! Invariants: every input is bounded in size and time; extraction runs in child
//! processes (`isolate`, `worker`) that the time limit kills and whose crash or memory
//! exhaustion costs one file, never the service; a panic is reported as a corrupt file;
//! nothing is written anywhere.

mod formats;
pub mod isolate;
mod ocr;
mod office;
mod opendoc;
pub mod worker;

use std::sync::Arc;

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Router, middleware};
use serde::Deserialize;
use tokio::net::TcpListener;

use common::error::{ApiResult, Json, Query};
use common::wire::ParsedDocument;
use common::{ApiError, ErrorKind, ServiceContext};

pub use common::formats::{Format, detect};
pub use formats::{ParseError, extract};

impl From<ParseError> for ApiError {
    fn from(error: ParseError) -> Self {
        let (kind, code) = match &error {
            ParseError::Empty => (ErrorKind::BadRequest, "parser.empty"),
            ParseError::Unsupported(_) => (ErrorKind::UnsupportedMediaType, "parser.unsupported_type"),
            ParseError::NotUtf8 => (ErrorKind::BadRequest, "parser.not_utf8"),
            ParseError::Encrypted => (ErrorKind::BadRequest, "parser.encrypted"),
            ParseError::Corrupt(_) => (ErrorKind::BadRequest, "parser.corrupt"),
            ParseError::NoText => (ErrorKind::BadRequest, "parser.no_text"),
            ParseError::NoTextLayer(_) => (ErrorKind::BadRequest, "parser.no_text"),
            ParseError::OcrUnavailable(_) => (ErrorKind::BadRequest, "parser.ocr_unavailable"),
            ParseError::TooLarge(_) => (ErrorKind::PayloadTooLarge, "parser.too_large"),
            ParseError::Timeout(_) => (ErrorKind::BadRequest, "parser.timeout"),
        };
        ApiError::new(kind, code, error.to_string())
    }
}

/// Extracts `bytes` off the async runtime, within `timeout`, containing panics.
pub async fn parse_bounded(bytes: Bytes, content_type: &str, filename: &str, max_bytes: usize, timeout: Duration) -> Result<ParsedDocument, ParseError> {
    if bytes.len() > max_bytes {
        return Err(ParseError::TooLarge(max_bytes));
    }
    let format = detect(content_type, filename, &bytes[..bytes.len().min(8192)]).map_err(|e| ParseError::Unsupported(e.0))?;
    let task = tokio::task::spawn_blocking(move || std::panic::catch_unwind(|| extract(format, &bytes)));
    match tokio::time::timeout(timeout, task).await {
        Err(_) => Err(ParseError::Timeout(timeout.as_millis() as u64)),
        Ok(Err(_)) | Ok(Ok(Err(_))) => Err(ParseError::Corrupt("the parser crashed on this file".into())),
        Ok(Ok(Ok(result))) => result,
    }
}

/// Cuts the extracted text to `max_chars` in all (whole characters, blocks in order).
pub(crate) fn bound_output(parsed: &mut ParsedDocument, max_chars: usize) {
    let mut budget = max_chars;
    parsed.blocks.retain_mut(|block| {
        if budget == 0 {
            return false;
        }
        if block.text.len() > budget {
            let cut = (0..=budget).rev().find(|i| block.text.is_char_boundary(*i)).unwrap_or(0);
            block.text.truncate(cut);
        }
        budget -= block.text.len();
        true
    });
}

/// Where extraction runs.
enum Extractor {
    Isolated(isolate::Pool),
    InProcess,
}

#[derive(Clone)]
struct AppState {
    config: common::config::ParserConfig,
    extractor: Arc<Extractor>,
}

impl AppState {
    async fn extract(&self, body: Bytes, content_type: &str, filename: &str) -> Result<ParsedDocument, ParseError> {
        let config = &self.config;
        let timeout = Duration::from_secs(config.timeout_secs);
        let limit_ms = timeout.as_millis() as u64;
        let deadline = tokio::time::Instant::now() + timeout;
        if body.len() > config.max_input_bytes {
            return Err(ParseError::TooLarge(config.max_input_bytes));
        }
        let format = detect(content_type, filename, &body[..body.len().min(8192)]).map_err(|e| ParseError::Unsupported(e.0))?;
        if format == Format::Image {
            return ocr::image(&body, deadline, limit_ms).await;
        }
        let extracted = match self.extractor.as_ref() {
            Extractor::InProcess => parse_bounded(body.clone(), content_type, filename, config.max_input_bytes, timeout).await.map(|mut parsed| {
                bound_output(&mut parsed, config.max_output_chars);
                parsed
            }),
            Extractor::Isolated(pool) => pool.extract(format, &body, config.max_output_chars, timeout).await,
        };
        match extracted {
            // A scan: every page through OCR.
            Err(ParseError::NoTextLayer(pages)) => {
                let all: Vec<u32> = (1..=pages).collect();
                let blocks = ocr::pdf_pages(&body, &all, deadline, limit_ms).await?;
                if blocks.is_empty() {
                    return Err(ParseError::NoTextLayer(pages));
                }
                let mut parsed = ParsedDocument { format: "pdf".into(), blocks, n_pages: Some(pages), title: None };
                bound_output(&mut parsed, config.max_output_chars);
                Ok(parsed)
            }
            Ok(mut parsed) if format == Format::Pdf => {
                self.read_scanned_pages(&body, &mut parsed, deadline, limit_ms).await;
                Ok(parsed)
            }
            other => other,
        }
    }

    /// Pages of a typed PDF without text (a scanned page among typed ones) through OCR,
    /// when they are few or most of the document; OCR failing here keeps the typed text.
    async fn read_scanned_pages(&self, body: &[u8], parsed: &mut ParsedDocument, deadline: tokio::time::Instant, limit_ms: u64) {
        let pages = parsed.n_pages.unwrap_or(0);
        let with_text: std::collections::HashSet<u32> = parsed.blocks.iter().filter(|b| b.text.trim().chars().count() >= 20).filter_map(|b| b.page).collect();
        let missing: Vec<u32> = (1..=pages).filter(|p| !with_text.contains(p)).collect();
        if missing.is_empty() || (missing.len() > 20 && missing.len() * 2 < pages as usize) {
            return;
        }
        match ocr::pdf_pages(body, &missing, deadline, limit_ms).await {
            Ok(blocks) => {
                parsed.blocks.retain(|b| b.page.is_none_or(|p| !missing.contains(&p)));
                parsed.blocks.extend(blocks);
                parsed.blocks.sort_by_key(|b| b.page);
                bound_output(parsed, self.config.max_output_chars);
            }
            Err(error) => tracing::warn!(%error, pages = missing.len(), "pages without text were not read by OCR"),
        }
    }
}

/// The extractor `config` asks for: worker processes unless `thread`, or when no
/// `echod` program can be found to run them (said at start).
fn extractor(config: &common::config::ParserConfig) -> Extractor {
    if config.isolation == "thread" {
        tracing::warn!("parser.isolation is `thread`: a runaway parser keeps its thread busy after its job failed");
        return Extractor::InProcess;
    }
    match isolate::worker_program(config.worker_program.as_deref()) {
        Some(program) => {
            let size = if config.workers == 0 { std::thread::available_parallelism().map_or(2, usize::from) } else { config.workers };
            tracing::info!(program = %program.display(), workers = size, memory_mb = config.max_memory_mb, "parsing in worker processes");
            Extractor::Isolated(isolate::Pool::new(isolate::WorkerCommand { program, memory_mb: config.max_memory_mb }, size))
        }
        None => {
            tracing::warn!("no echod program found to run parse workers (set parser.worker_program): parsing in-process, where the time limit cannot stop a runaway parser");
            Extractor::InProcess
        }
    }
}

#[derive(Deserialize)]
struct ParseParams {
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    filename: String,
}

async fn parse(State(state): State<AppState>, Query(params): Query<ParseParams>, body: Bytes) -> ApiResult<Json<ParsedDocument>> {
    let parsed = state.extract(body, &params.content_type, &params.filename).await?;
    metrics::counter!("echo_parser_documents_total", "format" => parsed.format.clone()).increment(1);
    // Pages for paged formats (PDF pages, slides, sheets); a page for the rest.
    metrics::counter!("echo_parser_pages_total", "format" => parsed.format.clone()).increment(u64::from(parsed.n_pages.unwrap_or(1)));
    Ok(Json(parsed))
}

/// Runs the parser service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let state = AppState { config: ctx.config.parser.clone(), extractor: Arc::new(extractor(&ctx.config.parser)) };
    let limit = state.config.max_input_bytes + 1024;
    let routes = Router::new()
        .route("/v1/parse", post(parse))
        .layer(DefaultBodyLimit::max(limit))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, common::server::always_ready()).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}
