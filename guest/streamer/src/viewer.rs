//! One viewer: its branch off the shared encoder's tee
//! (`queue ! rtp<codec>pay ! capsfilter`), its own `webrtcbin`, and the
//! answerer side of its signalling.
//!
//! `streamer` creates a [`Viewer`] for a first offer, hands it later offers
//! (renegotiation, ICE restart) and remote candidates, and closes it on
//! `leave`. GStreamer's threads report candidates, state changes and data
//! channel traffic straight to the agent through the shared [`Reporter`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use airlock_proto::stream::{Codec, Signal, StreamSpec};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_rtp as gst_rtp;
use gstreamer_sdp as gst_sdp;
use gstreamer_video as gst_video;
use gstreamer_webrtc as gst_webrtc;

use crate::branch::{self, Branch, BranchError};
use crate::datachannel::{Control, Link};
use crate::encoder::{codec_name, Encoder, Keyframer};
use crate::ice::{self, IceError};
use crate::pipe::Reporter;
use crate::pipeline::WEBRTC_PREFIX;
use crate::rate::{Probe, Report};
use crate::sdp::{self, Choice, SdpError};

/// How long one `webrtcbin` negotiation step may take. A viewer's first
/// `set-remote-description` in a browser VM under TCG (DTLS key made,
/// branch linked, on two busy emulated cores) once took over 10 s.
const STEP_DEADLINE: Duration = Duration::from_secs(30);

