//! The QEMU backend: one `vhost-device-vsock` and one QEMU per VM.
//!
//! vhost-device-vsock speaks Firecracker's hybrid vsock protocol on the host
//! side (guest port P arrives as a connection to `<uds>_P`), so the agent
//! channel is the same as under Firecracker. QEMU shares guest memory with
//! it through a memfd, boots the kernel and initramfs directly, and writes
//! the serial console to a socket airlockd already listens on. Used by the
//! VM supervisor through [`super::backend::VmBackend`].

mod args;

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use serde_json::{json, Value};
use tokio::process::Command;
use tokio::sync::OnceCell;

use args::hotplug_vsock;
pub use args::{qemu_args, BootFiles};

use super::accel::{self, Accel, AccelDecision, ProbeInputs};
use super::account::VmAccount;
use super::backend::{
    file_tail, BackendError, BackendInfo, Boot, BoxFuture, LaunchSpec, RunningVm, SaveStats,
    VmBackend, VmProcess,
};
use super::cgroup::VmCgroup;
use super::confine::Confinement;
use super::console::Console;
use super::layout::VmDir;
use super::qmp::{Qmp, QmpError};
use super::{ramfile, VmKind};
use crate::config::{QemuConfig, VmConfig};

/// How long vhost-device-vsock gets to create its socket.
const VHOST_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU gets to create its control socket.
const QMP_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest gets to release its vsock device (ACPI hotplug).
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(20);
/// Saving or loading a browser VM's state (hundreds of MB from the page
/// cache; a loaded host makes it slower).
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// The vsock device, its vhost-user chardev, and the PCIe root port it is
/// plugged into (ids in QEMU's device tree).
const VSOCK_DEVICE: &str = "vsock";
const VHOST_CHARDEV: &str = "vhost";
const VSOCK_PORT: &str = "rp-vsock";
/// The name a saved state's descriptor gets in QEMU (`getfd`).
const STATE_FD: &str = "state";

/// Runs VMs under QEMU.
#[derive(Debug)]
pub struct QemuBackend {
    qemu: QemuConfig,
    vm: VmConfig,
    state_dir: PathBuf,
    accel: Arc<OnceCell<AccelDecision>>,
    version: OnceCell<String>,
    confine: Confinement,
}

impl QemuBackend {
    /// A backend with the given settings, its VMs' processes confined by
    /// `confine`; acceleration is decided on first use (or by
    /// [`QemuBackend::detect_accel`]).
    pub fn new(qemu: QemuConfig, vm: VmConfig, state_dir: PathBuf, confine: Confinement) -> Self {
        Self {
            qemu,
            vm,
            state_dir,
            accel: Arc::default(),
            version: OnceCell::new(),
            confine,
        }
    }

    fn account(&self) -> Option<&VmAccount> {
        self.confine.account.as_ref()
    }

    /// Lets the VM's account reach what it must in the VM's directory,
    /// and nothing else there: the directory stays airlockd's (its logs
    /// and the record a later airlockd trusts), searchable by the
    /// account's group; QEMU and vhost-device-vsock create their sockets
    /// in `vmm/`, the account's own, beside the agent's and egress
    /// sockets airlockd binds there for them. Run at launch and again
    /// when a VM is taken over.
    fn give_dir(&self, spec: &LaunchSpec) -> Result<(), BackendError> {
        let dir = &spec.dir;
        let vmm = dir.vmm_dir();
        let io = |context: String| move |source| BackendError::Io { context, source };
        let Some(account) = self.account() else {
            return Ok(());
        };
        nix::unistd::chown(dir.root(), None, Some(account.gid())).map_err(|e| {
            io(format!("give {} to the VM's group", dir.root().display()))(e.into())
        })?;
        std::fs::set_permissions(dir.root(), std::fs::Permissions::from_mode(0o710))
            .map_err(io(format!("chmod {}", dir.root().display())))?;
        // The sockets airlockd listens on are bound for the account
        // (`account::bind_for`).
        let mut paths = vec![vmm];
        if let Boot::Image {
            home: Some(home), ..
        } = &spec.boot
        {
            // The user's disk: QEMU reopens it for writing.
            paths.push(home.clone());
        }
        for path in paths {
            account.give(&path).map_err(io(format!(
                "give {} to {}",
                path.display(),
                account.name()
            )))?;
        }
        Ok(())
    }

