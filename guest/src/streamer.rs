//! The live view's streamer process (`airlock-streamer`, a glibc binary
//! beside this static agent): started on the browser role's display,
//! fed viewers' signals over its stdin, read for answers, candidates, input
//! and fallback frames on its stdout, and restarted with backoff when it
//! dies. Input from the controlling viewer is injected through the browser
//! role's XTest path, the same one the input endpoint uses. Owned by
//! [`crate::agent::Agent`], which maps the stream operations onto it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_proto::limits::{cut, MAX_FRAME_BYTES};
use airlock_proto::stream::{
    check_viewer_id, Signal, StreamEvent, StreamSpec, StreamerCommand, StreamerReport,
    StreamerState, ViewerSignal, MAX_SIGNAL_MESSAGE_BYTES,
};
use airlock_proto::{frame, ErrorCode, ErrorReply, Event, FrameDecoder, InputBatch};
use tokio::net::unix::pipe;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::browser::procs::{spawn, Supervised};
use crate::browser::BrowserRole;
use crate::process::{ExitInfo, Reaper};
use crate::wire::{read_payload, write_message};

/// How long a start waits for the first pipeline to play (GStreamer's
/// first start in a VM under TCG loads its plugins slowly).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// The warm-up scans every plugin: about 20 s in a VM under TCG.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(120);
/// First and largest wait before a restart.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A generation that ran this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Commands queued for the streamer (signals arrive in bursts of
/// candidates; a streamer that stops reading must not grow the agent).
const COMMAND_QUEUE: usize = 256;
/// Environment variable naming the streamer binary (tests, odd layouts).
pub const STREAMER_ENV: &str = "AIRLOCK_STREAMER";

/// A generation of the streamer ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum StreamerError {
    /// The process could not be spawned or fed.
    #[error("cannot start the streamer: {0}")]
    Start(String),
    /// It exited (or broke the pipe protocol).
    #[error("the streamer {0}")]
    Died(String),
}

/// The streamer binary: `$AIRLOCK_STREAMER`, else next to the agent, else
/// where images install it.
pub fn streamer_program() -> PathBuf {
    if let Some(p) = std::env::var_os(STREAMER_ENV) {
        return PathBuf::from(p);
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("airlock-streamer")));
    match sibling {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("/usr/lib/airlock/airlock-streamer"),
    }
}

/// GStreamer's plugin registry in a VM (the agent's runtime directory):
/// the same file for the warm-up before a snapshot and every later
/// streamer. Elsewhere GStreamer's own default.
fn gst_registry() -> Option<PathBuf> {
    let dir = std::path::Path::new("/run/airlock");
    dir.is_dir().then(|| dir.join("gst-registry.bin"))
}

fn with_registry(cmd: &mut Command) -> &mut Command {
    if let Some(r) = gst_registry() {
        cmd.env("GST_REGISTRY", r);
    }
    cmd
}

/// Builds GStreamer's registry and loads the pipeline's elements once
/// (`airlock-streamer --warm-up`), before this VM is snapshotted.
pub async fn warm_up(reaper: &Reaper) -> Result<(), String> {
    let program = streamer_program();
    let mut cmd = Command::new(&program);
    with_registry(&mut cmd)
        .arg("--warm-up")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (mut sup, _, _) = spawn(reaper, "streamer", &mut cmd)
        .map_err(|e| format!("cannot warm up {} ({e})", program.display()))?;
    match tokio::time::timeout(WARM_UP_TIMEOUT, sup.wait()).await {
        Ok(exit) if exit.exit_code == Some(0) => Ok(()),
        Ok(exit) => Err(format!(
            "the streamer's warm-up failed ({exit:?}): {}",
            sup.last_error_line()
        )),
        Err(_) => {
            sup.kill().await;
            Err(format!(
                "the streamer's warm-up took over {WARM_UP_TIMEOUT:?}"
            ))
        }
    }
}

struct Running {
    cancel: CancellationToken,
    commands: mpsc::Sender<StreamerCommand>,
}

