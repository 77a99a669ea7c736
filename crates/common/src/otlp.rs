//! OTLP export of Echo's traces, logs and metrics to an OpenTelemetry collector, when
//! `telemetry.otlp_endpoint` is set (nothing is exported otherwise), over OTLP/HTTP
//! with protobuf (`telemetry.otlp_protocol: http/protobuf`, the default) or OTLP/gRPC
//! (`grpc`).
//!
//! Echo's own trace context (`trace`) decides the ids: every request served and every
//! bus delivery of a sampled trace becomes one span whose trace id, span id and parent
//! are exactly those carried in `traceparent`, so a collector shows the same tree the
//! logs do. Every log record (the ones shipped to the logs service) is also a log
//! record here, in its trace and span when it has one. Every metric of the `metrics`
//! facade (the ones `/metrics` serves) is also an OpenTelemetry instrument, exported
//! every `telemetry.metrics_interval_ms` as cumulative sums, gauges and histograms with
//! `/metrics`' buckets. Each service is its own resource (`service.name` =
//! `echo-<service>`) for spans and logs; metrics are the process's resource and name
//! their service in a `service` attribute, as in `/metrics`.
//!
//! The OpenTelemetry SDK batches and exports from its own threads, which have no Tokio
//! runtime; the network calls run on Echo's: OTLP/HTTP through `Transport` (Echo's
//! `reqwest`), OTLP/gRPC (tonic) polled inside Echo's runtime by `OnRuntime`. Spans
//! carry the service, route, method, status, subscription — never bodies, questions or
//! secrets; log records carry what the console shows.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{BatchLogProcessor, SdkLoggerProvider};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, SdkTracerProvider};

use crate::config::{ServiceName, TelemetryConfig};
use crate::wire::LogRecord;

/// What a span's kind and attributes are made of (so services need no OpenTelemetry
/// dependency of their own).
pub use opentelemetry::KeyValue as Attribute;
pub use opentelemetry::trace::SpanKind as Kind;
use crate::trace::TraceContext;

/// Histogram buckets, the same as `/metrics`' (seconds, mostly).
pub(crate) const BUCKETS: [f64; 13] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The export set-up of this process, once `init` found an endpoint.
struct Export {
    /// The collector's base URL.
    endpoint: String,
    grpc: bool,
    runtime: tokio::runtime::Handle,
    /// The process's resource name: `echo` for `echod up`, `echo-<service>` for one service.
    process: String,
    /// Per service (or the process, for records of no service): its tracer and logger.
    signals: Mutex<HashMap<String, Signals>>,
    meter: Option<SdkMeterProvider>,
    instruments: RwLock<HashMap<metrics::Key, Bridged>>,
}

#[derive(Clone)]
struct Signals {
    tracer: Option<SdkTracerProvider>,
    logger: Option<SdkLoggerProvider>,
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

/// An exporter whose calls are polled inside Echo's Tokio runtime: tonic's channel
/// needs a reactor, and the SDK's batch threads have none ("there is no reactor
/// running", opentelemetry-rust#2188).
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
}

/// A future polled with a runtime entered.
struct Entered<F> {
    runtime: tokio::runtime::Handle,
    inner: Pin<Box<F>>,
}

impl<F: Future> Future for Entered<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _entered = this.runtime.enter();
        this.inner.as_mut().poll(cx)
    }
}

