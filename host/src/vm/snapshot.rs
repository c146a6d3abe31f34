//! Browser VM snapshots: a browser VM saved once Chromium shows a blank
//! page, before anything session-specific exists in it (no login, no
//! profile data, no credential, egress that allows nothing), and restored
//! for each session instead of booting. One snapshot per combination of
//! what it depends on (the image, the agent build, Chromium's settings,
//! the VM's size and the VMM's machine), named by a hash of those inputs,
//! under `<snapshot_dir>/<key>/` with its `manifest.json`. A snapshot whose
//! manifest does not match what airlockd would make now is refused (and
//! replaced). Made and kept by [`super::restore::Restorer`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_proto::BrowserSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped when the way snapshots are made changes.
pub const FORMAT: u32 = 2;
/// The saved state's file in a snapshot's directory.
const STATE_FILE: &str = "state.bin";
const MANIFEST_FILE: &str = "manifest.json";

/// A snapshot cannot be used or made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Its manifest names other inputs than airlockd would use now.
    #[error("snapshot {dir} was made for {what} {theirs:?}, but airlockd now uses {ours:?}; it is replaced")]
    Mismatch {
        /// The snapshot's directory.
        dir: PathBuf,
        /// Which input differs.
        what: &'static str,
        /// The manifest's value.
        theirs: String,
        /// The current value.
        ours: String,
    },
    /// Its files are incomplete or unreadable.
    #[error("snapshot {dir} is unusable: {why}; it is replaced")]
    Corrupt {
        /// The snapshot's directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Making one failed.
    #[error("cannot make a browser VM snapshot: {0}")]
    Make(String),
    /// A filesystem step failed.
    #[error("{context}: {source}")]
    Io {
        /// What airlockd was doing.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let context = context.into();
    move |source| SnapshotError::Io { context, source }
}

/// Everything a saved browser VM depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inputs {
    /// [`FORMAT`].
    pub format: u32,
    /// The browser image's hash.
    pub image_sha256: String,
    /// The agent build it runs.
    pub agent_build_id: String,
    /// The VMM, machine, CPU and acceleration ([`super::backend::VmBackend::snapshot_compat`]).
    pub vmm: String,
    /// Memory (MiB).
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// The vsock port its agent dials.
    pub agent_port: u32,
    /// What its Chromium was started with.
    pub browser: BrowserSpec,
}

impl Inputs {
    /// The snapshot's name: a hash of the inputs.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first input that differs from `other`, with both values.
    fn difference(&self, other: &Inputs) -> Option<(&'static str, String, String)> {
        let pairs: [(&'static str, String, String); 7] = [
            ("format", self.format.to_string(), other.format.to_string()),
            (
                "image",
                self.image_sha256.clone(),
                other.image_sha256.clone(),
            ),
            (
                "agent build",
                self.agent_build_id.clone(),
                other.agent_build_id.clone(),
            ),
            ("VMM", self.vmm.clone(), other.vmm.clone()),
            (
                "memory (MiB)",
                self.memory_mib.to_string(),
                other.memory_mib.to_string(),
            ),
            ("vCPUs", self.vcpus.to_string(), other.vcpus.to_string()),
            (
                "agent port",
                self.agent_port.to_string(),
                other.agent_port.to_string(),
            ),
        ];
        if let Some(d) = pairs.into_iter().find(|(_, a, b)| a != b) {
            return Some(d);
        }
        (self.browser != other.browser).then(|| {
            let show = |b: &BrowserSpec| serde_json::to_string(b).unwrap_or_default();
            (
                "browser settings",
                show(&self.browser),
                show(&other.browser),
            )
        })
    }
}

/// A snapshot's `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// What it was made from.
    pub inputs: Inputs,
    /// Bytes of the saved state.
    pub state_bytes: u64,
    /// Bytes of guest RAM kept beside it (holes and zeros left out).
    #[serde(default)]
    pub ram_bytes: u64,
    /// From the template VM's request to Chromium on its blank page (ms).
    pub boot_ms: u64,
    /// Saving the state (ms).
    pub save_ms: u64,
    /// When it was made (RFC 3339).
    pub created_at: String,
}

