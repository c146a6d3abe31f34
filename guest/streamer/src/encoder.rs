//! The shared encoders: one per codec, fed by the raw tee and feeding an
//! encoded tee that every viewer of that codec hangs off.
//!
//! `streamer` keeps the VP8 encoder for the whole run and starts the H.264
//! one when the first viewer asks for it. Viewers get a [`Keyframer`] to ask
//! for keyframes (join, connect, `keyFrame` signal, RTCP PLI/FIR); the
//! [`Counters`] feed `Stats` reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use airlock_proto::stream::{Codec, StreamSpec, StreamStats};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_video as gst_video;

use crate::branch::{self, Branch, BranchError};
use crate::damage::Wake;

/// Seconds between keyframes when nobody asks: viewers ask when they need
/// one (PLI), so periodic ones are only a safety net.
const KEYFRAME_INTERVAL_SECS: u32 = 10;

/// Encoded-output counters shared by all encoders.
#[derive(Debug, Default)]
pub struct Counters {
    frames: AtomicU64,
    bytes: AtomicU64,
    keyframes: AtomicU64,
}

impl Counters {
    fn count(&self, bytes: usize, keyframe: bool) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if keyframe {
            self.keyframes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters so far, with the number of connected viewers.
    pub fn snapshot(&self, viewers: u32, target_kbps: u32) -> StreamStats {
        StreamStats {
            frames: self.frames.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            keyframes: self.keyframes.load(Ordering::Relaxed),
            viewers,
            target_kbps,
        }
    }
}

/// Asks one encoder for a keyframe; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Keyframer {
    encoder_src: gst::Pad,
    /// A still screen sends no frames: the keyframe needs one.
    wake: Wake,
}

impl Keyframer {
    /// Sends an upstream force-key-unit event into the encoder. The encoder
    /// merges requests that arrive before it encodes the next frame.
    pub fn request(&self) {
        let event = gst_video::UpstreamForceKeyUnitEvent::builder()
            .all_headers(true)
            .build();
        if !self.encoder_src.send_event(event) {
            tracing::debug!("encoder did not take the keyframe request");
        }
        self.wake.wake();
    }
}

/// One running encoder and the tee behind it.
#[derive(Debug)]
pub struct Encoder {
    codec: Codec,
    element: gst::Element,
    tee: gst::Element,
    keyframer: Keyframer,
    branch: Branch,
}

impl Encoder {
    /// Builds `queue ! encoder [! caps] ! tee` on the raw tee and starts it.
    pub fn start(
        codec: Codec,
        pipeline: &gst::Pipeline,
        raw_tee: &gst::Element,
        spec: &StreamSpec,
        counters: Arc<Counters>,
        wake: Wake,
    ) -> Result<Self, BranchError> {
        let name = codec_name(codec);
        let queue = branch::leaky_queue(&format!("{name}-queue"), 1)?;
        let encoder = match codec {
            Codec::Vp8 => vp8enc(spec)?,
            Codec::H264 => x264enc(spec)?,
        };
        let tee = branch::tee(&format!("{name}-tee"))?;
        let mut chain = vec![queue, encoder.clone()];
        if codec == Codec::H264 {
            chain.push(h264_caps()?);
        }
        chain.push(tee.clone());
        let encoder_src = encoder.static_pad("src").ok_or_else(|| link_error(codec))?;
        count_output(&encoder_src, counters);
        let branch = Branch::attach(pipeline, raw_tee, chain, None, name)?;
        tracing::info!(codec = name, "encoder started");
        Ok(Self {
            codec,
            element: encoder,
            tee,
            keyframer: Keyframer { encoder_src, wake },
            branch,
        })
    }

    /// The tee viewers of this codec link to.
    pub fn tee(&self) -> &gst::Element {
        &self.tee
    }

    /// A handle that asks this encoder for keyframes.
    pub fn keyframer(&self) -> Keyframer {
        self.keyframer.clone()
    }

    /// Changes the target bitrate while it runs (both encoders apply a new
    /// target from their next frame on).
    pub fn set_bitrate(&self, kbps: u32) {
        match self.codec {
            Codec::Vp8 => {
                let bps = i32::try_from(kbps.saturating_mul(1000)).unwrap_or(i32::MAX);
                self.element.set_property("target-bitrate", bps);
            }
            Codec::H264 => self.element.set_property("bitrate", kbps),
        }
    }

    /// Stops the encoder and takes it out of the pipeline.
    pub fn stop(self) {
        self.branch.detach();
        tracing::info!(codec = codec_name(self.codec), "encoder stopped");
    }
}

/// The codec's lowercase name, as the protocol spells it.
pub fn codec_name(codec: Codec) -> &'static str {
    match codec {
        Codec::Vp8 => "vp8",
        Codec::H264 => "h264",
    }
}

fn link_error(codec: Codec) -> BranchError {
    BranchError::Link(codec_name(codec).into())
}

fn vp8enc(spec: &StreamSpec) -> Result<gst::Element, BranchError> {
    let enc = branch::make("vp8enc", "vp8-encoder")?;
    enc.set_property("deadline", 1i64);
    enc.set_property_from_str("end-usage", "cbr");
    enc.set_property("target-bitrate", bitrate_bps(spec));
    enc.set_property("lag-in-frames", 0i32);
    // Fastest realtime speed: a screen of text compresses well anyway, and
    // the VM has few cores.
    enc.set_property("cpu-used", 16i32);
    enc.set_property_from_str("error-resilient", "default");
    enc.set_property("keyframe-max-dist", keyframe_distance(spec) as i32);
    // One thread: libvpx's VP8 worker threads spin between frames of a live
    // source (measured: 60 frames of 720p cost 8.4 s of CPU with threads=2,
    // 0.3 s with one).
    enc.set_property("threads", 1i32);
    // Small rate-control buffers keep CBR from bursting after a keyframe.
    enc.set_property("buffer-size", 1000i32);
    enc.set_property("buffer-initial-size", 500i32);
    enc.set_property("buffer-optimal-size", 600i32);
    Ok(enc)
}

fn x264enc(spec: &StreamSpec) -> Result<gst::Element, BranchError> {
    let enc = branch::make("x264enc", "h264-encoder")?;
    enc.set_property_from_str("tune", "zerolatency");
    enc.set_property_from_str("speed-preset", "ultrafast");
    enc.set_property("bitrate", spec.bitrate_kbps);
    enc.set_property("key-int-max", keyframe_distance(spec));
    Ok(enc)
}

fn h264_caps() -> Result<gst::Element, BranchError> {
    let filter = branch::make("capsfilter", "h264-caps")?;
    let caps = gst::Caps::builder("video/x-h264")
        .field("profile", "constrained-baseline")
        .build();
    filter.set_property("caps", caps);
    Ok(filter)
}

fn bitrate_bps(spec: &StreamSpec) -> i32 {
    i32::try_from(spec.bitrate_kbps.saturating_mul(1000)).unwrap_or(i32::MAX)
}

fn keyframe_distance(spec: &StreamSpec) -> u32 {
    spec.framerate.max(1) * KEYFRAME_INTERVAL_SECS
}

/// Counts every encoded frame (and keyframes: buffers without DELTA_UNIT).
fn count_output(pad: &gst::Pad, counters: Arc<Counters>) {
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(buffer) = info.buffer() {
            let keyframe = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
            counters.count(buffer.size(), keyframe);
        }
        gst::PadProbeReturn::Ok
    });
}
