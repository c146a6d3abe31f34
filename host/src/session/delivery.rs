//! Delivery of stored credentials into users' CLI VMs. Right after a
//! session stores its credential, it goes to the user's CLI VM (created
//! on demand): each file written atomically with mode 0600 through the
//! agent, whose reply's hash must match what was sent (nothing secret is
//! read back out of the VM). A CLI VM that is not up in time leaves the
//! credential stored; a background task delivers it when a CLI VM of that
//! user becomes ready, and gives every CLI VM of a user that becomes ready
//! the files of the user's newest credentials it lacks. Called by
//! [`super::run`]; the watcher is started by [`super::Sessions::new`].

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_proto::limits::MAX_FILE_BYTES;
use airlock_proto::{ErrorCode, Operation, ReadFileRequest, Reply, SecretBytes, WriteFileRequest};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Notify;

use super::{merge, Inner, SessionHandle, SessionState};
use crate::agent::AgentError;
use crate::store::CredentialBundle;
use crate::vm::{CreateVm, VmError, VmKind, VmState, VmView};

/// Why a delivery did not happen.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    /// No CLI VM is up: it will be delivered later.
    #[error("{0}")]
    Pending(String),
    /// Writing or verifying failed.
    #[error("{0}")]
    Failed(String),
}

/// The credentials being delivered right now, by a session or by the
/// watcher of CLI VMs: never both for one record at the same time.
#[derive(Debug, Default)]
pub(super) struct Deliveries {
    set: Mutex<HashSet<String>>,
    freed: Notify,
}

impl Deliveries {
    /// Claims record `id`, unless someone is delivering it.
    fn take(&self, id: &str) -> Option<Claim<'_>> {
        let fresh = self
            .set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string());
        fresh.then(|| Claim {
            of: self,
            id: id.to_string(),
        })
    }

    /// Claims record `id` once whoever delivers it now is done.
    async fn claim(&self, id: &str) -> Claim<'_> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the attempt, so a release in between wakes it.
            freed.as_mut().enable();
            if let Some(c) = self.take(id) {
                return c;
            }
            freed.await;
        }
    }
}

/// Holds a credential id among the deliveries in flight while it lives.
struct Claim<'a> {
    of: &'a Deliveries,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.of
            .set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.of.freed.notify_waiters();
    }
}

/// SHA-256 in lowercase hex, as the agent reports a write's.
fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Delivers a session's new credential and moves the session on.
pub(super) async fn deliver_for_session(
    ctx: &Inner,
    h: &SessionHandle,
    user: &str,
    credential_id: &str,
    bundle: &CredentialBundle,
) {
    // The watcher may be bringing this very record into a CLI VM that just
    // became ready: this session is completed by its own delivery, after
    // that (the write is the same), not by the watcher's.
    let _claim = ctx.delivering.claim(credential_id).await;
    let timeout = Duration::from_millis(ctx.cfg.delivery_timeout_ms);
    let merged = merged_paths(ctx, &h.view().provider);
    match deliver(ctx, user, credential_id, bundle, &merged, timeout).await {
        Ok(vm) => {
            crate::audit::credential_delivered(user, &h.view().provider, credential_id, &vm);
            completed(ctx, h, &vm).await
        }
        Err(DeliveryError::Pending(why)) => {
            // Set while the claim is held: the watcher looks only once it
            // holds it, and then completes the session.
            h.delivery_pending.store(true, Ordering::Release);
            ctx.record(h, None, "deliveryPending", Some(why))
        }
        Err(DeliveryError::Failed(why)) => {
            super::run::finish(ctx, h, SessionState::Failed, why).await;
        }
    }
}

async fn completed(ctx: &Inner, h: &SessionHandle, vm: &str) {
    h.view.send_modify(|v| v.cli_vm_id = Some(vm.to_string()));
    ctx.record(
        h,
        Some(SessionState::Delivered),
        "state",
        Some(format!("written to CLI VM {vm} and verified")),
    );
    ctx.record(h, Some(SessionState::Completed), "state", None);
    ctx.save_now(h).await;
    ctx.ended(&h.view().session_id);
}

