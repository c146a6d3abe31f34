//! An independent WebRTC peer for the live-view tests: webrtc-rs (not
//! GStreamer, not Chromium) negotiating through airlockd's signalling
//! WebSocket exactly as a viewer does: it offers a receive-only VP8 video
//! transceiver and an `input` data channel, trickles candidates both ways,
//! and inspects every RTP packet it receives to count complete frames and
//! keyframes. ICE is confined to the loopback interface.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_VP8};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::interceptor::registry::Registry;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use webrtc::rtp_transceiver::rtp_codec::{
    RTCRtpCodecCapability, RTCRtpCodecParameters, RTPCodecType,
};
use webrtc::rtp_transceiver::rtp_transceiver_direction::RTCRtpTransceiverDirection;
use webrtc::rtp_transceiver::RTCPFeedback;
use webrtc::rtp_transceiver::RTCRtpTransceiverInit;

/// What the peer has received so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct RtpCounts {
    /// RTP packets.
    pub packets: u64,
    /// Frames whose packets all arrived in order, start to marker bit.
    pub complete_frames: u64,
    /// Complete frames that were VP8 keyframes.
    pub keyframes: u64,
    /// The video track's SSRC, once known.
    pub ssrc: u32,
}

/// Tracks one frame at a time across packets.
#[derive(Debug, Default)]
struct FrameTracker {
    counts: RtpCounts,
    timestamp: Option<u32>,
    next_seq: u16,
    intact: bool,
    key: bool,
}

impl FrameTracker {
    fn packet(&mut self, seq: u16, ts: u32, marker: bool, payload: &[u8]) {
        self.counts.packets += 1;
        let start = vp8_frame_start(payload);
        if self.timestamp != Some(ts) {
            self.timestamp = Some(ts);
            self.intact = start.is_some();
            self.key = start == Some(true);
        } else if seq != self.next_seq {
            self.intact = false;
        }
        self.next_seq = seq.wrapping_add(1);
        if marker && self.intact {
            self.counts.complete_frames += 1;
            self.counts.keyframes += u64::from(self.key);
            self.intact = false;
        }
    }
}

/// For the first packet of a VP8 frame, whether the frame is a keyframe
/// (RFC 7741: payload descriptor, then the VP8 header's P bit, 0 = key);
/// `None` for any other packet.
pub fn vp8_frame_start(p: &[u8]) -> Option<bool> {
    let b0 = *p.first()?;
    let (start, pid) = (b0 & 0x10 != 0, b0 & 0x07);
    if !start || pid != 0 {
        return None;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let x = *p.get(1)?;
        i = 2;
        if x & 0x80 != 0 {
            i += if *p.get(i)? & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1;
        }
    }
    Some(*p.get(i)? & 0x01 == 0)
}

/// A connected webrtc-rs viewer.
pub struct Peer {
    pc: Arc<RTCPeerConnection>,
    ws: mpsc::Sender<Message>,
    counts: Arc<Mutex<FrameTracker>>,
    state: watch::Receiver<String>,
    /// The server's `welcome` message.
    pub welcome: Value,
    /// Every non-signalling message the server sent, in order.
    pub notes: Arc<Mutex<Vec<Value>>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("welcome", &self.welcome)
            .finish()
    }
}

fn vp8_only() -> Result<MediaEngine> {
    let mut m = MediaEngine::default();
    let fb = |t: &str, p: &str| RTCPFeedback {
        typ: t.into(),
        parameter: p.into(),
    };
    m.register_codec(
        RTCRtpCodecParameters {
            capability: RTCRtpCodecCapability {
                mime_type: MIME_TYPE_VP8.into(),
                clock_rate: 90000,
                channels: 0,
                sdp_fmtp_line: String::new(),
                rtcp_feedback: vec![fb("nack", ""), fb("nack", "pli"), fb("ccm", "fir")],
            },
            payload_type: 96,
            ..Default::default()
        },
        RTPCodecType::Video,
    )?;
    Ok(m)
}

/// A VP8-only webrtc-rs peer connection whose ICE stays on loopback.
pub async fn loopback_pc() -> Result<Arc<RTCPeerConnection>> {
    let mut m = vp8_only()?;
    let registry = register_default_interceptors(Registry::new(), &mut m)?;
    let mut s = SettingEngine::default();
    s.set_include_loopback_candidate(true);
    s.set_interface_filter(Box::new(|name: &str| name == "lo"));
    s.set_network_types(vec![NetworkType::Udp4]);
    let api = APIBuilder::new()
        .with_media_engine(m)
        .with_interceptor_registry(registry)
        .with_setting_engine(s)
        .build();
    Ok(Arc::new(
        api.new_peer_connection(RTCConfiguration::default()).await?,
    ))
}