/// Why a viewer could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ViewerError {
    /// The offer is unusable.
    #[error(transparent)]
    Sdp(#[from] SdpError),
    /// Its elements could not be built.
    #[error(transparent)]
    Build(#[from] BranchError),
    /// Its ICE settings were refused.
    #[error(transparent)]
    Ice(#[from] IceError),
    /// `webrtcbin` refused a step of the offer/answer exchange.
    #[error("{step} failed: {reason}")]
    Negotiation {
        /// Which step.
        step: &'static str,
        /// `webrtcbin`'s reason.
        reason: String,
    },
}

/// What every viewer shares with the streamer.
#[derive(Debug, Clone)]
pub struct Context {
    /// The pipeline viewers are added to.
    pub pipeline: gst::Pipeline,
    /// Where reports go.
    pub reporter: Reporter,
    /// Who controls the input.
    pub control: Control,
    /// The stream's settings (ICE servers and addresses).
    pub spec: Arc<StreamSpec>,
}

/// Signals for the viewer that must wait until its answer went out (a
/// candidate the viewer gets before the answer cannot be applied), and the
/// local candidates so far, repeated after an ICE restart's answer.
#[derive(Debug, Default)]
struct Outbox {
    answered: bool,
    held: Vec<Signal>,
    gathered: Vec<Signal>,
}

/// State touched from GStreamer's threads.
#[derive(Debug)]
struct Shared {
    id: String,
    reporter: Reporter,
    keyframer: Keyframer,
    outbox: Mutex<Outbox>,
    /// The peer connection is up: buffers may flow.
    live: AtomicBool,
    /// A keyframe went through since it came up: deltas may follow.
    started: AtomicBool,
    link: Arc<Link>,
}

impl Shared {
    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a gathered candidate or end-of-candidates, or holds it until
    /// the answer is out.
    fn send(&self, signal: Signal) {
        let mut outbox = self.outbox();
        outbox.gathered.push(signal.clone());
        if outbox.answered {
            self.reporter.signal(&self.id, signal);
        } else {
            outbox.held.push(signal);
        }
    }

    fn hold(&self) {
        self.outbox().answered = false;
    }

    /// Reports the answer, then everything held back behind it, in order.
    /// After an ICE restart libnice keeps its candidates but the viewer
    /// dropped them with our old credentials, so they are sent again.
    fn answer(&self, sdp: String, restarted: bool) {
        let mut outbox = self.outbox();
        self.reporter.signal(&self.id, Signal::Answer { sdp });
        let held = std::mem::take(&mut outbox.held);
        let signals = if restarted {
            outbox.gathered.clone()
        } else {
            held
        };
        for signal in signals {
            self.reporter.signal(&self.id, signal);
        }
        outbox.answered = true;
    }

    fn on_state(&self, state: gst_webrtc::WebRTCPeerConnectionState) {
        use gst_webrtc::WebRTCPeerConnectionState as S;
        let name = match state {
            S::New => "new",
            S::Connecting => "connecting",
            S::Connected => "connected",
            S::Disconnected => "disconnected",
            S::Failed => "failed",
            S::Closed => "closed",
            _ => "unknown",
        };
        tracing::info!(viewer_id = %self.id, state = name, "peer connection state");
        match state {
            S::Connected => {
                // Decoding (re)starts at the next keyframe: ask for one now.
                self.started.store(false, Ordering::SeqCst);
                self.live.store(true, Ordering::SeqCst);
                self.keyframer.request();
            }
            // While ICE restarts (connecting) or recovers (disconnected),
            // libnice keeps the old pair, so video keeps flowing.
            S::Failed | S::Closed => self.live.store(false, Ordering::SeqCst),
            _ => {}
        }
        self.reporter
            .signal(&self.id, Signal::State { state: name.into() });
    }
}

/// One viewer's branch and `webrtcbin`.
#[derive(Debug)]
pub struct Viewer {
    choice: Choice,
    ssrc: u32,
    /// The ICE ufrag of the viewer's last offer: a new one is a restart.
    ufrag: Option<String>,
    pipeline: gst::Pipeline,
    webrtc: gst::Element,
    sink_pad: gst::Pad,
    transceiver: gst_webrtc::WebRTCRTPTransceiver,
    branch: Option<Branch>,
    shared: Arc<Shared>,
    probe: Probe,
}

impl Viewer {
    /// Builds the viewer for its first offer and answers it.
    pub fn create(
        ctx: &Context,
        encoder: &Encoder,
        id: &str,
        offer: gst_sdp::SDPMessage,
        choice: Choice,
    ) -> Result<Self, ViewerError> {
        let webrtc = new_webrtcbin(id, &ctx.spec)?;
        let ssrc = gst::glib::random_int();
        let (sink_pad, transceiver) = request_sink(&webrtc, &rtp_caps(&choice, ssrc))
            .ok_or_else(|| BranchError::Link(format!("{id} webrtcbin sink")))?;
        ctx.pipeline
            .add(&webrtc)
            .map_err(|_| BranchError::Link(id.into()))?;
        let shared = Arc::new(Shared {
            id: id.into(),
            reporter: ctx.reporter.clone(),
            keyframer: encoder.keyframer(),
            outbox: Mutex::default(),
            live: AtomicBool::new(false),
            started: AtomicBool::new(false),
            link: Link::new(id, ctx.reporter.clone(), ctx.control.clone()),
        });
        connect_signals(&webrtc, &shared);
        let mut viewer = Self {
            probe: Probe::new(&webrtc),
            choice,
            ssrc,
            ufrag: None,
            pipeline: ctx.pipeline.clone(),
            webrtc,
            sink_pad,
            transceiver,
            branch: None,
            shared,
        };
        match viewer
            .build(encoder)
            .and_then(|()| viewer.answer(offer, false))
        {
            Ok(()) => Ok(viewer),
            Err(e) => {
                viewer.close();
                Err(e)
            }
        }
    }

    /// The codec and payload type this viewer was built for.
    pub fn choice(&self) -> Choice {
        self.choice
    }

    /// Whether the peer connection is up.
    pub fn connected(&self) -> bool {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Answers a later offer from the same viewer on the same `webrtcbin`.
    pub fn renegotiate(&mut self, offer: gst_sdp::SDPMessage) -> Result<(), ViewerError> {
        let restart = sdp::ice_ufrag(&offer) != self.ufrag;
        tracing::info!(viewer_id = %self.shared.id, ice_restart = restart, "new offer");
        if restart {
            ice::restart(&self.webrtc, &self.transceiver)?;
        }
        self.answer(offer, restart)
    }

    /// Applies a remote candidate (`None`: the viewer has no more).
    pub fn add_candidate(&self, mline: u32, candidate: Option<&str>) {
        tracing::debug!(viewer_id = %self.shared.id, mline, candidate, "remote candidate");
        self.webrtc
            .emit_by_name::<()>("add-ice-candidate", &[&mline, &candidate.unwrap_or("")]);
    }

    /// The viewer's latest receiver report (loss, round trip), and asks
    /// for the next: called once a second while it is connected.
    pub fn feedback(&self) -> Option<Report> {
        self.probe.poll()
    }

    /// Asks the shared encoder for a keyframe.
    pub fn request_keyframe(&self) {
        self.shared.keyframer.request();
    }

    /// Tells the viewer whether it controls the input now.
    pub fn notify_control(&self) {
        self.shared.link.notify_control();
    }

    /// Unlinks the branch, stops and removes the `webrtcbin`; the encoder
    /// keeps feeding the other viewers.
    pub fn close(mut self) {
        self.shared.link.close();
        if let Some(branch) = self.branch.take() {
            branch.detach();
        }
        self.webrtc.release_request_pad(&self.sink_pad);
        let _ = self.webrtc.set_state(gst::State::Null);
        let _ = self.pipeline.remove(&self.webrtc);
        tracing::info!(viewer_id = %self.shared.id, "viewer removed");
    }

    fn build(&mut self, encoder: &Encoder) -> Result<(), ViewerError> {
        let id = &self.shared.id;
        self.webrtc
            .sync_state_with_parent()
            .map_err(|_| BranchError::Link(id.clone()))?;
        // Up to a second of frames may wait; beyond that the viewer is not
        // keeping up and old frames are worth less than the shared encoder.
        let queue = branch::leaky_queue(&format!("{id}-queue"), 30)?;
        let pay = payloader(id, &self.choice, self.ssrc)?;
        if let Some(ext) = self.choice.playout_delay {
            stamp_playout_delay(&pay, ext);
        }
        let caps = branch::make("capsfilter", &format!("{id}-caps"))?;
        caps.set_property("caps", rtp_caps(&self.choice, self.ssrc));
        let queue_sink = queue
            .static_pad("sink")
            .ok_or_else(|| BranchError::Link(id.clone()))?;
        gate(&queue_sink, &self.shared);
        forward_keyframe_requests(&queue_sink, &self.shared);
        let chain = vec![queue, pay, caps];
        let label = format!("viewer {id}");
        self.branch = Some(Branch::attach(
            &self.pipeline,
            encoder.tee(),
            chain,
            Some(&self.sink_pad),
            &label,
        )?);
        self.shared.keyframer.request();
        Ok(())
    }

    /// set-remote-description, create-answer, set-local-description, then
    /// the answer goes out ahead of any candidate gathered meanwhile.
    /// On an ICE restart the answer gets fresh credentials, which
    /// set-local-description hands to the (restarted) libnice stream.
    fn answer(&mut self, offer: gst_sdp::SDPMessage, restart: bool) -> Result<(), ViewerError> {
        self.ufrag = sdp::ice_ufrag(&offer);
        self.shared.hold();
        let offer =
            gst_webrtc::WebRTCSessionDescription::new(gst_webrtc::WebRTCSDPType::Offer, offer);
        call(&self.webrtc, "set-remote-description", &offer)?;
        let reply = call_create_answer(&self.webrtc)?;
        let mut answer = reply
            .get::<gst_webrtc::WebRTCSessionDescription>("answer")
            .map_err(|e| negotiation("create-answer", e))?;
        if restart {
            let (ufrag, pwd) = ice::credentials();
            sdp::set_ice_credentials(answer.sdp_mut(), &ufrag, &pwd);
        }
        call(&self.webrtc, "set-local-description", &answer)?;
        let text = answer
            .sdp()
            .as_text()
            .map_err(|e| negotiation("answer", e))?;
        self.shared.answer(text, restart);
        Ok(())
    }
}

fn negotiation(step: &'static str, reason: impl std::fmt::Display) -> ViewerError {
    ViewerError::Negotiation {
        step,
        reason: reason.to_string(),
    }
}

fn new_webrtcbin(id: &str, spec: &StreamSpec) -> Result<gst::Element, ViewerError> {
    let webrtc = branch::make("webrtcbin", &format!("{WEBRTC_PREFIX}{id}"))?;
    webrtc.set_property_from_str("bundle-policy", "max-bundle");
    webrtc.set_property("latency", 0u32);
    ice::configure(&webrtc, spec)?;
    Ok(webrtc)
}

/// `media, encoding-name, payload, clock-rate`: enough for `webrtcbin` to
/// match the offer's video m-line (it merges in the offer's fmtp). The SSRC
/// is fixed up front so the answer declares it (`a=ssrc`) even when no
/// buffer reached `webrtcbin` yet: with BUNDLE, a peer may drop packets of
/// an SSRC the answer did not declare (webrtc-rs does).
fn rtp_caps(choice: &Choice, ssrc: u32) -> gst::Caps {
    let mut caps = gst::Caps::builder("application/x-rtp")
        .field("media", "video")
        .field(
            "encoding-name",
            codec_name(choice.codec).to_ascii_uppercase(),
        )
        .field("payload", i32::from(choice.payload))
        .field("clock-rate", 90_000i32)
        .field("ssrc", ssrc);
    // Declared here so the answer carries `a=extmap` for it.
    if let Some(id) = choice.playout_delay {
        caps = caps.field(format!("extmap-{id}"), crate::sdp::PLAYOUT_DELAY_URI);
    }
    caps.build()
}

/// Stamps every packet with a playout delay of 0..0 ms: a screen a person
/// types into must be shown as soon as it is decoded, not smoothed.
fn stamp_playout_delay(pay: &gst::Element, id: u8) {
    let Some(pad) = pay.static_pad("src") else {
        return;
    };
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(gst::PadProbeData::Buffer(buffer)) = info.data.as_mut() {
            let buffer = buffer.make_mut();
            if let Ok(mut rtp) = gst_rtp::RTPBuffer::from_buffer_writable(buffer) {
                // 12 bits min, 12 bits max, in 10 ms units: all zero.
                let _ = rtp.add_extension_onebyte_header(id, &[0, 0, 0]);
            }
        }
        gst::PadProbeReturn::Ok
    });
}

fn payloader(id: &str, choice: &Choice, ssrc: u32) -> Result<gst::Element, BranchError> {
    let pay = match choice.codec {
        Codec::Vp8 => branch::make("rtpvp8pay", &format!("{id}-pay"))?,
        Codec::H264 => {
            let pay = branch::make("rtph264pay", &format!("{id}-pay"))?;
            // SPS/PPS before every IDR, so any keyframe starts decoding.
            pay.set_property("config-interval", -1i32);
            pay
        }
    };
    pay.set_property("pt", u32::from(choice.payload));
    pay.set_property("ssrc", ssrc);
    // Room for SRTP and TURN headers within a 1280-byte path MTU.
    pay.set_property("mtu", 1200u32);
    Ok(pay)
}

/// Requests the sink pad for the video and sets its transceiver up as a
/// send-only sender with NACK retransmission.
fn request_sink(
    webrtc: &gst::Element,
    caps: &gst::Caps,
) -> Option<(gst::Pad, gst_webrtc::WebRTCRTPTransceiver)> {
    let template = webrtc.pad_template("sink_%u")?;
    let pad = webrtc.request_pad(&template, None, Some(caps))?;
    let transceiver = pad.property::<gst_webrtc::WebRTCRTPTransceiver>("transceiver");
    transceiver.set_direction(gst_webrtc::WebRTCRTPTransceiverDirection::Sendonly);
    transceiver.set_property("do-nack", true);
    Some((pad, transceiver))
}

fn connect_signals(webrtc: &gst::Element, shared: &Arc<Shared>) {
    let s = shared.clone();
    webrtc.connect("on-ice-candidate", false, move |values| {
        let mline = values.get(1)?.get::<u32>().ok()?;
        let line = values.get(2)?.get::<String>().ok()?;
        let candidate = line.strip_prefix("a=").unwrap_or(&line).to_owned();
        s.send(Signal::Candidate {
            candidate,
            sdp_m_line_index: mline,
        });
        None
    });
    let s = shared.clone();
    webrtc.connect_notify(Some("ice-gathering-state"), move |webrtc, _| {
        let state = webrtc.property::<gst_webrtc::WebRTCICEGatheringState>("ice-gathering-state");
        if state == gst_webrtc::WebRTCICEGatheringState::Complete {
            s.send(Signal::EndOfCandidates);
        }
    });
    let s = shared.clone();
    webrtc.connect_notify(Some("connection-state"), move |webrtc, _| {
        s.on_state(webrtc.property("connection-state"));
    });
    let s = shared.clone();
    webrtc.connect("on-data-channel", false, move |values| {
        let channel = values.get(1)?.get::<gst_webrtc::WebRTCDataChannel>().ok()?;
        s.link.adopt(channel);
        None
    });
}

/// What a probe returns to swallow the buffer or event it saw. `Handled`
/// rather than `Drop`: gstreamer-rs already released the object, and
/// GStreamer 1.22 would unref it again after a `Drop` (a CRITICAL).
const SWALLOW: gst::PadProbeReturn = gst::PadProbeReturn::Handled;

/// Lets buffers through only while the peer connection is up, starting
/// with a keyframe: frames before that could not be decoded anyway.
fn gate(pad: &gst::Pad, shared: &Arc<Shared>) {
    let s = Arc::downgrade(shared);
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        let (Some(s), Some(buffer)) = (s.upgrade(), info.buffer()) else {
            return SWALLOW;
        };
        if !s.live.load(Ordering::SeqCst) {
            return SWALLOW;
        }
        let keyframe = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
        if keyframe && !s.started.swap(true, Ordering::SeqCst) {
            tracing::debug!(viewer_id = %s.id, "video starts with this keyframe");
        }
        if s.started.load(Ordering::SeqCst) {
            gst::PadProbeReturn::Ok
        } else {
            SWALLOW
        }
    });
}