async fn deliver(
    ctx: &Inner,
    user: &str,
    credential_id: &str,
    bundle: &CredentialBundle,
    merged: &[String],
    timeout: Duration,
) -> Result<String, DeliveryError> {
    let started = Instant::now();
    let vm = ensure_cli_vm(ctx, user).map_err(|e| {
        DeliveryError::Pending(format!(
            "cannot create a CLI VM: {e}; the credential stays stored"
        ))
    })?;
    let settled = ctx
        .vms
        .wait_for(
            &vm.id,
            &[VmState::Ready, VmState::Failed, VmState::Stopped],
            timeout.saturating_sub(started.elapsed()),
        )
        .await
        .map_err(|e| DeliveryError::Pending(e.to_string()))?;
    if settled.state != VmState::Ready {
        return Err(DeliveryError::Pending(format!(
            "the CLI VM {} is {:?}; the credential stays stored and goes to the user's CLI VM when one is ready",
            vm.id, settled.state
        )));
    }
    write_and_verify(ctx, &vm.id, bundle, merged).await?;
    ctx.store
        .mark_delivered(credential_id, &vm.id)
        .await
        .map_err(|e| DeliveryError::Failed(format!("delivered, but cannot record it: {e}")))?;
    Ok(vm.id)
}

/// The user's CLI VM: the one they have (booting or ready), or a new one.
pub(super) fn ensure_cli_vm(ctx: &Inner, user: &str) -> Result<VmView, VmError> {
    // Find and create under one lock (neither awaits), so two sessions of
    // the same user end up with one VM.
    let _one_at_a_time = ctx
        .cli_vm_lock
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(vm) = ctx.vms.find_owned(VmKind::Cli, user) {
        return Ok(vm);
    }
    ctx.vms.create(CreateVm {
        kind: VmKind::Cli,
        user_id: Some(user.into()),
        memory_mib: None,
        vcpus: None,
    })
}

/// The files of `provider` that are merged into the CLI VM's copy rather
/// than replacing it (none if the profile is gone).
fn merged_paths(ctx: &Inner, provider: &str) -> Vec<String> {
    ctx.providers
        .get(provider)
        .map(|p| p.merged_paths())
        .unwrap_or_default()
}

/// Writes every file (0600, atomically, parents created) and reads it back;
/// a file in `merged` is first merged into the CLI VM's copy.
async fn write_and_verify(
    ctx: &Inner,
    vm: &str,
    bundle: &CredentialBundle,
    merged: &[String],
) -> Result<(), DeliveryError> {
    for f in &bundle.files {
        let contents = if merged.contains(&f.path) {
            let existing = read_persons_copy(ctx, vm, &f.path).await?;
            let existing = existing.as_ref().map(|b| b.expose());
            merge::merge_into(&f.path, existing, f.contents.expose())
                .map(SecretBytes::new)
                .map_err(|e| DeliveryError::Failed(e.to_string()))?
        } else {
            f.contents.clone()
        };
        let write = WriteFileRequest {
            path: f.path.clone(),
            mode: 0o600,
            create_parents: true,
            contents: contents.clone(),
        };
        let written = ctx
            .vms
            .call(vm, Operation::WriteFile(write), FILE_WAIT)
            .await
            .map_err(|e| {
                DeliveryError::Failed(format!("cannot write {} in CLI VM {vm}: {e}", f.path))
            })?;
        // The write's reply carries the hash of what the agent wrote: the
        // credential is never read back out of the VM to check it.
        let same = match written {
            Reply::FileWritten(w) => w.sha256 == sha_hex(contents.expose()),
            _ => false,
        };
        if !same {
            return Err(DeliveryError::Failed(format!(
                "{} in CLI VM {vm}: the agent did not confirm writing it as sent",
                f.path
            )));
        }
    }
    Ok(())
}

/// How long one file operation in the CLI VM may take.
const FILE_WAIT: Duration = Duration::from_secs(20);

/// The person's own copy of a file shared with their settings, read
/// before the credential's keys are merged into it: missing is `None`.
async fn read_persons_copy(
    ctx: &Inner,
    vm: &str,
    path: &str,
) -> Result<Option<SecretBytes>, DeliveryError> {
    let req = ReadFileRequest {
        path: path.into(),
        max_bytes: MAX_FILE_BYTES,
    };
    match ctx.vms.call(vm, Operation::ReadFile(req), FILE_WAIT).await {
        Ok(Reply::File(back)) => Ok(Some(back.contents)),
        Ok(_) => Err(DeliveryError::Failed(
            "the agent answered ReadFile with the wrong reply".into(),
        )),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(DeliveryError::Failed(format!(
            "cannot read {path} in CLI VM {vm}: {e}"
        ))),
    }
}

