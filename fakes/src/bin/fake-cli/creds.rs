//! Writing the demo CLI's credential file atomically (temp file, fsync,
//! rename), created mode 0600, so airlock's watcher sees either the old
//! file or the whole new one.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A credential file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CredFileError {
    /// Creating the directory, writing, syncing or renaming failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The path involved.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CredFileError + 'a {
    move |source| CredFileError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn ensure_parent(path: &Path) -> Result<(), CredFileError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))
        }
        _ => Ok(()),
    }
}

/// Atomic: write `{path}.tmp-{pid}` (0600), fsync, rename over `path`.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), CredFileError> {
    ensure_parent(path)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = Path::new(&tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err("open", tmp))?;
    file.write_all(data).map_err(io_err("write", tmp))?;
    file.sync_all().map_err(io_err("sync", tmp))?;
    drop(file);
    fs::rename(tmp, path).map_err(io_err("rename", path))
}
