//! Guest RAM as a file, for browser VMs that are snapshotted and
//! restored. The RAM of such a VM is a file in `/dev/shm` (tmpfs: memory,
//! never written back to a disk), mapped shared so that vhost-device-vsock
//! can map it too. A snapshot then needs no RAM in QEMU's migration stream
//! (`x-ignore-shared`): the template's RAM file is copied beside the state,
//! and each restore copies it back into a file of its own (vhost-user maps
//! guest memory shared, so clones cannot share one copy-on-write). Both
//! copies skip holes and all-zero blocks, so a copy holds only what the
//! guest used: loading 800 MB of RAM through the migration stream took
//! about 2 s under TCG and allocated more than the guest used, a sparse
//! copy about 0.4 s. Used by [`super::qemu`]; removed with the VM's
//! directory ([`super::layout::VmDir::remove`]).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Where a VM's RAM file lives: tmpfs, named by the VM's id.
pub fn path_for(vm_id: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/airlock-{vm_id}.ram"))
}

/// The RAM file kept in a snapshot beside its `state`.
pub fn beside(state: &Path) -> PathBuf {
    state.with_extension("ram")
}

/// Copies `from` to a new file `to` of the same length, leaving holes
/// where `from` has holes or blocks of zeros (coreutils' `cp
/// --sparse=always`). In the `background` (a VM for the warm pool, copied
/// while sessions' logins run) it runs at the lowest CPU priority.
pub async fn copy_sparse(from: &Path, to: &Path, background: bool) -> io::Result<()> {
    if to.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    let mut cmd = match background {
        true => {
            let mut c = Command::new("nice");
            c.args(["-n", "19", "cp"]);
            c
        }
        false => Command::new("cp"),
    };
    let out = cmd
        .args(["--sparse=always", "--reflink=never", "--"])
        .arg(from)
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .await?;
    if out.status.success() {
        return Ok(());
    }
    let _ = std::fs::remove_file(to);
    Err(io::Error::other(format!(
        "cp {} {} failed ({}): {}",
        from.display(),
        to.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Bytes a file holds (its allocated blocks: holes cost nothing).
pub fn allocated(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Removes a VM's RAM file, if any.
pub fn remove(vm_id: &str) -> io::Result<()> {
    match std::fs::remove_file(path_for(vm_id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    #[tokio::test]
    async fn a_sparse_copy_keeps_data_and_skips_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 3 << 20).unwrap();
        // Allocated but zero: not copied.
        f.write_all_at(&vec![0u8; 8 << 20], 16 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        copy_sparse(&a, &b, true).await.unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let held = allocated(&b).unwrap();
        assert!(held < 1 << 20, "{held} bytes allocated");
        let again = copy_sparse(&a, &b, false).await.unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
    }
}
