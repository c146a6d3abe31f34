//! The agent's state shared by its connections: identity for the hello,
//! the reaper, the browser role and its logins, forwarded logs and events,
//! and the operations it performs. Built by [`crate::run`], used by
//! [`crate::channel`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use airlock_proto::egress::EgressClient;
use airlock_proto::restore::{ClockReading, ClockStep, RefreshSpec};
use airlock_proto::{
    capability, AgentMode, ErrorCode, ErrorReply, Event, GuestConfig, GuestMessage, Hello,
    LogLevel, Operation, Reply, StatusReport, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::browser::trust::POLICY_DIR;
use crate::browser::BrowserRole;
use crate::egress::{Dialer, ProxyPorts};
use crate::logging::{parse_level, LogReceiver};
use crate::login::{LoginCtx, Logins};
use crate::options::Transport;
use crate::process::Reaper;
use crate::streamer::Streamer;
use crate::sysinfo;
use crate::users::{RunAs, BROWSER_USER, LOGIN_USER};

/// Shared state of the running agent.
#[derive(Debug)]
pub struct Agent {
    mode: AgentMode,
    /// Runtime files ([`state_dir`]).
    state_dir: PathBuf,
    build_id: String,
    boot_id: String,
    started_uptime_ms: u64,
    reaper: Reaper,
    browser: Arc<BrowserRole>,
    streamer: Streamer,
    logins: Logins,
    /// Handed to each connection's log forwarder and taken back after.
    logs: Mutex<Option<LogReceiver>>,
    /// Events for the host (process exits, logins, credentials, browser
    /// state); handed to each connection like the logs.
    events: Mutex<Option<mpsc::Receiver<Event>>>,
    unsent: Mutex<VecDeque<Event>>,
    /// Captured credentials the host has not acknowledged yet.
    pub handoff: Arc<crate::handoff::Handoff>,
    dropped_logs: Arc<AtomicU64>,
    forward_level: AtomicU8,
    /// How the agent reaches the host (the egress gateway sits beside it).
    transport: Transport,
    /// The egress proxies, once the host enabled them.
    proxies: Arc<OnceLock<ProxyPorts>>,
    /// The proxies' tasks (stopped with the agent's shutdown token).
    egress_tasks: TaskTracker,
    /// Set by the host before it snapshots this VM, cleared by the refresh
    /// of a restored copy: the connection beats and dials again at a quick
    /// pace (a write is how the agent notices its vsock device went away).
    pub expect_restore: tokio::sync::watch::Sender<bool>,
    /// Cancelled when the agent should stop (shutdown request or signal).
    pub shutdown: CancellationToken,
}

/// Where the agent keeps runtime files (Chromium's profile, login homes):
/// tmpfs in a VM; `/dev/shm` (tmpfs too) as a host process; its private
/// `/tmp` (a tmpfs that goes with its mount namespace, even if the agent
/// is killed) when isolated.
pub fn state_dir(mode: AgentMode, isolated: bool) -> PathBuf {
    match mode {
        AgentMode::Pid1 | AgentMode::Service => PathBuf::from("/run/airlock/agent"),
        AgentMode::Process if isolated => PathBuf::from("/tmp/airlock-agent"),
        // Chosen by airlockd's process backend, which removes it should
        // the agent be killed before it can.
        AgentMode::Process => match std::env::var_os(airlock_proto::AGENT_STATE_DIR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None if Path::new("/dev/shm").is_dir() => {
                PathBuf::from(format!("/dev/shm/airlock-agent-{}", std::process::id()))
            }
            None => std::env::temp_dir().join(format!("airlock-agent-{}", std::process::id())),
        },
    }
}

/// What [`Agent::new`] needs.
#[derive(Debug)]
pub struct AgentParts {
    /// How the agent runs.
    pub mode: AgentMode,
    /// A host process in its own namespaces ([`crate::sandbox`]).
    pub isolated: bool,
    /// Kernel uptime when `main` began.
    pub started_uptime_ms: u64,
    /// The reaper.
    pub reaper: Reaper,
    /// Forwarded log lines.
    pub logs: LogReceiver,
    /// Sender and receiver of events for the host.
    pub events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
    /// The agent's shutdown token.
    pub shutdown: CancellationToken,
    /// How it reaches the host.
    pub transport: Transport,
}

impl Agent {
    /// Assembles the agent.
    pub fn new(p: AgentParts) -> Self {
        let state = state_dir(p.mode, p.isolated);
        // In an image, untrusted programs run as their own accounts; as a
        // host process everything runs as the agent (airlockd chose it).
        let in_image = p.mode != AgentMode::Process;
        let user = |name| in_image.then(|| RunAs::lookup(name)).flatten();
        // Chromium's policy directory is the agent's own in an image and
        // in an isolated host process (its /etc is an overlay), never the
        // host's.
        let policy_dir = (in_image || p.isolated).then(|| PathBuf::from(POLICY_DIR));
        let browser = Arc::new(BrowserRole::new(
            p.reaper.clone(),
            p.events.0.clone(),
            state.clone(),
            user(BROWSER_USER),
            policy_dir,
        ));
        let streamer = Streamer::new(p.reaper.clone(), p.events.0.clone(), browser.clone());
        let proxies = Arc::new(OnceLock::new());
        let handoff = Arc::new(crate::handoff::Handoff::default());
        let logins = Logins::new(LoginCtx {
            reaper: p.reaper.clone(),
            browser: browser.clone(),
            events: p.events.0,
            handoff: handoff.clone(),
            state_dir: state.clone(),
            run_as: user(LOGIN_USER),
            proxies: proxies.clone(),
        });
        Self {
            mode: p.mode,
            state_dir: state,
            build_id: sysinfo::own_build_id(),
            boot_id: sysinfo::boot_id(),
            started_uptime_ms: p.started_uptime_ms,
            reaper: p.reaper,
            browser,
            streamer,
            logins,
            dropped_logs: p.logs.dropped.clone(),
            logs: Mutex::new(Some(p.logs)),
            events: Mutex::new(Some(p.events.1)),
            unsent: Mutex::default(),
            handoff,
            forward_level: AtomicU8::new(LogLevel::Info as u8),
            transport: p.transport,
            proxies,
            egress_tasks: TaskTracker::new(),
            expect_restore: tokio::sync::watch::Sender::new(false),
            shutdown: p.shutdown,
        }
    }

    /// Starts the egress proxies the first time the host names its
    /// gateway (later connections' welcomes name the same one).
    pub async fn start_egress(&self, config: &GuestConfig) {
        let Some(port) = config.egress_port else {
            return;
        };
        if self.proxies.get().is_some() {
            return;
        }
        let Some(dialer) = Dialer::beside(&self.transport, port) else {
            tracing::warn!(?self.transport, "cannot tell where the egress gateway is");
            return;
        };
        match crate::egress::start(dialer, &self.egress_tasks, self.shutdown.clone()).await {
            Ok(ports) => {
                let _ = self.proxies.set(ports);
            }
            Err(e) => tracing::warn!(error = %e, "cannot start the egress proxies"),
        }
    }

    /// Points an operation's programs at the egress proxies (when the VM
    /// has them): Chromium, commands, the streamer (TURN over TCP only).
    fn route(&self, op: Operation) -> Operation {
        let Some(p) = self.proxies.get() else {
            return op;
        };
        match op {
            Operation::StartBrowser(mut spec) => {
                spec.proxy = Some(p.url(EgressClient::Browser));
                Operation::StartBrowser(spec)
            }
            Operation::Exec(mut req) => {
                let mut env: Vec<String> = p
                    .env(EgressClient::Exec)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                env.append(&mut req.env);
                req.env = env;
                Operation::Exec(req)
            }
            Operation::StreamStart(mut spec) => {
                spec.http_proxy = Some(p.url(EgressClient::Streamer));
                spec.ice_addresses = vec!["127.0.0.1".into()];
                for server in &mut spec.ice_servers {
                    server
                        .urls
                        .retain(|u| u.starts_with("turn") && u.contains("transport=tcp"));
                }
                spec.ice_servers.retain(|s| !s.urls.is_empty());
                Operation::StreamStart(spec)
            }
            other => other,
        }
    }

    /// How the agent runs.
    pub fn mode(&self) -> AgentMode {
        self.mode
    }

    /// The hello for connection number `seq`.
    pub fn hello(&self, seq: u32) -> Hello {
        let caps = [
            capability::EXEC,
            capability::FILES,
            capability::STATUS,
            capability::SHUTDOWN,
            capability::LOGS,
            capability::BROWSER,
            capability::STREAM,
            capability::SNAPSHOT,
        ];
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            build_id: self.build_id.clone(),
            boot_id: self.boot_id.clone(),
            mode: self.mode,
            uptime_at_start_ms: self.started_uptime_ms,
            uptime_at_hello_ms: sysinfo::uptime_ms(),
            connection_seq: seq,
            capabilities: caps.map(String::from).to_vec(),
        }
    }

    /// Applies the host's per-VM config.
    pub fn apply(&self, config: &GuestConfig) {
        self.forward_level
            .store(parse_level(&config.log_level) as u8, Ordering::Relaxed);
        if let (AgentMode::Pid1, Some(name)) = (self.mode, &config.hostname) {
            crate::init::set_hostname(name);
        }
    }

    /// Performs one operation.
    pub async fn perform(
        &self,
        op: Operation,
        cancel: &CancellationToken,
    ) -> Result<Reply, ErrorReply> {
        match self.route(op) {
            Operation::Exec(req) => self.reaper.exec(&req, cancel).await.map(Reply::Exec),
            Operation::WriteFile(req) => blocking(move || crate::files::write_file(&req))
                .await
                .map(Reply::FileWritten),
            Operation::ReadFile(req) => blocking(move || crate::files::read_file(&req))
                .await
                .map(Reply::File),
            Operation::Status => Ok(Reply::Status(self.status())),
            Operation::Shutdown => {
                tracing::info!("shutdown requested by the host");
                Ok(Reply::ShuttingDown)
            }
            Operation::StartBrowser(spec) => {
                self.browser.start(spec).await.map(Reply::BrowserStarted)
            }
            Operation::StopBrowser => {
                // The streamer captures the display: it goes first.
                self.streamer.stop().await;
                self.browser.stop().await;
                Ok(Reply::Done)
            }
            Operation::StartLogin(spec) => self.logins.start(spec).map(|()| Reply::LoginStarted),
            Operation::CancelLogin { session_id } => match self.logins.cancel(&session_id) {
                true => Ok(Reply::Done),
                false => Err(ErrorReply::new(
                    ErrorCode::NotFound,
                    format!("no login {session_id} is running"),
                )),
            },
            Operation::Input(batch) => self.browser.input(batch).await.map(|()| Reply::Done),
            Operation::Screenshot => self.browser.screenshot().await.map(Reply::Screenshot),
            Operation::StreamStart(spec) => self.streamer.start(spec).await.map(|()| Reply::Done),
            Operation::StreamStop => {
                self.streamer.stop().await;
                Ok(Reply::Done)
            }
            Operation::StreamSignal(s) => self.streamer.signal(s).map(|()| Reply::Done),
            Operation::StreamControl { viewer_id } => {
                self.streamer.set_control(viewer_id).map(|()| Reply::Done)
            }
            Operation::PrepareSnapshot => self.prepare_snapshot().await,
            Operation::Refresh(spec) => self.refresh(spec).await,
            Operation::Clock(step) => self.clock(step),
            Operation::AckCredential { session_id } => {
                if self.handoff.acknowledge(&session_id) {
                    tracing::info!(%session_id, "the host has stored the credential");
                }
                Ok(Reply::Done)
            }
        }
    }

    /// Only a VM's agent (PID 1) can be snapshotted and restored, and only
    /// before any session used it.
    async fn prepare_snapshot(&self) -> Result<Reply, ErrorReply> {
        if self.mode != AgentMode::Pid1 {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "only a VM's agent running as PID 1 can be snapshotted",
            ));
        }
        if self.logins.any_started() || self.streamer.is_running() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "this VM already served a login: a snapshot would carry it into every copy",
            ));
        }
        if self.browser.display_name().is_some() {
            self.browser.warm_up().await?;
            crate::streamer::warm_up(&self.reaper)
                .await
                .map_err(|e| ErrorReply::new(ErrorCode::Io, e))?;
        }
        self.expect_restore.send_replace(true);
        tracing::info!("snapshot announced: dialling again quickly once the connection breaks");
        Ok(Reply::Done)
    }

    async fn refresh(&self, spec: RefreshSpec) -> Result<Reply, ErrorReply> {
        spec.validate()
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        if self.mode != AgentMode::Pid1 {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "only a VM's agent running as PID 1 can refresh its VM",
            ));
        }
        let report = blocking(move || {
            crate::restore::refresh(&spec)
                .map_err(|e| ErrorReply::new(ErrorCode::Io, e.to_string()))
        })
        .await?;
        self.expect_restore.send_replace(false);
        tracing::info!(clock_step_ms = report.clock_step_ms, restarted = ?report.restarted, "restored copy refreshed");
        Ok(Reply::Refreshed(report))
    }

    /// Reads the wall clock, stepped first when asked. Only a VM's own
    /// agent steps it: an agent run as a process shares the host's clock.
    fn clock(&self, step: ClockStep) -> Result<Reply, ErrorReply> {
        step.validate()
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        if step.step_ms != 0 && self.mode != AgentMode::Pid1 {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "only a VM's agent running as PID 1 can step its clock",
            ));
        }
        let unix_time_ms = crate::restore::step_clock_by(step.step_ms)
            .map_err(|e| ErrorReply::new(ErrorCode::Io, e.to_string()))?;
        Ok(Reply::Clock(ClockReading { unix_time_ms }))
    }

    /// Stops logins and the browser (before the agent exits).
    pub async fn stop_roles(&self) {
        self.logins.shutdown().await;
        self.streamer.stop().await;
        self.browser.stop().await;
        self.egress_tasks.close();
        self.egress_tasks.wait().await;
        if self.mode == AgentMode::Process {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }

    /// Snapshot for `status`.
    pub fn status(&self) -> StatusReport {
        let (mem_total_kib, mem_available_kib) = sysinfo::memory_kib();
        StatusReport {
            uptime_ms: sysinfo::uptime_ms(),
            agent_rss_kib: sysinfo::own_rss_kib(),
            mem_total_kib,
            mem_available_kib,
            load_1m: sysinfo::load_1m(),
            running_commands: self.reaper.running(),
            dropped_log_lines: self.dropped_logs.load(Ordering::Relaxed),
        }
    }

    /// Forwards log lines at or above the configured level until `cancel`.
    pub async fn forward_logs(
        self: Arc<Self>,
        outbox: mpsc::Sender<GuestMessage>,
        cancel: CancellationToken,
    ) {
        let Some(mut logs) = self
            .logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        loop {
            let line = tokio::select! {
                l = logs.rx.recv() => match l { Some(l) => l, None => break },
                _ = cancel.cancelled() => break,
            };
            if line.level as u8 > self.forward_level.load(Ordering::Relaxed) {
                continue;
            }
            tokio::select! {
                _ = outbox.send(GuestMessage::Event(Event::Log(line))) => {}
                _ = cancel.cancelled() => break,
            }
        }
        *self.logs.lock().unwrap_or_else(PoisonError::into_inner) = Some(logs);
    }

    /// Forwards events until `cancel`. An event taken from the channel but
    /// not handed to the connection when it ends waits in `unsent` for the
    /// next one, so a credential is not lost to a reconnection.
    pub async fn forward_events(
        self: Arc<Self>,
        outbox: mpsc::Sender<GuestMessage>,
        cancel: CancellationToken,
    ) {
        let Some(mut rx) = self
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        loop {
            let queued = self
                .unsent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            let event = match queued {
                Some(e) => e,
                None => tokio::select! {
                    e = rx.recv() => match e { Some(e) => e, None => break },
                    _ = cancel.cancelled() => break,
                },
            };
            let sent = tokio::select! {
                r = outbox.send(GuestMessage::Event(event.clone())) => r.is_ok(),
                _ = cancel.cancelled() => false,
            };
            if !sent {
                self.unsent
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_front(event);
                break;
            }
        }
        *self.events.lock().unwrap_or_else(PoisonError::into_inner) = Some(rx);
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ErrorReply> + Send + 'static,
) -> Result<T, ErrorReply> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ErrorReply::new(
            ErrorCode::Io,
            format!("file task failed: {e}"),
        ))
    })
}
