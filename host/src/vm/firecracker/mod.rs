//! The Firecracker backend: one Firecracker process per VM (optionally
//! under its jailer), configured over its API socket.
//!
//! Firecracker's vsock device is the hybrid one vhost-device-vsock copies,
//! so the agent channel is the same as under QEMU: the guest dials CID 2
//! and arrives at `<dir>/vmm/vsock.sock_<port>`. The guest's serial console is
//! Firecracker's stdout, pumped into the VM's [`Console`]. The requests
//! themselves are data ([`plan`]), checked against Firecracker v1.15.1's
//! Swagger contract in tests; [`api`] sends them. Used by the VM
//! supervisor through [`VmBackend`], and by the snapshot work through
//! [`FirecrackerBackend::launch_with_handle`] and [`FirecrackerVm`].

pub mod api;
pub mod jailer;
pub mod plan;

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod fake_api_tests;
#[cfg(test)]
mod swagger;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use super::backend::{
    describe_status, file_tail, BackendError, BackendInfo, Boot, BoxFuture, LaunchSpec, RunningVm,
    VmBackend, VmProcess,
};
use super::console::Console;
use super::layout::VmDir;
use super::VmKind;
use crate::config::{FirecrackerConfig, VmConfig};
use api::{ApiClient, ApiError};
use jailer::{Access, Jail, JailError};
use plan::{BootPlan, ImageWords, SnapshotFiles, Telemetry};

/// How long Firecracker gets to create its API socket (it takes ~12 ms).
const API_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of a configuration request.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a snapshot request: it writes or maps all guest memory.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// The API socket, in the VM's directory.
const API_SOCKET: &str = "fc.sock";
/// Firecracker's own log (the name the failed-VM logs keep).
const LOG_FILE: &str = "vmm.log";
/// Its metrics.
const METRICS_FILE: &str = "metrics.json";
/// Where the hybrid vsock socket is inside a jail.
const JAIL_VSOCK: &str = "/vsock.sock";

/// An operation on a running Firecracker failed.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    /// The API refused or did not answer.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The jail could not be set up.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// A path a jailed Firecracker cannot see.
    #[error("{} is outside the VM's jail {}", path.display(), jail.display())]
    OutsideJail {
        /// The path.
        path: PathBuf,
        /// The jail's root.
        jail: PathBuf,
    },
    /// The snapshot's vsock socket is not where this VM's agent listens.
    #[error("the snapshot's vsock device binds {recorded}, but this VM's is {current}: Firecracker v1.15.1 cannot override it on load (no vsock override in /snapshot/load); restore under the jailer (every jail has /vsock.sock) or into the same VM directory")]
    VsockMismatch {
        /// The uds_path recorded in the snapshot.
        recorded: String,
        /// This VM's.
        current: String,
    },
}

/// Runs VMs under Firecracker.
#[derive(Debug)]
pub struct FirecrackerBackend {
    fc: FirecrackerConfig,
    vm: VmConfig,
    kvm_device: PathBuf,
}

/// How Firecracker sees the host's files: as they are, or through its jail.
#[derive(Debug, Clone)]
enum View {
    Host,
    Jail(Jail),
}

impl View {
    /// `src` as Firecracker will open it (placed in the jail if jailed).
    fn place(&self, src: &Path, name: &str, access: Access) -> Result<String, JailError> {
        match self {
            View::Host => jailer::utf8(src),
            View::Jail(jail) => jail.place(src, name, access),
        }
    }

    /// A host path Firecracker writes to (it must already be visible).
    fn inside(&self, host: &Path) -> Result<String, FirecrackerError> {
        match self {
            View::Host => Ok(jailer::utf8(host)?),
            View::Jail(jail) => jail
                .inside(host)
                .ok_or_else(|| FirecrackerError::OutsideJail {
                    path: host.to_path_buf(),
                    jail: jail.root().to_path_buf(),
                }),
        }
    }
}

/// A snapshot's files on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPaths {
    /// The microVM state.
    pub state: PathBuf,
    /// The guest memory.
    pub memory: PathBuf,
}

/// A snapshot taken by [`FirecrackerVm::snapshot_create`]: its files and
/// the vsock `uds_path` recorded in it, which a restored VM binds again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its files.
    pub paths: SnapshotPaths,
    /// The `uds_path` as the snapshotted Firecracker saw it.
    pub vsock_uds: String,
}

