//! File modes of the data dir. Everything Echo writes there (databases, blobs, the
//! index, logs, mail, keys) is for Echo's own user only: the process creates files
//! with umask 077, the data dir is 0700, and a data dir found looser (an older Echo,
//! a restored backup, a careless `cp`) is tightened with a warning. Secrets (the
//! files under `secrets/`) found readable by others are refused: whoever read them
//! can act as Echo, so tightening them now would hide the exposure.
//! No service logic here; `echod` calls it before anything opens the data dir.

use std::path::{Path, PathBuf};

/// Group and world permission bits.
const OTHERS: u32 = 0o077;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot prepare the data dir {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(
        "refusing to start: {path} is readable by other users of this machine (mode {mode:04o}), and anyone who read it can act as Echo. \
         Replace the secret (delete the file; Echo makes a new one at the next start, and for identity.kek restore the one your backup holds) \
         or, if you are sure nobody read it, run `chmod 600 {path}`. To start anyway and tighten it, set `allow_exposed_secrets: true` \
         (ECHO__ALLOW_EXPOSED_SECRETS=true)"
    )]
    ExposedSecret { path: PathBuf, mode: u32 },
}

/// Makes every file and directory this process creates from now on private to its
/// user (umask 077). Process-wide: call it before any file is written.
pub fn private_umask() {
    #[cfg(unix)]
    {
        let _ = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    }
}

/// What `secure_data_dir` changed.
#[derive(Debug, Default)]
pub struct Tightened {
    /// Files and directories whose group/world permissions were removed.
    pub paths: Vec<PathBuf>,
}

/// Creates `data_dir` (0700) if needed; otherwise removes group and world permissions
/// from it and everything under it (symlinks are not followed), reporting what it
/// changed. Files under `secrets_dir` readable by others are an error unless
/// `allow_exposed_secrets`, in which case they are tightened too.
pub fn secure_data_dir(data_dir: &Path, secrets_dir: &Path, allow_exposed_secrets: bool) -> Result<Tightened, FilesError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| FilesError::Io { path, error }
    };
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let mut tightened = Tightened::default();
    #[cfg(unix)]
    {
        if let Ok(entries) = std::fs::read_dir(secrets_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
                let mode = mode_of(&meta);
                if meta.is_file() && mode & OTHERS != 0 && !allow_exposed_secrets {
                    return Err(FilesError::ExposedSecret { path, mode: mode & 0o7777 });
                }
            }
        }
        tighten(data_dir, &mut tightened).map_err(io(data_dir))?;
    }
    #[cfg(not(unix))]
    let _ = (secrets_dir, allow_exposed_secrets);
    Ok(tightened)
}

#[cfg(unix)]
fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode()
}

#[cfg(unix)]
fn tighten(path: &Path, tightened: &mut Tightened) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Files come and go while the walk runs (an index merging its segments, a database
    // dropping its journal, a process of the same data dir still stopping): one that is
    // gone has nothing left to tighten.
    let gone = |error: &std::io::Error| error.kind() == std::io::ErrorKind::NotFound;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if gone(&error) => return Ok(()),
        Err(error) => return Err(error),
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = mode_of(&meta);
    if mode & OTHERS != 0 {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !OTHERS & 0o7777)) {
            Ok(()) => tightened.paths.push(path.to_path_buf()),
            Err(error) if gone(&error) => return Ok(()),
            Err(error) => return Err(error),
        }
    }
    if meta.is_dir() {
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(error) if gone(&error) => return Ok(()),
            Err(error) => return Err(error),
        };
        for entry in entries {
            match entry {
                Ok(entry) => tighten(&entry.path(), tightened)?,
                Err(error) if gone(&error) => continue,
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}

/// Writes a new secret file readable by its owner only (created 0600, never
/// briefly wider), refusing to replace an existing one.
pub fn write_new_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_loose_data_dir_is_tightened_and_reported() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(data.join("blobs/ab")).unwrap();
        std::fs::write(data.join("identity.db"), b"x").unwrap();
        std::fs::write(data.join("blobs/ab/blob"), b"x").unwrap();
        for path in [data.clone(), data.join("blobs"), data.join("blobs/ab")] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(data.join("identity.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(data.join("blobs/ab/blob"), std::fs::Permissions::from_mode(0o664)).unwrap();
        let tightened = secure_data_dir(&data, &data.join("secrets"), false).unwrap();
        assert_eq!(tightened.paths.len(), 5, "{:?}", tightened.paths);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("identity.db")), 0o600);
        assert_eq!(mode(&data.join("blobs/ab/blob")), 0o600);
        assert!(secure_data_dir(&data, &data.join("secrets"), false).unwrap().paths.is_empty(), "a second pass has nothing to do");
    }

    #[test]
    fn an_exposed_secret_refuses_the_start_unless_allowed() {
        let root = tempfile::tempdir().unwrap();
        let secrets = root.path().join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        write_new_secret(&secrets.join("identity.kek"), b"k").unwrap();
        assert_eq!(mode(&secrets.join("identity.kek")), 0o600);
        assert!(write_new_secret(&secrets.join("identity.kek"), b"other").is_err(), "never replaced");
        std::fs::set_permissions(secrets.join("identity.kek"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = secure_data_dir(root.path(), &secrets, false).unwrap_err().to_string();
        assert!(refused.contains("identity.kek") && refused.contains("0644") && refused.contains("chmod 600"), "{refused}");
        secure_data_dir(root.path(), &secrets, true).unwrap();
        assert_eq!(mode(&secrets.join("identity.kek")), 0o600);
    }

    #[test]
    fn a_path_that_is_gone_has_nothing_to_tighten() {
        let dir = tempfile::tempdir().unwrap();
        let mut tightened = Tightened::default();
        tighten(&dir.path().join("merged-away.idx"), &mut tightened).unwrap();
        assert!(tightened.paths.is_empty());
    }

    #[test]
    fn files_coming_and_going_during_the_walk_do_not_stop_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let churn = data.join("index");
        std::fs::create_dir_all(&churn).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let file = churn.join(format!("segment-{}", n % 64));
                    let _ = std::fs::write(&file, b"x");
                    let _ = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644));
                    if n % 2 == 1 {
                        let _ = std::fs::remove_file(churn.join(format!("segment-{}", (n + 31) % 64)));
                    }
                    n += 1;
                }
            });
            for _ in 0..300 {
                let result = secure_data_dir(&data, &data.join("secrets"), false);
                assert!(result.is_ok(), "{result:?}");
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let mode = std::fs::symlink_metadata(&churn).unwrap().permissions().mode();
        assert_eq!(mode & OTHERS, 0, "what stayed is tightened");
    }
}
