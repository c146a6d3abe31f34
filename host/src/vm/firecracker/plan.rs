//! The Firecracker API requests of each VM operation, as data: which
//! method, path and JSON body, in which order. Pure (no I/O), so the whole
//! contract is checked against Firecracker's own Swagger description in
//! tests, without a Firecracker. [`super::api`] sends these;
//! [`super::FirecrackerBackend`] and [`super::FirecrackerVm`] build them.
//!
//! Every path in a body is as Firecracker sees it: a host path, or a path
//! inside the jail when it runs under the jailer.

use serde::{Deserialize, Serialize};

/// Kernel parameters shared with the QEMU backend's (see
/// `qemu::BOOT_SPEEDUPS` for the measurements): skip the crypto
/// self-tests, the PS/2 aux and keyboard probes and the extra UARTs, trust
/// the CPU's RNG for early entropy, no soft lockup watchdog. CPU
/// vulnerability mitigations stay on: browser VMs run untrusted pages.
const BOOT_SPEEDUPS: &str =
    "cryptomgr.notests i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1 random.trust_cpu=on nowatchdog";

/// Firecracker's virtio devices are on MMIO, so the PCI probe is wasted
/// time; `reboot=k` makes a guest reboot (and `panic=-1`) end the VMM.
const FIRECRACKER_WORDS: &str = "reboot=k pci=off";

/// The guest's vsock CID: the same as under vhost-device-vsock.
pub const GUEST_CID: u32 = 3;

/// An HTTP method the plans use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Creates or replaces a resource.
    Put,
    /// Changes part of one.
    Patch,
}

impl Method {
    /// As on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Logger {
    /// An existing file or FIFO.
    pub log_path: String,
    /// `Error`, `Warning`, `Info`, ...
    pub level: &'static str,
    /// Prefix lines with their level.
    pub show_level: bool,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// An existing file or FIFO.
    pub metrics_path: String,
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineConfig {
    /// vCPUs (1-32).
    pub vcpu_count: u32,
    /// Memory (MiB).
    pub mem_size_mib: u32,
    /// No SMT: any vCPU count is then allowed, not only even ones.
    pub smt: bool,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootSource {
    /// The kernel (an uncompressed ELF on x86_64).
    pub kernel_image_path: String,
    /// The initrd: the agent as `/init`, or an image's stage 1.
    pub initrd_path: String,
    /// The kernel command line.
    pub boot_args: String,
}

/// `PUT /drives/{drive_id}` (a virtio-block drive).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drive {
    /// Its id, also in the path.
    pub drive_id: String,
    /// The backing file.
    pub path_on_host: String,
    /// Always false: the initrd assembles the root.
    pub is_root_device: bool,
    /// Image layers are shared by every VM, so read-only.
    pub is_read_only: bool,
    /// `Writeback` honours the guest's flushes (the home disk must survive
    /// the host crashing); `Unsafe` ignores them (read-only layers).
    pub cache_type: &'static str,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Vsock {
    /// The guest's CID.
    pub guest_cid: u32,
    /// Host-initiated connections; guest ones arrive at `<uds_path>_<port>`.
    pub uds_path: String,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Action {
    /// `InstanceStart` here.
    pub action_type: &'static str,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmState {
    /// `Paused` or `Resumed`.
    pub state: &'static str,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotCreate {
    /// `Full`: the memory file holds all of the guest's memory.
    pub snapshot_type: &'static str,
    /// The microVM state file.
    pub snapshot_path: String,
    /// The guest memory file.
    pub mem_file_path: String,
}

/// Where a snapshot load takes guest memory from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemBackend {
    /// `File` here (`Uffd` hands page faults to another process).
    pub backend_type: &'static str,
    /// The memory file.
    pub backend_path: String,
}

/// `PUT /snapshot/load`. The v1.15.1 API has no vsock override (only
/// `network_overrides`): the restored vsock device binds the `uds_path`
/// recorded in the snapshot, see [`super::Snapshot`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotLoad {
    /// The microVM state file.
    pub snapshot_path: String,
    /// The guest memory.
    pub mem_backend: MemBackend,
    /// Run the VM once loaded (else it stays paused).
    pub resume_vm: bool,
}