/// `webrtcbin` turns RTCP PLI/FIR into upstream force-key-unit events;
/// this hands them to the shared encoder, whatever the tee does with them.
fn forward_keyframe_requests(pad: &gst::Pad, shared: &Arc<Shared>) {
    let s = Arc::downgrade(shared);
    pad.add_probe(gst::PadProbeType::EVENT_UPSTREAM, move |_, info| {
        let is_request = info
            .event()
            .is_some_and(|e| gst_video::UpstreamForceKeyUnitEvent::parse(e).is_ok());
        match (is_request, s.upgrade()) {
            (true, Some(s)) => {
                tracing::debug!(viewer_id = %s.id, "viewer asked for a keyframe");
                s.keyframer.request();
                SWALLOW
            }
            _ => gst::PadProbeReturn::Ok,
        }
    });
}

type Reply = Result<Option<gst::Structure>, String>;

/// Emits a `webrtcbin` action that takes a description and a promise, and
/// waits (with a deadline) for the promise.
fn call(
    webrtc: &gst::Element,
    action: &'static str,
    description: &gst_webrtc::WebRTCSessionDescription,
) -> Result<(), ViewerError> {
    let (promise, rx) = promise();
    webrtc.emit_by_name::<()>(action, &[description, &promise]);
    wait(action, &promise, &rx).map(|_| ())
}

