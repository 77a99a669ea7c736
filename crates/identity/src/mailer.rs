//! Outgoing mail. By default messages are written as RFC 5322 files to
//! `data_dir/outbox/` (the operator delivers or reads them); SMTP delivery by
//! configuration comes with its own change. Never logs message bodies (they carry tokens).

use std::path::Path;

pub(crate) fn send(data_dir: &Path, to: &str, subject: &str, body: &str) -> std::io::Result<()> {
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    let outbox = data_dir.join("outbox");
    std::fs::create_dir_all(&outbox)?;
    let message = format!(
        "From: Echo <echo@localhost>\r\nTo: {}\r\nSubject: {}\r\nDate: {}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}",
        clean(to),
        clean(subject),
        common::rfc3339(common::now_unix()),
        body.replace('\n', "\r\n")
    );
    let path = outbox.join(format!("{}-{}.eml", common::now_unix_ms(), uuid::Uuid::new_v4()));
    std::fs::write(&path, message)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    tracing::info!(file = %path.display(), "mail written to the outbox");
    Ok(())
}
