//! The life of one VM, run as one task per VM by [`super::VmManager`]:
//! bind the agent socket, launch, wait for the hello (or the VMM's exit, or
//! the boot deadline, whichever comes first), serve until stopped or
//! broken, then tear everything down. A failed VM's logs are kept and its
//! error carries the console's last lines.

use std::future::pending;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use airlock_proto::restore::{RefreshSpec, REFRESH_SEED_BYTES};
use airlock_proto::{GuestConfig, Operation, Reply, SecretBytes};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backend::{BackendError, Boot, LaunchSpec, RunningVm};
use super::clock;
use super::layout::{prune_failed, VmDir};
use super::restore::Origin;
use super::{Inner, Launch, VmHandle, VmKind, VmState, VmView};
use crate::agent::guestlog::GuestLog;
use crate::agent::handshake::{Accepted, HandshakeConfig};
use crate::agent::listener::{spawn_acceptor, AgentEvent};
use crate::agent::{AgentClient, ClientOptions};
use crate::egress::gateway::Gateway;

/// How a VM's life ended.
#[derive(Debug)]
enum Outcome {
    /// Stopped on request (DELETE or daemon shutdown; see
    /// [`Supervisor::detaches`] for VMs left running at shutdown).
    Stopped,
    /// Broken; the reason goes into the VM's error.
    Failed(String),
}

/// Grace for helper processes (vhost-device-vsock) after SIGTERM.
const HELPER_GRACE: Duration = Duration::from_millis(500);
/// How long a restored VM's refresh may take (the network service's
/// restart is most of it; the guest waits up to 30 s for that).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(45);

