//! The live view of a session's browser: a person watches and drives the
//! browser VM's screen over WebRTC (or JPEG frames when WebRTC cannot
//! connect). airlockd does not touch media: it hands out viewer links
//! (tokens) and STUN/TURN credentials, starts the streamer in the browser
//! VM, and relays signalling between each viewer and that streamer.
//!
//! [`Live`] holds one [`hub::Hub`] per session; sessions open and close
//! them ([`crate::session`]), and the `/api/webrtc` handlers, the viewer
//! page and the session API look them up here.

pub mod hub;
pub mod limit;
pub mod page;
pub mod sdp;
pub mod socket;
pub mod token;
pub mod turn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_util::task::TaskTracker;

use crate::config::LiveConfig;
use crate::vm::{VmError, VmManager};
use hub::Hub;
use token::{TokenError, ViewerToken};

/// Hubs of ended sessions kept at most (their links show the final state
/// until they expire; sessions forgotten by the session manager go too).
const MAX_ENDED_HUBS: usize = 512;

/// A live-view request failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The viewer token is missing, wrong or expired.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// No such session.
    #[error("no login session with id {0:?}")]
    NotFound(String),
    /// The session has ended.
    #[error("session {id} has ended ({reason}); start a new session to watch a login")]
    Ended {
        /// The session.
        id: String,
        /// How it ended.
        reason: String,
    },
    /// Too many viewers.
    #[error("this session already has {0} viewers; close one of them and try again")]
    Full(usize),
    /// No such viewer in this session.
    #[error("no viewer {0:?} in this session; post a new offer")]
    UnknownViewer(String),
    /// The streamer cannot take signals.
    #[error("{0}")]
    NotStreaming(String),
    /// Only the controlling viewer's input counts.
    #[error("another viewer controls the input; this one only watches")]
    NotControlling,
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The agent failed a relayed request.
    #[error("the browser VM did not take it: {0}")]
    Agent(#[source] VmError),
}

/// A viewer link as the session API shows it.
#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewerLink {
    /// The token.
    pub viewer_token: ViewerToken,
    /// Its expiry (RFC 3339).
    pub viewer_token_expires_at: String,
    /// `<viewer listener>/session/<id>?token=<token>`: the page to open.
    pub viewer_url: String,
}

impl std::fmt::Debug for ViewerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewerLink")
            .field("viewer_token_expires_at", &self.viewer_token_expires_at)
            .finish_non_exhaustive()
    }
}

impl ViewerLink {
    /// The link for `session_id` with an issued token, on the viewers'
    /// listener at `base` (empty: a path only).
    pub fn new(base: &str, session_id: &str, issued: &token::IssuedToken) -> Self {
        Self {
            viewer_url: format!(
                "{base}/session/{session_id}?token={}",
                issued.token.expose()
            ),
            viewer_token: issued.token.clone(),
            viewer_token_expires_at: humantime::format_rfc3339_seconds(issued.expires).to_string(),
        }
    }
}

#[derive(Debug)]
struct Inner {
    viewer_base: Arc<str>,
    cfg: Arc<LiveConfig>,
    vms: VmManager,
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    tracker: TaskTracker,
}

/// The live views of this airlockd's sessions.
#[derive(Debug, Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

impl Live {
    /// The manager; viewer links start with `viewer_base` (the viewers'
    /// listener, e.g. `https://view.example.com`).
    pub fn new(cfg: LiveConfig, vms: VmManager, viewer_base: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                viewer_base: viewer_base.trim_end_matches('/').into(),
                cfg: Arc::new(cfg),
                vms,
                hubs: Mutex::default(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    fn hubs(&self) -> MutexGuard<'_, HashMap<String, Arc<Hub>>> {
        self.inner
            .hubs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The settings.
    pub fn config(&self) -> &LiveConfig {
        &self.inner.cfg
    }

    /// Opens the live view of a new session (its first viewer token is
    /// minted). `lifetime` is how long the session may run: the streamer's
    /// TURN credentials must outlive it.
    pub fn open(
        &self,
        session_id: &str,
        user_id: &str,
        lifetime: Duration,
    ) -> Result<Arc<Hub>, LiveError> {
        let ttl = Duration::from_secs(self.inner.cfg.turn_ttl_secs)
            .max(lifetime + Duration::from_secs(300));
        let hub = Hub::new(
            (session_id, user_id),
            self.inner.viewer_base.clone(),
            self.inner.cfg.clone(),
            self.inner.vms.clone(),
            self.inner.tracker.clone(),
            ttl,
        )?;
        let mut hubs = self.hubs();
        prune(&mut hubs);
        hubs.insert(session_id.into(), hub.clone());
        Ok(hub)
    }

    /// Viewers connected to every session now.
    pub fn viewers(&self) -> usize {
        let hubs: Vec<Arc<Hub>> = self.hubs().values().cloned().collect();
        hubs.iter().map(|h| h.viewers()).sum()
    }

    /// Forgets a session's live view (the session itself is forgotten).
    pub fn forget(&self, session_id: &str) {
        if let Some(hub) = self.hubs().remove(session_id) {
            hub.close("the session was forgotten");
        }
    }

    /// The hub of a session.
    pub fn hub(&self, session_id: &str) -> Result<Arc<Hub>, LiveError> {
        self.hubs()
            .get(session_id)
            .cloned()
            .ok_or_else(|| LiveError::NotFound(session_id.into()))
    }

    /// The hub of a session, if `token` is one of its viewer tokens;
    /// returns the token's expiry too.
    pub fn authorize(
        &self,
        session_id: &str,
        token: Option<&str>,
    ) -> Result<(Arc<Hub>, SystemTime), LiveError> {
        let hub = self.hub(session_id)?;
        let expires = hub.authorize(token)?;
        Ok((hub, expires))
    }

    /// The current viewer link of a running session.
    pub fn link(&self, session_id: &str) -> Option<ViewerLink> {
        let hub = self.hub(session_id).ok()?;
        hub.latest_token().map(|t| hub.link(&t))
    }

    /// Mints a new viewer link for a running session, valid for `ttl`
    /// (at most, and by default, `live.viewer_token_ttl_ms`).
    pub fn mint(&self, session_id: &str, ttl: Option<Duration>) -> Result<ViewerLink, LiveError> {
        let hub = self.hub(session_id)?;
        if let Some(reason) = hub.end_reason() {
            return Err(LiveError::Ended {
                id: session_id.into(),
                reason,
            });
        }
        let max = Duration::from_millis(self.inner.cfg.viewer_token_ttl_ms);
        let issued = hub.issue_token(ttl.unwrap_or(max).min(max))?;
        Ok(hub.link(&issued))
    }

    /// Waits for the hubs' own tasks after every session has ended.
    pub async fn shutdown(&self) {
        let hubs: Vec<Arc<Hub>> = self.hubs().values().cloned().collect();
        for hub in hubs {
            hub.close("airlockd is shutting down");
        }
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

/// Drops hubs of ended sessions whose links have all expired, and (a
/// backstop against a flood of sessions) any ended ones beyond
/// [`MAX_ENDED_HUBS`].
fn prune(hubs: &mut HashMap<String, Arc<Hub>>) {
    let now = SystemTime::now();
    hubs.retain(|_, h| h.end_reason().is_none() || !h.tokens_expired(now));
    let ended: Vec<String> = hubs
        .iter()
        .filter(|(_, h)| h.end_reason().is_some())
        .map(|(id, _)| id.clone())
        .collect();
    for id in ended.iter().skip(MAX_ENDED_HUBS) {
        hubs.remove(id);
    }
}
