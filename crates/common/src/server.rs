//! What every service shares at its HTTP edge: the `ServiceContext` (config, peers,
//! bus, token verifier, shutdown), `/healthz` `/readyz` `/metrics`, request metrics and
//! spans, service-token authentication for internal routes, and graceful serving.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{AccessClaims, ServiceTokens, TokenVerifier, bearer};
use crate::bus::Bus;
use crate::client::{Peers, decode_principal};
use crate::config::{EchoConfig, ServiceName};
use crate::error::ApiError;
use crate::wire::{PRINCIPAL_HEADER, Principal};

/// Everything a service needs from its surroundings.
#[derive(Clone)]
pub struct ServiceContext {
    pub name: ServiceName,
    pub config: Arc<EchoConfig>,
    pub peers: Peers,
    pub bus: Bus,
    pub verifier: TokenVerifier,
    pub shutdown: CancellationToken,
}

impl ServiceContext {
    /// Builds the context of `name`, reading its client secret from the data dir
    /// (or `ECHO_CLIENT_SECRET` when the service runs alone in a container).
    pub fn new(config: Arc<EchoConfig>, name: ServiceName, shutdown: CancellationToken) -> anyhow::Result<ServiceContext> {
        let secret = match std::env::var("ECHO_CLIENT_SECRET") {
            Ok(secret) if !secret.is_empty() => secret,
            _ => {
                let path = config.service_secret_path(name);
                std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("cannot read the client secret of {name} at {}: {e}; run `echod up` once to create it", path.display()))?
                    .trim()
                    .to_string()
            }
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let identity_url = config.url(ServiceName::Identity);
        let tokens = ServiceTokens::new(name.client_id(), secret, &identity_url, http.clone());
        let peers = Peers::new(http.clone(), tokens, config.clone());
        let verifier = TokenVerifier::new(&config.issuer(), &identity_url, http);
        let bus = Bus::new(peers.clone(), name);
        Ok(ServiceContext { name, config, peers, bus, verifier, shutdown })
    }

    /// Publishes an audit event; failures are logged, never fatal to the caller's action.
    pub async fn audit(&self, actor: &str, action: &str, resource: &str, outcome: &str, context: serde_json::Value) {
        let event = crate::wire::AuditEvent {
            actor: actor.to_string(),
            action: action.to_string(),
            resource: resource.to_string(),
            outcome: outcome.to_string(),
            context,
        };
        let event = self.bus.event(crate::wire::events::AUDIT_RECORDED, Some(resource.to_string()), event);
        if let Err(error) = self.bus.publish_one(event).await {
            tracing::error!(%action, %error, "audit event could not be published");
        }
    }
}

pub type ReadyFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
pub type ReadyCheck = Arc<dyn Fn() -> ReadyFuture + Send + Sync>;

/// A readiness check that always passes (stateless services).
pub fn always_ready() -> ReadyCheck {
    Arc::new(|| Box::pin(async { Ok(()) }))
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (beside the OTLP bridge when
/// exporting) once.
pub fn metrics_handle() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let recorder = PrometheusBuilder::new().set_buckets(&crate::otlp::BUCKETS).map(|b| b.build_recorder()).unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); then this handle stays empty.
        // With OTLP export on (`otlp::init` runs before the first service starts), every
        // metric also goes to the OTLP bridge; otherwise nothing but Prometheus is paid for.
        if crate::otlp::enabled() {
            let both = metrics_util::layers::FanoutBuilder::default().add_recorder(recorder).add_recorder(crate::otlp::MetricsBridge).build();
            let _ = metrics::set_global_recorder(both);
        } else {
            let _ = metrics::set_global_recorder(recorder);
        }
        handle
    })
}

/// When several services run in one process (`echod up`): the one whose `/metrics`
/// serves the process's registry.
static METRICS_SERVED_BY: OnceLock<&'static str> = OnceLock::new();

/// Names the service whose `/metrics` serves this process's metrics; the others' answer
/// an empty exposition. For processes that run several services.
pub fn serve_metrics_from(service: ServiceName) {
    let _ = METRICS_SERVED_BY.set(service.as_str());
}