/// The streamer and its supervisor.
pub struct Streamer {
    reaper: Reaper,
    events: mpsc::Sender<Event>,
    browser: Arc<BrowserRole>,
    /// The viewer whose input counts; kept here so a restarted streamer
    /// gets it again.
    control: Arc<Mutex<Option<String>>>,
    running: Mutex<Option<Running>>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Streamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamer")
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

fn busy(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::Busy, message)
}

impl Streamer {
    /// A stopped streamer for `browser`'s display.
    pub fn new(reaper: Reaper, events: mpsc::Sender<Event>, browser: Arc<BrowserRole>) -> Self {
        Self {
            reaper,
            events,
            browser,
            control: Arc::default(),
            running: Mutex::new(None),
            tracker: TaskTracker::new(),
        }
    }

    /// True while a streamer generation runs.
    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|r| !r.cancel.is_cancelled())
    }

    /// Starts the streamer and waits for its pipeline to play; a second
    /// start while it runs is a no-op. The first generation failing is an
    /// error (a missing binary is not retried forever); later deaths are
    /// restarted with backoff.
    pub async fn start(&self, spec: StreamSpec) -> Result<(), ErrorReply> {
        spec.validate()
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        if self.is_running() {
            return Ok(());
        }
        let display = self.browser.display_name().ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::Io,
                "the display is not running (start the browser first)",
            )
        })?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let cancel = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let sup = Supervisor {
            reaper: self.reaper.clone(),
            events: self.events.clone(),
            browser: self.browser.clone(),
            control: self.control.clone(),
            program: streamer_program(),
            display,
            spec: spec.clone(),
            cancel: cancel.clone(),
        };
        self.tracker.spawn(relay_notes(
            self.browser.clone(),
            self.control.clone(),
            self.events.clone(),
            spec.copy_out,
            cancel.clone(),
        ));
        self.tracker.spawn(sup.run(rx, ready_tx));
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = Some(Running {
            cancel: cancel.clone(),
            commands: tx,
        });
        let outcome = tokio::time::timeout(START_TIMEOUT, ready_rx).await;
        let why = match outcome {
            Ok(Ok(Ok(()))) => return Ok(()),
            Ok(Ok(Err(why))) => why,
            Ok(Err(_)) => "the streamer's supervisor ended".into(),
            Err(_) => format!("the streamer did not start within {START_TIMEOUT:?}"),
        };
        self.stop().await;
        Err(ErrorReply::new(ErrorCode::Io, why))
    }

    /// Stops the streamer and waits for it.
    pub async fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(r) = running {
            r.cancel.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
        self.tracker.reopen();
    }

    fn send(&self, cmd: StreamerCommand) -> Result<(), ErrorReply> {
        let guard = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let r = guard
            .as_ref()
            .ok_or_else(|| busy("the streamer is not running (start it first)"))?;
        r.commands.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => busy("the streamer is not keeping up"),
            mpsc::error::TrySendError::Closed(_) => busy("the streamer is stopping"),
        })
    }

    /// Hands a viewer's signal to the streamer.
    pub fn signal(&self, signal: ViewerSignal) -> Result<(), ErrorReply> {
        signal
            .validate()
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        self.send(StreamerCommand::Viewer(signal))
    }

    /// Sets the viewer whose input is injected.
    pub fn set_control(&self, viewer_id: Option<String>) -> Result<(), ErrorReply> {
        if let Some(v) = &viewer_id {
            check_viewer_id(v)
                .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        }
        viewer_id.clone_into(&mut self.control.lock().unwrap_or_else(PoisonError::into_inner));
        // The new controller's keyboard follows the page's focus as it is.
        let editable = *self.browser.notes().focus().borrow();
        tell_controller(&self.control, &self.events, Signal::Focus { editable });
        match self.send(StreamerCommand::Control { viewer_id }) {
            // Kept for the next start.
            Err(_) if !self.is_running() => Ok(()),
            other => other,
        }
    }
}

