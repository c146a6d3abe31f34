//! End to end: a real Xvfb, the built `airlock-streamer`, and webrtc-rs
//! peers that offer, trickle candidates and receive VP8 over loopback only,
//! with signalling through the streamer's stdin/stdout frame protocol.
//!
//! Run by `cargo test -p airlock-streamer`; needs `Xvfb` and the GStreamer
//! plugins the streamer uses.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_proto::frame::{self, FrameDecoder};
use airlock_proto::limits::MAX_FRAME_BYTES;
use airlock_proto::stream::{
    Codec, Signal, StreamSpec, StreamStats, StreamerCommand, StreamerReport, ViewerSignal,
};
use anyhow::{anyhow, bail, Context as _, Result};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::MediaEngine;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::data_channel::RTCDataChannel;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice_transport::ice_candidate::{RTCIceCandidate, RTCIceCandidateInit};
use webrtc::interceptor::registry::Registry;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp_transceiver::rtp_codec::{
    RTCRtpCodecCapability, RTCRtpCodecParameters, RTPCodecType,
};
use webrtc::rtp_transceiver::rtp_transceiver_direction::RTCRtpTransceiverDirection;
use webrtc::rtp_transceiver::RTCRtpTransceiverInit;

// The browser VM case (no network: TURN over TCP via a proxy).
#[path = "peer/relay.rs"]
mod relay;

