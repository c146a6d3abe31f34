//! VMs: the registry of VMs, their public view, and the operations the API
//! performs on them. Each VM's life (launch, handshake, failure, teardown)
//! runs in its own supervisor task ([`supervisor`]) owned by the manager;
//! the manager only records what the supervisor reports and forwards
//! requests to the connected agent.

pub mod accel;
pub mod account;
pub mod adopt;
pub mod backend;
pub mod cgroup;
pub mod clock;
pub mod confine;
pub mod console;
pub mod firecracker;
pub mod home;
pub mod layout;
pub mod pool;
pub mod process;
pub mod proctree;
pub mod qemu;
pub mod qmp;
pub mod ramfile;
pub mod restore;
pub mod snapshot;
mod supervisor;
mod takeover;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use airlock_proto::{Event, Operation, Reply};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{AgentClient, AgentError, EventSink};
use crate::config::Config;
use crate::egress::policy::{CurrentPolicy, EgressPolicy};
use crate::egress::{Egress, EgressStats, EgressView};
use crate::image::{ExpectedAgent, GoldenImage, ImageError};
use backend::{BackendInfo, Boot, VmBackend};
use restore::{Origin, Restorer, SnapshotStatus};

/// The init a browser image's stage 1 executes: the agent itself, as PID 1
/// (a browser VM needs no service manager).
pub const BROWSER_INIT: &str = "/usr/lib/airlock/airlock-guest";
/// The init of a CLI image: systemd, which starts the agent's unit.
pub const CLI_INIT: &str = "/lib/systemd/systemd";

/// What a VM is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmKind {
    /// Runs a user's AI coding CLI.
    Cli,
    /// Runs the throwaway login browser.
    Browser,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Launched; its agent has not said hello yet.
    Booting,
    /// Its agent is connected and serving.
    Ready,
    /// It cannot be used; `error` says why. Its logs are kept.
    Failed,
    /// Stopped on request.
    Stopped,
}

/// Boot milestones, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// API request to VMM process started (host clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_to_vmm_ms: Option<u64>,
    /// VMM started to the agent's init marker on the console (host clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_to_init_ms: Option<u64>,
    /// Kernel uptime when the agent started (guest clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_uptime_at_init_ms: Option<u64>,
    /// Agent start to hello sent (guest clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_to_hello_ms: Option<u64>,
    /// Hello received to ready event received (host clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello_to_ready_ms: Option<u64>,
    /// API request to ready (host clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_to_ready_ms: Option<u64>,
    /// Loading the saved state (restored VMs; for a VM of the warm pool,
    /// done before a session took it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    /// Attaching the vsock device and letting the VM run (restored VMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_ms: Option<u64>,
    /// The refresh of a restored VM: new entropy, clock, network service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_ms: Option<u64>,
    /// How far the refresh stepped the guest's clock (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_step_ms: Option<i64>,
    /// The guest's clock minus the host's after it was brought in line
    /// (ms; see [`clock`]), last measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<i64>,
    /// The round trip of that measurement (ms): the offset is exact to
    /// within half of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_rtt_ms: Option<u64>,
}

/// The public description of a VM.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmView {
    /// Its id.
    pub id: String,
    /// What it is for.
    pub kind: VmKind,
    /// How it started: booted, restored from a snapshot, or from the pool.
    pub origin: Origin,
    /// Waiting in the warm pool: running, refreshed, with no owner and
    /// nothing allowed out, until a session takes it.
    pub pooled: bool,
    /// Where it is in its life.
    pub state: VmState,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The user it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The agent's version, once it said hello.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The agent's build id, once it said hello.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_build_id: Option<String>,
    /// Memory (MiB).
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// `kvm` or `tcg` (QEMU backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Pid of the VMM process while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_pid: Option<u32>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Boot milestones.
    pub timings: Timings,
    /// Directory with the kept console and agent logs of a failed VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs_dir: Option<String>,
    /// What left the VM through the egress gateway (browser VMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressView>,
    /// Set when the guest's kernel ran out of memory and killed a process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_of_memory: Option<String>,
    /// When this airlockd took the running VM over from an earlier one
    /// (RFC 3339); its timings are then those of the takeover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopted_at: Option<String>,
}