/// A usable snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Snapshot {
    /// The saved state.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Its key.
    pub fn key(&self) -> String {
        self.manifest.inputs.key()
    }
}

/// Where snapshots live.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Snapshots under `root` (created on first save).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The directory a snapshot of `inputs` lives in.
    pub fn dir_for(&self, inputs: &Inputs) -> PathBuf {
        self.root.join(inputs.key())
    }

    /// The snapshot made from `inputs`: `Ok(None)` when there is none, an
    /// error (after which the caller removes it) when it does not match.
    pub fn load(&self, inputs: &Inputs) -> Result<Option<Snapshot>, SnapshotError> {
        let dir = self.dir_for(inputs);
        let text = match std::fs::read_to_string(dir.join(MANIFEST_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("read {}", dir.display()))(e)),
        };
        let corrupt = |why: String| SnapshotError::Corrupt {
            dir: dir.clone(),
            why,
        };
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| corrupt(format!("its manifest is not valid: {e}")))?;
        if let Some((what, theirs, ours)) = manifest.inputs.difference(inputs) {
            return Err(SnapshotError::Mismatch {
                dir,
                what,
                theirs,
                ours,
            });
        }
        let size = std::fs::metadata(dir.join(STATE_FILE)).map(|m| m.len());
        if size.as_ref().ok() != Some(&manifest.state_bytes) {
            return Err(corrupt(format!(
                "{STATE_FILE} is {size:?} bytes, its manifest says {}",
                manifest.state_bytes
            )));
        }
        let ram = super::ramfile::beside(&dir.join(STATE_FILE));
        let ram_len = std::fs::metadata(&ram).map(|m| m.len());
        let guest = u64::from(manifest.inputs.memory_mib) << 20;
        if ram_len.as_ref().ok() != Some(&guest) {
            return Err(corrupt(format!(
                "its guest RAM {} is {ram_len:?} bytes, the VM has {guest}",
                ram.display()
            )));
        }
        Ok(Some(Snapshot { dir, manifest }))
    }

    /// A fresh directory to save a new snapshot in, beside the final one.
    pub fn staging(&self, inputs: &Inputs) -> Result<PathBuf, SnapshotError> {
        let dir = self.root.join(format!(
            ".new-{}-{}",
            inputs.key(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        Ok(dir)
    }

    /// The state file a save into `staging` writes.
    pub fn staged_state(staging: &Path) -> PathBuf {
        staging.join(STATE_FILE)
    }

    /// Writes the manifest into `staging` and moves it into place,
    /// replacing any older snapshot of the same inputs.
    pub fn install(&self, staging: &Path, manifest: Manifest) -> Result<Snapshot, SnapshotError> {
        let text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        let path = staging.join(MANIFEST_FILE);
        std::fs::write(&path, text).map_err(io(format!("write {}", path.display())))?;
        let dir = self.dir_for(&manifest.inputs);
        self.remove(&dir);
        std::fs::rename(staging, &dir).map_err(io(format!("move {}", dir.display())))?;
        Ok(Snapshot { dir, manifest })
    }

    /// Removes a snapshot's (or a staging) directory, if present.
    pub fn remove(&self, dir: &Path) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a snapshot");
            }
        }
    }

    /// Removes leftover staging directories and snapshots made from
    /// another image or agent build than `current` (stale for every
    /// airlockd sharing this directory); snapshots of other settings stay.
    /// Called with the store locked.
    pub fn prune(&self, current: &Inputs) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !path.is_dir() {
                continue;
            }
            let staging = e.file_name().to_string_lossy().starts_with(".new-");
            let stale = std::fs::read_to_string(path.join(MANIFEST_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<Manifest>(&t).ok())
                .is_none_or(|m| {
                    m.inputs.format != current.format
                        || m.inputs.image_sha256 != current.image_sha256
                        || m.inputs.agent_build_id != current.agent_build_id
                });
            if staging || stale {
                tracing::info!(dir = %path.display(), "removing an outdated snapshot");
                self.remove(&path);
            }
        }
    }

    /// Locks the store against other airlockd making or pruning
    /// snapshots in it (held while loading or making one).
    pub async fn lock(&self) -> Result<StoreLock, SnapshotError> {
        std::fs::create_dir_all(&self.root)
            .map_err(io(format!("create {}", self.root.display())))?;
        let path = self.root.join(".lock");
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        let locked = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| std::io::Error::from(e))
        })
        .await
        .map_err(|e| io("lock the snapshot store")(std::io::Error::other(e)))?
        .map_err(io(format!("lock {}", path.display())))?;
        Ok(StoreLock { _held: locked })
    }
}

