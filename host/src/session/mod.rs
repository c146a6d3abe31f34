//! Login sessions: a person asks to connect a CLI provider; airlockd boots
//! a browser VM, runs the provider's login in it, lets the person act on
//! its screen (live over WebRTC, or through input and screenshots), captures
//! the credential, stores it encrypted and delivers it into the person's
//! CLI VM. This module holds the sessions and their public view; each
//! session's life runs in [`run`], delivery in [`delivery`]. Used by the
//! `/api/auth` handlers.

mod delivery;
mod history;
mod merge;
mod persist;
mod resume;
mod run;

pub use history::Step;
pub use run::browser_spec;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use airlock_proto::{InputBatch, LoginFlow, Operation, Reply, Screenshot};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AuthConfig;
use crate::live::hub::Hub;
use crate::live::{Live, LiveError};
use crate::providers::{LoginDefaults, Providers};
use crate::store::CredentialStore;
use crate::vm::{VmError, VmManager};

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Accepted; nothing started yet.
    Created,
    /// The browser VM is booting.
    Booting,
    /// Chromium runs; the CLI's login is starting.
    BrowserReady,
    /// The vendor's page is on screen; waiting for the person.
    AwaitingUser,
    /// The credential reached the host.
    Captured,
    /// It is stored encrypted.
    Stored,
    /// It is in the user's CLI VM and verified there.
    Delivered,
    /// Done.
    Completed,
    /// It failed; `error` says why.
    Failed,
    /// Cancelled on request.
    Cancelled,
    /// Nobody finished the login in time.
    Expired,
}

impl SessionState {
    /// True while the session's login runs (it has, or is about to have,
    /// a browser VM): what counts against `auth.max_sessions`. A stored
    /// credential waiting for its delivery holds no browser VM.
    pub fn is_login(self) -> bool {
        matches!(
            self,
            Self::Created
                | Self::Booting
                | Self::BrowserReady
                | Self::AwaitingUser
                | Self::Captured
        )
    }

    /// True once the session can change no more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Expired
        )
    }
}

/// A provider as `GET /api/auth/providers` lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSummary {
    /// The name `POST /api/auth/start` takes.
    pub name: String,
    /// Shown to people ("OpenAI Codex CLI").
    pub display_name: String,
    /// `loopback`, `pasteCode` or `deviceCode`.
    pub flow: &'static str,
}

/// A session as the API shows it (and as it is saved, see [`persist`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    /// Its id.
    pub session_id: String,
    /// Whose session it is.
    pub user_id: String,
    /// The provider being connected.
    pub provider: String,
    /// Where it is.
    pub state: SessionState,
    /// Why it failed, expired or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
    /// When it expires if nobody finishes the login (RFC 3339).
    pub expires_at: String,
    /// The browser VM while it exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub browser_vm_id: Option<String>,
    /// The CLI VM the credential went to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cli_vm_id: Option<String>,
    /// The stored credential record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// A device-code flow's one-time code, for the person to type into the
    /// vendor's page (the viewer shows it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
    /// What happened, in order: the first steps and the latest, at most
    /// 128, a step repeated at once counted in its `repeated`.
    pub steps: Vec<Step>,
    /// Steps dropped from between the first and the latest.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub steps_omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No such session.
    #[error("no login session with id {0:?}")]
    NotFound(String),
    /// No such provider.
    #[error("unknown provider {name:?}; available: {available}")]
    UnknownProvider {
        /// What was asked for.
        name: String,
        /// What exists.
        available: String,
    },
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Too many sessions run.
    #[error("at most {0} logins may run at once; try again shortly")]
    Capacity(usize),
    /// The session's browser is not (or no longer) there.
    #[error("session {id} is {state:?}: its browser is not running")]
    NoBrowser {
        /// The session.
        id: String,
        /// Its state.
        state: SessionState,
    },
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The live view could not be set up.
    #[error(transparent)]
    Live(#[from] LiveError),
}

/// One session as the manager tracks it.
#[derive(Debug)]
struct SessionHandle {
    view: watch::Sender<SessionView>,
    /// When it was asked for (its stages are timed from here).
    started: std::time::Instant,
    cancel: CancellationToken,
    /// The live view: viewers, tokens, the streamer's signalling.
    hub: Arc<Hub>,
    /// Its own delivery is over without a ready CLI VM: whoever brings
    /// its credential into one completes it ([`delivery`]).
    delivery_pending: std::sync::atomic::AtomicBool,
}

impl SessionHandle {
    fn view(&self) -> SessionView {
        self.view.borrow().clone()
    }
}

pub(crate) struct Inner {
    vms: VmManager,
    store: CredentialStore,
    providers: Providers,
    cfg: AuthConfig,
    live: Live,
    defaults: LoginDefaults,
    sessions: Mutex<BTreeMap<String, Arc<SessionHandle>>>,
    ended: Mutex<VecDeque<String>>,
    /// Credential ids being delivered right now.
    delivering: delivery::Deliveries,
    /// Held while finding or creating a user's CLI VM, so two sessions of
    /// one user never create two.
    cli_vm_lock: Mutex<()>,
    /// Sessions changed since they were last saved.
    dirty: persist::Dirty,
    tracker: TaskTracker,
    /// The task saving sessions, which outlives the sessions' tasks.
    writer: TaskTracker,
    writer_stop: CancellationToken,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("providers", &self.providers.names())
            .finish()
    }
}

