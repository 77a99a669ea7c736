//! Outgoing mail. With `identity.smtp_url` set, messages go over SMTP (lettre;
//! `smtps://` for TLS, `?tls=required` for STARTTLS); otherwise, and whenever SMTP
//! delivery fails, they are written as RFC 5322 files to `data_dir/outbox/` (mode
//! 0600) so nothing is lost. Never logs bodies (they carry tokens) or the SMTP URL
//! (it may carry a password).

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use common::EchoConfig;

/// How a message left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Smtp,
    Outbox,
}

#[derive(Clone)]
pub(crate) struct Mailer {
    smtp: Option<AsyncSmtpTransport<Tokio1Executor>>,
    from: String,
    outbox: PathBuf,
}

impl Mailer {
    pub(crate) fn from_config(config: &EchoConfig) -> Result<Mailer, String> {
        let smtp = if config.identity.smtp_url.is_empty() {
            None
        } else {
            // lettre's error text can quote the URL: replace it.
            let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(config.identity.smtp_url.expose())
                .map_err(|_| "identity.smtp_url is not a valid SMTP URL (the value is not shown)".to_string())?;
            Some(builder.timeout(Some(Duration::from_secs(15))).build())
        };
        config.identity.mail_from.parse::<lettre::message::Mailbox>().map_err(|e| format!("identity.mail_from: {e}"))?;
        Ok(Mailer { smtp, from: config.identity.mail_from.clone(), outbox: config.data_dir.join("outbox") })
    }

    /// Sends one plain-text message: SMTP when configured, the outbox otherwise or
    /// when SMTP refuses or cannot be reached.
    pub(crate) async fn send(&self, to: &str, subject: &str, body: &str) -> std::io::Result<Delivery> {
        if let Some(smtp) = &self.smtp {
            match self.message(to, subject, body) {
                Ok(message) => match smtp.send(message).await {
                    Ok(_) => {
                        tracing::info!("mail delivered over SMTP");
                        return Ok(Delivery::Smtp);
                    }
                    Err(error) => {
                        tracing::warn!(error = %smtp_error_summary(&error), "SMTP delivery failed; the message is kept in the outbox")
                    }
                },
                Err(error) => tracing::warn!(%error, "mail not addressable; kept in the outbox"),
            }
        }
        write_outbox(&self.outbox, &self.from, to, subject, body)?;
        Ok(Delivery::Outbox)
    }

    fn message(&self, to: &str, subject: &str, body: &str) -> Result<Message, String> {
        Message::builder()
            .from(self.from.parse().map_err(|e| format!("from: {e}"))?)
            .to(to.parse().map_err(|e| format!("recipient: {e}"))?)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_string())
            .map_err(|e| e.to_string())
    }
}

/// The kind of failure without anything that could echo credentials.
fn smtp_error_summary(error: &lettre::transport::smtp::Error) -> String {
    if error.is_timeout() {
        "timed out".into()
    } else if error.is_permanent() {
        format!("refused permanently ({:?})", error.status())
    } else if error.is_transient() {
        format!("refused for now ({:?})", error.status())
    } else {
        "connection or protocol error".into()
    }
}

fn write_outbox(outbox: &Path, from: &str, to: &str, subject: &str, body: &str) -> std::io::Result<()> {
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    std::fs::create_dir_all(outbox)?;
    let message = format!(
        "From: {}\r\nTo: {}\r\nSubject: {}\r\nDate: {}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}",
        clean(from),
        clean(to),
        clean(subject),
        common::rfc3339(common::now_unix()),
        body.replace('\n', "\r\n")
    );
    // Written whole under a hidden name (owner-only from the start: it holds a reset
    // link), then renamed: whoever picks up `*.eml` never reads half a message.
    let name = format!("{}-{}", common::now_unix_ms(), uuid::Uuid::new_v4());
    let partial = outbox.join(format!(".{name}.part"));
    let path = outbox.join(format!("{name}.eml"));
    common::files::write_new_secret(&partial, message.as_bytes())?;
    std::fs::rename(&partial, &path)?;
    tracing::info!(file = %path.display(), "mail written to the outbox");
    Ok(())
}