/// The store's lock; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _held: nix::fcntl::Flock<std::fs::File>,
}

/// Milliseconds, for manifests and timings.
pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            format: FORMAT,
            image_sha256: "abc".into(),
            agent_build_id: "0123".into(),
            vmm: "QEMU 7.2 | machine q35".into(),
            memory_mib: 1536,
            vcpus: 2,
            agent_port: 1024,
            browser: BrowserSpec {
                width: 1280,
                height: 720,
                max_width: 1280,
                max_height: 1280,
                proxy: None,
                chromium: Some("chromium".into()),
                extra_args: Vec::new(),
                extra_ca_pem: None,
            },
        }
    }

    fn manifest(inputs: Inputs, state_bytes: u64) -> Manifest {
        Manifest {
            inputs,
            state_bytes,
            ram_bytes: 0,
            boot_ms: 1,
            save_ms: 1,
            created_at: "now".into(),
        }
    }

    #[test]
    fn a_snapshot_is_found_by_its_inputs_and_refused_when_they_differ() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().to_path_buf());
        assert!(store.load(&inputs()).unwrap().is_none());
        let staging = store.staging(&inputs()).unwrap();
        std::fs::write(Store::staged_state(&staging), b"state").unwrap();
        sparse_ram(&staging, 1536);
        let snap = store.install(&staging, manifest(inputs(), 5)).unwrap();
        assert_eq!(snap.key(), inputs().key());
        assert!(store.load(&inputs()).unwrap().is_some());
        // Another input: another key, so nothing is found...
        let mut other = inputs();
        other.agent_build_id = "4567".into();
        assert!(store.load(&other).unwrap().is_none());
        // ...and a manifest rewritten to claim other inputs is refused.
        let text = serde_json::to_vec(&manifest(other, 5)).unwrap();
        std::fs::write(snap.dir.join(MANIFEST_FILE), text).unwrap();
        let err = store.load(&inputs()).unwrap_err().to_string();
        assert!(err.contains("agent build \"4567\""), "{err}");
    }

    /// A guest RAM file of `mib` MiB, all hole.
    fn sparse_ram(staging: &Path, mib: u64) {
        let ram = crate::vm::ramfile::beside(&Store::staged_state(staging));
        std::fs::File::create(ram)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
    }

    /// A store with one snapshot of `inputs()` whose manifest says 5 bytes
    /// of state: `state` as its state, `ram_mib` of (sparse) guest RAM.
    fn installed(state: &[u8], ram_mib: u64) -> (tempfile::TempDir, Store) {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().to_path_buf());
        let staging = store.staging(&inputs()).unwrap();
        std::fs::write(Store::staged_state(&staging), state).unwrap();
        sparse_ram(&staging, ram_mib);
        store.install(&staging, manifest(inputs(), 5)).unwrap();
        (root, store)
    }

    #[test]
    fn a_ram_file_of_another_size_is_refused() {
        let (_root, store) = installed(b"state", 1024);
        let err = store.load(&inputs()).unwrap_err().to_string();
        assert!(err.contains("guest RAM"), "{err}");
    }

    #[test]
    fn a_truncated_state_is_refused() {
        let (_root, store) = installed(b"sta", 1536);
        let err = store.load(&inputs()).unwrap_err().to_string();
        assert!(err.contains("state.bin is Ok(3) bytes"), "{err}");
    }

    #[test]
    fn the_browser_settings_are_part_of_the_key() {
        let mut wider = inputs();
        wider.browser.width = 1920;
        assert_ne!(wider.key(), inputs().key());
        let (what, _, _) = wider.difference(&inputs()).unwrap();
        assert_eq!(what, "browser settings");
    }
}
