//! The browser role of the agent: a virtual display (Xvfb) and a headful
//! Chromium on it, started when the host asks, restarted with backoff when
//! either crashes (each crash reported to the host), plus input injection
//! and screenshots of that display. Owned by [`crate::agent::Agent`];
//! logins use its DevTools connection.

pub mod cdp;
pub mod keyboard;
pub mod notes;
pub mod pointer;
pub mod procs;
pub mod trust;
pub mod viewport;
pub mod x11;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_proto::{
    BrowserEvent, BrowserInfo, BrowserSpec, ErrorCode, ErrorReply, Event, InputBatch, InputEvent,
    Screenshot,
};
use futures_util::stream::{BoxStream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::cdp::Cdp;
use self::keyboard::Keyboard;
use self::procs::{first_oom, start_chromium, start_xvfb, Supervised};
use self::x11::Display;
use crate::process::Reaper;
use crate::users::RunAs;

/// Longest the first start may take (both processes and DevTools).
const START_TIMEOUT: Duration = Duration::from_secs(150);

/// State shared between the role's handle and its supervisor task.
#[derive(Debug)]
struct Shared {
    cdp: watch::Sender<Option<Arc<Cdp>>>,
    display: Mutex<Option<Arc<Mutex<Display>>>>,
    /// Reopened after Chromium restarts, so the user keeps their page.
    last_url: Mutex<Option<String>>,
    /// The modifiers the person holds, sent with each key.
    keyboard: Mutex<Keyboard>,
    /// The screen the controlling viewer asked for: re-applied after a
    /// restart. Held while it is applied, so fits apply in order.
    viewport: tokio::sync::Mutex<Option<viewport::Fit>>,
    /// What the page reports for the controlling viewer.
    notes: notes::Notes,
    /// How the page is drawn while it is scaled to the viewer's ratio.
    emulation: Mutex<Option<pointer::Emulation>>,
    /// The pointer's state for events routed to a scaled page.
    pointer: Mutex<pointer::Pointer>,
}

impl Shared {
    /// The X display connection while Xvfb runs.
    fn display(&self) -> Result<Arc<Mutex<Display>>, ErrorReply> {
        self.display
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| unavailable("the display is not running (start the browser first)"))
    }
}

#[derive(Debug)]
struct Running {
    info: BrowserInfo,
    spec: BrowserSpec,
    cancel: CancellationToken,
}

/// The display and browser of this VM.
#[derive(Debug)]
pub struct BrowserRole {
    reaper: Reaper,
    /// The account Chromium runs as (in an image).
    run_as: Option<RunAs>,
    /// Chromium's managed policy directory, where it is this browser's.
    policy_dir: Option<PathBuf>,
    events: mpsc::Sender<Event>,
    profile_dir: PathBuf,
    state_dir: PathBuf,
    /// The extra CA file, once the host sent one ([`trust`]).
    extra_ca: Mutex<Option<PathBuf>>,
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
    tracker: TaskTracker,
}

fn unavailable(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::Io, message)
}

fn out_of_memory(line: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::OutOfMemory,
        format!("Chromium ran out of memory: {line}"),
    )
}

