//! The process backend: the agent runs as a plain host process and dials
//! the same `<dir>/vmm/vsock.sock_<port>` listener over a Unix socket, with the
//! same protocol. No isolation from the host's network: for tests of host
//! logic, and for fast tests of the browser role (only with
//! `vm.unsafe_host_browser`). A browser "VM" then gets an empty
//! environment and, when airlockd runs as root, an unprivileged account
//! (`vm.unsafe_host_browser_user`), so neither Chromium nor a login CLI can
//! read airlockd's keys, database or secrets. With
//! `vm.unsafe_host_browser_isolated` the agent is started as root and
//! isolates itself before it drops to that account (`--isolate-as`, see
//! the agent's `sandbox` module): its own network namespace with only
//! loopback, so Chromium and a login CLI get out only through the egress
//! gateway as in a browser VM, and its own mounts, optionally with an
//! image's `/usr/local` (`vm.unsafe_host_browser_usr_local`). Its stdout
//! and stderr are the VM's "console": a FIFO in the VM's directory, which
//! airlockd holds open for reading and writing, so the agent never sees it
//! close and a later airlockd that takes the VM over reads it again.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::account::VmAccount;
use super::VmKind;

use super::backend::{
    BackendError, BackendInfo, BoxFuture, LaunchSpec, RunningVm, VmBackend, VmProcess,
};
use super::console::Console;

/// How a host-process browser is confined beyond its account.
#[derive(Debug, Clone, Default)]
pub struct HostBrowserIsolation {
    /// Own network and mount namespaces.
    pub isolated: bool,
    /// Mounted read-only over /usr/local in them.
    pub usr_local: Option<PathBuf>,
}

/// Runs the agent binary as a child process.
#[derive(Debug)]
pub struct ProcessBackend {
    agent_binary: PathBuf,
    console_max_bytes: u64,
    /// For browser VMs: run as this account (when set).
    browser_user: Option<VmAccount>,
    /// For browser VMs: namespaces (only with `browser_user`).
    isolation: HostBrowserIsolation,
}

impl ProcessBackend {
    /// A backend that runs `agent_binary`; browser VMs run as
    /// `browser_user` when given, in their own namespaces when `isolation`
    /// says so (which needs `browser_user`: airlockd is root).
    pub fn new(
        agent_binary: PathBuf,
        console_max_bytes: u64,
        browser_user: Option<VmAccount>,
        isolation: HostBrowserIsolation,
    ) -> Self {
        Self {
            agent_binary,
            console_max_bytes,
            browser_user,
            isolation,
        }
    }

    /// A browser VM's agent: nothing of airlockd's environment, and its
    /// own account, which is given the VM's directory and agent socket.
    fn confine(&self, spec: &LaunchSpec, cmd: &mut Command) -> Result<(), BackendError> {
        if spec.kind != VmKind::Browser {
            return Ok(());
        }
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8");
        let Some(user) = &self.browser_user else {
            return Ok(());
        };
        give_to(user, spec)?;
        if !self.isolation.isolated {
            cmd.uid(user.uid().as_raw()).gid(user.gid().as_raw());
            return Ok(());
        }
        // The agent needs root for the namespaces and drops to the
        // account itself before it talks to anyone.
        cmd.arg("--isolate-as")
            .arg(format!("{}:{}", user.uid(), user.gid()));
        if let Some(tree) = &self.isolation.usr_local {
            cmd.arg("--usr-local").arg(tree);
        }
        Ok(())
    }

