//! What a restarted airlockd does with the sessions an earlier one saved
//! ([`super::persist`]) and the VMs it left running
//! ([`crate::vm::adopt`]): a login waiting for the person (or with its
//! credential captured) goes on in its browser VM, taken over; a stored
//! credential waiting for delivery is delivered; a login caught while its
//! browser was still starting, or whose browser VM is gone, ends with a
//! reason a person can act on; ended sessions are listed again. Browser
//! VMs no session goes on with are stopped. Called once at startup by
//! [`super::Sessions::resume`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use super::{delivery, persist, run, Inner, SessionHandle, SessionState, SessionView};
use crate::vm::adopt::Found;
use crate::vm::VmKind;

/// Ended sessions are forgotten from the database after this long.
const RETAIN_ENDED_MS: i64 = 30 * 24 * 3600 * 1000;
/// Queue of a resumed session's events (as a new session's).
const EVENTS: usize = 64;

/// What to do with one saved session.
enum Plan {
    /// Listed as it ended.
    Ended,
    /// Its credential is stored: deliver it.
    Deliver,
    /// Its login goes on in this browser VM.
    CarryOn(String),
    /// It ends with this reason.
    End(String),
}

fn plan(view: &SessionView, running: &HashMap<String, VmKind>) -> Plan {
    let state = view.state;
    if state.is_final() {
        return Plan::Ended;
    }
    if state == SessionState::Stored || state == SessionState::Delivered {
        return Plan::Deliver;
    }
    let vm = view
        .browser_vm_id
        .as_ref()
        .filter(|id| running.get(*id) == Some(&VmKind::Browser));
    match (state, vm) {
        (SessionState::AwaitingUser | SessionState::Captured, Some(vm)) => {
            Plan::CarryOn(vm.clone())
        }
        (SessionState::AwaitingUser | SessionState::Captured, None) => Plan::End(
            "airlockd restarted, and this login's browser VM did not survive it; start a new login"
                .into(),
        ),
        _ => Plan::End(
            "airlockd restarted while this login's browser was still starting; start a new login"
                .into(),
        ),
    }
}

/// Takes over the VMs in `found` and the saved sessions.
pub(super) async fn resume(ctx: &Arc<Inner>, found: Vec<Found>) {
    let running: HashMap<String, VmKind> = found
        .iter()
        .filter_map(|f| match f {
            Found::Running(r, _) => Some((r.id.clone(), r.kind)),
            Found::Lost { .. } => None,
        })
        .collect();
    let rows = match ctx
        .store
        .load_sessions(ctx.cfg.ended_sessions_keep, RETAIN_ENDED_MS)
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "cannot load the saved login sessions: those in progress are lost to this restart");
            Vec::new()
        }
    };
    let mut sinks = HashMap::new();
    let mut carry_on = Vec::new();
    let mut deliver = Vec::new();
    let mut end = Vec::new();
    for row in rows {
        let (view, tokens) = match persist::view_of(&row) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(session_id = %row.id, error = %e, "a saved login session does not parse; skipped");
                continue;
            }
        };
        let plan = plan(&view, &running);
        let Some(h) = ctx.reopen(view) else { continue };
        // The person's viewer links from before the restart open it still.
        h.hub.restore_tokens(&tokens);
        match plan {
            Plan::Ended => {
                let why = h.view().error.unwrap_or_else(|| "the login is over".into());
                h.hub.close(&why);
                ctx.ended(&h.view().session_id);
            }
            Plan::Deliver => deliver.push(h),
            Plan::CarryOn(vm) => {
                let (tx, rx) = mpsc::channel(EVENTS);
                sinks.insert(vm.clone(), tx);
                carry_on.push((h, vm, rx));
            }
            Plan::End(why) => end.push((h, why)),
        }
    }
    let taken = ctx.vms.adopt(found, &sinks);
    stop_unclaimed(ctx, &taken, &sinks);
    tracing::info!(
        vms = taken.len(),
        carried_on = carry_on.len(),
        delivering = deliver.len(),
        ended = end.len(),
        "took over what the earlier airlockd left"
    );
    for (h, why) in end {
        h.hub.close(&why);
        run::finish(ctx, &h, SessionState::Failed, why).await;
    }
    for h in deliver {
        ctx.tracker.spawn(resume_delivery(ctx.clone(), h));
    }
    for (h, vm, rx) in carry_on {
        let name = h.view().provider;
        match ctx.providers.get(&name).cloned() {
            Some(provider) => {
                ctx.tracker
                    .spawn(run::resume(ctx.clone(), h, provider, vm, rx));
            }
            None => {
                let why = format!("airlockd restarted without the provider {name:?}; start a new login with a provider it offers");
                h.hub.close(&why);
                run::finish(ctx, &h, SessionState::Failed, why).await;
                let vms = ctx.vms.clone();
                ctx.tracker.spawn(async move { vms.delete(&vm).await });
            }
        }
    }
}

/// Stops the browser VMs taken over that no session goes on with (a
/// browser VM exists only for its login).
fn stop_unclaimed<T>(ctx: &Inner, taken: &[String], sinks: &HashMap<String, T>) {
    for id in taken {
        let browser = ctx.vms.get(id).is_ok_and(|v| v.kind == VmKind::Browser);
        if browser && !sinks.contains_key(id) {
            tracing::info!(vm_id = %id, "stopping a browser VM taken over: no login goes on in it");
            let (vms, id) = (ctx.vms.clone(), id.clone());
            ctx.tracker.spawn(async move { vms.delete(&id).await });
        }
    }
}

/// Delivers the stored credential of a session saved while waiting for
/// its delivery.
async fn resume_delivery(ctx: Arc<Inner>, h: Arc<SessionHandle>) {
    let view = h.view();
    let Some(credential_id) = view.credential_id.clone() else {
        let why =
            "airlockd restarted and this session names no stored credential; start a new login";
        return run::finish(&ctx, &h, SessionState::Failed, why.into()).await;
    };
    match ctx.store.get(&credential_id).await {
        Ok((_, bundle)) => {
            ctx.record(
                &h,
                None,
                "resumed",
                Some("airlockd restarted; delivering the stored credential".into()),
            );
            delivery::deliver_for_session(&ctx, &h, &view.user_id, &credential_id, &bundle).await;
        }
        Err(e) => {
            let why = format!("airlockd restarted and cannot read the stored credential: {e}");
            run::finish(&ctx, &h, SessionState::Failed, why).await;
        }
    }
}

impl Inner {
    /// A handle for a saved session, listed again; `None` when its live
    /// view cannot be set up (logged).
    fn reopen(&self, view: SessionView) -> Option<Arc<SessionHandle>> {
        let id = view.session_id.clone();
        let left = humantime::parse_rfc3339(&view.expires_at)
            .ok()
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
            .max(Duration::from_secs(60));
        let hub = match self.live.open(&id, &view.user_id, left) {
            Ok(hub) => hub,
            Err(e) => {
                tracing::warn!(session_id = %id, error = %e, "cannot list a saved login session again");
                return None;
            }
        };
        let handle = Arc::new(SessionHandle {
            view: watch::channel(view).0,
            started: std::time::Instant::now(),
            cancel: self.shutdown.child_token(),
            hub,
            delivery_pending: Default::default(),
        });
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, handle.clone());
        Some(handle)
    }
}