/// How long any one expected event may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// An Xvfb on a display number it picked itself; killed on drop.
struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    fn start() -> Result<Self> {
        let mut child = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "1280x720x24",
                "-nolisten",
                "tcp",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting Xvfb")?;
        let stdout = child.stdout.take().context("Xvfb stdout")?;
        let mut guard = Self {
            child,
            display: String::new(),
        };
        // Xvfb writes the display number once it accepts connections.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let number: u32 = line.trim().parse().context("Xvfb display number")?;
        guard.display = format!(":{number}");
        Ok(guard)
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keeps the screen changing (the root window's colour, 50 times a
/// second): the streamer sends frames of a still screen only once a
/// second. Stops on [`Painter::stop`] or drop.
struct Painter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Painter {
    fn start(display: &str) -> Result<Self> {
        use x11rb::connection::Connection;
        use x11rb::protocol::xproto::{ChangeWindowAttributesAux, ConnectionExt};
        let (conn, screen) = x11rb::connect(Some(display))?;
        let root = conn.setup().roots[screen].root;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut colour = 0u32;
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                colour = colour.wrapping_add(0x010203) & 0xffffff;
                let aux = ChangeWindowAttributesAux::new().background_pixel(colour);
                let painted = conn.change_window_attributes(root, &aux).is_ok()
                    && conn.clear_area(false, root, 0, 0, 0, 0).is_ok()
                    && conn.flush().is_ok();
                if !painted {
                    return;
                }
                // The animation's pace, not a wait for anything.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Painter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The streamer process; killed on drop unless it was stopped.
struct Streamer {
    child: Child,
    stdin: Arc<Mutex<Option<ChildStdin>>>,
}

impl Streamer {
    fn start(display: &str, reports: mpsc::UnboundedSender<StreamerReport>) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock-streamer"))
            .env("DISPLAY", display)
            .env("RUST_LOG", "info,airlock_streamer=debug")
            .env(
                "GST_DEBUG",
                std::env::var("AIRLOCK_TEST_GST_DEBUG").unwrap_or_default(),
            )
            .env(
                "G_MESSAGES_DEBUG",
                std::env::var("AIRLOCK_TEST_G_MESSAGES_DEBUG").unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the streamer")?;
        let stdout = child.stdout.take().context("streamer stdout")?;
        std::thread::spawn(move || read_reports(stdout, &reports));
        let stdin = Arc::new(Mutex::new(child.stdin.take()));
        Ok(Self { child, stdin })
    }

    fn sender(&self) -> Pipe {
        Pipe(self.stdin.clone())
    }

    /// Sends `stop`, waits for stdout to close, and returns the exit status.
    async fn stop(mut self, reports: &mut Reports) -> Result<std::process::ExitStatus> {
        self.sender().send(&StreamerCommand::Stop)?;
        self.stdin.lock().unwrap().take();
        timeout(DEADLINE, async {
            while reports.0.recv().await.is_some() {}
        })
        .await
        .context("the streamer did not exit after stop")?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_reports(mut stdout: impl Read, reports: &mpsc::UnboundedSender<StreamerReport>) {
    let mut decoder = FrameDecoder::new(MAX_FRAME_BYTES);
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = stdout.read(&mut buf) {
        if n == 0 {
            return;
        }
        decoder.push(&buf[..n]);
        while let Some(report) = decoder
            .next_message::<StreamerReport>()
            .expect("valid frames")
        {
            if reports.send(report).is_err() {
                return;
            }
        }
    }
}

/// Writes commands to the streamer's stdin.
#[derive(Clone)]
struct Pipe(Arc<Mutex<Option<ChildStdin>>>);

impl Pipe {
    fn send(&self, command: &StreamerCommand) -> Result<()> {
        let bytes = frame::encode(command, MAX_FRAME_BYTES)?;
        let mut stdin = self.0.lock().unwrap();
        let stdin = stdin.as_mut().context("stdin closed")?;
        stdin.write_all(&bytes)?;
        stdin.flush()?;
        Ok(())
    }

    fn signal(&self, viewer_id: &str, signal: Signal) -> Result<()> {
        self.send(&StreamerCommand::Viewer(ViewerSignal {
            viewer_id: viewer_id.into(),
            signal,
        }))
    }
}

/// Sends viewer signals to their peer, everything else to `general`.
#[derive(Clone, Default)]
struct Router {
    viewers: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Signal>>>>,
}

impl Router {
    fn spawn(
        &self,
        mut reports: mpsc::UnboundedReceiver<StreamerReport>,
    ) -> mpsc::UnboundedReceiver<StreamerReport> {
        let (general, rx) = mpsc::unbounded_channel();
        let viewers = self.viewers.clone();
        tokio::spawn(async move {
            while let Some(report) = reports.recv().await {
                match report {
                    StreamerReport::Viewer(vs) => {
                        let tx = viewers.lock().unwrap().get(&vs.viewer_id).cloned();
                        match tx {
                            Some(tx) => {
                                let _ = tx.send(vs.signal);
                            }
                            None => panic!("signal for unknown viewer {}", vs.viewer_id),
                        }
                    }
                    StreamerReport::Jpeg { .. } => {}
                    other => {
                        let _ = general.send(other);
                    }
                }
            }
        });
        rx
    }

    fn register(&self, viewer_id: &str) -> mpsc::UnboundedReceiver<Signal> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.viewers.lock().unwrap().insert(viewer_id.into(), tx);
        rx
    }
}

/// What a peer's video receiver has seen.
#[derive(Debug, Clone, Copy, Default)]
struct Video {
    packets: u64,
    /// Frames completed (RTP marker bit).
    frames: u64,
    /// VP8 keyframes started.
    keyframes: u64,
}

/// A webrtc-rs viewer: receive-only VP8 video and an `input` data channel.
struct Peer {
    id: String,
    codec: Codec,
    pc: Arc<RTCPeerConnection>,
    video: watch::Receiver<Video>,
    channel: Arc<RTCDataChannel>,
    opened: watch::Receiver<bool>,
    messages: mpsc::UnboundedReceiver<serde_json::Value>,
    states: watch::Receiver<String>,
    errors: watch::Receiver<Vec<String>>,
    /// The streamer's last answer.
    answer: watch::Receiver<String>,
    /// Held while an offer is made and sent: candidates wait behind it.
    offering: Arc<tokio::sync::Mutex<()>>,
}

async fn new_peer_connection() -> Result<RTCPeerConnection> {
    let mut media = MediaEngine::default();
    media.register_default_codecs()?;
    // Browsers offer RTX for VP8; so does this peer, to see it answered.
    media.register_codec(
        RTCRtpCodecParameters {
            capability: RTCRtpCodecCapability {
                mime_type: "video/rtx".into(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: "apt=96".into(),
                rtcp_feedback: vec![],
            },
            payload_type: 97,
            ..Default::default()
        },
        RTPCodecType::Video,
    )?;
    let registry = register_default_interceptors(Registry::new(), &mut media)?;
    let mut settings = SettingEngine::default();
    // Loopback only: nothing leaves the machine.
    settings.set_include_loopback_candidate(true);
    settings.set_interface_filter(Box::new(|name: &str| name == "lo"));
    settings.set_network_types(vec![NetworkType::Udp4]);
    settings.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    let api = APIBuilder::new()
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .with_setting_engine(settings)
        .build();
    Ok(api.new_peer_connection(RTCConfiguration::default()).await?)
}

impl Peer {
    /// Builds the peer, sends its offer and starts applying the streamer's
    /// answer and candidates as they come.
    async fn connect(id: &str, codec: Codec, pipe: &Pipe, router: &Router) -> Result<Self> {
        let pc = Arc::new(new_peer_connection().await?);
        pc.add_transceiver_from_kind(
            RTPCodecType::Video,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                send_encodings: vec![],
            }),
        )
        .await?;
        let video = count_video(&pc);
        let (state_tx, states) = watch::channel(String::from("new"));
        pc.on_peer_connection_state_change(Box::new(move |s| {
            let _ = state_tx.send(s.to_string());
            Box::pin(async {})
        }));
        let (channel, opened, messages) = open_channel(&pc).await?;
        let (cand_tx, cand_rx) = mpsc::unbounded_channel::<RTCIceCandidate>();
        pc.on_ice_candidate(Box::new(move |c| {
            if let Some(c) = c {
                let _ = cand_tx.send(c);
            }
            Box::pin(async {})
        }));
        let signals = router.register(id);
        let (errors, answer) = spawn_signal_handler(pc.clone(), signals);
        let offering = Arc::new(tokio::sync::Mutex::new(()));
        let peer = Self {
            id: id.into(),
            codec,
            pc,
            video,
            channel,
            opened,
            messages,
            states,
            errors,
            answer,
            offering: offering.clone(),
        };
        // Candidates go out only after the offer they belong to.
        let held = offering.clone().lock_owned().await;
        spawn_candidate_sender(id, pipe.clone(), cand_rx, offering);
        peer.send_offer(pipe).await?;
        drop(held);
        Ok(peer)
    }

    /// Offers again (after `restart_ice`, a new ICE generation).
    async fn offer(&self, pipe: &Pipe) -> Result<()> {
        let _held = self.offering.lock().await;
        self.send_offer(pipe).await
    }

    async fn send_offer(&self, pipe: &Pipe) -> Result<()> {
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer.clone()).await?;
        pipe.signal(
            &self.id,
            Signal::Offer {
                sdp: offer.sdp,
                codec: Some(self.codec),
            },
        )
    }

    async fn wait_video(&mut self, what: &str, f: impl FnMut(&Video) -> bool) -> Result<Video> {
        let result = timeout(DEADLINE, self.video.wait_for(f))
            .await
            .map(|r| r.map(|v| *v));
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!(
                "{}: timed out waiting for {what}: {:?}, errors {:?}",
                self.id,
                *self.video.borrow(),
                *self.errors.borrow()
            ),
        }
    }

    async fn wait_state(&mut self, state: &str) -> Result<()> {
        let errors = self.errors.clone();
        timeout(DEADLINE, self.states.wait_for(|s| s == state))
            .await
            .map_err(|_| {
                anyhow!(
                    "{} never became {state}; errors {:?}",
                    self.id,
                    *errors.borrow()
                )
            })??;
        Ok(())
    }

    async fn send(&mut self, message: serde_json::Value) -> Result<()> {
        timeout(DEADLINE, self.opened.wait_for(|open| *open)).await??;
        self.channel.send_text(message.to_string()).await?;
        Ok(())
    }

    /// The next data channel message of type `kind` (others are skipped).
    async fn message(&mut self, kind: &str) -> Result<serde_json::Value> {
        timeout(DEADLINE, async {
            while let Some(m) = self.messages.recv().await {
                if m["type"] == kind {
                    return Ok(m);
                }
            }
            bail!("data channel closed")
        })
        .await
        .map_err(|_| anyhow!("no {kind} message for {}", self.id))?
    }
}

/// Counts the packets, frames and VP8 keyframes of the received video.
fn count_video(pc: &RTCPeerConnection) -> watch::Receiver<Video> {
    let (video_tx, video) = watch::channel(Video::default());
    pc.on_track(Box::new(move |track, _, _| {
        let video_tx = video_tx.clone();
        Box::pin(async move {
            let mime = track.codec().capability.mime_type;
            let vp8 = mime.eq_ignore_ascii_case("video/vp8");
            while let Ok((packet, _)) = track.read_rtp().await {
                let key = vp8 && is_vp8_keyframe_start(&packet.payload);
                video_tx.send_modify(|v| {
                    v.packets += 1;
                    v.frames += u64::from(packet.header.marker);
                    v.keyframes += u64::from(key);
                });
            }
        })
    }));
    video
}

async fn open_channel(
    pc: &RTCPeerConnection,
) -> Result<(
    Arc<RTCDataChannel>,
    watch::Receiver<bool>,
    mpsc::UnboundedReceiver<serde_json::Value>,
)> {
    let channel = pc.create_data_channel("input", None).await?;
    let (open_tx, opened) = watch::channel(false);
    channel.on_open(Box::new(move || {
        let _ = open_tx.send(true);
        Box::pin(async {})
    }));
    let (msg_tx, messages) = mpsc::unbounded_channel();
    channel.on_message(Box::new(move |m| {
        let value = serde_json::from_slice(&m.data).unwrap_or(serde_json::Value::Null);
        let _ = msg_tx.send(value);
        Box::pin(async {})
    }));
    Ok((channel, opened, messages))
}

/// Applies the streamer's answer and candidates in order; collects errors
/// and keeps the last answer.
fn spawn_signal_handler(
    pc: Arc<RTCPeerConnection>,
    mut signals: mpsc::UnboundedReceiver<Signal>,
) -> (watch::Receiver<Vec<String>>, watch::Receiver<String>) {
    let (err_tx, errors) = watch::channel(Vec::new());
    let (answer_tx, answer) = watch::channel(String::new());
    tokio::spawn(async move {
        while let Some(signal) = signals.recv().await {
            let result = match signal {
                Signal::Answer { sdp } => match RTCSessionDescription::answer(sdp.clone()) {
                    Ok(answer) => {
                        let _ = answer_tx.send(sdp);
                        pc.set_remote_description(answer).await
                    }
                    Err(e) => Err(e),
                },
                Signal::Candidate {
                    candidate,
                    sdp_m_line_index,
                } => {
                    let init = RTCIceCandidateInit {
                        candidate,
                        sdp_mline_index: Some(sdp_m_line_index as u16),
                        ..Default::default()
                    };
                    pc.add_ice_candidate(init).await
                }
                Signal::Error { message } => {
                    err_tx.send_modify(|e| e.push(message));
                    Ok(())
                }
                _ => Ok(()),
            };
            if let Err(e) = result {
                err_tx.send_modify(|errs| errs.push(format!("peer: {e}")));
            }
        }
    });
    (errors, answer)
}

fn spawn_candidate_sender(
    id: &str,
    pipe: Pipe,
    mut rx: mpsc::UnboundedReceiver<RTCIceCandidate>,
    offering: Arc<tokio::sync::Mutex<()>>,
) {
    let id = id.to_owned();
    tokio::spawn(async move {
        while let Some(c) = rx.recv().await {
            let _after_offer = offering.lock().await;
            let Ok(init) = c.to_json() else { continue };
            let signal = Signal::Candidate {
                candidate: init.candidate,
                sdp_m_line_index: u32::from(init.sdp_mline_index.unwrap_or(0)),
            };
            if pipe.signal(&id, signal).is_err() {
                return;
            }
        }
    });
}

/// Whether an RTP payload starts a VP8 keyframe: the payload descriptor
/// says "start of partition 0", and the frame tag's P bit is 0.
fn is_vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let start = first & 0x10 != 0;
    let partition = first & 0x07;
    let mut at = 1;
    if first & 0x80 != 0 {
        let Some(&x) = payload.get(1) else {
            return false;
        };
        at = 2;
        if x & 0x80 != 0 {
            // Picture id: 15 bits when its M bit is set, else 7.
            let long = payload.get(at).is_some_and(|b| b & 0x80 != 0);
            at += if long { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1;
        }
        if x & 0x30 != 0 {
            at += 1;
        }
    }
    start && partition == 0 && payload.get(at).is_some_and(|b| b & 0x01 == 0)
}

struct Reports(mpsc::UnboundedReceiver<StreamerReport>);

impl Reports {
    /// The next report `f` picks, skipping others.
    async fn next<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(StreamerReport) -> Option<T>,
    ) -> Result<T> {
        timeout(DEADLINE, async {
            while let Some(report) = self.0.recv().await {
                if let Some(t) = f(report) {
                    return Ok(t);
                }
            }
            bail!("the streamer's stdout closed")
        })
        .await
        .map_err(|_| anyhow!("timed out waiting for {what}"))?
    }
}

/// Xvfb, the streamer and the report plumbing of one test.
struct Harness {
    painter: Painter,
    // Dropped last: the streamer needs the display until it is gone.
    streamer: Streamer,
    _xvfb: Xvfb,
    pipe: Pipe,
    router: Router,
    reports: Reports,
}

impl Harness {
    /// Starts everything and waits for `ready`.
    async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// As [`Harness::start`], with the spec adjusted by `tune`.
    async fn start_with(tune: impl FnOnce(&mut StreamSpec)) -> Result<Self> {
        let xvfb = Xvfb::start()?;
        let painter = Painter::start(&xvfb.display)?;
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let streamer = Streamer::start(&xvfb.display, report_tx)?;
        let pipe = streamer.sender();
        let router = Router::default();
        let mut reports = Reports(router.spawn(report_rx));
        let mut spec = StreamSpec {
            framerate: 30,
            bitrate_kbps: 1500,
            jpeg_fps: 2,
            jpeg_quality: 60,
            ice_servers: vec![],
            ice_addresses: vec!["127.0.0.1".into()],
            http_proxy: None,
            copy_out: false,
        };
        tune(&mut spec);
        pipe.send(&StreamerCommand::Start(spec))?;
        let size = reports
            .next("ready", |r| match r {
                StreamerReport::Ready { width, height } => Some((width, height)),
                _ => None,
            })
            .await?;
        assert_eq!(size, (1280, 720));
        Ok(Self {
            painter,
            streamer,
            _xvfb: xvfb,
            pipe,
            router,
            reports,
        })
    }

    async fn connect(&self, id: &str, codec: Codec) -> Result<Peer> {
        let mut peer = Peer::connect(id, codec, &self.pipe, &self.router).await?;
        peer.wait_state("connected").await?;
        Ok(peer)
    }

    /// The viewer id of the next `input` report.
    async fn next_input(&mut self) -> Result<(String, usize)> {
        self.reports
            .next("input", |r| match r {
                StreamerReport::Input { viewer_id, events } => Some((viewer_id, events.len())),
                _ => None,
            })
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webrtc_peer_gets_video_keyframes_and_input() -> Result<()> {
    let mut h = Harness::start().await?;
    h.pipe.send(&StreamerCommand::Control {
        viewer_id: Some("alice".into()),
    })?;
    let mut alice = h.connect("alice", Codec::Vp8).await?;
    video_and_keyframes(&h, &mut alice).await?;
    controlling_viewer_input(&mut h, &mut alice).await?;
    let mut bob = h.connect("bob", Codec::Vp8).await?;
    watching_viewer_input(&mut h, &mut alice, &mut bob).await?;
    stats_and_leave(&mut h, &mut alice, &bob).await?;
    h264_viewer(&h).await?;
    ice_restart(&h, &mut alice).await?;
    bad_signals(&h, &mut alice).await?;
    still_screen(&mut h, &mut alice).await?;
    alice.pc.close().await?;
    let status = h.streamer.stop(&mut h.reports).await?;
    assert!(status.success(), "streamer exit status {status}");
    Ok(())
}

/// 30 frames, starting with a keyframe, and a keyframe on request; the
/// answer turned NACK and RTX on.
async fn video_and_keyframes(h: &Harness, alice: &mut Peer) -> Result<()> {
    let answer = alice.answer.borrow().clone();
    assert!(answer.contains("a=rtcp-fb:96 nack\r\n"), "{answer}");
    assert!(answer.contains("a=rtpmap:97 rtx/90000"), "{answer}");
    assert!(answer.contains("a=ssrc:"), "{answer}");
    let v = alice.wait_video("30 frames", |v| v.frames >= 30).await?;
    assert!(v.keyframes >= 1, "the stream starts with a keyframe: {v:?}");
    let before = alice.video.borrow().keyframes;
    h.pipe.signal("alice", Signal::KeyFrame)?;
    alice
        .wait_video("a requested keyframe", |v| v.keyframes > before)
        .await?;
    Ok(())
}

/// A still screen costs about a frame a second (the capture ticks 30
/// times), and a keyframe request still gets its keyframe at once.
async fn still_screen(h: &mut Harness, alice: &mut Peer) -> Result<()> {
    h.painter.stop();
    // The frames of the last change drain first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let window = Duration::from_secs(4);
    let before = alice.video.borrow().frames;
    tokio::time::sleep(window).await;
    let sent = alice.video.borrow().frames - before;
    assert!(
        sent <= 8,
        "{sent} frames of a still screen in {window:?} (at most about one a second)"
    );
    let keyframes = alice.video.borrow().keyframes;
    h.pipe.signal("alice", Signal::KeyFrame)?;
    timeout(
        Duration::from_millis(500),
        alice.wait_video("a keyframe of a still screen", |v| v.keyframes > keyframes),
    )
    .await
    .map_err(|_| anyhow!("no keyframe within 0.5 s of the request on a still screen"))??;
    Ok(())
}

/// The data channel: told it controls, ping/pong, input reported.
async fn controlling_viewer_input(h: &mut Harness, alice: &mut Peer) -> Result<()> {
    let control = alice.message("control").await?;
    assert_eq!(control["controlling"], true);
    alice
        .send(serde_json::json!({"type": "ping", "t": 1234.5}))
        .await?;
    assert_eq!(alice.message("pong").await?["t"], 1234.5);
    alice
        .send(
            serde_json::json!({"type": "input", "events": [{"type": "keyDown", "keysym": 65293}]}),
        )
        .await?;
    assert_eq!(h.next_input().await?, ("alice".into(), 1));
    Ok(())
}

/// A second viewer watches the same encode but its input is refused.
async fn watching_viewer_input(h: &mut Harness, alice: &mut Peer, bob: &mut Peer) -> Result<()> {
    bob.wait_video("bob's frames", |v| v.frames >= 10 && v.keyframes >= 1)
        .await?;
    assert_eq!(bob.message("control").await?["controlling"], false);
    bob.send(
        serde_json::json!({"type": "input", "events": [{"type": "mouseMove", "x": 1, "y": 2}]}),
    )
    .await?;
    let refusal = bob.message("error").await?;
    assert!(refusal["message"]
        .as_str()
        .unwrap_or("")
        .contains("another viewer"));
    // Reports are written in order: bob's input would come before alice's.
    alice
        .send(serde_json::json!({"type": "input", "events": [{"type": "mouseDown", "button": 1}]}))
        .await?;
    let (who, _) = h.next_input().await?;
    assert_eq!(
        who, "alice",
        "a watching viewer's input must not be reported"
    );
    Ok(())
}

/// Stats count both viewers; bob leaves and alice keeps receiving from
/// the shared encoder.
async fn stats_and_leave(h: &mut Harness, alice: &mut Peer, bob: &Peer) -> Result<()> {
    let stats: StreamStats = h
        .reports
        .next("stats with two viewers", |r| match r {
            StreamerReport::Stats(s) if s.viewers == 2 => Some(s),
            _ => None,
        })
        .await?;
    assert!(
        stats.frames >= 30 && stats.keyframes >= 2 && stats.bytes > 0,
        "{stats:?}"
    );
    h.pipe.signal("bob", Signal::Leave)?;
    bob.pc.close().await?;
    let now = alice.video.borrow().frames;
    alice
        .wait_video("frames after bob left", |v| v.frames >= now + 15)
        .await?;
    Ok(())
}

/// A viewer asking for H.264 starts the second encoder (which stops again
/// when it leaves).
async fn h264_viewer(h: &Harness) -> Result<()> {
    let mut dave = h.connect("dave", Codec::H264).await?;
    dave.wait_video("H.264 frames", |v| v.frames >= 10).await?;
    h.pipe.signal("dave", Signal::Leave)?;
    dave.pc.close().await?;
    Ok(())
}

/// ICE restart: a new offer with new credentials on the same viewer; video
/// and the data channel carry on.
async fn ice_restart(h: &Harness, alice: &mut Peer) -> Result<()> {
    alice.pc.restart_ice().await?;
    alice.offer(&h.pipe).await?;
    let now = alice.video.borrow().frames;
    alice
        .wait_video("frames after an ICE restart", |v| v.frames >= now + 30)
        .await?;
    alice
        .send(serde_json::json!({"type": "ping", "t": 7}))
        .await?;
    assert_eq!(alice.message("pong").await?["t"], 7);
    Ok(())
}

/// Bad signals get errors back, not a crash: a candidate for an unknown
/// viewer, a line that is no candidate, one that fails validation.
async fn bad_signals(h: &Harness, alice: &mut Peer) -> Result<()> {
    let mut carol = h.router.register("carol");
    h.pipe.signal(
        "carol",
        Signal::Candidate {
            candidate: "candidate:1 1 UDP 1 127.0.0.1 9 typ host".into(),
            sdp_m_line_index: 0,
        },
    )?;
    let err = timeout(DEADLINE, carol.recv())
        .await?
        .context("carol's error")?;
    assert!(matches!(err, Signal::Error { .. }), "{err:?}");
    for candidate in ["garbage", "candidate:1\nx"] {
        let candidate = candidate.to_owned();
        h.pipe.signal(
            "alice",
            Signal::Candidate {
                candidate,
                sdp_m_line_index: 0,
            },
        )?;
    }
    timeout(DEADLINE, alice.errors.wait_for(|e| e.len() >= 2))
        .await
        .context("errors for bad candidates")??;
    Ok(())
}

#[test]
fn vp8_keyframe_detection_reads_the_descriptor() {
    // X=1, S=1, PID=0; I=1 with a 15-bit picture id; then a key frame tag.
    assert!(is_vp8_keyframe_start(&[0x90, 0x80, 0x81, 0x23, 0x10]));
    // The same with P=1 (an interframe).
    assert!(!is_vp8_keyframe_start(&[0x90, 0x80, 0x81, 0x23, 0x11]));
    // Not the start of a partition.
    assert!(!is_vp8_keyframe_start(&[0x80, 0x80, 0x01, 0x10]));
}