    /// Spawns `program` confined: in the VM's cgroup, as the VM's account,
    /// with `inherit` passed on.
    fn spawn(
        &self,
        program: &Path,
        args: &[OsString],
        log: &Path,
        cgroup: Option<&VmCgroup>,
        inherit: Vec<RawFd>,
    ) -> Result<tokio::process::Child, BackendError> {
        let procs = cgroup.map(VmCgroup::procs_fds).unwrap_or_default();
        spawn_logged(program, args, log, |cmd| {
            if self.account().is_some() || !procs.is_empty() || !inherit.is_empty() {
                VmAccount::confine(self.account(), cmd, procs, inherit);
            }
        })
    }

    /// Decides KVM or TCG now (probing if configured `auto`); idempotent.
    pub async fn detect_accel(&self) -> AccelDecision {
        self.accel
            .get_or_init(|| async {
                let inputs = ProbeInputs {
                    qemu: &self.qemu,
                    kernel: &self.vm.kernel,
                    initramfs: &self.vm.initramfs,
                    cache_file: self.state_dir.join("accel-probe.json"),
                };
                let d = accel::decide(&inputs).await;
                tracing::info!(accel = d.accel.as_str(), reason = %d.reason, "acceleration chosen");
                d
            })
            .await
            .clone()
    }

    fn check_inputs(&self, boot: &Boot) -> Result<(), BackendError> {
        if matches!(boot, Boot::Image { .. }) {
            // GoldenImage::open checked its files when the VM was created.
            return Ok(());
        }
        for (what, path) in [
            ("kernel", &self.vm.kernel),
            ("initramfs", &self.vm.initramfs),
        ] {
            if !path.is_file() {
                return Err(BackendError::Missing {
                    what,
                    path: path.display().to_string(),
                    hint: "build the image with `make image` or fix vm.kernel / vm.initramfs",
                });
            }
        }
        Ok(())
    }

    /// The VM's console capture, served before QEMU connects to it (for a
    /// VM taken over, in place of the earlier airlockd's: QEMU dials again).
    fn start_console(
        &self,
        dir: &VmDir,
        accel: Accel,
        taken_over: bool,
    ) -> Result<RunningVm, BackendError> {
        let log = dir.file("console.log");
        let max = self.vm.console_max_bytes;
        let console = match taken_over {
            true => Console::append(&log, max),
            false => Console::create(&log, max),
        }
        .map_err(|source| BackendError::Io {
            context: "create console.log".into(),
            source,
        })?;
        let console_listener = super::account::bind_for(self.account(), &dir.console_socket())
            .map_err(|source| BackendError::Io {
                context: "bind the console socket".into(),
                source,
            })?;
        let vm = RunningVm::new(console.clone(), Some(accel.as_str().into()));
        {
            let (tracker, cancel) = vm.io();
            console.serve(console_listener, tracker, cancel);
        }
        Ok(vm)
    }