/// Runs one VM from launch to teardown.
pub(super) struct Supervisor {
    inner: Arc<Inner>,
    handle: Arc<VmHandle>,
    boot: Boot,
    origin: Origin,
    requested: Instant,
    id: String,
    /// The processes of a VM an earlier airlockd started, taken over
    /// instead of launching (taken when the supervisor starts it).
    takeover: std::sync::Mutex<Option<Vec<super::adopt::Adopted>>>,
    /// Taking a running VM over (no launch, no refresh, no boot timings).
    adopting: bool,
    /// What it booted, for the handshake's refusals.
    image: String,
    /// The vsock port its agent dials: the configured one, or for a VM
    /// taken over the one it was started with.
    agent_port: u32,
    /// The acceptor and agent connection tasks of this VM.
    tasks: TaskTracker,
    cancel: CancellationToken,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Supervisor {
    pub(super) fn new(
        inner: Arc<Inner>,
        handle: Arc<VmHandle>,
        launch: Launch,
        requested: Instant,
    ) -> Self {
        let id = handle.view.borrow().id.clone();
        let image = match &launch.takeover {
            Some(t) => t.image.clone(),
            None => launch.boot.describe(&inner.config.vm.initramfs),
        };
        let adopting = launch.takeover.is_some();
        let agent_port = match &launch.takeover {
            Some(t) => t.agent_port,
            None => inner.config.vm.agent_port,
        };
        Self {
            inner,
            handle,
            boot: launch.boot,
            origin: launch.origin,
            requested,
            id,
            takeover: std::sync::Mutex::new(launch.takeover.map(|t| t.procs)),
            adopting,
            image,
            agent_port,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut VmView)) {
        self.handle.view.send_modify(f);
        let _ = self.inner.states.send(self.handle.view.borrow().clone());
    }

    pub(super) async fn run(self) {
        let dir = match VmDir::create(&self.inner.config.paths.run_dir, &self.id) {
            Ok(dir) => dir,
            Err(e) => {
                self.update(|v| {
                    v.state = VmState::Failed;
                    v.error = Some(format!("cannot create the VM directory: {e}"));
                });
                self.handle.finished.cancel();
                return;
            }
        };
        let (outcome, vm) = self.boot_and_serve(&dir).await;
        self.teardown(outcome, vm, &dir).await;
        self.handle.finished.cancel();
        self.forget_if_failed().await;
    }

    /// A failed VM stays listed with its error for a while (whoever
    /// started it may still ask why), then is forgotten unless someone
    /// deleted it first; its logs stay under `failed-vms/`.
    async fn forget_if_failed(&self) {
        if self.handle.view.borrow().state != VmState::Failed {
            return;
        }
        let keep = Duration::from_millis(self.inner.config.vm.failed_vm_keep_ms);
        tokio::select! {
            _ = tokio::time::sleep(keep) => {}
            _ = self.inner.shutdown.cancelled() => return,
        }
        let mut vms = self
            .inner
            .vms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if vms
            .get(&self.id)
            .is_some_and(|h| Arc::ptr_eq(h, &self.handle))
        {
            vms.remove(&self.id);
            tracing::info!(vm_id = %self.id, "failed VM forgotten");
        }
    }

    fn handshake_config(&self) -> HandshakeConfig {
        let vm = &self.inner.config.vm;
        HandshakeConfig {
            vm_id: self.id.clone(),
            expected: self.inner.expected.clone(),
            image: self.image.clone(),
            max_frame: vm.max_frame_bytes,
            hello_timeout: Duration::from_millis(vm.hello_timeout_ms),
            ready_timeout: Duration::from_millis(vm.ready_timeout_ms),
            // Four missed heartbeats: generous for a vCPU starved under TCG.
            client: ClientOptions {
                silence_limit: (vm.heartbeat_interval_ms > 0)
                    .then(|| Duration::from_millis(vm.heartbeat_interval_ms * 4)),
                events: self.handle.events.clone(),
            },
            guest: GuestConfig {
                heartbeat_interval_ms: vm.heartbeat_interval_ms,
                log_level: vm.guest_log_level.clone(),
                hostname: Some(self.id.clone()),
                egress_port: self
                    .handle
                    .egress
                    .as_ref()
                    .map(|_| egress_port(self.agent_port)),
            },
        }
    }

    async fn boot_and_serve(&self, dir: &VmDir) -> (Outcome, Option<RunningVm>) {
        let cfg = &self.inner.config.vm;
        let log = match GuestLog::open(
            &dir.file("agent.log"),
            &self.id,
            cfg.agent_log_max_bytes,
            cfg.guest_log_rate_per_sec,
            self.adopting,
        ) {
            Ok(log) => Arc::new(log),
            Err(e) => {
                return (
                    Outcome::Failed(format!("cannot create agent.log: {e}")),
                    None,
                )
            }
        };
        // Listen before the VM starts: the agent dials as soon as it runs.
        let listener = match self.bind(&dir.agent_listener(self.agent_port)) {
            Ok(l) => l,
            Err(e) => {
                return (
                    Outcome::Failed(format!("cannot listen for the agent: {e}")),
                    None,
                )
            }
        };
        if let Err(e) = self.start_gateway(dir) {
            return (Outcome::Failed(e), None);
        }
        let (tx, mut events) = mpsc::channel(4);
        spawn_acceptor(
            listener,
            Arc::new(self.handshake_config()),
            log.clone(),
            tx,
            &self.tasks,
            self.cancel.clone(),
        );
        let boot = match self.with_home(self.boot.clone()).await {
            Ok(boot) => boot,
            Err(e) => return (Outcome::Failed(e), None),
        };
        let spec = LaunchSpec {
            vm_id: self.id.clone(),
            dir: dir.clone(),
            memory_mib: self.handle.view.borrow().memory_mib,
            vcpus: self.handle.view.borrow().vcpus,
            agent_port: self.agent_port,
            boot,
            kind: self.handle.view.borrow().kind,
            background: self.handle.view.borrow().pooled,
        };
        let mut vm = tokio::select! {
            r = self.start(&spec) => match r {
                Ok(vm) => vm,
                Err(e) => {
                    let why = format!("cannot start the VM: {e}");
                    self.restore_ended(Err(&why));
                    return (Outcome::Failed(why), None);
                }
            },
            _ = self.handle.stop.cancelled() => return (Outcome::Stopped, None),
        };
        let vmm_started = Instant::now();
        self.update(|v| {
            v.vmm_pid = vm.vmm_pid();
            v.accel = vm.accel.clone().or(v.accel.take());
            v.timings.request_to_vmm_ms = Some(ms(vmm_started - self.requested));
        });
        self.write_record(&vm, dir);
        let outcome = match self.boot(&mut vm, &mut events, vmm_started).await {
            Ok(()) => {
                self.restore_ended(Ok(()));
                self.serve(&mut vm, &mut events, &log).await
            }
            Err(outcome) => {
                if let Outcome::Failed(why) = &outcome {
                    self.restore_ended(Err(why));
                }
                outcome
            }
        };
        (outcome, Some(vm))
    }

    /// Binds a socket the VM's side dials ([`super::account::bind_for`]
    /// the account that dials it).
    fn bind(&self, path: &std::path::Path) -> std::io::Result<UnixListener> {
        let kind = self.handle.view.borrow().kind;
        super::account::bind_for(self.inner.backend_for(kind).socket_owner(kind), path)
    }

    /// Records what a later airlockd needs to take this VM over.
    fn write_record(&self, vm: &RunningVm, dir: &VmDir) {
        let view = self.handle.view.borrow().clone();
        let processes = vm
            .pids()
            .into_iter()
            .filter_map(|(name, pid)| super::adopt::record_of(name, pid))
            .collect();
        let record = super::adopt::VmRecord {
            id: self.id.clone(),
            kind: view.kind,
            origin: view.origin,
            pooled: view.pooled,
            owner: view.owner,
            memory_mib: view.memory_mib,
            vcpus: view.vcpus,
            accel: view.accel,
            created_at: view.created_at,
            image: self.image.clone(),
            agent_port: self.agent_port,
            egress: self.handle.egress.as_ref().map(|(p, _)| (*p.get()).clone()),
            processes,
        };
        *self
            .handle
            .record
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(record);
        self.handle.save_record(dir);
    }

    /// Tells the snapshots' keeper how a VM restored from one started.
    fn restore_ended(&self, result: Result<(), &str>) {
        if let (Boot::Restore { state, .. }, Some(restorer)) =
            (&self.boot, self.inner.restorer.get())
        {
            restorer.restore_ended(state, result);
        }
    }

    /// Boots the VM, or restores it from its snapshot and lets it run.
    async fn start(&self, spec: &LaunchSpec) -> Result<RunningVm, BackendError> {
        let backend = self.inner.backend_for(spec.kind);
        let takeover = self
            .takeover
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(procs) = takeover {
            return backend.adopt(spec, procs).await;
        }
        let vm = match &spec.boot {
            Boot::Restore { .. } => {
                let t = Instant::now();
                let vm = backend.restore(spec).await?;
                self.update(|v| v.timings.restore_ms = Some(ms(t.elapsed())));
                vm
            }
            _ => return backend.launch(spec).await,
        };
        let t = Instant::now();
        backend.resume(&spec.dir).await?;
        self.update(|v| v.timings.resume_ms = Some(ms(t.elapsed())));
        Ok(vm)
    }

    /// Makes a restored VM its own before anyone uses it: fresh entropy
    /// from this host, its clock stepped to this host's, and Chromium's
    /// network service restarted (copies of one snapshot must not share
    /// random state).
    async fn refresh(&self, acc: &Accepted) -> Result<(), Outcome> {
        let mut seed = vec![0u8; REFRESH_SEED_BYTES];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| Outcome::Failed("cannot draw entropy for the restored VM".into()))?;
        let unix_time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(ms)
            .unwrap_or_default();
        let spec = RefreshSpec {
            seed: SecretBytes::new(seed),
            unix_time_ms,
        };
        let t = Instant::now();
        match acc
            .client
            .call(Operation::Refresh(spec), REFRESH_TIMEOUT)
            .await
        {
            Ok(Reply::Refreshed(r)) => {
                self.update(|v| {
                    v.timings.refresh_ms = Some(ms(t.elapsed()));
                    v.timings.clock_step_ms = Some(r.clock_step_ms);
                });
                self.sync_clock(&acc.client)
                    .await
                    .map_err(|e| Outcome::Failed(format!("the restored VM's clock: {e}")))
            }
            Ok(other) => Err(Outcome::Failed(format!(
                "the restored VM's agent answered its refresh with {other:?}"
            ))),
            Err(e) => Err(Outcome::Failed(format!(
                "the restored VM could not be made its own (entropy, clock): {e}"
            ))),
        }
    }