/// The future `make` returns, made and polled inside `runtime`.
fn entered<F: Future>(runtime: &tokio::runtime::Handle, make: impl FnOnce() -> F) -> Entered<F> {
    let _entered = runtime.enter();
    Entered { runtime: runtime.clone(), inner: Box::pin(make()) }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        entered(&self.runtime, || self.inner.export(batch))
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: opentelemetry_sdk::logs::LogExporter> opentelemetry_sdk::logs::LogExporter for OnRuntime<E> {
    fn export(&self, batch: opentelemetry_sdk::logs::LogBatch<'_>) -> impl Future<Output = OTelSdkResult> + Send {
        entered(&self.runtime, || self.inner.export(batch))
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: opentelemetry_sdk::metrics::exporter::PushMetricExporter> opentelemetry_sdk::metrics::exporter::PushMetricExporter for OnRuntime<E> {
    fn export(&self, metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics) -> impl Future<Output = OTelSdkResult> + Send {
        entered(&self.runtime, || self.inner.export(metrics))
    }
    fn force_flush(&self) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// Starts exporting when `config.otlp_endpoint` is set; call once per process from
/// within the runtime, naming the process (`echo` when it runs every service). A
/// second call, or one without an endpoint, does nothing.
pub fn init(config: &TelemetryConfig, process: &str) {
    let endpoint = config.otlp_endpoint.trim().trim_end_matches('/');
    if endpoint.is_empty() || EXPORT.get().is_some() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let grpc = config.otlp_protocol == "grpc";
    let mut export = Export {
        endpoint: endpoint.to_string(),
        grpc,
        runtime,
        process: process.to_string(),
        signals: Mutex::new(HashMap::new()),
        meter: None,
        instruments: RwLock::new(HashMap::new()),
    };
    export.meter = meter(&export, Duration::from_millis(config.metrics_interval_ms.max(100)));
    let _ = EXPORT.set(export);
    let protocol = if grpc { "OTLP/gRPC" } else { "OTLP/HTTP" };
    tracing::info!(endpoint, protocol, "exporting traces, logs and metrics");
}

/// Whether anything is exported.
pub fn enabled() -> bool {
    EXPORT.get().is_some()
}

/// Exports what is buffered now (at shutdown, so the last seconds are not lost).
pub fn flush() {
    let Some(export) = EXPORT.get() else { return };
    let signals: Vec<Signals> = export.signals.lock().map(|s| s.values().cloned().collect()).unwrap_or_default();
    for signal in signals {
        if let Some(tracer) = signal.tracer {
            let _ = tracer.force_flush();
        }
        if let Some(logger) = signal.logger {
            let _ = logger.force_flush();
        }
    }
    if let Some(meter) = &export.meter {
        let _ = meter.force_flush();
    }
}

fn resource(name: String) -> Resource {
    Resource::builder().with_service_name(name).build()
}

fn transport(export: &Export) -> Option<Transport> {
    Some(Transport { http: reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build().ok()?, runtime: export.runtime.clone() })
}

fn warn_unbuilt(error: opentelemetry_otlp::ExporterBuildError) {
    tracing::warn!(%error, "the OTLP exporter could not be built");
}

fn tracer_provider(export: &Export, name: &str) -> Option<SdkTracerProvider> {
    let batch = if export.grpc {
        let _entered = export.runtime.enter();
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(export.endpoint.clone()).with_timeout(EXPORT_TIMEOUT).build().map_err(warn_unbuilt).ok()?;
        BatchSpanProcessor::builder(OnRuntime { inner: exporter, runtime: export.runtime.clone() }).with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(Duration::from_secs(1)).build()).build()
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(transport(export)?)
            .with_endpoint(format!("{}/v1/traces", export.endpoint))
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(warn_unbuilt)
            .ok()?;
        BatchSpanProcessor::builder(exporter).with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(Duration::from_secs(1)).build()).build()
    };
    Some(SdkTracerProvider::builder().with_span_processor(batch).with_id_generator(PlannedIds).with_resource(resource(name.to_string())).build())
}

fn logger_provider(export: &Export, name: &str) -> Option<SdkLoggerProvider> {
    let config = opentelemetry_sdk::logs::BatchConfigBuilder::default().with_scheduled_delay(Duration::from_secs(1)).build();
    let batch = if export.grpc {
        let _entered = export.runtime.enter();
        let exporter = opentelemetry_otlp::LogExporter::builder().with_tonic().with_endpoint(export.endpoint.clone()).with_timeout(EXPORT_TIMEOUT).build().map_err(warn_unbuilt).ok()?;
        BatchLogProcessor::builder(OnRuntime { inner: exporter, runtime: export.runtime.clone() }).with_batch_config(config).build()
    } else {
        let exporter = opentelemetry_otlp::LogExporter::builder()
            .with_http()
            .with_http_client(transport(export)?)
            .with_endpoint(format!("{}/v1/logs", export.endpoint))
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(warn_unbuilt)
            .ok()?;
        BatchLogProcessor::builder(exporter).with_batch_config(config).build()
    };
    Some(SdkLoggerProvider::builder().with_log_processor(batch).with_resource(resource(name.to_string())).build())
}

fn meter(export: &Export, interval: Duration) -> Option<SdkMeterProvider> {
    let provider = SdkMeterProvider::builder().with_resource(resource(export.process.clone()));
    let provider = if export.grpc {
        let _entered = export.runtime.enter();
        let exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic().with_endpoint(export.endpoint.clone()).with_timeout(EXPORT_TIMEOUT).build().map_err(warn_unbuilt).ok()?;
        provider.with_reader(PeriodicReader::builder(OnRuntime { inner: exporter, runtime: export.runtime.clone() }).with_interval(interval).build())
    } else {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(transport(export)?)
            .with_endpoint(format!("{}/v1/metrics", export.endpoint))
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(warn_unbuilt)
            .ok()?;
        provider.with_reader(PeriodicReader::builder(exporter).with_interval(interval).build())
    };
    Some(provider.build())
}

/// The tracer and logger of `service` (an Echo service's name, else the process's),
/// made on first use.
fn signals(export: &Export, service: &str) -> Option<Signals> {
    let name = match ServiceName::ALL.iter().find(|s| s.as_str() == service) {
        Some(service) => format!("echo-{}", service.as_str()),
        None => export.process.clone(),
    };
    let mut all = export.signals.lock().ok()?;
    if let Some(signals) = all.get(&name) {
        return Some(signals.clone());
    }
    let signals = Signals { tracer: tracer_provider(export, &name), logger: logger_provider(export, &name) };
    all.insert(name, signals.clone());
    Some(signals)
}

/// Exports one log record (nothing when export is off), in its trace and in `span_id`
/// (the log span's), else in the current span when the record is of the task's trace.
pub fn log(record: &LogRecord, span_id: Option<&str>) {
    let Some(export) = EXPORT.get() else { return };
    // This module's own warnings are made while it holds its providers' lock.
    if record.target.starts_with("common::otlp") {
        return;
    }
    let Some(logger) = signals(export, &record.service).and_then(|s| s.logger) else { return };
    let logger = logger.logger("echo");
    let mut out = logger.create_log_record();
    out.set_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(record.ts_ms).unwrap_or(0)));
    out.set_observed_timestamp(SystemTime::now());
    let (severity, text) = match record.level.as_str() {
        "error" => (Severity::Error, "ERROR"),
        "warn" => (Severity::Warn, "WARN"),
        "info" => (Severity::Info, "INFO"),
        "debug" => (Severity::Debug, "DEBUG"),
        _ => (Severity::Trace, "TRACE"),
    };
    out.set_severity_number(severity);
    out.set_severity_text(text);
    out.set_target(Cow::Owned(record.target.clone()));
    out.set_body(AnyValue::from(record.message.clone()));
    for (key, value) in &record.fields {
        let value = match value {
            serde_json::Value::String(s) => AnyValue::from(s.clone()),
            serde_json::Value::Bool(b) => AnyValue::from(*b),
            serde_json::Value::Number(n) => n.as_i64().map(AnyValue::from).or_else(|| n.as_f64().map(AnyValue::from)).unwrap_or_else(|| AnyValue::from(n.to_string())),
            other => AnyValue::from(other.to_string()),
        };
        out.add_attribute(key.clone(), value);
    }
    if let Some(trace_id) = record.trace_id.as_deref().and_then(|id| TraceId::from_hex(id).ok()) {
        let current = || crate::trace::current().filter(|c| c.trace_id() == record.trace_id.as_deref().unwrap_or_default()).map(|c| c.span_id().to_string());
        let span_id = span_id.map(str::to_string).or_else(current).and_then(|id| SpanId::from_hex(&id).ok()).unwrap_or(SpanId::INVALID);
        out.set_trace_context(trace_id, span_id, Some(TraceFlags::SAMPLED));
    }
    logger.emit(out);
}

