//! Child processes of the agent: one reaper for all of them (and, as PID 1,
//! for every orphan in the VM), and `exec` with a deadline and bounded
//! output capture. Used by the request dispatcher in [`crate::channel`].
//!
//! Every `waitpid` in the agent happens here, under the same lock that
//! [`Reaper::spawn`] holds while it forks. That lock matters: when exec
//! fails, the standard library waits for the failed child inside `spawn`,
//! and a reaper racing it there would take that status and make `spawn`
//! panic.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_proto::{ErrorCode, ErrorReply, Event, ExecRequest, ExecResult, ProcessExit};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long output pipes may stay open after the command exited (a
/// background grandchild holding them) before its group is killed.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Upper bound on any exec deadline, so deadline arithmetic cannot overflow.
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How a child ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal number, when killed.
    pub signal: Option<i32>,
}

type Waiters = HashMap<i32, oneshot::Sender<ExitInfo>>;

/// Reaps children and hands each exit status to whoever spawned it.
#[derive(Debug, Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
    running: Arc<AtomicU32>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task on
    /// `tracker`; it stops when `cancel` fires. Exits of processes nobody
    /// registered go to `orphans` as events (dropped when it is full).
    pub fn start(
        tracker: &TaskTracker,
        cancel: CancellationToken,
        orphans: mpsc::Sender<Event>,
    ) -> std::io::Result<Self> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Self {
            waiters: Arc::default(),
            running: Arc::default(),
        };
        let r = reaper.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    got = sigchld.recv() => {
                        if got.is_none() { break; }
                        r.reap_all(&orphans);
                    }
                }
            }
        });
        Ok(reaper)
    }

    fn reap_all(&self, orphans: &mpsc::Sender<Event>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
                Ok(status) => status,
            };
            let (pid, info) = match status {
                WaitStatus::Exited(pid, code) => (
                    pid,
                    ExitInfo {
                        exit_code: Some(code),
                        signal: None,
                    },
                ),
                WaitStatus::Signaled(pid, sig, _) => (
                    pid,
                    ExitInfo {
                        exit_code: None,
                        signal: Some(sig as i32),
                    },
                ),
                _ => continue,
            };
            match waiters.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(info);
                }
                None => {
                    let _ = orphans.try_send(Event::ProcessExit(ProcessExit {
                        pid: pid.as_raw(),
                        exit_code: info.exit_code,
                        signal: info.signal,
                    }));
                }
            }
        }
    }

    /// Spawns `cmd`, registered for its exit before the reaper can see it.
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(Child, oneshot::Receiver<ExitInfo>)> {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Commands currently running under [`Reaper::exec`].
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Relaxed)
    }

    /// Runs a command to completion (or its deadline, or `cancel`), keeping
    /// at most `max_output_bytes` of each output stream.
    pub async fn exec(
        &self,
        req: &ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecResult, ErrorReply> {
        req.validate()
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        let mut cmd = build_command(req);
        let started = Instant::now();
        let (mut child, exit_rx) = self
            .spawn(&mut cmd)
            .map_err(|e| spawn_error(&req.argv[0], e))?;
        let _running = RunningGuard::new(&self.running);
        let group = Pid::from_raw(child.id() as i32);
        let cap = req.max_output_bytes as usize;
        let stop = CancellationToken::new();
        let done = CancellationToken::new();
        let stdout = child.stdout.take().map(OwnedFd::from);
        let stderr = child.stderr.take().map(OwnedFd::from);
        let captures = async {
            let both = tokio::join!(capture(stdout, cap, &stop), capture(stderr, cap, &stop));
            done.cancel();
            both
        };
        let timeout = Duration::from_millis(req.timeout_ms).min(MAX_EXEC_TIMEOUT);
        let waiter = async {
            let ended = wait_exit(exit_rx, group, timeout, cancel).await;
            tokio::select! {
                _ = done.cancelled() => {}
                _ = tokio::time::sleep(DRAIN_GRACE) => {
                    let _ = killpg(group, Signal::SIGKILL);
                    stop.cancel();
                }
            }
            ended
        };
        let (((stdout, stdout_dropped), (stderr, stderr_dropped)), (info, timed_out)) =
            tokio::join!(captures, waiter);
        Ok(ExecResult {
            exit_code: info.exit_code,
            signal: info.signal,
            timed_out,
            stdout,
            stderr,
            stdout_dropped,
            stderr_dropped,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }
}

fn build_command(req: &ExecRequest) -> Command {
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .current_dir(req.cwd.as_deref().unwrap_or("/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a deadline kills everything it started.
        .process_group(0);
    for (name, value) in req.env.iter().filter_map(|kv| kv.split_once('=')) {
        cmd.env(name, value);
    }
    cmd
}

fn spawn_error(program: &str, e: std::io::Error) -> ErrorReply {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    ErrorReply::new(code, format!("cannot start {program:?}: {e}"))
}

/// Waits for the exit, killing the group at the deadline or on cancel.
/// Returns the exit and whether the deadline fired.
async fn wait_exit(
    mut exit_rx: oneshot::Receiver<ExitInfo>,
    group: Pid,
    timeout: Duration,
    cancel: &CancellationToken,
) -> (ExitInfo, bool) {
    let timed_out = tokio::select! {
        r = &mut exit_rx => return (r.unwrap_or_default(), false),
        _ = tokio::time::sleep(timeout) => true,
        _ = cancel.cancelled() => false,
    };
    let _ = killpg(group, Signal::SIGKILL);
    // SIGKILL cannot be caught, so the status arrives at once; the bound
    // only guards against a status lost to a bug.
    let info = tokio::time::timeout(Duration::from_secs(5), exit_rx).await;
    (
        info.ok().and_then(Result::ok).unwrap_or_default(),
        timed_out,
    )
}

/// Reads a pipe to its end (or `stop`), keeping the first `cap` bytes and
/// counting the rest.
async fn capture(fd: Option<OwnedFd>, cap: usize, stop: &CancellationToken) -> (Vec<u8>, u64) {
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    let Some(mut rx) = fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok()) else {
        return (kept, dropped);
    };
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => break,
            r = rx.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let take = cap.saturating_sub(kept.len()).min(n);
        kept.extend_from_slice(&buf[..take]);
        dropped += (n - take) as u64;
    }
    (kept, dropped)
}

struct RunningGuard(Arc<AtomicU32>);

impl RunningGuard {
    fn new(counter: &Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str], timeout_ms: u64, cap: u32) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec!["GREETING=hi".into()],
            cwd: None,
            timeout_ms,
            max_output_bytes: cap,
        }
    }

    async fn reaper() -> (Reaper, CancellationToken) {
        let cancel = CancellationToken::new();
        let (tx, _rx) = mpsc::channel(4);
        let r = Reaper::start(&TaskTracker::new(), cancel.clone(), tx).unwrap();
        (r, cancel)
    }

    /// One test: several reapers in one process would steal each other's
    /// children (each waits on pid -1), as the agent never does.
    #[tokio::test]
    async fn exec_behaviour() {
        let (r, _c) = reaper().await;
        let none = CancellationToken::new();

        let out = r
            .exec(
                &req(
                    &["/bin/sh", "-c", "echo $GREETING; echo oops >&2; exit 3"],
                    5000,
                    1024,
                ),
                &none,
            )
            .await
            .unwrap();
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"oops\n");
        assert!(!out.timed_out);

        let out = r
            .exec(
                &req(&["/bin/sh", "-c", "head -c 100000 /dev/zero"], 5000, 1000),
                &none,
            )
            .await
            .unwrap();
        assert_eq!(out.stdout.len(), 1000, "output is capped");
        assert_eq!(out.stdout_dropped, 99_000, "and the rest counted");

        let out = r
            .exec(
                &req(&["/bin/sh", "-c", "sleep 30 & sleep 30"], 200, 1024),
                &none,
            )
            .await
            .unwrap();
        assert!(out.timed_out, "the deadline fires");
        assert_eq!(out.signal, Some(9));
        assert!(
            out.duration_ms < 5000,
            "whole group killed; took {} ms",
            out.duration_ms
        );

        let err = r
            .exec(&req(&["/no/such/program"], 1000, 10), &none)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(r.running(), 0);
    }
}
