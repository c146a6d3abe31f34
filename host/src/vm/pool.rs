//! The warm pool: browser VMs restored from the current snapshot ahead of
//! demand and left running, refreshed (entropy and clock of their own,
//! Chromium's network service restarted) with their agent connected and
//! Chromium on its blank page, but with no owner and nothing allowed out.
//! A session takes one ([`VmManager::claim_pooled`]) by giving it an owner,
//! the session's event sink and egress policy: nothing has to run before
//! its login starts. The pool's VMs are ordinary VMs of the manager (listed
//! with `pooled: true`), so shutdown stops them with the rest. Refilled in
//! the background up to a target bounded by memory. Owned by
//! [`super::restore::Restorer`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use airlock_proto::Event;
use tokio::sync::{mpsc, Notify};

use super::backend::Boot;
use super::restore::{template_policy, Origin, Restorer};
use super::snapshot::Snapshot;
use super::{CreateVm, Launch, VmError, VmHandle, VmKind, VmManager, VmState, VmView};
use crate::egress::policy::EgressPolicy;

/// Pause after a failed restore before the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// One VM of the pool.
#[derive(Debug)]
struct Member {
    id: String,
    /// The key of the snapshot it was restored from.
    key: String,
    /// Restored, refreshed and connected: a session may take it.
    ready: bool,
}

/// The pool's VMs and their refill.
#[derive(Debug)]
pub struct Pool {
    target: usize,
    members: Mutex<Vec<Member>>,
    refill: Notify,
}

