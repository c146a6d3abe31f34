//! The life of one login session, as one task: boot the browser VM, start
//! Chromium, start the provider's login and the screen streamer, follow the
//! agent's events until the credential arrives (or the person denies, the
//! CLI dies, time runs out, or the session is cancelled), store it, stop
//! the live view, destroy the browser VM (keeping its logs if the session
//! failed), and deliver. Live-view events go to the session's hub. Spawned
//! by [`super::Sessions::start`]; [`resume`] carries on, after a restart of
//! airlockd, a login an earlier airlockd left (spawned by
//! [`super::resume`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_proto::{
    BrowserEvent, BrowserSpec, CapturedCredential, CapturedFile, ErrorCode, Event, LoginStep,
    Operation, Reply, SecretBytes,
};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{delivery, merge};
use super::{Inner, SessionHandle, SessionState};
use crate::agent::AgentError;
use crate::egress::policy::EgressPolicy;
use crate::providers::Provider;
use crate::store::{CredentialBundle, CredentialFile};
use crate::vm::restore::Origin;
use crate::vm::{CreateVm, VmError, VmKind, VmManager, VmState, VmView};

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
    /// airlockd is exiting and leaves the login, as it is, to the next
    /// one (`vm.keep_on_exit`).
    Detached,
}

/// Runs the session to its end.
pub(super) async fn run(ctx: Arc<Inner>, h: Arc<SessionHandle>, provider: Provider) {
    let (tx, mut events) = mpsc::channel(64);
    let end = drive(&ctx, &h, &provider, tx, &mut events).await;
    conclude(ctx, h, end, events).await;
}

/// Carries on a login that an earlier airlockd left waiting for the
/// person (or with its credential captured but not stored) in browser VM
/// `vm`, which this airlockd took over; the VM's events arrive on
/// `events`. The agent sends a credential it has not seen acknowledged
/// again on its new connection, so none is lost to the restart.
pub(super) async fn resume(
    ctx: Arc<Inner>,
    h: Arc<SessionHandle>,
    provider: Provider,
    vm: String,
    mut events: mpsc::Receiver<Event>,
) {
    let detail = format!("airlockd restarted; the login goes on in browser VM {vm}");
    ctx.record(&h, None, "resumed", Some(detail));
    let end = carry_on(&ctx, &h, &provider, &vm, &mut events).await;
    conclude(ctx, h, end, events).await;
}

async fn carry_on(
    ctx: &Inner,
    h: &SessionHandle,
    provider: &Provider,
    vm: &str,
    events: &mut mpsc::Receiver<Event>,
) -> End {
    let wait = Instant::now() + Duration::from_millis(ctx.cfg.browser_timeout_ms);
    let settled = tokio::select! {
        r = settle(ctx, vm, wait) => match r {
            Ok(v) => v,
            Err(end) => return end,
        },
        _ = h.cancel.cancelled() => return End::Cancelled,
    };
    if settled.state != VmState::Ready {
        let why = settled
            .error
            .unwrap_or_else(|| format!("it is {:?}", settled.state));
        let why = why.lines().next().unwrap_or_default().to_string();
        return End::Failed(format!(
            "airlockd restarted, and this login's browser VM did not come back ({why}); start a new login"
        ));
    }
    let view = h.view();
    let deadline = expiry(&view.expires_at);
    let stream_now = view.state == SessionState::AwaitingUser;
    follow(ctx, h, provider, vm, events, deadline, stream_now).await
}

/// The instant of an RFC 3339 expiry (now if it passed or is unreadable).
fn expiry(rfc3339: &str) -> Instant {
    let left = humantime::parse_rfc3339(rfc3339)
        .ok()
        .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
        .unwrap_or_default();
    Instant::now() + left
}