/// Brings a user's stored credentials into each CLI VM of theirs that
/// becomes ready ([`bring`]). Runs until airlockd shuts down.
pub(super) async fn watch_cli_vms(ctx: std::sync::Arc<Inner>) {
    let mut states = ctx.vms.subscribe_states();
    // CLI VMs served since they became ready: a ready VM's view changes
    // for other reasons too, and each change is no reason to look again.
    // Only live VMs are in it (a VM leaves it with its readiness).
    let mut served: HashSet<String> = HashSet::new();
    loop {
        let changed = tokio::select! {
            r = states.recv() => match r {
                Ok(v) => vec![v],
                // Changes were missed (a burst of VMs): every VM as it is
                // now, so that no CLI VM's readiness goes unnoticed.
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "VM changes missed; looking at every VM");
                    ctx.vms.list()
                }
                Err(RecvError::Closed) => return,
            },
            _ = ctx.shutdown.cancelled() => return,
        };
        for view in changed {
            if view.kind != VmKind::Cli || view.state != VmState::Ready {
                served.remove(&view.id);
                continue;
            }
            let Some(user) = view.owner.as_deref() else {
                continue;
            };
            // A failure leaves it unserved: the next change of the VM
            // tries again.
            if !served.contains(&view.id) && deliver_pending(&ctx, user, &view.id).await {
                served.insert(view.id.clone());
            }
        }
    }
}

/// Brings each provider's newest stored credential of `user` into CLI VM
/// `vm`; false when one could not be.
async fn deliver_pending(ctx: &Inner, user: &str, vm: &str) -> bool {
    let records = match ctx.store.newest(user).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(user_id = user, error = %e, "cannot list credentials to deliver");
            return false;
        }
    };
    let (mut all, mut written) = (true, 0);
    for record in records {
        let Some(_claim) = ctx.delivering.take(&record.id) else {
            continue;
        };
        match bring(ctx, vm, &record).await {
            Ok(false) => {}
            Ok(true) => {
                written += 1;
                crate::audit::credential_delivered(user, &record.provider, &record.id, vm);
                // Only a session whose own delivery is over, waiting for a
                // CLI VM: one still concluding (its browser VM going)
                // completes itself.
                if let Some(h) = ctx.session_of_credential(&record.id) {
                    let pending = h.delivery_pending.load(Ordering::Acquire);
                    if pending && h.view().state == SessionState::Stored {
                        completed(ctx, &h, vm).await;
                    }
                }
            }
            Err(e) => {
                all = false;
                tracing::warn!(user_id = user, vm_id = vm, error = %e, "cannot deliver a stored credential");
            }
        }
    }
    if all {
        tracing::info!(
            user_id = user,
            vm_id = vm,
            written,
            "the CLI VM has the user's newest credentials"
        );
    }
    all
}

/// Brings `record` into CLI VM `vm`: all of it when it was never
/// delivered; else only the files the VM lacks (a new VM without the
/// user's home disk lacks them all). A file the VM has stays as it is: the
/// CLI may have refreshed its token there since, and the stored copy would
/// be older. True when something was written.
async fn bring(
    ctx: &Inner,
    vm: &str,
    record: &crate::store::StoredRecord,
) -> Result<bool, DeliveryError> {
    let (_, mut bundle) = ctx
        .store
        .get(&record.id)
        .await
        .map_err(|e| DeliveryError::Failed(e.to_string()))?;
    if record.delivered_at_ms.is_some() {
        let mut missing = Vec::new();
        for f in std::mem::take(&mut bundle.files) {
            if !exists(ctx, vm, &f.path).await? {
                missing.push(f);
            }
        }
        bundle.files = missing;
    }
    if bundle.files.is_empty() {
        return Ok(false);
    }
    write_and_verify(ctx, vm, &bundle, &merged_paths(ctx, &record.provider)).await?;
    ctx.store
        .mark_delivered(&record.id, vm)
        .await
        .map_err(|e| DeliveryError::Failed(e.to_string()))?;
    Ok(true)
}

/// Whether `path` exists in CLI VM `vm`, asked without reading it: a read
/// of at most 0 bytes is refused as too large for any file with contents,
/// so nothing of a credential leaves the VM.
async fn exists(ctx: &Inner, vm: &str, path: &str) -> Result<bool, DeliveryError> {
    let probe = ReadFileRequest {
        path: path.into(),
        max_bytes: 0,
    };
    match ctx
        .vms
        .call(vm, Operation::ReadFile(probe), FILE_WAIT)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(VmError::Agent {
            source: AgentError::Guest(reply),
            ..
        }) if reply.code == ErrorCode::TooLarge => Ok(true),
        Err(e) => Err(DeliveryError::Failed(format!(
            "cannot look for {path} in CLI VM {vm}: {e}"
        ))),
    }
}
