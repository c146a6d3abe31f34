//! Harness for login-session tests: a fake OAuth server in the test
//! process (its tokens carry a per-test canary), an airlockd whose CLI VMs
//! are QEMU microVMs and whose browser role runs as a host process (Xvfb +
//! Chromium), the [`FAKE`] provider (airlock's own fake CLI, no vendor's:
//! the real vendor CLIs run only in VMs, in `vendor_clis`), and helpers
//! that follow a session through its Server-Sent Events and act as the
//! person in front of the browser through the input endpoint.

use std::time::Duration;

use airlock_fakes::oauth::{serve, FakeOAuth, FakeOAuthConfig, RunningServer};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::{artifacts, Daemon, Settings};

/// X keysym of Tab.
pub const TAB: u32 = 0xff09;
/// X keysym of Return.
pub const RETURN: u32 = 0xff0d;

/// The provider the host-process login tests use: airlock's fake CLI
/// (`airlock-demo-cli`, which has no vendor counterpart) against the rig's
/// fake OAuth server. Real vendor CLIs never run on the host.
pub const FAKE: &str = "fake_cli";

/// Where [`FAKE`]'s credential lands in the CLI VM.
pub const FAKE_CREDENTIAL: &str = "/root/.airlock-demo/credentials.json";

/// [`FAKE`]'s profile, appended to the shipped ones (its CLI reads the fake
/// server's URL from `AIRLOCK_FAKE_OAUTH_URL`, set through `auth.login_env`).
const FAKE_PROFILE: &str = r#"
[fake_cli]
display_name = "airlock fake CLI"
command = ["airlock-demo-cli", "login"]
env = ["AIRLOCK_DEMO_HOME=${HOME}/.airlock-demo"]
flow = { type = "loopback" }
confirm = { type = "statusCommand", argv = ["airlock-demo-cli", "status"] }

[[fake_cli.credentials]]
path = "${AIRLOCK_DEMO_HOME}/credentials.json"
required = ["/accessToken", "/refreshToken"]
deliver_to = "/root/.airlock-demo/credentials.json"
"#;

/// The shipped provider profiles plus [`FAKE`]'s, as a providers file's text.
pub fn providers_with_fake() -> Result<String> {
    let shipped = std::fs::read_to_string(artifacts()?.repo.join("config/providers.toml"))?;
    Ok(format!("{shipped}\n{FAKE_PROFILE}"))
}

/// A fake OAuth server and an airlockd set up for logins.
#[derive(Debug)]
pub struct LoginRig {
    /// The daemon.
    pub daemon: Daemon,
    /// The fake vendor.
    pub oauth: FakeOAuth,
    /// Embedded in every token the fake issues.
    pub canary: String,
    _server: RunningServer,
    _providers: tempfile::TempDir,
}

impl LoginRig {
    /// Starts both; `tune` adjusts airlockd's settings.
    pub async fn start(tune: impl FnOnce(Settings) -> Settings) -> Result<Self> {
        let canary = format!("CANARY{}", std::process::id() as u64 * 7919 + rand_suffix());
        let cfg = FakeOAuthConfig {
            token_marker: canary.clone(),
            ..FakeOAuthConfig::default()
        };
        let (oauth, server) = serve(cfg, "127.0.0.1:0".parse()?).await?;
        let a = artifacts()?;
        let providers = tempfile::tempdir()?;
        let file = providers.path().join("providers.toml");
        std::fs::write(&file, providers_with_fake()?)?;
        let settings = Settings::new("qemu")
            .set("vm", "browser_backend", "\"process\"")
            .set("vm", "unsafe_host_browser", "true")
            .set(
                "auth",
                "providers_file",
                &format!("{:?}", file.display().to_string()),
            )
            .set(
                "auth",
                "login_path_append",
                &format!("[{:?}]", a.fakes_dir.display().to_string()),
            )
            .set(
                "auth",
                "login_env",
                &format!("{{ AIRLOCK_FAKE_OAUTH_URL = {:?} }}", oauth.base_url()),
            );
        let daemon = Daemon::start(tune(settings)).await?;
        Ok(Self {
            daemon,
            oauth,
            canary,
            _server: server,
            _providers: providers,
        })
    }
}

/// The account the host-process browser role (and so the login CLI) runs
/// as in these tests (`vm.unsafe_host_browser_user`, when root).
pub const BROWSER_ACCOUNT: &str = "nobody";

/// Gives `dir` and everything in it to [`BROWSER_ACCOUNT`], so a login
/// CLI may write there (a test's planted files); a no-op unless root.
pub fn give_to_browser_account(dir: &std::path::Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let user = nix::unistd::User::from_name(BROWSER_ACCOUNT)?
        .with_context(|| format!("no {BROWSER_ACCOUNT} account"))?;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        nix::unistd::chown(&p, Some(user.uid), Some(user.gid))?;
        if p.is_dir() {
            todo.extend(std::fs::read_dir(&p)?.flatten().map(|e| e.path()));
        }
    }
    Ok(())
}

