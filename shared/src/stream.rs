//! The live view: messages of the screen streamer and its viewers.
//!
//! Three hops carry them. A viewer speaks [`Signal`]s as JSON over its
//! WebSocket to `airlockd`; `airlockd` relays each one, tagged with the
//! viewer's id as a [`ViewerSignal`], to the agent (`Operation::StreamSignal`);
//! the agent hands it to the streamer process over a pipe as a
//! [`StreamerCommand`]. Answers flow back the same way: [`StreamerReport`]
//! from the streamer to the agent, [`StreamEvent`] from the agent to the
//! host, [`Signal`] from the host to the viewer.
//!
//! The viewer always offers (a receive-only video transceiver and an
//! `input` data channel) and the streamer always answers, so an ICE restart
//! is just a new offer from the viewer. The pipe between agent and streamer
//! uses the same frame codec as vsock ([`crate::frame`]).

use serde::{Deserialize, Serialize};

use crate::login::{InputEvent, SecretText};
use crate::message::{check_len, InvalidMessage};

/// Longest SDP accepted in a signal (bytes).
pub const MAX_SDP_BYTES: usize = 64 << 10;

/// Longest ICE candidate line accepted in a signal (bytes).
pub const MAX_CANDIDATE_BYTES: usize = 1024;

/// Largest JPEG frame of the fallback view (bytes, before base64).
pub const MAX_JPEG_BYTES: usize = 1 << 20;

/// Longest error or detail message carried in a signal (bytes).
pub const MAX_SIGNAL_MESSAGE_BYTES: usize = 1024;

/// Most STUN/TURN servers in a [`StreamSpec`].
pub const MAX_ICE_SERVERS: usize = 8;

/// Video codec a viewer may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// VP8 (`vp8enc deadline=1`, CBR): the default.
    Vp8,
    /// H.264 constrained baseline (`x264enc tune=zerolatency`).
    H264,
}

/// One STUN or TURN server, as `RTCIceServer` spells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceServer {
    /// `stun:host:port` or `turn:host:port?transport=udp` URLs.
    pub urls: Vec<String>,
    /// TURN username (`<expiry>:<userId>` for TURN REST credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN password (redacted in `Debug`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<SecretText>,
}

/// How the agent starts the streamer (`Operation::StreamStart`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamSpec {
    /// Frames per second captured and encoded.
    pub framerate: u32,
    /// Target video bitrate (kbit/s, CBR).
    pub bitrate_kbps: u32,
    /// Frames per second of the JPEG fallback.
    pub jpeg_fps: u32,
    /// JPEG quality of the fallback (1-100).
    pub jpeg_quality: u32,
    /// STUN/TURN servers the streamer gathers candidates through.
    #[serde(default)]
    pub ice_servers: Vec<IceServer>,
    /// Local addresses ICE may use; empty means every interface.
    #[serde(default)]
    pub ice_addresses: Vec<String>,
    /// HTTP proxy for TURN over TCP (`http://127.0.0.1:port`): set by the
    /// agent of a VM without a network, whose media leaves only that way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    /// Text the controlling viewer copies (Ctrl+C, Ctrl+X) in the remote
    /// page goes to its clipboard ([`Signal::Clipboard`]). Off unless the
    /// operator turns it on: a login page has little worth copying out.
    #[serde(default)]
    pub copy_out: bool,
}

