//! Logins of the browser role: at most one at a time per VM (a browser VM
//! serves one session), each run as a task that the host can cancel.
//! Owned by [`crate::agent::Agent`].

pub mod opener;
pub mod pty;
pub mod session;
pub mod text;
pub mod watch;

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use airlock_proto::{ErrorCode, ErrorReply, LoginSpec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use session::LoginCtx;

/// The logins of this agent.
#[derive(Debug)]
pub struct Logins {
    ctx: LoginCtx,
    running: std::sync::Arc<Mutex<HashMap<String, CancellationToken>>>,
    /// Set by the first login: a VM that ran one is no snapshot template.
    started: std::sync::atomic::AtomicBool,
    tracker: TaskTracker,
}

impl Logins {
    /// No logins yet.
    pub fn new(ctx: LoginCtx) -> Self {
        Self {
            ctx,
            running: Default::default(),
            started: Default::default(),
            tracker: TaskTracker::new(),
        }
    }

    /// Starts a login; progress arrives as events.
    pub fn start(&self, spec: LoginSpec) -> Result<(), ErrorReply> {
        spec.validate()
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        let cancel = CancellationToken::new();
        {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(other) = running.keys().next() {
                return Err(ErrorReply::new(
                    ErrorCode::Busy,
                    format!("login {other} is already running"),
                ));
            }
            running.insert(spec.session_id.clone(), cancel.clone());
        }
        self.started
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (ctx, running, id) = (
            self.ctx.clone(),
            self.running.clone(),
            spec.session_id.clone(),
        );
        tracing::info!(session_id = %id, provider = %spec.provider, "login starting");
        self.tracker.spawn(async move {
            session::run(spec, ctx, cancel).await;
            running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
        Ok(())
    }

    /// True once any login was started here.
    pub fn any_started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops a login (its CLI is killed and its files removed); false if
    /// no such login runs.
    pub fn cancel(&self, session_id: &str) -> bool {
        match self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(session_id)
        {
            Some(c) => {
                c.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every login and waits for them to clean up.
    pub async fn shutdown(&self) {
        for c in self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            c.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}
