//! Writing credential files the way each real CLI does, because airlock's
//! watcher must cope with each style:
//!
//! * in place, truncate then write (Codex's `FileAuthStorage::save`:
//!   `OpenOptions::truncate(true).write(true).create(true).mode(0o600)`,
//!   `write_all`, `flush`). The real one writes the JSON in one call; the
//!   fake writes it in two chunks with a flush between, so a watcher can
//!   really observe a torn file, and can be held between the chunks by a
//!   test (see [`WRITE_GATE_VAR`]);
//! * in place then `chmod 0600` (Node's `fs.writeFile(…, {mode: 0o600})`
//!   followed by `fs.chmod`, as Gemini CLI's `cacheCredentials` does;
//!   Claude Code is treated the same way);
//! * atomically, temp file plus rename (the demo CLI).
//!
//! `mode` only applies when a file is created, as with the real calls.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Env var naming a FIFO the two-chunk writer reads one byte from between
/// its chunks; tests use it to look at the torn file deterministically.
pub const WRITE_GATE_VAR: &str = "AIRLOCK_FAKE_CLI_WRITE_GATE";

/// A credential file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CredFileError {
    /// Creating the directory, writing, renaming or chmod failed.
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

/// Codex style: open (create 0600, truncate), write in two chunks with a
/// flush between, flush.
pub fn write_in_place_two_chunks(path: &Path, data: &[u8]) -> Result<(), CredFileError> {
    ensure_parent(path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("open", path))?;
    let (first, second) = data.split_at(data.len() / 2);
    file.write_all(first).map_err(io_err("write", path))?;
    file.flush().map_err(io_err("flush", path))?;
    file.sync_data().map_err(io_err("sync", path))?;
    wait_at_gate();
    file.write_all(second).map_err(io_err("write", path))?;
    file.flush().map_err(io_err("flush", path))
}

/// Blocks until one byte (or EOF) arrives on the FIFO named by
/// [`WRITE_GATE_VAR`], if it is set.
fn wait_at_gate() {
    if let Some(gate) = std::env::var_os(WRITE_GATE_VAR).filter(|g| !g.is_empty()) {
        if let Ok(mut fifo) = fs::File::open(&gate) {
            let mut byte = [0u8; 1];
            let _ = fifo.read(&mut byte);
        }
    }
}

/// Node style: `writeFile(path, data, {mode: 0o600})` then `chmod 0600`.
pub fn write_in_place_then_chmod(path: &Path, data: &[u8]) -> Result<(), CredFileError> {
    ensure_parent(path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("open", path))?;
    file.write_all(data).map_err(io_err("write", path))?;
    drop(file);
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", path))
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
