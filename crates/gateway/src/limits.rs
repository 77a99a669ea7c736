//! Rate limits at the public edge (GCRA token buckets from `governor`): one budget
//! per client address for every request, checked before anything else, and once the
//! caller is known, one per user for each kind of request (reads, writes, uploads,
//! questions), so that one person's flood neither starves the others nor fills the
//! audit log. A refused request is held for `REFUSAL_HOLD`, then gets 429 with
//! `Retry-After`, and is counted in `echo_gateway_throttled_total`.
//! `gateway.rate_limits: off` disables all of it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use common::ApiError;
use common::config::{GatewayConfig, Rate, Switch};

/// What a request spends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Budget {
    Read,
    Write,
    Upload,
    Ask,
}

impl Budget {
    /// The budget of `method path` (API paths and the pages' own).
    pub(crate) fn of(method: &Method, path: &str) -> Budget {
        let is_ask = matches!(path, "/api/v1/ask" | "/v1/chat/completions" | "/ask");
        let is_upload = matches!(path, "/api/v1/documents" | "/documents/upload");
        match method {
            &Method::GET | &Method::HEAD | &Method::OPTIONS => Budget::Read,
            _ if is_ask => Budget::Ask,
            _ if is_upload => Budget::Upload,
            _ if path == "/api/v1/search" => Budget::Read,
            _ => Budget::Write,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Budget::Read => "read",
            Budget::Write => "write",
            Budget::Upload => "upload",
            Budget::Ask => "ask",
        }
    }
}

struct Limiters {
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    read: DefaultKeyedRateLimiter<String>,
    write: DefaultKeyedRateLimiter<String>,
    upload: DefaultKeyedRateLimiter<String>,
    ask: DefaultKeyedRateLimiter<String>,
}

/// How long a refused request is held before its 429 goes out. A client that waits
/// for answers (nearly all do) is slowed to this pace per connection, so a flood
/// costs the gateway little more than the refusals it asked for.
pub(crate) const REFUSAL_HOLD: Duration = Duration::from_millis(250);

/// The gateway's rate limits; cheap to clone.
#[derive(Clone)]
pub(crate) struct RateLimits {
    limiters: Option<Arc<Limiters>>,
    clock: DefaultClock,
}

fn quota(rate: Rate) -> Quota {
    let per_minute = NonZeroU32::new(rate.per_minute).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(per_minute).allow_burst(burst)
}

impl RateLimits {
    pub(crate) fn from_config(config: &GatewayConfig) -> RateLimits {
        let budgets = &config.rate_limit;
        let limiters = (config.rate_limits == Switch::On).then(|| {
            Arc::new(Limiters {
                per_ip: RateLimiter::keyed(quota(budgets.per_ip)),
                read: RateLimiter::keyed(quota(budgets.read)),
                write: RateLimiter::keyed(quota(budgets.write)),
                upload: RateLimiter::keyed(quota(budgets.upload)),
                ask: RateLimiter::keyed(quota(budgets.ask)),
            })
        });
        RateLimits { limiters, clock: DefaultClock::default() }
    }

    fn refusal(&self, scope: &'static str, budget: &'static str, not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>) -> ApiError {
        let wait = not_until.wait_time_from(self.clock.now());
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        metrics::counter!("echo_gateway_throttled_total", "scope" => scope, "budget" => budget).increment(1);
        ApiError::rate_limited(format!("too many requests ({scope} {budget} budget); try again in {} s", seconds.max(1)), seconds)
    }

    /// Spends one request of `ip`'s budget.
    pub(crate) fn check_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        let Some(limiters) = &self.limiters else { return Ok(()) };
        limiters.per_ip.check_key(&ip).map_err(|not_until| self.refusal("address", "all", &not_until))
    }

    /// Spends one request of `user`'s `budget`.
    pub(crate) fn check_user(&self, user: &str, budget: Budget) -> Result<(), ApiError> {
        let Some(limiters) = &self.limiters else { return Ok(()) };
        let limiter = match budget {
            Budget::Read => &limiters.read,
            Budget::Write => &limiters.write,
            Budget::Upload => &limiters.upload,
            Budget::Ask => &limiters.ask,
        };
        limiter.check_key(&user.to_string()).map_err(|not_until| self.refusal("user", budget.as_str(), &not_until))
    }

    /// Forgets the buckets of callers who have been quiet long enough to be full again.
    pub(crate) fn spawn_cleanup(&self, shutdown: tokio_util::sync::CancellationToken) {
        let Some(limiters) = self.limiters.clone() else { return };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                limiters.per_ip.retain_recent();
                for limiter in [&limiters.read, &limiters.write, &limiters.upload, &limiters.ask] {
                    limiter.retain_recent();
                }
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_spend_the_budget_of_their_kind() {
        assert_eq!(Budget::of(&Method::GET, "/api/v1/documents"), Budget::Read);
        assert_eq!(Budget::of(&Method::POST, "/api/v1/documents"), Budget::Upload);
        assert_eq!(Budget::of(&Method::POST, "/api/v1/search"), Budget::Read);
        assert_eq!(Budget::of(&Method::POST, "/api/v1/ask"), Budget::Ask);
        assert_eq!(Budget::of(&Method::POST, "/v1/chat/completions"), Budget::Ask);
        assert_eq!(Budget::of(&Method::POST, "/api/v1/collections"), Budget::Write);
        assert_eq!(Budget::of(&Method::DELETE, "/api/v1/documents/x"), Budget::Write);
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_wait_and_other_users_are_untouched() {
        let mut config = GatewayConfig::default();
        config.rate_limit.write = Rate { per_minute: 60, burst: 3 };
        let limits = RateLimits::from_config(&config);
        for _ in 0..3 {
            limits.check_user("ann", Budget::Write).unwrap();
        }
        let refused = limits.check_user("ann", Budget::Write).unwrap_err();
        assert_eq!(refused.kind, common::ErrorKind::TooManyRequests);
        assert_eq!(refused.retry_after, Some(1), "one request a second refills");
        limits.check_user("bob", Budget::Write).unwrap();
        limits.check_user("ann", Budget::Read).unwrap();
        config.rate_limits = Switch::Off;
        let off = RateLimits::from_config(&config);
        for _ in 0..100 {
            off.check_user("ann", Budget::Write).unwrap();
        }
    }
}
