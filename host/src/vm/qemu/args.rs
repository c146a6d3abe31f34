//! QEMU's command line for one VM, and the files it boots from: by path,
//! or (when QEMU runs as `qemu.run_as`, which may not reach airlockd's
//! image directories) as descriptors airlockd opened, named
//! `/proc/self/fd/<n>` on the command line. Built by [`super::QemuBackend`]
//! for each launch.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use super::super::accel::Accel;
use super::super::backend::{Boot, LaunchSpec};
use super::super::{ramfile, VmKind};
use super::{VHOST_CHARDEV, VSOCK_DEVICE, VSOCK_PORT};
use crate::config::{QemuConfig, VmConfig};

/// Kernel parameters that shorten boot by about 0.4 s under TCG (measured:
/// kernel uptime at /init 2.36 s -> 1.95 s) without weakening the guest:
/// skip the crypto self-tests and the PS/2 and extra UART probes, trust the
/// CPU's RNG for early entropy (QEMU backs RDRAND with the host's), no soft
/// lockup watchdog (a slow TCG vCPU trips it). CPU vulnerability
/// mitigations stay on: browser VMs run untrusted pages.
const BOOT_SPEEDUPS: &str =
    "cryptomgr.notests i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1 random.trust_cpu=on nowatchdog";

/// Browser VMs on a machine that can snapshot them keep their RAM in a
/// file ([`ramfile`]).
pub(super) fn file_backed_ram(q: &QemuConfig, spec: &LaunchSpec) -> bool {
    spec.kind == VmKind::Browser && hotplug_vsock(q)
}

/// Machines whose vsock device sits on its own PCIe root port, so it can
/// be unplugged before a save and plugged into a restored copy.
pub(super) fn hotplug_vsock(q: &QemuConfig) -> bool {
    q.machine
        .split(',')
        .next()
        .is_some_and(|m| m.contains("q35"))
}

/// How QEMU's command line names the files a VM boots from.
#[derive(Debug, Default)]
pub struct BootFiles {
    by_fd: bool,
    open: Vec<std::fs::File>,
    error: Option<(PathBuf, std::io::Error)>,
}

impl BootFiles {
    /// By their paths (QEMU runs as airlockd's user).
    pub fn by_path() -> Self {
        Self::default()
    }

    /// Opened here and passed to QEMU, named `/proc/self/fd/<n>`: QEMU,
    /// running as an account that cannot search airlockd's directories,
    /// reopens them through the descriptor (the file's own mode still
    /// applies, so read-only image files stay read-only).
    pub fn by_fd() -> Self {
        Self {
            by_fd: true,
            ..Self::default()
        }
    }

    fn name(&mut self, path: &Path, writable: bool) -> String {
        if !self.by_fd {
            return path.display().to_string();
        }
        match std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
        {
            Ok(f) => {
                let name = format!("/proc/self/fd/{}", f.as_raw_fd());
                self.open.push(f);
                name
            }
            Err(e) => {
                self.error.get_or_insert((path.to_path_buf(), e));
                path.display().to_string()
            }
        }
    }

    /// The descriptors QEMU must inherit; fails if a file could not be
    /// opened. They stay open until this is dropped (after the spawn).
    pub fn fds(&mut self) -> Result<Vec<RawFd>, (PathBuf, std::io::Error)> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        Ok(self.open.iter().map(AsRawFd::as_raw_fd).collect())
    }
}

