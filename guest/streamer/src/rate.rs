//! Bitrate adaptation: the shared encoder's target follows the receivers'
//! RTCP feedback, so a viewer on a lossy or slow link keeps getting frames
//! instead of a queue of them.
//!
//! Each viewer's `webrtcbin` is asked for its stats once a second
//! ([`Probe`]); its `remote-inbound-rtp` entry (built from the viewer's
//! RTCP receiver reports) gives the fraction of packets lost and the round
//! trip. A [`Controller`] per viewer turns that into an estimate, in the
//! spirit of Google congestion control's loss-based part: raise slowly
//! while loss is low, hold at moderate loss, cut at high loss; and cut
//! when the round trip grows well past its minimum (a queue building up
//! in front of a rate cap, before it overflows into loss). [`RateControl`]
//! gives the encoder the worst current viewer's estimate, between a floor
//! that keeps text legible and the configured bitrate. `streamer` drives
//! it from its once-a-second tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_webrtc as gst_webrtc;

/// Below this a 720p screen of text turns to mush after a change.
pub const FLOOR_KBPS: u32 = 400;

/// Loss below which the estimate grows (GCC: 2 %).
const LOW_LOSS: f64 = 0.02;
/// Loss above which the estimate is cut (GCC: 10 %).
const HIGH_LOSS: f64 = 0.10;
/// Growth per report while loss is low and no queue builds (GCC: 8 %;
/// slower here, since the only sign of a rate cap before loss is the round
/// trip, reported once a second).
const GROWTH: f64 = 1.05;
/// A round trip this far above the lowest seen: a queue may be starting,
/// so the estimate stops growing.
const HOLD_RTT_MS: f64 = 15.0;
/// A round trip this far above the lowest seen means a queue is building
/// in front of a cap: cut before it overflows (measured under a 2 Mbit/s
/// cap with a netem-sized queue: at 80 ms the cut came after the queue
/// held seconds of video, and frames stopped).
const QUEUE_RTT_MS: f64 = 40.0;
/// How old a packet may be and still be retransmitted on a NACK: a few
/// round trips of a slow link. Unbounded, on a congested link, each NACKed
/// packet went again and again (several times the video's own bitrate);
/// at 400 ms, 2 % loss on an 80 ms round trip left some losses unrepaired
/// and froze the picture for 2.5-3.7 s until a keyframe got through
/// (measured with the `live_netem` test: 3 of 4 runs failed at 400 ms, 5
/// of 5 passed at 1000 ms).
const RTX_HISTORY_MS: u32 = 1000;
/// The cut applied for a building queue.
const QUEUE_CUT: f64 = 0.85;

/// What one viewer's receiver reports say, over the last interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Fraction of packets lost, 0..=1.
    pub fraction_lost: f64,
    /// Round trip from the RTCP reports, when known.
    pub rtt_ms: Option<f64>,
}

/// One viewer's loss-based estimate.
#[derive(Debug, Clone)]
pub struct Controller {
    target_kbps: f64,
    floor_kbps: f64,
    max_kbps: f64,
    min_rtt_ms: Option<f64>,
}

impl Controller {
    /// Starts at half the configured maximum (a good network reaches it
    /// within ten seconds; a bad one is not flooded at once).
    pub fn new(max_kbps: u32) -> Self {
        let max = f64::from(max_kbps.max(1));
        let floor = f64::from(FLOOR_KBPS).min(max);
        Self {
            target_kbps: (max / 2.0).max(floor),
            floor_kbps: floor,
            max_kbps: max,
            min_rtt_ms: None,
        }
    }

    /// The current estimate.
    pub fn target_kbps(&self) -> u32 {
        self.target_kbps.round() as u32
    }

