//! One session's live view: its viewer tokens, its viewers (WebSocket ones
//! and those of the HTTP signalling API), who controls the input, the
//! streamer's state, and the relay between viewers and the agent.
//!
//! Viewer → agent: each viewer's signals are relayed in order as
//! `Operation::StreamSignal`. Agent → viewers: the session's task hands
//! every `Event::Stream` to [`Hub::on_event`], which never blocks: it
//! queues on each viewer's bounded channel, drops JPEG frames a slow viewer
//! cannot take, and drops a viewer that falls behind on signals. The first
//! viewer controls the input; when it leaves, the oldest remaining one does
//! (a watch feeds the task that tells the agent). No lock is held across an
//! `.await`. Created by [`super::Live::open`], driven by the session's task
//! and by [`super::socket`] and the `/api/webrtc` handlers.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use airlock_proto::stream::{
    IceServer, Signal, StreamEvent, StreamSpec, StreamStats, ViewerSignal,
};
use airlock_proto::{InputBatch, Operation};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::limit::LogLimiter;
use super::token::{self, IssuedToken, TokenSet};
use super::{turn, LiveError};
use crate::config::LiveConfig;
use crate::vm::VmManager;

/// Messages queued for one WebSocket viewer.
const VIEWER_QUEUE: usize = 64;
/// Candidates kept per HTTP viewer.
const MAX_HTTP_CANDIDATES: usize = 64;
/// Streamer state changes recorded as session steps (a crash-looping
/// streamer must not grow the session's history without bound).
const MAX_STREAMER_STEPS: u32 = 64;
/// Deadline of a relayed signal or control change.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The streamer as viewers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StreamerStatus {
    /// The browser is not up yet.
    Pending,
    /// Asked to start; not playing yet.
    Starting,
    /// Playing; viewers may offer.
    Running,
    /// Died; the agent restarts it.
    Restarting,
    /// Stopped (the session is ending).
    Stopped,
    /// It could not be started (the detail says why).
    Unavailable,
}

/// Something for one WebSocket viewer.
#[derive(Debug)]
pub enum Outbound {
    /// A JSON message.
    Text(String),
    /// A fallback JPEG frame.
    Frame(Bytes),
}

/// What the HTTP signalling API has of one viewer's answer so far.
#[derive(Debug, Clone, Default)]
pub struct HttpAnswer {
    /// The streamer's SDP answer.
    pub sdp: Option<String>,
    /// Its trickled candidates (m-line index, line).
    pub candidates: Vec<(u32, String)>,
    /// The streamer said end-of-candidates.
    pub complete: bool,
    /// The streamer reported an error for this viewer.
    pub error: Option<String>,
}

impl HttpAnswer {
    /// True once the answer can be handed out (or has failed).
    pub fn settled(&self) -> bool {
        (self.complete && self.sdp.is_some()) || self.error.is_some()
    }
}

#[derive(Debug)]
enum Link {
    Socket(mpsc::Sender<Outbound>),
    Http {
        answer: watch::Sender<HttpAnswer>,
        last_seen: Instant,
        connected: bool,
    },
}

#[derive(Debug)]
struct Viewer {
    id: String,
    link: Link,
    jpeg: bool,
}

#[derive(Debug)]
struct HubState {
    tokens: TokenSet,
    vm: Option<String>,
    streamer: StreamerStatus,
    restarts: u32,
    detail: Option<String>,
    streamer_steps: u32,
    /// In join order: the first one controls.
    viewers: Vec<Viewer>,
    end: Option<String>,
    stats: Option<StreamStats>,
}

/// One session's live view.
#[derive(Debug)]
pub struct Hub {
    session_id: String,
    user_id: String,
    /// What this session's viewer links start with.
    viewer_base: Arc<str>,
    cfg: Arc<LiveConfig>,
    vms: VmManager,
    tracker: TaskTracker,
    closed: CancellationToken,
    streamer_turn_ttl: Duration,
    controller: watch::Sender<Option<String>>,
    state: Mutex<HubState>,
    quiet: LogLimiter,
}

