//! Files of one VM: `<run_dir>/vms/<id>/` holds its sockets, logs and pid
//! file while it runs; logs of a failed VM move to
//! `<state_dir>/failed-vms/<id>/`. Also cleans up a VM an earlier airlockd
//! left that cannot be taken over (see [`super::adopt`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A filesystem step of VM setup or teardown failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct LayoutError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl LayoutError {
    fn new(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Log files worth keeping when a VM fails.
const LOG_FILES: &[&str] = &[
    "console.log",
    "agent.log",
    "vmm.log",
    "vhost.log",
    "xvfb.log",
    "chromium.log",
    "streamer.log",
    "metrics.json",
];

/// The working directory of one VM.
#[derive(Debug, Clone)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    /// Creates `<run_dir>/vms/<id>/` and its `vmm/` (mode 0700).
    pub fn create(run_dir: &Path, id: &str) -> Result<Self, LayoutError> {
        let root = run_dir.join("vms").join(id);
        let dir = Self { root };
        let vmm = dir.vmm_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vmm)
            .map_err(|e| LayoutError::new("create", &vmm, e))?;
        Ok(dir)
    }

    /// The directory of VM `id` under `run_dir`, not created.
    pub fn of(run_dir: &Path, id: &str) -> Self {
        Self {
            root: run_dir.join("vms").join(id),
        }
    }

    /// The directory of a VM an earlier airlockd created.
    pub fn existing(root: PathBuf) -> Self {
        Self { root }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the VMM and its helpers create their sockets: a directory
    /// of their own, so they need no write access to this one (which
    /// holds the logs and the record a later airlockd trusts).
    pub fn vmm_dir(&self) -> PathBuf {
        self.root.join("vmm")
    }

    /// QEMU <-> vhost-device-vsock control socket.
    pub fn vhost_socket(&self) -> PathBuf {
        self.vmm_dir().join("vhost.sock")
    }

    /// The hybrid vsock socket (`uds_path`): host-initiated connections.
    /// The vsock device binds it, so it lives in [`VmDir::vmm_dir`], and
    /// with it the `<uds_path>_<port>` listeners airlockd binds.
    pub fn vsock_uds(&self) -> PathBuf {
        self.vmm_dir().join("vsock.sock")
    }

    /// `<uds_path>_<port>`: where guest-initiated connections arrive.
    pub fn agent_listener(&self, port: u32) -> PathBuf {
        self.vmm_dir().join(format!("vsock.sock_{port}"))
    }

    /// QEMU's control socket (QMP).
    pub fn qmp_socket(&self) -> PathBuf {
        self.vmm_dir().join("qmp.sock")
    }

    /// Serial console socket (airlockd listens, QEMU connects).
    pub fn console_socket(&self) -> PathBuf {
        self.root.join("console.sock")
    }

    /// A file in the directory by name (`console.log`, `vmm.log`, ...).
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Records the pids of the VM's processes, for cleanup after a crash.
    pub fn record_pids(&self, pids: &[(&str, u32)]) -> Result<(), LayoutError> {
        let path = self.file("pids");
        let text: String = pids
            .iter()
            .map(|(name, pid)| format!("{name} {pid}\n"))
            .collect();
        fs::write(&path, text).map_err(|e| LayoutError::new("write", &path, e))
    }

    /// Moves the logs to `<failed_dir>/<id>/` with `error.txt` and returns
    /// that directory.
    pub fn keep_logs(&self, failed_dir: &Path, error: &str) -> Result<PathBuf, LayoutError> {
        let id = self.root.file_name().unwrap_or_default();
        let dest = failed_dir.join(id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dest)
            .map_err(|e| LayoutError::new("create", &dest, e))?;
        for name in LOG_FILES {
            let src = self.root.join(name);
            if src.exists() {
                move_file(&src, &dest.join(name))?;
            }
        }
        let err_path = dest.join("error.txt");
        fs::File::create(&err_path)
            .and_then(|mut f| writeln!(f, "{error}"))
            .map_err(|e| LayoutError::new("write", &err_path, e))?;
        Ok(dest)
    }

    /// The VM's id (the directory's name).
    pub fn id(&self) -> String {
        self.root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Removes the directory and everything left in it, and the VM's RAM
    /// file (kept in `/dev/shm`, see [`super::ramfile`]).
    pub fn remove(&self) -> Result<(), LayoutError> {
        let ram = super::ramfile::path_for(&self.id());
        super::ramfile::remove(&self.id()).map_err(|e| LayoutError::new("remove", &ram, e))?;
        match fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LayoutError::new("remove", &self.root, e)),
        }
    }
}