/// A signalling message between one viewer and the streamer. The same JSON
/// travels on the viewer's WebSocket (`{"type": "offer", "sdp": ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Signal {
    /// Viewer → streamer: an SDP offer (first connection or ICE restart).
    Offer {
        /// The SDP.
        sdp: String,
        /// Preferred codec, when the offer carries several.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        codec: Option<Codec>,
    },
    /// Streamer → viewer: the SDP answer.
    Answer {
        /// The SDP.
        sdp: String,
    },
    /// Either way: a trickled ICE candidate.
    Candidate {
        /// The `candidate:` line (without `a=`).
        candidate: String,
        /// Index of the m-line it belongs to.
        sdp_m_line_index: u32,
    },
    /// Either way: no more candidates for this offer/answer.
    EndOfCandidates,
    /// Viewer → streamer: send a keyframe now.
    KeyFrame,
    /// Viewer → streamer: also send JPEG frames (WebRTC did not connect);
    /// `fps` 0 stops them.
    Jpeg {
        /// Frames per second wanted, at most the spec's `jpegFps`.
        fps: u32,
    },
    /// Host → streamer: the viewer is gone; free what it used.
    Leave,
    /// Streamer → viewer: the peer connection changed state
    /// (`connecting`, `connected`, `failed`, ...).
    State {
        /// The `RTCPeerConnectionState`-like name.
        state: String,
    },
    /// Either way: something about this viewer failed.
    Error {
        /// What, for a person.
        message: String,
    },
    /// Agent → controlling viewer: whether the remote page's focus is on
    /// something that takes typing (a phone's viewer raises or lowers its
    /// on-screen keyboard).
    Focus {
        /// An editable element has the focus.
        editable: bool,
    },
    /// Agent → controlling viewer: text it copied in the remote page, for
    /// its clipboard (only with [`StreamSpec::copy_out`]).
    Clipboard {
        /// The copied text (redacted in `Debug`).
        text: SecretText,
    },
}

/// Most text one [`Signal::Clipboard`] carries (bytes).
pub const MAX_CLIPBOARD_BYTES: usize = 64 << 10;

/// A [`Signal`] addressed to or coming from one viewer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewerSignal {
    /// The host's id for the viewer (short token characters).
    pub viewer_id: String,
    /// The message.
    pub signal: Signal,
}

/// What the agent tells the streamer process, one frame each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum StreamerCommand {
    /// The first frame: what to stream. Sent on stdin rather than argv so
    /// TURN credentials never appear on a command line.
    Start(StreamSpec),
    /// A viewer's signal.
    Viewer(ViewerSignal),
    /// Which viewer's input counts (`None`: nobody's). Others only watch.
    Control {
        /// The controlling viewer.
        viewer_id: Option<String>,
    },
    /// Stop everything and exit 0.
    Stop,
}

/// What the streamer process tells the agent, one frame each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "report",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum StreamerReport {
    /// The capture pipeline is playing.
    Ready {
        /// Captured width in pixels.
        width: u32,
        /// Captured height in pixels.
        height: u32,
    },
    /// A signal for a viewer.
    Viewer(ViewerSignal),
    /// Input from the controlling viewer's data channel, for XTest.
    Input {
        /// Whose.
        viewer_id: String,
        /// The events, in order.
        events: Vec<InputEvent>,
    },
    /// One JPEG frame of the fallback view (shared by its viewers).
    Jpeg {
        /// The JPEG bytes, base64.
        data: String,
    },
    /// Counters, about once a second while any viewer is connected.
    Stats(StreamStats),
}

/// Streamer counters since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamStats {
    /// Encoded video frames.
    pub frames: u64,
    /// Encoded video bytes.
    pub bytes: u64,
    /// Keyframes produced.
    pub keyframes: u64,
    /// Viewers with a peer connection.
    pub viewers: u32,
    /// The encoder's current target bitrate (kbit/s), adapted to the
    /// viewers' receiver reports; 0 from a streamer that predates it.
    #[serde(default)]
    pub target_kbps: u32,
}

/// Lifecycle of the streamer process, reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StreamerState {
    /// Spawned, pipeline not yet playing.
    Starting,
    /// Playing and accepting viewers.
    Running,
    /// Died; a restart is scheduled after a backoff.
    Restarting,
    /// Stopped on request.
    Stopped,
}

/// Live-view events from the agent to the host (`Event::Stream`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum StreamEvent {
    /// The streamer changed state.
    State {
        /// The new state.
        state: StreamerState,
        /// Restarts so far.
        restarts: u32,
        /// Why (exit status, error), for a person.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A signal for a viewer.
    Viewer(ViewerSignal),
    /// A fallback JPEG frame (base64).
    Jpeg {
        /// The JPEG bytes, base64.
        data: String,
    },
    /// Streamer counters.
    Stats(StreamStats),
}

