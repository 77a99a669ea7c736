//! The gateway over HTTP, started by its real `run` on a free port: readiness of the
//! whole system, the API description, problem+json, and security headers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use common::ServiceName;
use echod::testing::TestEcho;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_is_ready_described_and_safe_by_default() {
    let echo = TestEcho::start().await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let gateway = echo.url(ServiceName::Gateway);
    assert_eq!(http.get(format!("{gateway}/readyz")).send().await.unwrap().status(), 200);
    let openapi: serde_json::Value = http.get(format!("{gateway}/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(openapi["openapi"], "3.1.0");
    assert!(openapi["paths"]["/api/v1/ask"].is_object());

    let missing = http.get(format!("{gateway}/api/v1/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["content-type"], "application/problem+json");
    let page = http.get(format!("{gateway}/nope")).send().await.unwrap();
    assert_eq!(page.status(), 404);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));

    let signed_out = http.get(format!("{gateway}/documents")).send().await.unwrap();
    assert_eq!(signed_out.status(), 303);
    assert!(signed_out.headers()["location"].to_str().unwrap().starts_with("/auth/login?return_to="));
    let body = http.post(format!("{gateway}/api/v1/search")).body(vec![b'a'; 64 * 1024]).header("content-type", "application/json").send().await.unwrap();
    assert_eq!(body.status(), 401, "authentication comes before reading the body");
    echo.stop().await;
}