    /// vhost-device-vsock, then QEMU; both end up in `vm` (QEMU first).
    async fn start_processes(
        &self,
        spec: &LaunchSpec,
        accel: Accel,
        vm: &mut RunningVm,
    ) -> Result<(), BackendError> {
        let dir = &spec.dir;
        self.give_dir(spec)?;
        let cgroup = self.confine.cgroup_for(spec)?;
        let vhost = self.start_vhost(spec, cgroup.as_ref()).await?;
        let vhost_pid = vhost.id().unwrap_or_default();
        let mut files = match self.account() {
            Some(_) => BootFiles::by_fd(),
            None => BootFiles::by_path(),
        };
        let mut args = qemu_args(&self.qemu, &self.vm, spec, accel, &mut files);
        let fds = files.fds().map_err(|(path, source)| BackendError::Io {
            context: format!("open {} for QEMU", path.display()),
            source,
        })?;
        let mut program = self.qemu.binary.clone();
        if spec.background {
            // nice(1) execs QEMU: same process, every thread at nice 19.
            args.splice(0..0, ["-n".into(), "19".into(), program.into_os_string()]);
            program = PathBuf::from("nice");
        }
        let qemu = self.spawn(&program, &args, &dir.file("vmm.log"), cgroup.as_ref(), fds)?;
        drop(files);
        let qemu_pid = qemu.id().unwrap_or_default();
        vm.processes.push(VmProcess {
            name: "qemu",
            child: qemu,
        });
        vm.processes.push(VmProcess {
            name: "vhost-device-vsock",
            child: vhost,
        });
        dir.record_pids(&[("qemu", qemu_pid), ("vhost", vhost_pid)])?;
        Ok(())
    }

    async fn launch_inner(&self, spec: &LaunchSpec) -> Result<RunningVm, BackendError> {
        self.check_inputs(&spec.boot)?;
        let accel = self.detect_accel().await.accel;
        let mut vm = self.start_console(&spec.dir, accel, false)?;
        self.start_processes(spec, accel, &mut vm).await?;
        Ok(vm)
    }

    async fn adopt_inner(
        &self,
        spec: &LaunchSpec,
        procs: Vec<super::adopt::Adopted>,
    ) -> Result<RunningVm, BackendError> {
        let accel = self.detect_accel().await.accel;
        let mut vm = self.start_console(&spec.dir, accel, true)?;
        self.give_dir(spec)?;
        vm.adopted = procs;
        Ok(vm)
    }

    async fn restore_inner(&self, spec: &LaunchSpec) -> Result<RunningVm, BackendError> {
        let Boot::Restore { state, .. } = &spec.boot else {
            return Err(BackendError::Unsupported(
                "qemu (restore without a saved state)",
            ));
        };
        if !hotplug_vsock(&self.qemu) {
            return Err(BackendError::Unsupported(
                "qemu (machine without PCIe hotplug)",
            ));
        }
        let ram = ramfile::path_for(&spec.vm_id);
        ramfile::copy_sparse(&ramfile::beside(state), &ram, spec.background)
            .await
            .map_err(|e| {
                BackendError::Restore(format!("cannot copy the snapshot's guest RAM: {e}"))
            })?;
        if let Some(account) = self.account() {
            // QEMU maps the copy read-write.
            account.give(&ram).map_err(|source| BackendError::Io {
                context: format!("give {} to {}", ram.display(), account.name()),
                source,
            })?;
        }
        let accel = self.detect_accel().await.accel;
        let mut vm = self.start_console(&spec.dir, accel, false)?;
        self.start_processes(spec, accel, &mut vm).await?;
        let qmp_socket = spec.dir.qmp_socket();
        let program = self.qemu.binary.display().to_string();
        let Some(qemu) = vm.processes.first_mut() else {
            return Err(BackendError::Unsupported("qemu (no process)"));
        };
        let mut qmp = connect_qmp(&spec.dir, &qmp_socket, &mut qemu.child, &program).await?;
        // The RAM is the copied file: the state carries none.
        set_migration_capabilities(&mut qmp, true).await?;
        let file = std::fs::File::open(state).map_err(|source| BackendError::Io {
            context: format!("open {}", state.display()),
            source,
        })?;
        let done = migrate_through(&mut qmp, file, "migrate-incoming", RESTORE_TIMEOUT).await?;
        if !done {
            return Err(BackendError::Restore(format!(
                "loading {} failed: {}",
                state.display(),
                file_tail(&spec.dir.file("vmm.log"), 3)
            )));
        }
        Ok(vm)
    }