/// A request body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Body {
    /// `PUT /logger`.
    Logger(Logger),
    /// `PUT /metrics`.
    Metrics(Metrics),
    /// `PUT /machine-config`.
    MachineConfig(MachineConfig),
    /// `PUT /boot-source`.
    BootSource(BootSource),
    /// `PUT /drives/{id}`.
    Drive(Drive),
    /// `PUT /vsock`.
    Vsock(Vsock),
    /// `PUT /actions`.
    Action(Action),
    /// `PATCH /vm`.
    VmState(VmState),
    /// `PUT /snapshot/create`.
    SnapshotCreate(SnapshotCreate),
    /// `PUT /snapshot/load`.
    SnapshotLoad(SnapshotLoad),
}

/// One API request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// Its method.
    pub method: Method,
    /// Its path (`/drives/layer0`).
    pub path: String,
    /// Its JSON body.
    pub body: Body,
}

impl ApiRequest {
    fn put(path: impl Into<String>, body: Body) -> Self {
        Self {
            method: Method::Put,
            path: path.into(),
            body,
        }
    }

    fn patch(path: impl Into<String>, body: Body) -> Self {
        Self {
            method: Method::Patch,
            path: path.into(),
            body,
        }
    }
}

/// Where Firecracker writes its own log and metrics (files that exist).
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// Its log.
    pub log_path: String,
    /// Its metrics (a JSON line a minute).
    pub metrics_path: String,
}

/// A VM's boot inputs, paths as Firecracker sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct BootPlan {
    /// Log and metrics files.
    pub telemetry: Telemetry,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory (MiB).
    pub memory_mib: u32,
    /// The kernel.
    pub kernel: String,
    /// The initrd.
    pub initrd: String,
    /// The kernel command line ([`kernel_cmdline`]).
    pub boot_args: String,
    /// Read-only image layers, in the order stage 1 expects (vda, vdb...).
    pub layers: Vec<String>,
    /// The writable home disk, after the layers.
    pub home: Option<String>,
    /// The hybrid vsock socket.
    pub vsock_uds: String,
}

/// What a golden image's stage 1 needs on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageWords<'a> {
    /// Number of read-only layers (they are the first drives).
    pub layers: usize,
    /// The init of the assembled root.
    pub init: &'a str,
    /// Whether a home disk follows the layers.
    pub home: bool,
}

/// The kernel command line: the same words as QEMU's, so the guest boots
/// alike under both, then Firecracker's own, then the operator's.
pub fn kernel_cmdline(agent_port: u32, image: Option<&ImageWords<'_>>, extra: &str) -> String {
    let mut words = format!(
        "console=ttyS0 panic=-1 quiet {BOOT_SPEEDUPS} {FIRECRACKER_WORDS} airlock.port={agent_port}"
    );
    if let Some(image) = image {
        let names: Vec<String> = (0..image.layers).map(disk_name).collect();
        words.push_str(&format!(
            " airlock.layers={} airlock.init={}",
            names.join(","),
            image.init
        ));
        if image.home {
            words.push_str(&format!(" airlock.home={}", disk_name(image.layers)));
        }
    }
    format!("{words} {extra}").trim_end().to_string()
}

/// `vda`, `vdb`, ...: virtio-mmio disks are named in the order they are
/// attached, which is the order of the drive requests.
fn disk_name(index: usize) -> String {
    format!("vd{}", (b'a' + index as u8) as char)
}

/// Logger and metrics come first: they are the only resources allowed
/// before a snapshot load, and a failure of any later step is logged.
fn telemetry_requests(t: &Telemetry) -> [ApiRequest; 2] {
    [
        ApiRequest::put(
            "/logger",
            Body::Logger(Logger {
                log_path: t.log_path.clone(),
                level: "Warning",
                show_level: true,
            }),
        ),
        ApiRequest::put(
            "/metrics",
            Body::Metrics(Metrics {
                metrics_path: t.metrics_path.clone(),
            }),
        ),
    ]
}

fn drive(id: String, path: &str, read_only: bool) -> ApiRequest {
    ApiRequest::put(
        format!("/drives/{id}"),
        Body::Drive(Drive {
            drive_id: id,
            path_on_host: path.to_string(),
            is_root_device: false,
            is_read_only: read_only,
            cache_type: if read_only { "Unsafe" } else { "Writeback" },
        }),
    )
}

