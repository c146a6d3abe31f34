//! The unprivileged accounts a VM's host processes run as: `qemu.run_as`
//! for QEMU and vhost-device-vsock, `vm.unsafe_host_browser_user` for a
//! host-process browser. Looked up once when airlockd starts (by the
//! daemon), then used by the backends to hand the account what it must
//! reach and to switch to it in the child before `exec`.

use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

/// An account VM processes run as, with the groups it gets.
#[derive(Debug, Clone)]
pub struct VmAccount {
    name: String,
    uid: Uid,
    gid: Gid,
    /// Supplementary groups: `kvm` when the host has it, so QEMU can open
    /// `/dev/kvm` without being root.
    groups: Vec<Gid>,
}

impl VmAccount {
    /// The account `name` (from the setting `setting`, named in errors);
    /// `None` when airlockd is not root: it cannot switch, and runs VM
    /// processes as itself.
    pub fn lookup(name: &str, setting: &str) -> Result<Option<Self>, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let user = match User::from_name(name) {
            Ok(Some(u)) => u,
            _ => {
                return Err(format!(
                    "{setting} {name:?} is not an account on this host: create it (`scripts/setup` does: useradd --system --no-create-home --shell /usr/sbin/nologin {name}) or name another"
                ))
            }
        };
        if user.uid.is_root() {
            return Err(format!(
                "{setting} {name:?} is root; VM processes must run unprivileged"
            ));
        }
        let kvm = Group::from_name("kvm").ok().flatten().map(|g| g.gid);
        Ok(Some(Self {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
            groups: kvm.into_iter().collect(),
        }))
    }

    /// An account that need not exist (unit tests of reachability).
    #[cfg(test)]
    pub fn for_tests(id: u32) -> Self {
        Self {
            name: "vm".into(),
            uid: Uid::from_raw(id),
            gid: Gid::from_raw(id),
            groups: vec![],
        }
    }

    /// The account's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its uid.
    pub fn uid(&self) -> Uid {
        self.uid
    }

    /// Its primary gid.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// Refuses `path` unless this account can reach it: every directory
    /// above it searchable by the account (as owner, group or other).
    pub fn check_reachable(&self, path: &Path) -> Result<(), String> {
        let mut dir = path.parent();
        while let Some(d) = dir {
            let searchable = std::fs::metadata(d).is_ok_and(|m| {
                let bit = match (m.uid() == self.uid.as_raw(), self.in_group(m.gid())) {
                    (true, _) => 0o100,
                    (false, true) => 0o010,
                    (false, false) => 0o001,
                };
                m.mode() & bit != 0
            });
            if !searchable {
                return Err(format!(
                    "{} is out of reach of the unprivileged account {:?}: it cannot search {} (make it searchable, e.g. chmod o+x, or choose another directory)",
                    path.display(),
                    self.name,
                    d.display()
                ));
            }
            dir = d.parent();
        }
        Ok(())
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid.as_raw() == gid || self.groups.iter().any(|g| g.as_raw() == gid)
    }

    /// Makes `path` (a socket airlockd bound, a file the VM writes) the
    /// account's.
    pub fn give(&self, path: &Path) -> std::io::Result<()> {
        nix::unistd::chown(path, Some(self.uid), Some(self.gid)).map_err(std::io::Error::from)
    }

    /// Switches `cmd`'s child to this account before `exec`, after it
    /// joined its cgroups (`cgroup_procs`: open `cgroup.procs` files) and
    /// with `inherit` left open across `exec`. std's own `uid`/`gid`
    /// cannot give supplementary groups, and run before `pre_exec`, when
    /// the child may no longer join a cgroup.
    pub fn confine(
        account: Option<&Self>,
        cmd: &mut tokio::process::Command,
        cgroup_procs: Vec<RawFd>,
        inherit: Vec<RawFd>,
    ) {
        let ids = account.map(|a| (a.uid, a.gid, a.groups.clone()));
        // SAFETY: the closure runs in the forked child before exec and
        // makes only async-signal-safe system calls (write, fcntl,
        // setgroups, setgid, setuid) on values prepared before the fork;
        // it allocates nothing.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                for fd in &cgroup_procs {
                    // "0" moves the writing process itself.
                    write_fd(*fd, b"0")?;
                }
                for fd in &inherit {
                    clear_cloexec(*fd)?;
                }
                if let Some((uid, gid, groups)) = &ids {
                    nix::unistd::setgroups(groups).map_err(std::io::Error::from)?;
                    nix::unistd::setgid(*gid).map_err(std::io::Error::from)?;
                    nix::unistd::setuid(*uid).map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
    }
}

/// Binds a listening socket at `path` for `account` (or airlockd itself)
/// to connect to. It is bound under another name, given to the account
/// and then renamed into place, so a peer dialling all along (a VM taken
/// over redials; QEMU's console reconnects) never finds a socket there it
/// may not use, and an earlier airlockd's socket file is replaced at once.
pub fn bind_for(
    account: Option<&VmAccount>,
    path: &Path,
) -> std::io::Result<tokio::net::UnixListener> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".binding-{name}"));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    let placed = match account {
        Some(a) => a.give(&tmp),
        None => Ok(()),
    }
    .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

fn write_fd(fd: RawFd, bytes: &[u8]) -> std::io::Result<()> {
    // SAFETY: `fd` is a `cgroup.procs` file the parent holds open until
    // the spawn returned; borrowing it for this one call is sound.
    #[allow(unsafe_code)]
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    nix::unistd::write(fd, bytes).map_err(std::io::Error::from)?;
    Ok(())
}

fn clear_cloexec(fd: RawFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: as in `write_fd`: the parent holds `fd` open.
    #[allow(unsafe_code)]
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_is_bound_for_its_account_and_replaces_an_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock_1024");
        // An earlier airlockd's socket, which nobody answers any more.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let account = VmAccount::for_tests(54321);
        let owner = nix::unistd::geteuid().is_root().then_some(&account);
        let listener = bind_for(owner, &path).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vsock.sock_1024")]);
        if owner.is_some() {
            assert_eq!(std::fs::metadata(&path).unwrap().uid(), 54321);
        }
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        listener.accept().await.unwrap();
    }

    #[test]
    fn reachability_counts_owner_group_and_others() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        let account = VmAccount::for_tests(54321);
        use std::os::unix::fs::PermissionsExt;
        let set = |mode| std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(mode));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        set(0o700).unwrap();
        let err = account.check_reachable(&inner.join("x")).unwrap_err();
        assert!(err.contains("cannot search"), "{err}");
        set(0o701).unwrap();
        account.check_reachable(&inner.join("x")).unwrap();
        if nix::unistd::geteuid().is_root() {
            set(0o700).unwrap();
            account.give(&inner).unwrap();
            account.check_reachable(&inner.join("x")).unwrap();
        }
    }
}
