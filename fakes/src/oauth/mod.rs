//! A fake OAuth 2.0 authorization server with in-memory state: sign-in and
//! consent pages for the authorization-code grant with PKCE, a hosted
//! "copy this code" page, the device authorization grant (RFC 8628) and a
//! token endpoint with RFC 6749 errors. Vendor stand-ins can also drive
//! device grants through their own APIs ([`FakeOAuth::issue_device`],
//! [`FakeOAuth::device_authorization_code`]), and failure tests can make
//! the redirect after consent misbehave ([`FakeOAuth::tamper_state`],
//! [`FakeOAuth::stray_callback`]).
//!
//! Used standalone on `127.0.0.1:0` by tests ([`serve`]) and mounted by
//! airlockd under a path prefix for its "demo" provider
//! ([`FakeOAuth::router`]). Every URL the server generates is derived from
//! [`FakeOAuthConfig::base_url`], never from where it thinks it is mounted.
//! Every token it issues contains [`FakeOAuthConfig::token_marker`] verbatim,
//! so tests can search logs and databases for leaks.

pub mod clients;
mod device;
mod flow;
mod pages;
mod store;
mod token;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use device::{DeviceCodeError, DeviceCodeGrant, IssuedDevice};
use store::Store;
pub(crate) use token::account_id;
pub use token::AccessInfo;

/// The fake server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// `base_url` is not an absolute `http(s)` URL.
    #[error("base_url {0:?} is not an absolute http(s) URL")]
    BaseUrl(String),
    /// The marker would not survive inside a token verbatim.
    #[error("token_marker must be 1-64 characters of [A-Za-z0-9_], got {0:?}")]
    Marker(String),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A user who can sign in.
#[derive(Clone)]
pub struct FakeUser {
    /// Login name; the e-mail address is `{username}@example.com` unless
    /// the name already contains `@`.
    pub username: String,
    /// Password, compared exactly.
    pub password: String,
}

impl std::fmt::Debug for FakeUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeUser")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl FakeUser {
    /// A user with this name and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    /// The e-mail address put in id tokens.
    pub fn email(&self) -> String {
        if self.username.contains('@') {
            self.username.clone()
        } else {
            format!("{}@example.com", self.username)
        }
    }
}

/// Configuration of a [`FakeOAuth`].
#[derive(Debug, Clone)]
pub struct FakeOAuthConfig {
    /// Absolute URL of the mount point, e.g.
    /// `http://127.0.0.1:4000/demo/oauth`; a trailing slash is dropped.
    /// [`serve`] replaces it with `http://{bound address}`.
    pub base_url: String,
    /// Who can sign in. Default: `alice` / `correct horse`.
    pub users: Vec<FakeUser>,
    /// Embedded verbatim in every access, refresh and id token (a canary).
    /// Characters `[A-Za-z0-9_]`, so it survives base64url and JWT
    /// segments. Default: `AIRLOCKCANARY`.
    pub token_marker: String,
    /// How long an authorization code can be redeemed. Default 5 minutes.
    pub code_ttl: Duration,
    /// `expires_in` of access tokens. Default 3600 s.
    pub access_token_ttl: Duration,
    /// How long a device code lives. Default 15 minutes.
    pub device_code_ttl: Duration,
    /// Minimum polling interval of the device grant (whole seconds; RFC
    /// 8628 default 5 s). Polling sooner gets `slow_down` and adds 5 s.
    /// Zero disables the check (tests that must not wait use it).
    pub device_poll_interval: Duration,
}

impl Default for FakeOAuthConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            users: vec![FakeUser::new("alice", "correct horse")],
            token_marker: "AIRLOCKCANARY".to_string(),
            code_ttl: Duration::from_secs(5 * 60),
            access_token_ttl: Duration::from_secs(3600),
            device_code_ttl: Duration::from_secs(15 * 60),
            device_poll_interval: Duration::from_secs(5),
        }
    }
}

