//! Calls between services that share a process (`echod up` runs them all in one): a
//! peer call whose URL names a listener of this process goes to that listener's router
//! directly — the same routes, middleware and service-token check, the same problem
//! answers — without encoding HTTP over a loopback socket and decoding it again. A call
//! to another process goes over TCP as before; nothing else tells the two apart.
//!
//! `serve` registers each router under its listener's address for as long as it
//! serves.
//!
//! Likewise authz tells the services of its own process about a change of access the
//! moment it is committed (`announce_access`), before it answers the request that made
//! it; the bus carries the same announcement to other processes. So in one process a
//! share or an unshare holds for the very next request, whatever the bus's delivery lag. The caller's timeout bounds the call until the answer's head (as over TCP
//! with `reqwest`'s per-request timeout, which also covers the body: a streamed answer
//! here is bounded by its reader instead, as every streaming caller already does).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock};

use axum::Router;
use axum::body::{Body, HttpBody};
use tower::ServiceExt;

use crate::wire::AccessEpoch;

/// Routers of this process by the `host:port` their peers' URLs name.
static ROUTERS: LazyLock<RwLock<HashMap<String, (u64, Router)>>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// The latest access epoch announced by each authz of this process, by its URL.
static ACCESS: LazyLock<RwLock<HashMap<String, AccessEpoch>>> = LazyLock::new(Default::default);

/// Authz at `authz_url` committed a change of access at `epoch`.
pub fn announce_access(authz_url: &str, epoch: AccessEpoch) {
    if let Ok(mut access) = ACCESS.write() {
        let latest = access.entry(authz_url.to_string()).or_default();
        *latest = latest.max(&epoch);
    }
}

/// The latest epoch authz at `authz_url` announced in this process, if it runs here.
pub fn announced_access(authz_url: &str) -> Option<AccessEpoch> {
    ACCESS.read().ok()?.get(authz_url).copied()
}

/// Keeps a router reachable in process; dropping it (the listener stopped) removes it.
pub(crate) struct Registration {
    keys: Vec<String>,
    id: u64,
}

/// Makes `router` reachable in process as the listener at `address`.
pub(crate) fn register(address: SocketAddr, router: Router) -> Registration {
    let port = address.port();
    let keys = match address.ip() {
        ip if ip.is_unspecified() => vec![format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")],
        ip if ip.is_loopback() && ip.is_ipv4() => vec![format!("{ip}:{port}"), format!("localhost:{port}")],
        _ => vec![address.to_string()],
    };
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut routers) = ROUTERS.write() {
        for key in &keys {
            routers.insert(key.clone(), (id, router.clone()));
        }
    }
    Registration { keys, id }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut routers) = ROUTERS.write() {
            for key in &self.keys {
                // Only this registration's: the port may serve another router by now.
                if routers.get(key).is_some_and(|(id, _)| *id == self.id) {
                    routers.remove(key);
                }
            }
        }
    }
}

/// The router serving `url` in this process, if one does.
fn router_for(url: &url::Url) -> Option<Router> {
    let host = url.host_str()?;
    let key = match url.host() {
        Some(url::Host::Ipv6(_)) => format!("[{}]:{}", host.trim_matches(['[', ']']), url.port_or_known_default()?),
        _ => format!("{host}:{}", url.port_or_known_default()?),
    };
    ROUTERS.read().ok()?.get(&key).map(|(_, router)| router.clone())
}

/// Why an in-process call gave no answer.
#[derive(Debug)]
pub(crate) enum LocalError {
    TimedOut,
    Request(String),
}

/// Answers `request` in process when its URL names a router of this process; gives the
/// request back otherwise.
pub(crate) async fn call(request: reqwest::Request) -> Result<Result<reqwest::Response, LocalError>, reqwest::Request> {
    let Some(router) = router_for(request.url()) else { return Err(request) };
    Ok(dispatch(router, request).await)
}

async fn dispatch(router: Router, request: reqwest::Request) -> Result<reqwest::Response, LocalError> {
    let timeout = request.timeout().copied();
    let authority = request.url().authority().to_string();
    let request: http::Request<reqwest::Body> = request.try_into().map_err(|e: reqwest::Error| LocalError::Request(e.to_string()))?;
    let (mut parts, body) = request.into_parts();
    if let Ok(host) = http::HeaderValue::from_str(&authority) {
        parts.headers.insert(http::header::HOST, host);
    }
    // As a loopback peer, which is what it is.
    parts.extensions.insert(axum::extract::ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 0))));
    let request = http::Request::from_parts(parts, Body::new(body));
    let answered = router.oneshot(request);
    let response = match timeout {
        Some(limit) => tokio::time::timeout(limit, answered).await.map_err(|_| LocalError::TimedOut)?,
        None => answered.await,
    };
    let Ok(response) = response;
    let (parts, body) = response.into_parts();
    // An answer already whole (JSON, a problem) is handed over as it is; anything else
    // (a file, an event stream) streams.
    let body = match body.size_hint().exact() {
        Some(_) => reqwest::Body::from(axum::body::to_bytes(body, usize::MAX).await.map_err(|e| LocalError::Request(e.to_string()))?),
        None => reqwest::Body::wrap_stream(body.into_data_stream()),
    };
    Ok(reqwest::Response::from(http::Response::from_parts(parts, body)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    #[tokio::test]
    async fn a_registered_router_answers_in_process_and_no_longer_once_dropped() {
        let router = Router::new()
            .route("/echo", post(|body: String| async move { format!("got {body}") }))
            .route("/peer", get(|axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }))
            .route("/slow", get(|| async { tokio::time::sleep(std::time::Duration::from_secs(5)).await }))
            .route("/stream", get(|| async { Body::from_stream(futures_util::stream::iter([Ok::<_, std::io::Error>("a"), Ok("b")])) }));
        // A port nothing listens on: an answer can only come from the registry.
        let address: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let registration = register(address, router);
        let client = reqwest::Client::new();
        let echo = client.post("http://127.0.0.1:9/echo").body("hello").build().unwrap();
        let answer = call(echo).await.unwrap().unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.text().await.unwrap(), "got hello");
        let peer = call(client.get("http://localhost:9/peer").build().unwrap()).await.unwrap().unwrap();
        assert_eq!(peer.text().await.unwrap(), "127.0.0.1");
        let streamed = call(client.get("http://127.0.0.1:9/stream").build().unwrap()).await.unwrap().unwrap();
        assert_eq!(streamed.text().await.unwrap(), "ab");
        let missing = call(client.get("http://127.0.0.1:9/nothing").build().unwrap()).await.unwrap().unwrap();
        assert_eq!(missing.status(), 404);
        let slow = client.get("http://127.0.0.1:9/slow").timeout(std::time::Duration::from_millis(50)).build().unwrap();
        assert!(matches!(call(slow).await.unwrap(), Err(LocalError::TimedOut)));
        // Another port, or after the listener stopped: over the network, as any call.
        assert!(call(client.get("http://127.0.0.1:10/echo").build().unwrap()).await.is_err());
        drop(registration);
        assert!(call(client.get("http://127.0.0.1:9/echo").build().unwrap()).await.is_err());
    }
}