impl Pool {
    /// A pool holding up to `target` VMs.
    pub fn new(target: usize) -> Self {
        Self {
            target,
            members: Mutex::default(),
            refill: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// VMs a session could take now.
    pub fn ready(&self) -> usize {
        self.lock().iter().filter(|m| m.ready).count()
    }

    /// Wakes the refill (a new snapshot, a VM taken).
    pub fn wake(&self) {
        self.refill.notify_one();
    }

    /// Takes a ready VM restored from snapshot `key`. Members of another
    /// snapshot stay for the refill, which [`Pool::prune`]s them.
    fn take(&self, key: &str) -> Option<String> {
        let mut members = self.lock();
        let taken = members
            .iter()
            .position(|m| m.ready && m.key == key)
            .map(|i| members.remove(i).id);
        drop(members);
        self.wake();
        taken
    }

    /// Forgets members whose VM is gone or not running, and those of a
    /// snapshot other than `current` (the image or agent changed); returns
    /// those still registered for the caller to delete.
    fn prune(&self, vms: &VmManager, current: Option<&str>) -> Vec<String> {
        let mut dead = Vec::new();
        self.lock().retain(|m| {
            let stale = current.is_some_and(|key| key != m.key);
            match vms.get(&m.id).map(|v| v.state) {
                Ok(VmState::Booting | VmState::Ready) if !stale => true,
                Ok(_) => {
                    dead.push(m.id.clone());
                    false
                }
                Err(_) => false,
            }
        });
        dead
    }

    /// Restores VMs until the pool holds its target, then waits to be
    /// woken (a VM taken or gone, a new snapshot); ends at shutdown.
    pub async fn run(&self, restorer: &Restorer, vms: &VmManager) {
        let shutdown = vms.inner.shutdown.clone();
        let mut changes = vms.subscribe_states();
        while !shutdown.is_cancelled() {
            let key = restorer.current().map(|s| s.key());
            for id in self.prune(vms, key.as_deref()) {
                let _ = vms.delete(&id).await;
            }
            let snap = match self.lock().len() < self.target {
                true => restorer.current(),
                false => None,
            };
            let Some(snap) = snap else {
                // Any VM's change may be one of ours failing.
                tokio::select! {
                    _ = self.refill.notified() => {}
                    _ = changes.recv() => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            };
            if let Err(why) = self.fill_one(vms, &snap).await {
                tracing::warn!(error = %why, "warm pool refill failed");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }

    /// Restores one VM into the pool and waits until it is ready.
    async fn fill_one(&self, vms: &VmManager, snap: &Snapshot) -> Result<(), String> {
        let view = vms.create_pooled(snap).map_err(|e| e.to_string())?;
        self.lock().push(Member {
            id: view.id.clone(),
            key: snap.key(),
            ready: false,
        });
        let timeout = Duration::from_millis(vms.inner.config.vm.boot_timeout_ms);
        let settled = vms
            .wait_for(
                &view.id,
                &[VmState::Ready, VmState::Failed, VmState::Stopped],
                timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
        if settled.state != VmState::Ready {
            // The next round prunes and deletes it.
            let why = settled
                .error
                .unwrap_or_else(|| format!("{:?}", settled.state));
            return Err(format!("a warm browser VM did not start: {why}"));
        }
        if let Some(m) = self.lock().iter_mut().find(|m| m.id == view.id) {
            m.ready = true;
        }
        tracing::info!(vm_id = %view.id, ready_ms = settled.timings.request_to_ready_ms, "warm browser VM ready");
        Ok(())
    }
}

/// Brings a claimed pool VM to the foreground: the normal CPU priority,
/// then its clock brought in line again (measured at nice 19 beside busy
/// VMs, the refresh's round trips could be long, and its bound loose).
async fn foreground(vms: VmManager, handle: Arc<VmHandle>, pid: Option<u32>) {
    let (vm_id, vcpus) = {
        let v = handle.view.borrow();
        (v.id.clone(), v.vcpus)
    };
    if let Some(pid) = pid {
        renice(&vm_id, pid).await;
    }
    // In a cgroup of its own, a VM's weight is its cgroup's, not its
    // threads' nice values.
    vms.inner
        .backend_for(VmKind::Browser)
        .foreground(&vm_id, vcpus);
    let Some(agent) = handle.agent() else { return };
    match super::clock::sync(&agent).await {
        Ok(synced) => {
            handle.view.send_modify(|v| synced.record(&mut v.timings));
            let _ = vms.inner.states.send(handle.current());
        }
        Err(e) => tracing::warn!(%vm_id, error = %e, "cannot bring a claimed VM's clock in line"),
    }
}

/// Gives every thread of a claimed pool VM's QEMU (started at nice 19,
/// so that a refill takes only what CPU sessions leave: under TCG on two
/// cores a refill beside a login made its page 3 s slower) the normal
/// priority. Linux keeps a nice value per thread, so each one is named.
async fn renice(vm_id: &str, pid: u32) {
    let tids: Vec<String> = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(dir) => dir
            .flatten()
            .map(|t| t.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return,
    };
    let status = tokio::process::Command::new("renice")
        .args(["-n", "0", "-p"])
        .args(&tids)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
    if !status.is_ok_and(|s| s.success()) {
        tracing::warn!(%vm_id, "cannot raise the priority of a VM taken from the warm pool");
    }
}

impl VmManager {
    /// A browser VM for the warm pool, restored from `snap`: no owner, no
    /// session, nothing allowed out.
    fn create_pooled(&self, snap: &Snapshot) -> Result<VmView, VmError> {
        let Boot::Image { image, init, .. } = self.boot_for(VmKind::Browser)? else {
            return Err(VmError::Invalid("a snapshot needs a browser image".into()));
        };
        let i = &snap.manifest.inputs;
        let req = CreateVm {
            kind: VmKind::Browser,
            user_id: None,
            memory_mib: Some(i.memory_mib),
            vcpus: Some(i.vcpus),
        };
        let launch = Launch {
            boot: Boot::Restore {
                image,
                init,
                state: snap.state(),
            },
            origin: Origin::Pool,
            takeover: None,
        };
        self.create_inner(req, None, template_policy(), launch)
    }

    /// Gives a ready VM of the pool restored from `snap` to the requester
    /// of `req`: its owner, where its events go, and what it may reach.
    /// `None` when the pool has none.
    pub(super) fn claim_pooled(
        &self,
        snap: &Snapshot,
        req: &CreateVm,
        events: &Option<mpsc::Sender<Event>>,
        egress: &EgressPolicy,
    ) -> Option<VmView> {
        let pool = &self.inner.restorer.get()?.pool;
        loop {
            let id = pool.take(&snap.key())?;
            let handle = self.handle(&id).ok()?;
            if handle.view.borrow().state != VmState::Ready {
                // Failed since it was ready.
                let vms = self.clone();
                self.inner.tracker.spawn(async move {
                    let _ = vms.delete(&id).await;
                });
                continue;
            }
            if let Some(sink) = events {
                handle.events.set(sink.clone());
            }
            if let Some((policy, _)) = &handle.egress {
                policy.set(egress.clone());
            }
            handle.view.send_modify(|v| {
                v.owner = req.user_id.clone();
                v.pooled = false;
            });
            handle.refresh_record(&self.inner.config.paths.run_dir);
            let view = handle.current();
            let _ = self.inner.states.send(view.clone());
            self.inner
                .tracker
                .spawn(foreground(self.clone(), handle, view.vmm_pid));
            tracing::info!(vm_id = %view.id, "browser VM taken from the warm pool");
            return Some(view);
        }
    }
}