    async fn resume_inner(&self, dir: &VmDir) -> Result<(), BackendError> {
        let mut qmp = Qmp::connect(&dir.qmp_socket(), QMP_TIMEOUT).await?;
        let socket = dir.vhost_socket().display().to_string();
        let backend = json!({"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": socket}}, "server": false}});
        qmp.execute(
            "chardev-add",
            json!({"id": VHOST_CHARDEV, "backend": backend}),
            QMP_TIMEOUT,
        )
        .await?;
        let device = json!({"driver": "vhost-user-vsock-pci", "chardev": VHOST_CHARDEV,
            "id": VSOCK_DEVICE, "bus": VSOCK_PORT});
        qmp.execute("device_add", device, QMP_TIMEOUT).await?;
        qmp.execute("cont", json!({}), QMP_TIMEOUT).await?;
        Ok(())
    }

    /// Unplugs the vsock device (QEMU 7.2 refuses to save a VM with a
    /// vhost-user device), then streams the state to `out` with QEMU's
    /// default 32 MiB/s migration cap lifted.
    async fn save_inner(&self, dir: &VmDir, out: &Path) -> Result<SaveStats, BackendError> {
        self.save_steps(dir, out).await.map_err(|e| match e {
            BackendError::Qmp(e) => BackendError::Restore(format!(
                "{e} (QEMU's log: {})",
                file_tail(&dir.file("vmm.log"), 3)
            )),
            e => e,
        })
    }

    async fn save_steps(&self, dir: &VmDir, out: &Path) -> Result<SaveStats, BackendError> {
        let started = Instant::now();
        let mut qmp = Qmp::connect(&dir.qmp_socket(), QMP_TIMEOUT).await?;
        qmp.execute("device_del", json!({ "id": VSOCK_DEVICE }), QMP_TIMEOUT)
            .await?;
        qmp.wait_event(
            "unplug the vsock device",
            |v| v["event"] == "DEVICE_DELETED" && v["data"]["device"] == VSOCK_DEVICE,
            UNPLUG_TIMEOUT,
        )
        .await?;
        qmp.execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1u64 << 40}),
            QMP_TIMEOUT,
        )
        .await?;
        let ram = ramfile::path_for(&dir.id());
        let file_backed = ram.exists();
        set_migration_capabilities(&mut qmp, file_backed).await?;
        // Stopped first: the state is then one consistent pass, with no
        // dirty-page tracking of a running guest to trust (and the RAM
        // file is not written while it is copied).
        qmp.execute("stop", json!({}), QMP_TIMEOUT).await?;
        let file = std::fs::File::create(out).map_err(|source| BackendError::Io {
            context: format!("create {}", out.display()),
            source,
        })?;
        let done = migrate_through(&mut qmp, file, "migrate", SAVE_TIMEOUT).await?;
        if !done {
            return Err(BackendError::Restore(format!(
                "saving to {} failed: {}",
                out.display(),
                file_tail(&dir.file("vmm.log"), 3)
            )));
        }
        let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        let ram_bytes = match file_backed {
            true => {
                let to = ramfile::beside(out);
                let copied = ramfile::copy_sparse(&ram, &to, false).await;
                copied
                    .and_then(|()| ramfile::allocated(&to))
                    .map_err(|e| BackendError::Io {
                        context: "copy the template's guest RAM".into(),
                        source: e,
                    })?
            }
            false => 0,
        };
        Ok(SaveStats {
            bytes,
            ram_bytes,
            took: started.elapsed(),
        })
    }

    /// QEMU's version line, asked once.
    async fn version(&self) -> String {
        self.version
            .get_or_init(|| async {
                let out = Command::new(&self.qemu.binary)
                    .arg("--version")
                    .output()
                    .await;
                match out {
                    Ok(o) => String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    Err(e) => format!("unknown ({e})"),
                }
            })
            .await
            .clone()
    }

    async fn start_vhost(
        &self,
        spec: &LaunchSpec,
        cgroup: Option<&VmCgroup>,
    ) -> Result<tokio::process::Child, BackendError> {
        let dir = &spec.dir;
        let socket = dir.vhost_socket();
        let args: Vec<OsString> = vec![
            "--guest-cid".into(),
            "3".into(),
            "--socket".into(),
            socket.clone().into(),
            "--uds-path".into(),
            dir.vsock_uds().into(),
        ];
        let program = &self.qemu.vhost_vsock_binary;
        let mut child = self.spawn(program, &args, &dir.file("vhost.log"), cgroup, Vec::new())?;
        let shown = program.display().to_string();
        wait_created(dir, &socket, &mut child, &shown, VHOST_READY_TIMEOUT).await?;
        Ok(child)
    }
}

