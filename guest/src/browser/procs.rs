//! Starting the browser role's processes: Xvfb (the virtual display) and a
//! headful Chromium on it with a fresh profile and a DevTools port. Both
//! go through the agent's [`Reaper`] in their own process group, so a stop
//! kills Chromium's helpers too. Readiness is observed, not guessed: Xvfb
//! reports its display number on `-displayfd`, Chromium writes
//! `DevToolsActivePort` into its profile (watched with inotify). Used by
//! [`super::BrowserRole`].

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use airlock_proto::BrowserSpec;
use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};

use crate::process::{ExitInfo, Reaper};
use crate::users::RunAs;

/// How long each process gets to become ready: a cold Chromium in a VM
/// under TCG takes about 36 s to its DevTools port (measured), more with
/// another VM beside it.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A process of the browser role failed to start.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// It could not be spawned.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It exited or stayed silent instead of becoming ready.
    #[error("{program} did not become ready: {why}")]
    NotReady {
        /// The program.
        program: String,
        /// What happened, with the end of its error output.
        why: String,
    },
}

/// A running child in its own process group.
#[derive(Debug)]
pub struct Supervised {
    /// Short name (`xvfb`, `chromium`).
    pub name: &'static str,
    /// Its pid, also its process group.
    pub pid: Pid,
    exit: oneshot::Receiver<ExitInfo>,
    /// Its exit, once observed (the receiver must not be polled again).
    ended: Option<ExitInfo>,
    /// The end of its stderr, for crash reports.
    pub stderr_tail: Arc<Mutex<String>>,
    /// The first line of its output that says it ran out of memory.
    pub out_of_memory: watch::Receiver<Option<String>>,
}

impl Supervised {
    /// Waits until the process reports that it ran out of memory (never,
    /// if it does not); returns that line. Cancel-safe.
    pub async fn oom(&self) -> String {
        first_oom(self.out_of_memory.clone()).await
    }

    /// Waits for the leader to exit. Cancel-safe; returns at once after the
    /// first time.
    pub async fn wait(&mut self) -> ExitInfo {
        if let Some(e) = self.ended {
            return e;
        }
        let e = (&mut self.exit).await.unwrap_or_default();
        self.ended = Some(e);
        e
    }

    /// Kills the whole process group (helpers included) and waits for the
    /// leader.
    pub async fn kill(mut self) {
        let _ = killpg(self.pid, Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(3), self.wait())
            .await
            .is_err()
        {
            let _ = killpg(self.pid, Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(3), self.wait()).await;
        }
    }

    /// The last line of its stderr.
    pub fn last_error_line(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tail.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string()
    }
}

fn pipe_of(fd: Option<impl Into<OwnedFd>>) -> Option<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd?.into()).ok()
}

/// Spawns `cmd` in its own process group with stderr kept as a tail;
/// returns its stdout and stdin when the caller asked for pipes.
pub(crate) fn spawn(
    reaper: &Reaper,
    name: &'static str,
    cmd: &mut Command,
) -> Result<(Supervised, Option<pipe::Receiver>, Option<pipe::Sender>), ProcError> {
    cmd.stderr(Stdio::piped()).process_group(0);
    // SAFETY: runs in the forked child before exec; prctl is
    // async-signal-safe. If the agent dies (as a host process it can be
    // killed on its own), the kernel kills this child instead of leaving
    // an orphaned browser or display behind.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (mut child, exit) = reaper.spawn(cmd).map_err(|source| ProcError::Spawn {
        program: name.into(),
        source,
    })?;
    let tail = Arc::new(Mutex::new(String::new()));
    let (oom_tx, out_of_memory) = watch::channel(None);
    if let Some(err) = pipe_of(child.stderr.take()) {
        let tail = tail.clone();
        // Owned by the process: it ends at EOF, when the group is gone.
        tokio::spawn(keep_tail(name, err, tail, oom_tx));
    }
    let stdout = pipe_of(child.stdout.take());
    let stdin = child
        .stdin
        .take()
        .and_then(|fd| pipe::Sender::from_owned_fd(fd.into()).ok());
    let sup = Supervised {
        name,
        pid: Pid::from_raw(child.id() as i32),
        exit,
        ended: None,
        stderr_tail: tail,
        out_of_memory,
    };
    Ok((sup, stdout, stdin))
}

/// Forwards one line of a process's error output to the host, which keeps
/// it in that process's own log file (`chromium.log`, ...), not the
/// console.
fn forward_output(process: &str, line: &str) {
    match process {
        "xvfb" => tracing::info!(target: "airlock_guest::output::xvfb", "{line}"),
        "chromium" => tracing::info!(target: "airlock_guest::output::chromium", "{line}"),
        "streamer" => tracing::info!(target: "airlock_guest::output::streamer", "{line}"),
        _ => {}
    }
}

/// The first out-of-memory line `rx` carries (pending forever if none).
pub async fn first_oom(mut rx: watch::Receiver<Option<String>>) -> String {
    let line = match rx.wait_for(Option::is_some).await {
        Ok(line) => line.clone(),
        Err(_) => None,
    };
    match line {
        Some(line) => line,
        None => std::future::pending().await,
    }
}

