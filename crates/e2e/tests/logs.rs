//! Central logs, traces and metrics across services, seen from outside. Its own test
//! binary (its own process), because log shipping and metrics are per process: one
//! process, one system, as in production.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "system/helpers.rs"]
mod helpers;
#[path = "support/chromium.rs"]
mod chromium;

use std::time::Duration;

use serde_json::Value;

use helpers::{TestSystem, eventually, password_of};

/// One test for the whole binary: log shipping and the metrics registry are per
/// process, and the shipper belongs to the first system started in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_traces_and_metrics_of_a_running_echo() {
    let collector = Collector::start().await;
    let endpoint = collector.url.clone();
    let model = stub_model().await;
    let ts = TestSystem::start_with(|config| {
        config.telemetry.otlp_endpoint = endpoint;
        config.telemetry.metrics_interval_ms = 1000;
        config.llm.provider = "openai".into();
        config.llm.base_url = model;
        config.llm.model = "stub".into();
    })
    .await;
    every_service_ships_its_records_to_the_logs_service(&ts).await;
    let upload_trace = one_trace_follows_an_upload_and_an_ask_through_every_service(&ts).await;
    the_upload_trace_is_exported_over_otlp(&collector, &upload_trace).await;
    the_model_call_is_a_span_of_the_ask(&collector).await;
    logs_and_metrics_are_exported_over_otlp(&collector, &upload_trace).await;
    the_log_viewer_shows_a_trace_and_tails_new_records(&ts, &upload_trace).await;
    prometheus_scrapes_every_service_and_every_query_has_data(&ts).await;
    the_health_page_shows_every_service_the_bus_and_failures(&ts).await;
    the_pages_in_chromium(&ts, &upload_trace).await;
    ts.system.stop().await;
}

