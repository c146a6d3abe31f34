//! The isolation a host-process agent gives itself when airlockd asks for
//! it (`--isolate-as`): what a browser VM gets from having no network
//! interface and its own root, for an agent that runs on the host. Called
//! once by [`crate::main_entry`], started as root, before any thread
//! exists (a mount namespace unshared later would cover one thread only).
//!
//! - Its own network namespace with only loopback: Chromium, a login CLI
//!   and the streamer get out only through the egress gateway beside the
//!   agent's socket, as in a browser VM.
//! - Its own mount namespace: a private `/tmp` (X's sockets and locks, the
//!   CLIs' scratch files; the agent's socket directory and its own stay
//!   reachable), its own `/etc/chromium`, so Chromium's managed policy (an
//!   extra test CA) is this browser's alone, and, when given, an image's
//!   `/usr/local` (the vendor CLIs and the Node.js they need) mounted
//!   read-only over the host's.
//! - Then it drops to the account airlockd chose, for good.
//!
//! All of it disappears with the agent's last process: nothing is mounted
//! or written in the host's namespaces.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{Gid, Uid};

use crate::browser::trust::POLICY_DIR;

/// What `--isolate-as` and `--usr-local` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The account everything runs as once the namespaces are set up.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// A tree to mount over `/usr/local` (an image's vendor layer).
    pub usr_local: Option<PathBuf>,
}

/// A step of the isolation failed: the agent does not run unisolated.
#[derive(Debug, thiserror::Error)]
#[error("cannot isolate the agent: {what}: {source}")]
pub struct SandboxError {
    what: String,
    #[source]
    source: std::io::Error,
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> SandboxError {
    let what = what.into();
    move |e| SandboxError {
        what,
        source: e.into(),
    }
}

fn io_step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError { what, source }
}

/// Chromium's configuration directory on Debian (its managed policies
/// live below it).
const CHROMIUM_ETC: &str = "/etc/chromium";
/// Largest file copied into the browser's own [`CHROMIUM_ETC`].
const MAX_ETC_FILE: u64 = 1 << 20;

/// Enters the namespaces, sets them up and drops to the account. `keep`:
/// directories the agent still needs at their paths if they are under
/// `/tmp` (its socket's, its own), with whether it writes there. Must be
/// called while the process has one thread.
pub fn enter(iso: &Isolation, keep: &[(&Path, bool)]) -> Result<(), SandboxError> {
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).map_err(step(
        "unshare the network and mount namespaces (is airlockd root?)",
    ))?;
    // Nothing mounted below reaches the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make the mounts private"))?;
    if let Some(tree) = &iso.usr_local {
        mount_read_only(tree, Path::new("/usr/local"))?;
    }
    private_tmp(keep)?;
    own_chromium_etc(iso)?;
    crate::init::loopback_up().map_err(io_step("bring the loopback interface up"))?;
    drop_to(iso)
}

/// Mounts a private tmpfs over `/tmp` (X's sockets and lock files, the
/// CLIs' scratch files: two browsers on one host must not meet there),
/// then binds back each of `keep` that lives under it.
fn private_tmp(keep: &[(&Path, bool)]) -> Result<(), SandboxError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = Path::new("/tmp");
    let mut held = Vec::new();
    for (dir, writable) in keep.iter().filter(|(d, _)| d.starts_with(tmp)) {
        // A handle to the directory reaches it once /tmp is covered.
        let handle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir)
            .map_err(io_step(format!("open {}", dir.display())))?;
        held.push((dir, *writable, handle));
    }
    mount(
        Some("tmpfs"),
        tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=512m"),
    )
    .map_err(step("mount a private /tmp"))?;
    let x11 = tmp.join(".X11-unix");
    std::fs::create_dir(&x11).map_err(io_step("create /tmp/.X11-unix"))?;
    std::fs::set_permissions(&x11, std::fs::Permissions::from_mode(0o1777))
        .map_err(io_step("open up /tmp/.X11-unix"))?;
    for (dir, writable, handle) in held {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).map_err(io_step(format!("recreate {}", dir.display())))?;
        let source = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
        if writable {
            mount(
                Some(&source),
                *dir,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(step(format!("keep {} reachable", dir.display())))?;
        } else {
            mount_read_only(&source, dir)?;
        }
    }
    Ok(())
}

/// Binds `tree` over `target`, read-only.
fn mount_read_only(tree: &Path, target: &Path) -> Result<(), SandboxError> {
    let what = format!("mount {} over {}", tree.display(), target.display());
    mount(
        Some(tree),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step(what.clone()))?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(step(format!("{what} read-only")))
}

/// Gives the browser its own [`CHROMIUM_ETC`]: a tmpfs over the host's,
/// holding copies of its files and a managed policy directory owned by the
/// account, so an extra CA's policy reaches this Chromium only.
fn own_chromium_etc(iso: &Isolation) -> Result<(), SandboxError> {
    let etc = Path::new(CHROMIUM_ETC);
    let files = read_files(etc).map_err(io_step(format!(
        "read {CHROMIUM_ETC} (is Debian's chromium installed?)"
    )))?;
    mount(
        Some("tmpfs"),
        etc,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=16m"),
    )
    .map_err(step(format!("mount a tmpfs over {CHROMIUM_ETC}")))?;
    for (path, bytes) in files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_step(format!("create {}", dir.display())))?;
        }
        std::fs::write(&path, bytes).map_err(io_step(format!("copy {}", path.display())))?;
    }
    let policy = Path::new(POLICY_DIR);
    std::fs::create_dir_all(policy).map_err(io_step(format!("create {POLICY_DIR}")))?;
    nix::unistd::chown(
        policy,
        Some(Uid::from_raw(iso.uid)),
        Some(Gid::from_raw(iso.gid)),
    )
    .map_err(step("give the policy directory to the account"))
}

/// The regular files under `dir`, with their contents (each at most
/// [`MAX_ETC_FILE`]; the tree is a few small configuration files).
fn read_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() && entry.metadata()?.len() <= MAX_ETC_FILE {
                files.push((entry.path(), std::fs::read(entry.path())?));
            }
        }
    }
    Ok(files)
}

/// Drops every privilege: no supplementary groups, then the group, then
/// the user (in that order: a user that is no longer root cannot change
/// its groups).
fn drop_to(iso: &Isolation) -> Result<(), SandboxError> {
    let gid = Gid::from_raw(iso.gid);
    nix::unistd::setgroups(&[gid]).map_err(step("drop supplementary groups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(step("switch group"))?;
    let uid = Uid::from_raw(iso.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(step("switch user"))
}

/// Parses `UID:GID`.
pub fn parse_ids(text: &str) -> Option<(u32, u32)> {
    let (u, g) = text.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_two_numbers() {
        assert_eq!(parse_ids("65534:65534"), Some((65534, 65534)));
        for bad in ["65534", "a:1", "1:", ":1", "1:2:3", "-1:0"] {
            assert_eq!(parse_ids(bad), None, "{bad}");
        }
    }
}
