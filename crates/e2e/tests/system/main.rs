//! Whole-system tests: start every service as `echod up` does (ports chosen by the
//! OS, a fresh data dir), then act as users through the public edges only: identity's
//! OIDC endpoints and the gateway.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod answers;
mod bus;
mod helpers;
mod idp;
mod journey;
mod migrate;
mod reindex;
mod scale;
mod security;
mod sharing;
