//! The VM backend interface and the handle on a launched VM's processes.
//!
//! A backend turns a [`LaunchSpec`] into running processes whose guest
//! agent will dial `<dir>/vsock.sock_<port>`: [`super::qemu`] with QEMU and
//! vhost-device-vsock, [`super::process`] with the agent as a host process.
//! The VM supervisor owns the returned [`RunningVm`] and decides when it
//! stops.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::process::Child;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::adopt::Adopted;
use super::console::Console;
use super::layout::{LayoutError, VmDir};
use super::VmKind;

/// A boxed future, for the object-safe backend trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a VM boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// `vm.kernel` with `vm.initramfs` (the agent as `/init`): the test VMs.
    Initramfs,
    /// A golden image: its stage-1 initrd assembles the root from its
    /// read-only layers under a tmpfs and executes `init`.
    Image {
        /// The image (checked against the expected agent).
        image: crate::image::GoldenImage,
        /// The init of the assembled root.
        init: &'static str,
        /// The user's persistent home disk (CLI VMs), mounted on `/root`.
        home: Option<std::path::PathBuf>,
    },
    /// A saved state of a VM that booted `image` (a browser VM's
    /// snapshot): loaded into a paused VM, which runs once resumed.
    Restore {
        /// The image the saved VM booted (its drives are attached again).
        image: crate::image::GoldenImage,
        /// The init it booted (the command line must match the saved one).
        init: &'static str,
        /// The saved state.
        state: std::path::PathBuf,
    },
}

impl Boot {
    /// How refusals and errors name what the VM booted.
    pub fn describe(&self, initramfs: &std::path::Path) -> String {
        match self {
            Boot::Initramfs => format!("image {}", initramfs.display()),
            Boot::Image { image, .. } => image.describe(),
            Boot::Restore { image, state, .. } => {
                format!("{} restored from {}", image.describe(), state.display())
            }
        }
    }
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The VM's id.
    pub vm_id: String,
    /// Its working directory (the agent listener is already bound there).
    pub dir: VmDir,
    /// Memory (MiB).
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// The vsock port the agent must dial.
    pub agent_port: u32,
    /// What it boots (the process backend ignores this).
    pub boot: Boot,
    /// What it is for.
    pub kind: VmKind,
    /// Runs at the lowest CPU priority (a VM of the warm pool, restored
    /// beside sessions' logins) until [`super::pool`] raises it.
    pub background: bool,
}

/// A backend could not start a VM.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A helper program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A helper exited during startup.
    #[error("{program} exited during startup ({status}): {log_tail}")]
    EarlyExit {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// A helper did not become ready in time.
    #[error("{program} did not create {what} within {waited:?}")]
    NotReady {
        /// The program.
        program: String,
        /// What it should have created.
        what: String,
        /// How long airlockd waited.
        waited: Duration,
    },
    /// A required file is missing.
    #[error("{what} {path} is missing: {hint}")]
    Missing {
        /// Which input.
        what: &'static str,
        /// Its path.
        path: String,
        /// How to get it.
        hint: &'static str,
    },
    /// Setting up files failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Saving or loading a VM's state failed.
    #[error("{0}")]
    Restore(String),
    /// The backend cannot save or restore VMs.
    #[error("the {0} backend cannot snapshot VMs")]
    Unsupported(&'static str),
    /// QEMU's control socket failed.
    #[error(transparent)]
    Qmp(#[from] super::qmp::QmpError),
    /// The VM's cgroup could not be set up.
    #[error(transparent)]
    Cgroup(#[from] super::cgroup::CgroupError),
    /// Other I/O.
    #[error("{context}: {source}")]
    Io {
        /// What airlockd was doing.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Facts about a backend for `/health`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendInfo {
    /// `qemu` or `process`.
    pub backend: &'static str,
    /// `kvm`, `tcg`, `detecting`, or absent when not applicable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Why that acceleration was chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel_reason: Option<String>,
    /// The account VM processes run as and their cgroups, when confined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confinement: Option<String>,
    /// The cgroups each VM's own is made under (one per hierarchy).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cgroup_parents: Vec<String>,
}

/// A way of running VMs.
pub trait VmBackend: Send + Sync + std::fmt::Debug {
    /// Starts the VM's processes.
    fn launch<'a>(&'a self, spec: &'a LaunchSpec)
        -> BoxFuture<'a, Result<RunningVm, BackendError>>;

    /// Facts for `/health`.
    fn info(&self) -> BackendInfo;

    /// True when its guests of `kind` have no network of their own, so
    /// their traffic must go through the host's egress gateway (QEMU: no
    /// network device). The process backend shares the host's network,
    /// except for isolated host browsers (loopback only).
    fn isolates_network(&self, kind: VmKind) -> bool {
        let _ = kind;
        false
    }

    /// What a saved state depends on besides the image and the VM's size
    /// (machine, CPU model, acceleration, VMM): part of a snapshot's key.
    /// `None` when this backend cannot snapshot.
    fn snapshot_compat<'a>(&'a self) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }

    /// Saves a running VM's state to `out`; the VM stays paused, with no
    /// vsock device (the agent's connection breaks first).
    fn save<'a>(
        &'a self,
        dir: &'a VmDir,
        out: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<SaveStats, BackendError>> {
        let _ = (dir, out);
        Box::pin(async { Err(BackendError::Unsupported(self.info().backend)) })
    }

    /// Loads `spec`'s saved state ([`Boot::Restore`]) into a new VM that
    /// stays paused, without its vsock device, until [`VmBackend::resume`].
    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        let _ = spec;
        Box::pin(async { Err(BackendError::Unsupported(self.info().backend)) })
    }

    /// Attaches a restored VM's vsock device and lets it run.
    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        let _ = dir;
        Box::pin(async { Err(BackendError::Unsupported(self.info().backend)) })
    }

    /// Removes what this backend keeps for VM `vm_id` outside its
    /// directory (its cgroup), killing whatever still runs there; called
    /// once the VM's processes are gone. Returns how many it killed.
    fn release(&self, vm_id: &str) -> usize {
        let _ = vm_id;
        0
    }

    /// The account that connects to the sockets airlockd binds for a VM
    /// of `kind` (QEMU's helpers, a host-process browser), when it is not
    /// airlockd's own.
    fn socket_owner(&self, kind: VmKind) -> Option<&super::account::VmAccount> {
        let _ = kind;
        None
    }

    /// Gives a VM started in the background (`LaunchSpec::background`)
    /// the CPU weight of the foreground, as its processes' nice value is.
    fn foreground(&self, vm_id: &str, vcpus: u32) {
        let _ = (vm_id, vcpus);
    }

    /// At start, once the VMs that could be were taken over (`kept`):
    /// releases every other VM this backend still has something of.
    fn release_others(&self, kept: &[String]) {
        let _ = kept;
    }

    /// Takes over a VM an earlier airlockd started (its processes,
    /// watched, in `procs`): its console again, and nothing else started.
    fn adopt<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        procs: Vec<Adopted>,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        let _ = (spec, procs);
        Box::pin(async {
            Err(BackendError::Unsupported(
                "this backend (taking over a running VM)",
            ))
        })
    }
}

