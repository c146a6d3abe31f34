//! One cgroup per VM with its memory and CPU limits: the VM's processes
//! (QEMU and vhost-device-vsock) join it before they `exec`, so a guest
//! that makes QEMU balloon or spin is stopped by the kernel at the VM's
//! share, and the cgroup names every process of the VM (a VM left by an
//! earlier airlockd is killed through it, with nothing missed). The QEMU
//! backend creates and removes them; the daemon detects the hierarchy
//! once at start.
//!
//! cgroup v2 (the unified hierarchy): the unit's cgroup is delegated
//! (`Delegate=yes`) and systemd starts airlockd in its leaf `daemon`
//! (`DelegateSubgroup=daemon`, systemd 254 or later), because a cgroup
//! with controllers enabled for its children may hold no process; the VMs
//! go under `<unit>/vms/<id>`. cgroup v1:
//! `<mount>/<own>/airlock-vms-<digest of run_dir>/<id>` in the memory and
//! cpu hierarchies.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// Where cgroup filesystems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// CFS period the CPU quota is expressed in (µs).
const CPU_PERIOD_US: u64 = 100_000;
/// The children directory under airlockd's own cgroup (v1), followed by a
/// digest of the run directory: airlockds with different run directories
/// (tests start several) must not take each other's VMs for lost ones.
const V1_DIR: &str = "airlock-vms-";
const V2_VMS: &str = "vms";
const V2_DAEMON: &str = "daemon";

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file or directory could not be used.
    #[error("cgroup {}: {action}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The hierarchy lacks what per-VM limits need.
    #[error("no per-VM cgroups: {0}")]
    Unavailable(String),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The limits of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory of all its processes together (guest RAM and the VMM's own).
    pub memory_bytes: u64,
    /// CPU time per period, in percent of one core.
    pub cpu_percent: u32,
    /// vCPUs: its CPU weight against other VMs and host processes is
    /// that of as many threads, as it was outside a cgroup.
    pub vcpus: u32,
    /// Started in the background (a warm pool's refill): the weight of
    /// threads at nice 19, until [`Cgroups::set_background`] lifts it.
    pub background: bool,
}

/// The kernel's weights of a thread at nice 0 and at nice 19 (v1
/// `cpu.shares`); v2's `cpu.weight` is 100 at nice 0.
const WEIGHT_NICE_0: u64 = 1024;
const WEIGHT_NICE_19: u64 = 15;

/// A VM's CPU weight: per vCPU, at nice 0 or nice 19 (v1 `cpu.shares`).
fn shares(vcpus: u32, background: bool) -> u64 {
    let per = match background {
        true => WEIGHT_NICE_19,
        false => WEIGHT_NICE_0,
    };
    per * u64::from(vcpus.max(1))
}

/// The same weight on v2's scale (`cpu.weight`, 1..=10000).
fn v2_weight(vcpus: u32, background: bool) -> u64 {
    (shares(vcpus, background) * 100 / WEIGHT_NICE_0).clamp(1, 10_000)
}

#[derive(Debug, Clone)]
enum Layout {
    V2 { vms: PathBuf },
    V1 { memory: PathBuf, cpu: PathBuf },
}

/// The parent cgroups of this airlockd's VMs.
#[derive(Debug)]
pub struct Cgroups {
    layout: Layout,
}

/// A VM's cgroup, open for its processes to join.
#[derive(Debug)]
pub struct VmCgroup {
    procs: Vec<fs::File>,
}

impl VmCgroup {
    /// `cgroup.procs` of each hierarchy, for [`super::account::VmAccount::confine`].
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

impl Cgroups {
    /// Finds airlockd's own cgroup and prepares the VMs' parent in it,
    /// for the airlockd whose VMs live under `run_dir`.
    pub fn detect(run_dir: &Path) -> Result<Self, CgroupError> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(io("read", Path::new("/proc/self/cgroup")))?;
        Self::detect_in(Path::new(CGROUP_ROOT), &own, run_dir)
    }

    /// [`Cgroups::detect`] with the hierarchy mounted at `root` and
    /// `own` as `/proc/self/cgroup`.
    fn detect_in(root: &Path, own: &str, run_dir: &Path) -> Result<Self, CgroupError> {
        let layout = match root.join("cgroup.controllers").exists() {
            true => v2_layout(root, own)?,
            false => v1_layout(root, own, &instance_name(run_dir))?,
        };
        Ok(Self { layout })
    }

