//! Runs a CLI in a pseudo-terminal, as a person would in a terminal: the
//! vendor CLIs print prompts, colours and URLs only when they see a TTY,
//! and paste-code flows read the code from it. The child is spawned through
//! the agent's [`Reaper`] (so PID 1 keeps one `waitpid` owner) as a session
//! leader with the PTY as its controlling terminal. Used by
//! [`super::session`].

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{openpty, Winsize};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::process::{ExitInfo, Reaper};
use crate::users::RunAs;

/// The master side of a PTY, readable and writable without blocking.
#[derive(Debug)]
pub struct Pty {
    master: AsyncFd<OwnedFd>,
}

/// A CLI running in a PTY.
#[derive(Debug)]
pub struct PtyChild {
    /// Its pid (also its session and process group id).
    pub pid: Pid,
    /// Resolves when it exits.
    pub exit: oneshot::Receiver<ExitInfo>,
    /// Its terminal.
    pub pty: Pty,
}

/// Starts `argv` with exactly `env` in `cwd`, on a fresh 120x40 PTY, as
/// `run_as` when given.
pub fn spawn(
    reaper: &Reaper,
    argv: &[String],
    env: &[(String, String)],
    cwd: &Path,
    run_as: Option<RunAs>,
) -> std::io::Result<PtyChild> {
    let size = Winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pair = openpty(Some(&size), None).map_err(std::io::Error::from)?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::from(pair.slave.try_clone()?))
        .stdout(Stdio::from(pair.slave.try_clone()?))
        .stderr(Stdio::from(pair.slave));
    if let Some(user) = run_as {
        user.apply(&mut cmd);
    }
    // SAFETY: runs in the forked child before exec; setsid and ioctl are
    // async-signal-safe and touch no memory of the parent. They make the
    // child a session leader whose controlling terminal is the PTY (fd 0).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (child, exit) = reaper.spawn(&mut cmd)?;
    // Our copies of the slave end close with `cmd`; the child keeps its own,
    // so reading the master reports EOF (EIO) once the CLI is gone.
    drop(cmd);
    let flags = fcntl(&pair.master, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    fcntl(
        &pair.master,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(std::io::Error::from)?;
    // SAFETY: the OwnedFd moves into the AsyncFd, which owns it until it is
    // dropped; an OwnedFd's as_raw_fd always returns the same open fd.
    let master = unsafe { AsyncFd::register(pair.master) }.map_err(|e| e.into_parts().1)?;
    Ok(PtyChild {
        pid: Pid::from_raw(child.id() as i32),
        exit,
        pty: Pty { master },
    })
}

impl Pty {
    /// Reads what the CLI printed; `Ok(0)` once it has gone (EIO).
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from))
            {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Types `data` into the CLI.
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}