/// A VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No VM has that id.
    #[error("no VM with id {0:?}")]
    NotFound(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Too many VMs exist.
    #[error("at most {0} VMs may boot or run at once; delete one first")]
    Capacity(usize),
    /// The VM cannot take requests in its state.
    #[error("VM {id} is {state:?}, not ready")]
    NotReady {
        /// The VM.
        id: String,
        /// Its state.
        state: VmState,
    },
    /// The agent failed the request.
    #[error("VM {id}: {source}")]
    Agent {
        /// The VM.
        id: String,
        /// Cause.
        #[source]
        source: AgentError,
    },
    /// airlockd is shutting down.
    #[error("airlockd is shutting down")]
    ShuttingDown,
    /// The image VMs of this kind boot from is unusable.
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl VmError {
    /// The agent answered that the file or program does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::Agent {
                source: AgentError::Guest(reply),
                ..
            } if reply.code == airlock_proto::ErrorCode::NotFound
        )
    }
}

/// A request to create a VM.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVm {
    /// What it is for.
    pub kind: VmKind,
    /// The user the VM belongs to (a CLI VM receives that user's
    /// credentials).
    pub user_id: Option<String>,
    /// Memory (MiB); the configured default when absent.
    pub memory_mib: Option<u32>,
    /// vCPUs; the configured default when absent.
    pub vcpus: Option<u32>,
}

/// How the supervisor gets a VM running.
#[derive(Debug)]
struct Launch {
    boot: Boot,
    /// [`Origin::Pool`]: a VM for the warm pool, created without an owner.
    origin: Origin,
    /// A VM an earlier airlockd left running, to take over.
    takeover: Option<Takeover>,
}

/// A VM an earlier airlockd left running.
#[derive(Debug)]
struct Takeover {
    /// What it booted (from its record).
    image: String,
    /// Its processes, watched.
    procs: Vec<adopt::Adopted>,
    /// The vsock port its agent dials (from its record: the configured
    /// one may have changed since).
    agent_port: u32,
}

impl Launch {
    fn cold(boot: Boot) -> Self {
        Self {
            boot,
            origin: Origin::Boot,
            takeover: None,
        }
    }
}

