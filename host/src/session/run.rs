//! The life of one login session, as one task: boot the browser VM, start
//! Chromium, start the provider's login and the screen streamer, follow the
//! agent's events until the credential arrives (or the person denies, the
//! CLI dies, time runs out, or the session is cancelled), store it, stop
//! the live view, destroy the browser VM (keeping its logs if the session
//! failed), and deliver. Live-view events go to the session's hub. Spawned
//! by [`super::Sessions::start`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_proto::{
    BrowserEvent, BrowserSpec, CapturedCredential, Event, LoginStep, Operation, Reply,
};
use tokio::sync::mpsc;

use super::delivery;
use super::{Inner, SessionHandle, SessionState};
use crate::providers::Provider;
use crate::store::{CredentialBundle, CredentialFile};
use crate::vm::{CreateVm, VmKind, VmState};

/// How a session's login part ended.
enum End {
    /// The credential is stored (delivery follows).
    Stored {
        credential_id: String,
        bundle: CredentialBundle,
    },
    Failed(String),
    Cancelled,
    Expired(String),
}

/// Runs the session to its end.
pub(super) async fn run(ctx: Arc<Inner>, h: Arc<SessionHandle>, provider: Provider) {
    let id = h.view().session_id;
    let (tx, mut events) = mpsc::channel(64);
    let end = drive(&ctx, &h, &provider, tx, &mut events).await;
    end_live_view(&h, &end, &mut events).await;
    release_browser(&ctx, &h, &end).await;
    match end {
        End::Stored {
            credential_id,
            bundle,
        } => {
            let user = h.view().user_id;
            delivery::deliver_for_session(&ctx, &h, &user, &credential_id, &bundle).await;
        }
        End::Failed(reason) => finish(&ctx, &h, super::SessionState::Failed, reason),
        End::Cancelled => finish(
            &ctx,
            &h,
            SessionState::Cancelled,
            "cancelled on request".into(),
        ),
        End::Expired(reason) => finish(&ctx, &h, SessionState::Expired, reason),
    }
    tracing::info!(session_id = %id, state = ?h.view().state, "login session ended");
}

/// Stops the streamer (its events still drained, so the agent's
/// connection never stalls on a full queue) and closes the viewers'
/// sockets with how the session ended.
async fn end_live_view(h: &SessionHandle, end: &End, events: &mut mpsc::Receiver<Event>) {
    let stop = h.hub.stop_stream();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            e = events.recv() => if e.is_none() { stop.await; break },
        }
    }
    let reason = match end {
        End::Stored { .. } => "the login is done: the credential was captured".to_string(),
        End::Failed(why) => format!("the login failed: {why}"),
        End::Cancelled => "the session was cancelled".to_string(),
        End::Expired(why) => why.clone(),
    };
    h.hub.close(&reason);
}

fn finish(ctx: &Inner, h: &SessionHandle, state: SessionState, reason: String) {
    h.view.send_modify(|v| v.error = Some(reason.clone()));
    ctx.record(h, Some(state), "state", Some(reason));
    ctx.ended(&h.view().session_id);
}

/// Destroys the browser VM; keeps its logs when the session failed.
async fn release_browser(ctx: &Inner, h: &SessionHandle, end: &End) {
    let Some(vm) = h.view().browser_vm_id else {
        return;
    };
    let result = match end {
        End::Failed(reason) => {
            ctx.vms
                .delete_keeping_logs(&vm, &format!("login session failed: {reason}"))
                .await
        }
        _ => ctx.vms.delete(&vm).await,
    };
    if let Err(e) = result {
        tracing::warn!(vm_id = %vm, error = %e, "cannot delete the browser VM");
    }
    h.view.send_modify(|v| v.browser_vm_id = None);
}

async fn drive(
    ctx: &Inner,
    h: &SessionHandle,
    provider: &Provider,
    tx: mpsc::Sender<Event>,
    events: &mut mpsc::Receiver<Event>,
) -> End {
    let started = Instant::now();
    let browser_deadline = started + Duration::from_millis(ctx.cfg.browser_timeout_ms);
    let user_deadline = started + Duration::from_millis(ctx.cfg.user_timeout_ms);
    let vm = tokio::select! {
        r = start_browser(ctx, h, tx, browser_deadline) => match r {
            Ok(vm) => vm,
            Err(end) => return end,
        },
        _ = h.cancel.cancelled() => return End::Cancelled,
        _ = tokio::time::sleep_until(browser_deadline.into()) => {
            return End::Failed(format!("the browser did not start within {} s", ctx.cfg.browser_timeout_ms / 1000));
        }
    };
    let view = h.view();
    let spec = provider.login_spec(&view.provider, &view.session_id, &ctx.defaults);
    if let Err(e) = ctx
        .vms
        .call(&vm, Operation::StartLogin(spec), Duration::from_secs(15))
        .await
    {
        return End::Failed(format!(
            "cannot start the {} login: {e}",
            provider.display_name
        ));
    }
    follow(ctx, h, provider, &vm, events, user_deadline).await
}