/// The task that keeps one streamer running.
struct Supervisor {
    reaper: Reaper,
    events: mpsc::Sender<Event>,
    browser: Arc<BrowserRole>,
    control: Arc<Mutex<Option<String>>>,
    program: PathBuf,
    display: String,
    spec: StreamSpec,
    cancel: CancellationToken,
}

impl Supervisor {
    async fn state(&self, state: StreamerState, restarts: u32, detail: Option<String>) {
        // What GStreamer or a crash said, cut to what the host accepts.
        let detail = detail.map(|d| cut(d, MAX_SIGNAL_MESSAGE_BYTES));
        let e = StreamEvent::State {
            state,
            restarts,
            detail,
        };
        let _ = self.events.send(Event::Stream(e)).await;
    }

    async fn run(
        self,
        mut commands: mpsc::Receiver<StreamerCommand>,
        ready: oneshot::Sender<Result<(), String>>,
    ) {
        let mut ready = Some(ready);
        let (mut restarts, mut backoff) = (0u32, BACKOFF_MIN);
        loop {
            self.state(StreamerState::Starting, restarts, None).await;
            let began = Instant::now();
            let ended = self.generation(&mut commands, &mut ready, restarts).await;
            let why = match ended {
                Ok(()) => break,
                Err(e) => e.to_string(),
            };
            if let Some(tx) = ready.take() {
                let _ = tx.send(Err(why));
                return;
            }
            restarts += 1;
            if began.elapsed() > STABLE_AFTER {
                backoff = BACKOFF_MIN;
            }
            tracing::warn!(
                restarts,
                backoff_ms = backoff.as_millis() as u64,
                "{why}; restarting it"
            );
            self.state(StreamerState::Restarting, restarts, Some(why))
                .await;
            // Signals meant for the dead streamer's viewers are void: they
            // renegotiate once it reports running again.
            while commands.try_recv().is_ok() {}
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.state(StreamerState::Stopped, restarts, None).await;
    }

    fn spawn(&self) -> Result<(Supervised, pipe::Receiver, pipe::Sender), StreamerError> {
        let mut cmd = Command::new(&self.program);
        with_registry(&mut cmd)
            .env("DISPLAY", &self.display)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let (sup, stdout, stdin) = spawn(&self.reaper, "streamer", &mut cmd)
            .map_err(|e| StreamerError::Start(format!("{} ({e})", self.program.display())))?;
        match (stdout, stdin) {
            (Some(out), Some(inp)) => Ok((sup, out, inp)),
            _ => Err(StreamerError::Start("its pipes could not be opened".into())),
        }
    }

    /// Runs one streamer process until it dies (`Err`) or the supervisor
    /// is cancelled (`Ok`).
    async fn generation(
        &self,
        commands: &mut mpsc::Receiver<StreamerCommand>,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
        restarts: u32,
    ) -> Result<(), StreamerError> {
        let (mut child, mut out, mut inp) = self.spawn()?;
        let first = [
            StreamerCommand::Start(self.spec.clone()),
            StreamerCommand::Control {
                viewer_id: self
                    .control
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            },
        ];
        for cmd in &first {
            if let Err(e) = write_message(&mut inp, cmd, MAX_FRAME_BYTES).await {
                child.kill().await;
                return Err(StreamerError::Start(format!(
                    "cannot send it its spec: {e}"
                )));
            }
        }
        let (mut dec, mut buf) = (FrameDecoder::new(MAX_FRAME_BYTES), vec![0u8; 64 << 10]);
        let result = loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break Ok(()),
                exit = child.wait() => break Err(died(exit, &child)),
                Some(cmd) = commands.recv() => {
                    if let Err(e) = write_message(&mut inp, &cmd, MAX_FRAME_BYTES).await {
                        break Err(StreamerError::Died(format!("stopped reading: {e}")));
                    }
                }
                payload = read_payload(&mut out, &mut dec, &mut buf) => {
                    let report = match payload {
                        Ok(Some(p)) => frame::decode_payload::<StreamerReport>(&p),
                        // Closed its output: its exit (or a kill) follows.
                        Ok(None) => match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                            Ok(exit) => break Err(died(exit, &child)),
                            Err(_) => break Err(StreamerError::Died("closed its output but kept running".into())),
                        },
                        Err(e) => break Err(StreamerError::Died(format!("broke its pipe protocol: {e}"))),
                    };
                    match report {
                        Ok(r) => self.handle(r, ready, restarts).await,
                        Err(e) => break Err(StreamerError::Died(format!("sent a bad report: {e}"))),
                    }
                }
            }
        };
        if result.is_ok() {
            let _ = write_message(&mut inp, &StreamerCommand::Stop, MAX_FRAME_BYTES).await;
            drop(inp);
            if tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        child.kill().await;
        result
    }

    async fn handle(
        &self,
        report: StreamerReport,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
        restarts: u32,
    ) {
        match report {
            StreamerReport::Ready { width, height } => {
                tracing::info!(width, height, restarts, "the streamer is playing");
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Ok(()));
                }
                self.state(StreamerState::Running, restarts, None).await;
            }
            StreamerReport::Viewer(v) => {
                if v.validate().is_ok() {
                    let _ = self
                        .events
                        .send(Event::Stream(StreamEvent::Viewer(v)))
                        .await;
                }
            }
            StreamerReport::Input { viewer_id, events } => self.input(viewer_id, events).await,
            // Frames and counters are worth nothing late: dropped when the
            // host is not keeping up, rather than delaying signals.
            StreamerReport::Jpeg { data } => {
                let _ = self
                    .events
                    .try_send(Event::Stream(StreamEvent::Jpeg { data }));
            }
            StreamerReport::Stats(s) => {
                let _ = self.events.try_send(Event::Stream(StreamEvent::Stats(s)));
            }
        }
    }

    /// Injects a viewer's input if that viewer controls (the streamer
    /// filters too; this is the agent's own check).
    async fn input(&self, viewer_id: String, events: Vec<airlock_proto::InputEvent>) {
        let controls = self
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
            == Some(viewer_id.as_str());
        if !controls {
            tracing::debug!(viewer_id, "input from a viewer without control dropped");
            return;
        }
        if let Err(e) = self.browser.input(InputBatch { events }).await {
            tracing::debug!(viewer_id, error = %e.message, "viewer input not applied");
        }
    }
}

