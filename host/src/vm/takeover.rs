//! Taking over the VMs an earlier airlockd left running: each found by
//! [`adopt::scan`] gets a handle and a supervisor that watches its
//! processes instead of launching them; those that cannot be taken over
//! are cleaned up with the reason. Also keeps each VM's record (what a
//! later airlockd needs) in step with its view. Called at startup through
//! [`crate::session::Sessions::resume`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use airlock_proto::Event;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::backend::Boot;
use super::{
    adopt, layout, supervisor, Launch, Takeover, Timings, VmHandle, VmManager, VmState, VmView,
};
use crate::agent::EventSink;
use crate::egress::policy::CurrentPolicy;
use crate::egress::EgressStats;

impl VmManager {
    /// Takes over the VMs an earlier airlockd left running (found by
    /// [`adopt::scan`]); the events of a browser VM whose session goes on
    /// go to `sinks[id]`. Cleans up those that cannot be taken over.
    /// Returns the ids taken over.
    pub fn adopt(
        &self,
        found: Vec<adopt::Found>,
        sinks: &HashMap<String, mpsc::Sender<Event>>,
    ) -> Vec<String> {
        let failed_dir = self.inner.config.paths.state_dir.join("failed-vms");
        let mut taken = Vec::new();
        for f in found {
            match f {
                adopt::Found::Lost { dir, why } => {
                    layout::clean_lost(&dir, &failed_dir, &why);
                }
                adopt::Found::Running(record, procs) => {
                    let sink = sinks.get(&record.id).cloned();
                    taken.push(record.id.clone());
                    self.take_over(*record, procs, sink);
                }
            }
        }
        self.inner.backend.release_others(&taken);
        if let Some(b) = &self.inner.browser_backend {
            b.release_others(&taken);
        }
        taken
    }

    fn take_over(
        &self,
        r: adopt::VmRecord,
        procs: Vec<adopt::Adopted>,
        sink: Option<mpsc::Sender<Event>>,
    ) {
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let view = VmView {
            id: r.id.clone(),
            kind: r.kind,
            origin: r.origin,
            pooled: false,
            state: VmState::Booting,
            error: None,
            owner: r.owner.clone(),
            agent_version: None,
            agent_build_id: None,
            memory_mib: r.memory_mib,
            vcpus: r.vcpus,
            accel: r.accel.clone(),
            vmm_pid: None,
            created_at: r.created_at.clone(),
            timings: Timings::default(),
            logs_dir: None,
            egress: None,
            out_of_memory: None,
            adopted_at: Some(now),
        };
        let egress = r.egress.clone().map(|p| {
            (
                Arc::new(CurrentPolicy::new(p)),
                Arc::new(EgressStats::default()),
            )
        });
        let handle = Arc::new(VmHandle {
            view: watch::channel(view).0,
            agent: watch::channel(None).0,
            events: Arc::new(EventSink::new(sink)),
            keep_logs: Mutex::new(None),
            egress,
            saving: Default::default(),
            record: Mutex::new(Some(r.clone())),
            stop: self.inner.shutdown.child_token(),
            finished: CancellationToken::new(),
        });
        self.vms().insert(r.id.clone(), handle.clone());
        tracing::info!(vm_id = %r.id, kind = ?r.kind, owner = ?r.owner, "taking over a VM an earlier airlockd left running");
        let launch = Launch {
            boot: Boot::Initramfs,
            origin: r.origin,
            takeover: Some(Takeover {
                image: r.image,
                procs,
                agent_port: r.agent_port,
            }),
        };
        let sv = supervisor::Supervisor::new(self.inner.clone(), handle, launch, Instant::now());
        self.inner.tracker.spawn(sv.run());
    }
}

impl VmHandle {
    /// Writes its record into `dir` (a failure only costs the takeover
    /// after a restart, so it is logged, not fatal).
    pub(super) fn save_record(&self, dir: &layout::VmDir) {
        let record = self
            .record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(r) = record {
            if let Err(e) = r.write(dir) {
                tracing::warn!(vm_id = %r.id, error = %e, "cannot write the VM's record: it will not survive a restart of airlockd");
            }
        }
    }

    /// Brings its record in line with its view and policy (a VM taken
    /// from the warm pool gets an owner and a session's policy).
    pub(super) fn refresh_record(&self, run_dir: &std::path::Path) {
        let view = self.view.borrow().clone();
        {
            let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(r) = record.as_mut() else { return };
            r.owner = view.owner;
            r.pooled = view.pooled;
            r.egress = self.egress.as_ref().map(|(p, _)| (*p.get()).clone());
        }
        self.save_record(&layout::VmDir::of(run_dir, &view.id));
    }
}
