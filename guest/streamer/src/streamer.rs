//! The streamer's control loop: waits for `start`, builds the capture and
//! the VP8 encoder, reports `ready`, then serves viewers' signals, control
//! changes and the once-a-second stats until `stop` or end of stdin.
//!
//! `main` calls [`run`]. Everything that changes the pipeline's shape
//! (viewers, encoders, the JPEG branch) happens on this one thread; the
//! stdin reader, the bus watcher and the first-frame probe only send it
//! [`Event`]s.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_proto::stream::{
    Codec, Signal, StreamSpec, StreamerCommand, StreamerReport, ViewerSignal,
};

use gstreamer::prelude::*;

use crate::branch::BranchError;
use crate::datachannel::Control;
use crate::encoder::{Counters, Encoder};
use crate::jpeg::Jpeg;
use crate::pipe::{self, Inbound, PipeError, Reporter, Writer};
use crate::pipeline::{self, BusEvent, Capture, PipelineError};
use crate::rate::RateControl;
use crate::sdp;
use crate::viewer::{Context, Viewer};

/// How long the first frame may take after the pipeline starts.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// How often `Stats` go out while a viewer is connected.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Why the streamer stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StreamerError {
    /// stdin or stdout failed.
    #[error(transparent)]
    Pipe(#[from] PipeError),
    /// The agent did not start with `start`.
    #[error("the first command must be start")]
    NotStarted,
    /// The spec is out of range.
    #[error("invalid stream spec: {field} {problem}")]
    Spec {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// No X display to capture.
    #[error("DISPLAY is not set")]
    NoDisplay,
    /// The capture pipeline could not be built or started.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The VP8 encoder could not be built.
    #[error(transparent)]
    Encoder(#[from] BranchError),
    /// The pipeline played but no frame came.
    #[error("no frame was captured within {0:?}")]
    NoFrame(Duration),
    /// An element of the shared pipeline failed.
    #[error("pipeline error in {element}: {message}")]
    Failed {
        /// The element's path.
        element: String,
        /// GStreamer's message.
        message: String,
    },
    /// The capture ended on its own.
    #[error("the capture ended")]
    Ended,
}

/// What the control loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// From stdin.
    Inbound(Inbound),
    /// From the pipeline's bus.
    Bus(BusEvent),
    /// The first frame arrived, with its size.
    Captured {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

/// Runs the streamer on stdin/stdout until it is told to stop.
pub fn run() -> Result<(), StreamerError> {
    let writer = Writer::start()?;
    let (tx, rx) = mpsc::channel();
    let inbound = tx.clone();
    pipe::spawn_reader(std::io::stdin(), move |i| {
        inbound.send(Event::Inbound(i)).is_ok()
    });
    let result = serve(&writer.reporter(), &tx, &rx);
    writer.finish();
    result
}

fn serve(
    reporter: &Reporter,
    tx: &Sender<Event>,
    rx: &Receiver<Event>,
) -> Result<(), StreamerError> {
    let Some(spec) = wait_for_start(rx)? else {
        return Ok(());
    };
    spec.validate().map_err(|e| StreamerError::Spec {
        field: e.field,
        problem: e.problem,
    })?;
    let display = std::env::var("DISPLAY").map_err(|_| StreamerError::NoDisplay)?;
    let mut streamer = Streamer::start(spec, &display, reporter, tx)?;
    let result = streamer.serve(rx);
    streamer.shutdown();
    result
}

/// The spec of the first command, or `None` when stdin ends first.
fn wait_for_start(rx: &Receiver<Event>) -> Result<Option<StreamSpec>, StreamerError> {
    match rx.recv() {
        Ok(Event::Inbound(Inbound::Command(StreamerCommand::Start(spec)))) => Ok(Some(spec)),
        Ok(Event::Inbound(Inbound::Closed | Inbound::Command(StreamerCommand::Stop))) | Err(_) => {
            Ok(None)
        }
        Ok(Event::Inbound(Inbound::Broken(e))) => Err(e.into()),
        Ok(_) => Err(StreamerError::NotStarted),
    }
}

enum Flow {
    Continue,
    Stop,
}

struct Streamer {
    capture: Capture,
    ctx: Context,
    counters: Arc<Counters>,
    encoders: HashMap<Codec, Encoder>,
    viewers: HashMap<String, Viewer>,
    jpeg: Jpeg,
    /// The encoders' bitrate, following the worst viewer's feedback.
    rate: RateControl,
    /// Viewer signals that came before the first frame.
    early: Vec<ViewerSignal>,
    ready: bool,
}

impl Streamer {
    fn start(
        spec: StreamSpec,
        x_display: &str,
        reporter: &Reporter,
        tx: &Sender<Event>,
    ) -> Result<Self, StreamerError> {
        tracing::info!(
            display = x_display,
            framerate = spec.framerate,
            bitrate_kbps = spec.bitrate_kbps,
            "starting"
        );
        let capture = Capture::build(&spec, x_display)?;
        let counters = Arc::new(Counters::default());
        let vp8 = Encoder::start(
            Codec::Vp8,
            capture.pipeline(),
            capture.raw_tee(),
            &spec,
            counters.clone(),
            capture.waker(),
        )?;
        let first = tx.clone();
        capture.on_first_frame(move |width, height| {
            let _ = first.send(Event::Captured { width, height });
        });
        let bus = tx.clone();
        capture.play(move |e| {
            let _ = bus.send(Event::Bus(e));
        })?;
        let ctx = Context {
            pipeline: capture.pipeline().clone(),
            reporter: reporter.clone(),
            control: Control::default(),
            spec: Arc::new(spec),
        };
        Ok(Self {
            rate: RateControl::new(ctx.spec.bitrate_kbps),
            jpeg: Jpeg::new(ctx.spec.jpeg_fps.min(60), ctx.spec.jpeg_quality),
            capture,
            ctx,
            counters,
            encoders: HashMap::from([(Codec::Vp8, vp8)]),
            viewers: HashMap::new(),
            early: Vec::new(),
            ready: false,
        })
    }

    fn serve(&mut self, rx: &Receiver<Event>) -> Result<(), StreamerError> {
        let ready_by = Instant::now() + READY_DEADLINE;
        let mut next_stats = Instant::now() + STATS_INTERVAL;
        loop {
            let wake = if self.ready {
                next_stats
            } else {
                next_stats.min(ready_by)
            };
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(event) => {
                    if let Flow::Stop = self.handle(event)? {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let now = Instant::now();
            if !self.ready && now >= ready_by {
                return Err(StreamerError::NoFrame(READY_DEADLINE));
            }
            if now >= next_stats {
                self.report_stats();
                next_stats = now + STATS_INTERVAL;
            }
        }
    }

    fn handle(&mut self, event: Event) -> Result<Flow, StreamerError> {
        match event {
            Event::Inbound(Inbound::Command(command)) => return Ok(self.command(command)),
            Event::Inbound(Inbound::Closed) => {
                tracing::info!("stdin closed, stopping");
                return Ok(Flow::Stop);
            }
            Event::Inbound(Inbound::Broken(e)) => return Err(e.into()),
            Event::Bus(e) => self.bus(e)?,
            Event::Captured { width, height } => self.on_ready(width, height),
        }
        Ok(Flow::Continue)
    }

    fn command(&mut self, command: StreamerCommand) -> Flow {
        match command {
            StreamerCommand::Start(_) => tracing::warn!("ignoring a second start"),
            StreamerCommand::Viewer(signal) if !self.ready => self.early.push(signal),
            StreamerCommand::Viewer(signal) => self.signal(signal),
            StreamerCommand::Control { viewer_id } => self.set_control(viewer_id),
            StreamerCommand::Stop => {
                tracing::info!("stop requested");
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn bus(&mut self, event: BusEvent) -> Result<(), StreamerError> {
        match event {
            BusEvent::Error {
                element,
                message,
                viewer: Some(id),
            } => {
                tracing::warn!(viewer_id = %id, %element, error = %message, "viewer failed");
                self.ctx
                    .reporter
                    .viewer_error(&id, "the streamer's connection to this viewer failed");
                self.remove_viewer(&id);
                Ok(())
            }
            BusEvent::Error {
                element, message, ..
            } => Err(StreamerError::Failed { element, message }),
            BusEvent::Eos => Err(StreamerError::Ended),
        }
    }

    fn on_ready(&mut self, width: u32, height: u32) {
        if self.ready {
            return;
        }
        tracing::info!(width, height, "capturing");
        self.ready = true;
        self.ctx
            .reporter
            .send(StreamerReport::Ready { width, height });
        for signal in std::mem::take(&mut self.early) {
            self.signal(signal);
        }
    }

    fn set_control(&mut self, viewer: Option<String>) {
        tracing::info!(viewer_id = ?viewer, "input control changed");
        self.ctx.control.set(viewer);
        for v in self.viewers.values() {
            v.notify_control();
        }
    }

    fn report_stats(&mut self) {
        self.adapt_bitrate();
        let connected = self.viewers.values().filter(|v| v.connected()).count();
        if connected > 0 {
            let stats = self
                .counters
                .snapshot(connected as u32, self.rate.applied_kbps());
            self.ctx.reporter.send_lossy(StreamerReport::Stats(stats));
        }
    }

    /// Feeds the connected viewers' receiver reports to the rate control
    /// and gives every encoder its new target.
    fn adapt_bitrate(&mut self) {
        for (id, v) in self.viewers.iter().filter(|(_, v)| v.connected()) {
            let report = v.feedback();
            if let Some(r) = report {
                tracing::debug!(viewer_id = %id, fraction_lost = r.fraction_lost, rtt_ms = ?r.rtt_ms, "receiver report");
            }
            self.rate.report(id, report);
        }
        if let Some(kbps) = self.rate.next_target() {
            tracing::info!(target_kbps = kbps, "encoder bitrate adapted");
            for encoder in self.encoders.values() {
                encoder.set_bitrate(kbps);
            }
        }
    }

    /// Dispatches one viewer signal; problems go back to that viewer.
    fn signal(&mut self, vs: ViewerSignal) {
        let id_ok = ViewerSignal {
            viewer_id: vs.viewer_id.clone(),
            signal: Signal::KeyFrame,
        }
        .validate()
        .is_ok();
        if !id_ok {
            // An error could not be addressed to it either.
            tracing::warn!("dropping a signal with an invalid viewer id");
            return;
        }
        if let Err(e) = vs.validate() {
            let message = format!("invalid {}: {}", e.field, e.problem);
            self.ctx.reporter.viewer_error(&vs.viewer_id, message);
            return;
        }
        let id = vs.viewer_id;
        let reporter = self.ctx.reporter.clone();
        match vs.signal {
            Signal::Offer { sdp, codec } => self.offer(&id, &sdp, codec),
            Signal::Candidate {
                candidate,
                sdp_m_line_index,
            } => self.candidate(&id, sdp_m_line_index, &candidate),
            Signal::EndOfCandidates => self.with_viewer(&id, |v| v.add_candidate(0, None)),
            Signal::KeyFrame => self.with_viewer(&id, Viewer::request_keyframe),
            Signal::Jpeg { fps } => self.jpeg(&id, fps),
            Signal::Leave => {
                self.remove_viewer(&id);
                self.jpeg(&id, 0);
            }
            Signal::Error { message } => {
                tracing::info!(viewer_id = %id, %message, "viewer reported an error");
            }
            Signal::Answer { .. }
            | Signal::State { .. }
            | Signal::Focus { .. }
            | Signal::Clipboard { .. } => {
                reporter.viewer_error(
                    &id,
                    "viewers send offers, not answers, states, focus or clipboard",
                );
            }
        }
    }

    /// A remote candidate; an empty one means the viewer has no more (the
    /// browser's `icecandidate` event with an empty candidate).
    fn candidate(&self, id: &str, mline: u32, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return self.with_viewer(id, |v| v.add_candidate(mline, None));
        }
        // webrtcbin would take anything else for end-of-candidates.
        if !line.starts_with("candidate:") && !line.starts_with("a=candidate:") {
            self.ctx
                .reporter
                .viewer_error(id, "not an ICE candidate line");
            return;
        }
        self.with_viewer(id, |v| v.add_candidate(mline, Some(line)));
    }

    fn with_viewer(&self, id: &str, f: impl FnOnce(&Viewer)) {
        match self.viewers.get(id) {
            Some(v) => f(v),
            None => self
                .ctx
                .reporter
                .viewer_error(id, "unknown viewer: send an offer first"),
        }
    }

    fn offer(&mut self, id: &str, text: &str, codec: Option<Codec>) {
        if let Err(message) = self.try_offer(id, text, codec) {
            tracing::warn!(viewer_id = %id, error = %message, "offer failed");
            self.ctx.reporter.viewer_error(id, message);
        }
    }

    fn try_offer(&mut self, id: &str, text: &str, codec: Option<Codec>) -> Result<(), String> {
        let offer = sdp::parse(text).map_err(|e| e.to_string())?;
        let choice = sdp::choose(&offer, codec).map_err(|e| e.to_string())?;
        if let Some(viewer) = self.viewers.get_mut(id) {
            if viewer.choice() == choice {
                return viewer.renegotiate(offer).map_err(|e| e.to_string());
            }
            // Another codec or payload type needs another branch.
            tracing::info!(viewer_id = %id, "codec changed, rebuilding the viewer");
            self.remove_viewer(id);
        }
        self.start_encoder(choice.codec)
            .map_err(|e| e.to_string())?;
        let encoder = &self.encoders[&choice.codec];
        let viewer =
            Viewer::create(&self.ctx, encoder, id, offer, choice).map_err(|e| e.to_string())?;
        let elements = self.capture.pipeline().children().len();
        tracing::info!(viewer_id = %id, codec = ?choice.codec, payload = choice.payload, elements, "viewer added");
        pipeline::update_latency(self.capture.pipeline());
        self.viewers.insert(id.to_owned(), viewer);
        Ok(())
    }

    /// Starts the encoder for `codec` unless it runs already.
    fn start_encoder(&mut self, codec: Codec) -> Result<(), BranchError> {
        if !self.encoders.contains_key(&codec) {
            let encoder = Encoder::start(
                codec,
                self.capture.pipeline(),
                self.capture.raw_tee(),
                &self.ctx.spec,
                self.counters.clone(),
                self.capture.waker(),
            )?;
            self.encoders.insert(codec, encoder);
        }
        Ok(())
    }

    fn remove_viewer(&mut self, id: &str) {
        let Some(viewer) = self.viewers.remove(id) else {
            return;
        };
        viewer.close();
        self.rate.remove(id);
        // H.264 costs a second encode: stop it when its last viewer goes.
        let h264_used = self
            .viewers
            .values()
            .any(|v| v.choice().codec == Codec::H264);
        if !h264_used {
            if let Some(encoder) = self.encoders.remove(&Codec::H264) {
                encoder.stop();
            }
        }
        let elements = self.capture.pipeline().children().len();
        tracing::debug!(viewer_id = %id, elements, "viewer gone");
    }

    fn jpeg(&mut self, id: &str, fps: u32) {
        if fps > 0 && self.ctx.spec.jpeg_fps == 0 {
            self.ctx
                .reporter
                .viewer_error(id, "the JPEG fallback is off");
            return;
        }
        let result = self.jpeg.want(
            id,
            fps,
            self.capture.pipeline(),
            self.capture.raw_tee(),
            &self.ctx.reporter,
        );
        if let Err(e) = result {
            tracing::warn!(viewer_id = %id, error = %e, "JPEG fallback failed");
            self.ctx.reporter.viewer_error(id, e.to_string());
        }
    }

    fn shutdown(&mut self) {
        for (_, viewer) in self.viewers.drain() {
            viewer.close();
        }
        self.jpeg.stop();
        self.capture.stop();
        tracing::info!("stopped");
    }
}
