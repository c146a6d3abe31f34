//! What confines the host processes of a QEMU VM beside QEMU's own
//! seccomp sandbox: the unprivileged account they run as (`qemu.run_as`)
//! and a cgroup per VM with its memory and CPU limits (`qemu.cgroups`).
//! The daemon builds one [`Confinement`] at start, refusing to start when
//! the setting cannot be honoured; the QEMU backend applies it to each
//! VM's processes and removes a VM's cgroup when the VM is gone.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::account::VmAccount;
use super::cgroup::{Cgroups, Limits, VmCgroup};
use crate::config::{CgroupMode, QemuConfig};

/// How a VM's host processes are confined.
#[derive(Debug, Default)]
pub struct Confinement {
    /// The account they run as (`None`: airlockd's own, when it is not
    /// root, or `qemu.run_as` is empty).
    pub account: Option<VmAccount>,
    /// Where their cgroups go (`None`: no per-VM limits).
    pub cgroups: Option<Cgroups>,
    /// Host memory a VM may use beyond its guest RAM (MiB).
    pub memory_overhead_mib: u64,
    /// CPU beyond one core per vCPU (percent of a core).
    pub cpu_overhead_percent: u32,
}

impl Confinement {
    /// From the settings; `run_dir` must be reachable by the account
    /// (sockets of each VM live under it).
    pub fn from_config(q: &QemuConfig, run_dir: &Path) -> Result<Self, String> {
        let account = match q.run_as.is_empty() {
            true => None,
            false => VmAccount::lookup(&q.run_as, "qemu.run_as")?,
        };
        if let Some(a) = &account {
            a.check_reachable(&run_dir.join("vms").join("x"))
                .map_err(|e| format!("paths.run_dir: {e}"))?;
        }
        let root = nix::unistd::geteuid().is_root();
        let cgroups = match (q.cgroups, root) {
            (CgroupMode::Off, _) => None,
            (CgroupMode::Auto, false) => {
                tracing::warn!("airlockd is not root: VMs get no cgroup of their own (no memory or CPU limits)");
                None
            }
            (CgroupMode::Auto, true) => match Cgroups::detect(run_dir) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "VMs get no cgroup of their own (no memory or CPU limits)");
                    None
                }
            },
            (CgroupMode::Required, _) => Some(Cgroups::detect(run_dir).map_err(|e| {
                format!("qemu.cgroups = \"required\": {e} (set it to \"auto\" to run without per-VM limits)")
            })?),
        };
        if account.is_none() && !q.run_as.is_empty() {
            tracing::warn!(run_as = %q.run_as, "airlockd is not root: QEMU runs as airlockd's own user");
        }
        let confinement = Self {
            account,
            cgroups,
            memory_overhead_mib: q.memory_overhead_mib,
            cpu_overhead_percent: q.cpu_overhead_percent,
        };
        tracing::info!(how = %confinement.describe(), "VM processes are confined");
        Ok(confinement)
    }

    /// Points `q`'s QEMU and vhost-device-vsock at binaries the account
    /// can run: `PATH` is searched as airlockd sees it, and a copy the
    /// account cannot reach (`~/.cargo/bin` of root) is passed over.
    pub fn resolve_binaries(&self, q: &mut QemuConfig) -> Result<(), String> {
        let Some(account) = &self.account else {
            return Ok(());
        };
        for (setting, program) in [
            ("qemu.binary", &mut q.binary),
            ("qemu.vhost_vsock_binary", &mut q.vhost_vsock_binary),
        ] {
            let path = std::env::var_os("PATH").unwrap_or_default();
            *program = resolve(account, program, &path).map_err(|e| format!("{setting}: {e}"))?;
        }
        Ok(())
    }

    /// For `/health`: the account and the cgroups.
    pub fn describe(&self) -> String {
        let account = self
            .account
            .as_ref()
            .map_or("airlockd's own account", VmAccount::name);
        match &self.cgroups {
            Some(c) => format!("as {account}, each VM in its own cgroup ({})", c.describe()),
            None => format!("as {account}, no per-VM cgroup"),
        }
    }

    /// The limits of a VM with `memory_mib` of RAM and `vcpus`, started
    /// in the `background` or not.
    pub fn limits(&self, memory_mib: u32, vcpus: u32, background: bool) -> Limits {
        Limits {
            memory_bytes: (u64::from(memory_mib) + self.memory_overhead_mib) << 20,
            cpu_percent: vcpus.saturating_mul(100) + self.cpu_overhead_percent,
            vcpus,
            background,
        }
    }

    /// Creates the cgroup of the VM `spec` launches (when cgroups are in
    /// use).
    pub fn cgroup_for(
        &self,
        spec: &super::backend::LaunchSpec,
    ) -> Result<Option<VmCgroup>, super::cgroup::CgroupError> {
        let limits = self.limits(spec.memory_mib, spec.vcpus, spec.background);
        self.cgroups
            .as_ref()
            .map(|c| c.create(&spec.vm_id, limits))
            .transpose()
    }

    /// Gives VM `vm_id` of `vcpus` the CPU weight of the foreground.
    pub fn foreground(&self, vm_id: &str, vcpus: u32) {
        if let Some(c) = &self.cgroups {
            if let Err(e) = c.set_background(vm_id, vcpus, false) {
                tracing::warn!(vm_id, error = %e, "cannot raise the CPU weight of a VM taken from the warm pool");
            }
        }
    }

    /// Kills what is left in VM `vm_id`'s cgroup and removes it; returns
    /// how many processes it killed.
    pub fn release(&self, vm_id: &str) -> usize {
        self.cgroups.as_ref().map_or(0, |c| c.remove(vm_id))
    }
}