/// The `metrics` facade's instruments, also as OpenTelemetry ones while export is on
/// (installed beside the Prometheus recorder). Counters and gauges keep their value
/// here, so `absolute`, `increment` and `decrement` mean what they mean in `/metrics`.
pub(crate) struct MetricsBridge;

#[derive(Clone)]
enum Bridged {
    Counter(Arc<BridgedCounter>),
    Gauge(Arc<BridgedGauge>),
    Histogram(Arc<BridgedHistogram>),
}

struct BridgedCounter {
    otel: opentelemetry::metrics::Counter<u64>,
    attributes: Vec<KeyValue>,
    total: AtomicU64,
}

struct BridgedGauge {
    otel: opentelemetry::metrics::Gauge<f64>,
    attributes: Vec<KeyValue>,
    value: Mutex<f64>,
}

struct BridgedHistogram {
    otel: opentelemetry::metrics::Histogram<f64>,
    attributes: Vec<KeyValue>,
}

impl metrics::CounterFn for BridgedCounter {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Ordering::Relaxed);
        self.otel.add(value, &self.attributes);
    }
    fn absolute(&self, value: u64) {
        let before = self.total.fetch_max(value, Ordering::Relaxed);
        if value > before {
            self.otel.add(value - before, &self.attributes);
        }
    }
}