    /// Brings the guest's clock in line with the host's; see [`clock`].
    async fn sync_clock(&self, client: &AgentClient) -> Result<(), clock::ClockError> {
        let synced = clock::sync(client).await?;
        tracing::debug!(vm_id = %self.id, before_ms = synced.before.offset_ms,
            after_ms = synced.after.offset_ms, rtt_ms = synced.after.rtt_ms, "guest clock synchronised");
        self.update(|v| synced.record(&mut v.timings));
        Ok(())
    }

    /// Records that the guest ran out of memory (the VM goes on; whoever
    /// uses it decides, e.g. a session fails with this reason).
    fn out_of_memory(&self, victim: &str) {
        let mib = self.handle.view.borrow().memory_mib;
        tracing::warn!(vm_id = %self.id, victim, memory_mib = mib, "VM out of memory");
        self.update(|v| v.out_of_memory = Some(format!("its kernel killed {victim}")));
    }

    /// A browser VM's egress gateway listens before the VM starts, like
    /// the agent's socket.
    fn start_gateway(&self, dir: &VmDir) -> Result<(), String> {
        let Some((policy, stats)) = &self.handle.egress else {
            return Ok(());
        };
        let port = egress_port(self.agent_port);
        let listener = self
            .bind(&dir.agent_listener(port))
            .map_err(|e| format!("cannot listen for the VM's egress: {e}"))?;
        let gateway = Gateway {
            egress: self.inner.egress.clone(),
            policy: policy.clone(),
            stats: stats.clone(),
            vm_id: self.id.clone(),
        };
        gateway.spawn(listener, &self.tasks, self.cancel.clone());
        Ok(())
    }