/// What saving a VM took.
#[derive(Debug, Clone, Copy)]
pub struct SaveStats {
    /// Bytes of the saved state.
    pub bytes: u64,
    /// Bytes of guest RAM kept beside it (a file-backed VM's RAM is not
    /// in the state), holes and zeros left out.
    pub ram_bytes: u64,
    /// From the request to the state being complete.
    pub took: Duration,
}

/// One process of a VM (the VMM, or a device helper).
#[derive(Debug)]
pub struct VmProcess {
    /// Short name for messages (`qemu`, `vhost-device-vsock`, `agent`).
    pub name: &'static str,
    /// The child; killed on drop as a last resort.
    pub child: Child,
}

/// A launched VM: its processes, console, and the tasks that pump their
/// output. Dropping it kills the processes it started (`kill_on_drop`) and
/// stops the tasks, so a launch that fails halfway leaves nothing behind;
/// [`RunningVm::detach`] leaves them running for the next airlockd.
#[derive(Debug)]
pub struct RunningVm {
    /// Processes this airlockd started, the VMM first.
    pub processes: Vec<VmProcess>,
    /// Processes an earlier airlockd started (a VM taken over), the VMM
    /// first; a VM has these or `processes`, not both.
    pub adopted: Vec<Adopted>,
    /// Console capture.
    pub console: Console,
    /// The acceleration it runs with (`kvm`/`tcg`), when applicable.
    pub accel: Option<String>,
    io_tasks: TaskTracker,
    io_cancel: CancellationToken,
    _io_guard: DropGuard,
    /// Files and directories its processes leave when killed, removed
    /// once they are gone.
    pub leftovers: Vec<std::path::PathBuf>,
}

impl RunningVm {
    /// A VM with no processes yet; backends add them as they start.
    pub fn new(console: Console, accel: Option<String>) -> Self {
        let io_cancel = CancellationToken::new();
        Self {
            processes: Vec::new(),
            adopted: Vec::new(),
            console,
            accel,
            io_tasks: TaskTracker::new(),
            _io_guard: io_cancel.clone().drop_guard(),
            io_cancel,
            leftovers: Vec::new(),
        }
    }

    /// Where backends run the tasks that pump process output, and the
    /// token that stops them.
    pub fn io(&self) -> (&TaskTracker, CancellationToken) {
        (&self.io_tasks, self.io_cancel.clone())
    }