/// The login sessions of this airlockd.
#[derive(Debug, Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Sessions {
    /// A manager; `shutdown` cancels every session. Starts the task that
    /// delivers stored credentials to CLI VMs as they come up.
    pub fn new(
        vms: VmManager,
        store: CredentialStore,
        providers: Providers,
        cfg: AuthConfig,
        live: Live,
        shutdown: CancellationToken,
    ) -> Self {
        let defaults = LoginDefaults {
            path_append: cfg.login_path_append.clone(),
            env: cfg.login_env.clone(),
            url_timeout_ms: cfg.url_timeout_ms,
            confirm_timeout_ms: cfg.confirm_timeout_ms,
        };
        let inner = Arc::new(Inner {
            vms,
            store,
            providers,
            cfg,
            live,
            defaults,
            sessions: Mutex::default(),
            ended: Mutex::default(),
            delivering: delivery::Deliveries::default(),
            cli_vm_lock: Mutex::default(),
            dirty: persist::Dirty::default(),
            tracker: TaskTracker::new(),
            writer: TaskTracker::new(),
            writer_stop: CancellationToken::new(),
            shutdown,
        });
        inner.tracker.spawn(delivery::watch_cli_vms(inner.clone()));
        inner
            .writer
            .spawn(persist::writer(inner.clone(), inner.writer_stop.clone()));
        Self { inner }
    }

    /// Takes over what an earlier airlockd left: its VMs (found by
    /// [`crate::vm::adopt::scan`]) and its sessions, each carried on or
    /// ended with the reason.
    pub async fn resume(&self, found: Vec<crate::vm::adopt::Found>) {
        resume::resume(&self.inner, found).await;
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<SessionHandle>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn handle(&self, id: &str) -> Result<Arc<SessionHandle>, SessionError> {
        self.sessions()
            .get(id)
            .cloned()
            .ok_or_else(|| SessionError::NotFound(id.into()))
    }

    /// Provider names offered.
    pub fn providers(&self) -> Vec<ProviderSummary> {
        let all = &self.inner.providers;
        all.names()
            .into_iter()
            .filter_map(|name| {
                let p = all.get(name)?;
                Some(ProviderSummary {
                    name: name.to_string(),
                    display_name: p.display_name.clone(),
                    flow: match p.flow {
                        LoginFlow::Loopback => "loopback",
                        LoginFlow::PasteCode { .. } => "pasteCode",
                        LoginFlow::DeviceCode => "deviceCode",
                    },
                })
            })
            .collect()
    }

    /// Starts a session for `user_id` and `provider`.
    pub fn start(&self, user_id: &str, provider: &str) -> Result<SessionView, SessionError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(SessionError::Vm(VmError::ShuttingDown));
        }
        if user_id.is_empty() || user_id.len() > 128 || user_id.chars().any(char::is_control) {
            return Err(SessionError::Invalid(
                "userId must be 1 to 128 printable characters".into(),
            ));
        }
        let profile = self.inner.providers.get(provider).cloned().ok_or_else(|| {
            SessionError::UnknownProvider {
                name: provider.into(),
                available: self.inner.providers.names().join(", "),
            }
        })?;
        let id = format!("ses-{}", uuid::Uuid::new_v4().simple());
        let created = SystemTime::now();
        let expires = created + Duration::from_millis(self.inner.cfg.user_timeout_ms);
        let view = SessionView {
            session_id: id.clone(),
            user_id: user_id.into(),
            provider: provider.into(),
            state: SessionState::Created,
            error: None,
            created_at: now(),
            updated_at: now(),
            expires_at: humantime::format_rfc3339_millis(expires).to_string(),
            browser_vm_id: None,
            cli_vm_id: None,
            credential_id: None,
            user_code: None,
            steps: vec![Step {
                at: now(),
                state: SessionState::Created,
                event: "state".into(),
                detail: None,
                repeated: 0,
            }],
            steps_omitted: 0,
        };
        let handle = {
            let mut sessions = self.sessions();
            let active = sessions
                .values()
                .filter(|h| h.view.borrow().state.is_login())
                .count();
            if active >= self.inner.cfg.max_sessions {
                return Err(SessionError::Capacity(self.inner.cfg.max_sessions));
            }
            let lifetime = Duration::from_millis(self.inner.cfg.user_timeout_ms);
            let handle = Arc::new(SessionHandle {
                view: watch::channel(view.clone()).0,
                started: std::time::Instant::now(),
                cancel: self.inner.shutdown.child_token(),
                hub: self.inner.live.open(&id, user_id, lifetime)?,
                delivery_pending: Default::default(),
            });
            sessions.insert(id.clone(), handle.clone());
            handle
        };
        self.inner.dirty.mark(&id);
        tracing::info!(session_id = %id, user_id, provider, "login session starting");
        self.inner
            .tracker
            .spawn(run::run(self.inner.clone(), handle, profile));
        Ok(view)
    }

    /// Marks a session changed outside its own task (a viewer link minted),
    /// to be saved with the next batch.
    pub fn touch(&self, id: &str) {
        self.inner.dirty.mark(id);
    }

    /// The state of every session remembered (running and ended).
    pub fn states(&self) -> Vec<SessionState> {
        self.sessions()
            .values()
            .map(|h| h.view.borrow().state)
            .collect()
    }

    /// A session's view.
    pub fn get(&self, id: &str) -> Result<SessionView, SessionError> {
        Ok(self.handle(id)?.view())
    }

    /// A receiver of the session's view, current value first.
    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<SessionView>, SessionError> {
        Ok(self.handle(id)?.view.subscribe())
    }

    /// Cancels a session and waits until it has ended.
    pub async fn cancel(&self, id: &str) -> Result<SessionView, SessionError> {
        let handle = self.handle(id)?;
        handle.cancel.cancel();
        let mut rx = handle.view.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(60),
            rx.wait_for(|v| v.state.is_final() || v.state == SessionState::Stored),
        )
        .await;
        Ok(handle.view())
    }

    fn browser_vm(&self, id: &str) -> Result<String, SessionError> {
        let view = self.handle(id)?.view();
        match (&view.browser_vm_id, view.state) {
            (Some(vm), SessionState::BrowserReady | SessionState::AwaitingUser) => Ok(vm.clone()),
            _ => Err(SessionError::NoBrowser {
                id: id.into(),
                state: view.state,
            }),
        }
    }

    /// Injects input into the session's browser screen.
    pub async fn input(&self, id: &str, batch: InputBatch) -> Result<usize, SessionError> {
        batch
            .validate()
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        let vm = self.browser_vm(id)?;
        let n = batch.events.len();
        self.inner
            .vms
            .call(&vm, Operation::Input(batch), Duration::from_secs(15))
            .await?;
        Ok(n)
    }

    /// A PNG of the session's browser screen.
    pub async fn screenshot(&self, id: &str) -> Result<Screenshot, SessionError> {
        let vm = self.browser_vm(id)?;
        match self
            .inner
            .vms
            .call(&vm, Operation::Screenshot, Duration::from_secs(15))
            .await?
        {
            Reply::Screenshot(s) => Ok(s),
            _ => Err(SessionError::Invalid(
                "the agent answered with the wrong kind of reply".into(),
            )),
        }
    }

    /// Cancels every session and waits for them (and pending deliveries),
    /// then for the last saves and the live views' tasks. With
    /// `vm.keep_on_exit` a session in progress is not cancelled but left
    /// as it is, for the next airlockd to carry on.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        self.inner.writer_stop.cancel();
        self.inner.writer.close();
        self.inner.writer.wait().await;
        self.inner.live.shutdown().await;
    }
}

