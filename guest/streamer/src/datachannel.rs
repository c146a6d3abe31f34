//! A viewer's `input` data channel: input events from the controlling
//! viewer become `Report::Input`, pings get pongs, and every viewer learns
//! whether it controls the input.
//!
//! `viewer` hands each channel `webrtcbin` announces to [`Link::adopt`];
//! `streamer` changes the controlling viewer through [`Control`] and tells
//! every link with [`Link::notify_control`].

use std::sync::{Arc, Mutex, PoisonError};

use airlock_proto::stream::StreamerReport;
use airlock_proto::{InputBatch, InputEvent};
use gstreamer_webrtc as gst_webrtc;
use serde::{Deserialize, Serialize};

use crate::pipe::Reporter;

/// Largest data channel message accepted (bytes).
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

/// The label of the channel the viewer opens for input.
pub const LABEL: &str = "input";

/// Which viewer's input counts; shared by the streamer and every channel.
#[derive(Debug, Clone, Default)]
pub struct Control(Arc<Mutex<Option<String>>>);

impl Control {
    /// Makes `viewer` the controlling viewer (`None`: nobody).
    pub fn set(&self, viewer: Option<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = viewer;
    }

    /// Whether `viewer` controls the input.
    pub fn is(&self, viewer: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
            == Some(viewer)
    }
}

/// A message from the viewer.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum FromViewer {
    Input { events: Vec<InputEvent> },
    Ping { t: serde_json::Number },
}

/// A message to the viewer.
#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
enum ToViewer {
    Pong { t: serde_json::Number },
    Error { message: String },
    Control { controlling: bool },
}

/// What one incoming message leads to.
#[derive(Debug, Default)]
struct Outcome {
    reply: Option<ToViewer>,
    input: Option<Vec<InputEvent>>,
}

fn error(message: &str) -> Outcome {
    Outcome {
        reply: Some(ToViewer::Error {
            message: message.into(),
        }),
        input: None,
    }
}

/// Decides what to do with one text message (no side effects).
fn handle(text: &str, controlling: bool) -> Outcome {
    if text.len() > MAX_MESSAGE_BYTES {
        return error("message too large");
    }
    match serde_json::from_str::<FromViewer>(text) {
        Ok(FromViewer::Ping { t }) => Outcome {
            reply: Some(ToViewer::Pong { t }),
            input: None,
        },
        Ok(FromViewer::Input { .. }) if !controlling => error("another viewer controls the input"),
        Ok(FromViewer::Input { events }) => {
            let batch = InputBatch { events };
            match batch.validate() {
                Ok(()) => Outcome {
                    reply: None,
                    input: Some(batch.events),
                },
                Err(e) => error(&format!("invalid input: {} {}", e.field, e.problem)),
            }
        }
        // The serde message may quote the text, which may be a password.
        Err(_) => error("unknown or malformed message"),
    }
}

/// One viewer's side of its input channel.
#[derive(Debug)]
pub struct Link {
    viewer_id: String,
    reporter: Reporter,
    control: Control,
    channel: Mutex<Option<gst_webrtc::WebRTCDataChannel>>,
}

impl Link {
    /// A link for `viewer_id`, with no channel yet.
    pub fn new(viewer_id: &str, reporter: Reporter, control: Control) -> Arc<Self> {
        Arc::new(Self {
            viewer_id: viewer_id.into(),
            reporter,
            control,
            channel: Mutex::new(None),
        })
    }

