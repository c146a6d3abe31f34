//! Accepts guest connections on a VM's `<uds>_<port>` socket and runs the
//! handshake on each, reporting agents that are ready (or refused) to the
//! VM supervisor. Bounded: a guest that opens many connections and never
//! speaks can hold at most a few handshake slots.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::guestlog::GuestLog;
use super::handshake::{handshake, Accepted, HandshakeConfig, HandshakeError};

/// Handshakes in progress at once per VM; more connections are dropped.
const MAX_HANDSHAKES: usize = 4;

/// What the acceptor reports to the supervisor.
#[derive(Debug)]
pub enum AgentEvent {
    /// An agent completed the handshake.
    Connected(Box<Accepted>),
    /// An agent was refused (stale or incompatible); the VM is unusable.
    Refused(String),
}

/// Runs the accept loop on `tracker` until `cancel` fires.
pub fn spawn_acceptor(
    listener: UnixListener,
    cfg: Arc<HandshakeConfig>,
    log: Arc<GuestLog>,
    events: mpsc::Sender<AgentEvent>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let tasks = tracker.clone();
    tracker.spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors or similar: back off instead of spinning.
                        log.note(&format!("cannot accept an agent connection: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                log.note("dropped an agent connection: too many handshakes in progress");
                continue;
            };
            let (cfg, log, events, cancel, inner_tasks) = (
                cfg.clone(),
                log.clone(),
                events.clone(),
                cancel.clone(),
                tasks.clone(),
            );
            tasks.spawn(async move {
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = handshake(stream, &cfg, log.clone(), &inner_tasks, &cancel) => r,
                };
                drop(slot);
                let event = match result {
                    Ok(accepted) => AgentEvent::Connected(Box::new(accepted)),
                    Err(HandshakeError::Refused(reason)) => {
                        log.note(&format!("refused the agent: {reason}"));
                        AgentEvent::Refused(reason)
                    }
                    Err(e) => {
                        log.note(&format!("dropped an agent connection: {e}"));
                        return;
                    }
                };
                let _ = events.send(event).await;
            });
        }
    });
}