    /// Takes one report and returns the new estimate.
    pub fn update(&mut self, report: Report) -> u32 {
        let loss = report.fraction_lost.clamp(0.0, 1.0);
        // Without a round trip (no sender report answered yet, or webrtcbin
        // giving 0) a cap cannot be seen coming: hold rather than grow
        // blind (it grew into a 2 Mbit/s cap that way, and frames stopped).
        let known = report
            .rtt_ms
            .is_some_and(|rtt| rtt.is_finite() && rtt > 0.0);
        let above = report.rtt_ms.map_or(0.0, |rtt| self.above_min_rtt(rtt));
        let next = if loss > HIGH_LOSS {
            self.target_kbps * (1.0 - 0.5 * loss)
        } else if above > QUEUE_RTT_MS {
            self.target_kbps * QUEUE_CUT
        } else if loss < LOW_LOSS && known && above <= HOLD_RTT_MS {
            self.target_kbps * GROWTH
        } else {
            self.target_kbps
        };
        self.target_kbps = next.clamp(self.floor_kbps, self.max_kbps);
        self.target_kbps()
    }

    /// Remembers the lowest round trip; returns how far above it this
    /// one is (ms).
    fn above_min_rtt(&mut self, rtt_ms: f64) -> f64 {
        if !rtt_ms.is_finite() || rtt_ms <= 0.0 {
            return 0.0;
        }
        let min = self.min_rtt_ms.map_or(rtt_ms, |m| m.min(rtt_ms));
        self.min_rtt_ms = Some(min);
        rtt_ms - min
    }
}

/// The estimates of every viewer of one encoder, and what it was told last.
#[derive(Debug)]
pub struct RateControl {
    max_kbps: u32,
    viewers: HashMap<String, Controller>,
    applied_kbps: u32,
}

impl RateControl {
    /// The encoder starts at `max_kbps` (the stream spec's bitrate).
    pub fn new(max_kbps: u32) -> Self {
        Self {
            max_kbps,
            viewers: HashMap::new(),
            applied_kbps: max_kbps,
        }
    }

    /// The target the encoder has now.
    pub fn applied_kbps(&self) -> u32 {
        self.applied_kbps
    }

    /// Feeds one viewer's report (a viewer with none yet keeps its
    /// estimate).
    pub fn report(&mut self, viewer: &str, report: Option<Report>) {
        let max = self.max_kbps;
        let c = self
            .viewers
            .entry(viewer.to_owned())
            .or_insert_with(|| Controller::new(max));
        if let Some(r) = report {
            c.update(r);
        }
    }

    /// Forgets a viewer that left: the others may get more.
    pub fn remove(&mut self, viewer: &str) {
        self.viewers.remove(viewer);
    }

    /// The worst current viewer's estimate (the maximum with none), when it
    /// differs from what the encoder has; remembered as applied.
    pub fn next_target(&mut self) -> Option<u32> {
        let worst = self
            .viewers
            .values()
            .map(Controller::target_kbps)
            .min()
            .unwrap_or(self.max_kbps);
        (worst != self.applied_kbps).then(|| {
            self.applied_kbps = worst;
            worst
        })
    }
}

/// Asks one `webrtcbin` for its stats and keeps the latest receiver report.
#[derive(Debug, Clone)]
pub struct Probe {
    webrtc: gst::Element,
    last: Arc<Mutex<Option<Report>>>,
    rtx_bounded: Arc<std::sync::atomic::AtomicBool>,
}

impl Probe {
    /// A probe of `webrtc`.
    pub fn new(webrtc: &gst::Element) -> Self {
        Self {
            webrtc: webrtc.clone(),
            last: Arc::default(),
            rtx_bounded: Arc::default(),
        }
    }

    /// Returns the report the previous poll got (if any), and asks for the
    /// next one; the answer comes on a GStreamer thread, so this never
    /// blocks the control loop.
    pub fn poll(&self) -> Option<Report> {
        self.bound_retransmission();
        let taken = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let last = self.last.clone();
        let promise = gst::Promise::with_change_func(move |reply| {
            if let Some(report) = reply.ok().flatten().and_then(report_of) {
                *last.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
            }
        });
        self.webrtc
            .emit_by_name::<()>("get-stats", &[&None::<gst::Pad>, &promise]);
        taken
    }
}

impl Probe {
    /// Bounds the retransmission history of the viewer's `rtprtxsend`
    /// (made by `webrtcbin` once NACK is negotiated) to [`RTX_HISTORY_MS`].
    fn bound_retransmission(&self) {
        use std::sync::atomic::Ordering;
        if self.rtx_bounded.load(Ordering::Relaxed) {
            return;
        }
        let Some(bin) = self.webrtc.downcast_ref::<gst::Bin>() else {
            return;
        };
        let rtx = bin.iterate_recurse().into_iter().flatten().find(|e| {
            e.factory()
                .is_some_and(|f| f.name().as_str() == "rtprtxsend")
        });
        if let Some(rtx) = rtx {
            rtx.set_property("max-size-time", RTX_HISTORY_MS);
            self.rtx_bounded.store(true, Ordering::Relaxed);
        }
    }
}

