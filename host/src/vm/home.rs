//! Persistent home disks of CLI VMs: one per user, a sparse raw file with
//! an ext4 filesystem under `<state_dir>/homes/`, created on that user's
//! first CLI VM (nothing is copied: the file takes only what the guest
//! writes) and attached to every later one, so `/root` survives restarts.
//! The host only formats the empty file; it never mounts a disk a guest
//! has written. Called by the VM supervisor before it launches a CLI VM.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::process::Command;

/// A home disk could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// A file step failed.
    #[error("cannot prepare the home disk {path}: {source}")]
    Io {
        /// The disk or its directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 failed on {path}: {why}")]
    Mkfs {
        /// The disk.
        path: PathBuf,
        /// Its exit status and output.
        why: String,
    },
}

/// The disk file of `user` (named by a hash: user ids are free text).
pub fn disk_path(state_dir: &Path, user: &str) -> PathBuf {
    let digest = Sha256::digest(user.as_bytes());
    let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    state_dir.join("homes").join(format!("{name}.ext4"))
}

/// Returns `user`'s home disk, creating and formatting it (`size_mib`,
/// sparse) when it does not exist yet.
pub async fn ensure(state_dir: &Path, user: &str, size_mib: u64) -> Result<PathBuf, HomeError> {
    let path = disk_path(state_dir, user);
    if path.is_file() {
        return Ok(path);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HomeError::Io { path, source }
    };
    let dir = state_dir.join("homes");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io(&dir))?;
    // Formatted under a temporary name and renamed, so a crash halfway
    // never leaves an unformatted disk that later boots would mount.
    let tmp = path.with_extension("ext4.tmp");
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.set_len(size_mib << 20).map_err(io(&tmp))?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "airlock-home", "-m", "0"])
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
        ])
        .arg(&tmp)
        .output()
        .await
        .map_err(io(&tmp))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(HomeError::Mkfs {
            path,
            why: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    tracing::info!(disk = %path.display(), size_mib, "created a home disk");
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_home_disk_is_sparse_ext4_and_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = ensure(dir.path(), "alice@example.com", 256).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 32 << 20,
            "not sparse: {}",
            meta.blocks()
        );
        // ext4's superblock magic at offset 1024 + 0x38.
        let mut head = [0u8; 2048];
        std::io::Read::read_exact(&mut std::fs::File::open(&path).unwrap(), &mut head).unwrap();
        assert_eq!(&head[1080..1082], &[0x53, 0xef]);
        std::fs::write(&path, b"kept").unwrap();
        let again = ensure(dir.path(), "alice@example.com", 256).await.unwrap();
        assert_eq!(again, path);
        assert_eq!(std::fs::read(&path).unwrap(), b"kept");
        assert_ne!(disk_path(dir.path(), "bob"), path);
    }
}