    /// A short description for logs and `/api/health`.
    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::V2 { vms } => format!("v2, under {}", vms.display()),
            Layout::V1 { memory, cpu } => {
                format!("v1, under {} and {}", memory.display(), cpu.display())
            }
        }
    }

    /// The directories VMs' cgroups are made in, one per hierarchy.
    pub fn parents(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V2 { vms } => vec![vms],
            Layout::V1 { memory, cpu } => vec![memory, cpu],
        }
    }

    fn dirs(&self, vm_id: &str) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { vms } => vec![vms.join(vm_id)],
            Layout::V1 { memory, cpu } => vec![memory.join(vm_id), cpu.join(vm_id)],
        }
    }

    /// Creates VM `vm_id`'s cgroup with `limits`.
    pub fn create(&self, vm_id: &str, limits: Limits) -> Result<VmCgroup, CgroupError> {
        let quota = u64::from(limits.cpu_percent) * CPU_PERIOD_US / 100;
        let memory = limits.memory_bytes.to_string();
        let settings: Vec<(PathBuf, &str, String)> = match &self.layout {
            Layout::V2 { vms } => {
                let d = vms.join(vm_id);
                vec![
                    (d.clone(), "memory.max", memory),
                    // No swap: a VM over its share is stopped, not slowed.
                    (d.clone(), "memory.swap.max", "0".into()),
                    (d.clone(), "cpu.max", format!("{quota} {CPU_PERIOD_US}")),
                    (
                        d,
                        "cpu.weight",
                        v2_weight(limits.vcpus, limits.background).to_string(),
                    ),
                ]
            }
            Layout::V1 { memory: m, cpu } => {
                let (m, c) = (m.join(vm_id), cpu.join(vm_id));
                vec![
                    (m, "memory.limit_in_bytes", memory),
                    (c.clone(), "cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    (c.clone(), "cpu.cfs_quota_us", quota.to_string()),
                    (
                        c,
                        "cpu.shares",
                        shares(limits.vcpus, limits.background).to_string(),
                    ),
                ]
            }
        };
        let mut procs = Vec::new();
        for dir in self.dirs(vm_id) {
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create", &dir)(e)),
            }
            let path = dir.join("cgroup.procs");
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io("open", &path))?;
            procs.push(f);
        }
        for (dir, file, value) in settings {
            let path = dir.join(file);
            // memory.swap.max is absent without swap accounting.
            if file == "memory.swap.max" && !path.exists() {
                continue;
            }
            write_value(&path, &value)?;
        }
        Ok(VmCgroup { procs })
    }

    /// Moves VM `vm_id` of `vcpus` to the foreground (`background`
    /// false) or back.
    pub fn set_background(
        &self,
        vm_id: &str,
        vcpus: u32,
        background: bool,
    ) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2 { vms } => write_value(
                &vms.join(vm_id).join("cpu.weight"),
                &v2_weight(vcpus, background).to_string(),
            ),
            Layout::V1 { cpu, .. } => write_value(
                &cpu.join(vm_id).join("cpu.shares"),
                &shares(vcpus, background).to_string(),
            ),
        }
    }

    /// The pids in VM `vm_id`'s cgroup (none when it has none).
    pub fn pids(&self, vm_id: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs(vm_id)
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills whatever still runs in VM `vm_id`'s cgroup and removes it.
    /// Returns how many processes it killed.
    pub fn remove(&self, vm_id: &str) -> usize {
        let pids = self.pids(vm_id);
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // A killed process leaves its cgroup once it has died, a moment
        // after the signal; a VM's processes are normally reaped before
        // this is called, so this waits only for leftovers.
        let mut waits = 0;
        while !pids.is_empty() && !self.pids(vm_id).is_empty() && waits < 50 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            waits += 1;
        }
        for dir in self.dirs(vm_id) {
            // Still busy: the next start's sweep removes it.
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(vm_id, cgroup = %dir.display(), error = %e, "cannot remove a VM's cgroup yet")
                }
            }
        }
        pids.len()
    }

    /// VM ids that have a cgroup here.
    pub fn vm_ids(&self) -> Vec<String> {
        let parent = match &self.layout {
            Layout::V2 { vms } => vms,
            Layout::V1 { memory, .. } => memory,
        };
        let Ok(entries) = fs::read_dir(parent) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// The cgroup memory limit of VM `vm_id` (bytes), as the kernel has it.
    pub fn memory_limit(&self, vm_id: &str) -> Option<u64> {
        let (dir, file) = match &self.layout {
            Layout::V2 { vms } => (vms.join(vm_id), "memory.max"),
            Layout::V1 { memory, .. } => (memory.join(vm_id), "memory.limit_in_bytes"),
        };
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    }
}