impl BrowserRole {
    /// A stopped role; `state_dir` (tmpfs) holds Chromium's profile,
    /// Chromium runs as `run_as` when given, and an extra CA goes into a
    /// managed policy in `policy_dir` when given (only where that
    /// directory is this browser's alone).
    pub fn new(
        reaper: Reaper,
        events: mpsc::Sender<Event>,
        state_dir: PathBuf,
        run_as: Option<RunAs>,
        policy_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            reaper,
            run_as,
            policy_dir,
            events,
            profile_dir: state_dir.join("chromium-profile"),
            state_dir,
            extra_ca: Mutex::new(None),
            shared: Arc::new(Shared {
                cdp: watch::channel(None).0,
                display: Mutex::new(None),
                last_url: Mutex::new(None),
                keyboard: Mutex::new(Keyboard::default()),
                viewport: tokio::sync::Mutex::new(None),
                notes: notes::Notes::default(),
                emulation: Mutex::new(None),
                pointer: Mutex::new(pointer::Pointer::default()),
            }),
            running: Mutex::new(None),
            tracker: TaskTracker::new(),
        }
    }

    /// Starts Xvfb and Chromium (once; later calls return the same info).
    pub async fn start(&self, spec: BrowserSpec) -> Result<BrowserInfo, ErrorReply> {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            return Ok(r.info.clone());
        }
        let sizes = [(spec.width, spec.height), (spec.max_width, spec.max_height)];
        if spec.width < 320 || spec.height < 240 || sizes.iter().any(|&(w, h)| w > 7680 || h > 4320)
        {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "screen size must be 320x240 to 7680x4320",
            ));
        }
        if let Some(pem) = &spec.extra_ca_pem {
            self.trust(pem)?;
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let cancel = CancellationToken::new();
        let sup = Supervisor {
            reaper: self.reaper.clone(),
            run_as: self.run_as,
            events: self.events.clone(),
            profile: self.profile_dir.clone(),
            shared: self.shared.clone(),
            spec: spec.clone(),
            cancel: cancel.clone(),
        };
        self.tracker.spawn(sup.run(ready_tx));
        let info = match tokio::time::timeout(START_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(info))) => info,
            Ok(Ok(Err(why))) => return Err(why),
            _ => {
                cancel.cancel();
                return Err(unavailable(format!(
                    "the browser did not start within {START_TIMEOUT:?}"
                )));
            }
        };
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = Some(Running {
            info: info.clone(),
            spec,
            cancel,
        });
        Ok(info)
    }

    /// Installs the host's extra CA: Chromium's policy only where its
    /// directory is this browser's (an image, an isolated host process; a
    /// plain host process would change the host's Chromium), the file for
    /// logins always.
    fn trust(&self, pem: &str) -> Result<(), ErrorReply> {
        let policy = self.policy_dir.as_deref();
        let path = trust::install(pem, &self.state_dir.join("trust"), policy)
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e))?;
        tracing::info!(path = %path.display(), chromium_policy = policy.is_some(), "extra CA installed");
        *self.extra_ca.lock().unwrap_or_else(PoisonError::into_inner) = Some(path);
        Ok(())
    }

    /// The extra CA file logins point their CLIs at, if the host sent one.
    pub fn extra_ca(&self) -> Option<PathBuf> {
        self.extra_ca
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The display (`:N`) while the role runs.
    pub fn display_name(&self) -> Option<String> {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|r| r.info.display.clone())
    }

    /// Stops Chromium and Xvfb and waits for them.
    pub async fn stop(&self) {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            r.cancel.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
        self.tracker.reopen();
    }

    /// The live DevTools connection, waiting up to `wait` for one (after a
    /// crash Chromium takes a moment to come back).
    pub async fn cdp(&self, wait: Duration) -> Result<Arc<Cdp>, ErrorReply> {
        let mut rx = self.shared.cdp.subscribe();
        let found = tokio::time::timeout(wait, rx.wait_for(|c| c.is_some())).await;
        let cdp = match found {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        };
        cdp.ok_or_else(|| unavailable("the browser is not running (start it first)"))
    }

    /// Before a snapshot: one navigation away from the blank page and
    /// back, so that what a session's first navigation needs (a renderer
    /// Chromium keeps spare after a navigation, the code it runs) already
    /// exists in every restored copy. Nothing is fetched.
    pub async fn warm_up(&self) -> Result<(), ErrorReply> {
        let cdp = self.cdp(Duration::from_secs(30)).await?;
        for url in ["data:text/html,<title>airlock</title>", "about:blank"] {
            cdp.open(url)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// Opens `url` and remembers it for after a restart.
    pub async fn open(&self, url: &str) -> Result<(), ErrorReply> {
        *self
            .shared
            .last_url
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(url.to_string());
        let cdp = self.cdp(Duration::from_secs(30)).await?;
        cdp.open(url).await.map_err(|e| unavailable(e.to_string()))
    }

    fn display(&self) -> Result<Arc<Mutex<Display>>, ErrorReply> {
        self.shared.display()
    }

    /// Applies input events in order: the pointer through the X display
    /// (so it reaches Chromium's own UI too, and the streamed screen shows
    /// it), keys and text through DevTools ([`keyboard`],
    /// [`Cdp::insert_text`]), one ordered channel for everything typed.
    pub async fn input(&self, batch: InputBatch) -> Result<(), ErrorReply> {
        batch
            .validate()
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        let mut rest: &[InputEvent] = &batch.events;
        while let Some(first) = rest.first() {
            let route = Route::of(first);
            let n = rest
                .iter()
                .position(|e| Route::of(e) != route)
                .unwrap_or(rest.len());
            let (run, tail) = rest.split_at(n);
            rest = tail;
            match route {
                Route::Pointer => self.point(run.to_vec()).await?,
                Route::Keys => self.type_in(run).await?,
                // Only the newest of several counts.
                Route::Viewport => {
                    if let Some(wanted) = run.last().and_then(viewport::Wanted::of) {
                        self.follow(wanted).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn point(&self, events: Vec<InputEvent>) -> Result<(), ErrorReply> {
        let emulation = *self
            .shared
            .emulation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match emulation {
            Some(emu) => self.point_scaled(emu, events).await,
            None => self.point_x(events).await,
        }
    }

    /// Pointer events while the page is scaled: those over the page through
    /// DevTools, the rest (Chromium's bar) through XTest, in order.
    async fn point_scaled(
        &self,
        emu: pointer::Emulation,
        events: Vec<InputEvent>,
    ) -> Result<(), ErrorReply> {
        let now = Instant::now();
        let steps: Vec<pointer::Step> = {
            let mut p = self
                .shared
                .pointer
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            events.iter().map(|e| p.route(emu, e, now)).collect()
        };
        let cdp = self.cdp(Duration::from_secs(5)).await?;
        for step in steps {
            match step {
                pointer::Step::X(e) => self.point_x(vec![e]).await?,
                pointer::Step::Page(m) => {
                    cdp.mouse(m).await.map_err(|e| unavailable(e.to_string()))?
                }
            }
        }
        Ok(())
    }

    async fn point_x(&self, events: Vec<InputEvent>) -> Result<(), ErrorReply> {
        let display = self.display()?;
        // X round trips block: keep them off the runtime thread. The last
        // one returns once the server has every event.
        tokio::task::spawn_blocking(move || {
            display
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .apply(&events)
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|e| unavailable(e.to_string()))
    }

    async fn type_in(&self, events: &[InputEvent]) -> Result<(), ErrorReply> {
        let cdp = self.cdp(Duration::from_secs(5)).await?;
        for e in events {
            let sent = match e {
                InputEvent::Text { text } => cdp.insert_text(&text.0).await,
                InputEvent::KeyDown { keysym } | InputEvent::KeyUp { keysym } => {
                    let down = matches!(e, InputEvent::KeyDown { .. });
                    let key = self
                        .shared
                        .keyboard
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .event(*keysym, down);
                    match key {
                        Some(key) => cdp.key(key).await,
                        None => Ok(()),
                    }
                }
                _ => Ok(()),
            };
            sent.map_err(|e| unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// What the page reports for the controlling viewer ([`notes`]).
    pub fn notes(&self) -> &notes::Notes {
        &self.shared.notes
    }

    /// A PNG of the display.
    pub async fn screenshot(&self) -> Result<Screenshot, ErrorReply> {
        let display = self.display()?;
        let (width, height, png) = tokio::task::spawn_blocking(move || {
            display
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .screenshot()
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|e| unavailable(e.to_string()))?;
        Ok(Screenshot { width, height, png })
    }
}

/// The task that keeps Xvfb and Chromium running.
struct Supervisor {
    reaper: Reaper,
    run_as: Option<RunAs>,
    events: mpsc::Sender<Event>,
    profile: PathBuf,
    shared: Arc<Shared>,
    spec: BrowserSpec,
    cancel: CancellationToken,
}

/// Why a generation of the browser ended.
enum Ended {
    Chromium(String),
    Display(String),
    Stopped,
}

impl Supervisor {
    async fn report(&self, e: BrowserEvent) {
        let _ = self.events.send(Event::Browser(e)).await;
    }

    async fn run(self, ready: oneshot::Sender<Result<BrowserInfo, ErrorReply>>) {
        let mut ready = Some(ready);
        let mut number = None;
        let mut restarts = 0u32;
        while !self.cancel.is_cancelled() {
            let xvfb_started = Instant::now();
            let (mut xvfb, n) = match start_xvfb(&self.reaper, &self.spec, number).await {
                Ok(v) => v,
                Err(e) => match ready.take() {
                    Some(tx) => return drop(tx.send(Err(unavailable(e.to_string())))),
                    None => {
                        self.backoff(&mut restarts, "xvfb", e.to_string()).await;
                        continue;
                    }
                },
            };
            number = Some(n);
            let xvfb_ms = xvfb_started.elapsed().as_millis() as u64;
            let display = format!(":{n}");
            self.report(BrowserEvent::DisplayUp {
                display: display.clone(),
            })
            .await;
            match Display::connect(&display).and_then(|mut d| {
                d.resize(clamp_u16(self.spec.width), clamp_u16(self.spec.height))?;
                Ok(d)
            }) {
                Ok(d) => {
                    *self
                        .shared
                        .display
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(Mutex::new(d)))
                }
                Err(e) => tracing::warn!(error = %e, "cannot connect to the display for input"),
            }
            let ended = self
                .run_chromium(&mut xvfb, (n, xvfb_ms), &mut ready, &mut restarts)
                .await;
            *self
                .shared
                .display
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
            xvfb.kill().await;
            match ended {
                Ended::Display(status) => self.backoff(&mut restarts, "xvfb", status).await,
                Ended::Stopped | Ended::Chromium(_) => break,
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }

    /// Runs Chromium generations on display `n` until the display dies or
    /// the role stops.
    async fn run_chromium(
        &self,
        xvfb: &mut Supervised,
        (n, xvfb_ms): (u32, u64),
        ready: &mut Option<oneshot::Sender<Result<BrowserInfo, ErrorReply>>>,
        restarts: &mut u32,
    ) -> Ended {
        loop {
            let chromium_started = Instant::now();
            let (mut chrome, cdp) = match self.connect(n).await {
                Ok(v) => v,
                Err(why) => match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(why));
                        return Ended::Chromium("failed to start".into());
                    }
                    None => {
                        self.backoff(restarts, "chromium", why.message).await;
                        if self.cancel.is_cancelled() {
                            return Ended::Stopped;
                        }
                        continue;
                    }
                },
            };
            let info = BrowserInfo {
                display: format!(":{n}"),
                chromium_version: cdp.version().to_string(),
                xvfb_ms,
                chromium_ms: chromium_started.elapsed().as_millis() as u64,
            };
            let cdp = Arc::new(cdp);
            self.shared.cdp.send_replace(Some(cdp.clone()));
            self.report(BrowserEvent::BrowserUp).await;
            if let Some(tx) = ready.take() {
                let _ = tx.send(Ok(info));
            } else {
                let last = self
                    .shared
                    .last_url
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                if let Some(url) = last {
                    let _ = cdp.open(&url).await;
                }
                // A new Chromium (or display) starts at the spec's size.
                let fit = *self.shared.viewport.lock().await;
                if let Some(fit) = fit {
                    if let Err(e) = viewport::apply(&self.shared, fit).await {
                        tracing::warn!(error = %e.message, "cannot fit the screen to the viewer again");
                    }
                }
            }
            let notes = match cdp.page_notes().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "no focus or copy notes from the page");
                    futures_util::stream::pending().boxed()
                }
            };
            let ended = self.watch(&mut chrome, xvfb, notes).await;
            self.shared.cdp.send_replace(None);
            chrome.kill().await;
            match ended {
                Ended::Chromium(status) => self.backoff(restarts, "chromium", status).await,
                other => return other,
            }
            if self.cancel.is_cancelled() {
                return Ended::Stopped;
            }
        }
    }

    /// Starts Chromium on display `n` and connects to its DevTools. Under
    /// too little memory its renderers die before any tab works: that
    /// fails the start at once, saying so.
    async fn connect(&self, n: u32) -> Result<(Supervised, Cdp), ErrorReply> {
        let (chrome, ws) = start_chromium(&self.reaper, &self.spec, n, &self.profile, self.run_as)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let result = tokio::select! {
            r = Cdp::connect(&ws) => r.map_err(|e| unavailable(e.to_string())),
            line = chrome.oom() => Err(out_of_memory(&line)),
        };
        match result {
            Ok(cdp) => Ok((chrome, cdp)),
            Err(e) => {
                chrome.kill().await;
                Err(e)
            }
        }
    }

    /// Runs until Chromium or Xvfb exits or the role stops; reports (once)
    /// that Chromium ran out of memory, which leaves it running but unable
    /// to show pages.
    async fn watch(
        &self,
        chrome: &mut Supervised,
        xvfb: &mut Supervised,
        mut notes: BoxStream<'static, notes::PageNote>,
    ) -> Ended {
        let mut oom_reported = false;
        let oom_of = chrome.out_of_memory.clone();
        loop {
            let oom = first_oom(oom_of.clone());
            tokio::select! {
                Some(note) = notes.next() => self.shared.notes.publish(note),
                s = chrome.wait() => return Ended::Chromium(format!("{s:?} {}", chrome.last_error_line())),
                s = xvfb.wait() => return Ended::Display(format!("{s:?} {}", xvfb.last_error_line())),
                _ = self.cancel.cancelled() => return Ended::Stopped,
                line = oom, if !oom_reported => {
                    oom_reported = true;
                    tracing::warn!(line = %line, "Chromium ran out of memory");
                    let detail = airlock_proto::limits::cut(line, airlock_proto::MAX_BROWSER_EVENT_TEXT);
                    self.report(BrowserEvent::OutOfMemory { detail }).await;
                }
            }
        }
    }

    /// Reports a crash and waits before the next start (0.5 s doubling to
    /// 10 s), unless the role is stopping.
    async fn backoff(&self, restarts: &mut u32, process: &str, status: String) {
        *restarts += 1;
        tracing::warn!(process, status = %status, restarts = *restarts, "browser process died; restarting");
        self.report(BrowserEvent::Crashed {
            process: process.into(),
            status: airlock_proto::limits::cut(status, airlock_proto::MAX_BROWSER_EVENT_TEXT),
            restarts: *restarts,
        })
        .await;
        let delay = Duration::from_millis(500 * 2u64.pow((*restarts - 1).min(5)))
            .min(Duration::from_secs(10));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.cancel.cancelled() => {}
        }
    }
}

/// Where an input event goes: the X display, DevTools' keyboard, or the
/// screen's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Pointer,
    Keys,
    Viewport,
}

impl Route {
    fn of(e: &InputEvent) -> Self {
        match e {
            InputEvent::MouseMove { .. }
            | InputEvent::MouseDown { .. }
            | InputEvent::MouseUp { .. }
            | InputEvent::Scroll { .. } => Self::Pointer,
            InputEvent::KeyDown { .. } | InputEvent::KeyUp { .. } | InputEvent::Text { .. } => {
                Self::Keys
            }
            InputEvent::Viewport { .. } => Self::Viewport,
        }
    }
}

/// A pixel count as X wants it.
fn clamp_u16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}