/// One rig at a time per test binary: the fake CLI binds a fixed port
/// (1460, else 1461), as Codex does.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `body` with a fresh rig (`tune` adjusts airlockd's settings), one
/// at a time; prints the sessions and airlockd's diagnostics when it fails.
pub async fn with_rig(
    tune: impl FnOnce(Settings) -> Settings,
    body: impl AsyncFnOnce(&mut LoginRig) -> Result<()>,
) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut rig = LoginRig::start(tune).await?;
    let result = body(&mut rig).await;
    if result.is_err() {
        rig.daemon.print_sessions().await;
        rig.daemon.print_diagnostics();
    }
    result
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

impl Daemon {
    /// `POST /api/auth/start`; returns the session id.
    pub async fn start_session(&self, user: &str, provider: &str) -> Result<String> {
        let v = self.start_view(user, provider).await?;
        Ok(v["sessionId"].as_str().context("sessionId")?.to_string())
    }

    /// `GET /api/auth/session/:id`, expecting 200; returns the view.
    pub async fn get_session(&self, id: &str) -> Result<Value> {
        let (status, v) = self
            .request(
                reqwest::Method::GET,
                &format!("/api/auth/session/{id}"),
                None,
            )
            .await?;
        if status != 200 {
            bail!("session {id}: {status} {v}");
        }
        Ok(v)
    }

    /// `POST /api/auth/session/:id/cancel`, expecting 200; returns the view.
    pub async fn cancel_session(&self, id: &str) -> Result<Value> {
        let (status, v) = self
            .request(
                reqwest::Method::POST,
                &format!("/api/auth/session/{id}/cancel"),
                None,
            )
            .await?;
        if status != 200 {
            bail!("cancel {id}: {status} {v}");
        }
        Ok(v)
    }

    /// `POST /api/auth/start`; returns the new session's view (remembered
    /// for [`Daemon::print_sessions`]).
    pub async fn start_view(&self, user: &str, provider: &str) -> Result<Value> {
        let body = json!({ "userId": user, "provider": provider });
        let (status, v) = self
            .request(reqwest::Method::POST, "/api/auth/start", Some(body))
            .await?;
        if status != 201 {
            bail!("start session: {status} {v}");
        }
        let id = v["sessionId"].as_str().context("sessionId")?.to_string();
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(id);
        Ok(v)
    }

    /// Prints the views of the sessions started here and saves their
    /// screens next to the test's logs (for a failing test).
    pub async fn print_sessions(&self) {
        let ids = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for id in ids {
            if let Ok((_, v)) = self
                .request(
                    reqwest::Method::GET,
                    &format!("/api/auth/session/{id}"),
                    None,
                )
                .await
            {
                eprintln!(
                    "==== session {id} ====\n{}",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                );
            }
            let shot = self
                .http
                .get(format!("{}/api/auth/session/{id}/screenshot", self.base))
                .send()
                .await;
            if let Ok(resp) = shot {
                if resp.status() == 200 {
                    let path = std::env::temp_dir().join(format!("airlock-failed-{id}.png"));
                    if let Ok(bytes) = resp.bytes().await {
                        let _ = std::fs::write(&path, bytes);
                        eprintln!("==== screen of {id}: {} ====", path.display());
                    }
                }
            }
        }
    }

