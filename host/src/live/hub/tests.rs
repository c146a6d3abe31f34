//! Unit tests of the hub: control handover, capacity, routing of the
//! agent's events to viewers, and the HTTP viewers' answers. No VM: a
//! manager with nothing in it, so relays that would reach an agent are
//! only checked for their refusals.

use std::sync::Arc;
use std::time::Duration;

use airlock_proto::stream::{Signal, StreamEvent, StreamerState, ViewerSignal};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::config::{Config, LiveConfig};
use crate::image::ExpectedAgent;
use crate::vm::process::ProcessBackend;

fn hub(max_viewers: usize) -> Arc<Hub> {
    let vms = VmManager::new(
        Arc::new(Config::default()),
        (
            Arc::new(ProcessBackend::new(
                "/nonexistent".into(),
                0,
                None,
                Default::default(),
            )),
            None,
        ),
        ExpectedAgent {
            build_id: "00".into(),
            source: "test".into(),
        },
        Arc::new(crate::egress::Egress::new(Default::default()).unwrap()),
        CancellationToken::new(),
    );
    let cfg = LiveConfig {
        max_viewers,
        ..LiveConfig::default()
    };
    Hub::new(
        ("ses-1", "alice"),
        "http://127.0.0.1:4001".into(),
        Arc::new(cfg),
        vms,
        TaskTracker::new(),
        Duration::from_secs(60),
    )
    .unwrap()
}

/// The JSON messages queued for a viewer so far.
fn drain(rx: &mut mpsc::Receiver<Outbound>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(m) = rx.try_recv() {
        if let Outbound::Text(t) = m {
            out.push(serde_json::from_str(&t).unwrap());
        }
    }
    out
}

fn welcome(j: &Joined) -> Value {
    serde_json::from_str(&j.welcome).unwrap()
}

#[tokio::test]
async fn the_oldest_remaining_viewer_gets_control() {
    let hub = hub(4);
    let mut a = hub.join_socket().unwrap();
    let mut b = hub.join_socket().unwrap();
    let mut c = hub.join_socket().unwrap();
    assert_eq!(welcome(&a)["controlling"], true);
    assert_eq!(welcome(&b)["controlling"], false);
    assert_eq!(welcome(&a)["streamer"], "pending");
    assert_eq!(welcome(&a)["sessionId"], "ses-1");
    let _ = (drain(&mut a.rx), drain(&mut b.rx), drain(&mut c.rx));
    hub.leave(&a.viewer_id).await;
    assert_eq!(*hub.controller.borrow(), Some(b.viewer_id.clone()));
    let to_b = drain(&mut b.rx);
    assert!(
        to_b.iter()
            .any(|m| m["type"] == "control" && m["controlling"] == true),
        "{to_b:?}"
    );
    let to_c = drain(&mut c.rx);
    assert!(to_c.iter().all(|m| m["controlling"] != true), "{to_c:?}");
    hub.leave(&c.viewer_id).await;
    assert_eq!(
        *hub.controller.borrow(),
        Some(b.viewer_id.clone()),
        "unchanged"
    );
    hub.leave(&b.viewer_id).await;
    assert_eq!(*hub.controller.borrow(), None);
}

#[tokio::test]
async fn a_full_or_ended_session_takes_no_viewer() {
    let hub = hub(2);
    let mut a = hub.join_socket().unwrap();
    let _b = hub.join_socket().unwrap();
    assert!(matches!(hub.has_room(), Err(LiveError::Full(2))));
    assert!(matches!(hub.join_socket(), Err(LiveError::Full(2))));
    hub.close("the session was cancelled");
    assert!(matches!(hub.has_room(), Err(LiveError::Ended { .. })));
    assert!(hub.closed().is_cancelled());
    assert_eq!(
        hub.end_reason().as_deref(),
        Some("the session was cancelled")
    );
    // The hub let go of the viewer's queue: its writer ends.
    while a.rx.try_recv().is_ok() {}
    assert!(a.rx.recv().await.is_none());
    assert!(hub.latest_token().is_none(), "no link for an ended session");
}

