//! OTLP export of Echo's spans to an OpenTelemetry collector, when
//! `telemetry.otlp_endpoint` is set (nothing is exported otherwise).
//!
//! Echo's own trace context (`trace`) decides the ids: every request served and every
//! bus delivery of a sampled trace becomes one span whose trace id, span id and parent
//! are exactly those carried in `traceparent`, so a collector shows the same tree the
//! logs do. The OpenTelemetry SDK batches and exports (OTLP/HTTP, protobuf) from its
//! own thread; the HTTP calls themselves run on Echo's Tokio runtime through
//! `Transport`. Each service is its own resource (`service.name` = `echo-<service>`).
//! Spans carry the service, route, method, status, subscription — never bodies,
//! questions or secrets.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, SdkTracerProvider};

use crate::config::TelemetryConfig;

/// What a span's kind and attributes are made of (so services need no OpenTelemetry
/// dependency of their own).
pub use opentelemetry::KeyValue as Attribute;
pub use opentelemetry::trace::SpanKind as Kind;
use crate::trace::TraceContext;

/// The export set-up of this process, once `init` found an endpoint.
struct Export {
    endpoint: String,
    runtime: tokio::runtime::Handle,
    providers: Mutex<HashMap<&'static str, SdkTracerProvider>>,
}

static EXPORT: OnceLock<Export> = OnceLock::new();

thread_local! {
    /// The ids the next span built on this thread must have (Echo's, not the SDK's).
    static PLANNED: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Hands the SDK the ids Echo planned for the span being built, else random ones.
#[derive(Debug)]
struct PlannedIds;

impl IdGenerator for PlannedIds {
    fn new_trace_id(&self) -> TraceId {
        PLANNED.with(|p| p.get()).map_or_else(|| RandomIdGenerator::default().new_trace_id(), |(trace, _)| trace)
    }
    fn new_span_id(&self) -> SpanId {
        PLANNED.with(|p| p.get()).map_or_else(|| RandomIdGenerator::default().new_span_id(), |(_, span)| span)
    }
}

/// OTLP/HTTP calls made with Echo's `reqwest` on Echo's runtime (the SDK's batch
/// thread only waits for the answer).
#[derive(Debug)]
struct Transport {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Transport {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let http = self.http.clone();
        let answer = self
            .runtime
            .spawn(async move {
                let response = http.execute(request).await?;
                let status = response.status();
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, body))
            })
            .await??;
        let mut response = Response::new(answer.1);
        *response.status_mut() = answer.0;
        Ok(response)
    }
}

/// Starts exporting when `config.otlp_endpoint` is set; call once per process from
/// within the runtime. A second call, or one without an endpoint, does nothing.
pub fn init(config: &TelemetryConfig) {
    let endpoint = config.otlp_endpoint.trim().trim_end_matches('/');
    if endpoint.is_empty() || EXPORT.get().is_some() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let _ = EXPORT.set(Export { endpoint: format!("{endpoint}/v1/traces"), runtime, providers: Mutex::new(HashMap::new()) });
    tracing::info!(endpoint, "exporting traces over OTLP/HTTP");
}

/// The provider of `service`, made on first use.
fn provider(export: &Export, service: &'static str) -> Option<SdkTracerProvider> {
    let mut providers = export.providers.lock().ok()?;
    if let Some(provider) = providers.get(service) {
        return Some(provider.clone());
    }
    let transport = Transport { http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().ok()?, runtime: export.runtime.clone() };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(transport)
        .with_endpoint(export.endpoint.clone())
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|error| tracing::warn!(%error, "the OTLP exporter could not be built"))
        .ok()?;
    let batch = BatchSpanProcessor::builder(exporter).with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(Duration::from_secs(1)).build()).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_id_generator(PlannedIds)
        .with_resource(Resource::builder().with_service_name(format!("echo-{service}")).build())
        .build();
    providers.insert(service, provider.clone());
    Some(provider)
}

/// What one span says.
pub struct Finished<'a> {
    pub service: &'static str,
    pub name: String,
    pub kind: SpanKind,
    /// The span's own place in the trace, and its parent's span id when continued.
    pub context: &'a TraceContext,
    pub parent_span_id: Option<&'a str>,
    pub started: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub error: bool,
}

/// Exports one finished span of a sampled trace (nothing when export is off).
pub fn record(span: Finished<'_>) {
    let Some(export) = EXPORT.get() else { return };
    if !span.context.sampled() {
        return;
    }
    let Some(provider) = provider(export, span.service) else { return };
    let (Ok(trace_id), Ok(span_id)) = (TraceId::from_hex(span.context.trace_id()), SpanId::from_hex(span.context.span_id())) else { return };
    let parent = match span.parent_span_id.and_then(|id| SpanId::from_hex(id).ok()) {
        Some(parent) => Context::new().with_remote_span_context(SpanContext::new(trace_id, parent, TraceFlags::SAMPLED, true, TraceState::default())),
        None => Context::new(),
    };
    let tracer = provider.tracer("echo");
    let builder = tracer.span_builder(span.name).with_kind(span.kind).with_start_time(span.started).with_attributes(span.attributes);
    PLANNED.with(|p| p.set(Some((trace_id, span_id))));
    let mut built = tracer.build_with_context(builder, &parent);
    PLANNED.with(|p| p.set(None));
    if span.error {
        opentelemetry::trace::Span::set_status(&mut built, opentelemetry::trace::Status::error("failed"));
    }
    opentelemetry::trace::Span::end(&mut built);
}