/// Boot: configure everything, then start the instance.
pub fn boot(p: &BootPlan) -> Vec<ApiRequest> {
    let mut plan: Vec<ApiRequest> = telemetry_requests(&p.telemetry).into();
    plan.push(ApiRequest::put(
        "/machine-config",
        Body::MachineConfig(MachineConfig {
            vcpu_count: p.vcpus,
            mem_size_mib: p.memory_mib,
            smt: false,
        }),
    ));
    plan.push(ApiRequest::put(
        "/boot-source",
        Body::BootSource(BootSource {
            kernel_image_path: p.kernel.clone(),
            initrd_path: p.initrd.clone(),
            boot_args: p.boot_args.clone(),
        }),
    ));
    for (i, layer) in p.layers.iter().enumerate() {
        plan.push(drive(format!("layer{i}"), layer, true));
    }
    if let Some(home) = &p.home {
        plan.push(drive("home".into(), home, false));
    }
    plan.push(ApiRequest::put(
        "/vsock",
        Body::Vsock(Vsock {
            guest_cid: GUEST_CID,
            uds_path: p.vsock_uds.clone(),
        }),
    ));
    plan.push(ApiRequest::put(
        "/actions",
        Body::Action(Action {
            action_type: "InstanceStart",
        }),
    ));
    plan
}

fn vm_state(state: &'static str) -> ApiRequest {
    ApiRequest::patch("/vm", Body::VmState(VmState { state }))
}

/// Pause a running VM.
pub fn pause() -> Vec<ApiRequest> {
    vec![vm_state("Paused")]
}

/// Resume a paused VM.
pub fn resume() -> Vec<ApiRequest> {
    vec![vm_state("Resumed")]
}

/// A snapshot's files, as Firecracker sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFiles {
    /// The microVM state.
    pub snapshot_path: String,
    /// The guest memory.
    pub mem_file_path: String,
}

/// Full snapshot of a running VM: pause (Firecracker snapshots only a
/// paused VM), then write state and memory. The VM stays paused.
pub fn snapshot_create(files: &SnapshotFiles) -> Vec<ApiRequest> {
    vec![
        vm_state("Paused"),
        ApiRequest::put(
            "/snapshot/create",
            Body::SnapshotCreate(SnapshotCreate {
                snapshot_type: "Full",
                snapshot_path: files.snapshot_path.clone(),
                mem_file_path: files.mem_file_path.clone(),
            }),
        ),
    ]
}

/// Restore on a fresh Firecracker process: logger and metrics, then the
/// load (nothing else may be configured before it).
pub fn snapshot_load(t: &Telemetry, files: &SnapshotFiles, resume_vm: bool) -> Vec<ApiRequest> {
    let mut plan: Vec<ApiRequest> = telemetry_requests(t).into();
    plan.push(ApiRequest::put(
        "/snapshot/load",
        Body::SnapshotLoad(SnapshotLoad {
            snapshot_path: files.snapshot_path.clone(),
            mem_backend: MemBackend {
                backend_type: "File",
                backend_path: files.mem_file_path.clone(),
            },
            resume_vm,
        }),
    ));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_cmdline_matches_qemus_words_and_names_the_image_disks() {
        let words = ImageWords {
            layers: 2,
            init: "/lib/systemd/systemd",
            home: true,
        };
        let line = kernel_cmdline(1024, Some(&words), "airlock.port=9 ");
        assert!(line.starts_with("console=ttyS0 panic=-1 quiet cryptomgr.notests"));
        assert!(
            line.contains(" reboot=k pci=off airlock.port=1024"),
            "{line}"
        );
        assert!(
            line.ends_with(
                "airlock.layers=vda,vdb airlock.init=/lib/systemd/systemd airlock.home=vdc airlock.port=9"
            ),
            "{line}"
        );
        assert!(!kernel_cmdline(1024, None, "").contains("airlock.layers"));
    }

    #[test]
    fn firecracker_snapshot_load_sends_the_memory_backend_not_mem_file_path() {
        let t = Telemetry {
            log_path: "/l".into(),
            metrics_path: "/m".into(),
        };
        let files = SnapshotFiles {
            snapshot_path: "/s".into(),
            mem_file_path: "/mem".into(),
        };
        let plan = snapshot_load(&t, &files, true);
        let body = serde_json::to_value(&plan[2].body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"snapshot_path": "/s", "resume_vm": true,
                "mem_backend": {"backend_type": "File", "backend_path": "/mem"}})
        );
    }
}
