//! The agent's state shared by its connections: identity for the hello,
//! the reaper, forwarded logs, and the operations it performs. Built by
//! [`crate::run`], used by [`crate::channel`].

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use airlock_proto::{
    capability, AgentMode, ErrorCode, ErrorReply, Event, GuestConfig, GuestMessage, Hello,
    LogLevel, Operation, ProcessExit, Reply, StatusReport, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::logging::{parse_level, LogReceiver};
use crate::process::Reaper;
use crate::sysinfo;

/// Shared state of the running agent.
#[derive(Debug)]
pub struct Agent {
    mode: AgentMode,
    build_id: String,
    boot_id: String,
    started_uptime_ms: u64,
    reaper: Reaper,
    /// Handed to each connection's log forwarder and taken back after.
    logs: Mutex<Option<LogReceiver>>,
    orphans: Mutex<Option<mpsc::Receiver<ProcessExit>>>,
    dropped_logs: Arc<std::sync::atomic::AtomicU64>,
    forward_level: AtomicU8,
    /// Cancelled when the agent should stop (shutdown request or signal).
    pub shutdown: CancellationToken,
}

impl Agent {
    /// Assembles the agent; `started_uptime_ms` is when `main` began.
    pub fn new(
        mode: AgentMode,
        started_uptime_ms: u64,
        reaper: Reaper,
        logs: LogReceiver,
        orphans: mpsc::Receiver<ProcessExit>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            mode,
            build_id: sysinfo::own_build_id(),
            boot_id: sysinfo::boot_id(),
            started_uptime_ms,
            reaper,
            dropped_logs: logs.dropped.clone(),
            logs: Mutex::new(Some(logs)),
            orphans: Mutex::new(Some(orphans)),
            forward_level: AtomicU8::new(LogLevel::Info as u8),
            shutdown,
        }
    }

    /// How the agent runs.
    pub fn mode(&self) -> AgentMode {
        self.mode
    }

    /// The hello for connection number `seq`.
    pub fn hello(&self, seq: u32) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            build_id: self.build_id.clone(),
            boot_id: self.boot_id.clone(),
            mode: self.mode,
            uptime_at_start_ms: self.started_uptime_ms,
            uptime_at_hello_ms: sysinfo::uptime_ms(),
            connection_seq: seq,
            capabilities: [
                capability::EXEC,
                capability::FILES,
                capability::STATUS,
                capability::SHUTDOWN,
                capability::LOGS,
            ]
            .map(String::from)
            .to_vec(),
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
        match op {
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

    /// Reports exits of processes the agent did not start until `cancel`.
    pub async fn forward_orphans(
        self: Arc<Self>,
        outbox: mpsc::Sender<GuestMessage>,
        cancel: CancellationToken,
    ) {
        let Some(mut rx) = self
            .orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        loop {
            let exit = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => break },
                _ = cancel.cancelled() => break,
            };
            if outbox
                .try_send(GuestMessage::Event(Event::ProcessExit(exit)))
                .is_err()
            {
                tracing::debug!("outbox full; process exit not reported");
            }
        }
        *self.orphans.lock().unwrap_or_else(PoisonError::into_inner) = Some(rx);
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
