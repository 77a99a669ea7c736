//! W3C trace context (`traceparent`) carried through every piece of work: an HTTP
//! request continues the trace its caller names or starts one; calls to peers
//! (`client::Peers`) and events published on the bus (`wire::CloudEvent`) carry it on;
//! a bus consumer runs each delivery inside the trace of the event it handles.
//!
//! Every request gets a trace id (named back in `x-trace-id`), but only *sampled*
//! traces leave a record per request in every service they cross: at most
//! `log.traced_requests_per_second` new traces a second are sampled at the edge (a
//! token bucket, as tracing systems' rate-limiting samplers do), so a flood of requests
//! cannot turn into a flood of records. Within the system a peer's sampling decision is
//! followed, so a sampled trace is whole.
//!
//! The context of the work in progress lives in a task-local, so it reaches every
//! call made by the task handling a request or a delivery whatever the log level (log
//! spans can be filtered away; the trace must not be). Work spawned onto another task
//! takes it along with [`in_current`].

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// The response header naming a request's trace (SPEC §7).
pub const TRACE_ID_HEADER: &str = "x-trace-id";
/// The W3C request header.
pub const TRACEPARENT: &str = "traceparent";

/// One position in a trace: the trace and the span (unit of work) within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lower-case hex digits, never all zero.
    trace_id: String,
    /// 16 lower-case hex digits, never all zero.
    span_id: String,
    /// The W3C trace flags (bit 0: sampled).
    flags: u8,
}

impl TraceContext {
    /// A new trace: fresh trace and span ids, sampled.
    pub fn root() -> TraceContext {
        TraceContext { trace_id: nonzero_hex(16), span_id: nonzero_hex(8), flags: 1 }
    }

    /// Whether this trace's work is recorded request by request (W3C flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The same position with the sampled flag set as given.
    pub fn with_sampled(mut self, sampled: bool) -> TraceContext {
        self.flags = if sampled { self.flags | 1 } else { self.flags & !1 };
        self
    }

    /// The next unit of work in the same trace (a new span id).
    pub fn child(&self) -> TraceContext {
        TraceContext { trace_id: self.trace_id.clone(), span_id: nonzero_hex(8), flags: self.flags }
    }

    /// Reads a `traceparent` header (W3C Trace Context level 1): `version-traceid-
    /// parentid-flags`, lower-case hex, ids not all zero, version `ff` refused. A
    /// version above `00` may carry more fields after the flags; they are ignored.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex(version, 2) || version == "ff" || !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
            return None;
        }
        // Version 00 has exactly four fields; later versions may add fields.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || span_id.bytes().all(|b| b == b'0') {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceContext { trace_id: trace_id.to_string(), span_id: span_id.to_string(), flags })
    }

    /// The `traceparent` value naming this span as the parent of the next.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    pub fn span_id(&self) -> &str {
        &self.span_id
    }
}

/// The trace of the work this task is doing, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The `traceparent` to send with a call or an event made now: it names the current
/// span as the parent, and the callee's (or consumer's) work becomes its child — a span
/// that is recorded, so the exported tree has no gaps (no client spans are recorded).
pub fn outgoing() -> Option<String> {
    current().map(|c| c.traceparent())
}

/// Runs `work` as part of `context`'s trace.
pub async fn scope<F: Future>(context: TraceContext, work: F) -> F::Output {
    CURRENT.scope(context, work).await
}

/// `work` carrying the current trace, for handing to `tokio::spawn`.
pub fn in_current<F: Future>(work: F) -> impl Future<Output = F::Output> {
    let context = current();
    async move {
        match context {
            Some(context) => CURRENT.scope(context, work).await,
            None => work.await,
        }
    }
}

/// New traces sampled per second at the edge (`log.traced_requests_per_second`).
static SAMPLE_RATE: AtomicU32 = AtomicU32::new(DEFAULT_SAMPLE_RATE);
pub const DEFAULT_SAMPLE_RATE: u32 = 100;
/// The bucket: tokens left and when it was last filled.
static BUCKET: Mutex<Option<(f64, Instant)>> = Mutex::new(None);

/// Sets how many new traces a second are sampled (0: none).
pub fn set_sample_rate(per_second: u32) {
    SAMPLE_RATE.store(per_second, Ordering::Relaxed);
}

/// Whether a new trace starting now is sampled: a token bucket holding one second's
/// worth, refilled continuously.
pub fn admit() -> bool {
    let rate = f64::from(SAMPLE_RATE.load(Ordering::Relaxed));
    if rate <= 0.0 {
        return false;
    }
    let Ok(mut bucket) = BUCKET.lock() else { return false };
    let now = Instant::now();
    let (tokens, filled) = bucket.get_or_insert((rate, now));
    *tokens = (*tokens + now.duration_since(*filled).as_secs_f64() * rate).min(rate);
    *filled = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

fn nonzero_hex(bytes: usize) -> String {
    loop {
        let raw = crate::rand::bytes(bytes);
        if raw.iter().any(|b| *b != 0) {
            return hex::encode(raw);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_read_and_written_back() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(header).unwrap();
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert_eq!(context.traceparent(), header);
        let child = context.child();
        assert_eq!(child.trace_id(), context.trace_id());
        assert_ne!(child.span_id(), context.span_id());
        // A later version may add fields.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_sampled_flag_is_read_and_set() {
        let sampled = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert!(sampled.sampled());
        let not = sampled.clone().with_sampled(false);
        assert!(!not.sampled());
        assert!(not.traceparent().ends_with("-00"));
        assert!(!not.child().sampled(), "a child keeps its parent's decision");
        assert!(TraceContext::root().sampled());
    }

    #[test]
    fn no_more_traces_are_sampled_than_the_rate() {
        set_sample_rate(20);
        let admitted = (0..200).filter(|_| admit()).count();
        // A full bucket holds one second's worth; 200 calls take far less than a second.
        assert!((20..=22).contains(&admitted), "admitted {admitted}");
        set_sample_rate(0);
        assert!(!admit());
        set_sample_rate(DEFAULT_SAMPLE_RATE);
    }

    #[tokio::test]
    async fn the_current_trace_follows_the_work_and_spawned_work_that_takes_it() {
        assert_eq!(current(), None);
        let root = TraceContext::root();
        let inside = scope(root.clone(), async {
            let seen = current();
            let spawned = tokio::spawn(in_current(async { current() })).await.unwrap();
            let bare = tokio::spawn(async { current() }).await.unwrap();
            (seen, spawned, bare, outgoing())
        })
        .await;
        assert_eq!(inside.0.as_ref(), Some(&root));
        assert_eq!(inside.1.as_ref(), Some(&root));
        assert_eq!(inside.2, None);
        let outgoing = TraceContext::parse(&inside.3.unwrap()).unwrap();
        assert_eq!(outgoing.trace_id(), root.trace_id());
        assert_eq!(outgoing.span_id(), root.span_id(), "the current span is the callee's parent");
        assert_eq!(current(), None);
    }
}
