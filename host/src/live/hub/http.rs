//! The hub's viewers of the HTTP signalling API (`POST .../offer`, `GET
//! .../answer`): they do not trickle and have no socket, so the streamer's
//! answer and candidates are collected for them, and one whose peer never
//! connected is dropped once it stops asking. Part of [`super::Hub`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_proto::stream::{Codec, Signal};
use tokio::sync::watch;

use super::{HttpAnswer, Hub, Link, Viewer, MAX_HTTP_CANDIDATES};
use crate::live::LiveError;

impl Hub {
    /// An offer from the HTTP signalling API: a new viewer, or a new offer
    /// (ICE restart) of an existing one. Returns the viewer's id and a
    /// receiver of its answer as it arrives.
    pub async fn http_offer(
        &self,
        existing: Option<&str>,
        sdp: String,
        codec: Option<Codec>,
    ) -> Result<(String, watch::Receiver<HttpAnswer>), LiveError> {
        let (id, rx, new) = {
            let mut s = self.lock();
            self.stream_vm(&s)?;
            match existing {
                Some(id) => {
                    let v = s.viewers.iter_mut().find(|v| v.id == id);
                    let Some(Viewer {
                        link:
                            Link::Http {
                                answer, last_seen, ..
                            },
                        ..
                    }) = v
                    else {
                        return Err(LiveError::UnknownViewer(id.into()));
                    };
                    *last_seen = Instant::now();
                    answer.send_replace(HttpAnswer::default());
                    (id.to_string(), answer.subscribe(), false)
                }
                None => {
                    let (answer, rx) = watch::channel(HttpAnswer::default());
                    let link = Link::Http {
                        answer,
                        last_seen: Instant::now(),
                        connected: false,
                    };
                    let id = self.add_viewer(&mut s, link)?;
                    self.update_control(&mut s);
                    (id, rx, true)
                }
            }
        };
        let offered = async {
            self.relay(&id, Signal::Offer { sdp, codec }).await?;
            // Its offer carries every candidate it has.
            self.relay(&id, Signal::EndOfCandidates).await
        };
        if let Err(e) = offered.await {
            if new {
                self.leave(&id).await;
            }
            return Err(e);
        }
        Ok((id, rx))
    }

    /// The answer of an HTTP viewer so far (marks it as still there).
    pub fn http_answer(&self, viewer_id: &str) -> Result<HttpAnswer, LiveError> {
        let mut s = self.lock();
        self.check_open(&s)?;
        match s.viewers.iter_mut().find(|v| v.id == viewer_id) {
            Some(Viewer {
                link: Link::Http {
                    answer, last_seen, ..
                },
                ..
            }) => {
                *last_seen = Instant::now();
                Ok(answer.borrow().clone())
            }
            _ => Err(LiveError::UnknownViewer(viewer_id.into())),
        }
    }

    /// HTTP viewers whose peer never connected and who stopped asking.
    pub(super) fn idle_http_viewers(&self, idle: Duration) -> Vec<String> {
        self.lock()
            .viewers
            .iter()
            .filter(|v| {
                matches!(&v.link, Link::Http { last_seen, connected: false, .. } if last_seen.elapsed() > idle)
            })
            .map(|v| v.id.clone())
            .collect()
    }
}

/// Records one streamer signal in an HTTP viewer's answer.
pub(super) fn fold_signal(a: &mut HttpAnswer, signal: Signal) {
    match signal {
        Signal::Answer { sdp } => a.sdp = Some(sdp),
        Signal::Candidate {
            candidate,
            sdp_m_line_index,
        } if a.candidates.len() < MAX_HTTP_CANDIDATES => {
            a.candidates.push((sdp_m_line_index, candidate));
        }
        Signal::EndOfCandidates => a.complete = true,
        Signal::Error { message } => a.error = Some(message),
        _ => {}
    }
}

/// Drops HTTP viewers whose peer never connected once they stop asking
/// for their answer (they have no socket whose closing would tell).
pub(super) async fn sweep_http_viewers(hub: Arc<Hub>) {
    let idle = Duration::from_millis(hub.cfg.legacy_idle_ms);
    let every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = hub.closed.cancelled() => return,
            _ = tick.tick() => {}
        }
        for id in hub.idle_http_viewers(idle) {
            tracing::info!(session_id = %hub.session_id, viewer_id = %id, "HTTP viewer idle; dropped");
            hub.leave(&id).await;
        }
    }
}