/// Something that happened on the server, recorded for test assertions.
/// Never carries token or code values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OAuthEvent {
    /// `/authorize` accepted a request and showed the sign-in page.
    AuthorizeStarted {
        /// Client.
        client_id: String,
    },
    /// `/authorize` refused a request (unknown client, bad redirect, no PKCE…).
    AuthorizeRejected {
        /// Client as sent, possibly empty.
        client_id: String,
        /// Why.
        reason: String,
    },
    /// Correct credentials.
    LoginSucceeded {
        /// Who.
        username: String,
    },
    /// Wrong credentials.
    LoginFailed {
        /// The name that was typed.
        username: String,
    },
    /// The user pressed Allow.
    ConsentAllowed {
        /// Who.
        username: String,
        /// For which client.
        client_id: String,
    },
    /// The user pressed Deny.
    ConsentDenied {
        /// Who.
        username: String,
        /// For which client.
        client_id: String,
    },
    /// An authorization code was issued and the browser redirected.
    CodeIssued {
        /// Client.
        client_id: String,
        /// Where the browser was sent.
        redirect_uri: String,
    },
    /// A code was exchanged for tokens.
    CodeRedeemed {
        /// Client.
        client_id: String,
    },
    /// A code was presented a second time (and its tokens revoked).
    CodeReused {
        /// Client.
        client_id: String,
    },
    /// A code exchange failed for another reason.
    CodeRejected {
        /// Client as sent.
        client_id: String,
        /// Why (`expired`, `pkce_mismatch`, `redirect_uri_mismatch`…).
        reason: String,
    },
    /// A refresh token was used.
    TokenRefreshed {
        /// Client.
        client_id: String,
    },
    /// A refresh failed.
    RefreshRejected {
        /// Why.
        reason: String,
    },
    /// `/device/code` issued a device code.
    DeviceCodeIssued {
        /// Client.
        client_id: String,
        /// The code the user types.
        user_code: String,
    },
    /// The user approved a device.
    DeviceApproved {
        /// Its user code.
        user_code: String,
        /// Who.
        username: String,
    },
    /// The user denied a device.
    DeviceDenied {
        /// Its user code.
        user_code: String,
    },
    /// A device-code poll got an answer other than tokens.
    DevicePolled {
        /// The RFC 8628 error code returned.
        error: String,
    },
    /// A device-code poll got tokens (or, through a vendor's device API,
    /// the authorization code it exchanges for them).
    DeviceTokenIssued {
        /// Client.
        client_id: String,
    },
}

/// Endpoints a vendor stand-in routes at its own paths
/// ([`FakeOAuth::endpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET` the authorization request: the sign-in page.
    Authorize,
    /// `POST` the token endpoint (all grants).
    Token,
    /// `POST` the device authorization endpoint (RFC 8628).
    DeviceCode,
    /// `GET` the hosted page that shows a code to paste.
    HostedCode,
}

/// The fake server's shared state. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct FakeOAuth {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: FakeOAuthConfig,
    store: Mutex<Store>,
    events_seen: watch::Sender<usize>,
}

impl std::fmt::Debug for FakeOAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeOAuth")
            .field("base_url", &self.inner.cfg.base_url)
            .finish_non_exhaustive()
    }
}