    /// Pid of the VMM process.
    pub fn vmm_pid(&self) -> Option<u32> {
        match self.processes.first() {
            Some(p) => p.child.id(),
            None => self.adopted.first().and_then(Adopted::id),
        }
    }

    /// The pids of its processes by role, VMM first (for its record).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let started = self.processes.iter().map(|p| (p.name, p.child.id()));
        let adopted = self.adopted.iter().map(|a| (a.name, a.id()));
        started
            .chain(adopted)
            .filter_map(|(name, pid)| Some((name, pid?)))
            .collect()
    }

    /// Leaves its processes running (airlockd is exiting and a later one
    /// takes the VM over); stops only the output pumps.
    pub fn detach(mut self) {
        for p in std::mem::take(&mut self.processes) {
            // Dropping the child would kill it (`kill_on_drop`).
            std::mem::forget(p.child);
        }
        self.io_cancel.cancel();
    }

    /// Waits until any of the VM's processes exits; describes which and how.
    /// Cancel-safe.
    pub async fn wait_exit(&mut self) -> String {
        if self.processes.is_empty() {
            return self.wait_adopted().await;
        }
        let waits = self.processes.iter_mut().map(|p| {
            Box::pin(async move {
                let status = p.child.wait().await;
                (p.name, status)
            })
        });
        let ((name, status), _, _) = futures_util::future::select_all(waits).await;
        match status {
            Ok(s) => format!("{name} exited ({})", describe_status(s)),
            Err(e) => format!("cannot wait for {name}: {e}"),
        }
    }

    /// [`RunningVm::wait_exit`] for a VM taken over: its processes are not
    /// children, so their exit status is not known.
    async fn wait_adopted(&mut self) -> String {
        if self.adopted.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.adopted.iter_mut().map(|a| {
            Box::pin(async move {
                a.wait().await;
                a.name
            })
        });
        let (name, _, _) = futures_util::future::select_all(waits).await;
        format!("{name} exited")
    }

    /// Stops the processes of a VM taken over, as [`RunningVm::stop`]
    /// does its children.
    async fn stop_adopted(&mut self, grace: Duration) {
        for a in &self.adopted {
            a.terminate();
        }
        for a in &mut self.adopted {
            if tokio::time::timeout(grace, a.wait()).await.is_err() {
                kill_tree(a.name, a.id());
                a.kill();
                a.wait().await;
            }
        }
    }

    /// Stops every process: SIGTERM, up to `grace` to exit, then SIGKILL
    /// for it and everything it started (a process that ignores SIGTERM,
    /// or is stopped, cannot stop its children either). Waits for all of
    /// them, so no zombie or orphan remains.
    pub async fn stop(&mut self, grace: Duration) {
        for p in &self.processes {
            if let Some(pid) = p.child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        for p in &mut self.processes {
            if tokio::time::timeout(grace, p.child.wait()).await.is_err() {
                kill_tree(p.name, p.child.id());
                let _ = p.child.start_kill();
                let _ = p.child.wait().await;
            }
        }
        self.stop_adopted(grace).await;
        for path in &self.leftovers {
            let _ = std::fs::remove_dir_all(path);
        }
        // The pumps end at EOF once the processes are gone; the token covers
        // a pipe some grandchild still holds open.
        self.io_tasks.close();
        if tokio::time::timeout(Duration::from_secs(1), self.io_tasks.wait())
            .await
            .is_err()
        {
            self.io_cancel.cancel();
            self.io_tasks.wait().await;
        }
    }

    /// True when one of its processes has exited (checked without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.processes
            .iter_mut()
            .any(|p| !matches!(p.child.try_wait(), Ok(None)))
            || self.adopted.iter_mut().any(Adopted::has_exited)
    }

    /// Waits up to `grace` for the VMM to exit on its own (after the agent
    /// was asked to power off); true when it did.
    pub async fn wait_vmm(&mut self, grace: Duration) -> bool {
        match (self.processes.first_mut(), self.adopted.first_mut()) {
            (Some(p), _) => tokio::time::timeout(grace, p.child.wait()).await.is_ok(),
            (None, Some(a)) => tokio::time::timeout(grace, a.wait()).await.is_ok(),
            (None, None) => true,
        }
    }
}

/// Kills a process that did not stop within its grace, with everything
/// it started.
fn kill_tree(name: &str, pid: Option<u32>) {
    if let Some(pid) = pid {
        let killed = super::proctree::kill_tree(pid as i32);
        tracing::warn!(
            process = name,
            pid,
            killed,
            "did not stop within its grace; killed with everything it started"
        );
    }
}

/// `exit code N` or `killed by SIGX`.
pub fn describe_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "unknown status".into(),
    }
}

/// The last `n` lines of a helper's log file, for error messages.
pub fn file_tail(path: &std::path::Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(16 << 10);
    let text = super::console::sanitize(&bytes[start..]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