/// Waits until `path` exists in `dir` (inotify), failing if `child`
/// exits first or `timeout` passes.
/// Connects to a QEMU that was just started, once its QMP socket listens.
/// QEMU binds the socket before it listens on it: a connection in between
/// is refused, and a busy host can hold QEMU between the two.
async fn connect_qmp(
    dir: &VmDir,
    path: &Path,
    child: &mut tokio::process::Child,
    program: &str,
) -> Result<Qmp, BackendError> {
    let deadline = Instant::now() + QMP_READY_TIMEOUT;
    wait_created(dir, path, child, program, QMP_READY_TIMEOUT).await?;
    let mut pause = Duration::from_millis(2);
    loop {
        match Qmp::connect(path, QMP_TIMEOUT).await {
            Err(QmpError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(BackendError::EarlyExit {
                        program: program.to_string(),
                        status: super::backend::describe_status(status),
                        log_tail: file_tail(&dir.file("vmm.log"), 5),
                    });
                }
                // No event says "now listening": poll, briefly.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            r => return r.map_err(BackendError::from),
        }
    }
}

async fn wait_created(
    dir: &VmDir,
    path: &Path,
    child: &mut tokio::process::Child,
    program: &str,
    timeout: Duration,
) -> Result<(), BackendError> {
    let io = |source| BackendError::Io {
        context: "watch the VM directory".into(),
        source,
    };
    let watch = Inotify::init().map_err(io)?;
    watch
        .watches()
        .add(
            path.parent().unwrap_or(dir.root()),
            WatchMask::CREATE | WatchMask::MOVED_TO,
        )
        .map_err(io)?;
    let mut events = watch.into_event_stream(vec![0u8; 4096]).map_err(io)?;
    // Checked after the watch exists, so a creation cannot slip between.
    let wait = async {
        while !path.exists() {
            if events.next().await.is_none() {
                break;
            }
        }
    };
    let log = if program.contains("vhost") {
        "vhost.log"
    } else {
        "vmm.log"
    };
    tokio::select! {
        r = tokio::time::timeout(timeout, wait) => match r {
            Ok(()) if path.exists() => Ok(()),
            _ => Err(BackendError::NotReady {
                program: program.to_string(),
                what: path.display().to_string(),
                waited: timeout,
            }),
        },
        status = child.wait() => Err(BackendError::EarlyExit {
            program: program.to_string(),
            status: status.map(super::backend::describe_status).unwrap_or_else(|e| e.to_string()),
            log_tail: file_tail(&dir.file(log), 5),
        }),
    }
}

/// QEMU reports a migration's progress as events only when asked to; with
/// `ignore_shared` the RAM (a shared file both ends map) is left out of
/// the stream.
async fn set_migration_capabilities(
    qmp: &mut Qmp,
    ignore_shared: bool,
) -> Result<(), BackendError> {
    let caps = json!({"capabilities": [
        {"capability": "events", "state": true},
        {"capability": "x-ignore-shared", "state": ignore_shared},
    ]});
    qmp.execute("migrate-set-capabilities", caps, QMP_TIMEOUT)
        .await?;
    Ok(())
}