/// Control of one running Firecracker (pause, resume, snapshots).
#[derive(Debug, Clone)]
pub struct FirecrackerVm {
    vm_id: String,
    api: ApiClient,
    view: View,
    telemetry: Telemetry,
    vsock_uds: String,
}

impl FirecrackerVm {
    /// The vsock `uds_path` this Firecracker was (or will be) given.
    pub fn vsock_uds(&self) -> &str {
        &self.vsock_uds
    }

    /// Pauses the guest's vCPUs.
    pub async fn pause(&self) -> Result<(), FirecrackerError> {
        Ok(self.api.send_all(&plan::pause()).await?)
    }

    /// Resumes a paused guest.
    pub async fn resume(&self) -> Result<(), FirecrackerError> {
        Ok(self.api.send_all(&plan::resume()).await?)
    }

    /// Pauses the VM and writes a full snapshot to `paths` (inside its
    /// jail when jailed); the VM stays paused.
    pub async fn snapshot_create(
        &self,
        paths: &SnapshotPaths,
    ) -> Result<Snapshot, FirecrackerError> {
        let files = SnapshotFiles {
            snapshot_path: self.view.inside(&paths.state)?,
            mem_file_path: self.view.inside(&paths.memory)?,
        };
        let requests = plan::snapshot_create(&files);
        self.api
            .with_timeout(SNAPSHOT_TIMEOUT)
            .send_all(&requests)
            .await?;
        tracing::info!(vm_id = %self.vm_id, state = %paths.state.display(), "Firecracker snapshot written");
        Ok(Snapshot {
            paths: paths.clone(),
            vsock_uds: self.vsock_uds.clone(),
        })
    }

    /// Loads `snapshot` into this fresh Firecracker (nothing configured
    /// but logger and metrics). v1.15.1 has no vsock override on load: the
    /// restored device binds the snapshot's `uds_path`, so it must be this
    /// VM's ([`Self::vsock_uds`]), which holds for every jailed VM.
    pub async fn snapshot_load(
        &self,
        snapshot: &Snapshot,
        resume_vm: bool,
    ) -> Result<(), FirecrackerError> {
        if snapshot.vsock_uds != self.vsock_uds {
            return Err(FirecrackerError::VsockMismatch {
                recorded: snapshot.vsock_uds.clone(),
                current: self.vsock_uds.clone(),
            });
        }
        let files = SnapshotFiles {
            snapshot_path: self.view.place(
                &snapshot.paths.state,
                "snapshot.state",
                Access::ReadOnly,
            )?,
            mem_file_path: self.view.place(
                &snapshot.paths.memory,
                "snapshot.mem",
                Access::ReadOnly,
            )?,
        };
        let requests = plan::snapshot_load(&self.telemetry, &files, resume_vm);
        self.api
            .with_timeout(SNAPSHOT_TIMEOUT)
            .send_all(&requests)
            .await?;
        Ok(())
    }
}

impl FirecrackerBackend {
    /// A backend with the given settings.
    pub fn new(fc: FirecrackerConfig, vm: VmConfig) -> Self {
        Self {
            fc,
            vm,
            kvm_device: "/dev/kvm".into(),
        }
    }

    /// Launches and boots a VM, returning its control handle too.
    pub async fn launch_with_handle(
        &self,
        spec: &LaunchSpec,
    ) -> Result<(RunningVm, FirecrackerVm), BackendError> {
        let (vm, handle, boot) = self.start(spec).await?;
        handle
            .api
            .send_all(&plan::boot(&boot))
            .await
            .map_err(|e| api_failed(&spec.dir, "boot", e.into()))?;
        tracing::info!(vm_id = %spec.vm_id, jailed = matches!(handle.view, View::Jail(_)), "Firecracker VM started");
        Ok((vm, handle))
    }

    /// Starts a fresh Firecracker for `spec` (its disks placed as for a
    /// boot, since the snapshot names them) and loads `snapshot` into it.
    pub async fn launch_from_snapshot(
        &self,
        spec: &LaunchSpec,
        snapshot: &Snapshot,
        resume_vm: bool,
    ) -> Result<(RunningVm, FirecrackerVm), BackendError> {
        let (vm, handle, _) = self.start(spec).await?;
        handle
            .snapshot_load(snapshot, resume_vm)
            .await
            .map_err(|e| api_failed(&spec.dir, "load a snapshot", e))?;
        Ok((vm, handle))
    }