impl BridgedGauge {
    fn update(&self, change: impl FnOnce(f64) -> f64) {
        if let Ok(mut value) = self.value.lock() {
            *value = change(*value);
            self.otel.record(*value, &self.attributes);
        }
    }
}

impl metrics::GaugeFn for BridgedGauge {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }
    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }
    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

impl metrics::HistogramFn for BridgedHistogram {
    fn record(&self, value: f64) {
        self.otel.record(value, &self.attributes);
    }
}

#[derive(Clone, Copy)]
enum InstrumentKind {
    Counter,
    Gauge,
    Histogram,
}

/// The instrument of `key`, made on first use; `None` when export is off (or `key`
/// was registered as another kind).
fn instrument(key: &metrics::Key, kind: InstrumentKind) -> Option<Bridged> {
    let export = EXPORT.get()?;
    let meter_provider = export.meter.as_ref()?;
    if let Some(found) = export.instruments.read().ok()?.get(key) {
        return Some(found.clone());
    }
    let mut instruments = export.instruments.write().ok()?;
    if let Some(found) = instruments.get(key) {
        return Some(found.clone());
    }
    let meter = meter_provider.meter("echo");
    let name = key.name().to_string();
    let attributes: Vec<KeyValue> = key.labels().map(|l| KeyValue::new(l.key().to_string(), l.value().to_string())).collect();
    let bridged = match kind {
        InstrumentKind::Counter => Bridged::Counter(Arc::new(BridgedCounter { otel: meter.u64_counter(name).build(), attributes, total: AtomicU64::new(0) })),
        InstrumentKind::Gauge => Bridged::Gauge(Arc::new(BridgedGauge { otel: meter.f64_gauge(name).build(), attributes, value: Mutex::new(0.0) })),
        InstrumentKind::Histogram => Bridged::Histogram(Arc::new(BridgedHistogram { otel: meter.f64_histogram(name).with_boundaries(BUCKETS.to_vec()).build(), attributes })),
    };
    instruments.insert(key.clone(), bridged.clone());
    Some(bridged)
}

