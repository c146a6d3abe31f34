//! The vendor sandbox: stand-ins for the servers the real vendor CLIs
//! (Codex, Claude Code, Gemini CLI) and their login pages call, answering
//! at the vendors' real host names over TLS from a throwaway CA ([`ca`]).
//! One listener on loopback serves every host; requests are dispatched by
//! their `Host` header to that vendor's routes ([`openai`], [`anthropic`],
//! [`google`]). The OAuth side of each vendor is a [`FakeOAuth`] with the
//! vendor's real client registered, so the stand-ins refuse what the real
//! servers refuse (bad PKCE, reused codes, wrong redirect URI or client).
//!
//! Browser VMs reach it through airlockd's egress gateway, whose
//! `[egress.routes]` send each `host:443` here ([`VendorSandbox::egress_routes`]).
//! Used by the end-to-end tests in `tests/` that run the real CLIs.

pub mod anthropic;
pub mod ca;
pub mod google;
pub mod openai;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::oauth::{FakeOAuth, FakeOAuthConfig, FakeUser, OAuthError, OAuthEvent};
pub use ca::{CaError, TestCa};

/// The sandbox could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The certificates.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A vendor's OAuth server.
    #[error(transparent)]
    OAuth(#[from] OAuthError),
    /// The listening socket.
    #[error("cannot listen on 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
}

/// How the sandbox behaves.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Who can sign in at every vendor.
    pub users: Vec<FakeUser>,
    /// Embedded verbatim in every token (a canary for leak scans).
    pub token_marker: String,
    /// `expires_in` of access tokens.
    pub access_token_ttl: Duration,
    /// Minimum device-code polling interval (zero: no check).
    pub device_poll_interval: Duration,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        let base = FakeOAuthConfig::default();
        Self {
            users: base.users,
            token_marker: base.token_marker,
            access_token_ttl: base.access_token_ttl,
            device_poll_interval: base.device_poll_interval,
        }
    }
}

impl SandboxConfig {
    /// The [`FakeOAuthConfig`] of one vendor, whose pages live under `base_url`.
    fn oauth(&self, base_url: &str) -> FakeOAuthConfig {
        FakeOAuthConfig {
            base_url: base_url.to_string(),
            users: self.users.clone(),
            token_marker: self.token_marker.clone(),
            access_token_ttl: self.access_token_ttl,
            device_poll_interval: self.device_poll_interval,
            ..FakeOAuthConfig::default()
        }
    }
}

/// One request the sandbox saw (no bodies, no query: they carry secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// The `Host` it named, without a port.
    pub host: String,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// The status it got.
    pub status: u16,
}

/// The most requests kept for [`VendorSandbox::requests`].
const MAX_SEEN: usize = 4096;

/// The running sandbox. Dropping it stops the server.
pub struct VendorSandbox {
    addr: SocketAddr,
    ca: TestCa,
    /// OpenAI (Codex).
    pub openai: FakeOAuth,
    /// Anthropic (Claude Code).
    pub anthropic: FakeOAuth,
    /// Google (Gemini CLI).
    pub google: FakeOAuth,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VendorSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VendorSandbox")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A vendor's routes, by host name.
type Hosts = HashMap<&'static str, Router>;

#[derive(Clone)]
struct Dispatch {
    hosts: Arc<Hosts>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

impl VendorSandbox {
    /// Starts every vendor's stand-in on `127.0.0.1:0`.
    pub async fn start(cfg: SandboxConfig) -> Result<Self, SandboxError> {
        let openai = FakeOAuth::new(cfg.oauth(openai::OAUTH_BASE))?;
        let anthropic = FakeOAuth::new(cfg.oauth(anthropic::OAUTH_BASE))?;
        let google = FakeOAuth::new(cfg.oauth(google::OAUTH_BASE))?;
        let mut hosts = Hosts::new();
        hosts.extend(openai::routes(&openai));
        hosts.extend(anthropic::routes(&anthropic));
        hosts.extend(google::routes(&google));
        let names: Vec<String> = hosts.keys().map(|h| h.to_string()).collect();
        let ca = TestCa::new(&names)?;
        let acceptor = TlsAcceptor::from(ca.server_config()?);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(SandboxError::Bind)?;
        let addr = listener.local_addr().map_err(SandboxError::Bind)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().fallback(dispatch).with_state(Dispatch {
            hosts: Arc::new(hosts),
            seen: seen.clone(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let tls = TlsListener::start(listener, acceptor, addr);
            let served = axum::serve(tls, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = served.await {
                tracing::warn!(error = %e, "vendor sandbox stopped");
            }
        });
        tracing::info!(%addr, "vendor sandbox listening");
        Ok(Self {
            addr,
            ca,
            openai,
            anthropic,
            google,
            seen,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA test configurations trust, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.ca_pem()
    }

    /// `"host:443" = "127.0.0.1:port"` for every host it answers: what
    /// airlockd's `[egress.routes]` needs.
    pub fn egress_routes(&self) -> BTreeMap<String, String> {
        let mut hosts: Vec<&str> = openai::HOSTS
            .iter()
            .chain(anthropic::HOSTS)
            .chain(google::HOSTS)
            .copied()
            .collect();
        hosts.sort_unstable();
        hosts
            .into_iter()
            .map(|h| (format!("{h}:443"), self.addr.to_string()))
            .collect()
    }

    /// Every request so far, oldest first (at most the first 4096).
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Refresh-token grants every vendor answered or refused so far.
    pub fn refreshes(&self) -> usize {
        [&self.openai, &self.anthropic, &self.google]
            .iter()
            .flat_map(|v| v.events())
            .filter(|e| {
                matches!(
                    e,
                    OAuthEvent::TokenRefreshed { .. } | OAuthEvent::RefreshRejected { .. }
                )
            })
            .count()
    }

    /// Stops accepting and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for VendorSandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Sends a request to its host's routes; a host the sandbox does not
/// stand in for gets 421, as a server that is not authoritative answers.
async fn dispatch(State(d): State<Dispatch>, req: Request) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name))
        .unwrap_or_default()
        .to_ascii_lowercase();
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let response = match d.hosts.get(host.as_str()) {
        Some(router) => match router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        None => (
            StatusCode::MISDIRECTED_REQUEST,
            format!("the vendor sandbox does not answer for {host:?}"),
        )
            .into_response(),
    };
    let status = response.status().as_u16();
    if status == 404 || status >= 500 {
        tracing::warn!(%host, %method, %path, status, "vendor sandbox: unanswered request");
    }
    let mut seen = d.seen.lock().unwrap_or_else(PoisonError::into_inner);
    if seen.len() < MAX_SEEN {
        seen.push(SeenRequest {
            host,
            method,
            path,
            status,
        });
    }
    response
}

/// A JSON answer.
pub(crate) fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// An HTML page.
pub(crate) fn html(body: String) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .body(Body::from(body))
        .unwrap_or_default()
}

/// The bearer token of a request, if any.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// TLS connections, handshaken in their own tasks so that one slow client
/// does not hold up the others.
struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    fn start(listener: TcpListener, acceptor: TlsAcceptor, addr: SocketAddr) -> Self {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        // Out of descriptors, say: back off, do not spin.
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                    match handshake.await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "vendor sandbox: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!("vendor sandbox: TLS handshake timed out"),
                    }
                });
            }
        });
        Self { rx, addr }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The acceptor only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