    /// A CLI VM of a user, booting a golden image, gets that user's
    /// persistent home disk (created on first use).
    async fn with_home(&self, boot: Boot) -> Result<Boot, String> {
        let (kind, owner) = {
            let v = self.handle.view.borrow();
            (v.kind, v.owner.clone())
        };
        match (boot, kind, owner) {
            (Boot::Image { image, init, .. }, VmKind::Cli, Some(user)) => {
                let cfg = &self.inner.config;
                let disk = super::home::ensure(&cfg.paths.state_dir, &user, cfg.vm.home_disk_mib)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Boot::Image {
                    image,
                    init,
                    home: Some(disk),
                })
            }
            (boot, _, _) => Ok(boot),
        }
    }

    async fn boot(
        &self,
        vm: &mut RunningVm,
        events: &mut mpsc::Receiver<AgentEvent>,
        vmm_started: Instant,
    ) -> Result<(), Outcome> {
        let timeout = Duration::from_millis(self.inner.config.vm.boot_timeout_ms);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let since = match self.adopting {
            true => "airlockd took the running VM over",
            false => "the VM starting",
        };
        tokio::select! {
            ev = events.recv() => match ev {
                Some(AgentEvent::Connected(acc)) => {
                    if self.origin != Origin::Boot && !self.adopting {
                        self.refresh(&acc).await?;
                    }
                    self.ready(*acc, vm, vmm_started);
                    Ok(())
                }
                Some(AgentEvent::Refused(reason)) => Err(Outcome::Failed(reason)),
                None => Err(Outcome::Failed("the agent listener stopped".into())),
            },
            exit = vm.wait_exit() => Err(Outcome::Failed(format!("the VM stopped before its agent said hello: {exit}"))),
            _ = &mut deadline => Err(Outcome::Failed(format!(
                "the agent did not say hello within {timeout:?} of {since} (is it dialling port {}?)",
                self.agent_port
            ))),
            _ = self.handle.stop.cancelled() => Err(Outcome::Stopped),
        }
    }

    fn ready(&self, acc: Accepted, vm: &RunningVm, vmm_started: Instant) {
        let h = &acc.hello;
        let init_at = vm.console.init_at();
        self.handle.set_agent(Some(acc.client.clone()));
        self.update(|v| {
            v.state = VmState::Ready;
            v.agent_version = Some(h.agent_version.clone());
            v.agent_build_id = Some(h.build_id.clone());
            let t = &mut v.timings;
            // A restored VM's agent started in the template, long ago; a
            // VM taken over booted under an earlier airlockd.
            if self.origin == Origin::Boot && !self.adopting {
                t.vmm_to_init_ms = init_at.map(|i| ms(i.saturating_duration_since(vmm_started)));
                t.guest_uptime_at_init_ms = Some(h.uptime_at_start_ms);
                t.init_to_hello_ms = Some(h.uptime_at_hello_ms - h.uptime_at_start_ms);
            }
            t.hello_to_ready_ms = Some(ms(acc.ready_at - acc.hello_at));
            t.request_to_ready_ms = Some(ms(acc.ready_at - self.requested));
        });
        let t = self.handle.view.borrow().timings.clone();
        let origin = match self.origin {
            Origin::Boot => 0,
            Origin::Snapshot => 1,
            Origin::Pool => 2,
        };
        if self.adopting {
            tracing::info!(vm_id = %self.id, agent = %h.agent_version, took_ms = ?t.request_to_ready_ms, "VM taken over from an earlier airlockd");
            return;
        }
        crate::metrics::global().vm_ready[origin].observe(acc.ready_at - self.requested);
        tracing::info!(vm_id = %self.id, agent = %h.agent_version, request_to_ready_ms = ?t.request_to_ready_ms, "VM ready");
    }

    /// Serves until the VM breaks or is stopped. Connection losses and
    /// reconnections are guest-triggered, so they go to the rate-limited
    /// agent log rather than straight into airlockd's.
    async fn serve(
        &self,
        vm: &mut RunningVm,
        events: &mut mpsc::Receiver<AgentEvent>,
        log: &GuestLog,
    ) -> Outcome {
        let reconnect = Duration::from_millis(self.inner.config.vm.reconnect_timeout_ms);
        let mut lost: Option<Pin<Box<Sleep>>> = None;
        let mut oom = vm.console.oom();
        let mut oom_open = true;
        loop {
            let agent = self.handle.agent();
            tokio::select! {
                r = oom.changed(), if oom_open => {
                    oom_open = r.is_ok();
                    let victim = oom.borrow_and_update().clone();
                    if let Some(victim) = victim {
                        self.out_of_memory(&victim);
                    }
                }
                exit = vm.wait_exit() => return Outcome::Failed(format!("the VM stopped unexpectedly: {exit}")),
                _ = async { match &agent { Some(a) => a.closed().await, None => pending().await } } => {
                    self.handle.set_agent(None);
                    // A VM being saved lost its vsock device on purpose.
                    if self.handle.saving.load(std::sync::atomic::Ordering::Relaxed) {
                        continue;
                    }
                    lost = Some(Box::pin(tokio::time::sleep(reconnect)));
                    log.note("agent connection lost; waiting for the agent to dial again");
                }
                _ = async { match lost.as_mut() { Some(s) => s.await, None => pending().await } } => {
                    return Outcome::Failed(format!("the agent disconnected and did not reconnect within {reconnect:?}"));
                }
                ev = events.recv() => match ev {
                    Some(AgentEvent::Connected(acc)) => {
                        if let Some(old) = agent {
                            old.close();
                        }
                        log.note(&format!("agent reconnected (connection {})", acc.hello.connection_seq));
                        self.handle.set_agent(Some(acc.client));
                        lost = None;
                    }
                    Some(AgentEvent::Refused(reason)) => return Outcome::Failed(reason),
                    None => return Outcome::Failed("the agent listener stopped".into()),
                },
                _ = self.handle.stop.cancelled() => return Outcome::Stopped,
            }
        }
    }

    /// Whether a VM stopped because airlockd is exiting stays running for
    /// the next airlockd to take over (`vm.keep_on_exit`): all but those
    /// of the warm pool (which starts afresh) and browser VMs without an
    /// owner (a snapshot's template).
    fn detaches(&self, outcome: &Outcome) -> bool {
        let v = self.handle.view.borrow();
        matches!(outcome, Outcome::Stopped)
            && self.inner.config.vm.keep_on_exit
            && self.inner.shutdown.is_cancelled()
            && !v.pooled
            && !(v.kind == VmKind::Browser && v.owner.is_none())
    }

    /// Leaves the VM running: its processes, directory and record stay;
    /// only this airlockd's side (agent connection, listeners, console
    /// pumps) goes.
    async fn detach(&self, vm: RunningVm) {
        if let Some(agent) = self.handle.agent() {
            agent.close();
        }
        self.handle.set_agent(None);
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let pid = vm.vmm_pid();
        vm.detach();
        tracing::info!(vm_id = %self.id, vmm_pid = ?pid, "VM left running for the next airlockd");
    }

    async fn teardown(&self, outcome: Outcome, vm: Option<RunningVm>, dir: &VmDir) {
        let vm = match vm {
            Some(vm) if self.detaches(&outcome) => return self.detach(vm).await,
            vm => vm,
        };
        let agent = self.handle.agent();
        self.handle.set_agent(None);
        let mut tail = String::new();
        if let Some(mut vm) = vm {
            if let (Outcome::Stopped, Some(agent)) = (&outcome, &agent) {
                // Let the guest power off cleanly (sync disks); kill it if not.
                let grace = Duration::from_millis(self.inner.config.vm.stop_grace_ms);
                let _ = agent.call(Operation::Shutdown, grace).await;
                vm.wait_vmm(grace).await;
            }
            vm.stop(HELPER_GRACE).await;
            tail = vm
                .console
                .tail_lines(self.inner.config.vm.console_tail_lines);
        }
        let kind = self.handle.view.borrow().kind;
        let killed = self.inner.backend_for(kind).release(&self.id);
        if killed > 0 {
            tracing::warn!(vm_id = %self.id, killed, "killed processes left in the VM's cgroup");
        }
        if let Some(agent) = agent {
            agent.close();
        }
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let keep = self
            .handle
            .keep_logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (state, error, kept) = match (outcome, keep) {
            (Outcome::Stopped, None) => (VmState::Stopped, None, None),
            (Outcome::Stopped, Some(reason)) => {
                let kept = self.keep_logs(dir, &format!("{reason} (VM stopped on request)"));
                (VmState::Stopped, None, kept)
            }
            (Outcome::Failed(reason), _) => {
                let error = failure_text(&reason, &tail);
                tracing::warn!(vm_id = %self.id, reason, "VM failed");
                let kept = self.keep_logs(dir, &error);
                (VmState::Failed, Some(error), kept)
            }
        };
        // Before the final state is published: whoever sees it may assume
        // the VM's files are gone.
        if let Err(e) = dir.remove() {
            tracing::warn!(vm_id = %self.id, error = %e, "cannot remove the VM directory");
        }
        self.update(|v| {
            v.state = state;
            v.vmm_pid = None;
            if error.is_some() {
                v.error = error;
            }
            if kept.is_some() {
                v.logs_dir = kept;
            }
        });
    }

    /// Moves the VM's logs to `<state_dir>/failed-vms/<id>/`.
    fn keep_logs(&self, dir: &VmDir, why: &str) -> Option<String> {
        let failed_dir = self.inner.config.paths.state_dir.join("failed-vms");
        let kept = dir.keep_logs(&failed_dir, why);
        if let Err(e) = &kept {
            tracing::warn!(vm_id = %self.id, error = %e, "cannot keep the logs of a VM");
        }
        prune_failed(&failed_dir, self.inner.config.vm.failed_logs_keep);
        kept.ok().map(|p| p.display().to_string())
    }
}

/// The egress gateway's vsock port (its socket sits beside the agent's).
pub(super) fn egress_port(agent_port: u32) -> u32 {
    agent_port + airlock_proto::egress::EGRESS_PORT_OFFSET
}

/// A failed VM's error: the reason, then the console's last lines.
fn failure_text(reason: &str, tail: &str) -> String {
    if tail.is_empty() {
        format!("{reason} (the console printed nothing)")
    } else {
        format!("{reason}\n--- last console lines ---\n{tail}")
    }
}