/// Ends the live view, releases the browser VM and records the end (or,
/// for a session left to the next airlockd, only closes the viewers).
async fn conclude(
    ctx: Arc<Inner>,
    h: Arc<SessionHandle>,
    end: End,
    mut events: mpsc::Receiver<Event>,
) {
    let id = h.view().session_id;
    // While airlockd exits leaving its VMs, a login that ended on that
    // (cancelled with every session, a VM call cut short, a wait ended
    // early) is not over: the next airlockd carries it on or ends it with
    // a reason. Only here is that decided.
    let end = match end {
        End::Stored { .. } => end,
        _ if ctx.detaching() => End::Detached,
        end => end,
    };
    if let End::Detached = end {
        h.hub.close("airlockd is restarting; this login goes on once it is back: open the viewer link again then");
        tracing::info!(session_id = %id, state = ?h.view().state, "login session left for the next airlockd");
        return;
    }
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
        End::Failed(reason) => finish(&ctx, &h, super::SessionState::Failed, reason).await,
        End::Cancelled => {
            let reason = "cancelled on request".into();
            finish(&ctx, &h, SessionState::Cancelled, reason).await
        }
        End::Expired(reason) => finish(&ctx, &h, SessionState::Expired, reason).await,
        End::Detached => {}
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
        End::Detached => "airlockd is restarting".to_string(),
    };
    h.hub.close(&reason);
}

/// Ends the session in `state` with `reason`, saved at once.
pub(super) async fn finish(ctx: &Inner, h: &SessionHandle, state: SessionState, reason: String) {
    h.view.send_modify(|v| v.error = Some(reason.clone()));
    ctx.record(h, Some(state), "state", Some(reason));
    ctx.save_now(h).await;
    ctx.ended(&h.view().session_id);
}