async fn every_service_ships_its_records_to_the_logs_service(ts: &TestSystem) {
    ts.add_user("ops", "infra", "member").await;
    identity::set_operator(&ts.config, "ops", true).await.unwrap();
    ts.add_user("adam", "acme", "admin").await;
    ts.add_user("mia", "acme", "member").await;
    let ops = ts.sign_in("ops", &password_of("ops")).await;
    let adam = ts.sign_in("adam", &password_of("adam")).await;
    let mia = ts.sign_in("mia", &password_of("mia")).await;
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"Ship logs please.".to_vec()).file_name("note.txt").mime_str("text/plain").unwrap(),
    );
    let created: Value = ts.http.post(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ops.access_token).multipart(form).send().await.unwrap().json().await.unwrap();
    assert!(created["job_id"].is_string(), "{created}");
    let records = eventually("the ingest worker's record in the logs", Duration::from_secs(30), || async {
        let logs: Value = ts
            .http
            .get(format!("{}/api/v1/logs?service=ingest&q=indexed", ts.gateway()))
            .bearer_auth(&ops.access_token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let records = logs["records"].as_array()?.clone();
        (!records.is_empty()).then_some(records)
    })
    .await;
    assert_eq!(records[0]["level"], "info");
    assert!(records[0]["message"].as_str().unwrap().contains("indexed"));
    // An org admin reads only records of their org: the worker's record names none.
    let scoped: Value = ts
        .http
        .get(format!("{}/api/v1/logs?service=ingest&q=indexed", ts.gateway()))
        .bearer_auth(&adam.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(scoped["records"].as_array().unwrap().iter().all(|r| r["fields"]["org"] == "acme"), "{scoped}");
    assert!(scoped["records"].as_array().unwrap().is_empty(), "records of no org are for operators only");
    let denied = ts.http.get(format!("{}/api/v1/logs", ts.gateway())).bearer_auth(&mia.access_token).send().await.unwrap();
    assert_eq!(denied.status(), 403, "members may not read logs");
}

/// The records of one trace, oldest first (the logs API answers newest first; in one
/// process the shipping buffer keeps the order records were made in).
async fn records_of(ts: &TestSystem, token: &str, trace: &str) -> Vec<Value> {
    let logs: Value = ts.http.get(format!("{}/api/v1/logs?trace_id={trace}&limit=1000", ts.gateway())).bearer_auth(token).send().await.unwrap().json().await.unwrap();
    let mut records = logs["records"].as_array().cloned().unwrap_or_default();
    records.reverse();
    records
}

/// Where the first record of `service` whose message contains `message` stands.
fn position(records: &[Value], service: &str, message: &str) -> usize {
    records
        .iter()
        .position(|r| r["service"] == service && r["message"].as_str().unwrap_or_default().contains(message))
        .unwrap_or_else(|| panic!("no {service} record saying {message:?} in the trace: {records:#?}"))
}

async fn one_trace_follows_an_upload_and_an_ask_through_every_service(ts: &TestSystem) -> String {
    let ops = ts.sign_in("ops", &password_of("ops")).await;

    // An upload that names its trace: the trace is continued and named back.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"The relief valve opens at 8 bar.".to_vec()).file_name("valve.txt").mime_str("text/plain").unwrap(),
    );
    let answer = ts
        .http
        .post(format!("{}/api/v1/documents", ts.gateway()))
        .bearer_auth(&ops.access_token)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["x-trace-id"], trace, "the response names the trace it continued");
    let created: Value = answer.json().await.unwrap();
    ts.wait_indexed(&ops.access_token, &created).await;
    let records = eventually("the upload's trace up to the indexed document", Duration::from_secs(30), || async {
        let records = records_of(ts, &ops.access_token, trace).await;
        records.iter().any(|r| r["service"] == "ingest" && r["message"].as_str().unwrap_or_default().contains("document indexed")).then_some(records)
    })
    .await;
    let services: std::collections::BTreeSet<&str> = records.iter().filter_map(|r| r["service"].as_str()).collect();
    for service in ["gateway", "ingest", "storage", "queue", "parser", "search"] {
        assert!(services.contains(service), "{service} is missing from the upload's trace: {services:?}");
    }
    assert!(records.iter().all(|r| r["trace_id"] == trace));
    // Causal order: a callee's record before its caller's, the queue's before the
    // worker's calls, the worker's calls before the document is indexed.
    let gateway = position(&records, "gateway", "request served");
    let stored = position(&records, "storage", "request served");
    let published = position(&records, "queue", "request served");
    let parsed = position(&records, "parser", "request served");
    let indexed_words = position(&records, "search", "request served");
    let done = position(&records, "ingest", "document indexed");
    assert!(stored < gateway, "the blob is stored within the upload request");
    assert!(published < parsed, "the job is published before the worker parses it");
    assert!(parsed < indexed_words && indexed_words < done, "parse, index, then done: {records:#?}");

    // A request without a traceparent gets a new trace, named in its response.
    let plain = ts.http.get(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ops.access_token).send().await.unwrap();
    let fresh = plain.headers()["x-trace-id"].to_str().unwrap().to_string();
    assert_eq!(fresh.len(), 32);
    assert_ne!(fresh, trace);
    // A malformed traceparent is not continued.
    let forged = ts.http.get(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ops.access_token).header("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01").send().await.unwrap();
    assert_ne!(forged.headers()["x-trace-id"], "00000000000000000000000000000000");

    // An ask: gateway → rag → authz and search, in one trace.
    let asked_trace = ASKED_TRACE;
    let answer = ts
        .http
        .post(format!("{}/api/v1/ask", ts.gateway()))
        .bearer_auth(&ops.access_token)
        .header("traceparent", format!("00-{asked_trace}-b7ad6b7169203331-01"))
        .json(&serde_json::json!({"question": "At what pressure does the relief valve open?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["x-trace-id"], asked_trace);
    let body: Value = answer.json().await.unwrap();
    assert!(body["answer"].as_str().unwrap_or_default().contains("8 bar"), "{body}");
    let records = eventually("the ask's trace", Duration::from_secs(30), || async {
        let records = records_of(ts, &ops.access_token, asked_trace).await;
        let modelled = records.iter().any(|r| r["message"].as_str().unwrap_or_default().contains("model answered"));
        (records.iter().any(|r| r["service"] == "gateway") && modelled).then_some(records)
    })
    .await;
    let searched = position(&records, "search", "request served");
    let answered = position(&records, "rag", "request served");
    let asked = position(&records, "gateway", "request served");
    let _ = position(&records, "authz", "request served");
    let modelled = position(&records, "rag", "model answered");
    assert!(searched < answered && answered < asked, "search within rag within the gateway: {records:#?}");
    // rag answers as a stream, so its own record is made when the stream starts; the
    // gateway's JSON answer waits for the whole of it.
    assert!(searched < modelled && modelled < asked, "the model answers after the search, before the gateway answers: {records:#?}");

    // A client's "not sampled" is honoured: the trace is named, nothing recorded per hop.
    let unsampled = "5cf92f3577b34da6a3ce929d0e0e4736";
    let answer = ts.http.get(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ops.access_token).header("traceparent", format!("00-{unsampled}-00f067aa0ba902b7-00")).send().await.unwrap();
    assert_eq!(answer.headers()["x-trace-id"], unsampled);
    // Shipped in order: once a later sampled request's record is in, this one's would be.
    let later = ts.http.get(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ops.access_token).send().await.unwrap();
    let later = later.headers()["x-trace-id"].to_str().unwrap().to_string();
    eventually("a later request's record", Duration::from_secs(30), || async { (!records_of(ts, &ops.access_token, &later).await.is_empty()).then_some(()) }).await;
    assert!(records_of(ts, &ops.access_token, unsampled).await.is_empty(), "an unsampled trace leaves no per-request records");
    trace.to_string()
}

async fn the_log_viewer_shows_a_trace_and_tails_new_records(ts: &TestSystem, trace: &str) {
    // The page: the trace's waterfall, a bar per service's request.
    let (session, _) = ts.browser_session("ops").await;
    let page = ts.http.get(format!("{}/admin/logs?trace_id={trace}", ts.gateway())).header("cookie", &session).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    for service in ["gateway", "storage", "ingest", "queue", "parser", "search"] {
        assert!(html.contains(&format!("data-span=\"{service}\"")), "no {service} bar in the waterfall");
    }
    assert!(html.contains("document indexed"));
    // Filters: one service's records only.
    let page = ts.http.get(format!("{}/admin/logs?service=parser", ts.gateway())).header("cookie", &session).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("<td>parser</td>") && !page.contains("<td>gateway</td>"), "the service filter holds");
    // A member may not read logs.
    ts.add_user("meg", "acme", "member").await;
    let (member, _) = ts.browser_session("meg").await;
    assert_eq!(ts.http.get(format!("{}/admin/logs", ts.gateway())).header("cookie", &member).send().await.unwrap().status(), 403);

    // The live tail: a request made after it opened arrives on it.
    let ops = ts.sign_in("ops", &password_of("ops")).await;
    let tail = ts.http.get(format!("{}/api/v1/logs/tail?service=gateway", ts.gateway())).bearer_auth(&ops.access_token).send().await.unwrap();
    assert_eq!(tail.status(), 200);
    assert!(tail.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let later = ts.http.get(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ops.access_token).send().await.unwrap();
    let later = later.headers()["x-trace-id"].to_str().unwrap().to_string();
    let mut stream = tail.bytes_stream();
    let mut seen = String::new();
    let arrived = tokio::time::timeout(Duration::from_secs(20), async {
        use futures_util::StreamExt;
        while let Some(Ok(chunk)) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(&later) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(arrived, Ok(true), "the tail did not bring the later request's record: {seen}");
    assert!(seen.contains("event: records"));
    assert!(!seen.contains("\"service\":\"parser\""), "the tail keeps its filter");
}

/// A real Prometheus (Debian's `prometheus`) scrapes every service of this running
/// Echo with the alert rules of `deploy/prometheus/alerts.yml` loaded; every query of
/// the Grafana dashboard and of every alert rule returns data.
async fn prometheus_scrapes_every_service_and_every_query_has_data(ts: &TestSystem) {
    let Some(binary) = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"].into_iter().map(std::path::PathBuf::from).find(|p| p.exists()) else {
        assert!(std::env::var_os("CI").is_none(), "Prometheus is needed under CI (.ci/run installs Debian's prometheus)");
        println!("skipping the Prometheus check: Debian's prometheus is not installed here");
        return;
    };
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    // A search through the API, so the dashboard's search latency has observations.
    let ops = ts.sign_in("ops", &password_of("ops")).await;
    let searched = ts.http.post(format!("{}/api/v1/search", ts.gateway())).bearer_auth(&ops.access_token).json(&serde_json::json!({"query": "relief valve"})).send().await.unwrap();
    assert_eq!(searched.status(), 200);

    let dir = tempfile::tempdir().unwrap();
    let targets: String = common::ServiceName::ALL
        .iter()
        .map(|s| format!("      - targets: ['{}']\n        labels: {{echo_service: {}}}\n", ts.config.url(*s).trim_start_matches("http://"), s.as_str()))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: echo\n    static_configs:\n{targets}",
        deploy.join("prometheus/alerts.yml").canonicalize().unwrap().display()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(&binary)
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let http = reqwest::Client::new();
    eventually("Prometheus scraping all 13 services", Duration::from_secs(60), || async {
        let targets: Value = http.get(format!("{api}/targets")).send().await.ok()?.json().await.ok()?;
        let active = targets["data"]["activeTargets"].as_array()?.clone();
        (active.len() == 13 && active.iter().all(|t| t["health"] == "up")).then_some(())
    })
    .await;
    // Rates need two scrapes inside their window.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dashboard: Value = serde_json::from_slice(&std::fs::read(deploy.join("grafana/echo-dashboard.json")).unwrap()).unwrap();
    let mut queries: Vec<String> = dashboard["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string())).collect();
    let rules: Value = http.get(format!("{api}/rules")).send().await.unwrap().json().await.unwrap();
    let rules: Vec<String> = rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().iter().map(|r| r["query"].as_str().unwrap().to_string())).collect();
    assert_eq!(rules.len(), 7, "every alert rule loaded: {rules:?}");
    for rule in &rules {
        // `<query> <comparison> <number>`: the query must have data, whether it fires or not.
        let cut = [" > ", " == ", " < "].iter().filter_map(|op| rule.rfind(op)).max().unwrap_or_else(|| panic!("{rule} is not `<query> <comparison> <number>`"));
        queries.push(rule[..cut].to_string());
    }
    for query in &queries {
        let answer: Value = http.get(format!("{api}/query")).query(&[("query", query)]).send().await.unwrap().json().await.unwrap();
        assert_eq!(answer["status"], "success", "{query}: {answer}");
        let result = answer["data"]["result"].as_array().unwrap();
        assert!(!result.is_empty(), "no data for {query}");
    }
    let up: Value = http.get(format!("{api}/query")).query(&[("query", "sum(up{job=\"echo\"})")]).send().await.unwrap().json().await.unwrap();
    assert_eq!(up["data"]["result"][0]["value"][1], "13");
    let _ = child.kill().await;
}

async fn the_health_page_shows_every_service_the_bus_and_failures(ts: &TestSystem) {
    let ops = ts.sign_in("ops", &password_of("ops")).await;
    let broken = ts.upload(&ops.access_token, "broken.pdf", "application/pdf", b"%PDF-1.4 this is no PDF at all".to_vec()).await;
    let id = broken["id"].as_str().or(broken["document_id"].as_str()).unwrap().to_string();
    let (session, _) = ts.browser_session("ops").await;
    let html = eventually("the failed document on the health page", Duration::from_secs(60), || async {
        let html = ts.http.get(format!("{}/admin/health", ts.gateway())).header("cookie", &session).send().await.ok()?.text().await.ok()?;
        html.contains(&format!("data-failed=\"{id}\"")).then_some(html)
    })
    .await;
    assert!(html.contains("data-health=\"ready\""), "every service ready");
    for service in common::ServiceName::ALL {
        assert!(html.contains(&format!("data-service=\"{}\" data-ready=\"true\"", service.as_str())), "{service} is listed as ready");
    }
    assert!(html.contains(env!("CARGO_PKG_VERSION")), "versions are shown");
    assert!(html.contains("data-subscription=\"ingest-worker\""), "an operator sees the bus");
    // A member may not see it.
    let (member, _) = ts.browser_session("meg").await;
    assert_eq!(ts.http.get(format!("{}/admin/health", ts.gateway())).header("cookie", &member).send().await.unwrap().status(), 403);
}

/// The log viewer in headless Chromium: the live tail shows a record made after it was
/// switched on within two seconds, and a trace's timeline renders.
async fn the_pages_in_chromium(ts: &TestSystem, trace: &str) {
    let Some((chromium, chromedriver)) = chromium::chromium_or_skip() else { return };
    let profile = tempfile::tempdir().unwrap();
    let browser = chromium::Browser::start(&chromium, &chromedriver, profile.path()).await;
    browser.goto(&format!("{}/admin/logs", ts.gateway())).await;
    browser.type_into("input[name=username]", "ops").await;
    browser.type_into("input[name=password]", &password_of("ops")).await;
    browser.click("button[type=submit]").await;
    browser.wait_for("the logs page", |s| s.contains("<h1>Logs</h1>")).await;
    browser.click("#live").await;
    // Let the page's stream open before the record it must show is made.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ops = ts.sign_in("ops", &password_of("ops")).await;
    let made = std::time::Instant::now();
    let answer = ts.http.get(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ops.access_token).send().await.unwrap();
    let new_trace = answer.headers()["x-trace-id"].to_str().unwrap().to_string();
    let link = format!("/admin/logs?trace_id={new_trace}");
    browser.wait_for("the new record on the live tail", |s| s.contains(&link)).await;
    let shown_after = made.elapsed();
    assert!(shown_after <= Duration::from_secs(2), "the live tail took {shown_after:?}");
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    browser.screenshot(&shots.join("logs.png")).await;
    // The upload's trace as a timeline: a bar per request, service by service.
    browser.goto(&format!("{}/admin/logs?trace_id={trace}", ts.gateway())).await;
    let page = browser.wait_for("the trace timeline", |s| s.contains("class=\"waterfall\"")).await;
    let bars = page.matches("class=\"bar\"").count();
    assert!(bars >= 8, "{bars} bars in the timeline");
    let width = browser.call(reqwest::Method::POST, "/execute/sync", Some(serde_json::json!({"script": "return document.querySelector('.waterfall .bar').getBoundingClientRect().width", "args": []}))).await;
    assert!(width.as_f64().unwrap() >= 1.0, "the bars are drawn: {width}");
    browser.screenshot(&shots.join("trace.png")).await;
    browser.goto(&format!("{}/admin/health", ts.gateway())).await;
    browser.wait_for("the health page", |s| s.contains("data-health=\"ready\"")).await;
    browser.screenshot(&shots.join("health.png")).await;
    browser.quit().await;
}

/// An OpenTelemetry collector's OTLP/HTTP endpoints on a real socket: every export of
/// spans, logs and metrics is decoded with `opentelemetry-proto` and kept, with its
/// resource's `service.name`.
struct Collector {
    url: String,
    spans: Kept<opentelemetry_proto::tonic::trace::v1::Span>,
    logs: Kept<opentelemetry_proto::tonic::logs::v1::LogRecord>,
    metrics: Kept<opentelemetry_proto::tonic::metrics::v1::Metric>,
}

/// (the resource's `service.name`, the item)
type Kept<T> = std::sync::Arc<std::sync::Mutex<Vec<(String, T)>>>;

fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .iter()
        .flat_map(|r| r.attributes.iter())
        .find(|a| a.key == "service.name")
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A route that decodes each OTLP/HTTP export with `decode` and keeps what it yields.
fn otlp_route<T: Send + 'static>(kept: Kept<T>, decode: fn(axum::body::Bytes) -> Vec<(String, T)>) -> axum::routing::MethodRouter {
    axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
        let kept = kept.clone();
        async move {
            assert_eq!(headers["content-type"], "application/x-protobuf");
            kept.lock().unwrap().extend(decode(body));
            axum::http::StatusCode::OK
        }
    })
}