#[derive(Clone)]
struct EdgeState {
    service: &'static str,
    ready: ReadyCheck,
    metrics_token: crate::config::Secret,
    trusted_proxies: Arc<Vec<std::net::IpAddr>>,
}

/// Wraps a service's routes with the shared endpoints, metrics and spans.
pub fn service_router(ctx: &ServiceContext, routes: Router, ready: ReadyCheck) -> Router {
    metrics_handle();
    let state = EdgeState {
        service: ctx.name.as_str(),
        ready,
        metrics_token: ctx.config.metrics_token.clone(),
        trusted_proxies: Arc::new(ctx.config.trusted_proxies.clone()),
    };
    let shared = Router::new()
        .route("/healthz", get(|| async { ([(VERSION_HEADER, env!("CARGO_PKG_VERSION"))], "ok") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    routes.merge(shared).layer(middleware::from_fn_with_state(state, observe))
}

/// Prometheus text, for the machine itself (a loopback peer that is no proxy and
/// forwards nobody) or whoever presents `metrics_token`. Everyone else is told there
/// is nothing here: the gateway's and identity's ports face the world.
async fn metrics(State(state): State<EdgeState>, request: Request) -> Response {
    let peer = request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let headers = request.headers();
    let forwarded = headers.contains_key("x-forwarded-for") || headers.contains_key(axum::http::header::FORWARDED);
    let local = peer.is_some_and(|ip| ip.is_loopback() && !state.trusted_proxies.contains(&ip)) && !forwarded;
    let token_ok = !state.metrics_token.is_empty()
        && bearer(headers).is_some_and(|t| crate::rand::constant_time_eq(t.as_bytes(), state.metrics_token.expose().as_bytes()));
    if local || token_ok {
        match METRICS_SERVED_BY.get() {
            // Several services share this process, and so one registry: one of them
            // serves it, so that scraping every service counts nothing twice.
            Some(owner) if *owner != state.service => format!("# the metrics of this process are served by {owner}'s /metrics\n").into_response(),
            _ => metrics_handle().render().into_response(),
        }
    } else {
        ApiError::not_found("route.not_found", "no such endpoint").into_response()
    }
}

/// The target of the one record per request served: shipped to the logs service (the
/// log viewer's traces), printed on the console only when `log.level` asks for debug.
pub const REQUESTS_TARGET: &str = "echo::requests";

/// The header naming the Echo version a service runs (on `/healthz` and `/readyz`).
pub const VERSION_HEADER: &str = "x-echo-version";

async fn readyz(State(state): State<EdgeState>) -> Response {
    let version = [(VERSION_HEADER, env!("CARGO_PKG_VERSION"))];
    match (state.ready)().await {
        Ok(()) => (StatusCode::OK, version, "ready").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, version, format!("not ready: {reason}")).into_response(),
    }
}

async fn observe(State(state): State<EdgeState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // Continue the caller's trace (W3C `traceparent`) or start one; the work this
    // request does — its peer calls, the events it publishes — carries it on.
    // A public route is an edge: whether its trace is sampled (recorded request by
    // request) is decided here, within the sampling rate, whatever the client asked.
    // An internal route follows its peer's decision; internal calls outside any trace
    // (the bus's pulls and acks, shipped logs) are never sampled.
    let plumbing = matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") || route.starts_with("/static");
    let public = !(route.starts_with("/v1/") || route.starts_with("/internal/"));
    let parent = request.headers().get(crate::trace::TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(crate::trace::TraceContext::parse);
    let parent_span_id = parent.as_ref().map(|p| p.span_id().to_string());
    let started_at = std::time::SystemTime::now();
    let context = match parent {
        Some(parent) if public => {
            let wanted = parent.sampled();
            parent.child().with_sampled(wanted && !plumbing && crate::trace::admit())
        }
        Some(parent) => parent.child(),
        None if public && !plumbing => crate::trace::TraceContext::root().with_sampled(crate::trace::admit()),
        None => crate::trace::TraceContext::root().with_sampled(false),
    };
    let sampled = context.sampled();
    let exported = context.clone();
    let trace_id = context.trace_id().to_string();
    let span = tracing::info_span!("request", service = state.service, %method, route = %route, trace_id = %trace_id, span_id = %context.span_id());
    let mut response = crate::trace::scope(context, tracing::Instrument::instrument(next.run(request), span.clone())).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&trace_id) {
        response.headers_mut().insert(crate::trace::TRACE_ID_HEADER, value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    let labels = [
        ("service", state.service.to_string()),
        ("method", method.to_string()),
        ("route", route.clone()),
        ("status", status.to_string()),
    ];
    metrics::counter!("echo_http_requests_total", &labels).increment(1);
    metrics::histogram!("echo_http_request_duration_seconds", &labels[..3]).record(elapsed);
    if sampled && !plumbing {
        crate::otlp::record(crate::otlp::Finished {
            service: state.service,
            name: format!("{method} {route}"),
            kind: opentelemetry::trace::SpanKind::Server,
            context: &exported,
            parent_span_id: parent_span_id.as_deref(),
            started: started_at,
            attributes: vec![
                opentelemetry::KeyValue::new("http.request.method", method.to_string()),
                opentelemetry::KeyValue::new("http.route", route.clone()),
                opentelemetry::KeyValue::new("http.response.status_code", i64::from(status)),
                opentelemetry::KeyValue::new("echo.service", state.service),
            ],
            error: status >= 500,
        });
    }
    // One record per request of a sampled trace, in every service it crosses; the
    // rest at debug (so shipping logs, which is never traced, never feeds on itself).
    if !plumbing && sampled {
        span.in_scope(|| tracing::info!(target: REQUESTS_TARGET, status, elapsed_ms = (elapsed * 100_000.0).round() / 100.0, %method, %route, "request served"));
    } else if !plumbing {
        span.in_scope(|| tracing::debug!(target: REQUESTS_TARGET, status, elapsed_ms = (elapsed * 100_000.0).round() / 100.0, %method, %route, "request served"));
    }
    response
}

/// The verified caller of an internal route: an Echo service, maybe acting for a user.
#[derive(Clone, Debug)]
pub struct Caller {
    pub client_id: String,
    pub principal: Option<Principal>,
}

/// Middleware for internal routes: a client-credentials token whose audience is this service.
pub async fn require_service_token(State(ctx): State<ServiceContext>, mut request: Request, next: Next) -> Response {
    let Some(token) = bearer(request.headers()) else {
        return ApiError::unauthenticated("a service token is required").into_response();
    };
    let claims: AccessClaims = match ctx.verifier.verify(token, &ctx.name.audience()).await {
        Ok(claims) => claims,
        Err(error) => return ApiError::from(error).into_response(),
    };
    if !claims.client_id.starts_with("svc-") || claims.sub != claims.client_id {
        return ApiError::forbidden("auth.not_a_service", "only Echo services may call this endpoint").into_response();
    }
    let principal = request
        .headers()
        .get(PRINCIPAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(decode_principal);
    request.extensions_mut().insert(Caller { client_id: claims.client_id, principal });
    next.run(request).await
}

/// Extracts the user an internal call acts for; 401 when the caller named none.
#[derive(Clone, Debug)]
pub struct ActingUser(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for ActingUser {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .and_then(|c| c.principal.clone())
            .map(ActingUser)
            .ok_or_else(|| ApiError::unauthenticated("this call must name the user it acts for"))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| ApiError::unauthenticated("a service token is required"))
    }
}

/// Serves `router` on `listener` until `shutdown`, then drains in-flight requests.
/// Peers in this process reach `router` directly while it serves (`crate::local`).
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _in_process = crate::local::register(listener.local_addr()?, router.clone());
    axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Handler for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::not_found("route.not_found", "no such endpoint")
}

/// Set once a background part of a service (a consumer's subscription) is in place;
/// readiness includes it so no event published after `/readyz` says ready is missed.
#[derive(Clone, Debug, Default)]
pub struct ReadyFlag(Arc<std::sync::atomic::AtomicBool>);

impl ReadyFlag {
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A readiness check: every flag is set (services without a database).
pub fn flags_ready(flags: Vec<(&'static str, ReadyFlag)>) -> ReadyCheck {
    Arc::new(move || {
        let flags = flags.clone();
        Box::pin(async move {
            match flags.iter().find(|(_, flag)| !flag.is_set()) {
                Some((name, _)) => Err(format!("{name} is not ready yet")),
                None => Ok(()),
            }
        })
    })
}