/// Runs `command` (`migrate` or `migrate-incoming`) through `file`, passed
/// to QEMU as a descriptor, and waits up to `timeout` for it to end; true
/// when it completed.
async fn migrate_through(
    qmp: &mut Qmp,
    file: std::fs::File,
    command: &str,
    timeout: Duration,
) -> Result<bool, BackendError> {
    qmp.pass_fd(STATE_FD, file.as_raw_fd(), QMP_TIMEOUT).await?;
    // QEMU holds its own copy now.
    drop(file);
    let uri = format!("fd:{STATE_FD}");
    qmp.execute(command, json!({ "uri": uri }), QMP_TIMEOUT)
        .await?;
    let done = qmp
        .wait_event(&format!("finish {command}"), migration_ended, timeout)
        .await?;
    Ok(done["data"]["status"] == "completed")
}

/// A MIGRATION event that ends one (either way).
fn migration_ended(v: &Value) -> bool {
    v["event"] == "MIGRATION"
        && matches!(
            v["data"]["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
}

impl VmBackend for QemuBackend {
    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        Box::pin(self.launch_inner(spec))
    }

    fn isolates_network(&self, _kind: VmKind) -> bool {
        true
    }

    fn snapshot_compat<'a>(&'a self) -> BoxFuture<'a, Option<String>> {
        Box::pin(async {
            if !hotplug_vsock(&self.qemu) {
                return None;
            }
            let accel = self.detect_accel().await.accel;
            let q = &self.qemu;
            Some(format!(
                "{} | machine {} | cpu {} | accel {} | firmware {:?} | append {:?}",
                self.version().await,
                q.machine,
                q.cpu,
                accel.as_str(),
                q.firmware,
                q.extra_append
            ))
        })
    }

    fn save<'a>(
        &'a self,
        dir: &'a VmDir,
        out: &'a Path,
    ) -> BoxFuture<'a, Result<SaveStats, BackendError>> {
        Box::pin(self.save_inner(dir, out))
    }

    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        Box::pin(self.restore_inner(spec))
    }

    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.resume_inner(dir))
    }

    fn adopt<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        procs: Vec<super::adopt::Adopted>,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        Box::pin(self.adopt_inner(spec, procs))
    }

    fn release(&self, vm_id: &str) -> usize {
        self.confine.release(vm_id)
    }

    fn foreground(&self, vm_id: &str, vcpus: u32) {
        self.confine.foreground(vm_id, vcpus);
    }

    fn socket_owner(&self, _kind: VmKind) -> Option<&VmAccount> {
        self.account()
    }

    fn release_others(&self, kept: &[String]) {
        let Some(cgroups) = &self.confine.cgroups else {
            return;
        };
        for id in cgroups.vm_ids() {
            if !kept.contains(&id) {
                let killed = self.confine.release(&id);
                tracing::warn!(vm_id = %id, killed, "removed the cgroup of a VM an earlier airlockd left");
            }
        }
    }

    fn info(&self) -> BackendInfo {
        let d = self.accel.get();
        BackendInfo {
            backend: "qemu",
            accel: Some(
                d.map(|d| d.accel.as_str().to_string())
                    .unwrap_or_else(|| "detecting".into()),
            ),
            accel_reason: d.map(|d| d.reason.clone()),
            confinement: Some(self.confine.describe()),
            cgroup_parents: self
                .confine
                .cgroups
                .as_ref()
                .map(|c| {
                    c.parents()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Spawns `program` with stdout and stderr appended to `log`.
fn spawn_logged(
    program: &Path,
    args: &[OsString],
    log: &Path,
    confine: impl FnOnce(&mut Command),
) -> Result<tokio::process::Child, BackendError> {
    let io_err = |source| BackendError::Io {
        context: format!("create {}", log.display()),
        source,
    };
    let out = std::fs::File::create(log).map_err(io_err)?;
    let err = out.try_clone().map_err(io_err)?;
    // Its own process group: a signal to airlockd's group (Ctrl-C in a
    // terminal) does not reach the VMs, which outlive airlockd.
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    confine(&mut cmd);
    cmd.spawn().map_err(|source| BackendError::Spawn {
        program: program.display().to_string(),
        source,
    })
}