/// QEMU's command line for one VM.
pub fn qemu_args(
    q: &QemuConfig,
    vm: &VmConfig,
    spec: &LaunchSpec,
    accel: Accel,
    files: &mut BootFiles,
) -> Vec<OsString> {
    let dir = &spec.dir;
    let mem = spec.memory_mib;
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-name", &format!("airlock-{}", spec.vm_id)]);
    push(&["-M", &format!("{},memory-backend=mem", q.machine)]);
    let accel_arg = match accel {
        // TCG's translation cache otherwise grows to 1 GiB of host memory.
        Accel::Tcg => format!("tcg,tb-size={}", q.tcg_tb_size_mib),
        Accel::Kvm => "kvm".into(),
    };
    push(&["-accel", &accel_arg, "-cpu", &q.cpu]);
    push(&["-m", &format!("{mem}M"), "-smp", &spec.vcpus.to_string()]);
    // vhost-user devices need guest memory the backend process can map;
    // a browser VM that may be snapshotted gets it as a file (`ramfile`).
    let backend = match file_backed_ram(q, spec) {
        true => format!(
            "memory-backend-file,id=mem,size={mem}M,share=on,mem-path={}",
            ramfile::path_for(&spec.vm_id).display()
        ),
        false => format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
    };
    push(&["-object", &backend]);
    if q.sandbox {
        // Saved states travel as descriptors airlockd passes over QMP
        // (`fd:` migration), so no VM needs to start a process.
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny,spawn=deny",
        ]);
    }
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
    ]);
    let restoring = matches!(spec.boot, Boot::Restore { .. });
    if hotplug_vsock(q) {
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", dir.qmp_socket().display()),
        ]);
        push(&[
            "-device",
            &format!("pcie-root-port,id={VSOCK_PORT},bus=pcie.0,chassis=1"),
        ]);
    }
    // A restored VM gets its vsock device once its state is loaded.
    if !restoring {
        let vhost = dir.vhost_socket();
        push(&[
            "-chardev",
            &format!("socket,id={VHOST_CHARDEV},path={}", vhost.display()),
        ]);
        let bus = match hotplug_vsock(q) {
            true => format!(",id={VSOCK_DEVICE},bus={VSOCK_PORT}"),
            false => String::new(),
        };
        push(&[
            "-device",
            &format!("vhost-user-vsock-pci,chardev={VHOST_CHARDEV}{bus}"),
        ]);
    } else {
        push(&["-S", "-incoming", "defer"]);
    }
    push(&[
        "-chardev",
        // reconnect: when airlockd restarts, QEMU dials the next one's
        // console socket (output meanwhile is dropped, not buffered).
        &format!(
            "socket,id=console,path={},reconnect=1",
            dir.console_socket().display()
        ),
    ]);
    push(&["-serial", "chardev:console"]);
    if let Some(fw) = &q.firmware {
        push(&["-bios", &fw.display().to_string()]);
    }
    let (kernel, initrd, boot_words) = boot_args(vm, &spec.boot, files, &mut args);
    args.extend(["-kernel".into(), kernel, "-initrd".into(), initrd]);
    let append = format!(
        "console=ttyS0 panic=-1 quiet {BOOT_SPEEDUPS} airlock.port={}{boot_words} {}",
        spec.agent_port, q.extra_append
    );
    args.push("-append".into());
    args.push(append.trim_end().into());
    args
}

/// Kernel, initrd, drives and kernel words of what the VM boots. A golden
/// image's layers are shared read-only by every VM (nothing is copied);
/// drives appear in order as vda, vdb, ... for stage 1.
fn boot_args(
    vm: &VmConfig,
    boot: &Boot,
    files: &mut BootFiles,
    args: &mut Vec<OsString>,
) -> (OsString, OsString, String) {
    let (image, init, home) = match boot {
        Boot::Initramfs => {
            return (
                files.name(&vm.kernel, false).into(),
                files.name(&vm.initramfs, false).into(),
                String::new(),
            )
        }
        Boot::Image { image, init, home } => (image, init, home.as_ref()),
        Boot::Restore { image, init, .. } => (image, init, None),
    };
    let mut names = Vec::new();
    for (i, layer) in image.layers.iter().enumerate() {
        args.push("-drive".into());
        args.push(
            format!(
                "file={},if=virtio,format=raw,readonly=on",
                drive_path(&files.name(layer, false))
            )
            .into(),
        );
        names.push(format!("vd{}", (b'a' + i as u8) as char));
    }
    let mut words = format!(" airlock.layers={} airlock.init={init}", names.join(","));
    if let Some(home) = home {
        args.push("-drive".into());
        args.push(
            format!(
                "file={},if=virtio,format=raw,discard=unmap",
                drive_path(&files.name(home, true))
            )
            .into(),
        );
        words.push_str(&format!(
            " airlock.home=vd{}",
            (b'a' + names.len() as u8) as char
        ));
    }
    (
        files.name(&image.kernel, false).into(),
        files.name(&image.initrd, false).into(),
        words,
    )
}