/// What a WebSocket viewer gets when it joins.
#[derive(Debug)]
pub struct Joined {
    /// Its id.
    pub viewer_id: String,
    /// Its queue.
    pub rx: mpsc::Receiver<Outbound>,
    /// The welcome message (JSON), sent first.
    pub welcome: String,
}

impl Hub {
    /// A hub for a new session, its first token minted.
    pub(super) fn new(
        ids: (&str, &str),
        viewer_base: Arc<str>,
        cfg: Arc<LiveConfig>,
        vms: VmManager,
        tracker: TaskTracker,
        streamer_turn_ttl: Duration,
    ) -> Result<Arc<Self>, LiveError> {
        let mut tokens = TokenSet::default();
        tokens.issue(
            SystemTime::now(),
            Duration::from_millis(cfg.viewer_token_ttl_ms),
        )?;
        let hub = Arc::new(Self {
            session_id: ids.0.into(),
            user_id: ids.1.into(),
            viewer_base,
            cfg,
            vms,
            tracker,
            closed: CancellationToken::new(),
            streamer_turn_ttl,
            controller: watch::channel(None).0,
            state: Mutex::new(HubState {
                tokens,
                vm: None,
                streamer: StreamerStatus::Pending,
                restarts: 0,
                detail: None,
                streamer_steps: 0,
                viewers: Vec::new(),
                end: None,
                stats: None,
            }),
            quiet: LogLimiter::default(),
        });
        hub.tracker.spawn(http::sweep_http_viewers(hub.clone()));
        Ok(hub)
    }

    /// Digests of the viewer tokens still valid, to keep the session's
    /// links working across a restart of airlockd.
    pub fn token_digests(&self) -> Vec<token::TokenDigest> {
        self.lock().tokens.digests(SystemTime::now())
    }

    /// Takes the tokens of this session an earlier airlockd issued.
    pub fn restore_tokens(&self, digests: &[token::TokenDigest]) {
        self.lock().tokens.restore(digests);
    }

