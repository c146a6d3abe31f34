//! Stage 1 of an image boot. In a golden image's initramfs the agent is
//! `/init`; it assembles the real root and hands over to the image's own
//! init, so that no host ever mounts or edits a VM's disk:
//!
//! - the image's read-only squashfs layers (`airlock.layers=vda,vdb`,
//!   bottom first: the Debian root, then airlock's own files) under a
//!   writable tmpfs, joined by overlayfs, so starting a VM copies nothing;
//! - the user's persistent home disk (`airlock.home=vdc`, ext4) on
//!   `/root`, when the VM has one;
//! - then `airlock.init=` (default `/sbin/init`) is executed as PID 1 in the
//!   new root: the agent again in browser images, systemd in CLI images.
//!
//! The initramfs marks itself with [`STAGE1_MARKER`]; without it (the test
//! initramfs, or the agent re-executed in the assembled root) the agent
//! serves directly. Called by [`crate::main_entry`] as PID 1.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::init::{console_line, load_modules, InitError};

/// File whose presence in the initramfs asks for stage 1.
pub const STAGE1_MARKER: &str = "/etc/airlock/stage1";

/// Where the assembled root is mounted before the switch.
const NEW_ROOT: &str = "/newroot";

/// How long block devices get to appear after their driver loads.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// A step of stage 1 failed; the VM powers off with this on the console.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    /// The kernel command line asks for something malformed.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// Modules could not be loaded.
    #[error(transparent)]
    Init(#[from] InitError),
    /// A block device never appeared.
    #[error("block device {0} did not appear within {DEVICE_WAIT:?} (is the drive attached?)")]
    NoDevice(String),
    /// A mount or directory step failed.
    #[error("{what}: {source}")]
    Step {
        /// What stage 1 was doing.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The next init could not be executed.
    #[error("cannot execute {init}: {source}")]
    Exec {
        /// The program.
        init: String,
        /// Cause.
        #[source]
        source: nix::Error,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Stage1Error {
    let what = what.into();
    move |e| Stage1Error::Step {
        what,
        source: e.into(),
    }
}

fn io_step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Stage1Error {
    let what = what.into();
    move |source| Stage1Error::Step { what, source }
}

/// What the kernel command line asks stage 1 to assemble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// squashfs layers, bottom first (`/dev/vda`, ...).
    pub layers: Vec<PathBuf>,
    /// The persistent home disk (ext4), mounted on `/root`.
    pub home: Option<PathBuf>,
    /// The init of the assembled root.
    pub init: String,
}

/// A device name as the host writes it: `vda`, `vdb`... (no paths).
fn device(name: &str) -> Result<PathBuf, Stage1Error> {
    let ok = !name.is_empty()
        && name.len() <= 16
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        return Err(Stage1Error::Cmdline(format!(
            "device {name:?} is not a plain device name such as vda"
        )));
    }
    Ok(Path::new("/dev").join(name))
}

impl Plan {
    /// Reads `airlock.layers=`, `airlock.home=` and `airlock.init=`.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, Stage1Error> {
        let mut plan = Plan {
            layers: Vec::new(),
            home: None,
            init: "/sbin/init".into(),
        };
        for word in cmdline.split_ascii_whitespace() {
            match word.split_once('=') {
                Some(("airlock.layers", v)) => {
                    plan.layers = v.split(',').map(device).collect::<Result<_, _>>()?
                }
                Some(("airlock.home", v)) => plan.home = Some(device(v)?),
                Some(("airlock.init", v)) => {
                    if !v.starts_with('/') {
                        return Err(Stage1Error::Cmdline(format!(
                            "airlock.init={v} is not an absolute path"
                        )));
                    }
                    plan.init = v.into();
                }
                _ => {}
            }
        }
        if plan.layers.is_empty() || plan.layers.len() > 8 {
            return Err(Stage1Error::Cmdline(
                "airlock.layers= must name 1 to 8 read-only layers (vda,vdb,...)".into(),
            ));
        }
        Ok(plan)
    }
}

/// True when this initramfs asks for stage 1.
pub fn wanted() -> bool {
    Path::new(STAGE1_MARKER).exists()
}

/// Assembles the root and executes the next init. Returns only on error.
pub fn run(modules: &Path) -> Stage1Error {
    match assemble(modules) {
        Ok(plan) => exec_init(&plan.init),
        Err(e) => e,
    }
}

fn mount_pseudo() -> Result<(), Stage1Error> {
    for (src, target, fstype) in [("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs")] {
        let _ = fs::create_dir_all(target);
        match mount(
            Some(src),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(e) => return Err(step(format!("mount {target}"))(e)),
        }
    }
    Ok(())
}