impl Signal {
    /// Checks the bounds of a signal (viewers and guests are untrusted).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Signal::Offer { sdp, .. } | Signal::Answer { sdp } => {
                check_len("sdp", sdp, MAX_SDP_BYTES)
            }
            Signal::Candidate { candidate, .. } => {
                check_len("candidate", candidate, MAX_CANDIDATE_BYTES)?;
                if candidate.contains(['\r', '\n']) {
                    return Err(InvalidMessage {
                        field: "candidate",
                        problem: "must be one line".into(),
                    });
                }
                Ok(())
            }
            Signal::State { state: message } | Signal::Error { message } => {
                check_len("message", message, MAX_SIGNAL_MESSAGE_BYTES)
            }
            Signal::Clipboard { text } => check_len("text", &text.0, MAX_CLIPBOARD_BYTES),
            Signal::Jpeg { fps } if *fps > 60 => Err(InvalidMessage {
                field: "fps",
                problem: format!("{fps}, at most 60"),
            }),
            _ => Ok(()),
        }
    }
}

/// Checks a viewer id: a short token of ASCII letters, digits or `-._+`.
pub fn check_viewer_id(id: &str) -> Result<(), InvalidMessage> {
    crate::message::check_token("viewerId", id)
}

impl ViewerSignal {
    /// Checks the viewer id and the signal.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        check_viewer_id(&self.viewer_id)?;
        self.signal.validate()
    }
}

impl StreamEvent {
    /// Checks the bounds the host enforces on a live-view event.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            StreamEvent::State { detail, .. } => match detail {
                Some(d) => check_len("detail", d, MAX_SIGNAL_MESSAGE_BYTES),
                None => Ok(()),
            },
            StreamEvent::Viewer(v) => v.validate(),
            StreamEvent::Jpeg { data } => check_len("jpeg", data, MAX_JPEG_BYTES.div_ceil(3) * 4),
            StreamEvent::Stats(_) => Ok(()),
        }
    }
}

impl StreamSpec {
    /// Checks the spec's ranges.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let bad = |field, problem: String| Err(InvalidMessage { field, problem });
        if !(1..=60).contains(&self.framerate) {
            return bad("framerate", format!("{}, must be 1-60", self.framerate));
        }
        if !(100..=50_000).contains(&self.bitrate_kbps) {
            return bad(
                "bitrateKbps",
                format!("{}, must be 100-50000", self.bitrate_kbps),
            );
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return bad(
                "jpegQuality",
                format!("{}, must be 1-100", self.jpeg_quality),
            );
        }
        if self.ice_servers.len() > MAX_ICE_SERVERS {
            return bad("iceServers", format!("at most {MAX_ICE_SERVERS}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_use_the_browser_field_names() {
        let s: Signal = serde_json::from_str(
            r#"{"type":"candidate","candidate":"candidate:1 1 UDP 1 127.0.0.1 5000 typ host","sdpMLineIndex":0}"#,
        )
        .unwrap();
        assert!(matches!(
            s,
            Signal::Candidate {
                sdp_m_line_index: 0,
                ..
            }
        ));
        let json = serde_json::to_string(&Signal::EndOfCandidates).unwrap();
        assert_eq!(json, r#"{"type":"endOfCandidates"}"#);
    }

    #[test]
    fn oversized_or_multiline_signals_are_refused() {
        let sdp = "v".repeat(MAX_SDP_BYTES + 1);
        assert!(Signal::Answer { sdp }.validate().is_err());
        let c = Signal::Candidate {
            candidate: "candidate:1\r\nx".into(),
            sdp_m_line_index: 0,
        };
        assert!(c.validate().is_err());
        let v = ViewerSignal {
            viewer_id: "../x".into(),
            signal: Signal::KeyFrame,
        };
        assert!(v.validate().is_err());
    }

    #[test]
    fn turn_passwords_are_redacted() {
        let s = IceServer {
            urls: vec!["turn:127.0.0.1:3478".into()],
            username: Some("1:u".into()),
            credential: Some(SecretText("hunter2".into())),
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