/// Rename, or copy and delete across filesystems (`/run` is often tmpfs).
fn move_file(src: &Path, dst: &Path) -> Result<(), LayoutError> {
    if fs::rename(src, dst).is_ok() {
        return Ok(());
    }
    fs::copy(src, dst).map_err(|e| LayoutError::new("copy", src, e))?;
    fs::remove_file(src).map_err(|e| LayoutError::new("remove", src, e))
}

/// Cleans up a VM an earlier airlockd left and this one cannot take
/// over: kills its recorded processes still running, keeps its logs with
/// `why`, and removes its directory. Returns how many processes it killed.
pub fn clean_lost(dir: &VmDir, failed_dir: &Path, why: &str) -> usize {
    let id = dir.id();
    let killed = kill_recorded(dir);
    let reason = format!("{why}; killed {killed} leftover process(es) when airlockd started again");
    if let Err(e) = dir.keep_logs(failed_dir, &reason) {
        tracing::warn!(vm_id = %id, error = %e, "cannot keep logs of a leftover VM");
    }
    if let Err(e) = dir.remove() {
        tracing::warn!(vm_id = %id, error = %e, "cannot remove a leftover VM directory");
    }
    tracing::warn!(vm_id = %id, killed, why, "cleaned up a VM left by an earlier airlockd");
    killed
}

/// SIGKILLs each recorded pid whose command line still names this VM's
/// directory (so a recycled pid is never touched).
fn kill_recorded(dir: &VmDir) -> usize {
    let Ok(text) = fs::read_to_string(dir.file("pids")) else {
        return 0;
    };
    let marker = dir.root.to_string_lossy().into_owned();
    let mut killed = 0;
    for pid in text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<i32>().ok())
    {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&marker)
            && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}

/// Deletes the oldest failed-VM log directories beyond `keep`.
pub fn prune_failed(failed_dir: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(failed_dir) else {
        return;
    };
    let mut dirs: Vec<_> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if dirs.len() <= keep {
        return;
    }
    dirs.sort();
    for (_, path) in &dirs[..dirs.len() - keep] {
        let _ = fs::remove_dir_all(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_logs_moves_them_with_the_error() {
        let run = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let dir = VmDir::create(run.path(), "vm-1").unwrap();
        fs::write(dir.file("console.log"), "boot\n").unwrap();
        let kept = dir.keep_logs(state.path(), "it broke").unwrap();
        assert_eq!(
            fs::read_to_string(kept.join("console.log")).unwrap(),
            "boot\n"
        );
        assert!(fs::read_to_string(kept.join("error.txt"))
            .unwrap()
            .contains("it broke"));
        dir.remove().unwrap();
        assert!(!dir.root().exists());
    }

    #[test]
    fn clean_lost_kills_only_processes_of_that_dir() {
        let run = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let dir = VmDir::create(run.path(), "vm-old").unwrap();
        // A process whose command line names the directory, and one that
        // does not (standing in for a recycled pid).
        let mut ours = std::process::Command::new("sh")
            .args(["-c", "sleep 60; true", dir.root().to_str().unwrap()])
            .spawn()
            .unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        dir.record_pids(&[("vmm", ours.id()), ("vhost", other.id())])
            .unwrap();
        assert_eq!(clean_lost(&dir, state.path(), "its QEMU is gone"), 1);
        assert!(!dir.root().exists());
        assert!(ours.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(
            other.try_wait().unwrap().is_none(),
            "the unrelated process survives"
        );
        other.kill().unwrap();
        other.wait().unwrap();
        let why = fs::read_to_string(state.path().join("vm-old/error.txt")).unwrap();
        assert!(why.contains("its QEMU is gone"), "{why}");
    }
}