fn assemble(modules: &Path) -> Result<Plan, Stage1Error> {
    mount_pseudo()?;
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(io_step("read /proc/cmdline"))?;
    let plan = Plan::from_cmdline(&cmdline)?;
    let loaded = load_modules(modules)?;
    console_line(&format!(
        "airlock-guest: stage 1: {loaded} modules, {} layers",
        plan.layers.len()
    ));
    let mut lowers = Vec::new();
    for (i, dev) in plan.layers.iter().enumerate() {
        wait_device(dev)?;
        let dir = format!("/layers/{i}");
        fs::create_dir_all(&dir).map_err(io_step(format!("create {dir}")))?;
        mount(
            Some(dev.as_path()),
            dir.as_str(),
            Some("squashfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(step(format!("mount layer {}", dev.display())))?;
        lowers.push(dir);
    }
    // The writable layer: tmpfs, so nothing a VM writes outlives it and
    // nothing is copied when it starts.
    fs::create_dir_all("/layers/rw").map_err(io_step("create /layers/rw"))?;
    mount(
        Some("tmpfs"),
        "/layers/rw",
        Some("tmpfs"),
        MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(step("mount the writable tmpfs"))?;
    for d in ["/layers/rw/upper", "/layers/rw/work", NEW_ROOT] {
        fs::create_dir_all(d).map_err(io_step(format!("create {d}")))?;
    }
    // overlayfs lists the top layer first.
    lowers.reverse();
    let opts = format!(
        "lowerdir={},upperdir=/layers/rw/upper,workdir=/layers/rw/work",
        lowers.join(":")
    );
    mount(
        Some("overlay"),
        NEW_ROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(step("mount the overlay root"))?;
    if let Some(home) = &plan.home {
        mount_home(home)?;
    }
    switch_root()?;
    Ok(plan)
}

fn mount_home(dev: &Path) -> Result<(), Stage1Error> {
    wait_device(dev)?;
    let target = format!("{NEW_ROOT}/root");
    fs::create_dir_all(&target).map_err(io_step(format!("create {target}")))?;
    mount(
        Some(dev),
        target.as_str(),
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(step(format!("mount the home disk {}", dev.display())))
}

/// Device nodes appear as their driver probes; the wait is bounded.
fn wait_device(dev: &Path) -> Result<(), Stage1Error> {
    let deadline = Instant::now() + DEVICE_WAIT;
    while !dev.exists() {
        if Instant::now() > deadline {
            return Err(Stage1Error::NoDevice(dev.display().to_string()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Moves the pseudo filesystems into the new root, frees the initramfs'
/// files and makes the new root `/` (what `switch_root` does).
fn switch_root() -> Result<(), Stage1Error> {
    for d in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{d}");
        fs::create_dir_all(&target).map_err(io_step(format!("create {target}")))?;
        mount(
            Some(d),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(step(format!("move {d}")))?;
    }
    free_initramfs();
    nix::unistd::chdir(NEW_ROOT).map_err(step("chdir to the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("move the new root onto /"))?;
    nix::unistd::chroot(".").map_err(step("chroot into the new root"))?;
    nix::unistd::chdir("/").map_err(step("chdir to /"))
}

/// The initramfs stays in memory under the new root: remove its files
/// (the agent binary and modules, ~15 MB) but not the mount points.
fn free_initramfs() {
    let Ok(entries) = fs::read_dir("/") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if matches!(
            name.to_str(),
            Some("newroot" | "layers" | "dev" | "proc" | "sys")
        ) {
            continue;
        }
        let path = entry.path();
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
    }
}

fn exec_init(init: &str) -> Stage1Error {
    let err = |source| Stage1Error::Exec {
        init: init.into(),
        source,
    };
    let program = match CString::new(init) {
        Ok(p) => p,
        Err(_) => return err(nix::Error::EINVAL),
    };
    console_line(&format!("airlock-guest: stage 1: starting {init}"));
    match nix::unistd::execv(&program, &[program.as_c_str()]) {
        Ok(never) => match never {},
        Err(e) => err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_reads_layers_home_and_init() {
        let p = Plan::from_cmdline(
            "console=ttyS0 airlock.layers=vda,vdb airlock.home=vdc airlock.init=/lib/systemd/systemd",
        )
        .unwrap();
        assert_eq!(
            p.layers,
            vec![PathBuf::from("/dev/vda"), PathBuf::from("/dev/vdb")]
        );
        assert_eq!(p.home, Some(PathBuf::from("/dev/vdc")));
        assert_eq!(p.init, "/lib/systemd/systemd");
    }

    #[test]
    fn plan_refuses_paths_and_missing_layers() {
        assert!(Plan::from_cmdline("airlock.layers=../../etc").is_err());
        assert!(Plan::from_cmdline("quiet").is_err());
        assert!(Plan::from_cmdline("airlock.layers=vda airlock.init=sbin/init").is_err());
        assert_eq!(
            Plan::from_cmdline("airlock.layers=vda").unwrap().init,
            "/sbin/init"
        );
    }
}