#[tokio::test]
async fn nothing_is_relayed_before_the_streamer_exists() {
    let hub = hub(4);
    let a = hub.join_socket().unwrap();
    let err = hub.relay(&a.viewer_id, Signal::KeyFrame).await.unwrap_err();
    assert!(matches!(err, LiveError::NotStreaming(_)), "{err}");
    let err = hub.http_offer(None, "v=0".into(), None).await.unwrap_err();
    assert!(matches!(err, LiveError::NotStreaming(_)), "{err}");
}

#[tokio::test]
async fn agent_events_reach_the_right_viewers() {
    let hub = hub(4);
    let mut a = hub.join_socket().unwrap();
    let mut b = hub.join_socket().unwrap();
    let _ = (drain(&mut a.rx), drain(&mut b.rx));
    let step = hub.on_event(StreamEvent::State {
        state: StreamerState::Running,
        restarts: 0,
        detail: None,
    });
    assert_eq!(step, Some(("streamerRunning", None)));
    let again = hub.on_event(StreamEvent::State {
        state: StreamerState::Running,
        restarts: 0,
        detail: None,
    });
    assert_eq!(again, None, "only changes are steps");
    hub.on_event(StreamEvent::Viewer(ViewerSignal {
        viewer_id: b.viewer_id.clone(),
        signal: Signal::Answer { sdp: "v=0".into() },
    }));
    let to_a = drain(&mut a.rx);
    let to_b = drain(&mut b.rx);
    assert!(to_a
        .iter()
        .any(|m| m["type"] == "streamer" && m["state"] == "running"));
    assert!(to_a.iter().all(|m| m["type"] != "answer"), "{to_a:?}");
    assert!(
        to_b.iter()
            .any(|m| m["type"] == "answer" && m["sdp"] == "v=0"),
        "{to_b:?}"
    );
    // JPEG frames only go to viewers that asked for them.
    hub.lock().viewers[1].jpeg = true;
    hub.on_event(StreamEvent::Jpeg {
        data: "/9j/".into(),
    });
    assert!(a.rx.try_recv().is_err());
    assert!(matches!(b.rx.try_recv(), Ok(Outbound::Frame(f)) if f[..] == [0xff, 0xd8, 0xff]));
}

#[tokio::test]
async fn a_viewer_that_falls_behind_is_dropped_and_control_moves_on() {
    let hub = hub(4);
    let slow = hub.join_socket().unwrap();
    let mut next = hub.join_socket().unwrap();
    for _ in 0..VIEWER_QUEUE + 1 {
        hub.reply(&slow.viewer_id, "{}".into());
    }
    assert_eq!(hub.lock().viewers.len(), 1);
    assert_eq!(*hub.controller.borrow(), Some(next.viewer_id.clone()));
    let to_next = drain(&mut next.rx);
    assert!(to_next
        .iter()
        .any(|m| m["type"] == "control" && m["controlling"] == true));
}

#[tokio::test]
async fn an_http_viewer_collects_its_answer_and_candidates() {
    let hub = hub(4);
    let (answer, rx) = watch::channel(HttpAnswer::default());
    hub.lock().viewers.push(Viewer {
        id: "v-http".into(),
        link: Link::Http {
            answer,
            last_seen: Instant::now(),
            connected: false,
        },
        jpeg: false,
    });
    let signal = |signal| {
        StreamEvent::Viewer(ViewerSignal {
            viewer_id: "v-http".into(),
            signal,
        })
    };
    hub.on_event(signal(Signal::Answer {
        sdp: "v=0\r\nm=video 9 x 96\r\n".into(),
    }));
    assert!(!rx.borrow().settled());
    hub.on_event(signal(Signal::Candidate {
        candidate: "candidate:1 1 UDP 1 127.0.0.1 9 typ host".into(),
        sdp_m_line_index: 0,
    }));
    hub.on_event(signal(Signal::EndOfCandidates));
    assert!(rx.borrow().settled());
    assert_eq!(hub.http_answer("v-http").unwrap().candidates.len(), 1);
    assert!(hub
        .idle_http_viewers(Duration::ZERO)
        .contains(&"v-http".to_string()));
    hub.on_event(signal(Signal::State {
        state: "connected".into(),
    }));
    assert!(
        hub.idle_http_viewers(Duration::ZERO).is_empty(),
        "a connected peer is not idle"
    );
    hub.on_event(signal(Signal::State {
        state: "failed".into(),
    }));
    assert!(matches!(
        hub.http_answer("v-http"),
        Err(LiveError::UnknownViewer(_))
    ));
}
