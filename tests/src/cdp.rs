//! DevTools clients for the live-view tests and bench: a headless Chromium
//! that plays the person's viewer, and a second connection to the browser
//! role's own Chromium (to look at, or change, what the person sees).
//! Readiness is the `DevToolsActivePort` file Chromium writes, waited for
//! with a deadline; the viewer is killed with its process group on drop.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// A DevTools connection to one tab (its page WebSocket), used one call at
/// a time: a call writes its command and reads until its answer, skipping
/// events (no domain is enabled, so few come).
#[derive(Debug)]
pub struct Tab {
    socket: tokio::sync::Mutex<(u64, Socket)>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Tab {
    /// Connects to the first page tab of the browser whose DevTools HTTP
    /// endpoint is on `port`.
    pub async fn first_page(port: u16) -> Result<Self> {
        let url = format!("http://127.0.0.1:{port}/json/list");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list: Value = reqwest::get(&url).await?.json().await?;
            let ws = list.as_array().and_then(|l| {
                l.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            if let Some(ws) = ws {
                let (socket, _) = tokio_tungstenite::connect_async(ws.as_str()).await?;
                return Ok(Self {
                    socket: tokio::sync::Mutex::new((0, socket)),
                });
            }
            if Instant::now() > deadline {
                bail!("no page tab in the browser on port {port}: {list}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `method` with `params` and returns its result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        let mut guard = self.socket.lock().await;
        guard.0 += 1;
        let id = guard.0;
        let msg = serde_json::json!({ "id": id, "method": method, "params": params });
        guard.1.send(Message::text(msg.to_string())).await?;
        let deadline = Duration::from_secs(20);
        loop {
            let next = tokio::time::timeout(deadline, guard.1.next())
                .await
                .map_err(|_| anyhow!("{method}: no answer within {deadline:?}"))?
                .context("the DevTools socket closed")??;
            let Message::Text(t) = next else { continue };
            let v: Value = serde_json::from_str(&t)?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expr` (awaiting a promise) and returns its JSON value.
    pub async fn eval(&self, expr: &str) -> Result<Value> {
        let params = serde_json::json!({
            "expression": expr, "returnByValue": true, "awaitPromise": true,
        });
        let r = self.call("Runtime.evaluate", params).await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expr:.80}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` until it is truthy, every 50 ms, up to `timeout`.
    /// Returns its last value.
    pub async fn wait_for(&self, expr: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr).await.unwrap_or(Value::Null);
            let truthy = !matches!(&v, Value::Null | Value::Bool(false)) && v != 0 && v != "";
            if truthy {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("`{expr}` did not become true within {timeout:?} (last: {v})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads the DevTools port from `DevToolsActivePort` in `profile`,
/// waiting up to `timeout` for the file.
pub async fn devtools_port(profile: &Path, timeout: Duration) -> Result<u16> {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let mut lines = text.lines();
            if let (Some(port), Some(_path)) = (lines.next(), lines.next()) {
                return Ok(port.trim().parse()?);
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", file.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The browser role's Chromium, started by the agent that `daemon_pid`
/// runs as a host process: its profile is under the agent's state dir,
/// which airlockd names in the agent's environment.
pub async fn browser_role_tab(daemon_pid: i32) -> Result<Tab> {
    Tab::first_page(browser_role_port(daemon_pid).await?).await
}

/// The DevTools port of the browser role's Chromium (on the loopback of
/// the namespace airlockd runs in).
pub async fn browser_role_port(daemon_pid: i32) -> Result<u16> {
    let agent = children_named(daemon_pid, "airlock-guest")
        .into_iter()
        .next()
        .context("no browser-role agent runs under airlockd")?;
    let environ = std::fs::read(format!("/proc/{agent}/environ"))?;
    let name = format!("{}=", airlock_proto::AGENT_STATE_DIR_ENV);
    let state = environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(name.as_bytes()))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .with_context(|| format!("the agent has no {name}"))?;
    let profile = state.join("chromium-profile");
    devtools_port(&profile, Duration::from_secs(20)).await
}

/// Pids of the direct children of `parent` whose command name is `name`.
pub fn children_named(parent: i32, name: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // comm is in parentheses and may hold spaces: split after it.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                return false;
            };
            let comm = &stat[open + 1..close];
            let ppid = stat[close + 2..].split(' ').nth(1);
            name.starts_with(comm) && ppid == Some(&parent.to_string())
        })
        .collect()
}

/// A headless Chromium playing the person's viewer.
#[derive(Debug)]
pub struct Viewer {
    child: Child,
    _profile: tempfile::TempDir,
    /// Reaches its DevTools when it runs in another network namespace.
    _forward: Option<crate::netns::Forward>,
    /// Its tab.
    pub tab: Tab,
}

impl Viewer {
    /// Starts headless Chromium at 1280x800 and opens `url`.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_in(url, None, &[]).await
    }

    /// As [`Viewer::open`], with Chromium in network namespace `netns`
    /// (its DevTools reached through a [`crate::netns::Forward`]) and
    /// `extra` flags.
    pub async fn open_in(url: &str, netns: Option<Arc<OwnedFd>>, extra: &[&str]) -> Result<Self> {
        let profile = tempfile::tempdir()?;
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-renderer-backgrounding",
            "--disable-background-timer-throttling",
            "--disable-backgrounding-occluded-windows",
            "--autoplay-policy=no-user-gesture-required",
            // WebRTC over loopback only: loopback candidates, not mDNS.
            "--allow-loopback-in-peer-connection",
            "--disable-features=WebRtcHideLocalIpsWithMdns",
            "--window-size=1280,800",
            "--remote-debugging-port=0",
        ])
        .args(extra)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
        if let Some(ns) = netns.clone() {
            // SAFETY: between fork and exec the closure only calls
            // setns(2), async-signal-safe, on a descriptor opened before.
            unsafe {
                cmd.pre_exec(move || crate::netns::enter(&ns));
            }
        }
        let child = cmd.spawn().context("starting the viewer's chromium")?;
        // Built before the waits so that a failure still kills it.
        let mut guard = ChildGuard(Some(child));
        let mut port = devtools_port(profile.path(), Duration::from_secs(30)).await?;
        let mut forward = None;
        if netns.is_some() {
            let target = (std::net::Ipv4Addr::LOCALHOST, port).into();
            let f = crate::netns::Forward::start(None, port, netns, target).await?;
            port = f.port;
            forward = Some(f);
        }
        let tab = Tab::first_page(port).await?;
        // Returns once the navigation commits: the page keeps its event
        // stream and socket open, so there is no network idle to wait for.
        tab.call("Page.navigate", serde_json::json!({ "url": url }))
            .await
            .context("opening the viewer page")?;
        Ok(Self {
            child: guard.0.take().context("viewer process")?,
            _profile: profile,
            _forward: forward,
            tab,
        })
    }
}

fn kill_group(child: &mut Child) {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            kill_group(c);
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}