/// Chromium's words for running out of memory: V8's ("V8 process OOM"),
/// its allocator's ("Out of memory").
pub fn says_out_of_memory(line: &str) -> bool {
    let word = line.match_indices("OOM").any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + 3..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    });
    word || line.to_ascii_lowercase().contains("out of memory")
}

async fn keep_tail(
    name: &'static str,
    mut err: pipe::Receiver,
    tail: Arc<Mutex<String>>,
    oom: watch::Sender<Option<String>>,
) {
    let mut buf = vec![0u8; 4096];
    let mut partial = String::new();
    while let Ok(n) = err.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        partial.push_str(&text);
        while let Some(i) = partial.find('\n') {
            let line: String = partial.drain(..=i).collect();
            let line = line.trim_end();
            forward_output(name, line);
            if oom.borrow().is_none() && says_out_of_memory(line) {
                let first = airlock_proto::limits::cut(line.to_string(), 512);
                oom.send_replace(Some(first));
            }
        }
        if partial.len() > 4096 {
            forward_output(name, &std::mem::take(&mut partial));
        }
        let mut t = tail.lock().unwrap_or_else(PoisonError::into_inner);
        t.push_str(&text);
        if t.len() > 4096 {
            let cut = t.len() - 4096;
            let cut = (cut..t.len())
                .find(|&i| t.is_char_boundary(i))
                .unwrap_or(t.len());
            t.drain(..cut);
        }
    }
}

