//! The capture half of the pipeline: the X display grabbed at the spec's
//! frame rate, converted once, and split by a raw `tee` that the encoders
//! and the JPEG fallback hang off. Also watches the bus for errors.
//!
//! `streamer` builds one [`Capture`] per run and waits for its first frame
//! (which gives the `Ready` size) before it accepts viewers.

use std::sync::Arc;
use std::thread;

use airlock_proto::stream::StreamSpec;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_video as gst_video;

use crate::branch::{self, BranchError};
use crate::damage::{Gate, Wake};

/// Why the capture pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// GStreamer itself could not start.
    #[error("cannot initialise GStreamer: {0}")]
    Init(String),
    /// An element could not be made or linked.
    #[error(transparent)]
    Build(#[from] BranchError),
    /// The pipeline would not play (no X display?).
    #[error("the capture pipeline would not start: {0}")]
    Start(String),
}

/// What the bus watcher reports.
#[derive(Debug)]
pub enum BusEvent {
    /// An element failed. `viewer` names the viewer whose `webrtcbin` it
    /// sits in, if any: such an error ends that viewer, not the stream.
    Error {
        /// The failing element's path.
        element: String,
        /// GStreamer's message and debug detail.
        message: String,
        /// The viewer the element belongs to.
        viewer: Option<String>,
    },
    /// The capture ended (the display went away).
    Eos,
}

/// The capture pipeline.
#[derive(Debug)]
pub struct Capture {
    pipeline: gst::Pipeline,
    raw_tee: gst::Element,
    gate: Arc<Gate>,
}

/// Every element the pipeline may make (for `--warm-up`).
pub const ELEMENTS: &[&str] = &[
    "ximagesrc",
    "capsfilter",
    "videoconvert",
    "videorate",
    "queue",
    "tee",
    "webrtcbin",
    "vp8enc",
    "rtpvp8pay",
    "x264enc",
    "rtph264pay",
    "jpegenc",
];

/// Prefix of each viewer's `webrtcbin` name; the bus watcher uses it to tell
/// a viewer's failure from the stream's.
pub const WEBRTC_PREFIX: &str = "webrtc-";

