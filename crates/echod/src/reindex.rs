//! `echod reindex`: rebuilds the whole index (after a change of embedding model or of
//! chunking) through the ingest service of a running Echo, or of one started here for
//! the purpose when none answers. Searches keep answering from the old index until
//! the new one is complete. A rebuild cut short (ctrl-c, a crash) resumes where it was
//! at the next `echod up` or `echod reindex`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use common::wire::ReindexRun;
use common::{EchoConfig, ServiceContext, ServiceName};

/// Runs (or resumes) a rebuild to its end, calling `progress` as it goes; returns the
/// finished run. `stop` interrupts the wait (the rebuild itself goes on in a running
/// Echo, or resumes at the next start of one started here).
pub async fn run(config: EchoConfig, stop: CancellationToken, mut progress: impl FnMut(&ReindexRun)) -> anyhow::Result<ReindexRun> {
    let http = reqwest::Client::new();
    let health = format!("{}/healthz", config.url(ServiceName::Ingest));
    let running = http.get(&health).timeout(Duration::from_secs(2)).send().await.is_ok_and(|r| r.status().is_success());
    let (system, config) = if running {
        (None, config)
    } else {
        eprintln!("  Echo is not running here; starting it for the rebuild…");
        let system = crate::up(config).await?;
        crate::wait_ready(&system.config, Duration::from_secs(60)).await?;
        let config = (*system.config).clone();
        (Some(system), config)
    };
    let outcome = drive(&config, &stop, &mut progress).await;
    if let Some(system) = system {
        system.stop().await;
    }
    outcome
}

async fn drive(config: &EchoConfig, stop: &CancellationToken, progress: &mut impl FnMut(&ReindexRun)) -> anyhow::Result<ReindexRun> {
    // The command acts as ingest itself: whoever holds the data dir holds its secret.
    let ctx = ServiceContext::new(std::sync::Arc::new(config.clone()), ServiceName::Ingest, CancellationToken::new())?;
    let mut run: ReindexRun = ctx.peers.post_json(ServiceName::Ingest, "/v1/reindex", None, &serde_json::json!({})).await.map_err(|e| anyhow::anyhow!("starting the rebuild: {}", e.detail))?;
    loop {
        progress(&run);
        match run.status.as_str() {
            "done" => return Ok(run),
            "stopped" => anyhow::bail!("the rebuild stopped: {}; run `echod reindex` again to resume it", run.error.as_deref().unwrap_or("unknown error")),
            _ => {}
        }
        tokio::select! {
            _ = stop.cancelled() => anyhow::bail!("interrupted at {} of {} documents; the rebuild resumes with the next `echod up` or `echod reindex`", run.done, run.total),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        run = ctx.peers.get_json(ServiceName::Ingest, "/v1/reindex", None).await.map_err(|e| anyhow::anyhow!("reading the rebuild's progress: {}", e.detail))?;
    }
}

/// One line of progress: `[#####.....] 120/400 documents (2 failed)`.
pub fn progress_line(run: &ReindexRun) -> String {
    const WIDTH: i64 = 30;
    let total = run.total.max(1);
    let filled = ((run.done + run.failed).min(total) * WIDTH / total) as usize;
    let bar: String = "#".repeat(filled) + &".".repeat(WIDTH as usize - filled);
    let failed = if run.failed > 0 { format!(" ({} failed)", run.failed) } else { String::new() };
    format!("[{bar}] {}/{} documents{failed}", run.done + run.failed, run.total)
}