impl Inner {
    /// True when airlockd is exiting and leaves sessions in progress (and
    /// their VMs) to the next airlockd.
    fn detaching(&self) -> bool {
        self.shutdown.is_cancelled() && self.vms.config().vm.keep_on_exit
    }

    /// Records an event in a session: a state change when `state` is set.
    fn record(
        &self,
        h: &SessionHandle,
        state: Option<SessionState>,
        event: &str,
        detail: Option<String>,
    ) {
        if let Some(stage) = state.and_then(|s| timed_stage(h.view.borrow().state, s)) {
            crate::metrics::global().login_stage[stage].observe(h.started.elapsed());
        }
        h.view.send_modify(|v| {
            if let Some(s) = state {
                v.state = s;
            }
            v.updated_at = now();
            let step = Step {
                at: now(),
                state: v.state,
                event: event.into(),
                detail,
                repeated: 0,
            };
            history::push(&mut v.steps, &mut v.steps_omitted, step);
        });
        self.dirty.mark(&h.view.borrow().session_id);
    }

    /// Remembers that a session ended, forgetting the oldest ended ones
    /// beyond the configured number.
    fn ended(&self, id: &str) {
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        ended.push_back(id.into());
        while ended.len() > self.cfg.ended_sessions_keep {
            if let Some(old) = ended.pop_front() {
                self.sessions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&old);
                self.live.forget(&old);
            }
        }
    }

    /// The session waiting for delivery of `credential_id`, if any.
    fn session_of_credential(&self, credential_id: &str) -> Option<Arc<SessionHandle>> {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|h| h.view.borrow().credential_id.as_deref() == Some(credential_id))
            .cloned()
    }
}

/// The index in [`crate::metrics::STAGES`] of a login stage reached by
/// going from `from` to `to` (the first time only).
fn timed_stage(from: SessionState, to: SessionState) -> Option<usize> {
    match (from, to) {
        (SessionState::BrowserReady, SessionState::BrowserReady) => None,
        (_, SessionState::BrowserReady) => Some(0),
        (SessionState::AwaitingUser, SessionState::AwaitingUser) => None,
        (_, SessionState::AwaitingUser) => Some(1),
        _ => None,
    }
}