    /// Viewers connected now.
    pub fn viewers(&self) -> usize {
        self.lock().viewers.len()
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session's id.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The live-view settings.
    pub fn config(&self) -> &LiveConfig {
        &self.cfg
    }

    /// Checks a presented viewer token; returns its expiry.
    pub fn authorize(&self, presented: Option<&str>) -> Result<SystemTime, LiveError> {
        Ok(self.lock().tokens.check(presented, SystemTime::now())?)
    }

    /// Mints a token valid for `ttl`.
    pub fn issue_token(&self, ttl: Duration) -> Result<IssuedToken, LiveError> {
        Ok(self.lock().tokens.issue(SystemTime::now(), ttl)?)
    }

    /// The viewer link of a token of this session.
    pub fn link(&self, issued: &IssuedToken) -> super::ViewerLink {
        super::ViewerLink::new(&self.viewer_base, &self.session_id, issued)
    }

    /// The newest valid token, while the session runs.
    pub fn latest_token(&self) -> Option<IssuedToken> {
        let s = self.lock();
        if s.end.is_some() {
            return None;
        }
        s.tokens.latest(SystemTime::now()).cloned()
    }

    /// True when no token of this session works any more.
    pub(super) fn tokens_expired(&self, now: SystemTime) -> bool {
        self.lock().tokens.all_expired(now)
    }

    /// Why the live view ended, once it has.
    pub fn end_reason(&self) -> Option<String> {
        self.lock().end.clone()
    }

    /// Cancelled when the session ends.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// STUN/TURN servers for this session's viewers.
    pub fn ice_servers(&self) -> Vec<IceServer> {
        let ttl = Duration::from_secs(self.cfg.turn_ttl_secs);
        turn::ice_servers(&self.cfg, &self.user_id, SystemTime::now(), ttl)
    }

    fn check_open(&self, s: &HubState) -> Result<(), LiveError> {
        match &s.end {
            Some(reason) => Err(LiveError::Ended {
                id: self.session_id.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn add_viewer(&self, s: &mut HubState, link: Link) -> Result<String, LiveError> {
        self.check_open(s)?;
        if s.viewers.len() >= self.cfg.max_viewers {
            return Err(LiveError::Full(self.cfg.max_viewers));
        }
        let id = token::viewer_id()?;
        s.viewers.push(Viewer {
            id: id.clone(),
            link,
            jpeg: false,
        });
        Ok(id)
    }

    /// Fails when the session has ended or has all its viewers (checked
    /// before a WebSocket upgrade, so the refusal is a plain HTTP error).
    pub fn has_room(&self) -> Result<(), LiveError> {
        let s = self.lock();
        self.check_open(&s)?;
        if s.viewers.len() >= self.cfg.max_viewers {
            return Err(LiveError::Full(self.cfg.max_viewers));
        }
        Ok(())
    }

    /// Adds a WebSocket viewer.
    pub fn join_socket(&self) -> Result<Joined, LiveError> {
        let (tx, rx) = mpsc::channel(VIEWER_QUEUE);
        let mut s = self.lock();
        let viewer_id = self.add_viewer(&mut s, Link::Socket(tx))?;
        self.update_control(&mut s);
        let welcome = json!({
            "type": "welcome",
            "viewerId": viewer_id,
            "sessionId": self.session_id,
            "controlling": s.viewers.first().is_some_and(|v| v.id == viewer_id),
            "iceServers": self.ice_servers(),
            "streamer": s.streamer,
            "restarts": s.restarts,
            "detail": s.detail,
            "jpegFps": self.cfg.jpeg_fps,
            "connectTimeoutMs": self.cfg.connect_timeout_ms,
        });
        tracing::info!(session_id = %self.session_id, viewer_id = %viewer_id, viewers = s.viewers.len(), "viewer joined");
        Ok(Joined {
            viewer_id,
            rx,
            welcome: welcome.to_string(),
        })
    }

    /// Gives control to the oldest viewer when that changed, telling the
    /// agent (through the watch) and every WebSocket viewer.
    fn update_control(&self, s: &mut HubState) {
        let first = s.viewers.first().map(|v| v.id.clone());
        if *self.controller.borrow() == first {
            return;
        }
        self.controller.send_replace(first.clone());
        for v in &s.viewers {
            if let Link::Socket(tx) = &v.link {
                let msg = json!({"type": "control", "controlling": Some(&v.id) == first.as_ref()});
                let _ = tx.try_send(Outbound::Text(msg.to_string()));
            }
        }
    }

    /// Removes a viewer and tells the agent to free what it used.
    pub async fn leave(&self, viewer_id: &str) {
        let vm = {
            let mut s = self.lock();
            let before = s.viewers.len();
            s.viewers.retain(|v| v.id != viewer_id);
            if s.viewers.len() == before {
                return;
            }
            self.update_control(&mut s);
            tracing::info!(session_id = %self.session_id, viewer_id, viewers = s.viewers.len(), "viewer left");
            self.stream_vm(&s).ok()
        };
        if let Some(vm) = vm {
            let op = Operation::StreamSignal(ViewerSignal {
                viewer_id: viewer_id.into(),
                signal: Signal::Leave,
            });
            if let Err(e) = self.vms.call(&vm, op, RELAY_TIMEOUT).await {
                tracing::debug!(session_id = %self.session_id, viewer_id, error = %e, "leave not delivered");
            }
        }
    }

    /// The VM whose streamer takes signals, or why there is none.
    fn stream_vm(&self, s: &HubState) -> Result<String, LiveError> {
        self.check_open(s)?;
        let why = match (s.streamer, &s.vm) {
            (StreamerStatus::Pending, _) | (_, None) => {
                "the browser is still starting; offer again once the streamer reports running"
                    .to_string()
            }
            (StreamerStatus::Unavailable, _) => format!(
                "the live view is unavailable: {}",
                s.detail
                    .as_deref()
                    .unwrap_or("the streamer could not start")
            ),
            (_, Some(vm)) => return Ok(vm.clone()),
        };
        Err(LiveError::NotStreaming(why))
    }

    /// Relays a viewer's signal to the streamer.
    pub async fn relay(&self, viewer_id: &str, signal: Signal) -> Result<(), LiveError> {
        let vm = {
            let mut s = self.lock();
            let vm = self.stream_vm(&s)?;
            let v = s
                .viewers
                .iter_mut()
                .find(|v| v.id == viewer_id)
                .ok_or_else(|| LiveError::UnknownViewer(viewer_id.into()))?;
            if let Signal::Jpeg { fps } = &signal {
                v.jpeg = *fps > 0;
            }
            vm
        };
        let op = Operation::StreamSignal(ViewerSignal {
            viewer_id: viewer_id.into(),
            signal,
        });
        self.vms
            .call(&vm, op, RELAY_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(LiveError::Agent)
    }

    /// Injects input from a viewer; only the controlling one may.
    pub async fn input(&self, viewer_id: &str, batch: InputBatch) -> Result<(), LiveError> {
        batch
            .validate()
            .map_err(|e| LiveError::Invalid(e.to_string()))?;
        let vm = {
            let s = self.lock();
            self.check_open(&s)?;
            if s.viewers.first().map(|v| v.id.as_str()) != Some(viewer_id) {
                return Err(LiveError::NotControlling);
            }
            s.vm.clone()
                .ok_or_else(|| LiveError::NotStreaming("the browser is still starting".into()))?
        };
        self.vms
            .call(&vm, Operation::Input(batch), RELAY_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(LiveError::Agent)
    }

    /// Queues a message for one WebSocket viewer (errors, token renewals).
    pub fn reply(&self, viewer_id: &str, text: String) {
        let mut s = self.lock();
        self.send_or_drop(&mut s, viewer_id, Outbound::Text(text));
    }

    /// Sends to a WebSocket viewer; one whose queue is full has fallen
    /// behind on signals it cannot miss, so it is dropped (its page
    /// reconnects).
    fn send_or_drop(&self, s: &mut HubState, viewer_id: &str, msg: Outbound) {
        let Some(Viewer {
            link: Link::Socket(tx),
            ..
        }) = s.viewers.iter().find(|v| v.id == viewer_id)
        else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(msg) {
            if self.quiet.allow() {
                tracing::warn!(session_id = %self.session_id, viewer_id, "viewer fell behind; dropping it");
            }
            self.drop_viewer(s, viewer_id);
        }
    }

    /// Removes a viewer from inside a locked section; the agent is told in
    /// a task of its own.
    fn drop_viewer(&self, s: &mut HubState, viewer_id: &str) {
        let before = s.viewers.len();
        s.viewers.retain(|v| v.id != viewer_id);
        if s.viewers.len() == before {
            return;
        }
        self.update_control(s);
        let Ok(vm) = self.stream_vm(s) else {
            return;
        };
        let (vms, id) = (self.vms.clone(), viewer_id.to_string());
        self.tracker.spawn(async move {
            let signal = ViewerSignal {
                viewer_id: id,
                signal: Signal::Leave,
            };
            let _ = vms
                .call(&vm, Operation::StreamSignal(signal), RELAY_TIMEOUT)
                .await;
        });
    }

    // ------------------------------------------------ the streamer

    /// What the agent starts the streamer with.
    fn spec(&self) -> StreamSpec {
        let user = format!("{}.streamer", self.session_id);
        StreamSpec {
            framerate: self.cfg.framerate,
            bitrate_kbps: self.cfg.bitrate_kbps,
            jpeg_fps: self.cfg.jpeg_fps,
            jpeg_quality: self.cfg.jpeg_quality,
            ice_servers: turn::ice_servers(
                &self.cfg,
                &user,
                SystemTime::now(),
                self.streamer_turn_ttl,
            ),
            ice_addresses: self.cfg.ice_addresses.clone(),
            http_proxy: None,
            copy_out: self.cfg.copy_out,
        }
    }

    /// Starts the streamer in the session's browser VM. A failure (an agent
    /// without a streamer answers `Unsupported`) leaves the session going:
    /// the viewers are told the live view is unavailable, and why.
    pub async fn start_stream(self: &Arc<Self>, vm: &str) -> Result<(), String> {
        {
            let mut s = self.lock();
            s.vm = Some(vm.into());
            self.set_streamer(&mut s, StreamerStatus::Starting, 0, None);
        }
        let timeout = Duration::from_millis(self.cfg.start_timeout_ms);
        match self
            .vms
            .call(vm, Operation::StreamStart(self.spec()), timeout)
            .await
        {
            Ok(_) => {
                self.tracker.spawn(tell_control(self.clone()));
                Ok(())
            }
            Err(e) => {
                let why = e.to_string();
                let mut s = self.lock();
                self.set_streamer(&mut s, StreamerStatus::Unavailable, 0, Some(why.clone()));
                Err(why)
            }
        }
    }

    /// Stops the streamer (best effort: the VM is about to go anyway).
    pub async fn stop_stream(&self) {
        let vm = {
            let s = self.lock();
            match s.streamer {
                StreamerStatus::Pending | StreamerStatus::Unavailable => None,
                _ => s.vm.clone(),
            }
        };
        if let Some(vm) = vm {
            if let Err(e) = self
                .vms
                .call(&vm, Operation::StreamStop, RELAY_TIMEOUT)
                .await
            {
                tracing::debug!(session_id = %self.session_id, error = %e, "stream stop not delivered");
            }
        }
    }

    fn set_streamer(
        &self,
        s: &mut HubState,
        state: StreamerStatus,
        restarts: u32,
        detail: Option<String>,
    ) {
        s.streamer = state;
        s.restarts = restarts;
        s.detail = detail;
        let msg =
            json!({"type": "streamer", "state": state, "restarts": restarts, "detail": s.detail});
        self.broadcast(s, &msg.to_string());
    }

    fn broadcast(&self, s: &mut HubState, text: &str) {
        let ids: Vec<String> = s
            .viewers
            .iter()
            .filter(|v| matches!(v.link, Link::Socket(_)))
            .map(|v| v.id.clone())
            .collect();
        for id in ids {
            self.send_or_drop(s, &id, Outbound::Text(text.to_string()));
        }
    }

    /// Takes a live-view event from the agent. Returns a step to record in
    /// the session (`streamerRunning`, ... and a detail) when the streamer
    /// changed state.
    pub fn on_event(&self, event: StreamEvent) -> Option<(&'static str, Option<String>)> {
        let mut s = self.lock();
        if s.end.is_some() {
            return None;
        }
        match event {
            StreamEvent::State {
                state,
                restarts,
                detail,
            } => self.on_state(&mut s, state, restarts, detail),
            StreamEvent::Viewer(v) => {
                self.on_viewer_signal(&mut s, v);
                None
            }
            StreamEvent::Jpeg { data } => {
                self.on_jpeg(&mut s, &data);
                None
            }
            StreamEvent::Stats(stats) => {
                s.stats = Some(stats);
                let mut msg = serde_json::to_value(stats).unwrap_or_default();
                msg["type"] = "stats".into();
                for v in &s.viewers {
                    if let Link::Socket(tx) = &v.link {
                        // Counters are not worth dropping a viewer for.
                        let _ = tx.try_send(Outbound::Text(msg.to_string()));
                    }
                }
                None
            }
        }
    }

    fn on_state(
        &self,
        s: &mut HubState,
        state: airlock_proto::stream::StreamerState,
        restarts: u32,
        detail: Option<String>,
    ) -> Option<(&'static str, Option<String>)> {
        use airlock_proto::stream::StreamerState as S;
        let (status, event) = match state {
            S::Starting => (StreamerStatus::Starting, "streamerStarting"),
            S::Running => (StreamerStatus::Running, "streamerRunning"),
            S::Restarting => (StreamerStatus::Restarting, "streamerRestarting"),
            S::Stopped => (StreamerStatus::Stopped, "streamerStopped"),
        };
        let changed = status != s.streamer;
        if changed && status == StreamerStatus::Restarting {
            crate::metrics::inc(&crate::metrics::global().streamer_restarts);
        }
        if changed && status == StreamerStatus::Running {
            // A restarted streamer knows nobody: tell it who controls.
            self.controller.send_modify(|_| {});
        }
        self.set_streamer(s, status, restarts, detail.clone());
        if !changed || s.streamer_steps >= MAX_STREAMER_STEPS {
            return None;
        }
        s.streamer_steps += 1;
        let detail = match (restarts, detail) {
            (0, d) => d,
            (n, Some(d)) => Some(format!("restart {n}: {d}")),
            (n, None) => Some(format!("restart {n}")),
        };
        Some((event, detail))
    }

    fn on_viewer_signal(&self, s: &mut HubState, v: ViewerSignal) {
        let Some(viewer) = s.viewers.iter_mut().find(|x| x.id == v.viewer_id) else {
            if self.quiet.allow() {
                tracing::debug!(session_id = %self.session_id, viewer_id = %v.viewer_id, "signal for a viewer that is gone");
            }
            return;
        };
        match &mut viewer.link {
            Link::Socket(_) => {
                let text = serde_json::to_string(&v.signal).unwrap_or_default();
                self.send_or_drop(s, &v.viewer_id, Outbound::Text(text));
            }
            Link::Http {
                answer, connected, ..
            } => {
                let gone = matches!(&v.signal, Signal::State { state } if state == "failed" || state == "closed");
                if matches!(&v.signal, Signal::State { state } if state == "connected") {
                    *connected = true;
                }
                answer.send_modify(|a| http::fold_signal(a, v.signal));
                if gone {
                    self.drop_viewer(s, &v.viewer_id);
                }
            }
        }
    }

    fn on_jpeg(&self, s: &mut HubState, data: &str) {
        if !s.viewers.iter().any(|v| v.jpeg) {
            return;
        }
        let Ok(frame) = STANDARD.decode(data) else {
            if self.quiet.allow() {
                tracing::warn!(session_id = %self.session_id, "a JPEG frame from the agent is not base64; dropped");
            }
            return;
        };
        let frame = Bytes::from(frame);
        for v in s.viewers.iter().filter(|v| v.jpeg) {
            if let Link::Socket(tx) = &v.link {
                // A viewer that cannot keep up simply misses frames.
                let _ = tx.try_send(Outbound::Frame(frame.clone()));
            }
        }
    }

    /// Ends the live view: viewers are closed with `reason`.
    pub fn close(&self, reason: &str) {
        {
            let mut s = self.lock();
            if s.end.is_some() {
                return;
            }
            s.end = Some(reason.into());
            s.streamer = StreamerStatus::Stopped;
            s.viewers.clear();
        }
        self.controller.send_replace(None);
        self.closed.cancel();
    }
}

/// Tells the agent who controls the input, whenever that changes, until
/// the session ends. Runs once the streamer has started.
async fn tell_control(hub: Arc<Hub>) {
    let mut rx = hub.controller.subscribe();
    rx.mark_changed();
    loop {
        tokio::select! {
            _ = hub.closed.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let viewer_id = rx.borrow_and_update().clone();
        let Some(vm) = hub.lock().vm.clone() else {
            continue;
        };
        let op = Operation::StreamControl { viewer_id };
        // A call in flight when the session ends is abandoned: the VM is
        // going away with it.
        let result = tokio::select! {
            _ = hub.closed.cancelled() => return,
            r = hub.vms.call(&vm, op, RELAY_TIMEOUT) => r,
        };
        if let Err(e) = result {
            if hub.quiet.allow() {
                tracing::warn!(session_id = %hub.session_id, error = %e, "cannot tell the streamer who controls the input");
            }
        }
    }
}

mod http;
#[cfg(test)]
mod tests;
