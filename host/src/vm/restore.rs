//! Browser VMs from snapshots: finds or makes the snapshot matching what a
//! session's browser VM would be now ([`super::snapshot`]), keeps the warm
//! pool filled from it ([`super::pool`]), and tells the VM manager how the
//! next browser VM starts: from the pool, restored on demand, or booted
//! cold while no snapshot is ready. Owned by [`super::VmManager`] once the
//! daemon enables it; its task runs on the manager's tracker.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_proto::{BrowserSpec, Operation, Reply};
use serde::Serialize;
use tokio::sync::Notify;

use super::pool::Pool;
use super::snapshot::{self, Inputs, Manifest, Snapshot, SnapshotError, Store};
use super::{CreateVm, VmKind, VmManager, VmState};
use crate::egress::policy::EgressPolicy;
use crate::image::GoldenImage;

/// How a browser VM started, as sessions and `/health` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Origin {
    /// Booted from its image.
    Boot,
    /// Restored from the snapshot on demand.
    Snapshot,
    /// Taken from the warm pool (restored ahead of demand).
    Pool,
}

impl Origin {
    /// For step details: how the VM started.
    pub fn describe(self) -> &'static str {
        match self {
            Origin::Boot => "booted from its image",
            Origin::Snapshot => "restored from a snapshot",
            Origin::Pool => "taken from the warm pool",
        }
    }
}

/// What `/health` says about snapshots.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// `none`, `making`, `ready` or `failed`.
    pub state: &'static str,
    /// The snapshot in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Its manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
    /// Why the last attempt failed, or why a snapshot was refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Snapshots made by this airlockd.
    pub made: u32,
    /// Warm VMs ready now.
    pub pool_ready: usize,
    /// The pool's target after its memory bound.
    pub pool_target: usize,
}

/// Most problems `/health` lists.
const MAX_PROBLEMS: usize = 8;
/// Pauses before making a snapshot again after a failed attempt: the
/// first, doubled each time up to the last.
const FIRST_RETRY: Duration = Duration::from_secs(30);
const LAST_RETRY: Duration = Duration::from_secs(600);
/// Failed restores in a row after which a snapshot is made again.
const MAX_FAILED_RESTORES: u32 = 3;

/// Snapshots and the pool of one airlockd.
#[derive(Debug)]
pub struct Restorer {
    store: Store,
    browser: BrowserSpec,
    current: Mutex<Option<Arc<Snapshot>>>,
    status: Mutex<SnapshotStatus>,
    /// Woken when the snapshot in use turns out stale.
    remake: Notify,
    /// Restores of the current snapshot that failed in a row.
    failed_restores: AtomicU32,
    /// A snapshot that restored badly too often: removed (under the
    /// store's lock) before the next one is looked for.
    discard: Mutex<Option<PathBuf>>,
    pub(super) pool: Pool,
}

impl Restorer {
    /// Snapshots under `dir` of browser VMs whose Chromium starts with
    /// `browser`; a pool of up to `warm` VMs within `pool_mib` of memory.
    pub fn new(dir: &Path, browser: BrowserSpec, warm: usize, pool_mib: u64, vm_mib: u32) -> Self {
        let target = match vm_mib {
            0 => 0,
            mib => warm.min((pool_mib / u64::from(mib)) as usize),
        };
        if target < warm {
            tracing::warn!(
                warm,
                target,
                pool_mib,
                "the warm pool's memory bound allows fewer VMs than configured"
            );
        }
        Self {
            store: Store::new(dir.to_path_buf()),
            browser,
            current: Mutex::new(None),
            status: Mutex::new(SnapshotStatus {
                state: "none",
                pool_target: target,
                ..Default::default()
            }),
            remake: Notify::new(),
            failed_restores: AtomicU32::new(0),
            discard: Mutex::new(None),
            pool: Pool::new(target),
        }
    }

