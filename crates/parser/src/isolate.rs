//! The parent side of isolated extraction: a small pool of `echod parse-worker` child
//! processes. A file goes to an idle worker (or a new one); the time limit kills the
//! worker, so no extraction outlives its job; a worker that dies (a panic the parser
//! could not contain, an abort, the memory limit) costs that file alone and is
//! replaced. Workers are recycled after a number of files so that nothing a parser
//! leaks accumulates.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Mutex, Semaphore};

use common::formats::Format;
use common::wire::ParsedDocument;

use crate::formats::ParseError;
use crate::worker::{Request, Response};

/// Files a worker extracts before it is replaced.
const JOBS_PER_WORKER: u32 = 200;

/// What a worker needs to be started.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub memory_mb: u64,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    jobs: u32,
}

impl Worker {
    async fn exchange(&mut self, request: &Request, body: &[u8], max_response: usize) -> std::io::Result<Response> {
        let header = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        let header_len = u32::try_from(header.len()).map_err(std::io::Error::other)?;
        self.stdin.write_all(&header_len.to_le_bytes()).await?;
        self.stdin.write_all(&header).await?;
        self.stdin.write_all(&(body.len() as u64).to_le_bytes()).await?;
        self.stdin.write_all(body).await?;
        self.stdin.flush().await?;
        let length = self.stdout.read_u32_le().await? as usize;
        if length > max_response {
            return Err(std::io::Error::other(format!("the worker answered with {length} bytes")));
        }
        let mut response = vec![0u8; length];
        self.stdout.read_exact(&mut response).await?;
        serde_json::from_slice(&response).map_err(std::io::Error::other)
    }

    /// Stops the worker now and reaps it.
    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A pool of parse workers (at most `size` at once).
pub struct Pool {
    command: WorkerCommand,
    slots: Semaphore,
    idle: Mutex<Vec<Worker>>,
}

impl Pool {
    pub fn new(command: WorkerCommand, size: usize) -> Pool {
        Pool { command, slots: Semaphore::new(size.max(1)), idle: Mutex::new(Vec::new()) }
    }

    fn spawn(&self) -> std::io::Result<Worker> {
        let mut child = Command::new(&self.command.program)
            .arg("parse-worker")
            .arg("--memory-mb")
            .arg(self.command.memory_mb.to_string())
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("the worker has no pipes"));
        };
        Ok(Worker { child, stdin, stdout, jobs: 0 })
    }

    /// Extracts `bytes` in a worker within `timeout`.
    pub async fn extract(&self, format: Format, bytes: &[u8], max_output_chars: usize, timeout: Duration) -> Result<ParsedDocument, ParseError> {
        let _slot = self.slots.acquire().await.map_err(|_| ParseError::Corrupt("the parser is shutting down".into()))?;
        let request = Request { format: format.as_str().to_string(), max_output_chars, max_input_bytes: bytes.len() as u64 };
        // JSON escapes at most six bytes per character, plus the structure.
        let max_response = max_output_chars.saturating_mul(6).saturating_add(1 << 20);
        let deadline = tokio::time::Instant::now() + timeout;
        // A reused worker may have died while idle: then one fresh worker gets the file.
        for attempt in 0..2 {
            let reused = self.idle.lock().await.pop();
            let fresh = reused.is_none();
            let mut worker = match reused {
                Some(worker) => worker,
                None => self.spawn().map_err(|e| ParseError::Corrupt(format!("cannot start a parse worker: {e}")))?,
            };
            match tokio::time::timeout_at(deadline, worker.exchange(&request, bytes, max_response)).await {
                Err(_) => {
                    worker.kill().await;
                    metrics::counter!("echo_parser_workers_killed_total", "reason" => "timeout").increment(1);
                    return Err(ParseError::Timeout(timeout.as_millis() as u64));
                }
                Ok(Ok(response)) => {
                    worker.jobs += 1;
                    if worker.jobs < JOBS_PER_WORKER {
                        self.idle.lock().await.push(worker);
                    } else {
                        worker.kill().await;
                    }
                    return match response {
                        Response::Parsed(parsed) => Ok(parsed),
                        Response::Failed(error) => Err(error),
                    };
                }
                Ok(Err(error)) => {
                    let status = worker.child.try_wait().ok().flatten();
                    worker.kill().await;
                    if fresh || attempt == 1 {
                        metrics::counter!("echo_parser_workers_killed_total", "reason" => "crash").increment(1);
                        tracing::warn!(%error, ?status, format = format.as_str(), "a parse worker stopped on a file");
                        return Err(ParseError::Corrupt(format!(
                            "the parser stopped on this file (it crashed or needed more than {} MB of memory)",
                            self.command.memory_mb
                        )));
                    }
                }
            }
        }
        Err(ParseError::Corrupt("the parser stopped on this file".into()))
    }
}

/// The program that runs `parse-worker`: `configured` when set; else this executable
/// when it is `echod`; else an `echod` beside it or one directory up (a test binary in
/// `target/*/deps` finds `target/*/echod`).
pub fn worker_program(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = configured {
        return Some(path.to_path_buf());
    }
    let current = std::env::current_exe().ok()?;
    if current.file_stem().is_some_and(|s| s == "echod") {
        return Some(current);
    }
    let dir = current.parent()?;
    [dir.join("echod"), dir.parent()?.join("echod")].into_iter().find(|p| p.is_file())
}
