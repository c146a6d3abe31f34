//! Running Firecracker under its jailer: the jailer's command line and the
//! jail's contents. The jailer chroots Firecracker into
//! `<chroot_base>/<exec name>/<vm id>/root` and drops to an unprivileged
//! uid/gid, so everything Firecracker opens must be inside that directory:
//! airlockd hard-links the kernel, initrd, disks, log files and the agent's
//! listening sockets in before the jailer starts. Used by
//! [`super::FirecrackerBackend`].

use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::unistd::{chown, Gid, Uid};

use crate::config::JailerConfig;
use crate::vm::layout::VmDir;

/// The jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A filesystem step failed.
    #[error("jail: cannot {action} {}: {source}", path.display())]
    Io {
        /// What airlockd was doing.
        action: &'static str,
        /// The path it was doing it to.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file that must be shared (a socket, a writable disk) is on
    /// another filesystem than the jail, so it cannot be hard-linked.
    #[error("jail: {} is on another filesystem than the jail {}; set firecracker.jailer.chroot_base on the filesystem of paths.run_dir (or leave it unset)", src.display(), jail.display())]
    CrossDevice {
        /// The file.
        src: PathBuf,
        /// The jail.
        jail: PathBuf,
    },
    /// A path that cannot be handed to Firecracker.
    #[error("jail: {} is not valid UTF-8", path.display())]
    NotUtf8 {
        /// The path.
        path: PathBuf,
    },
}

/// How Firecracker uses a file placed in the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only reads it (kernel, initrd, image layers): copied when it
    /// cannot be linked, and left owned by whoever owns it.
    ReadOnly,
    /// Writes it or connects to it (home disk, logs, sockets): must be the
    /// same inode as airlockd's, and becomes the jailed account's.
    Shared,
}

/// One VM's jail, prepared on the host.
#[derive(Debug, Clone)]
pub struct Jail {
    base: PathBuf,
    instance: PathBuf,
    root: PathBuf,
    uid: u32,
    gid: u32,
    in_vm_dir: bool,
}

impl Jail {
    /// Creates the (empty) chroot of VM `vm_id`; the jailer reuses an
    /// existing one, so files can be placed before it starts.
    pub fn create(
        cfg: &JailerConfig,
        exec_name: &str,
        vm_id: &str,
        dir: &VmDir,
    ) -> Result<Self, JailError> {
        let in_vm_dir = cfg.chroot_base.is_none();
        let base = cfg.chroot_base.clone().unwrap_or_else(|| dir.file("jail"));
        let instance = base.join(exec_name).join(vm_id);
        let root = instance.join("root");
        fs::create_dir_all(&root).map_err(io("create", &root))?;
        Ok(Self {
            base,
            instance,
            root,
            uid: cfg.uid,
            gid: cfg.gid,
            in_vm_dir,
        })
    }

    /// `--chroot-base-dir`.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The chroot directory, on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a path inside the jail is on the host.
    pub fn host_path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// The path inside the jail of a host path under its root.
    pub fn inside(&self, host: &Path) -> Option<String> {
        let rest = host.strip_prefix(&self.root).ok()?;
        Some(format!("/{}", rest.to_str()?))
    }

    /// Puts `src` at `/<name>` in the jail and returns that path.
    pub fn place(&self, src: &Path, name: &str, access: Access) -> Result<String, JailError> {
        let dest = self.root.join(name);
        match fs::remove_file(&dest) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(io("replace", &dest)(e)),
            _ => {}
        }
        match (fs::hard_link(src, &dest), access) {
            (Ok(()), _) => {}
            (Err(e), Access::ReadOnly) if e.kind() == ErrorKind::CrossesDevices => {
                tracing::warn!(src = %src.display(), "copying into the jail: it is on another filesystem");
                fs::copy(src, &dest).map_err(io("copy", src))?;
            }
            (Err(e), Access::Shared) if e.kind() == ErrorKind::CrossesDevices => {
                return Err(JailError::CrossDevice {
                    src: src.to_path_buf(),
                    jail: self.root.clone(),
                })
            }
            (Err(e), _) => return Err(io("link", src)(e)),
        }
        if access == Access::Shared {
            self.give(&dest)?;
        }
        Ok(format!("/{name}"))
    }

    /// Hard-links the sockets airlockd listens on for the guest
    /// (`vsock.sock_<port>`) into the jail, where Firecracker connects to
    /// them: a symlink would resolve outside the chroot.
    pub fn link_listeners(&self, dir: &VmDir, uds_name: &str) -> Result<(), JailError> {
        use std::os::unix::fs::FileTypeExt;
        let prefix = format!("{uds_name}_");
        let vmm = dir.vmm_dir();
        let entries = fs::read_dir(&vmm).map_err(io("list", &vmm))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
            if is_socket && name.starts_with(&prefix) {
                self.place(&entry.path(), name, Access::Shared)?;
            }
        }
        Ok(())
    }

    /// Creates the directory of `inside` (a path inside the jail) owned by
    /// the jailed account, so Firecracker can create a socket there.
    pub fn make_parent(&self, inside: &str) -> Result<(), JailError> {
        let host = self.host_path(inside);
        let Some(parent) = host.parent() else {
            return Ok(());
        };
        fs::create_dir_all(parent).map_err(io("create", parent))?;
        let mut d = parent;
        while d != self.root.as_path() {
            self.give(d)?;
            d = match d.parent() {
                Some(p) => p,
                None => break,
            };
        }
        Ok(())
    }

    fn give(&self, path: &Path) -> Result<(), JailError> {
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        chown(path, Some(uid), Some(gid)).map_err(|e| io("chown", path)(e.into()))
    }

    /// Removes the jail when it lives outside the VM's directory (which is
    /// removed with the VM). The jailer's cgroups are left to the operator.
    pub fn remove_if_outside(&self) {
        if self.in_vm_dir {
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.instance) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(jail = %self.instance.display(), error = %e, "cannot remove a jail");
            }
        }
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io {
        action,
        path,
        source,
    }
}

