//! The warm pool: browser VMs restored from the current snapshot ahead of
//! demand. A warm VM is loaded and paused, with its vhost-device-vsock
//! running but no vsock device attached, so it uses no CPU and nothing in
//! it runs until a session takes it; the VM manager then attaches the
//! device, lets it run and refreshes it ([`super::supervisor`]). Refilled
//! in the background up to a target bounded by memory; drained on
//! shutdown. Owned by [`super::restore::Restorer`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::backend::RunningVm;
use super::layout::VmDir;
use super::restore::Restorer;
use super::snapshot::Snapshot;
use super::VmManager;

/// Grace for a warm VM's processes when the pool drains.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Pause after a failed restore before the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// A restored, paused browser VM waiting for a session.
#[derive(Debug)]
pub struct WarmVm {
    /// The id it gets when taken.
    pub id: String,
    /// Its directory (sockets, console, logs).
    pub dir: VmDir,
    /// Its processes.
    pub vm: RunningVm,
    /// The snapshot it was restored from.
    pub snapshot: Arc<Snapshot>,
    /// How long restoring it took (ms).
    pub restored_ms: u64,
}

impl WarmVm {
    /// Stops its processes and removes its files.
    pub async fn discard(mut self) {
        self.vm.stop(DRAIN_GRACE).await;
        if let Err(e) = self.dir.remove() {
            tracing::warn!(vm_id = %self.id, error = %e, "cannot remove a warm VM's directory");
        }
    }
}

/// Warm VMs and their refill.
#[derive(Debug)]
pub struct Pool {
    target: usize,
    ready: Mutex<Vec<WarmVm>>,
    refill: Notify,
}

impl Pool {
    /// A pool holding up to `target` VMs.
    pub fn new(target: usize) -> Self {
        Self {
            target,
            ready: Mutex::default(),
            refill: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WarmVm>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Warm VMs ready now.
    pub fn ready(&self) -> usize {
        self.lock().len()
    }

    /// Wakes the refill (a new snapshot, a VM taken).
    pub fn wake(&self) {
        self.refill.notify_one();
    }

    /// A warm VM restored from `snap`, if one is ready. Warm VMs of an
    /// older snapshot, and any whose QEMU died while it waited, are
    /// returned in `stale` for the caller to discard.
    pub fn take(&self, snap: &Snapshot) -> (Option<WarmVm>, Vec<WarmVm>) {
        let key = snap.key();
        let mut ready = self.lock();
        let (mut fresh, mut stale) = (Vec::new(), Vec::new());
        for mut w in std::mem::take(&mut *ready) {
            match w.snapshot.key() == key && !w.vm.has_exited() {
                true => fresh.push(w),
                false => stale.push(w),
            }
        }
        let taken = fresh.pop();
        *ready = fresh;
        drop(ready);
        self.wake();
        (taken, stale)
    }

    /// Restores VMs until the pool holds its target, then waits to be
    /// woken; ends at shutdown.
    pub async fn run(&self, restorer: &Restorer, vms: &VmManager) {
        let shutdown = vms.inner.shutdown.clone();
        while !shutdown.is_cancelled() {
            let snap = match self.ready() < self.target {
                true => restorer.current(),
                false => None,
            };
            let Some(snap) = snap else {
                tokio::select! {
                    _ = self.refill.notified() => continue,
                    _ = shutdown.cancelled() => break,
                }
            };
            // Not cancelled by shutdown: a half-restored VM would leave its
            // directory behind; it takes about a second, then drains.
            let restored = restorer.restore_warm(vms, snap).await;
            match restored {
                Ok(warm) => {
                    tracing::info!(vm_id = %warm.id, restored_ms = warm.restored_ms, "warm browser VM ready");
                    self.lock().push(warm);
                }
                Err(why) => {
                    tracing::warn!(error = %why, "warm pool refill failed");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_AFTER) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
    }

    /// Stops every warm VM (shutdown).
    pub async fn drain(&self) {
        let all = std::mem::take(&mut *self.lock());
        let n = all.len();
        futures_util::future::join_all(all.into_iter().map(WarmVm::discard)).await;
        if n > 0 {
            tracing::info!(vms = n, "warm pool drained");
        }
    }
}
