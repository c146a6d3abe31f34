//! One viewer's signalling WebSocket, after its token was checked: the
//! welcome, then the viewer's signals and input relayed to the agent (in
//! order, bounded, rate-limited) while its queue of answers, candidates,
//! streamer states and JPEG frames is written out. A fresh viewer token is
//! pushed before the one it connected with expires, so its page can
//! reconnect. Ends when either side closes, the viewer falls behind, or the
//! session ends (close code 4000 with the reason). Called by the
//! `/api/webrtc/session/:id/ws` handler.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use airlock_proto::stream::Signal;
use airlock_proto::InputBatch;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::hub::{Hub, Joined, Outbound};
use super::limit::RateLimiter;
use super::LiveError;

/// Close code: the session ended.
pub const CLOSE_SESSION_ENDED: u16 = 4000;
/// Close code: this viewer was dropped (it fell behind, or could not join).
pub const CLOSE_DROPPED: u16 = 4001;
/// A socket with no message (not even a pong) for this long is dead.
fn idle(hub: &Hub) -> Duration {
    Duration::from_millis(hub.config().viewer_idle_ms)
}

/// Serves one viewer until its socket ends.
pub async fn serve(hub: Arc<Hub>, socket: WebSocket, token_expires: SystemTime) {
    let (mut sink, stream) = socket.split();
    let joined = match hub.join_socket() {
        Ok(j) => j,
        Err(e) => {
            let _ = sink.send(close(CLOSE_DROPPED, &e.to_string())).await;
            return;
        }
    };
    let Joined {
        viewer_id,
        rx,
        welcome,
    } = joined;
    tokio::select! {
        _ = write(sink, rx, welcome, &hub) => {}
        _ = read(stream, &hub, &viewer_id, token_expires) => {}
    }
    hub.leave(&viewer_id).await;
}

/// A close frame; the reason is cut to the 123 bytes a frame allows.
fn close(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    }))
}

async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    welcome: String,
    hub: &Hub,
) {
    if sink.send(Message::Text(welcome.into())).await.is_err() {
        return;
    }
    let closed = hub.closed();
    // Pings keep proxies from closing a quiet socket, and draw the pongs
    // that show the viewer is still there.
    let mut ping = tokio::time::interval(idle(hub) / 3);
    ping.tick().await;
    loop {
        let msg = tokio::select! {
            biased;
            _ = closed.cancelled() => {
                let reason = hub.end_reason().unwrap_or_else(|| "the session ended".into());
                let _ = sink.send(close(CLOSE_SESSION_ENDED, &reason)).await;
                return;
            }
            m = rx.recv() => match m {
                Some(Outbound::Text(t)) => Message::Text(t.into()),
                Some(Outbound::Frame(b)) => Message::Binary(b),
                None => {
                    let why = "this viewer fell behind and was dropped; reconnect";
                    let _ = sink.send(close(CLOSE_DROPPED, why)).await;
                    return;
                }
            },
            _ = ping.tick() => Message::Ping(Default::default()),
        };
        if sink.send(msg).await.is_err() {
            return;
        }
    }
}

/// When to push a fresh token: halfway through the current one's life.
fn renew_at(expires: SystemTime) -> tokio::time::Instant {
    let left = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now() + left / 2
}

async fn read(
    mut stream: SplitStream<WebSocket>,
    hub: &Hub,
    viewer: &str,
    token_expires: SystemTime,
) {
    let mut limiter = RateLimiter::new(hub.config().messages_per_sec);
    let mut renew = renew_at(token_expires);
    let idle = idle(hub);
    loop {
        let next = tokio::select! {
            m = tokio::time::timeout(idle, stream.next()) => m,
            _ = tokio::time::sleep_until(renew) => {
                renew = push_token(hub, viewer);
                continue;
            }
        };
        let text = match next {
            Err(_) | Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return,
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Binary(_)))) => {
                hub.reply(
                    viewer,
                    error("binary messages are not understood; send JSON text"),
                );
                continue;
            }
            Ok(Some(Ok(_))) => continue,
        };
        let now = Instant::now();
        if !limiter.allow_at(now) {
            if limiter.should_warn(now) {
                hub.reply(
                    viewer,
                    error("too many messages; slow down (some were dropped)"),
                );
            }
            continue;
        }
        match handle(hub, viewer, text.as_str()).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => hub.reply(viewer, error(&e.to_string())),
        }
    }
}

/// Sends the viewer a fresh token; returns when to renew it next.
fn push_token(hub: &Hub, viewer: &str) -> tokio::time::Instant {
    let ttl = Duration::from_millis(hub.config().viewer_token_ttl_ms);
    match hub.issue_token(ttl) {
        Ok(issued) => {
            let link = hub.link(&issued);
            let msg = json!({
                "type": "token",
                "token": link.viewer_token,
                "expiresAt": link.viewer_token_expires_at,
                "viewerUrl": link.viewer_url,
            });
            hub.reply(viewer, msg.to_string());
            renew_at(issued.expires)
        }
        Err(_) => tokio::time::Instant::now() + ttl / 4,
    }
}

fn error(message: &str) -> String {
    serde_json::to_string(&Signal::Error {
        message: message.into(),
    })
    .unwrap_or_default()
}

/// Handles one message; `Ok(false)` when the viewer leaves.
async fn handle(hub: &Hub, viewer: &str, text: &str) -> Result<bool, LiveError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| LiveError::Invalid(format!("not JSON: {e}")))?;
    if value["type"] == "input" {
        let batch: InputBatch = serde_json::from_value(value)
            .map_err(|e| LiveError::Invalid(format!("bad input message: {e}")))?;
        hub.input(viewer, batch).await?;
        return Ok(true);
    }
    let signal: Signal = serde_json::from_value(value)
        .map_err(|e| LiveError::Invalid(format!("not a signal: {e}")))?;
    signal
        .validate()
        .map_err(|e| LiveError::Invalid(e.to_string()))?;
    match signal {
        Signal::Leave => Ok(false),
        Signal::Offer { .. }
        | Signal::Candidate { .. }
        | Signal::EndOfCandidates
        | Signal::KeyFrame
        | Signal::Jpeg { .. } => {
            hub.relay(viewer, signal).await?;
            Ok(true)
        }
        _ => Err(LiveError::Invalid(
            "a viewer sends offer, candidate, endOfCandidates, keyFrame, jpeg, leave or input"
                .into(),
        )),
    }
}
