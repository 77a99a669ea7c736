//! `echod bench flood`: what one user's flood does to a colleague. A real system in a
//! temporary data dir; the colleague calls `GET /api/v1/me` one request at a time
//! from its own address, first alone, then while the flooder hammers the same
//! endpoint with `concurrency` connections from another address. Run with the rate
//! limits on (the default) and, as the baseline a user would otherwise have, off.
//! Prints the colleague's p50/p99 in each phase and what the flooder got through.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::EchoConfig;
use common::config::Switch;

use super::percentile;

const CLIENT: &str = "bench-flood";
const REDIRECT: &str = "http://127.0.0.1:9/cb";

fn client_from(address: &str) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).local_address(address.parse::<std::net::IpAddr>()?).pool_max_idle_per_host(256).build()?)
}

/// The colleague's latencies over `seconds`, one request at a time.
async fn colleague(http: &reqwest::Client, url: &str, token: &str, seconds: u64) -> anyhow::Result<(Vec<Duration>, usize)> {
    let mut samples = Vec::new();
    let mut refused = 0;
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        let sent = Instant::now();
        let status = http.get(url).bearer_auth(token).send().await?.status();
        samples.push(sent.elapsed());
        if !status.is_success() {
            refused += 1;
        }
        // A person clicking, not a loop: about 20 requests a second.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples.sort();
    Ok((samples, refused))
}

async fn run_once(limits: Switch, seconds: u64, concurrency: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = EchoConfig::for_test(dir.path());
    config.log.ship = false;
    config.log.level = "error".into();
    config.gateway.rate_limits = limits;
    let system = crate::up(config).await?;
    crate::wait_ready(&system.config, Duration::from_secs(60)).await?;
    let config = (*system.config).clone();
    identity::add_client(&config, CLIENT, vec![REDIRECT.into()], None, "RS256").await?;
    for name in ["flooder", "colleague"] {
        identity::add_user(&config, name, "bench-password-123", "bench", "member", None).await?;
    }
    let issuer = config.issuer();
    let url = format!("{}/api/v1/me", config.url(common::ServiceName::Gateway));
    let (flood_http, colleague_http) = (client_from("127.0.0.3")?, client_from("127.0.0.4")?);
    let flooder_token = super::sign_in(&flood_http, &issuer, CLIENT, REDIRECT, "flooder", "bench-password-123").await?;
    let colleague_token = super::sign_in(&colleague_http, &issuer, CLIENT, REDIRECT, "colleague", "bench-password-123").await?;

    let (quiet, quiet_refused) = colleague(&colleague_http, &url, &colleague_token, seconds).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (served, throttled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, url, token, stop, served, throttled) = (flood_http.clone(), url.clone(), flooder_token.clone(), stop.clone(), served.clone(), throttled.clone());
        flood.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http.get(&url).bearer_auth(&token).send().await.map(|r| r.status().as_u16()) {
                    Ok(200) => served.fetch_add(1, Ordering::Relaxed),
                    Ok(_) | Err(_) => throttled.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    let started = Instant::now();
    let (flooded, flooded_refused) = colleague(&colleague_http, &url, &colleague_token, seconds).await?;
    stop.store(true, Ordering::Relaxed);
    while flood.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let label = if limits == Switch::On { "on" } else { "off" };
    println!(
        "flood rate_limits={label}: colleague alone p50={:?} p99={:?} ({quiet_refused} refused of {}); during the flood p50={:?} p99={:?} ({flooded_refused} refused of {}); flooder served {:.0}/s, refused {:.0}/s ({concurrency} connections)",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        quiet.len(),
        percentile(&flooded, 0.5),
        percentile(&flooded, 0.99),
        flooded.len(),
        served.load(Ordering::Relaxed) as f64 / elapsed,
        throttled.load(Ordering::Relaxed) as f64 / elapsed,
    );
    system.stop().await;
    Ok(())
}

pub async fn run(seconds: u64, concurrency: usize) -> anyhow::Result<()> {
    run_once(Switch::On, seconds, concurrency).await?;
    run_once(Switch::Off, seconds, concurrency).await
}
