//! The JPEG fallback view, for viewers whose WebRTC did not connect: raw
//! frames rate-limited, JPEG-encoded and reported as `Report::Jpeg`.
//!
//! `streamer` keeps at most one [`Jpeg`] branch, running only while some
//! viewer asked for frames, at the highest rate any of them asked for.

use std::collections::HashMap;

use airlock_proto::stream::{StreamerReport, MAX_JPEG_BYTES};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use crate::branch::{self, Branch, BranchError};
use crate::pipe::Reporter;

/// The running branch.
#[derive(Debug)]
struct Running {
    rate: gst::Element,
    fps: u32,
    branch: Branch,
}

/// Who wants JPEG frames, and the branch that makes them.
#[derive(Debug)]
pub struct Jpeg {
    max_fps: u32,
    quality: u32,
    wanted: HashMap<String, u32>,
    running: Option<Running>,
}

impl Jpeg {
    /// No branch yet; frames at most `max_fps` (the spec's `jpegFps`).
    pub fn new(max_fps: u32, quality: u32) -> Self {
        Self {
            max_fps,
            quality,
            wanted: HashMap::new(),
            running: None,
        }
    }

    /// Records what `viewer` wants (0: nothing) and starts, retunes or
    /// stops the branch to match.
    pub fn want(
        &mut self,
        viewer: &str,
        fps: u32,
        pipeline: &gst::Pipeline,
        raw_tee: &gst::Element,
        reporter: &Reporter,
    ) -> Result<(), BranchError> {
        if fps == 0 {
            self.wanted.remove(viewer);
        } else {
            self.wanted.insert(viewer.to_owned(), fps.min(self.max_fps));
        }
        let target = self.wanted.values().copied().max().unwrap_or(0);
        match (&self.running, target) {
            (None, 0) => Ok(()),
            (Some(_), 0) => {
                self.stop();
                Ok(())
            }
            (Some(running), fps) if running.fps == fps => Ok(()),
            (Some(running), fps) => {
                running.rate.set_property("max-rate", fps as i32);
                tracing::info!(fps, "JPEG fallback rate changed");
                if let Some(running) = &mut self.running {
                    running.fps = fps;
                }
                Ok(())
            }
            (None, fps) => {
                self.running = Some(self.start(fps, pipeline, raw_tee, reporter)?);
                Ok(())
            }
        }
    }

    /// Stops the branch (viewers' wishes are kept only while it runs).
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.branch.detach();
            tracing::info!("JPEG fallback stopped");
        }
    }

    fn start(
        &self,
        fps: u32,
        pipeline: &gst::Pipeline,
        raw_tee: &gst::Element,
        reporter: &Reporter,
    ) -> Result<Running, BranchError> {
        let queue = branch::leaky_queue("jpeg-queue", 1)?;
        let rate = branch::make("videorate", "jpeg-rate")?;
        // Drop frames only (never duplicate), at most `fps` a second.
        rate.set_property("drop-only", true);
        rate.set_property("max-rate", fps as i32);
        let encoder = branch::make("jpegenc", "jpeg-encoder")?;
        encoder.set_property("quality", self.quality.clamp(1, 100) as i32);
        let sink = appsink(reporter.clone())?;
        let chain = vec![queue, rate.clone(), encoder, sink];
        let branch = Branch::attach(pipeline, raw_tee, chain, None, "jpeg")?;
        tracing::info!(fps, "JPEG fallback started");
        Ok(Running { rate, fps, branch })
    }
}

fn appsink(reporter: Reporter) -> Result<gst::Element, BranchError> {
    let sink = gst_app::AppSink::builder()
        .name("jpeg-sink")
        .sync(false)
        .max_buffers(1)
        .drop(true)
        .build();
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(map) = sample.buffer().and_then(|b| b.map_readable().ok()) {
                    report(&reporter, map.as_slice());
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    Ok(sink.upcast())
}

fn report(reporter: &Reporter, jpeg: &[u8]) {
    if jpeg.len() > MAX_JPEG_BYTES {
        tracing::debug!(bytes = jpeg.len(), "skipping an oversized JPEG frame");
        return;
    }
    reporter.send_lossy(StreamerReport::Jpeg {
        data: airlock_proto::b64::encode(jpeg),
    });
}