/// Tells the controlling viewer what the page reports ([`crate::browser::notes`]):
/// focus changes, and copies when the operator allows copying out. Ends
/// with the streamer.
async fn relay_notes(
    browser: Arc<BrowserRole>,
    control: Arc<Mutex<Option<String>>>,
    events: mpsc::Sender<Event>,
    copy_out: bool,
    cancel: CancellationToken,
) {
    let mut focus = browser.notes().focus();
    let mut copies = browser.notes().copies();
    loop {
        let signal = tokio::select! {
            _ = cancel.cancelled() => return,
            changed = focus.changed() => match changed {
                Ok(()) => Signal::Focus { editable: *focus.borrow_and_update() },
                Err(_) => return,
            },
            copied = copies.recv() => match copied {
                Ok(text) if copy_out => Signal::Clipboard { text },
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            },
        };
        tell_controller(&control, &events, signal);
    }
}

/// Sends `signal` to the controlling viewer, if any. Notes are worth
/// nothing late: dropped when the host is not keeping up.
fn tell_controller(control: &Mutex<Option<String>>, events: &mpsc::Sender<Event>, signal: Signal) {
    let Some(viewer_id) = control
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    else {
        return;
    };
    let v = ViewerSignal { viewer_id, signal };
    let _ = events.try_send(Event::Stream(StreamEvent::Viewer(v)));
}

fn died(exit: ExitInfo, child: &Supervised) -> StreamerError {
    let how = match (exit.exit_code, exit.signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".into(),
    };
    let last = child.last_error_line();
    StreamerError::Died(match last.is_empty() {
        true => format!("ended with {how}"),
        false => format!("ended with {how}: {last}"),
    })
}
