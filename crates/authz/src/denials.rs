//! Denials go to the audit log, but a flood of identical ones (one person asking for
//! the same thing over and over) must not fill it. The first denial of a (person,
//! resource, request) is recorded at once; identical ones within the window after it
//! are only counted, and when the window closes they become one more record carrying
//! `repeated` (how many) and `window_secs`. Nothing is dropped: every denial is in
//! the log, individually or in a count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ServiceContext;

/// Keys kept before every open window is closed at once (a flood of distinct requests).
const MAX_OPEN: usize = 100_000;

struct Open {
    opened: Instant,
    repeated: u64,
}

type Key = (String, String, String);

#[derive(Clone)]
pub(crate) struct Denials {
    window: Duration,
    open: Arc<Mutex<HashMap<Key, Open>>>,
}

impl Denials {
    pub(crate) fn new(window: Duration) -> Denials {
        Denials { window, open: Arc::default() }
    }

    /// Audits a denial of `context` (the action and whatever else the request said)
    /// on `resource` for `actor`, or counts it when an identical one was just audited.
    pub(crate) async fn record(&self, ctx: &ServiceContext, actor: &str, resource: &str, context: serde_json::Value) {
        let key = (actor.to_string(), resource.to_string(), context.to_string());
        let first = match self.open.lock() {
            Ok(mut open) => match open.get_mut(&key) {
                Some(window) if window.opened.elapsed() < self.window => {
                    window.repeated += 1;
                    false
                }
                _ => {
                    open.insert(key, Open { opened: Instant::now(), repeated: 0 });
                    true
                }
            },
            Err(_) => true,
        };
        if first {
            ctx.audit(actor, "authz.denied", resource, "denied", context).await;
        }
    }

    /// The windows that closed (all of them when `everything`), with their counts.
    fn take_closed(&self, everything: bool) -> Vec<(Key, u64)> {
        let Ok(mut open) = self.open.lock() else { return vec![] };
        let everything = everything || open.len() > MAX_OPEN;
        let closed: Vec<Key> = open.iter().filter(|(_, w)| everything || w.opened.elapsed() >= self.window).map(|(k, _)| k.clone()).collect();
        closed.into_iter().filter_map(|key| open.remove(&key).map(|w| (key, w.repeated))).filter(|(_, repeated)| *repeated > 0).collect()
    }

    async fn flush(&self, ctx: &ServiceContext, everything: bool) {
        for ((actor, resource, context), repeated) in self.take_closed(everything) {
            let mut context: serde_json::Value = serde_json::from_str(&context).unwrap_or_default();
            if let Some(fields) = context.as_object_mut() {
                fields.insert("repeated".into(), repeated.into());
                fields.insert("window_secs".into(), self.window.as_secs().into());
            }
            ctx.audit(&actor, "authz.denied", &resource, "denied", context).await;
        }
    }

    /// Records the counts of closed windows every second, and the open ones at shutdown.
    pub(crate) fn spawn_flusher(&self, ctx: ServiceContext) {
        let denials = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => {
                        denials.flush(&ctx, true).await;
                        break;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => denials.flush(&ctx, false).await,
                }
            }
        });
    }
}
