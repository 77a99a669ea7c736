//! Mechanisms shared by every Echo service, and the wire types that cross processes.
//!
//! This crate holds no business rules: configuration loading, error rendering,
//! telemetry and log shipping, token verification, service-to-service calls, the
//! `Bus` client, SQLite helpers and the HTTP scaffolding every service shares
//! (`/healthz`, `/readyz`, `/metrics`). Services depend on this crate and never on
//! each other.

pub mod auth;
pub mod bus;
pub mod client;
pub mod config;
pub mod db;
pub mod error;
pub mod event_schemas;
pub mod files;
pub mod formats;
pub mod local;
pub mod otlp;
pub mod rand;
pub mod server;
pub mod sse;
pub mod telemetry;
pub mod text;
pub mod trace;
pub mod web;
pub mod wire;

pub use config::{EchoConfig, ServiceName};
pub use error::{ApiError, ErrorKind};
pub use server::ServiceContext;

/// Seconds since the Unix epoch, the one clock format stored in every database.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Milliseconds since the Unix epoch, for queue timings.
pub fn now_unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 rendering of a Unix timestamp, the one time format on the wire.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}
