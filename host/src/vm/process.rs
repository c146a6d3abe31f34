//! The process backend: the agent runs as a plain host process and dials
//! the same `<dir>/vsock.sock_<port>` listener over a Unix socket, with the
//! same protocol. No isolation: for tests of host logic and for roles that
//! later issues run on the host in development. Its stdout and stderr are
//! the VM's "console".

use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::Command;

use super::backend::{
    BackendError, BackendInfo, BoxFuture, LaunchSpec, RunningVm, VmBackend, VmProcess,
};
use super::console::Console;

/// Runs the agent binary as a child process.
#[derive(Debug)]
pub struct ProcessBackend {
    agent_binary: PathBuf,
    console_max_bytes: u64,
}

impl ProcessBackend {
    /// A backend that runs `agent_binary`.
    pub fn new(agent_binary: PathBuf, console_max_bytes: u64) -> Self {
        Self {
            agent_binary,
            console_max_bytes,
        }
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
        let mut child = Command::new(&self.agent_binary)
            .args(["--mode", "process", "--log-level", "debug", "--unix"])
            .arg(dir.agent_listener(spec.agent_port))
            .current_dir(dir.root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BackendError::Spawn {
                program: self.agent_binary.display().to_string(),
                source,
            })?;
        let mut vm = RunningVm::new(console.clone(), None);
        {
            let (tracker, cancel) = vm.io();
            if let Some(out) = child.stdout.take() {
                let (c, k) = (console.clone(), cancel.clone());
                tracker.spawn(async move { c.pump(out, &k).await });
            }
            if let Some(err) = child.stderr.take() {
                let c = console.clone();
                tracker.spawn(async move { c.pump(err, &cancel).await });
            }
        }
        let pid = child.id().unwrap_or_default();
        vm.processes.push(VmProcess {
            name: "agent",
            child,
        });
        dir.record_pids(&[("agent", pid)])?;
        Ok(vm)
    }
}

impl VmBackend for ProcessBackend {
    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<RunningVm, BackendError>> {
        Box::pin(self.launch_inner(spec))
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "process",
            accel: None,
            accel_reason: None,
        }
    }
}
