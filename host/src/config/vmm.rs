//! The VMM backends' settings (`[qemu]`, `[firecracker]` and its jailer)
//! and browser VM snapshots (`[snapshots]`): parts of airlockd's
//! configuration ([`super::Config`]), kept apart from the rest of it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Hardware acceleration choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Try KVM with a real boot; use TCG when it does not work.
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// QEMU backend settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// The vhost-user vsock device binary (one process per VM).
    pub vhost_vsock_binary: PathBuf,
    /// Machine type; q35 boots reliably under TCG (microvm lacks a timer
    /// to calibrate the TSC against and hangs about half the time).
    pub machine: String,
    /// Firmware (`-bios`); qboot starts faster than SeaBIOS. Empty: QEMU's
    /// default.
    pub firmware: Option<PathBuf>,
    /// `auto`, `kvm` or `tcg`.
    pub accel: AccelChoice,
    /// CPU model (`-cpu`).
    pub cpu: String,
    /// Words appended to the kernel command line (after airlock's own, so
    /// they win). Never put secrets here.
    pub extra_append: String,
    /// Deadline of the KVM probe boot (ms).
    pub accel_probe_timeout_ms: u64,
    /// TCG's translation cache per VM (MiB). QEMU's default grows to 1 GiB
    /// of host memory on top of the guest's RAM; a browser VM runs as fast
    /// with 256.
    pub tcg_tb_size_mib: u32,
    /// QEMU's seccomp sandbox (`-sandbox`): no obsolete system calls, no
    /// privilege changes, no scheduling or resource-limit changes, and no
    /// new processes.
    pub sandbox: bool,
    /// The unprivileged account QEMU and vhost-device-vsock run as when
    /// airlockd is root (`scripts/setup` creates it). Empty: as root, which
    /// a guest escaping QEMU would then be.
    pub run_as: String,
    /// A cgroup per VM with memory and CPU limits: `auto` (when airlockd
    /// is root and the hierarchy allows it, otherwise a warning), `required`
    /// (airlockd refuses to start without) or `off`.
    pub cgroups: CgroupMode,
    /// Host memory a VM may use beyond its guest RAM (MiB): QEMU itself,
    /// TCG's translation cache (`tcg_tb_size_mib`), vhost-device-vsock,
    /// and the host's page cache of its disk reads, which the kernel
    /// charges to it. A guest fills its RAM with its own page cache, so
    /// the margin is all the room left: with 512, browser VMs booting
    /// Chromium side by side ran into their limit and Chromium took
    /// 94-112 s to start instead of about 30. A VM over its limit is
    /// killed by the kernel, not the host.
    pub memory_overhead_mib: u64,
    /// CPU a VM may use beyond one core per vCPU (percent of a core), for
    /// QEMU's I/O and helper threads.
    pub cpu_overhead_percent: u32,
}

/// Whether VMs get cgroups of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// When possible.
    Auto,
    /// Always; airlockd refuses to start otherwise.
    Required,
    /// Never.
    Off,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            vhost_vsock_binary: "vhost-device-vsock".into(),
            machine: "q35".into(),
            firmware: Some("/usr/share/qemu/qboot.rom".into()),
            accel: AccelChoice::Auto,
            cpu: "max".into(),
            extra_append: String::new(),
            accel_probe_timeout_ms: 8_000,
            tcg_tb_size_mib: 256,
            sandbox: true,
            run_as: "airlock-vm".into(),
            cgroups: CgroupMode::Auto,
            memory_overhead_mib: 1024,
            cpu_overhead_percent: 50,
        }
    }
}

/// Firecracker backend settings. Nothing here is checked at load: a
/// missing binary or KVM device is refused when a VM launches, as with
/// QEMU, so a host without them can still run the other backends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// The Firecracker binary (v1.15; its API is what the backend speaks).
    pub binary: PathBuf,
    /// Kernel for every Firecracker VM instead of `vm.kernel` or an
    /// image's: on x86_64 Firecracker loads an uncompressed ELF `vmlinux`
    /// (with virtio-mmio built in), not the bzImage QEMU boots. It must be
    /// the same kernel build as the image's modules.
    pub kernel: Option<PathBuf>,
    /// Words appended to the kernel command line (after airlock's own, so
    /// they win). Never put secrets here.
    pub extra_append: String,
    /// Run Firecracker under its jailer (chroot, uid/gid, cgroups, netns).
    pub jailer: Option<JailerConfig>,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            binary: "firecracker".into(),
            kernel: None,
            extra_append: String::new(),
            jailer: None,
        }
    }
}

/// Firecracker's jailer. airlockd must run as root to use it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailerConfig {
    /// The jailer binary (the same release as `firecracker.binary`).
    #[serde(default = "default_jailer_binary")]
    pub binary: PathBuf,
    /// The account Firecracker runs as (not root).
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Where the jails are built (`<chroot_base>/firecracker/<vm id>/root`).
    /// Unset: `<run_dir>/vms/<id>/jail`, removed with the VM's directory.
    /// It must be on the filesystem of `paths.run_dir`: the agent's sockets
    /// are hard-linked into the jail.
    pub chroot_base: Option<PathBuf>,
    /// `1` or `2`: the cgroup hierarchy of `cgroups` (jailer default 1).
    pub cgroup_version: Option<u8>,
    /// `--cgroup` values, `<file>=<value>` (e.g. `cpu.max=50000 100000`).
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// A network namespace to join (`/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
}

fn default_jailer_binary() -> PathBuf {
    "jailer".into()
}

/// Browser VMs from snapshots: a browser VM is saved once Chromium shows a
/// blank page, and sessions get a copy restored from that state (under a
/// second here under TCG, against about a minute for a cold boot).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// Make and use snapshots (backends that can: QEMU on q35).
    pub enabled: bool,
    /// Where snapshots live; `<state_dir>/snapshots` when unset. Several
    /// airlockd may share one (each snapshot is named by what it was made
    /// from).
    pub dir: Option<PathBuf>,
    /// Browser VMs kept restored ahead of demand (running, refreshed, no
    /// owner, nothing allowed out); 0 disables the pool.
    pub warm_pool: usize,
    /// Most memory the pool's VMs may take together (MiB of guest RAM);
    /// the pool holds fewer VMs than `warm_pool` rather than exceed it.
    pub pool_memory_mib: u64,
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            warm_pool: 1,
            pool_memory_mib: 4096,
        }
    }
}

impl SnapshotsConfig {
    /// The snapshot directory in force.
    pub fn dir_or(&self, state_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join("snapshots"))
    }
}
