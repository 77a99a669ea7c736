//! `echod ask "…"`: a question to a running Echo through the public API, as the person
//! asking — with an access token (`--token` / `ECHO_TOKEN`) or by signing in as
//! `--user` (password from `ECHO_PASSWORD` or standard input) through the public
//! client `echo-cli` (PKCE, a loopback redirect; registered on first use). The answer
//! streams to standard output as it is written, then its citations.

use std::io::{BufRead, Write};

use anyhow::Context;
use futures_util::StreamExt;

use common::EchoConfig;
use common::wire::{ASK_EVENT_ANSWER, ASK_EVENT_DELTA, ASK_EVENT_ERROR, Answer, AnswerDelta};

const CLI_CLIENT: &str = "echo-cli";
const CLI_REDIRECT: &str = "http://127.0.0.1/echo-cli/callback";

pub struct AskArgs {
    pub question: String,
    pub collection: Option<String>,
    pub token: Option<String>,
    pub user: Option<String>,
}

/// An access token: the one given, or one from signing `user` in.
pub(crate) async fn token(config: &EchoConfig, http: &reqwest::Client, token: Option<&str>, user: Option<&str>) -> anyhow::Result<String> {
    if let Some(token) = token.filter(|t| !t.trim().is_empty()) {
        return Ok(token.to_string());
    }
    let user = user.ok_or_else(|| anyhow::anyhow!("say who asks: --user NAME (password from ECHO_PASSWORD or standard input), or --token / ECHO_TOKEN"))?;
    let password = match std::env::var("ECHO_PASSWORD") {
        Ok(password) if !password.is_empty() => password,
        _ => {
            eprint!("password for {user}: ");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    identity::add_client(config, CLI_CLIENT, vec![CLI_REDIRECT.into()], None, "RS256").await.context("registering the echo-cli client")?;
    crate::bench::sign_in(http, &config.issuer(), CLI_CLIENT, CLI_REDIRECT, user, &password).await.context("signing in (is the password right, and is Echo running?)")
}

/// Asks, printing the answer as it streams; the exit code is 0 when answered, 2 when
/// the documents do not answer it.
pub async fn run(config: EchoConfig, args: AskArgs) -> anyhow::Result<i32> {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let token = token(&config, &http, args.token.as_deref(), args.user.as_deref()).await?;
    let mut body = serde_json::json!({"question": args.question});
    if let Some(collection) = &args.collection {
        body["collections"] = serde_json::json!([collection]);
    }
    let gateway = config.url(common::ServiceName::Gateway);
    let response = http
        .post(format!("{gateway}/api/v1/ask"))
        .bearer_auth(&token)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .json(&body)
        .send()
        .await
        .with_context(|| format!("Echo is not answering at {gateway} (is `echod up` running?)"))?;
    if !response.status().is_success() {
        let status = response.status();
        let problem: serde_json::Value = response.json().await.unwrap_or_default();
        anyhow::bail!("{status}: {}", problem["detail"].as_str().unwrap_or_else(|| problem["title"].as_str().unwrap_or("the question was refused")));
    }
    let mut events = Box::pin(common::sse::events(response.bytes_stream()));
    let mut stdout = std::io::stdout();
    while let Some(event) = events.next().await {
        let event = event?;
        match event.event.as_str() {
            ASK_EVENT_DELTA => {
                let delta: AnswerDelta = serde_json::from_str(&event.data)?;
                write!(stdout, "{}", delta.text)?;
                stdout.flush()?;
            }
            ASK_EVENT_ANSWER => {
                let answer: Answer = serde_json::from_str(&event.data)?;
                writeln!(stdout)?;
                if !answer.citations.is_empty() {
                    writeln!(stdout)?;
                }
                for citation in &answer.citations {
                    let mut source = citation.title.clone().unwrap_or_else(|| citation.document_id.clone());
                    if let Some(section) = &citation.section {
                        source.push_str(&format!(" — {section}"));
                    }
                    if let Some(page) = citation.page {
                        source.push_str(&format!(", page {page}"));
                    }
                    writeln!(stdout, "[{}] {source} (document {})", citation.n, citation.document_id)?;
                }
                return Ok(if answer.not_found { 2 } else { 0 });
            }
            ASK_EVENT_ERROR => {
                let problem: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
                writeln!(stdout)?;
                anyhow::bail!("{}", problem["detail"].as_str().unwrap_or("the answer failed"));
            }
            _ => {}
        }
    }
    anyhow::bail!("the answer stopped before it was complete")
}