impl Capture {
    /// Builds `ximagesrc ! caps ! videoconvert ! queue ! tee` for `display`,
    /// with frames of an unchanged screen dropped right after the grab and
    /// the next grab held until the screen changes ([`crate::damage`]).
    pub fn build(spec: &StreamSpec, display: &str) -> Result<Self, PipelineError> {
        gst::init().map_err(|e| PipelineError::Init(e.to_string()))?;
        let pipeline = gst::Pipeline::with_name("airlock-streamer");
        let gate = Arc::new(Gate::open(display));
        let src = branch::make("ximagesrc", "capture")?;
        src.set_property("display-name", display);
        // Named by its id, the root window is re-measured at each grab: the
        // caps follow when the screen is resized (a viewer's viewport), and
        // the encoders start a new keyframe at the new size. Set before the
        // element opens the display (linking does).
        if let Some(root) = gate.root() {
            src.set_property("xid", u64::from(root));
        }
        src.set_property("use-damage", false);
        src.set_property("show-pointer", true);
        let rate = branch::make("capsfilter", "capture-rate")?;
        rate.set_property(
            "caps",
            gst::Caps::builder("video/x-raw")
                .field("framerate", gst::Fraction::new(spec.framerate as i32, 1))
                .build(),
        );
        let convert = branch::make("videoconvert", "convert")?;
        let queue = branch::leaky_queue("raw-queue", 1)?;
        let raw_tee = branch::tee("raw-tee")?;
        let chain = [&src, &rate, &convert, &queue, &raw_tee];
        pipeline
            .add_many(chain)
            .map_err(|_| BranchError::Link("capture".into()))?;
        gst::Element::link_many(chain).map_err(|_| BranchError::Link("capture".into()))?;
        let grabbed = src
            .static_pad("src")
            .ok_or_else(|| BranchError::Link("capture".into()))?;
        let g = gate.clone();
        grabbed.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            if g.pass() {
                return gst::PadProbeReturn::Ok;
            }
            g.hold();
            gst::PadProbeReturn::Drop
        });
        Ok(Self {
            pipeline,
            raw_tee,
            gate,
        })
    }

    /// A handle that makes the next captured frame go on (encoders that
    /// need a frame now: a keyframe for a new viewer).
    pub fn waker(&self) -> Wake {
        self.gate.waker()
    }

    /// The pipeline everything else is added to.
    pub fn pipeline(&self) -> &gst::Pipeline {
        &self.pipeline
    }

    /// The tee carrying raw frames.
    pub fn raw_tee(&self) -> &gst::Element {
        &self.raw_tee
    }

    /// Calls `on_size` with the frame size of the first captured frame.
    pub fn on_first_frame(&self, on_size: impl FnOnce(u32, u32) + Send + 'static) {
        let Some(pad) = self.raw_tee.static_pad("sink") else {
            return;
        };
        let on_size = std::sync::Mutex::new(Some(on_size));
        pad.add_probe(gst::PadProbeType::BUFFER, move |pad, _| {
            let info = pad
                .current_caps()
                .and_then(|caps| gst_video::VideoInfo::from_caps(&caps).ok());
            let callback = on_size.lock().ok().and_then(|mut f| f.take());
            if let (Some(info), Some(callback)) = (info, callback) {
                callback(info.width(), info.height());
            }
            gst::PadProbeReturn::Remove
        });
    }

    /// Sets the pipeline playing, then starts the bus watcher thread
    /// (messages posted meanwhile wait on the bus).
    pub fn play(&self, on_bus: impl Fn(BusEvent) + Send + 'static) -> Result<(), PipelineError> {
        let bus = self
            .pipeline
            .bus()
            .ok_or_else(|| PipelineError::Start("no bus".into()))?;
        if self.pipeline.set_state(gst::State::Playing).is_err() {
            // The element's own error says why (e.g. "Could not open X display").
            let reason = bus
                .pop_filtered(&[gst::MessageType::Error])
                .and_then(|msg| match msg.view() {
                    gst::MessageView::Error(err) => Some(err.error().to_string()),
                    _ => None,
                })
                .unwrap_or_else(|| "state change to PLAYING failed".into());
            return Err(PipelineError::Start(reason));
        }
        let pipeline = self.pipeline.downgrade();
        thread::Builder::new()
            .name("bus".into())
            .spawn(move || watch_bus(&bus, &pipeline, on_bus))
            .map_err(|e| PipelineError::Start(e.to_string()))?;
        Ok(())
    }

    /// Stops everything (viewers' `webrtcbin`s included) and ends the bus
    /// watcher.
    pub fn stop(&self) {
        let _ = self.pipeline.set_state(gst::State::Null);
        if let Some(bus) = self.pipeline.bus() {
            let _ = bus.post(gst::message::Application::new(gst::Structure::new_empty(
                "airlock-stop",
            )));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // Elements must reach NULL before they are freed, also when the
        // start failed half-way.
        self.stop();
    }
}

/// Distributes the pipeline's latency to elements added since it started
/// (each viewer's RTP session needs it to timestamp its sender reports).
pub fn update_latency(pipeline: &gst::Pipeline) {
    if pipeline.recalculate_latency().is_err() {
        tracing::debug!("latency recalculation failed");
    }
}

fn watch_bus(
    bus: &gst::Bus,
    pipeline: &gst::glib::WeakRef<gst::Pipeline>,
    on_bus: impl Fn(BusEvent),
) {
    use gst::MessageView;
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        match msg.view() {
            MessageView::Error(err) => on_bus(BusEvent::Error {
                element: source_path(&msg),
                message: match err.debug() {
                    Some(debug) => format!("{} ({debug})", err.error()),
                    None => err.error().to_string(),
                },
                viewer: viewer_of(&msg),
            }),
            MessageView::Warning(w) => {
                tracing::warn!(source = %source_path(&msg), warning = %w.error(), "pipeline warning");
            }
            MessageView::Eos(_) => on_bus(BusEvent::Eos),
            MessageView::Latency(_) => {
                if let Some(pipeline) = pipeline.upgrade() {
                    update_latency(&pipeline);
                }
            }
            MessageView::Application(a)
                if a.structure().is_some_and(|s| s.name() == "airlock-stop") =>
            {
                return;
            }
            _ => {}
        }
    }
}

fn source_path(msg: &gst::Message) -> String {
    msg.src()
        .map(|s| s.path_string().to_string())
        .unwrap_or_else(|| "?".into())
}

/// The viewer whose `webrtcbin` contains the message's source, if any.
fn viewer_of(msg: &gst::Message) -> Option<String> {
    let mut object = msg.src().cloned();
    while let Some(o) = object {
        if let Some(id) = o.name().strip_prefix(WEBRTC_PREFIX) {
            return Some(id.to_owned());
        }
        object = o.parent();
    }
    None
}