fn call_create_answer(webrtc: &gst::Element) -> Result<gst::Structure, ViewerError> {
    let (promise, rx) = promise();
    webrtc.emit_by_name::<()>("create-answer", &[&None::<gst::Structure>, &promise]);
    wait("create-answer", &promise, &rx)?.ok_or_else(|| negotiation("create-answer", "no answer"))
}

fn promise() -> (gst::Promise, mpsc::Receiver<Reply>) {
    let (tx, rx) = mpsc::sync_channel(1);
    let promise = gst::Promise::with_change_func(move |reply| {
        let reply = match reply {
            Ok(s) => Ok(s.map(|s| s.to_owned())),
            Err(e) => Err(format!("{e:?}")),
        };
        let _ = tx.send(reply);
    });
    (promise, rx)
}

fn wait(
    step: &'static str,
    promise: &gst::Promise,
    rx: &mpsc::Receiver<Reply>,
) -> Result<Option<gst::Structure>, ViewerError> {
    let reply = rx.recv_timeout(STEP_DEADLINE).map_err(|_| {
        promise.interrupt();
        negotiation(step, "timed out")
    })?;
    let reply = reply.map_err(|e| negotiation(step, e))?;
    if let Some(error) = reply
        .as_ref()
        .and_then(|s| s.get::<gst::glib::Error>("error").ok())
    {
        return Err(negotiation(step, error.message()));
    }
    Ok(reply)
}