/// A path as a string for Firecracker.
pub fn utf8(path: &Path) -> Result<String, JailError> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| JailError::NotUtf8 {
            path: path.to_path_buf(),
        })
}

/// The jailer's command line: its own options, then Firecracker's after
/// `--` (the jailer adds `--id` itself).
pub fn jailer_args(
    cfg: &JailerConfig,
    jail: &Jail,
    firecracker: &Path,
    vm_id: &str,
    api_sock: &str,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--id".into(),
        vm_id.into(),
        "--exec-file".into(),
        firecracker.into(),
        "--uid".into(),
        cfg.uid.to_string().into(),
        "--gid".into(),
        cfg.gid.to_string().into(),
        "--chroot-base-dir".into(),
        jail.base().into(),
    ];
    if let Some(v) = cfg.cgroup_version {
        args.extend(["--cgroup-version".into(), v.to_string().into()]);
    }
    for c in &cfg.cgroups {
        args.extend(["--cgroup".into(), c.into()]);
    }
    if let Some(netns) = &cfg.netns {
        args.extend(["--netns".into(), netns.into()]);
    }
    args.extend(["--".into(), "--api-sock".into(), api_sock.into()]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(base: Option<PathBuf>) -> JailerConfig {
        JailerConfig {
            binary: "/usr/bin/jailer".into(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            chroot_base: base,
            cgroup_version: Some(2),
            cgroups: vec!["cpu.max=50000 100000".into()],
            netns: Some("/var/run/netns/airlock".into()),
        }
    }

    #[test]
    fn firecracker_jailer_command_line_puts_firecrackers_options_after_the_separator() {
        let run = tempfile::tempdir().unwrap();
        let dir = VmDir::create(run.path(), "vm-j").unwrap();
        let cfg = config(None);
        let jail = Jail::create(&cfg, "firecracker", "vm-j", &dir).unwrap();
        assert_eq!(jail.root(), dir.file("jail/firecracker/vm-j/root"));
        let args: Vec<String> = jailer_args(
            &cfg,
            &jail,
            Path::new("/usr/bin/firecracker"),
            "vm-j",
            "/x/fc.sock",
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
        let base = dir.file("jail").display().to_string();
        let expected = [
            "--id",
            "vm-j",
            "--exec-file",
            "/usr/bin/firecracker",
            "--uid",
            &cfg.uid.to_string(),
            "--gid",
            &cfg.gid.to_string(),
            "--chroot-base-dir",
            &base,
            "--cgroup-version",
            "2",
            "--cgroup",
            "cpu.max=50000 100000",
            "--netns",
            "/var/run/netns/airlock",
            "--",
            "--api-sock",
            "/x/fc.sock",
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn firecracker_jail_links_inputs_and_the_agents_sockets() {
        let run = tempfile::tempdir().unwrap();
        let dir = VmDir::create(run.path(), "vm-k").unwrap();
        let jail = Jail::create(&config(None), "firecracker", "vm-k", &dir).unwrap();
        let kernel = run.path().join("vmlinux");
        fs::write(&kernel, b"elf").unwrap();
        assert_eq!(
            jail.place(&kernel, "vmlinux", Access::ReadOnly).unwrap(),
            "/vmlinux"
        );
        assert_eq!(fs::read(jail.host_path("/vmlinux")).unwrap(), b"elf");
        let _agent = std::os::unix::net::UnixListener::bind(dir.agent_listener(1024)).unwrap();
        fs::write(dir.vmm_dir().join("vsock.sock_not_a_socket"), b"").unwrap();
        jail.link_listeners(&dir, "vsock.sock").unwrap();
        let linked = jail.host_path("/vsock.sock_1024");
        std::os::unix::net::UnixStream::connect(&linked).expect("the link reaches the listener");
        assert!(!jail.host_path("/vsock.sock_not_a_socket").exists());
        jail.make_parent("/run/a/fc.sock").unwrap();
        assert!(jail.host_path("/run/a").is_dir());
        assert_eq!(
            jail.inside(&jail.host_path("/run/a/fc.sock")).as_deref(),
            Some("/run/a/fc.sock")
        );
    }
}
