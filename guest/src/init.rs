//! Duties of PID 1 in an initramfs: filesystems, console, kernel modules,
//! hostname, and powering the VM off. Called by [`crate::main_entry`] before
//! the async runtime starts, and by the shutdown path at the end.

use std::fs;
use std::io::Write;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A step of early setup that failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("mount {target}: {source}")]
    Mount {
        /// Mount point.
        target: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// A kernel module failed to load.
    #[error("load module {path}: {source}")]
    Module {
        /// Module file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The modules list could not be read.
    #[error("read modules list {path}: {source}")]
    ModulesList {
        /// The list file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("mode=0620,ptmxmode=0666"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

fn mount_one(spec: &MountSpec) -> Result<(), InitError> {
    let _ = fs::create_dir_all(spec.target);
    match mount(
        Some(spec.source),
        spec.target,
        Some(spec.fstype),
        spec.flags,
        spec.data,
    ) {
        // Already mounted (e.g. the kernel mounted devtmpfs itself).
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount {
            target: spec.target,
            source,
        }),
    }
}

/// Mounts `/dev` and points stdin/stdout/stderr at the console, so that
/// everything after this, including the init marker, reaches the serial
/// port even when the initramfs has no `/dev/console` node.
pub fn setup_console() -> Result<(), InitError> {
    mount_one(&MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    })?;
    if let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        // Duplicates onto 0, 1 and 2; the console File itself is dropped
        // afterwards, the duplicates stay open.
        let _ = nix::unistd::dup2_stdin(&console);
        let _ = nix::unistd::dup2_stdout(&console);
        let _ = nix::unistd::dup2_stderr(&console);
    }
    Ok(())
}

/// Mounts the remaining pseudo filesystems and sets a sane `PATH`.
pub fn mount_filesystems() -> Result<(), InitError> {
    for spec in MOUNTS {
        mount_one(spec)?;
    }
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    std::env::set_var("HOME", "/root");
    Ok(())
}

/// Loads the modules named in `list` (one path per line, relative to
/// `/lib/modules/<release>/`, in dependency order). A module that is
/// already loaded or built in is not an error.
pub fn load_modules(list: &Path) -> Result<usize, InitError> {
    let text = match fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(InitError::ModulesList {
                path: list.display().to_string(),
                source,
            })
        }
    };
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut loaded = 0;
    for rel in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = format!("/lib/modules/{release}/{rel}");
        let file = fs::File::open(&path).map_err(|source| InitError::Module {
            path: path.clone(),
            source,
        })?;
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            Err(nix::Error::EEXIST) => {}
            Err(e) => {
                return Err(InitError::Module {
                    path,
                    source: e.into(),
                })
            }
        }
    }
    Ok(loaded)
}

/// Brings the loopback interface up: with no init system, nothing else
/// would, and Chromium's DevTools, the egress proxies and a CLI's login
/// callback all live on 127.0.0.1. (The kernel gives `lo` its addresses
/// when it goes up; a VM has no other interface.)
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a plain datagram socket, closed by OwnedFd on return.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and is owned by nothing else.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in
    // `req` into its union; `req` outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union's flags member was just filled in by the kernel.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the hostname (from the host's config).
pub fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        tracing::warn!(error = %e, hostname = name, "cannot set hostname");
    }
}

/// Prints a line straight to the console (stdout), bypassing logging.
pub fn console_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Stops every other process, syncs and powers the VM off. Never returns.
pub fn power_off() -> ! {
    // Signal everything but ourselves; give processes a moment to exit
    // cleanly before the hard kill.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reachable without CAP_SYS_BOOT; exiting makes the kernel panic,
    // which `panic=-1` plus QEMU's `-no-reboot` turn into a VM exit.
    std::process::exit(1)
}

/// Makes a panic of PID 1 visible on the console and power the VM off
/// instead of leaving a kernel panic as the only trace.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        console_line(&format!("airlock-guest: fatal: {info}"));
        power_off();
    }));
}