/// The `remote-inbound-rtp` entry of a `get-stats` reply, if the viewer
/// sent a receiver report yet.
fn report_of(stats: &gst::StructureRef) -> Option<Report> {
    stats.iter().find_map(|(_, value)| {
        let s = value.get::<gst::Structure>().ok()?;
        let kind = s.get::<gst_webrtc::WebRTCStatsType>("type").ok()?;
        if kind != gst_webrtc::WebRTCStatsType::RemoteInboundRtp {
            return None;
        }
        let fraction_lost = s.get::<f64>("fraction-lost").ok()?;
        let rtt_ms = s.get::<f64>("round-trip-time").ok().map(|t| t * 1000.0);
        Some(Report {
            fraction_lost,
            rtt_ms,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lossy(fraction_lost: f64) -> Report {
        Report {
            fraction_lost,
            rtt_ms: Some(80.0),
        }
    }

    #[test]
    fn low_loss_raises_slowly_up_to_the_configured_bitrate() {
        let mut c = Controller::new(2500);
        c.target_kbps = 1000.0;
        assert_eq!(c.update(lossy(0.0)), 1050);
        for _ in 0..30 {
            c.update(lossy(0.01));
        }
        assert_eq!(c.target_kbps(), 2500);
    }

    #[test]
    fn moderate_loss_holds_and_high_loss_cuts_down_to_the_floor() {
        let mut c = Controller::new(2500);
        c.target_kbps = 2500.0;
        assert_eq!(c.update(lossy(0.05)), 2500);
        assert_eq!(c.update(lossy(0.2)), 2250);
        for _ in 0..50 {
            c.update(lossy(0.5));
        }
        assert_eq!(c.target_kbps(), FLOOR_KBPS);
    }

    #[test]
    fn a_growing_round_trip_cuts_before_any_loss() {
        let mut c = Controller::new(2000);
        c.target_kbps = 1000.0;
        c.update(lossy(0.0));
        let queued = Report {
            fraction_lost: 0.0,
            rtt_ms: Some(400.0),
        };
        assert_eq!(c.update(queued), 893);
        // Back to the usual round trip: growth again.
        assert!(c.update(lossy(0.0)) > 893);
    }

    #[test]
    fn without_a_round_trip_the_estimate_does_not_grow() {
        let mut c = Controller::new(2000);
        for rtt_ms in [None, Some(0.0)] {
            let blind = Report {
                fraction_lost: 0.0,
                rtt_ms,
            };
            assert_eq!(c.update(blind), 1000);
        }
    }

    #[test]
    fn a_slightly_longer_round_trip_holds_the_estimate() {
        let mut c = Controller::new(2000);
        c.target_kbps = 1000.0;
        c.update(lossy(0.0));
        let starting = Report {
            fraction_lost: 0.0,
            rtt_ms: Some(80.0 + HOLD_RTT_MS + 5.0),
        };
        assert_eq!(c.update(starting), 1050);
    }

    #[test]
    fn the_floor_never_exceeds_a_small_configured_bitrate() {
        let mut c = Controller::new(300);
        assert_eq!(c.update(lossy(0.9)), 300);
    }

    #[test]
    fn the_encoder_follows_the_worst_viewer_and_recovers_when_it_leaves() {
        let mut rc = RateControl::new(2500);
        assert_eq!(rc.next_target(), None);
        rc.report("good", Some(lossy(0.0)));
        rc.report("bad", Some(lossy(0.4)));
        assert_eq!(rc.next_target(), Some(1000));
        assert_eq!(rc.next_target(), None);
        // A viewer without a report yet keeps its estimate.
        rc.report("bad", None);
        assert_eq!(rc.next_target(), None);
        rc.remove("bad");
        assert_eq!(rc.next_target(), Some(1313));
        assert_eq!(rc.applied_kbps(), 1313);
    }
}