impl Peer {
    /// Opens `ws_url` (the signalling socket, token included), waits for
    /// the welcome, and negotiates.
    pub async fn connect(ws_url: &str) -> Result<Self> {
        let (socket, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .context("opening the signalling WebSocket")?;
        let (mut sink, mut stream) = socket.split();
        let welcome = next_json(&mut stream).await?;
        if welcome["type"] != "welcome" {
            bail!("expected a welcome, got {welcome}");
        }
        let (ws_tx, mut ws_rx) = mpsc::channel::<Message>(64);
        // Owned by the peer: ends when the peer's sender is dropped.
        tokio::spawn(async move {
            while let Some(m) = ws_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pc = loopback_pc().await?;
        let counts = Arc::new(Mutex::new(FrameTracker::default()));
        let (state_tx, state) = watch::channel(String::from("new"));
        wire_callbacks(&pc, ws_tx.clone(), counts.clone(), state_tx);
        let peer = Self {
            pc: pc.clone(),
            ws: ws_tx,
            counts,
            state,
            welcome,
            notes: Arc::default(),
        };
        let notes = peer.notes.clone();
        tokio::spawn(read_signals(stream, pc, notes));
        peer.offer().await?;
        Ok(peer)
    }

    async fn offer(&self) -> Result<()> {
        let init = RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Recvonly,
            send_encodings: vec![],
        };
        self.pc
            .add_transceiver_from_kind(RTPCodecType::Video, Some(init))
            .await?;
        self.pc.create_data_channel("input", None).await?;
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer.clone()).await?;
        self.send(json!({ "type": "offer", "sdp": offer.sdp, "codec": "vp8" }))
            .await
    }

    /// Sends one JSON message on the signalling socket.
    pub async fn send(&self, v: Value) -> Result<()> {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .map_err(|_| anyhow!("the signalling socket is closed"))
    }

    /// What has arrived so far.
    pub fn counts(&self) -> RtpCounts {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counts
    }

    /// Waits until `pred` holds for the counts, up to `timeout`.
    pub async fn wait_counts(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&RtpCounts) -> bool,
    ) -> Result<RtpCounts> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.counts();
            if pred(&c) {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} within {timeout:?}: got {c:?}, peer state {}",
                    *self.state.borrow()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the peer connection to reach `connected`.
    pub async fn connected(&self, timeout: Duration) -> Result<()> {
        let mut rx = self.state.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| s == "connected"))
            .await
            .map_err(|_| anyhow!("not connected within {timeout:?}: {}", *self.state.borrow()))??;
        Ok(())
    }

    /// Sends an RTCP picture loss indication for the video track.
    pub async fn send_pli(&self) -> Result<()> {
        let media_ssrc = self.counts().ssrc;
        self.pc
            .write_rtcp(&[Box::new(PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc,
            })])
            .await?;
        Ok(())
    }

    /// Closes the peer connection.
    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

fn wire_callbacks(
    pc: &Arc<RTCPeerConnection>,
    ws: mpsc::Sender<Message>,
    counts: Arc<Mutex<FrameTracker>>,
    state: watch::Sender<String>,
) {
    pc.on_ice_candidate(Box::new(move |c| {
        let ws = ws.clone();
        Box::pin(async move {
            let msg = match c.map(|c| c.to_json()) {
                Some(Ok(init)) => json!({
                    "type": "candidate",
                    "candidate": init.candidate,
                    "sdpMLineIndex": init.sdp_mline_index.unwrap_or(0),
                }),
                Some(Err(_)) => return,
                None => json!({ "type": "endOfCandidates" }),
            };
            let _ = ws.send(Message::text(msg.to_string())).await;
        })
    }));
    pc.on_peer_connection_state_change(Box::new(move |s| {
        let _ = state.send(s.to_string());
        Box::pin(async {})
    }));
    pc.on_track(Box::new(move |track, _, _| {
        let counts = counts.clone();
        // Owned by the track: ends when the connection closes.
        tokio::spawn(async move {
            counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .counts
                .ssrc = track.ssrc();
            while let Ok((p, _)) = track.read_rtp().await {
                let h = &p.header;
                counts
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .packet(h.sequence_number, h.timestamp, h.marker, &p.payload);
            }
        });
        Box::pin(async {})
    }));
}

type WsStream = futures_util::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

async fn next_json(stream: &mut WsStream) -> Result<Value> {
    let deadline = Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout(deadline, stream.next())
            .await
            .map_err(|_| anyhow!("no message on the signalling socket within {deadline:?}"))?
            .context("the signalling socket closed")??;
        if let Message::Text(t) = msg {
            return Ok(serde_json::from_str(&t)?);
        }
    }
}

/// Applies the server's answer and candidates; keeps everything else.
async fn read_signals(
    mut stream: WsStream,
    pc: Arc<RTCPeerConnection>,
    notes: Arc<Mutex<Vec<Value>>>,
) {
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(t) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(&t) else {
            continue;
        };
        match v["type"].as_str() {
            Some("answer") => {
                let sdp = v["sdp"].as_str().unwrap_or_default().to_string();
                if let Ok(answer) = RTCSessionDescription::answer(sdp) {
                    let _ = pc.set_remote_description(answer).await;
                }
            }
            Some("candidate") => {
                let init = RTCIceCandidateInit {
                    candidate: v["candidate"].as_str().unwrap_or_default().into(),
                    sdp_mline_index: v["sdpMLineIndex"].as_u64().map(|i| i as u16),
                    ..Default::default()
                };
                let _ = pc.add_ice_candidate(init).await;
            }
            _ => notes.lock().unwrap_or_else(PoisonError::into_inner).push(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframes_are_told_from_the_payload_header() {
        // X=1 S=1 PID=0; I=1 with a 15-bit picture id; then P=0 (key).
        assert_eq!(vp8_frame_start(&[0x90, 0x80, 0x81, 0x23, 0x10]), Some(true));
        // Same descriptor, P=1: an interframe.
        assert_eq!(
            vp8_frame_start(&[0x90, 0x80, 0x81, 0x23, 0x11]),
            Some(false)
        );
        // Not the start of a partition.
        assert_eq!(vp8_frame_start(&[0x80, 0x80, 0x81, 0x23, 0x10]), None);
    }

    #[test]
    fn a_gap_in_sequence_numbers_spoils_the_frame() {
        let mut t = FrameTracker::default();
        let start = [0x10, 0x10];
        t.packet(1, 100, false, &start);
        t.packet(2, 100, true, &[0x00]);
        t.packet(3, 200, false, &[0x10, 0x11]);
        t.packet(5, 200, true, &[0x00]);
        assert_eq!(t.counts.complete_frames, 1);
        assert_eq!(t.counts.keyframes, 1);
    }
}
