//! Logging: a `tracing` subscriber (pretty or JSON) plus a layer that ships every
//! record to the logs service over the bus (and to an OTLP collector when `otlp`
//! exports). Shipping never blocks the service: records go into a bounded buffer and
//! are dropped (and counted) when it is full.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::bus::{Bus, PublishMessage};
use crate::config::LogConfig;
use crate::wire::{LogBatch, LogRecord, events};

const BUFFER: usize = 8192;
const BATCH: usize = 256;

static SENDER: OnceLock<mpsc::Sender<LogRecord>> = OnceLock::new();
static RECEIVER: Mutex<Option<mpsc::Receiver<LogRecord>>> = Mutex::new(None);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Records dropped because the shipping buffer was full.
pub fn dropped_records() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Installs the global subscriber. Safe to call twice (tests); the second call is a no-op.
pub fn init(config: &LogConfig) {
    crate::trace::set_sample_rate(config.traced_requests_per_second);
    let filter = EnvFilter::try_from_env("ECHO_LOG")
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // The layer also feeds OTLP export of logs, which `otlp::init` may switch on later.
    if config.ship {
        let (sender, receiver) = mpsc::channel(BUFFER);
        if SENDER.set(sender).is_ok()
            && let Ok(mut slot) = RECEIVER.lock()
        {
            *slot = Some(receiver);
        }
    }
    // The console keeps to what an operator watches; the record of every request served
    // (one per service a sampled request crosses) goes to the logs service only, unless
    // the level asks for debug.
    let verbose = config.level.contains("debug") || config.level.contains("trace") || std::env::var("ECHO_LOG").is_ok_and(|v| v.contains("debug") || v.contains("trace"));
    let console = tracing_subscriber::filter::filter_fn(move |meta| verbose || meta.target() != crate::server::REQUESTS_TARGET);
    let fmt = if config.format == "json" {
        tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(console).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(console).boxed()
    };
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(ShipLayer).try_init();
}

/// Starts the task that batches buffered records onto the bus. Only the first call
/// (per process) takes the buffer; in `echod up` one shipper serves every service.
pub fn start_shipping(bus: Bus, shutdown: CancellationToken) {
    let Some(mut receiver) = RECEIVER.lock().ok().and_then(|mut slot| slot.take()) else { return };
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        let mut reported_drops = 0;
        loop {
            let closing = tokio::select! {
                record = receiver.recv() => match record {
                    Some(record) => { batch.push(record); false }
                    None => true,
                },
                _ = tokio::time::sleep(Duration::from_millis(500)) => false,
                _ = shutdown.cancelled() => true,
            };
            while batch.len() < BATCH {
                match receiver.try_recv() {
                    Ok(record) => batch.push(record),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let dropped = dropped_records();
                let data = LogBatch { records: std::mem::take(&mut batch), dropped: dropped - reported_drops };
                reported_drops = dropped;
                let event = bus.event(events::LOG_BATCH, None, data);
                // Failures here must not log through the shipper again (that would loop),
                // so they are counted as drops and left at that.
                if bus.publish(vec![PublishMessage { event, key: None, ordering_key: None, delay_ms: None }]).await.is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
            if closing {
                break;
            }
        }
    });
}

struct ShipLayer;

/// Marks spans that carry a `service` field so events inside them are attributed.
struct ServiceOf(String);
struct TraceOf(String);
struct SpanOf(String);

#[derive(Default)]
struct FieldCollector {
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl Visit for FieldCollector {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.insert(field.name().to_string(), value.into());
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.insert(field.name().to_string(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.insert(field.name().to_string(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.fields.insert(field.name().to_string(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.insert(field.name().to_string(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let rendered = format!("{value:?}");
        if field.name() == "message" {
            self.message = rendered;
        } else {
            self.fields.insert(field.name().to_string(), rendered.into());
        }
    }
}

impl<S> Layer<S> for ShipLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        let mut collector = FieldCollector::default();
        attrs.record(&mut collector);
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(serde_json::Value::String(service)) = collector.fields.get("service") {
                extensions.insert(ServiceOf(service.clone()));
            }
            if let Some(serde_json::Value::String(trace)) = collector.fields.get("trace_id") {
                extensions.insert(TraceOf(trace.clone()));
                if let Some(serde_json::Value::String(span)) = collector.fields.get("span_id") {
                    extensions.insert(SpanOf(span.clone()));
                }
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let target = event.metadata().target();
        // The shipper's own transport must not feed back into itself.
        const TRANSPORT: [&str; 8] = ["common::bus", "common::telemetry", "hyper", "reqwest", "h2", "tonic", "tower", "opentelemetry"];
        if TRANSPORT.iter().any(|t| target.starts_with(t)) {
            return;
        }
        let sender = SENDER.get();
        if sender.is_none() && !crate::otlp::enabled() {
            return;
        }
        let mut collector = FieldCollector::default();
        event.record(&mut collector);
        let mut service = None;
        let mut trace_id = None;
        let mut span_id = None;
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                let extensions = span.extensions();
                if service.is_none() {
                    service = extensions.get::<ServiceOf>().map(|s| s.0.clone());
                }
                if trace_id.is_none() {
                    trace_id = extensions.get::<TraceOf>().map(|t| t.0.clone());
                    span_id = extensions.get::<SpanOf>().map(|s| s.0.clone());
                }
            }
        }
        // Work whose log span was filtered away (or spawned without it) is still in its trace.
        let trace_id = trace_id.or_else(|| crate::trace::current().map(|c| c.trace_id().to_string()));
        let service = service.unwrap_or_else(|| target.split("::").next().unwrap_or("echod").to_string());
        let record = LogRecord {
            ts_ms: crate::now_unix_ms(),
            service,
            level: event.metadata().level().to_string().to_lowercase(),
            target: target.to_string(),
            message: collector.message,
            fields: collector.fields,
            trace_id,
        };
        crate::otlp::log(&record, span_id.as_deref());
        if let Some(sender) = sender
            && sender.try_send(record).is_err()
        {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}
