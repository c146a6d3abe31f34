//! The unprivileged accounts the agent runs untrusted programs as, inside
//! an image: Chromium as `airlock-browser` (with its own sandbox on, which
//! needs a non-root user) and the vendor CLI's login as `airlock-login`,
//! so a page that escaped Chromium's sandbox still cannot read the CLI's
//! credential file or touch the agent. The images create both accounts
//! (`image/build-image.sh`); as a host process the agent runs everything
//! as itself. Used by the browser role and the logins.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::unistd::{Gid, Uid, User};

/// The account Chromium runs as in an image.
pub const BROWSER_USER: &str = "airlock-browser";
/// The account a login CLI runs as in an image.
pub const LOGIN_USER: &str = "airlock-login";

/// An account to run a program as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// Its user id.
    pub uid: Uid,
    /// Its group id.
    pub gid: Gid,
}

impl RunAs {
    /// The account `name`, when this system has it and the agent can
    /// switch to it (it runs as root).
    pub fn lookup(name: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let user = User::from_name(name).ok().flatten()?;
        Some(Self {
            uid: user.uid,
            gid: user.gid,
        })
    }

    /// Makes `cmd` run as this account (with no supplementary groups).
    pub fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid.as_raw()).gid(self.gid.as_raw());
    }

    /// Gives the account `path` (a directory the agent made for it).
    pub fn own(&self, path: &Path) -> std::io::Result<()> {
        nix::unistd::chown(path, Some(self.uid), Some(self.gid)).map_err(std::io::Error::from)
    }

    /// Gives the account `dir` and everything in it.
    pub fn own_tree(&self, dir: &Path) -> std::io::Result<()> {
        self.own(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                self.own_tree(&path)?;
            } else {
                nix::unistd::fchownat(
                    nix::fcntl::AT_FDCWD,
                    &path,
                    Some(self.uid),
                    Some(self.gid),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(std::io::Error::from)?;
            }
        }
        Ok(())
    }
}