    /// Checks what a launch needs, then spawns Firecracker and waits for
    /// its API; returns the boot plan it has not been sent yet.
    async fn start(
        &self,
        spec: &LaunchSpec,
    ) -> Result<(RunningVm, FirecrackerVm, BootPlan), BackendError> {
        let (program, firecracker) = self.programs()?;
        let files = self.boot_files(&spec.boot)?;
        self.check_inputs(&files)?;
        let dir = &spec.dir;
        let log = create_log(&dir.file(LOG_FILE))?;
        create_file(&dir.file(METRICS_FILE))?;
        let view = match &self.fc.jailer {
            None => View::Host,
            Some(cfg) => View::Jail(
                Jail::create(cfg, &exec_name(&firecracker), &spec.vm_id, dir)
                    .map_err(jail_failed)?,
            ),
        };
        let boot = self.boot_plan(spec, &files, &view).map_err(jail_failed)?;
        let (api_arg, api_real) = api_socket(dir, &view).map_err(jail_failed)?;
        let args = match (&view, &self.fc.jailer) {
            (View::Jail(jail), Some(cfg)) => {
                jailer::jailer_args(cfg, jail, &firecracker, &spec.vm_id, &api_arg)
            }
            _ => direct_args(&spec.vm_id, &api_arg),
        };
        let console = Console::create(&dir.file("console.log"), self.vm.console_max_bytes)
            .map_err(|source| io_failed("create console.log", source))?;
        let mut vm = RunningVm::new(console.clone(), Some("kvm".into()));
        let watch = watch_dir(api_real.parent().unwrap_or(dir.root()))?;
        let mut child = spawn(&program, &args, log)?;
        pump_console(&mut vm, &mut child, &console, &view);
        let pid = child.id().unwrap_or_default();
        vm.processes.push(VmProcess {
            name: "firecracker",
            child,
        });
        dir.record_pids(&[("firecracker", pid)])?;
        wait_for_api(watch, &api_real, &mut vm, &program, dir).await?;
        let handle = FirecrackerVm {
            vm_id: spec.vm_id.clone(),
            api: ApiClient::new(&dir.file(API_SOCKET), API_TIMEOUT),
            view,
            telemetry: boot.telemetry.clone(),
            vsock_uds: boot.vsock_uds.clone(),
        };
        Ok((vm, handle, boot))
    }

    /// The program to spawn (Firecracker, or the jailer) and Firecracker's
    /// absolute path, or a clear refusal when one is missing.
    fn programs(&self) -> Result<(PathBuf, PathBuf), BackendError> {
        let hint = "install Firecracker v1.15 (firecracker and jailer from its release) or set firecracker.binary / firecracker.jailer.binary";
        let find = |what, p: &Path| {
            find_program(p).ok_or_else(|| BackendError::Missing {
                what,
                path: p.display().to_string(),
                hint,
            })
        };
        let firecracker = find("Firecracker binary", &self.fc.binary)?;
        let program = match &self.fc.jailer {
            Some(j) => find("jailer binary", &j.binary)?,
            None => firecracker.clone(),
        };
        Ok((program, firecracker))
    }

    fn kernel<'a>(&'a self, default: &'a Path) -> &'a Path {
        self.fc.kernel.as_deref().unwrap_or(default)
    }

    /// The files and kernel words of what `boot` boots.
    fn boot_files<'a>(&'a self, boot: &'a Boot) -> Result<BootFiles<'a>, BackendError> {
        match boot {
            Boot::Initramfs => Ok(BootFiles {
                kernel: self.kernel(&self.vm.kernel),
                initrd: &self.vm.initramfs,
                layers: &[],
                words: None,
                home: None,
            }),
            Boot::Image { image, init, home } => Ok(BootFiles {
                kernel: self.kernel(&image.kernel),
                initrd: &image.initrd,
                layers: &image.layers,
                words: Some(ImageWords {
                    layers: image.layers.len(),
                    init,
                    home: home.is_some(),
                }),
                home: home.as_deref(),
            }),
            // A saved state (`Boot::Restore`) is loaded by
            // `launch_from_snapshot`, not booted. A wildcard, not that
            // variant, so this builds with and without it.
            #[allow(unreachable_patterns)]
            _ => Err(io_failed(
                "the Firecracker backend loads saved states with launch_from_snapshot, not by booting them",
                std::io::ErrorKind::Unsupported.into(),
            )),
        }
    }