impl Drop for Cgroups {
    /// An airlockd that leaves no VM behind leaves no parent either (a
    /// v1 parent is named after its run directory; tests make many).
    fn drop(&mut self) {
        if let Layout::V1 { memory, cpu } = &self.layout {
            let _ = fs::remove_dir(memory);
            let _ = fs::remove_dir(cpu);
        }
    }
}

fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io("write", path))
}

/// The path of airlockd's cgroup in the hierarchy whose `/proc/self/cgroup`
/// line matches `wanted` (the controller list, or "" for v2).
fn own_path(own: &str, wanted: impl Fn(&str) -> bool) -> Option<&str> {
    own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        wanted(controllers).then_some(path)
    })
}

/// The v1 parent's name for the airlockd of `run_dir`.
fn instance_name(run_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(run_dir.as_os_str().as_encoded_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{V1_DIR}{hex}")
}

fn v1_layout(root: &Path, own: &str, name: &str) -> Result<Layout, CgroupError> {
    let mut dirs = Vec::new();
    for (controller, mounts) in [
        ("memory", &["memory"][..]),
        ("cpu", &["cpu", "cpu,cpuacct"]),
    ] {
        let path = own_path(own, |c| c.split(',').any(|x| x == controller)).ok_or_else(|| {
            CgroupError::Unavailable(format!("no cgroup v1 {controller} controller"))
        })?;
        let mount = mounts
            .iter()
            .map(|m| root.join(m))
            .find(|m| m.join("cgroup.procs").exists())
            .ok_or_else(|| {
                CgroupError::Unavailable(format!("the {controller} hierarchy is not mounted"))
            })?;
        let dir = mount.join(path.trim_start_matches('/')).join(name);
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        dirs.push(dir);
    }
    let cpu = dirs.pop().unwrap_or_default();
    let memory = dirs.pop().unwrap_or_default();
    Ok(Layout::V1 { memory, cpu })
}

fn v2_layout(root: &Path, own: &str) -> Result<Layout, CgroupError> {
    let path = own_path(own, str::is_empty)
        .ok_or_else(|| CgroupError::Unavailable("not in the cgroup v2 hierarchy".into()))?;
    let leaf = root.join(path.trim_start_matches('/'));
    // Only a leaf systemd put airlockd in (DelegateSubgroup=daemon): had
    // airlockd moved itself, the service's own cgroup would have
    // controllers enabled for its children, and systemd could not place
    // the next airlockd there while VMs run (the restart would fail).
    let base = match (leaf.file_name(), leaf.parent()) {
        (Some(n), Some(base)) if n == V2_DAEMON => base.to_path_buf(),
        _ => {
            return Err(CgroupError::Unavailable(format!(
                "airlockd runs in {}, not in a delegated leaf named {V2_DAEMON:?} (systemd: Delegate=yes and DelegateSubgroup={V2_DAEMON}, systemd 254 or later)",
                leaf.display()
            )))
        }
    };
    let controllers = fs::read_to_string(base.join("cgroup.controllers"))
        .map_err(io("read", &base.join("cgroup.controllers")))?;
    for needed in ["memory", "cpu"] {
        if !controllers.split_whitespace().any(|c| c == needed) {
            return Err(CgroupError::Unavailable(format!(
                "the {needed} controller is not delegated to {} (systemd: Delegate=yes)",
                base.display()
            )));
        }
    }
    write_value(&base.join("cgroup.subtree_control"), "+memory +cpu")?;
    let vms = base.join(V2_VMS);
    fs::create_dir_all(&vms).map_err(io("create", &vms))?;
    write_value(&vms.join("cgroup.subtree_control"), "+memory +cpu")?;
    Ok(Layout::V2 { vms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_weighs_as_its_vcpus_would_as_threads() {
        assert_eq!(shares(2, false), 2048);
        assert_eq!(shares(2, true), 30);
        assert_eq!(v2_weight(1, false), 100);
        assert_eq!(v2_weight(2, true), 2);
        assert_eq!(v2_weight(1, true), 1);
    }

    /// A cgroup v2 tree as systemd leaves it for a unit with `Delegate=`
    /// (files only: the kernel's checks are not modelled).
    fn fake_v2(controllers: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/airlockd.service");
        fs::create_dir_all(unit.join("daemon")).unwrap();
        fs::write(root.path().join("cgroup.controllers"), "memory cpu io").unwrap();
        fs::write(unit.join("cgroup.controllers"), controllers).unwrap();
        fs::write(unit.join("cgroup.subtree_control"), "").unwrap();
        fs::create_dir_all(unit.join("vms")).unwrap();
        fs::write(unit.join("vms/cgroup.subtree_control"), "").unwrap();
        root
    }

    #[test]
    fn v2_needs_the_daemon_leaf_and_delegated_controllers() {
        let root = fake_v2("memory cpu");
        let run = Path::new("/run/airlock");
        let outside = "0::/system.slice/airlockd.service\n";
        let err = Cgroups::detect_in(root.path(), outside, run).unwrap_err();
        assert!(err.to_string().contains("DelegateSubgroup=daemon"), "{err}");
        let root = fake_v2("io");
        let leaf = "0::/system.slice/airlockd.service/daemon\n";
        let err = Cgroups::detect_in(root.path(), leaf, run).unwrap_err();
        assert!(
            err.to_string()
                .contains("memory controller is not delegated"),
            "{err}"
        );
    }

    #[test]
    fn v2_vms_go_under_the_unit_with_their_limits() {
        let root = fake_v2("memory cpu");
        let leaf = "0::/system.slice/airlockd.service/daemon\n";
        let c = Cgroups::detect_in(root.path(), leaf, Path::new("/run/airlock")).unwrap();
        let unit = root.path().join("system.slice/airlockd.service");
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        assert_eq!(read(&unit.join("cgroup.subtree_control")), "+memory +cpu");
        assert_eq!(
            read(&unit.join("vms/cgroup.subtree_control")),
            "+memory +cpu"
        );
        let vm = unit.join("vms/vm-1");
        // The kernel makes a new cgroup's files; the fake needs them.
        fs::create_dir_all(&vm).unwrap();
        for f in ["cgroup.procs", "memory.max", "cpu.max", "cpu.weight"] {
            fs::write(vm.join(f), "").unwrap();
        }
        let limits = Limits {
            memory_bytes: 768 << 20,
            cpu_percent: 150,
            vcpus: 1,
            background: true,
        };
        let cg = c.create("vm-1", limits).unwrap();
        assert_eq!(cg.procs_fds().len(), 1);
        assert_eq!(read(&vm.join("memory.max")), (768u64 << 20).to_string());
        assert_eq!(read(&vm.join("cpu.max")), "150000 100000");
        assert_eq!(read(&vm.join("cpu.weight")), "1");
        c.set_background("vm-1", 1, false).unwrap();
        assert_eq!(read(&vm.join("cpu.weight")), "100");
        assert_eq!(c.vm_ids(), vec!["vm-1".to_string()]);
        assert_eq!(c.memory_limit("vm-1"), Some(768 << 20));
    }

    #[test]
    fn v1_parents_are_per_run_dir() {
        assert_ne!(
            instance_name(Path::new("/run/airlock")),
            instance_name(Path::new("/tmp/al1/run"))
        );
        assert!(instance_name(Path::new("/run/airlock")).starts_with("airlock-vms-"));
    }

    #[test]
    fn own_cgroup_paths_are_read_per_hierarchy() {
        let own =
            "12:memory:/system.slice/a.service\n4:cpu,cpuacct:/x\n0::/system.slice/a.service\n";
        let v1 = |c: &str| own_path(own, |l| l.split(',').any(|x| x == c));
        assert_eq!(v1("memory"), Some("/system.slice/a.service"));
        assert_eq!(v1("cpu"), Some("/x"));
        assert_eq!(
            own_path(own, str::is_empty),
            Some("/system.slice/a.service")
        );
        assert_eq!(own_path("1:name=systemd:/\n", str::is_empty), None);
    }
}