impl FakeOAuth {
    /// A server with this configuration and no state yet.
    pub fn new(mut cfg: FakeOAuthConfig) -> Result<Self, OAuthError> {
        let trimmed = cfg.base_url.trim_end_matches('/').to_string();
        let parsed = url::Url::parse(&trimmed).map_err(|_| OAuthError::BaseUrl(trimmed.clone()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(OAuthError::BaseUrl(trimmed));
        }
        cfg.base_url = trimmed;
        let marker_ok = (1..=64).contains(&cfg.token_marker.len())
            && cfg
                .token_marker
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !marker_ok {
            return Err(OAuthError::Marker(cfg.token_marker));
        }
        let (events_seen, _) = watch::channel(0);
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                store: Mutex::new(Store::default()),
                events_seen,
            }),
        })
    }

    /// The routes, relative to the mount point. Nest it where `base_url`
    /// says it lives, e.g. `Router::new().nest("/demo/oauth", fake.router())`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/authorize", get(flow::authorize))
            .route("/authorize/login", post(flow::login))
            .route("/authorize/decision", post(flow::decision))
            .route("/code/callback", get(flow::code_callback))
            .route("/code/success", get(flow::code_success))
            .route("/code/failure", get(flow::code_failure))
            .route("/device", get(flow::device_page))
            .route("/device/code", post(token::device_code))
            .route("/token", post(token::token))
            .with_state(self.clone())
    }

    /// One endpoint of the server, to route at a vendor's own path (the
    /// vendor sandbox): its sign-in forms stay under `base_url`.
    pub fn endpoint(&self, which: Endpoint) -> axum::routing::MethodRouter {
        match which {
            Endpoint::Authorize => get(flow::authorize).with_state(self.clone()),
            Endpoint::Token => post(token::token).with_state(self.clone()),
            Endpoint::DeviceCode => post(token::device_code).with_state(self.clone()),
            Endpoint::HostedCode => get(flow::code_callback).with_state(self.clone()),
        }
    }

    /// The configuration in use (with `base_url` normalised).
    pub fn config(&self) -> &FakeOAuthConfig {
        &self.inner.cfg
    }

    /// Absolute URL of the mount point, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.inner.cfg.base_url
    }

    /// Refuses every authorization-code exchange from now on (`on`), as a
    /// vendor refuses a code it revoked: the failed-exchange tests.
    pub fn refuse_code_exchanges(&self, on: bool) {
        self.store().refuse_codes = on;
    }

    /// From now on (`on`), the redirect back to the client after consent
    /// carries another `state` than the client sent (its own with
    /// `-tampered` appended), so the client sees a state mismatch.
    pub fn tamper_state(&self, on: bool) {
        self.store().tamper_state = on;
    }

    /// From now on (`on`), consent sends the browser to `/favicon.ico` on
    /// the redirect URI's origin, without a query, instead of to the
    /// redirect URI: a stray request to the client's callback server. The
    /// code is still issued (and never delivered).
    pub fn stray_callback(&self, on: bool) {
        self.store().stray_callback = on;
    }

    /// Everything that happened so far, oldest first.
    pub fn events(&self) -> Vec<OAuthEvent> {
        self.store().events.clone()
    }

    /// Waits until an event matching `pred` has been recorded (including
    /// one recorded before the call) and returns it, or `None` after
    /// `timeout`.
    pub async fn wait_for_event(
        &self,
        pred: impl Fn(&OAuthEvent) -> bool,
        timeout: Duration,
    ) -> Option<OAuthEvent> {
        let mut seen = self.inner.events_seen.subscribe();
        let search = async {
            loop {
                if let Some(found) = self.events().into_iter().find(|e| pred(e)) {
                    return Some(found);
                }
                if seen.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, search).await.ok().flatten()
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, store: &mut Store, event: OAuthEvent) {
        tracing::debug!(?event, "fake oauth event");
        store.events.push(event);
        let count = store.events.len();
        self.inner.events_seen.send_replace(count);
    }
}

/// A [`FakeOAuth`] being served on a socket. Dropping it stops the server
/// (gracefully, in the background); [`RunningServer::shutdown`] also waits.
pub struct RunningServer {
    addr: SocketAddr,
    base_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}`, the base URL the server generates links from.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds `addr` (use `127.0.0.1:0` for a free port), sets `cfg.base_url`
/// to `http://{bound address}`, and serves [`FakeOAuth::router`] at `/`
/// until the returned [`RunningServer`] is dropped or shut down.
pub async fn serve(
    mut cfg: FakeOAuthConfig,
    addr: SocketAddr,
) -> Result<(FakeOAuth, RunningServer), OAuthError> {
    let bind_err = |source| OAuthError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    cfg.base_url = format!("http://{local}");
    let fake = FakeOAuth::new(cfg)?;
    let app = fake.router();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%local, "fake OAuth server listening");
    let running = RunningServer {
        addr: local,
        base_url: fake.base_url().to_string(),
        stop: Some(stop),
        task: Some(task),
    };
    Ok((fake, running))
}