impl metrics::Recorder for MetricsBridge {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        match instrument(key, InstrumentKind::Counter) {
            Some(Bridged::Counter(counter)) => metrics::Counter::from_arc(counter),
            _ => metrics::Counter::noop(),
        }
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        match instrument(key, InstrumentKind::Gauge) {
            Some(Bridged::Gauge(gauge)) => metrics::Gauge::from_arc(gauge),
            _ => metrics::Gauge::noop(),
        }
    }
    fn register_histogram(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        match instrument(key, InstrumentKind::Histogram) {
            Some(Bridged::Histogram(histogram)) => metrics::Histogram::from_arc(histogram),
            _ => metrics::Histogram::noop(),
        }
    }
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
    let Some(provider) = signals(export, span.service).and_then(|s| s.tracer) else { return };
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The exporter over OTLP/gRPC against a receiver on a real socket (tonic, decoding
    //! with `opentelemetry-proto`). OTLP/HTTP is shown end to end by the e2e `logs`
    //! test against a whole Echo; export is per process, so only this test starts it
    //! in this binary.

    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
    use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
    use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    use super::*;

    #[derive(Clone, Default)]
    struct Receiver {
        traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
        logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
        metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.traces.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl LogsService for Receiver {
        async fn export(&self, request: tonic::Request<ExportLogsServiceRequest>) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
            self.logs.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl MetricsService for Receiver {
        async fn export(&self, request: tonic::Request<ExportMetricsServiceRequest>) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            self.metrics.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
        }
    }

    fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
        resource
            .into_iter()
            .flat_map(|r| r.attributes.iter())
            .find(|a| a.key == "service.name")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Any::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_logs_and_metrics_reach_a_collector_over_grpc() {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let serving = receiver.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(serving.clone()))
                .add_service(LogsServiceServer::new(serving.clone()))
                .add_service(MetricsServiceServer::new(serving))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        let config = TelemetryConfig { otlp_endpoint: format!("http://{address}"), otlp_protocol: "grpc".into(), metrics_interval_ms: 200 };
        init(&config, "echo");
        assert!(enabled());

        // A span of a sampled trace, continuing a client's span.
        let context = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap().child();
        record(Finished {
            service: "gateway",
            name: "GET /api/v1/documents".into(),
            kind: Kind::Server,
            context: &context,
            parent_span_id: Some("00f067aa0ba902b7"),
            started: SystemTime::now() - Duration::from_millis(5),
            attributes: vec![Attribute::new("http.route", "/api/v1/documents")],
            error: false,
        });
        // A log record of that trace, and one of no service Echo knows.
        let mut fields = serde_json::Map::new();
        fields.insert("document_id".into(), "d1".into());
        fields.insert("chunks".into(), 12.into());
        log(&LogRecord { ts_ms: crate::now_unix_ms(), service: "ingest".into(), level: "warn".into(), target: "ingest::worker".into(), message: "document indexed".into(), fields, trace_id: Some(context.trace_id().to_string()) }, Some(context.span_id()));
        log(&LogRecord { ts_ms: crate::now_unix_ms(), service: "tantivy".into(), level: "info".into(), target: "tantivy::indexer".into(), message: "committed".into(), fields: Default::default(), trace_id: None }, None);
        // Metrics through the `metrics` facade, as every service records them.
        metrics::with_local_recorder(&MetricsBridge, || {
            metrics::counter!("echo_test_requests_total", "service" => "gateway").increment(2);
            metrics::counter!("echo_test_requests_total", "service" => "gateway").increment(1);
            metrics::gauge!("echo_test_in_flight").increment(5.0);
            metrics::gauge!("echo_test_in_flight").decrement(2.0);
            metrics::histogram!("echo_test_seconds").record(0.003);
        });
        tokio::task::spawn_blocking(flush).await.unwrap();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let have = !receiver.traces.lock().unwrap().is_empty() && receiver.logs.lock().unwrap().iter().map(|r| r.resource_logs.len()).sum::<usize>() >= 2 && !receiver.metrics.lock().unwrap().is_empty();
            if have {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the collector did not get spans, logs and metrics over gRPC");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let traces = receiver.traces.lock().unwrap().clone();
        let (service, span) = traces.iter().flat_map(|r| r.resource_spans.iter()).flat_map(|rs| rs.scope_spans.iter().flat_map(|s| s.spans.iter()).map(move |s| (service_name(rs.resource.as_ref()), s.clone()))).next().unwrap();
        assert_eq!(service, "echo-gateway");
        assert_eq!(span.name, "GET /api/v1/documents");
        assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&span.span_id), context.span_id());
        assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");

        let logs = receiver.logs.lock().unwrap().clone();
        let records: Vec<(String, opentelemetry_proto::tonic::logs::v1::LogRecord)> =
            logs.iter().flat_map(|r| r.resource_logs.iter()).flat_map(|rl| rl.scope_logs.iter().flat_map(|s| s.log_records.iter()).map(move |l| (service_name(rl.resource.as_ref()), l.clone()))).collect();
        let (service, indexed) = records.iter().find(|(_, l)| matches!(l.body.as_ref().and_then(|b| b.value.as_ref()), Some(Any::StringValue(s)) if s == "document indexed")).expect("the worker's record");
        assert_eq!(service, "echo-ingest");
        assert_eq!(indexed.severity_text, "WARN");
        assert_eq!(indexed.severity_number, opentelemetry_proto::tonic::logs::v1::SeverityNumber::Warn as i32);
        assert_eq!(hex(&indexed.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&indexed.span_id), context.span_id());
        let attribute = |key: &str| indexed.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.clone());
        assert_eq!(attribute("document_id"), Some(Any::StringValue("d1".into())));
        assert_eq!(attribute("chunks"), Some(Any::IntValue(12)));
        let (service, _) = records.iter().find(|(_, l)| matches!(l.body.as_ref().and_then(|b| b.value.as_ref()), Some(Any::StringValue(s)) if s == "committed")).expect("the library's record");
        assert_eq!(service, "echo", "a record of no Echo service is the process's");

        // Metrics are cumulative: the latest export holds every value recorded.
        let latest = receiver.metrics.lock().unwrap().last().cloned().unwrap();
        assert_eq!(service_name(latest.resource_metrics[0].resource.as_ref()), "echo");
        let metrics: Vec<opentelemetry_proto::tonic::metrics::v1::Metric> = latest.resource_metrics.iter().flat_map(|r| r.scope_metrics.iter()).flat_map(|s| s.metrics.iter().cloned()).collect();
        let data = |name: &str| metrics.iter().find(|m| m.name == name).and_then(|m| m.data.clone()).unwrap_or_else(|| panic!("no {name}: {:?}", metrics.iter().map(|m| &m.name).collect::<Vec<_>>()));
        let Data::Sum(sum) = data("echo_test_requests_total") else { panic!("a counter is a sum") };
        assert!(sum.is_monotonic);
        assert_eq!(sum.data_points[0].value, Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(3)));
        assert_eq!(sum.data_points[0].attributes[0].key, "service");
        let Data::Gauge(gauge) = data("echo_test_in_flight") else { panic!("a gauge") };
        assert_eq!(gauge.data_points[0].value, Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(3.0)));
        let Data::Histogram(histogram) = data("echo_test_seconds") else { panic!("a histogram") };
        assert_eq!(histogram.data_points[0].count, 1);
        assert_eq!(histogram.data_points[0].explicit_bounds, BUCKETS.to_vec());
    }
}