impl Collector {
    async fn start() -> Collector {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
        use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        let (spans, logs, metrics): (Kept<_>, Kept<_>, Kept<_>) = Default::default();
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                otlp_route(spans.clone(), |body| {
                    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                    request.resource_spans.into_iter().flat_map(|r| r.scope_spans.into_iter().flat_map(|s| s.spans).map(move |s| (service_name(r.resource.as_ref()), s)).collect::<Vec<_>>()).collect()
                }),
            )
            .route(
                "/v1/logs",
                otlp_route(logs.clone(), |body| {
                    let request = ExportLogsServiceRequest::decode(body).expect("an OTLP logs export");
                    request.resource_logs.into_iter().flat_map(|r| r.scope_logs.into_iter().flat_map(|s| s.log_records).map(move |l| (service_name(r.resource.as_ref()), l)).collect::<Vec<_>>()).collect()
                }),
            )
            .route(
                "/v1/metrics",
                otlp_route(metrics.clone(), |body| {
                    let request = ExportMetricsServiceRequest::decode(body).expect("an OTLP metrics export");
                    request.resource_metrics.into_iter().flat_map(|r| r.scope_metrics.into_iter().flat_map(|s| s.metrics).map(move |m| (service_name(r.resource.as_ref()), m)).collect::<Vec<_>>()).collect()
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { url, spans, logs, metrics }
    }
}

/// The records of the upload's trace reach the collector as OTLP log records of their
/// services, in that trace; and the metrics `/metrics` serves arrive as OTLP metrics
/// of the same kinds, with their attributes.
async fn logs_and_metrics_are_exported_over_otlp(collector: &Collector, trace: &str) {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let records = eventually("the upload's log records at the collector", Duration::from_secs(30), || async {
        let records: Vec<(String, opentelemetry_proto::tonic::logs::v1::LogRecord)> = collector.logs.lock().unwrap().iter().filter(|(_, l)| hex_of(&l.trace_id) == trace).cloned().collect();
        let services: std::collections::BTreeSet<&str> = records.iter().map(|(service, _)| service.as_str()).collect();
        (["echo-gateway", "echo-ingest", "echo-search"].iter().all(|s| services.contains(s))).then_some(records)
    })
    .await;
    let body = |l: &opentelemetry_proto::tonic::logs::v1::LogRecord| match l.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        _ => String::new(),
    };
    let indexed = records.iter().find(|(service, l)| service == "echo-ingest" && body(l).contains("indexed")).unwrap_or_else(|| panic!("ingest's record: {:?}", records.iter().map(|(s, l)| (s, body(l))).collect::<Vec<_>>()));
    assert_eq!(indexed.1.severity_text, "INFO");
    assert!(indexed.1.time_unix_nano > 0);
    let served = records.iter().find(|(service, l)| service == "echo-gateway" && body(l) == "request served").expect("the gateway's record of the upload");
    assert!(served.1.attributes.iter().any(|a| a.key == "status"), "{:?}", served.1.attributes);
    assert_ne!(served.1.span_id, vec![0; 8], "a request's record names its span");

    let metrics = eventually("the metrics at the collector", Duration::from_secs(30), || async {
        let metrics: Vec<(String, opentelemetry_proto::tonic::metrics::v1::Metric)> = collector.metrics.lock().unwrap().clone();
        let names: std::collections::BTreeSet<&str> = metrics.iter().map(|(_, m)| m.name.as_str()).collect();
        (["echo_http_requests_total", "echo_http_request_duration_seconds", "echo_queue_depth", "echo_ingest_stage_seconds"].iter().all(|n| names.contains(n))).then_some(metrics)
    })
    .await;
    assert!(metrics.iter().all(|(service, _)| service == "echo"), "metrics are the process's resource");
    let latest = |name: &str| metrics.iter().rev().find(|(_, m)| m.name == name).and_then(|(_, m)| m.data.clone()).unwrap();
    let Some(Data::Sum(requests)) = Some(latest("echo_http_requests_total")) else { panic!("requests are a sum") };
    assert!(requests.is_monotonic);
    let services: std::collections::BTreeSet<String> = requests
        .data_points
        .iter()
        .flat_map(|p| p.attributes.iter())
        .filter(|a| a.key == "service")
        .filter_map(|a| match a.value.as_ref()?.value.as_ref()? {
            Any::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    for service in ["gateway", "storage", "ingest", "search", "authz"] {
        assert!(services.contains(service), "{service} in {services:?}");
    }
    let Some(Data::Histogram(latency)) = Some(latest("echo_http_request_duration_seconds")) else { panic!("latency is a histogram") };
    assert!(latency.data_points.iter().map(|p| p.count).sum::<u64>() > 0);
    assert!(matches!(latest("echo_queue_depth"), Data::Gauge(_)));
}

/// The upload's trace reaches the collector as one tree of spans: a span per request
/// served (and per bus delivery) in every service it crossed, each child naming a span
/// of the same trace — or the client's — as its parent.
async fn the_upload_trace_is_exported_over_otlp(collector: &Collector, trace: &str) {
    let wanted = ["echo-gateway", "echo-storage", "echo-ingest", "echo-queue", "echo-parser", "echo-search", "echo-authz"];
    let spans = eventually("the upload's spans at the collector", Duration::from_secs(30), || async {
        let spans: Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> =
            collector.spans.lock().unwrap().iter().filter(|(_, s)| hex_of(&s.trace_id) == trace).cloned().collect();
        let services: std::collections::BTreeSet<&str> = spans.iter().map(|(service, _)| service.as_str()).collect();
        (wanted.iter().all(|w| services.contains(w)) && spans.iter().any(|(_, s)| s.name == "deliver echo.document.uploaded")).then_some(spans)
    })
    .await;
    let ids: std::collections::HashSet<String> = spans.iter().map(|(_, s)| hex_of(&s.span_id)).collect();
    for (service, span) in &spans {
        let parent = hex_of(&span.parent_span_id);
        assert!(parent == "00f067aa0ba902b7" || ids.contains(&parent), "{service}'s span {:?} names a parent {parent} that is not in the trace", span.name);
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    }
    let root = spans.iter().find(|(service, s)| service == "echo-gateway" && s.name == "POST /api/v1/documents").expect("the upload's own span");
    assert_eq!(hex_of(&root.1.parent_span_id), "00f067aa0ba902b7", "the gateway's span continues the client's");
    let attributes: Vec<&str> = root.1.attributes.iter().map(|a| a.key.as_str()).collect();
    assert!(attributes.contains(&"http.route") && attributes.contains(&"http.response.status_code"), "{attributes:?}");
    // The worker's stages are children of its delivery, each naming the document.
    let delivery = spans.iter().find(|(_, s)| s.name == "deliver echo.document.uploaded").unwrap();
    let document = text_attribute(&delivery.1, "cloudevents.event_subject").unwrap_or_default();
    assert!(document.starts_with("document:"), "the delivery names its document: {document}");
    let stages: Vec<&opentelemetry_proto::tonic::trace::v1::Span> = spans.iter().filter(|(_, s)| s.name.starts_with("stage ")).map(|(_, s)| s).collect();
    for stage in ["stage parsing", "stage chunking", "stage indexing"] {
        let span = stages.iter().find(|s| s.name == stage).unwrap_or_else(|| panic!("no {stage} span: {:?}", stages.iter().map(|s| &s.name).collect::<Vec<_>>()));
        assert_eq!(span.parent_span_id, delivery.1.span_id, "{stage} is a child of the delivery");
        assert_eq!(text_attribute(span, "echo.document_id").map(|id| format!("document:{id}")), Some(document.clone()));
        assert!(text_attribute(span, "echo.collection_id").is_some_and(|c| !c.is_empty()), "{stage} names its collection");
    }
}

fn text_attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()).and_then(|v| match &v.value {
        Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    })
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const ASKED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// A language model's stand-in over the OpenAI protocol on a real socket: it streams
/// an answer citing passage 1, then the token usage.
async fn stub_model() -> String {
    use axum::response::sse::{Event, Sse};
    async fn completions() -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
        let chunks = [
            serde_json::json!({"id": "s", "object": "chat.completion.chunk", "created": 0, "model": "stub", "choices": [{"index": 0, "delta": {"content": "The relief valve opens at 8 bar [1]."}, "finish_reason": null}]}).to_string(),
            serde_json::json!({"id": "s", "object": "chat.completion.chunk", "created": 0, "model": "stub", "choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": 9, "total_tokens": 51}}).to_string(),
            "[DONE]".to_string(),
        ];
        Sse::new(futures_util::stream::iter(chunks.into_iter().map(|data| Ok(Event::default().data(data)))))
    }
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(completions));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// The ask's model call reaches the collector as a client span under rag's request,
/// with the model and its token counts.
async fn the_model_call_is_a_span_of_the_ask(collector: &Collector) {
    let spans = eventually("the ask's spans at the collector", Duration::from_secs(30), || async {
        let spans: Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> =
            collector.spans.lock().unwrap().iter().filter(|(_, s)| hex_of(&s.trace_id) == ASKED_TRACE).cloned().collect();
        spans.iter().any(|(_, s)| s.name == "chat stub").then_some(spans)
    })
    .await;
    let call = &spans.iter().find(|(_, s)| s.name == "chat stub").unwrap().1;
    let rag = spans.iter().find(|(service, s)| service == "echo-rag" && s.name.contains("/v1/ask")).expect("rag's request span");
    assert_eq!(call.parent_span_id, rag.1.span_id, "the model call is a child of rag's request");
    let tokens = call.attributes.iter().find(|a| a.key == "gen_ai.usage.input_tokens").and_then(|a| a.value.as_ref()).and_then(|v| match v.value {
        Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(n)) => Some(n),
        _ => None,
    });
    assert_eq!(tokens, Some(42));
}