/// A new VM id.
fn new_vm_id() -> String {
    format!("vm-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// One VM as the manager tracks it.
#[derive(Debug)]
struct VmHandle {
    view: watch::Sender<VmView>,
    /// The connected agent; `None` while booting or reconnecting.
    agent: watch::Sender<Option<AgentClient>>,
    /// Where the agent's session events go (the session that owns it).
    events: Arc<EventSink>,
    /// Set by [`VmManager::delete_keeping_logs`]: keep the logs of this
    /// stopped VM, with this reason.
    keep_logs: Mutex<Option<String>>,
    /// Its egress gateway's policy and counters (browser VMs only).
    egress: Option<(Arc<CurrentPolicy>, Arc<EgressStats>)>,
    /// Set while its state is saved: the agent's connection breaks on
    /// purpose then, and the VM is deleted after.
    saving: std::sync::atomic::AtomicBool,
    /// What a later airlockd needs to take it over, once it runs.
    record: Mutex<Option<adopt::VmRecord>>,
    stop: CancellationToken,
    finished: CancellationToken,
}

impl Inner {
    fn backend_for(&self, kind: VmKind) -> &Arc<dyn VmBackend> {
        match (kind, &self.browser_backend) {
            (VmKind::Browser, Some(b)) => b,
            _ => &self.backend,
        }
    }
}

impl VmHandle {
    fn agent(&self) -> Option<AgentClient> {
        self.agent.borrow().clone()
    }

    /// The view, with the egress counters as they are now.
    fn current(&self) -> VmView {
        let mut view = self.view.borrow().clone();
        view.egress = self.egress.as_ref().map(|(_, stats)| stats.view());
        view
    }

    fn set_agent(&self, client: Option<AgentClient>) {
        self.agent.send_replace(client);
    }

    /// Booting or running: it holds processes and memory (a failed or
    /// stopped VM's are gone: teardown publishes that state last).
    fn is_live(&self) -> bool {
        matches!(self.view.borrow().state, VmState::Booting | VmState::Ready)
    }
}

#[derive(Debug)]
struct Inner {
    config: Arc<Config>,
    backend: Arc<dyn VmBackend>,
    /// Backend of browser VMs when it differs (the browser role as a host
    /// process while CLI VMs are QEMU, in development and CI).
    browser_backend: Option<Arc<dyn VmBackend>>,
    /// Every change of every VM, for whoever needs to react to one.
    states: broadcast::Sender<VmView>,
    expected: Arc<ExpectedAgent>,
    /// Egress settings every browser VM's gateway uses.
    egress: Arc<Egress>,
    /// Browser VM snapshots and the warm pool, once enabled.
    restorer: OnceLock<Arc<Restorer>>,
    vms: Mutex<BTreeMap<String, Arc<VmHandle>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// Creates, tracks and stops VMs.
#[derive(Debug, Clone)]
pub struct VmManager {
    inner: Arc<Inner>,
}

impl VmManager {
    /// A manager launching VMs through `backend`. Cancelling `shutdown`
    /// starts tearing every VM down and ends long-polls; [`VmManager::shutdown`]
    /// then waits for the teardown to finish.
    pub fn new(
        config: Arc<Config>,
        backends: (Arc<dyn VmBackend>, Option<Arc<dyn VmBackend>>),
        expected: ExpectedAgent,
        egress: Arc<Egress>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                backend: backends.0,
                browser_backend: backends.1,
                states: broadcast::channel(256).0,
                expected: Arc::new(expected),
                egress,
                restorer: OnceLock::new(),
                vms: Mutex::default(),
                tracker: TaskTracker::new(),
                shutdown,
            }),
        }
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<VmHandle>>> {
        self.inner
            .vms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn handle(&self, id: &str) -> Result<Arc<VmHandle>, VmError> {
        self.vms()
            .get(id)
            .cloned()
            .ok_or_else(|| VmError::NotFound(id.to_string()))
    }

    /// Facts about the backend (for `/health`).
    pub fn backend_info(&self) -> BackendInfo {
        self.inner.backend.info()
    }

    /// Facts about the browser VMs' backend, when it differs.
    pub fn browser_backend_info(&self) -> Option<BackendInfo> {
        self.inner.browser_backend.as_ref().map(|b| b.info())
    }

    /// Starts a VM; it boots in the background (state `booting`). A
    /// browser VM made this way, or a CLI VM when `egress.cli_vms` is on,
    /// may reach only `egress.allow`.
    pub fn create(&self, req: CreateVm) -> Result<VmView, VmError> {
        // Named in refusals: what the destination is not allowed for.
        let label = match req.kind {
            VmKind::Cli => "CLI VMs (egress.cli_vms)",
            VmKind::Browser => "browser VMs created through the API",
        };
        let policy = EgressPolicy {
            label: label.into(),
            allow: self.inner.egress.allowed().to_vec(),
            turn: Vec::new(),
            user: req.user_id.clone(),
        };
        self.create_with(req, None, policy)
    }

    /// The daemon's egress settings.
    pub fn egress(&self) -> &Egress {
        &self.inner.egress
    }

    /// Starts a VM whose agent's session events (logins, credentials,
    /// browser state) go to `events`; a browser VM's traffic leaves
    /// through a gateway applying `egress` (CLI VMs have none).
    pub fn create_with(
        &self,
        req: CreateVm,
        events: Option<mpsc::Sender<Event>>,
        egress: EgressPolicy,
    ) -> Result<VmView, VmError> {
        let boot = self.boot_for(req.kind)?;
        self.create_inner(req, events, egress, Launch::cold(boot))
    }

    /// Like [`VmManager::create_with`] for a session's browser VM: taken
    /// from the warm pool, else restored from the snapshot, else booted
    /// (no snapshot yet, or a size other than the snapshot's).
    pub fn create_browser(
        &self,
        req: CreateVm,
        events: Option<mpsc::Sender<Event>>,
        egress: EgressPolicy,
    ) -> Result<VmView, VmError> {
        let boot = self.boot_for(VmKind::Browser)?;
        let snap = match (&boot, self.inner.restorer.get()) {
            (Boot::Image { image, .. }, Some(r)) => r.snapshot_for(image),
            _ => None,
        };
        let Some(snap) = snap.filter(|s| {
            let i = &s.manifest.inputs;
            req.memory_mib.is_none_or(|m| m == i.memory_mib)
                && req.vcpus.is_none_or(|v| v == i.vcpus)
        }) else {
            return self.create_inner(req, events, egress, Launch::cold(boot));
        };
        let Boot::Image { image, init, .. } = boot else {
            return Err(VmError::Invalid("a snapshot needs a browser image".into()));
        };
        if let Some(view) = self.claim_pooled(&snap, &req, &events, &egress) {
            return Ok(view);
        }
        let i = &snap.manifest.inputs;
        let req = CreateVm {
            memory_mib: Some(i.memory_mib),
            vcpus: Some(i.vcpus),
            ..req
        };
        let launch = Launch {
            boot: Boot::Restore {
                image,
                init,
                state: snap.state(),
            },
            origin: Origin::Snapshot,
            takeover: None,
        };
        self.create_inner(req, events, egress, launch)
    }

    /// Starts making browser VM snapshots whose Chromium starts with
    /// `browser`, and filling the warm pool (per `snapshots` in the
    /// config); a no-op when disabled or without a browser image.
    pub fn enable_snapshots(&self, browser: airlock_proto::BrowserSpec) {
        let cfg = &self.inner.config;
        if !cfg.snapshots.enabled || cfg.vm.browser_image.is_none() {
            return;
        }
        let s = &cfg.snapshots;
        let restorer = Arc::new(Restorer::new(
            &s.dir_or(&cfg.paths.state_dir),
            browser,
            s.warm_pool,
            s.pool_memory_mib,
            cfg.vm.browser_memory_mib,
        ));
        if self.inner.restorer.set(restorer.clone()).is_ok() {
            self.inner.tracker.spawn(restorer.run(self.clone()));
        }
    }

    /// Snapshots and the pool, for `/health` (`None` when disabled).
    pub fn snapshot_status(&self) -> Option<SnapshotStatus> {
        self.inner.restorer.get().map(|r| r.status())
    }

    fn create_inner(
        &self,
        req: CreateVm,
        events: Option<mpsc::Sender<Event>>,
        egress: EgressPolicy,
        launch: Launch,
    ) -> Result<VmView, VmError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(VmError::ShuttingDown);
        }
        if let Some(user) = &req.user_id {
            if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
                return Err(VmError::Invalid(
                    "userId must be 1 to 128 printable characters".into(),
                ));
            }
        }
        let cfg = &self.inner.config.vm;
        let (memory_default, vcpus_default) = match req.kind {
            VmKind::Browser => (cfg.browser_memory_mib, cfg.browser_vcpus),
            VmKind::Cli => (cfg.default_memory_mib, cfg.default_vcpus),
        };
        let memory_mib = req.memory_mib.unwrap_or(memory_default);
        let vcpus = req.vcpus.unwrap_or(vcpus_default);
        if !(64..=cfg.max_memory_mib).contains(&memory_mib) {
            return Err(VmError::Invalid(format!(
                "memoryMib must be between 64 and {}",
                cfg.max_memory_mib
            )));
        }
        if !(1..=cfg.max_vcpus).contains(&vcpus) {
            return Err(VmError::Invalid(format!(
                "vcpus must be between 1 and {}",
                cfg.max_vcpus
            )));
        }
        let id = new_vm_id();
        let view = VmView {
            id: id.clone(),
            kind: req.kind,
            origin: launch.origin,
            pooled: launch.origin == Origin::Pool,
            state: VmState::Booting,
            error: None,
            owner: req.user_id.clone(),
            agent_version: None,
            agent_build_id: None,
            memory_mib,
            vcpus,
            accel: None,
            vmm_pid: None,
            created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            timings: Timings::default(),
            logs_dir: None,
            egress: None,
            out_of_memory: None,
            adopted_at: None,
        };
        // A browser VM without a network of its own has a gateway; a CLI
        // VM only when the operator says so (egress.cli_vms).
        let gateway = req.kind == VmKind::Browser || self.inner.egress.for_cli_vms();
        let egress =
            (gateway && self.inner.backend_for(req.kind).isolates_network(req.kind)).then(|| {
                let policy = Arc::new(CurrentPolicy::new(egress));
                (policy, Arc::new(EgressStats::default()))
            });
        let handle = Arc::new(VmHandle {
            view: watch::channel(view.clone()).0,
            agent: watch::channel(None).0,
            events: Arc::new(EventSink::new(events)),
            keep_logs: Mutex::new(None),
            egress,
            saving: Default::default(),
            record: Mutex::new(None),
            stop: self.inner.shutdown.child_token(),
            finished: CancellationToken::new(),
        });
        {
            let mut vms = self.vms();
            let live = vms.values().filter(|h| h.is_live()).count();
            if live >= cfg.max_vms {
                return Err(VmError::Capacity(cfg.max_vms));
            }
            vms.insert(id.clone(), handle.clone());
        }
        tracing::info!(vm_id = %id, kind = ?req.kind, origin = ?launch.origin, memory_mib, vcpus, "creating VM");
        let sv = supervisor::Supervisor::new(self.inner.clone(), handle, launch, Instant::now());
        self.inner.tracker.spawn(sv.run());
        Ok(view)
    }

    /// What a new VM of `kind` boots: its golden image when one is
    /// configured (refused at once when missing or stale), else the
    /// initramfs.
    fn boot_for(&self, kind: VmKind) -> Result<Boot, VmError> {
        let cfg = &self.inner.config.vm;
        let (name, dir, init) = match kind {
            VmKind::Browser => ("browser", &cfg.browser_image, BROWSER_INIT),
            VmKind::Cli => ("cli", &cfg.cli_image, CLI_INIT),
        };
        match dir {
            None => Ok(Boot::Initramfs),
            Some(dir) => Ok(Boot::Image {
                image: GoldenImage::open(name, dir, &self.inner.expected)?,
                init,
                home: None,
            }),
        }
    }

    /// All VMs, oldest id first.
    pub fn list(&self) -> Vec<VmView> {
        self.vms().values().map(|h| h.current()).collect()
    }

    /// One VM.
    pub fn get(&self, id: &str) -> Result<VmView, VmError> {
        Ok(self.handle(id)?.current())
    }

    /// Waits up to `timeout` for the VM to reach one of `states`, then
    /// returns it (in whatever state it is by then).
    pub async fn wait_for(
        &self,
        id: &str,
        states: &[VmState],
        timeout: Duration,
    ) -> Result<VmView, VmError> {
        let handle = self.handle(id)?;
        let mut rx = handle.view.subscribe();
        // Shutdown ends the wait early so it cannot hold up the drain.
        tokio::select! {
            _ = tokio::time::timeout(timeout, rx.wait_for(|v| states.contains(&v.state))) => {}
            _ = self.inner.shutdown.cancelled() => {}
        }
        Ok(handle.current())
    }

    /// Like [`VmManager::delete`], but keeps the VM's console and agent
    /// logs (with `reason`), for a VM whose work failed although the VM
    /// itself did not.
    pub async fn delete_keeping_logs(&self, id: &str, reason: &str) -> Result<VmView, VmError> {
        let handle = self.handle(id)?;
        *handle
            .keep_logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason.to_string());
        self.delete(id).await
    }

    /// The newest booting or ready VM of `kind` that belongs to `owner`.
    pub fn find_owned(&self, kind: VmKind, owner: &str) -> Option<VmView> {
        self.vms()
            .values()
            .map(|h| h.view.borrow().clone())
            .filter(|v| v.kind == kind && v.owner.as_deref() == Some(owner))
            .filter(|v| matches!(v.state, VmState::Booting | VmState::Ready))
            .max_by(|a, b| a.created_at.cmp(&b.created_at))
    }

    /// Every later change of every VM.
    pub fn subscribe_states(&self) -> broadcast::Receiver<VmView> {
        self.inner.states.subscribe()
    }

    /// Stops the VM, removes its files and forgets it; returns its last view.
    pub async fn delete(&self, id: &str) -> Result<VmView, VmError> {
        let handle = self.handle(id)?;
        handle.stop.cancel();
        handle.finished.cancelled().await;
        self.vms().remove(id);
        let view = handle.current();
        tracing::info!(vm_id = %id, state = ?view.state, "VM deleted");
        Ok(view)
    }

    /// Sends an operation to the VM's agent.
    pub async fn call(&self, id: &str, op: Operation, timeout: Duration) -> Result<Reply, VmError> {
        let handle = self.handle(id)?;
        let state = handle.view.borrow().state;
        if state != VmState::Ready {
            return Err(VmError::NotReady {
                id: id.to_string(),
                state,
            });
        }
        // While the agent reconnects (a dropped connection, a guest that
        // re-dials) the request waits for it instead of failing at once.
        let mut agent_rx = handle.agent.subscribe();
        let agent = match tokio::time::timeout(timeout, agent_rx.wait_for(|a| a.is_some())).await {
            Ok(Ok(a)) => a.clone(),
            _ => None,
        };
        let agent = agent.ok_or(VmError::Agent {
            id: id.to_string(),
            source: AgentError::Disconnected,
        })?;
        agent
            .call(op, timeout)
            .await
            .map_err(|source| VmError::Agent {
                id: id.to_string(),
                source,
            })
    }

    /// Saves a ready VM's state to `out` (a snapshot's template): its vsock
    /// device goes, and the VM stays paused until it is deleted.
    pub async fn save(
        &self,
        id: &str,
        out: &std::path::Path,
    ) -> Result<backend::SaveStats, VmError> {
        let handle = self.handle(id)?;
        let kind = handle.view.borrow().kind;
        handle
            .saving
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let dir = layout::VmDir::create(&self.inner.config.paths.run_dir, id)
            .map_err(|e| VmError::Invalid(e.to_string()))?;
        self.inner
            .backend_for(kind)
            .save(&dir, out)
            .await
            .map_err(|e| VmError::Invalid(format!("cannot save VM {id}: {e}")))
    }

    /// Stops every VM and waits for all supervisors to finish.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        let n = std::mem::take(&mut *self.vms()).len();
        tracing::info!(vms = n, "all VMs stopped");
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }
}