    /// Takes over a channel the viewer opened (other labels are closed).
    pub fn adopt(self: &Arc<Self>, channel: gst_webrtc::WebRTCDataChannel) {
        let label = channel.label().unwrap_or_default();
        if label != LABEL {
            tracing::info!(viewer_id = %self.viewer_id, %label, "closing an unexpected data channel");
            channel.close();
            return;
        }
        let link = Arc::downgrade(self);
        channel.connect_on_message_string(move |channel, text| {
            if let (Some(link), Some(text)) = (link.upgrade(), text) {
                link.on_message(channel, text);
            }
        });
        let link = Arc::downgrade(self);
        channel.connect_on_message_data(move |channel, _| {
            if link.upgrade().is_some() {
                send(
                    channel,
                    &ToViewer::Error {
                        message: "binary messages are not accepted".into(),
                    },
                );
            }
        });
        let link = Arc::downgrade(self);
        channel.connect_on_open(move |_| {
            if let Some(link) = link.upgrade() {
                link.notify_control();
            }
        });
        let open = channel.ready_state() == gst_webrtc::WebRTCDataChannelState::Open;
        *self.channel.lock().unwrap_or_else(PoisonError::into_inner) = Some(channel);
        // A channel the viewer opened is usually open by the time we see it.
        if open {
            self.notify_control();
        }
    }

    /// Tells the viewer whether it controls the input now.
    pub fn notify_control(&self) {
        let controlling = self.control.is(&self.viewer_id);
        if let Some(channel) = self.channel() {
            if channel.ready_state() == gst_webrtc::WebRTCDataChannelState::Open {
                send(&channel, &ToViewer::Control { controlling });
            }
        }
    }

    /// Closes the channel and forgets it.
    pub fn close(&self) {
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(channel) = channel {
            channel.close();
        }
    }

    fn channel(&self) -> Option<gst_webrtc::WebRTCDataChannel> {
        self.channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn on_message(&self, channel: &gst_webrtc::WebRTCDataChannel, text: &str) {
        let outcome = handle(text, self.control.is(&self.viewer_id));
        if let Some(events) = outcome.input {
            tracing::debug!(viewer_id = %self.viewer_id, events = events.len(), "input");
            self.reporter.send(StreamerReport::Input {
                viewer_id: self.viewer_id.clone(),
                events,
            });
        }
        if let Some(reply) = outcome.reply {
            send(channel, &reply);
        }
    }
}

fn send(channel: &gst_webrtc::WebRTCDataChannel, message: &ToViewer) {
    match serde_json::to_string(message) {
        Ok(text) => {
            if let Err(e) = channel.send_string_full(Some(&text)) {
                tracing::debug!(error = %e, "data channel send failed");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot encode a data channel message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_echo_the_number_exactly() {
        let out = handle(r#"{"type":"ping","t":1712345678901.25}"#, false);
        let json = serde_json::to_string(&out.reply.unwrap()).unwrap();
        assert_eq!(json, r#"{"type":"pong","t":1712345678901.25}"#);
    }

    #[test]
    fn input_counts_only_from_the_controlling_viewer() {
        let msg = r#"{"type":"input","events":[{"type":"text","text":"pw"},{"type":"keyDown","keysym":65293}]}"#;
        let out = handle(msg, true);
        assert_eq!(out.input.unwrap().len(), 2);
        assert!(out.reply.is_none());
        let out = handle(msg, false);
        assert!(out.input.is_none());
        assert_eq!(
            out.reply,
            Some(ToViewer::Error {
                message: "another viewer controls the input".into()
            })
        );
    }

    #[test]
    fn bad_messages_get_errors_that_do_not_echo_them() {
        let many = format!(
            r#"{{"type":"input","events":[{}]}}"#,
            vec![r#"{"type":"mouseUp","button":1}"#; 513].join(",")
        );
        assert!(handle(&many, true).input.is_none());
        let big = format!(
            r#"{{"type":"ping","t":1,"pad":"{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        assert!(handle(&big, true).reply.is_some());
        let out = handle(
            r#"{"type":"input","events":[{"type":"text","text":secret}]}"#,
            true,
        );
        let json = serde_json::to_string(&out.reply.unwrap()).unwrap();
        assert!(!json.contains("secret"));
    }

    #[test]
    fn control_follows_the_last_setting() {
        let control = Control::default();
        assert!(!control.is("a"));
        control.set(Some("a".into()));
        assert!(control.is("a") && !control.is("b"));
        control.set(None);
        assert!(!control.is("a"));
    }
}