    /// The status for `/health`.
    pub fn status(&self) -> SnapshotStatus {
        let mut s = self.lock_status().clone();
        s.pool_ready = self.pool.ready();
        s
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, SnapshotStatus> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn problem(&self, why: String) {
        tracing::warn!(problem = %why, "browser VM snapshot");
        let mut s = self.lock_status();
        if s.problems.len() == MAX_PROBLEMS {
            s.problems.remove(0);
        }
        s.problems.push(why);
    }

    /// The snapshot in use, if one is ready.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The snapshot to restore a VM of `image` from, if one is ready and
    /// made from that image; a mismatch schedules a new one.
    pub fn snapshot_for(&self, image: &GoldenImage) -> Option<Arc<Snapshot>> {
        let snap = self.current()?;
        if snap.manifest.inputs.image_sha256 != image.sha256 {
            self.problem(format!(
                "the browser image changed ({} -> {}): making a new snapshot",
                snap.manifest.inputs.image_sha256, image.sha256
            ));
            self.set_current(None);
            self.remake.notify_one();
            return None;
        }
        Some(snap)
    }

    /// Told how a VM restored from `state` started. A failed restore
    /// costs its session only time (it boots cold instead), but a
    /// snapshot that fails [`MAX_FAILED_RESTORES`] times in a row is
    /// thrown away and made again.
    pub fn restore_ended(&self, state: &Path, result: Result<(), &str>) {
        let Some(snap) = self.current().filter(|s| s.state() == state) else {
            return;
        };
        let Err(why) = result else {
            self.failed_restores.store(0, Ordering::Relaxed);
            return;
        };
        let failed = self.failed_restores.fetch_add(1, Ordering::Relaxed) + 1;
        if failed < MAX_FAILED_RESTORES {
            return;
        }
        self.failed_restores.store(0, Ordering::Relaxed);
        let why = why.lines().next().unwrap_or_default();
        self.problem(format!(
            "{failed} restores of snapshot {} failed in a row (the last: {why}): making a new one",
            snap.key()
        ));
        *self.discard.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(self.store.dir_for(&snap.manifest.inputs));
        self.set_current(None);
        self.remake.notify_one();
    }

    fn set_current(&self, snap: Option<Arc<Snapshot>>) {
        {
            let mut s = self.lock_status();
            s.state = if snap.is_some() { "ready" } else { "none" };
            s.key = snap.as_ref().map(|s| s.key());
            s.manifest = snap.as_ref().map(|s| s.manifest.clone());
        }
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = snap;
        self.pool.wake();
    }

    /// Keeps a snapshot current and the pool full until shutdown (the
    /// manager's shutdown stops the pool's VMs with the rest).
    pub async fn run(self: Arc<Self>, vms: VmManager) {
        let shutdown = vms.inner.shutdown.clone();
        let pool = tokio::spawn({
            let (me, vms) = (self.clone(), vms.clone());
            async move { me.pool.run(&me, &vms).await }
        });
        let mut retry = FIRST_RETRY;
        loop {
            tokio::select! {
                _ = self.ensure(&vms) => {}
                _ = shutdown.cancelled() => break,
            }
            // A failed attempt (a template VM too slow on a loaded host, a
            // full disk) is tried again, less often each time.
            let failed = self.lock_status().state == "failed";
            let again = async {
                match failed {
                    true => tokio::time::sleep(retry).await,
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.remake.notified() => {}
                _ = again => {
                    tracing::info!(after = ?retry, "trying to make the browser VM snapshot again");
                    retry = (retry * 2).min(LAST_RETRY);
                }
                _ = shutdown.cancelled() => break,
            }
            if !failed {
                retry = FIRST_RETRY;
            }
        }
        // The pool's VMs are the manager's: its shutdown stops them.
        let _ = pool.await;
    }

    /// Loads the snapshot of the current inputs, or makes it.
    async fn ensure(&self, vms: &VmManager) {
        let inputs = match self.inputs(vms).await {
            Ok(i) => i,
            Err(why) => {
                self.lock_status().state = "failed";
                return self.problem(why);
            }
        };
        // Held until the snapshot is loaded or made: airlockd sharing the
        // directory make each snapshot once.
        let _lock = match self.store.lock().await {
            Ok(l) => l,
            Err(e) => {
                self.lock_status().state = "failed";
                return self.problem(e.to_string());
            }
        };
        let discard = self
            .discard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(dir) = discard {
            self.store.remove(&dir);
        }
        // Loaded (or refused, saying why) before the others are pruned.
        let found = self.store.load(&inputs);
        if let Err(e) = &found {
            self.problem(e.to_string());
            self.store.remove(&self.store.dir_for(&inputs));
        }
        self.store.prune(&inputs);
        if let Ok(Some(snap)) = found {
            tracing::info!(key = %snap.key(), "browser VM snapshot found");
            return self.set_current(Some(Arc::new(snap)));
        }
        self.lock_status().state = "making";
        match make(vms, &self.store, &inputs).await {
            Ok(snap) => {
                tracing::info!(key = %snap.key(), bytes = snap.manifest.state_bytes,
                    boot_ms = snap.manifest.boot_ms, save_ms = snap.manifest.save_ms,
                    "browser VM snapshot made");
                self.lock_status().made += 1;
                self.set_current(Some(Arc::new(snap)));
            }
            Err(e) => {
                self.lock_status().state = "failed";
                self.problem(e.to_string());
            }
        }
    }

    /// What a snapshot made now would depend on.
    async fn inputs(&self, vms: &VmManager) -> Result<Inputs, String> {
        let cfg = &vms.inner.config.vm;
        let backend = vms.inner.backend_for(VmKind::Browser);
        let vmm = backend
            .snapshot_compat()
            .await
            .ok_or("the browser VMs' backend cannot snapshot VMs (QEMU on a q35 machine can)")?;
        let dir = cfg
            .browser_image
            .as_ref()
            .ok_or("snapshots need a browser image (vm.browser_image)")?;
        let image =
            GoldenImage::open("browser", dir, &vms.inner.expected).map_err(|e| e.to_string())?;
        Ok(Inputs {
            format: snapshot::FORMAT,
            image_sha256: image.sha256,
            agent_build_id: vms.inner.expected.build_id.clone(),
            vmm,
            memory_mib: cfg.browser_memory_mib,
            vcpus: cfg.browser_vcpus,
            agent_port: cfg.agent_port,
            browser: self.browser.clone(),
        })
    }
}

/// The egress of the template VM and of VMs waiting in the pool: nothing
/// (they only show a blank page).
pub(super) fn template_policy() -> EgressPolicy {
    EgressPolicy {
        label: "the snapshot template".into(),
        allow: Vec::new(),
        turn: Vec::new(),
        user: None,
    }
}

/// Boots a browser VM, starts Chromium on a blank page, announces the
/// snapshot to the agent, saves the VM and deletes it.
async fn make(vms: &VmManager, store: &Store, inputs: &Inputs) -> Result<Snapshot, SnapshotError> {
    let req = CreateVm {
        kind: VmKind::Browser,
        user_id: None,
        memory_mib: Some(inputs.memory_mib),
        vcpus: Some(inputs.vcpus),
    };
    let view = vms
        .create_with(req, None, template_policy())
        .map_err(|e| SnapshotError::Make(format!("cannot create the template VM: {e}")))?;
    let staging = store.staging(inputs)?;
    let result = prepare_and_save(vms, &view.id, inputs, &staging).await;
    let deleted = match &result {
        Ok(_) => vms.delete(&view.id).await,
        Err(e) => vms.delete_keeping_logs(&view.id, &e.to_string()).await,
    };
    if let Err(e) = deleted {
        tracing::warn!(vm_id = %view.id, error = %e, "cannot delete the snapshot template VM");
    }
    let (boot, stats) = match result {
        Ok(r) => r,
        Err(e) => {
            store.remove(&staging);
            return Err(e);
        }
    };
    let manifest = Manifest {
        inputs: inputs.clone(),
        state_bytes: stats.bytes,
        ram_bytes: stats.ram_bytes,
        boot_ms: snapshot::ms(boot),
        save_ms: snapshot::ms(stats.took),
        created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    };
    store.install(&staging, manifest)
}

async fn prepare_and_save(
    vms: &VmManager,
    id: &str,
    inputs: &Inputs,
    staging: &Path,
) -> Result<(Duration, super::backend::SaveStats), SnapshotError> {
    let started = Instant::now();
    let fail = |what: &str, e: &dyn std::fmt::Display| SnapshotError::Make(format!("{what}: {e}"));
    let cfg = &vms.inner.config;
    let boot_timeout = Duration::from_millis(cfg.vm.boot_timeout_ms);
    let view = vms
        .wait_for(
            id,
            &[VmState::Ready, VmState::Failed, VmState::Stopped],
            boot_timeout,
        )
        .await
        .map_err(|e| fail("the template VM", &e))?;
    if view.state != VmState::Ready {
        let why = view
            .error
            .unwrap_or_else(|| format!("it is {:?}", view.state));
        return Err(SnapshotError::Make(format!(
            "the template VM did not start: {why}"
        )));
    }
    let browser_timeout = Duration::from_millis(cfg.auth.browser_timeout_ms);
    match vms
        .call(
            id,
            Operation::StartBrowser(inputs.browser.clone()),
            browser_timeout,
        )
        .await
    {
        Ok(Reply::BrowserStarted(_)) => {}
        Ok(other) => return Err(fail("StartBrowser", &format!("unexpected reply {other:?}"))),
        Err(e) => return Err(fail("Chromium did not start in the template VM", &e)),
    }
    // The agent warms Chromium and the streamer up first (GStreamer's
    // plugin scan alone takes about 20 s under TCG).
    vms.call(id, Operation::PrepareSnapshot, browser_timeout)
        .await
        .map_err(|e| fail("the template's agent refused the snapshot", &e))?;
    let boot = started.elapsed();
    let stats = vms
        .save(id, &Store::staged_state(staging))
        .await
        .map_err(|e| fail("saving the template VM", &e))?;
    Ok((boot, stats))
}