/// `program` as an absolute path the account can reach, searched in
/// `path` (a `PATH` value) unless it names a directory.
fn resolve(account: &VmAccount, program: &Path, path: &OsStr) -> Result<PathBuf, String> {
    if program.components().count() > 1 {
        account.check_reachable(program)?;
        return Ok(program.to_path_buf());
    }
    let found: Vec<PathBuf> = std::env::split_paths(path)
        .map(|d| d.join(program))
        .filter(|p| p.is_file())
        .collect();
    let mut last = format!("{} is not in PATH", program.display());
    for candidate in found {
        match account.check_reachable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) => last = e,
        }
    }
    Err(format!(
        "{last} (install it where the account can run it, e.g. /usr/local/bin: scripts/setup.sh does)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_is_found_where_the_account_can_run_it() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let (closed, open) = (root.path().join("closed"), root.path().join("open"));
        for (dir, mode) in [(&closed, 0o700), (&open, 0o755)] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("vhost"), b"").unwrap();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let account = VmAccount::for_tests(54321);
        let both = std::env::join_paths([&closed, &open]).unwrap();
        assert_eq!(
            resolve(&account, Path::new("vhost"), &both).unwrap(),
            open.join("vhost")
        );
        let only_closed = std::env::join_paths([&closed]).unwrap();
        let err = resolve(&account, Path::new("vhost"), &only_closed).unwrap_err();
        assert!(
            err.contains("cannot search") && err.contains("/usr/local/bin"),
            "{err}"
        );
        let err = resolve(&account, Path::new("nothing"), &both).unwrap_err();
        assert!(err.contains("not in PATH"), "{err}");
    }

    #[test]
    fn limits_are_guest_ram_plus_overhead_and_a_core_per_vcpu() {
        let c = Confinement {
            memory_overhead_mib: 512,
            cpu_overhead_percent: 50,
            ..Confinement::default()
        };
        let l = c.limits(1024, 2, true);
        assert_eq!(l.memory_bytes, 1536 << 20);
        assert_eq!(l.cpu_percent, 250);
        assert!(l.background);
    }
}