/// Boots the browser VM and starts Chromium in it; returns the VM id.
async fn start_browser(
    ctx: &Inner,
    h: &SessionHandle,
    tx: mpsc::Sender<Event>,
    deadline: Instant,
) -> Result<String, End> {
    ctx.record(h, Some(SessionState::Booting), "state", None);
    let req = CreateVm {
        kind: VmKind::Browser,
        user_id: Some(h.view().user_id),
        memory_mib: None,
        vcpus: None,
    };
    let vm = ctx
        .vms
        .create_with(req, Some(tx))
        .map_err(|e| End::Failed(format!("cannot create the browser VM: {e}")))?;
    h.view
        .send_modify(|v| v.browser_vm_id = Some(vm.id.clone()));
    // After the browser VM, so that one never loses the last VM slot to it.
    if ctx.cfg.prestart_cli_vm {
        let view = h.view();
        if let Err(e) = delivery::ensure_cli_vm(ctx, &view.user_id) {
            // Not fatal: delivery tries again, and keeps the credential
            // stored if it still cannot.
            tracing::warn!(session_id = %view.session_id, error = %e, "cannot start the user's CLI VM ahead of delivery");
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let settled = ctx
        .vms
        .wait_for(
            &vm.id,
            &[VmState::Ready, VmState::Failed, VmState::Stopped],
            left,
        )
        .await
        .map_err(|e| End::Failed(e.to_string()))?;
    if settled.state != VmState::Ready {
        let why = settled
            .error
            .unwrap_or_else(|| format!("it is still {:?}", settled.state));
        return Err(End::Failed(format!("the browser VM did not start: {why}")));
    }
    let spec = BrowserSpec {
        width: ctx.cfg.screen_width,
        height: ctx.cfg.screen_height,
        proxy: ctx.cfg.proxy.clone(),
        chromium: Some(ctx.cfg.chromium.clone()),
        extra_args: ctx.cfg.chromium_args.clone(),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    match ctx
        .vms
        .call(&vm.id, Operation::StartBrowser(spec), left)
        .await
    {
        Ok(Reply::BrowserStarted(info)) => {
            let detail = format!("{} on display {}", info.chromium_version, info.display);
            ctx.record(h, Some(SessionState::BrowserReady), "state", Some(detail));
            Ok(vm.id)
        }
        Ok(_) => Err(End::Failed(
            "the agent answered StartBrowser with the wrong reply".into(),
        )),
        Err(e) => Err(End::Failed(format!("Chromium did not start: {e}"))),
    }
}

/// Follows the login until it ends.
async fn follow(
    ctx: &Inner,
    h: &SessionHandle,
    provider: &Provider,
    vm: &str,
    events: &mut mpsc::Receiver<Event>,
    deadline: Instant,
) -> End {
    let mut denied: Option<String> = None;
    let mut vm_states = ctx.vms.subscribe_states();
    // The streamer starts beside the login, so neither waits for the other
    // and the agent's events keep flowing meanwhile.
    let hub = h.hub.clone();
    let stream_start = hub.start_stream(vm);
    tokio::pin!(stream_start);
    let mut starting = true;
    loop {
        let event = tokio::select! {
            r = &mut stream_start, if starting => {
                starting = false;
                stream_started(ctx, h, r);
                continue;
            }
            e = events.recv() => match e {
                Some(e) => e,
                None => return End::Failed("the browser VM's event stream ended".into()),
            },
            s = vm_states.recv() => {
                if let Ok(v) = s {
                    if v.id == vm && v.state == VmState::Failed {
                        return End::Failed(format!("the browser VM failed: {}", v.error.unwrap_or_default()));
                    }
                }
                continue;
            }
            _ = h.cancel.cancelled() => {
                let session_id = h.view().session_id;
                let _ = ctx.vms.call(vm, Operation::CancelLogin { session_id }, Duration::from_secs(5)).await;
                return End::Cancelled;
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                return End::Expired(format!(
                    "nobody finished the login within {} minutes; start a new session to try again",
                    ctx.cfg.user_timeout_ms / 60_000
                ));
            }
        };
        match event {
            Event::Login(e) => {
                if let Some(end) = on_login_step(ctx, h, provider, e.step, &mut denied) {
                    return end;
                }
            }
            Event::Credential(c) => return store(ctx, h, provider, c).await,
            Event::Browser(BrowserEvent::Crashed {
                process,
                status,
                restarts,
            }) => {
                let detail = format!("{process} crashed ({status}); restart {restarts}");
                ctx.record(h, None, "browserCrashed", Some(detail));
            }
            Event::Browser(_) => {}
            Event::Stream(e) => {
                if let Some((event, detail)) = h.hub.on_event(e) {
                    ctx.record(h, None, event, detail);
                }
            }
            _ => {}
        }
    }
}

/// Records how starting the streamer went. Its failure is not the login's:
/// the person can still act through input and screenshots.
fn stream_started(ctx: &Inner, h: &SessionHandle, result: Result<(), String>) {
    let c = h.hub.config();
    match result {
        Ok(()) => ctx.record(
            h,
            None,
            "streamStarted",
            Some(format!("{} fps, {} kbit/s", c.framerate, c.bitrate_kbps)),
        ),
        Err(why) => {
            tracing::warn!(session_id = %h.view().session_id, error = %why, "the live view is unavailable");
            ctx.record(h, None, "streamUnavailable", Some(why));
        }
    }
}

/// Applies one login step; `Some` when it ends the session.
fn on_login_step(
    ctx: &Inner,
    h: &SessionHandle,
    provider: &Provider,
    step: LoginStep,
    denied: &mut Option<String>,
) -> Option<End> {
    match step {
        LoginStep::Started => ctx.record(h, None, "loginStarted", Some(provider.command.join(" "))),
        LoginStep::UrlOpened { location, via } => ctx.record(
            h,
            None,
            "urlOpened",
            Some(format!("{location} (via {via})")),
        ),
        LoginStep::WaitingForUser => ctx.record(h, Some(SessionState::AwaitingUser), "state", None),
        LoginStep::CodeEntered => ctx.record(h, None, "codeEntered", None),
        LoginStep::PageLoaded { location } => ctx.record(h, None, "pageLoaded", Some(location)),
        LoginStep::CredentialCaptured => {}
        LoginStep::Denied { error, description } => {
            let why = match description {
                Some(d) => format!("{error}: {d}"),
                None => error,
            };
            ctx.record(h, None, "denied", Some(why.clone()));
            *denied = Some(why);
        }
        LoginStep::CliExited {
            exit_code,
            signal,
            output_tail,
        } => {
            let status = match (exit_code, signal) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "an unknown status".into(),
            };
            ctx.record(h, None, "cliExited", Some(status.clone()));
            return Some(End::Failed(match denied.take() {
                Some(why) => format!("the user denied access on the consent page ({why}); {} then exited with {status}", provider.display_name),
                None => format!(
                    "{} exited with {status} before logging in; its last output: {}",
                    provider.display_name,
                    last_line(&output_tail)
                ),
            }));
        }
        LoginStep::Failed { reason } => return Some(End::Failed(reason)),
    }
    None
}

/// Encrypts and stores the credential.
async fn store(ctx: &Inner, h: &SessionHandle, provider: &Provider, c: CapturedCredential) -> End {
    if let Err(e) = c.validate(provider.credentials.len()) {
        return End::Failed(format!("the browser VM sent an invalid credential: {e}"));
    }
    ctx.record(
        h,
        Some(SessionState::Captured),
        "state",
        Some(format!("{} file(s)", c.files.len())),
    );
    let files = c
        .files
        .into_iter()
        .map(|f| CredentialFile {
            path: provider.credentials[f.index as usize].deliver_to.clone(),
            mode: 0o600,
            contents: f.contents,
        })
        .collect();
    let bundle = CredentialBundle { files };
    let view = h.view();
    match ctx.store.put(&view.user_id, &view.provider, &bundle).await {
        Ok(record) => {
            h.view
                .send_modify(|v| v.credential_id = Some(record.id.clone()));
            ctx.record(
                h,
                Some(SessionState::Stored),
                "state",
                Some(format!("encrypted with key {}", record.key_id)),
            );
            End::Stored {
                credential_id: record.id,
                bundle,
            }
        }
        Err(e) => End::Failed(format!("cannot store the credential: {e}")),
    }
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::trim)
        .unwrap_or("(nothing)")
}
