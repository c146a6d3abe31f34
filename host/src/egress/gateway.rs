//! One browser VM's egress gateway: accepts the agent's streams on the
//! VM's `<uds>_<egress port>` socket, reads each stream's one request
//! frame (bounded in size and time), decides with the VM's policy,
//! connects, answers, and then copies bytes both ways until either side
//! closes or the VM stops. Refusals are counted and logged at a limited
//! rate (a hostile page can cause as many as it likes). Spawned by the VM
//! supervisor; every task ends when the VM's cancel token fires.

use std::sync::Arc;
use std::time::Duration;

use airlock_proto::egress::{EgressOpen, EgressReply, MAX_EGRESS_FRAME_BYTES};
use airlock_proto::frame::{self, HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connect::connect;
use super::policy::CurrentPolicy;
use super::{Egress, EgressStats};

/// Time a stream gets to name its destination.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One VM's gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The daemon's egress settings (routes, upstream proxies, limits).
    pub egress: Arc<Egress>,
    /// What this VM may reach (read per stream: it changes when a
    /// session takes a VM from the warm pool).
    pub policy: Arc<CurrentPolicy>,
    /// Its counters.
    pub stats: Arc<EgressStats>,
    /// For logs.
    pub vm_id: String,
}

impl Gateway {
    /// Accepts streams until `cancel` fires; every stream's task is on
    /// `tracker`.
    pub fn spawn(self, listener: UnixListener, tracker: &TaskTracker, cancel: CancellationToken) {
        let tasks = tracker.clone();
        tracker.spawn(async move {
            let slots = Arc::new(Semaphore::new(self.egress.cfg.max_streams_per_vm));
            loop {
                let stream = tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => {
                            // Out of descriptors: back off rather than spin.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    self.refuse_silently(stream, "too many streams at once");
                    continue;
                };
                let (gw, cancel) = (self.clone(), cancel.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        _ = gw.serve(stream) => {}
                        _ = cancel.cancelled() => {}
                    }
                    drop(slot);
                });
            }
        });
    }

    fn refuse_silently(&self, stream: UnixStream, why: &str) {
        self.stats
            .refused(&self.vm_id, why, self.egress.cfg.log_refusals_per_min);
        drop(stream);
    }

    async fn serve(&self, mut s: UnixStream) {
        let open = match tokio::time::timeout(OPEN_TIMEOUT, read_open(&mut s)).await {
            Ok(Ok(open)) => open,
            Ok(Err(why)) => return self.refuse(&mut s, None, why).await,
            Err(_) => return self.refuse(&mut s, None, "no request in time".into()).await,
        };
        let policy = self.policy.get();
        let target = match policy.decide(&self.egress.routes, &open) {
            Ok(t) => t,
            Err(why) => return self.refuse(&mut s, Some(&open), why).await,
        };
        let upstream = self.egress.upstream_for(policy.user.as_deref());
        let timeout = Duration::from_millis(self.egress.cfg.connect_timeout_ms);
        let mut remote = match connect(&target, upstream, &self.egress.local, timeout).await {
            Ok(r) => r,
            Err(why) => return self.refuse(&mut s, Some(&open), why).await,
        };
        if write_reply(&mut s, &EgressReply::Connected).await.is_err() {
            return;
        }
        self.stats.opened();
        tracing::debug!(vm_id = %self.vm_id, client = open.client.as_str(), host = %open.host, port = open.port, "egress stream open");
        if let Ok((out, back)) = tokio::io::copy_bidirectional(&mut s, &mut remote).await {
            self.stats.bytes(out, back);
        }
    }

    async fn refuse(&self, s: &mut UnixStream, open: Option<&EgressOpen>, why: String) {
        let what = match open {
            Some(o) => format!(
                "{} stream to {}:{} refused: {why}",
                o.client.as_str(),
                o.host,
                o.port
            ),
            None => format!("stream refused: {why}"),
        };
        self.stats
            .refused(&self.vm_id, &what, self.egress.cfg.log_refusals_per_min);
        let mut reason = why;
        if reason.len() > airlock_proto::egress::MAX_REASON_BYTES {
            let mut cut = airlock_proto::egress::MAX_REASON_BYTES;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let _ = write_reply(s, &EgressReply::Refused { reason }).await;
    }
}

/// Reads exactly one request frame: nothing of what follows is consumed.
async fn read_open(s: &mut UnixStream) -> Result<EgressOpen, String> {
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    let len = frame::parse_header(header, MAX_EGRESS_FRAME_BYTES).map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    let open: EgressOpen = frame::decode_payload(&payload).map_err(|e| e.to_string())?;
    open.validate().map_err(|e| e.to_string())?;
    Ok(open)
}

async fn write_reply(s: &mut UnixStream, reply: &EgressReply) -> std::io::Result<()> {
    let bytes = frame::encode(reply, MAX_EGRESS_FRAME_BYTES).map_err(std::io::Error::other)?;
    s.write_all(&bytes).await
}
