//! Watches the files a login must write and decides when they hold a new,
//! complete credential. A baseline (hash of each file, if present) is taken
//! before the CLI starts, so a stale credential already on disk never
//! counts as a login; inotify on the parent directories wakes the check;
//! a file that does not parse yet (a CLI rewriting it in place, in several
//! writes) is simply not ready until a later event. Used by
//! [`super::session`].

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use airlock_proto::{CapturedFile, SecretBytes, ShapeError, MAX_CREDENTIAL_BYTES};
use futures_util::StreamExt;
use inotify::{EventStream, Inotify, WatchMask};
use sha2::{Digest, Sha256};

/// A credential file to watch.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Absolute path.
    pub path: PathBuf,
    /// JSON pointers that must hold non-empty values.
    pub required: Vec<String>,
}

/// Why a file is not ready yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Not there.
    Missing,
    /// Same bytes as before the login started (a stale credential).
    Unchanged,
    /// There, but not (yet) a valid credential.
    Incomplete(String),
}

#[derive(Debug)]
struct Watched {
    spec: WatchSpec,
    baseline: Option<[u8; 32]>,
}

/// The watch over one login's credential files.
#[derive(Debug)]
pub struct CredentialWatch {
    files: Vec<Watched>,
    names: Vec<OsString>,
    events: EventStream<Vec<u8>>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl CredentialWatch {
    /// Creates the parent directories (0700), records the baseline and
    /// starts watching. Call before starting the CLI.
    pub fn start(specs: Vec<WatchSpec>) -> std::io::Result<Self> {
        let inotify = Inotify::init()?;
        let mask =
            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::MODIFY;
        let mut files = Vec::new();
        let mut names = Vec::new();
        for spec in specs {
            let parent = spec.path.parent().unwrap_or(Path::new("/"));
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
            inotify.watches().add(parent, mask)?;
            names.push(spec.path.file_name().unwrap_or_default().to_os_string());
            let baseline = std::fs::read(&spec.path).ok().map(|b| digest(&b));
            files.push(Watched { spec, baseline });
        }
        let events = inotify.into_event_stream(vec![0u8; 4096])?;
        Ok(Self {
            files,
            names,
            events,
        })
    }

    /// Waits for a change to one of the watched files.
    pub async fn changed(&mut self) {
        while let Some(Ok(event)) = self.events.next().await {
            if event.name.is_some_and(|n| self.names.contains(&n)) {
                return;
            }
        }
        // The stream ended (it never does while the fd is open): wait forever
        // rather than spin; the login's other deadlines still apply.
        std::future::pending::<()>().await;
    }

    /// All files, if every one holds a new valid credential; otherwise why
    /// the first one that does not is not ready.
    pub fn check(&self) -> Result<Vec<CapturedFile>, (PathBuf, NotReady)> {
        let mut captured = Vec::new();
        for (index, w) in self.files.iter().enumerate() {
            let (contents, mode) = read_new(w).map_err(|why| (w.spec.path.clone(), why))?;
            captured.push(CapturedFile {
                index: index as u32,
                mode,
                contents: SecretBytes::new(contents),
            });
        }
        Ok(captured)
    }
}

fn read_new(w: &Watched) -> Result<(Vec<u8>, u32), NotReady> {
    let meta = std::fs::metadata(&w.spec.path).map_err(|_| NotReady::Missing)?;
    if !meta.is_file() || meta.len() as usize > MAX_CREDENTIAL_BYTES {
        return Err(NotReady::Incomplete(
            "not a regular file of a credential's size".into(),
        ));
    }
    let bytes = std::fs::read(&w.spec.path).map_err(|_| NotReady::Missing)?;
    if w.baseline == Some(digest(&bytes)) {
        return Err(NotReady::Unchanged);
    }
    check_json(&bytes, &w.spec.required)?;
    Ok((bytes, meta.permissions().mode() & 0o7777))
}

/// Parses `bytes` as JSON and checks every pointer holds a non-empty value.
pub fn check_json(bytes: &[u8], required: &[String]) -> Result<(), NotReady> {
    airlock_proto::check_shape(bytes, required).map_err(|e| match e {
        ShapeError::NotJson(why) => NotReady::Incomplete(format!("not valid JSON yet ({why})")),
        missing => NotReady::Incomplete(missing.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &Path) -> WatchSpec {
        WatchSpec {
            path: path.to_path_buf(),
            required: vec!["/tokens/access_token".into()],
        }
    }

    #[tokio::test]
    async fn stale_partial_then_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codex/auth.json");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, br#"{"tokens":{"access_token":"old"}}"#).unwrap();
        let mut watch = CredentialWatch::start(vec![spec(&path)]).unwrap();
        assert_eq!(
            watch.check().unwrap_err().1,
            NotReady::Unchanged,
            "a stale file is not a login"
        );

        std::fs::write(&path, br#"{"tokens":{"acc"#).unwrap();
        watch.changed().await;
        assert!(
            matches!(watch.check().unwrap_err().1, NotReady::Incomplete(_)),
            "partial write tolerated"
        );

        std::fs::write(&path, br#"{"tokens":{"access_token":"new"}}"#).unwrap();
        watch.changed().await;
        let files = watch.check().unwrap();
        assert_eq!(
            files[0].contents.expose(),
            br#"{"tokens":{"access_token":"new"}}"#
        );
    }

    #[test]
    fn required_fields_must_be_non_empty() {
        assert!(check_json(br#"{"a":"x"}"#, &["/a".into()]).is_ok());
        assert!(check_json(br#"{"a":""}"#, &["/a".into()]).is_err());
        assert!(check_json(br#"{"b":1}"#, &["/a".into()]).is_err());
    }
}