    /// Follows the session's events until `pred` holds for its view; fails
    /// if it reaches a final state first or `timeout` passes.
    pub async fn wait_session(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let url = format!("{}/api/auth/session/{id}/events", self.base);
        let follow = async {
            let mut resp = self.http.get(&url).send().await?;
            if resp.status() != 200 {
                bail!("events of {id}: {}", resp.status());
            }
            let mut buf = String::new();
            let mut last = Value::Null;
            while let Some(chunk) = resp.chunk().await? {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) else {
                        continue;
                    };
                    last = serde_json::from_str(data.trim())?;
                    if pred(&last) {
                        return Ok(last);
                    }
                }
            }
            Err(anyhow!(
                "the session ended without reaching the expected point: {last}"
            ))
        };
        tokio::time::timeout(timeout, follow)
            .await
            .map_err(|_| anyhow!("session {id} took longer than {timeout:?}"))?
    }

    /// Waits until a page whose location ends with `path` has loaded for
    /// the `nth` time (1-based).
    pub async fn wait_page(&self, id: &str, path: &str, nth: usize) -> Result<Value> {
        self.wait_session(id, Duration::from_secs(60), |v| {
            loaded(v).iter().filter(|l| l.ends_with(path)).count() >= nth
        })
        .await
        .with_context(|| format!("page {path} never loaded"))
    }

    /// Starts a session for `provider` and waits (up to `within`) until its
    /// sign-in page, served at a path ending in `page`, is on screen; the
    /// view then, with its viewer link. A session that fails first is an
    /// error that quotes why.
    pub async fn start_until_page(
        &self,
        user: &str,
        provider: &str,
        page: &str,
        within: Duration,
    ) -> Result<Value> {
        let started = self.start_view(user, provider).await?;
        let id = started["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_string();
        let v = self
            .wait_session(&id, within, |v| {
                state_is(v, "awaiting_user") || v["state"] == "failed"
            })
            .await?;
        if !state_is(&v, "awaiting_user") {
            bail!("the session did not reach awaiting_user: {}", v["error"]);
        }
        let mut v = self.wait_page(&id, page, 1).await?;
        v["viewerUrl"] = started["viewerUrl"].clone();
        Ok(v)
    }

    /// Runs a command in a VM with `exec`'s full request (`argv`, `env`,
    /// `timeoutMs`...), expecting 200.
    pub async fn exec_request(&self, id: &str, body: Value) -> Result<Value> {
        let (status, v) = self
            .request(
                reqwest::Method::POST,
                &format!("/api/vms/{id}/exec"),
                Some(body.clone()),
            )
            .await?;
        if status != 200 {
            bail!("exec {} in {id}: {status} {v}", body["argv"]);
        }
        Ok(v)
    }

    /// Sends input events to the session's browser.
    pub async fn input(&self, id: &str, events: Value) -> Result<()> {
        let (status, v) = self
            .request(
                reqwest::Method::POST,
                &format!("/api/auth/session/{id}/input"),
                Some(json!({ "events": events })),
            )
            .await?;
        if status != 200 {
            bail!("input to {id}: {status} {v}");
        }
        Ok(())
    }

    /// Acts as the person: signs in as alice on the fake vendor's page,
    /// then allows (or denies) on the consent page.
    pub async fn sign_in_and(&self, id: &str, allow: bool) -> Result<()> {
        self.wait_page(id, "/authorize", 1).await?;
        self.sign_in_on_shown_page(id, allow).await
    }

    /// As [`Daemon::sign_in_and`], once the sign-in page is on screen
    /// (vendors' authorization pages live at their own paths).
    pub async fn sign_in_on_shown_page(&self, id: &str, allow: bool) -> Result<()> {
        self.input(id, sign_in_keys()).await?;
        self.wait_page(id, "/authorize/login", 1).await?;
        let mut first = Vec::new();
        if !allow {
            first.extend([key(TAB, true), key(TAB, false)]);
        }
        // Only Enter when pressing again: a Tab that was taken has already
        // put the focus on Deny.
        self.press_until_past_consent(id, Duration::from_secs(20), async |attempt| {
            let mut keys = if attempt == 1 {
                first.clone()
            } else {
                Vec::new()
            };
            keys.extend([key(RETURN, true), key(RETURN, false)]);
            self.input(id, Value::Array(keys)).await
        })
        .await
    }

    /// Presses (`press`, given the attempt from 1) on the consent page until
    /// the session leaves it, waiting `wait` each time. An Enter on the
    /// settled page has been lost (the page stayed, Allow focused; under
    /// TCG with two logins on two cores, and once on a loaded host): a
    /// person presses again, and so does this, three times at most.
    pub async fn press_until_past_consent(
        &self,
        id: &str,
        wait: Duration,
        mut press: impl AsyncFnMut(u32) -> Result<()>,
    ) -> Result<()> {
        for attempt in 1..=3 {
            press(attempt).await?;
            let moved_on = self
                .wait_session(id, wait, |v| {
                    v["state"] != "awaiting_user"
                        || loaded(v)
                            .last()
                            .is_some_and(|l| !l.ends_with("/authorize/login"))
                })
                .await;
            if moved_on.is_ok() {
                return Ok(());
            }
            eprintln!("the consent page did not move on (attempt {attempt})");
        }
        bail!("the consent page never took the Enter key")
    }
}

/// What the person types on the fake vendor's sign-in page: alice, Tab,
/// her password, Enter.
pub fn sign_in_keys() -> Value {
    json!([
        text("alice"),
        key(TAB, true),
        key(TAB, false),
        text("correct horse"),
        key(RETURN, true),
        key(RETURN, false),
    ])
}

/// The view's steps, each as often as it happened (a step repeated at
/// once is listed once with a count).
fn each_step(v: &Value) -> impl Iterator<Item = &Value> {
    v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| std::iter::repeat_n(s, 1 + s["repeated"].as_u64().unwrap_or(0) as usize))
}

/// Locations of the session's `pageLoaded` steps, in order.
pub fn loaded(v: &Value) -> Vec<String> {
    each_step(v)
        .filter(|s| s["event"] == "pageLoaded")
        .filter_map(|s| s["detail"].as_str().map(String::from))
        .collect()
}

/// A `text` input event.
pub fn text(t: &str) -> Value {
    json!({ "type": "text", "text": t })
}

/// A key press or release by keysym.
pub fn key(keysym: u32, down: bool) -> Value {
    json!({ "type": if down { "keyDown" } else { "keyUp" }, "keysym": keysym })
}

/// True when the view's state is `state`.
pub fn state_is(v: &Value, state: &str) -> bool {
    v["state"] == state
}

/// The events of a view's steps, in order.
pub fn step_events(v: &Value) -> Vec<String> {
    each_step(v)
        .filter_map(|s| s["event"].as_str().map(String::from))
        .collect()
}