    fn check_inputs(&self, files: &BootFiles<'_>) -> Result<(), BackendError> {
        let kernel_hint = "build the image with `make image` or fix vm.kernel / vm.initramfs / firecracker.kernel";
        let inputs = [
            ("KVM device", self.kvm_device.as_path(), "Firecracker runs on KVM only: use a host with hardware virtualisation, or the qemu backend (which falls back to TCG)"),
            ("kernel", files.kernel, kernel_hint),
            ("initrd", files.initrd, kernel_hint),
        ];
        match inputs.into_iter().find(|(_, path, _)| !path.exists()) {
            Some((what, path, hint)) => Err(BackendError::Missing {
                what,
                path: path.display().to_string(),
                hint,
            }),
            None => Ok(()),
        }
    }

    /// The boot requests' inputs, every file placed where Firecracker
    /// sees it. Drives keep the QEMU order: layers, then the home disk.
    fn boot_plan(
        &self,
        spec: &LaunchSpec,
        files: &BootFiles<'_>,
        view: &View,
    ) -> Result<BootPlan, JailError> {
        let dir = &spec.dir;
        let mut layers = Vec::new();
        for (i, layer) in files.layers.iter().enumerate() {
            layers.push(view.place(layer, &format!("layer{i}"), Access::ReadOnly)?);
        }
        let home = match files.home {
            Some(home) => Some(view.place(home, "home.img", Access::Shared)?),
            None => None,
        };
        Ok(BootPlan {
            telemetry: Telemetry {
                log_path: view.place(&dir.file(LOG_FILE), LOG_FILE, Access::Shared)?,
                metrics_path: view.place(&dir.file(METRICS_FILE), METRICS_FILE, Access::Shared)?,
            },
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: view.place(files.kernel, "vmlinux", Access::ReadOnly)?,
            initrd: view.place(files.initrd, "initrd", Access::ReadOnly)?,
            boot_args: plan::kernel_cmdline(
                spec.agent_port,
                files.words.as_ref(),
                &self.fc.extra_append,
            ),
            layers,
            home,
            vsock_uds: vsock_uds(dir, view)?,
        })
    }
}

/// What a boot needs from the host.
#[derive(Debug)]
struct BootFiles<'a> {
    kernel: &'a Path,
    initrd: &'a Path,
    layers: &'a [PathBuf],
    words: Option<ImageWords<'a>>,
    home: Option<&'a Path>,
}

/// The vsock `uds_path`: the VM directory's, or the jail's (the host's
/// `vsock.sock` then links to it, and the agent's listeners are linked in).
fn vsock_uds(dir: &VmDir, view: &View) -> Result<String, JailError> {
    let View::Jail(jail) = view else {
        return jailer::utf8(&dir.vsock_uds());
    };
    let name = dir.vsock_uds();
    let name = name
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or("vsock.sock");
    jail.link_listeners(dir, name)?;
    symlink(&jail.host_path(JAIL_VSOCK), &dir.vsock_uds())?;
    Ok(JAIL_VSOCK.into())
}

/// `--api-sock`'s value, and where the socket appears on the host. A
/// jailed Firecracker gets the VM directory's path inside its jail, so its
/// command line names that directory (the crash cleanup looks for it);
/// `<dir>/fc.sock` then links to the real socket.
fn api_socket(dir: &VmDir, view: &View) -> Result<(String, PathBuf), JailError> {
    let host = dir.file(API_SOCKET);
    let arg = jailer::utf8(&host)?;
    let View::Jail(jail) = view else {
        return Ok((arg, host));
    };
    jail.make_parent(&arg)?;
    let real = jail.host_path(&arg);
    symlink(&real, &host)?;
    Ok((arg, real))
}

fn symlink(target: &Path, link: &Path) -> Result<(), JailError> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).map_err(|source| JailError::Io {
        action: "link",
        path: link.to_path_buf(),
        source,
    })
}

fn direct_args(vm_id: &str, api_sock: &str) -> Vec<OsString> {
    ["--id", vm_id, "--api-sock", api_sock]
        .into_iter()
        .map(OsString::from)
        .collect()
}

/// The last path component: the jailer names the jail's directory after it.
fn exec_name(firecracker: &Path) -> String {
    firecracker
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "firecracker".into())
}

/// `p` if it names a file, else the first match on `PATH` for a bare name.
fn find_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p
            .is_file()
            .then(|| std::fs::canonicalize(p).unwrap_or(p.to_path_buf()));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