    async fn launch_inner(&self, spec: &LaunchSpec) -> Result<RunningVm, BackendError> {
        if !self.agent_binary.is_file() {
            return Err(BackendError::Missing {
                what: "agent binary",
                path: self.agent_binary.display().to_string(),
                hint: "build it with `make build` or fix vm.agent_binary",
            });
        }
        let dir = &spec.dir;
        let console = Console::create(&dir.file("console.log"), self.console_max_bytes).map_err(
            |source| BackendError::Io {
                context: "create console.log".into(),
                source,
            },
        )?;
        let fifo = dir.file(CONSOLE_FIFO);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(
            |e| BackendError::Io {
                context: format!("create {}", fifo.display()),
                source: e.into(),
            },
        )?;
        // The reading end first: opening the writing end would block
        // until one exists.
        let reader = open_fifo(&fifo)?;
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .map_err(|source| BackendError::Io {
                context: format!("open {}", fifo.display()),
                source,
            })?;
        let writer2 = writer.try_clone().map_err(|source| BackendError::Io {
            context: format!("open {}", fifo.display()),
            source,
        })?;
        let mut cmd = Command::new(&self.agent_binary);
        // Its own process group: it outlives airlockd (see `super::adopt`).
        cmd.args(["--mode", "process", "--log-level", "debug", "--unix"])
            .arg(dir.agent_listener(spec.agent_port))
            .current_dir(dir.root())
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2)
            .process_group(0)
            .kill_on_drop(true);
        self.confine(spec, &mut cmd)?;
        // Its runtime files (Chromium's profile, login homes) go where
        // this backend can remove them should the agent be killed before
        // it does (as a host process nothing else would).
        let state = agent_state_dir(&spec.vm_id);
        cmd.env(airlock_proto::AGENT_STATE_DIR_ENV, &state);
        let child = cmd.spawn().map_err(|source| BackendError::Spawn {
            program: self.agent_binary.display().to_string(),
            source,
        })?;
        let mut vm = RunningVm::new(console.clone(), None);
        pump(&vm, &console, reader);
        vm.leftovers.push(state);
        let pid = child.id().unwrap_or_default();
        vm.processes.push(VmProcess {
            name: "agent",
            child,
        });
        dir.record_pids(&[("agent", pid)])?;
        Ok(vm)
    }
}

/// Gives a browser VM's directory to the account the agent runs as (the
/// sockets it dials there are bound for that account:
/// [`VmBackend::socket_owner`]).
fn give_to(user: &VmAccount, spec: &LaunchSpec) -> Result<(), BackendError> {
    for path in [spec.dir.root().to_path_buf(), spec.dir.vmm_dir()] {
        user.give(&path).map_err(|source| BackendError::Io {
            context: format!("give {} to the host-browser account", path.display()),
            source,
        })?;
    }
    Ok(())
}

/// The agent's stdout and stderr, in the VM's directory.
const CONSOLE_FIFO: &str = "console.fifo";

/// Opens the console FIFO for reading and writing: never blocks, and never
/// reads an end while airlockd holds it.
fn open_fifo(path: &Path) -> Result<tokio::net::unix::pipe::Receiver, BackendError> {
    tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(|source| BackendError::Io {
            context: format!("open {}", path.display()),
            source,
        })
}

/// Pumps the console FIFO into `console` until the VM stops.
fn pump(vm: &RunningVm, console: &Console, reader: tokio::net::unix::pipe::Receiver) {
    let (tracker, cancel) = vm.io();
    let c = console.clone();
    tracker.spawn(async move { c.pump(reader, &cancel).await });
}

impl ProcessBackend {
    async fn adopt_inner(
        &self,
        spec: &LaunchSpec,
        procs: Vec<super::adopt::Adopted>,
    ) -> Result<RunningVm, BackendError> {
        let dir = &spec.dir;
        let console = Console::append(&dir.file("console.log"), self.console_max_bytes).map_err(
            |source| BackendError::Io {
                context: "open console.log".into(),
                source,
            },
        )?;
        if let (VmKind::Browser, Some(user)) = (spec.kind, &self.browser_user) {
            give_to(user, spec)?;
        }
        let reader = open_fifo(&dir.file(CONSOLE_FIFO))?;
        let mut vm = RunningVm::new(console.clone(), None);
        pump(&vm, &console, reader);
        vm.adopted = procs;
        vm.leftovers.push(agent_state_dir(&spec.vm_id));
        Ok(vm)
    }
}

/// A host-process agent's state directory: tmpfs (`/dev/shm`) when there
/// is one, named after the VM.
fn agent_state_dir(vm_id: &str) -> PathBuf {
    let base = match Path::new("/dev/shm").is_dir() {
        true => PathBuf::from("/dev/shm"),
        false => std::env::temp_dir(),
    };
    base.join(format!("airlock-agent-{vm_id}"))
}

impl VmBackend for ProcessBackend {
    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        Box::pin(self.launch_inner(spec))
    }

    fn isolates_network(&self, kind: VmKind) -> bool {
        kind == VmKind::Browser && self.isolation.isolated && self.browser_user.is_some()
    }

    fn socket_owner(&self, kind: VmKind) -> Option<&VmAccount> {
        match kind {
            VmKind::Browser => self.browser_user.as_ref(),
            VmKind::Cli => None,
        }
    }

    fn adopt<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        procs: Vec<super::adopt::Adopted>,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        Box::pin(self.adopt_inner(spec, procs))
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "process",
            accel: None,
            accel_reason: None,
            confinement: None,
            cgroup_parents: Vec::new(),
        }
    }
}