/// Starts Xvfb on `display` (a number) or, when `None`, on the first free
/// one; returns the process and the display number it serves.
pub async fn start_xvfb(
    reaper: &Reaper,
    spec: &BrowserSpec,
    display: Option<u32>,
) -> Result<(Supervised, u32), ProcError> {
    let mut cmd = Command::new("Xvfb");
    if let Some(d) = display {
        cmd.arg(format!(":{d}"));
    }
    // Started at the largest size a viewer may ask for: RandR can shrink
    // Xvfb's screen and grow it again, never beyond its start size.
    let (width, height) = (
        spec.width.max(spec.max_width),
        spec.height.max(spec.max_height),
    );
    cmd.args(["-displayfd", "1", "-screen", "0"])
        .arg(format!("{width}x{height}x24"))
        .args(["-nolisten", "tcp", "-dpi", "96", "+extension", "XTEST"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let (sup, stdout, _) = spawn(reaper, "xvfb", &mut cmd)?;
    let not_ready = |why: String| ProcError::NotReady {
        program: "Xvfb".into(),
        why,
    };
    let Some(stdout) = stdout else {
        return Err(not_ready("no stdout".into()));
    };
    let mut line = String::new();
    let read = tokio::time::timeout(
        READY_TIMEOUT,
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    match (read, line.trim().parse::<u32>()) {
        (Ok(Ok(n)), Ok(number)) if n > 0 => Ok((sup, number)),
        _ => {
            let why = format!("it printed no display number ({})", sup.last_error_line());
            sup.kill().await;
            Err(not_ready(why))
        }
    }
}

/// Chromium's flags: a headful browser filling the screen, quiet on the
/// network (no update checks, sync, or translation lookups), with its
/// DevTools on a random loopback port.
pub fn chromium_args(spec: &BrowserSpec, profile: &Path, as_root: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-breakpad",
        "--disable-dev-shm-usage",
        "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
        "--password-store=basic",
        "--remote-debugging-port=0",
        "--window-position=0,0",
        "--lang=en-US",
        // The one window is opened over DevTools: no stray startup tab.
        "--no-startup-window",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--window-size={},{}", spec.width, spec.height));
    args.push(format!("--user-data-dir={}", profile.display()));
    if as_root {
        // Chromium's sandbox cannot run as root (host-process mode in CI);
        // --test-type hides the warning bar that flag would show the user.
        args.extend(["--no-sandbox".to_string(), "--test-type".to_string()]);
    }
    if let Some(proxy) = &spec.proxy {
        args.push(format!("--proxy-server={proxy}"));
    }
    args.extend(spec.extra_args.iter().cloned());
    args
}

/// Starts Chromium on `display` with a fresh `profile` directory, as
/// `run_as` when given (its sandbox then works: it needs a non-root
/// user); returns the process and its browser-level DevTools URL.
pub async fn start_chromium(
    reaper: &Reaper,
    spec: &BrowserSpec,
    display: u32,
    profile: &Path,
    run_as: Option<RunAs>,
) -> Result<(Supervised, String), ProcError> {
    let not_ready = |why: String| ProcError::NotReady {
        program: "chromium".into(),
        why,
    };
    let _ = std::fs::remove_dir_all(profile);
    std::fs::create_dir_all(profile)
        .map_err(|e| not_ready(format!("cannot create its profile: {e}")))?;
    write_preferences(profile)
        .map_err(|e| not_ready(format!("cannot write its preferences: {e}")))?;
    // Its HOME (caches, NSS database) lives in the throwaway profile too.
    let home = profile.join("home");
    std::fs::create_dir_all(&home)
        .map_err(|e| not_ready(format!("cannot create its home: {e}")))?;
    if let Some(user) = run_as {
        user.own_tree(profile)
            .map_err(|e| not_ready(format!("cannot give its profile to its user: {e}")))?;
    }
    // Watch before starting so the port file cannot be missed.
    let watch = Inotify::init()
        .and_then(|i| {
            i.watches()
                .add(profile, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)
                .map(|_| i)
        })
        .and_then(|i| i.into_event_stream(vec![0u8; 4096]))
        .map_err(|e| not_ready(format!("cannot watch its profile: {e}")))?;
    let program = spec.chromium.clone().unwrap_or_else(|| "chromium".into());
    let mut cmd = Command::new(&program);
    let as_root = run_as.is_none() && nix::unistd::geteuid().is_root();
    cmd.args(chromium_args(spec, profile, as_root))
        .env("DISPLAY", format!(":{display}"))
        .env("HOME", &home)
        .stdout(Stdio::null());
    if let Some(user) = run_as {
        user.apply(&mut cmd);
    }
    cmd.stdin(Stdio::null());
    let (mut sup, _, _) = spawn(reaper, "chromium", &mut cmd)?;
    let port_file = profile.join("DevToolsActivePort");
    let wait = async {
        let mut events = watch;
        loop {
            if let Some(url) = read_port_file(&port_file) {
                return Some(url);
            }
            events.next().await?.ok()?;
        }
    };
    tokio::select! {
        r = tokio::time::timeout(READY_TIMEOUT, wait) => match r {
            Ok(Some(url)) => Ok((sup, url)),
            _ => {
                let why = format!("no DevTools port within {READY_TIMEOUT:?} ({})", sup.last_error_line());
                sup.kill().await;
                Err(not_ready(why))
            }
        },
        status = sup.wait() => Err(not_ready(format!("it exited ({status:?}): {}", sup.last_error_line()))),
    }
}

/// A throwaway browser offers to save nothing: no password manager or
/// autofill bubbles (they would also take keyboard focus from the page),
/// and sends nothing the person did not ask for: no search suggestions
/// for what is typed into the address bar (each keystroke would be a
/// request to the search engine, refused by the egress gateway anyway).
fn write_preferences(profile: &Path) -> std::io::Result<()> {
    let prefs = serde_json::json!({
        "credentials_enable_service": false,
        "profile": { "password_manager_enabled": false, "exit_type": "Normal" },
        "autofill": { "profile_enabled": false, "credit_card_enabled": false },
        "translate": { "enabled": false },
        "search": { "suggest_enabled": false },
        "alternate_error_pages": { "enabled": false },
        "safebrowsing": { "enabled": false },
    });
    let dir = profile.join("Default");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("Preferences"), prefs.to_string())
}

/// `ws://127.0.0.1:<port><path>` from a complete `DevToolsActivePort`.
fn read_port_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let port: u16 = lines.next()?.trim().parse().ok()?;
    let ws_path = lines.next()?.trim();
    ws_path
        .starts_with('/')
        .then(|| format!("ws://127.0.0.1:{port}{ws_path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chromiums_out_of_memory_lines_are_recognised() {
        for line in [
            "[179:1:1130/080155.353708:ERROR:v8_oom.cc(49)] V8 process OOM (Failed to reserve virtual memory for CodeRange).",
            "[FATAL:memory.cc(22)] Out of memory. size=262144",
        ] {
            assert!(says_out_of_memory(line), "{line}");
        }
        for line in [
            "ERROR:zoom_controller.cc ZOOM level",
            "dbus: Failed to connect",
        ] {
            assert!(!says_out_of_memory(line), "{line}");
        }
    }

    #[test]
    fn port_file_must_be_complete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("DevToolsActivePort");
        std::fs::write(&p, "9222\n").unwrap();
        assert_eq!(read_port_file(&p), None);
        std::fs::write(&p, "9222\n/devtools/browser/abc\n").unwrap();
        assert_eq!(
            read_port_file(&p).as_deref(),
            Some("ws://127.0.0.1:9222/devtools/browser/abc")
        );
    }

    #[test]
    fn root_gets_no_sandbox_and_proxy_is_passed() {
        let spec = BrowserSpec {
            width: 1280,
            height: 720,
            max_width: 0,
            max_height: 0,
            proxy: Some("http://10.0.0.1:3128".into()),
            chromium: None,
            extra_args: vec![],
            extra_ca_pem: None,
        };
        let args = chromium_args(&spec, Path::new("/run/p"), true);
        assert!(args.contains(&"--no-sandbox".to_string()));
        assert!(args.contains(&"--proxy-server=http://10.0.0.1:3128".to_string()));
        assert!(args.contains(&"--window-size=1280,720".to_string()));
        assert!(
            !chromium_args(&spec, Path::new("/run/p"), false).contains(&"--no-sandbox".to_string())
        );
    }
}