/// Destroys the browser VM; keeps its logs when the session failed.
async fn release_browser(ctx: &Inner, h: &SessionHandle, end: &End) {
    let Some(vm) = h.view().browser_vm_id else {
        return;
    };
    // The VM's egress counters go with it: keep them in the history.
    if let Some(e) = ctx.vms.get(&vm).ok().and_then(|v| v.egress) {
        let mut detail = format!(
            "{} streams out, {} refused, {} bytes out, {} bytes in",
            e.streams, e.refused, e.bytes_out, e.bytes_in
        );
        if let Some(last) = e.recent_refusals.last() {
            detail.push_str(&format!("; last refused: {last}"));
        }
        ctx.record(h, None, "egress", Some(detail));
    }
    let result = match end {
        End::Failed(reason) => {
            ctx.vms
                .delete_keeping_logs(&vm, &format!("login session failed: {reason}"))
                .await
        }
        _ => ctx.vms.delete(&vm).await,
    };
    match result {
        // Where its console, agent and program logs are, for whoever
        // diagnoses the failure.
        Ok(view) => {
            if let Some(dir) = view.logs_dir {
                ctx.record(h, None, "logsKept", Some(dir));
            }
        }
        Err(e) => tracing::warn!(vm_id = %vm, error = %e, "cannot delete the browser VM"),
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
        r = start_browser(ctx, h, provider, tx, browser_deadline) => match r {
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
    follow(ctx, h, provider, &vm, events, user_deadline, false).await
}

/// What the session's browser VM may reach: its provider's destinations
/// and the operator's, and the TURN servers for the live view.
fn egress_policy(ctx: &Inner, h: &SessionHandle, provider: &Provider) -> EgressPolicy {
    let view = h.view();
    let mut allow = provider.egress_patterns();
    allow.extend_from_slice(ctx.vms.egress().allowed());
    EgressPolicy {
        label: format!("provider {}", view.provider),
        allow,
        turn: crate::live::turn::tcp_servers(ctx.live.config()),
        user: Some(view.user_id),
    }
}

/// Boots the browser VM and starts Chromium in it; returns the VM id.
async fn start_browser(
    ctx: &Inner,
    h: &SessionHandle,
    provider: &Provider,
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
    let policy = egress_policy(ctx, h, provider);
    let vm = ctx
        .vms
        .create_browser(req.clone(), Some(tx.clone()), policy.clone())
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
    let mut settled = settle(ctx, &vm.id, deadline).await?;
    if settled.state != VmState::Ready && settled.origin != Origin::Boot {
        // A snapshot's VM that cannot start says nothing about the image:
        // the login goes on in one booted from it.
        ctx.record(h, None, "browserVm", Some(restore_failed(&settled)));
        release_failed(ctx, h, &vm.id).await;
        let vm = ctx
            .vms
            .create_with(req, Some(tx), policy)
            .map_err(|e| End::Failed(format!("cannot create the browser VM: {e}")))?;
        h.view
            .send_modify(|v| v.browser_vm_id = Some(vm.id.clone()));
        settled = settle(ctx, &vm.id, deadline).await?;
    }
    if settled.state != VmState::Ready {
        let why = settled
            .error
            .unwrap_or_else(|| format!("it is still {:?}", settled.state));
        return Err(End::Failed(format!("the browser VM did not start: {why}")));
    }
    let vm = settled.clone();
    ctx.record(h, None, "browserVm", Some(vm_started(&settled)));
    let spec = browser_spec(&ctx.cfg).map_err(End::Failed)?;
    let left = deadline.saturating_duration_since(Instant::now());
    let started = tokio::select! {
        r = ctx.vms.call(&vm.id, Operation::StartBrowser(spec), left) => r,
        why = vm_trouble(&ctx.vms, &vm.id) => return Err(End::Failed(why)),
    };
    match started {
        Ok(Reply::BrowserStarted(info)) => {
            let detail = format!(
                "{} on display {} (Xvfb {} ms, Chromium {} ms)",
                info.chromium_version, info.display, info.xvfb_ms, info.chromium_ms
            );
            ctx.record(h, Some(SessionState::BrowserReady), "state", Some(detail));
            Ok(vm.id)
        }
        Ok(_) => Err(End::Failed(
            "the agent answered StartBrowser with the wrong reply".into(),
        )),
        Err(VmError::Agent {
            source: AgentError::Guest(reply),
            ..
        }) if reply.code == ErrorCode::OutOfMemory => Err(End::Failed(out_of_memory(
            memory_of(ctx, &vm.id),
            &reply.message,
        ))),
        Err(e) => Err(End::Failed(format!("Chromium did not start: {e}"))),
    }
}

/// Waits until the VM is ready or has ended, at most until `deadline`.
async fn settle(ctx: &Inner, vm: &str, deadline: Instant) -> Result<VmView, End> {
    let left = deadline.saturating_duration_since(Instant::now());
    ctx.vms
        .wait_for(
            vm,
            &[VmState::Ready, VmState::Failed, VmState::Stopped],
            left,
        )
        .await
        .map_err(|e| End::Failed(e.to_string()))
}

/// The history's note on a restored VM that did not start.
fn restore_failed(v: &VmView) -> String {
    let why = v.error.as_deref().unwrap_or("it stopped");
    // The first line: the console's tail stays in the VM's kept logs.
    let why = why.lines().next().unwrap_or_default();
    format!(
        "the VM {} ({}) did not start: {why}; booting one from the image instead",
        v.id,
        v.origin.describe()
    )
}

/// Forgets a browser VM that failed before the login used it; its logs
/// are kept (a failed VM's always are) and the history says where.
async fn release_failed(ctx: &Inner, h: &SessionHandle, vm: &str) {
    match ctx.vms.delete(vm).await {
        Ok(view) => {
            if let Some(dir) = view.logs_dir {
                ctx.record(h, None, "logsKept", Some(dir));
            }
        }
        Err(e) => tracing::warn!(vm_id = %vm, error = %e, "cannot delete a failed browser VM"),
    }
    h.view.send_modify(|v| v.browser_vm_id = None);
}

/// What Chromium in a session's browser VM starts with (also what the
/// browser VM snapshot is made with, so that a restored VM's Chromium is
/// the one the session would have started).
pub fn browser_spec(cfg: &crate::config::AuthConfig) -> Result<BrowserSpec, String> {
    let extra_ca_pem = match &cfg.extra_ca_file {
        None => None,
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read auth.extra_ca_file {}: {e}", path.display()))?,
        ),
    };
    Ok(BrowserSpec {
        width: cfg.screen_width,
        height: cfg.screen_height,
        max_width: cfg.screen_max_width,
        max_height: cfg.screen_max_height,
        proxy: cfg.proxy.clone(),
        chromium: Some(cfg.chromium.clone()),
        extra_args: cfg.chromium_args.clone(),
        extra_ca_pem,
    })
}

/// How the browser VM started, with its timings, for the history.
fn vm_started(v: &crate::vm::VmView) -> String {
    let t = &v.timings;
    let asked = match v.origin {
        // Its request was the pool's, before this session.
        crate::vm::restore::Origin::Pool => "the pool asked for it",
        _ => "the request",
    };
    let mut detail = format!(
        "{}: ready {} ms after {asked}",
        v.origin.describe(),
        t.request_to_ready_ms.unwrap_or_default()
    );
    for (name, value) in [
        ("restore", t.restore_ms),
        ("resume", t.resume_ms),
        ("refresh", t.refresh_ms),
    ] {
        if let Some(ms) = value {
            detail.push_str(&format!(", {name} {ms} ms"));
        }
    }
    detail
}

/// Follows the login until it ends; starts the live view at once when
/// `stream_now` (a login carried on at `awaiting_user`), else once the
/// sign-in page is open.
async fn follow(
    ctx: &Inner,
    h: &SessionHandle,
    provider: &Provider,
    vm: &str,
    events: &mut mpsc::Receiver<Event>,
    deadline: Instant,
    stream_now: bool,
) -> End {
    let mut denied: Option<String> = None;
    let trouble = vm_trouble(&ctx.vms, vm);
    tokio::pin!(trouble);
    // The streamer starts once the sign-in page is open: started beside
    // the CLI and Chromium's navigation it competes with them for the
    // browser VM's CPU (under TCG the page took 12 s instead of 3, and the
    // person saw it no sooner). Awaited in this loop, so the agent's events
    // keep flowing meanwhile.
    let mut stream_start: Option<BoxFuture<'static, Result<(), String>>> = None;
    let mut stream_requested = stream_now;
    if stream_now {
        let (hub, vm) = (h.hub.clone(), vm.to_string());
        stream_start = Some(Box::pin(async move { hub.start_stream(&vm).await }));
    }
    loop {
        let event = tokio::select! {
            r = async { stream_start.as_mut().expect("guarded").await }, if stream_start.is_some() => {
                stream_start = None;
                stream_started(ctx, h, r);
                continue;
            }
            e = events.recv() => match e {
                Some(e) => e,
                None => return End::Failed("the browser VM's event stream ended".into()),
            },
            why = &mut trouble => return End::Failed(why),
            _ = h.cancel.cancelled() => {
                // Leaving it to the next airlockd: the CLI must go on.
                if ctx.detaching() {
                    return End::Detached;
                }
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
                let page_open = matches!(e.step, LoginStep::WaitingForUser);
                if let Some(end) = on_login_step(ctx, h, provider, e.step, &mut denied) {
                    return end;
                }
                if page_open && !stream_requested {
                    stream_requested = true;
                    let (hub, vm) = (h.hub.clone(), vm.to_string());
                    stream_start = Some(Box::pin(async move { hub.start_stream(&vm).await }));
                }
            }
            Event::Credential(c) => {
                let end = store(ctx, h, provider, c).await;
                if matches!(end, End::Stored { .. }) {
                    acknowledge(ctx, h, vm).await;
                }
                return end;
            }
            Event::Browser(BrowserEvent::Crashed {
                process,
                status,
                restarts,
            }) => {
                let detail = format!("{process} crashed ({status}); restart {restarts}");
                ctx.record(h, None, "browserCrashed", Some(detail));
            }
            Event::Browser(BrowserEvent::OutOfMemory { detail }) => {
                return End::Failed(out_of_memory(memory_of(ctx, vm), &detail));
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

/// A session's error when its browser VM is too small.
fn out_of_memory(memory_mib: u32, what: &str) -> String {
    format!(
        "the browser VM ran out of memory ({memory_mib} MiB): {what}; give browser VMs more memory (vm.browser_memory_mib)"
    )
}

/// The memory of VM `id` (for messages).
fn memory_of(ctx: &Inner, id: &str) -> u32 {
    ctx.vms.get(id).map(|v| v.memory_mib).unwrap_or(0)
}

/// Resolves, with the reason, once the browser VM fails, stops, or runs
/// out of memory (a VM given too little memory must fail its session at
/// once with that reason, not at a timeout).
async fn vm_trouble(vms: &VmManager, id: &str) -> String {
    let mut changes = vms.subscribe_states();
    loop {
        let view = match vms.get(id) {
            Ok(v) => v,
            Err(_) => return "the browser VM is gone".into(),
        };
        if let Some(oom) = view.out_of_memory {
            return out_of_memory(view.memory_mib, &oom);
        }
        match view.state {
            VmState::Failed => {
                return format!("the browser VM failed: {}", view.error.unwrap_or_default())
            }
            VmState::Stopped => return "the browser VM stopped".into(),
            _ => {}
        }
        // Any change (or a lagged receiver) re-reads the VM's state.
        if let Err(tokio::sync::broadcast::error::RecvError::Closed) = changes.recv().await {
            return std::future::pending().await;
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
        LoginStep::UserCode { code } => {
            // Validated with the event; the code stays out of the logs.
            h.view.send_modify(|v| v.user_code = Some(code));
            ctx.record(h, None, "userCode", None);
        }
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
                Some(why) => format!(
                    "the user denied access on the consent page ({why}); {} then exited with {status}: {}",
                    provider.display_name,
                    last_line(&output_tail)
                ),
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

/// Tells the browser VM's agent its credential is stored, so that it
/// stops sending it again on each new connection (a failure only means
/// it may send it again, which is ignored: the session stored one).
async fn acknowledge(ctx: &Inner, h: &SessionHandle, vm: &str) {
    let session_id = h.view().session_id;
    let ack = Operation::AckCredential { session_id };
    if let Err(e) = ctx.vms.call(vm, ack, Duration::from_secs(5)).await {
        tracing::debug!(vm_id = %vm, error = %e, "the browser VM did not take the credential's acknowledgement");
    }
}

/// Encrypts and stores the credential.
async fn store(ctx: &Inner, h: &SessionHandle, provider: &Provider, c: CapturedCredential) -> End {
    if let Err(e) = check_captured(provider, &c) {
        return End::Failed(format!("the browser VM sent an invalid credential: {e}"));
    }
    ctx.record(
        h,
        Some(SessionState::Captured),
        "state",
        Some(format!("{} file(s)", c.files.len())),
    );
    let files = match bundle_files(provider, c.files) {
        Ok(files) => files,
        Err(e) => return End::Failed(format!("the browser VM sent an invalid credential: {e}")),
    };
    let bundle = CredentialBundle { files };
    let view = h.view();
    let stored = ctx
        .store
        .put_for_session(&view.session_id, &view.user_id, &view.provider, &bundle)
        .await;
    match stored {
        Ok(record) => {
            let (session, user, provider) = (&view.session_id, &view.user_id, &view.provider);
            crate::audit::credential_stored(session, user, provider, &record.id);
            h.view
                .send_modify(|v| v.credential_id = Some(record.id.clone()));
            ctx.record(
                h,
                Some(SessionState::Stored),
                "state",
                Some(format!("encrypted with key {}", record.key_id)),
            );
            // Saved before the agent hears the credential is stored: a
            // restart after that finds the session waiting for delivery.
            ctx.save_now(h).await;
            End::Stored {
                credential_id: record.id,
                bundle,
            }
        }
        Err(e) => End::Failed(format!("cannot store the credential: {e}")),
    }
}

/// What a guest sent as a credential, checked as if the guest had checked
/// nothing: its bounds, and each file's shape against the profile. The
/// reason names files and fields, never contents.
fn check_captured(provider: &Provider, c: &CapturedCredential) -> Result<(), String> {
    c.validate(provider.credentials.len())
        .map_err(|e| e.to_string())?;
    for f in &c.files {
        let spec = &provider.credentials[f.index as usize];
        airlock_proto::check_shape(f.contents.expose(), &spec.required)
            .map_err(|e| format!("{}: {e}", spec.path))?;
    }
    Ok(())
}

/// The files to store for a captured credential: each where the CLI VM
/// wants it, a file shared with the person's settings cut down to the
/// profile's keys (the guest is not trusted to have done it), and what the
/// CLI needs beside the credential, so that every delivery (now, or to a
/// later CLI VM) writes both.
fn bundle_files(
    provider: &Provider,
    captured: Vec<CapturedFile>,
) -> Result<Vec<CredentialFile>, merge::MergeError> {
    let mut files = Vec::with_capacity(captured.len() + provider.cli_files.len());
    for f in captured {
        let spec = &provider.credentials[f.index as usize];
        let contents = if spec.merge_keys.is_empty() {
            f.contents
        } else {
            SecretBytes::new(merge::keep_keys(
                &spec.path,
                f.contents.expose(),
                &spec.merge_keys,
            )?)
        };
        files.push(CredentialFile {
            path: spec.deliver_to.clone(),
            mode: 0o600,
            contents,
        });
    }
    files.extend(provider.cli_files.iter().map(|f| CredentialFile {
        path: f.path.clone(),
        mode: 0o600,
        contents: SecretBytes::new(f.contents.clone().into_bytes()),
    }));
    Ok(files)
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::trim)
        .unwrap_or("(nothing)")
}