fn create_file(path: &Path) -> Result<std::fs::File, BackendError> {
    std::fs::File::create(path)
        .map_err(|source| io_failed(&format!("create {}", path.display()), source))
}

/// Firecracker's log, created empty (its logger opens only an existing
/// file) and opened again appending for its stderr, so that what the
/// process prints there lands after the logger's lines, not over them.
fn create_log(path: &Path) -> Result<std::fs::File, BackendError> {
    create_file(path)?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|source| io_failed(&format!("open {}", path.display()), source))
}

fn io_failed(context: &str, source: std::io::Error) -> BackendError {
    BackendError::Io {
        context: context.into(),
        source,
    }
}

fn jail_failed(e: JailError) -> BackendError {
    io_failed("prepare Firecracker's files", std::io::Error::other(e))
}

/// An API failure, with the end of Firecracker's log (which says why).
fn api_failed(dir: &VmDir, what: &str, e: FirecrackerError) -> BackendError {
    let tail = file_tail(&dir.file(LOG_FILE), 5);
    let context = match tail.is_empty() {
        true => format!("cannot {what} the VM"),
        false => format!("cannot {what} the VM (Firecracker's log: {tail})"),
    };
    io_failed(&context, std::io::Error::other(e))
}

/// Firecracker with its serial console (stdout) piped to airlockd and its
/// stderr in its log.
fn spawn(program: &Path, args: &[OsString], log: std::fs::File) -> Result<Child, BackendError> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| BackendError::Spawn {
            program: program.display().to_string(),
            source,
        })
}

/// Feeds the guest's serial console to `console` until Firecracker exits,
/// then removes a jail that lives outside the VM's directory.
fn pump_console(vm: &mut RunningVm, child: &mut Child, console: &Console, view: &View) {
    let Some(stdout) = child.stdout.take() else {
        return;
    };
    let (tracker, cancel) = vm.io();
    let (console, view) = (console.clone(), view.clone());
    tracker.spawn(async move {
        console.pump(stdout, &cancel).await;
        if let View::Jail(jail) = view {
            jail.remove_if_outside();
        }
    });
}

/// Watches `dir` before Firecracker starts, so its socket cannot be missed.
fn watch_dir(dir: &Path) -> Result<Inotify, BackendError> {
    Inotify::init()
        .and_then(|i| {
            i.watches()
                .add(dir, WatchMask::CREATE | WatchMask::MOVED_TO)
                .map(|_| i)
        })
        .map_err(|source| io_failed("watch for Firecracker's API socket", source))
}

async fn wait_for_api(
    watch: Inotify,
    socket: &Path,
    vm: &mut RunningVm,
    program: &Path,
    dir: &VmDir,
) -> Result<(), BackendError> {
    let mut events = watch
        .into_event_stream(vec![0u8; 4096])
        .map_err(|source| io_failed("watch for Firecracker's API socket", source))?;
    let appeared = async {
        while !socket.exists() {
            if events.next().await.is_none() {
                break;
            }
        }
    };
    let console = vm.console.clone();
    let Some(process) = vm.processes.first_mut() else {
        return Ok(());
    };
    tokio::select! {
        r = tokio::time::timeout(API_READY_TIMEOUT, appeared) => match r {
            Ok(()) if socket.exists() => Ok(()),
            _ => Err(BackendError::NotReady {
                program: program.display().to_string(),
                what: socket.display().to_string(),
                waited: API_READY_TIMEOUT,
            }),
        },
        status = process.child.wait() => Err(BackendError::EarlyExit {
            program: program.display().to_string(),
            status: status.map(describe_status).unwrap_or_else(|e| e.to_string()),
            // Before its logger is configured Firecracker logs to stdout.
            log_tail: [file_tail(&dir.file(LOG_FILE), 5), console.tail_lines(5)]
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" | "),
        }),
    }
}

impl VmBackend for FirecrackerBackend {
    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        Box::pin(async move { self.launch_with_handle(spec).await.map(|(vm, _)| vm) })
    }

    /// No network device: a guest's only way out is the vsock gateway.
    fn isolates_network(&self, _kind: VmKind) -> bool {
        true
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "firecracker",
            accel: Some("kvm".into()),
            accel_reason: Some("Firecracker runs on KVM only".into()),
            confinement: None,
            cgroup_parents: Vec::new(),
        }
    }
}
