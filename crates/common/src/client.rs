//! Service-to-service HTTP calls: the callee's URL from config, a client-credentials
//! token for the callee's audience, the acting user (if any) in `x-echo-principal`,
//! the current trace in `traceparent`, and peer problems turned back into `ApiError`s. A callee serving in this process is
//! called in process (`crate::local`), any other over TCP.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth::ServiceTokens;
use crate::config::{EchoConfig, ServiceName};
use crate::error::{ApiError, Problem};
use crate::wire::{PRINCIPAL_HEADER, Principal};

#[derive(Clone)]
pub struct Peers {
    http: reqwest::Client,
    tokens: ServiceTokens,
    config: Arc<EchoConfig>,
}

impl Peers {
    pub fn new(http: reqwest::Client, tokens: ServiceTokens, config: Arc<EchoConfig>) -> Peers {
        Peers { http, tokens, config }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn tokens(&self) -> &ServiceTokens {
        &self.tokens
    }

    /// A request to `callee` with its service token and, when acting for a user, the principal.
    pub async fn request(
        &self,
        callee: ServiceName,
        method: Method,
        path: &str,
        principal: Option<&Principal>,
    ) -> Result<RequestBuilder, ApiError> {
        let token = self.tokens.token_for(callee).await?;
        let url = format!("{}{}", self.config.url(callee), path);
        let mut builder = self.http.request(method, url).bearer_auth(token).timeout(Duration::from_secs(120));
        if let Some(principal) = principal {
            builder = builder.header(PRINCIPAL_HEADER, encode_principal(principal));
        }
        // The callee's work is part of this trace.
        if let Some(traceparent) = crate::trace::outgoing() {
            builder = builder.header(crate::trace::TRACEPARENT, traceparent);
        }
        Ok(builder)
    }

    /// Sends and turns any non-2xx answer into the peer's problem.
    pub async fn send(&self, callee: ServiceName, builder: RequestBuilder) -> Result<Response, ApiError> {
        let request = builder.build().map_err(ApiError::internal)?;
        let response = match crate::local::call(request).await {
            // The callee serves in this process: handed over without a socket.
            Ok(answered) => answered.map_err(|e| match e {
                crate::local::LocalError::TimedOut => ApiError::unavailable("peer.unreachable", format!("{callee} did not answer in time")),
                crate::local::LocalError::Request(e) => ApiError::unavailable("peer.unreachable", format!("{callee} is unreachable: {e}")),
            })?,
            Err(request) => self.http.execute(request).await.map_err(|e| ApiError::unavailable("peer.unreachable", format!("{callee} is unreachable: {e}")))?,
        };
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<Problem>(&body) {
            Ok(problem) => Err(ApiError::from_problem(problem)),
            Err(_) => Err(ApiError::internal(anyhow::anyhow!(
                "{callee} answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ))),
        }
    }

    pub async fn get_json<T: DeserializeOwned>(
        &self,
        callee: ServiceName,
        path: &str,
        principal: Option<&Principal>,
    ) -> Result<T, ApiError> {
        let builder = self.request(callee, Method::GET, path, principal).await?;
        let response = self.send(callee, builder).await?;
        response.json().await.map_err(ApiError::internal)
    }

    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        callee: ServiceName,
        path: &str,
        principal: Option<&Principal>,
        body: &B,
    ) -> Result<T, ApiError> {
        let builder = self.request(callee, Method::POST, path, principal).await?.json(body);
        let response = self.send(callee, builder).await?;
        response.json().await.map_err(ApiError::internal)
    }

    pub async fn put_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        callee: ServiceName,
        path: &str,
        principal: Option<&Principal>,
        body: &B,
    ) -> Result<T, ApiError> {
        let builder = self.request(callee, Method::PUT, path, principal).await?.json(body);
        let response = self.send(callee, builder).await?;
        response.json().await.map_err(ApiError::internal)
    }

    pub async fn delete(&self, callee: ServiceName, path: &str, principal: Option<&Principal>) -> Result<(), ApiError> {
        let builder = self.request(callee, Method::DELETE, path, principal).await?;
        self.send(callee, builder).await?;
        Ok(())
    }
}

pub fn encode_principal(principal: &Principal) -> String {
    let json = serde_json::to_vec(principal).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

pub fn decode_principal(value: &str) -> Option<Principal> {
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value).ok()?;
    serde_json::from_slice(&json).ok()
}

/// Percent-encodes one path segment or query value.
pub fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn principal_header_round_trips() {
        let principal = Principal {
            sub: "u1".into(),
            username: "ann".into(),
            org: "acme".into(),
            roles: vec!["member".into()],
        };
        assert_eq!(decode_principal(&encode_principal(&principal)), Some(principal));
        assert_eq!(decode_principal("not base64!"), None);
    }
}