/// A path inside QEMU's `-drive` option, where a comma must be doubled.
fn drive_path(p: &str) -> String {
    p.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::layout::VmDir;

    #[test]
    fn boot_files_by_descriptor_are_named_in_proc_and_a_missing_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"kernel").unwrap();
        let mut files = BootFiles::by_fd();
        let name = files.name(&kernel, false);
        let fds = files.fds().unwrap();
        assert_eq!(name, format!("/proc/self/fd/{}", fds[0]));
        assert_eq!(std::fs::read(&name).unwrap(), b"kernel");
        let mut files = BootFiles::by_fd();
        files.name(&dir.path().join("missing"), false);
        let (path, _) = files.fds().unwrap_err();
        assert!(path.ends_with("missing"));
        assert_eq!(
            BootFiles::by_path().name(&kernel, true),
            kernel.display().to_string()
        );
    }

    #[test]
    fn command_line_has_vsock_console_and_port() {
        let run = tempfile::tempdir().unwrap();
        let spec = LaunchSpec {
            vm_id: "vm-x".into(),
            dir: VmDir::create(run.path(), "vm-x").unwrap(),
            memory_mib: 256,
            vcpus: 2,
            agent_port: 1024,
            boot: Boot::Initramfs,
            kind: crate::vm::VmKind::Cli,
            background: false,
        };
        let q = QemuConfig {
            extra_append: "airlock.port=9".into(),
            ..QemuConfig::default()
        };
        let args: Vec<String> = qemu_args(
            &q,
            &VmConfig::default(),
            &spec,
            Accel::Tcg,
            &mut BootFiles::by_path(),
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg,tb-size=256"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(joined.contains("vhost-user-vsock-pci"));
        assert!(joined.contains("-smp 2"));
        assert!(joined.contains("-initrd /var/lib/airlock/image/initramfs.cpio.gz"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        // extra_append comes last so that it overrides airlock's own words.
        assert!(
            append.ends_with("airlock.port=1024 airlock.port=9"),
            "{append}"
        );
    }

    #[test]
    fn a_golden_image_boots_its_layers_read_only_and_the_home_disk_writable() {
        let run = tempfile::tempdir().unwrap();
        let image = crate::image::GoldenImage {
            kind: "cli",
            dir: "/img".into(),
            sha256: "abc".into(),
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.cpio.gz".into(),
            layers: vec!["/img/base.squashfs".into(), "/img/air,lock.squashfs".into()],
        };
        let spec = LaunchSpec {
            vm_id: "vm-y".into(),
            dir: VmDir::create(run.path(), "vm-y").unwrap(),
            memory_mib: 512,
            vcpus: 1,
            agent_port: 1024,
            boot: Boot::Image {
                image,
                init: "/lib/systemd/systemd",
                home: Some("/homes/h.ext4".into()),
            },
            kind: crate::vm::VmKind::Cli,
            background: false,
        };
        let args: Vec<String> = qemu_args(
            &QemuConfig::default(),
            &VmConfig::default(),
            &spec,
            Accel::Kvm,
            &mut BootFiles::by_path(),
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("-kernel /img/vmlinuz -initrd /img/initrd.cpio.gz"),
            "{joined}"
        );
        assert!(joined.contains("-drive file=/img/base.squashfs,if=virtio,format=raw,readonly=on"));
        assert!(
            joined.contains("-drive file=/img/air,,lock.squashfs,if=virtio,format=raw,readonly=on")
        );
        assert!(joined.contains("-drive file=/homes/h.ext4,if=virtio,format=raw,discard=unmap"));
        assert!(joined.contains("-accel kvm -cpu"), "{joined}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.contains(
                "airlock.layers=vda,vdb airlock.init=/lib/systemd/systemd airlock.home=vdc"
            ),
            "{append}"
        );
    }
}
