//! `airlock-guest`: the agent inside every airlock VM.
//!
//! It dials the host over vsock (or a Unix socket when run as a plain host
//! process), says hello, and then runs commands, writes and reads files and
//! reports status on request, forwarding its own logs. As PID 1 of an
//! initramfs it also mounts the pseudo filesystems, loads kernel modules,
//! reaps orphans and powers the VM off. `main.rs` calls [`main_entry`].

pub mod agent;
pub mod browser;
pub mod channel;
pub mod egress;
pub mod files;
pub mod handoff;
pub mod init;
pub mod logging;
pub mod login;
pub mod options;
pub mod process;
pub mod restore;
pub mod sandbox;
pub mod stage1;
pub mod streamer;
pub mod sysinfo;
pub mod users;
pub mod wire;

use std::process::ExitCode;
use std::sync::Arc;

use airlock_proto::{AgentMode, INIT_MARKER, PROBE_MARKER};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{Agent, AgentParts};
use crate::channel::{ChannelError, End};
use crate::logging::LogReceiver;
use crate::options::Options;

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// PID 1 setup failed.
    #[error(transparent)]
    Init(#[from] init::InitError),
    /// The runtime or a signal handler could not be set up.
    #[error("cannot start: {0}")]
    Startup(#[source] std::io::Error),
    /// The host refused this agent (stale image or protocol mismatch).
    #[error("host refused this agent: {0}")]
    Refused(String),
}

/// Entry point: as PID 1 never returns (powers off); otherwise returns the
/// process exit code.
pub fn main_entry() -> ExitCode {
    // Started as the BROWSER / xdg-open shim of a login: forward and exit.
    if let Some(code) = login::opener::run_if_shim() {
        return code;
    }
    let started_ms = sysinfo::uptime_ms();
    if std::process::id() == 1 {
        init::install_panic_hook();
        if let Err(e) = init::setup_console() {
            init::console_line(&format!("airlock-guest: {e}"));
        }
        init::console_line(&format!("{INIT_MARKER} uptime_ms={started_ms}"));
        if stage1::wanted() {
            // Only returns on failure: success executes the image's init.
            let e = stage1::run(std::path::Path::new(options::MODULES_FILE));
            init::console_line(&format!("airlock-guest: stage 1 failed: {e}"));
            init::power_off();
        }
        // Said either way: a VM that powers off should say why.
        match run_pid1(started_ms) {
            Ok(()) => init::console_line("airlock-guest: stopped; powering off"),
            Err(e) => init::console_line(&format!("airlock-guest: fatal: {e}")),
        }
        init::power_off();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Options::from_args(&args, &cmdline) {
        Ok(o) => o,
        Err(options::OptionsError::Version) => {
            println!(
                "airlock-guest {} build {}",
                env!("CARGO_PKG_VERSION"),
                sysinfo::own_build_id()
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("airlock-guest: {e}");
            return ExitCode::from(2);
        }
    };
    // Still one thread: the namespaces must cover the whole agent.
    if let Some(iso) = &opts.isolation {
        let socket_dir = match &opts.transport {
            options::Transport::Unix { path } => path.parent().map(|d| (d, true)),
            options::Transport::Vsock { .. } => None,
        };
        let exe = std::env::current_exe().ok();
        let exe_dir = exe.as_deref().and_then(|e| e.parent()).map(|d| (d, false));
        let keep: Vec<_> = socket_dir.into_iter().chain(exe_dir).collect();
        if let Err(e) = sandbox::enter(iso, &keep) {
            eprintln!("airlock-guest: {e}");
            return ExitCode::FAILURE;
        }
    }
    let logs = logging::install(&opts.log_level);
    match run(&opts, started_ms, logs) {
        Ok(()) if opts.mode == AgentMode::Service => power_off_service(),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent stopped");
            ExitCode::FAILURE
        }
    }
}

fn run_pid1(started_ms: u64) -> Result<(), AgentError> {
    init::mount_filesystems()?;
    let opts = Options::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if opts.probe {
        init::console_line(PROBE_MARKER);
        return Ok(());
    }
    let logs = logging::install(&opts.log_level);
    if let Err(e) = init::loopback_up() {
        tracing::warn!(error = %e, "cannot bring the loopback interface up");
    }
    let loaded = init::load_modules(&opts.modules_file)?;
    tracing::info!(
        loaded,
        uptime_ms = sysinfo::uptime_ms(),
        "kernel modules loaded"
    );
    run(&opts, started_ms, logs)
}

/// Runs the agent until shutdown, or until the host refuses it.
pub fn run(opts: &Options, started_ms: u64, logs: LogReceiver) -> Result<(), AgentError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
        .map_err(AgentError::Startup)?;
    runtime.block_on(serve_forever(opts, started_ms, logs))
}

async fn serve_forever(
    opts: &Options,
    started_ms: u64,
    logs: LogReceiver,
) -> Result<(), AgentError> {
    let shutdown = CancellationToken::new();
    // The reaper outlives the shutdown signal: stopping the browser and
    // logins still waits for their processes to exit.
    let reaper_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (event_tx, event_rx) = mpsc::channel(256);
    let reaper = process::Reaper::start(&tracker, reaper_stop.clone(), event_tx.clone())
        .map_err(AgentError::Startup)?;
    watch_signals(&tracker, &shutdown, opts.mode).map_err(AgentError::Startup)?;
    let agent = Arc::new(Agent::new(AgentParts {
        mode: opts.mode,
        isolated: opts.isolation.is_some(),
        started_uptime_ms: started_ms,
        reaper,
        logs,
        events: (event_tx, event_rx),
        shutdown: shutdown.clone(),
        transport: opts.transport.clone(),
    }));
    let result = connect_loop(&agent, opts).await;
    shutdown.cancel();
    agent.stop_roles().await;
    reaper_stop.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

async fn connect_loop(agent: &Arc<Agent>, opts: &Options) -> Result<(), AgentError> {
    for seq in 0u32.. {
        let Some(stream) =
            channel::dial(&opts.transport, &agent.shutdown, &agent.expect_restore).await
        else {
            return Ok(());
        };
        match channel::serve(agent, stream, seq).await {
            Ok(End::Shutdown) => return Ok(()),
            Ok(End::Closed) => tracing::info!("host closed the connection; dialling again"),
            Err(ChannelError::Refused(reason)) => return Err(AgentError::Refused(reason)),
            Err(e) => tracing::warn!(error = %e, "connection failed; dialling again"),
        }
        if agent.shutdown.is_cancelled() {
            return Ok(());
        }
    }
    Ok(())
}

/// SIGTERM/SIGINT stop the agent gracefully (service and process modes;
/// PID 1 ignores them, as the kernel does not deliver them to init).
fn watch_signals(
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    mode: AgentMode,
) -> std::io::Result<()> {
    if mode == AgentMode::Pid1 {
        return Ok(());
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = shutdown.clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
            _ = shutdown.cancelled() => return,
        }
        shutdown.cancel();
    });
    Ok(())
}

/// In a full image, a host `shutdown` request powers the VM off through
/// systemd so that services stop in order.
fn power_off_service() -> ExitCode {
    match std::process::Command::new("systemctl")
        .args(["poweroff", "--no-block"])
        .status()
    {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            tracing::error!(status = %s, "systemctl poweroff failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot run systemctl poweroff");
            ExitCode::FAILURE
        }
    }
}
