//! One CLI login, from start to captured credential. The CLI runs in a PTY
//! with a fresh home in tmpfs and a `BROWSER`/`xdg-open` shim first on its
//! `PATH`; its authorization URL (from the shim, or else from its output)
//! opens in Chromium; a paste-code flow gets its code from the vendor's
//! page and types it into the PTY; an OAuth error redirect is reported as a
//! denial; the credential files are captured once they are new, complete
//! and confirmed, and sent to the host. Every step is reported as a
//! [`LoginStep`]. Run by [`super::Logins`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use airlock_proto::egress::EgressClient;
use airlock_proto::{
    CapturedCredential, CapturedFile, Confirm, Event, ExecRequest, LoginEvent, LoginFlow,
    LoginSpec, LoginStep,
};
use futures_util::{Future, FutureExt, StreamExt};
use nix::sys::signal::{killpg, Signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::opener::{install_shims, OpenerListener, SOCKET_ENV};
use super::pty::{self, PtyChild};
use super::text::{
    auth_urls, expand, failure_line, location, redirects_to_hosted_page, strip_ansi, user_code,
};
use super::watch::{CredentialWatch, WatchSpec};
use crate::browser::BrowserRole;
use crate::egress::ProxyPorts;
use crate::process::{ExitInfo, Reaper};
use crate::users::RunAs;

/// How long a URL seen in the output waits for the shim to deliver the
/// same login (the shim is preferred: it is exactly what the CLI opens).
const SHIM_GRACE: Duration = Duration::from_secs(1);
/// How long the exit path waits on Chromium for a denial it has not
/// reported yet; a live browser answers in milliseconds.
const DENIAL_CHECK: Duration = Duration::from_secs(3);
/// Output kept for the `CliExited` report.
const TAIL_BYTES: usize = 4096;
/// How long the CLI and Chromium get to stop once the credential is
/// captured, before it is sent anyway.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What a login needs from the agent.
#[derive(Debug, Clone)]
pub struct LoginCtx {
    /// Spawns and reaps the CLI.
    pub reaper: Reaper,
    /// Chromium.
    pub browser: Arc<BrowserRole>,
    /// Where reports go.
    pub events: mpsc::Sender<Event>,
    /// Captured credentials until the host has stored them.
    pub handoff: Arc<crate::handoff::Handoff>,
    /// tmpfs directory for login homes.
    pub state_dir: PathBuf,
    /// The account the CLI runs as (in an image).
    pub run_as: Option<RunAs>,
    /// The agent's egress proxies, once the host enabled them (browser
    /// VMs without a network); the login's traffic goes through them.
    pub proxies: Arc<OnceLock<ProxyPorts>>,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Runs the login until it ends or `cancel` fires; reports its steps and
/// removes its directory (with any credential copy) at the end.
pub async fn run(spec: LoginSpec, ctx: LoginCtx, cancel: CancellationToken) {
    let dir = ctx.state_dir.join("logins").join(&spec.session_id);
    let answered = vec![false; spec.answers.len()];
    let mut login = Login {
        spec,
        ctx,
        sent: false,
        tail: String::new(),
        answered,
        unacked: None,
        user_code_shown: false,
    };
    if let Err(reason) = login.drive(&dir, &cancel).await {
        if !cancel.is_cancelled() {
            login.report(LoginStep::Failed { reason }).await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

struct Login {
    spec: LoginSpec,
    ctx: LoginCtx,
    sent: bool,
    tail: String,
    /// Which of the spec's prompt answers were typed.
    answered: Vec<bool>,
    /// The last answer typed, until the CLI visibly took it.
    unacked: Option<Unacked>,
    /// Whether a device-code flow's user code was reported.
    user_code_shown: bool,
}

/// An answer typed into a full-screen CLI that may not have taken it: an
/// Ink TUI (Gemini CLI) draws its menu before it listens for keys, and
/// under TCG a key typed in between is lost. If the CLI then prints
/// nothing, or draws the same prompt again, the answer is typed again.
struct Unacked {
    index: usize,
    tries: u32,
    /// What the CLI printed since (escape sequences removed, bounded).
    since: String,
}

/// How long after an answer the CLI must have reacted. Not less: Gemini
/// CLI, having taken the key, redraws its menu's text and has taken over
/// three seconds to print its URL with another login beside it, and a key
/// typed again then lands in its code prompt.
const ANSWER_RETRY: Duration = Duration::from_secs(10);
/// Times an answer is typed at most.
const ANSWER_TRIES: u32 = 3;

/// What the login watches in the browser's tab.
struct Pages {
    cdp: Arc<crate::browser::cdp::Cdp>,
    /// Main-frame URLs (OAuth error redirects).
    navigations: futures_util::stream::BoxStream<'static, String>,
    /// Page loads (progress the person can see).
    loads: futures_util::stream::BoxStream<'static, ()>,
}

/// The environment and paths of one login.
struct Prepared {
    env: Vec<(String, String)>,
    home: PathBuf,
    opener: OpenerListener,
    watch: CredentialWatch,
}

impl Login {
    async fn report(&self, step: LoginStep) {
        let event = LoginEvent {
            session_id: self.spec.session_id.clone(),
            step: step.bounded(),
        };
        let _ = self.ctx.events.send(Event::Login(event)).await;
    }

    fn prepare(&self, dir: &Path, display: &str) -> Result<Prepared, String> {
        let home = dir.join("home");
        std::fs::create_dir_all(&home).map_err(|e| format!("cannot create the login home: {e}"))?;
        let shim = install_shims(&dir.join("bin"))
            .map_err(|e| format!("cannot install the browser shim: {e}"))?;
        let socket = dir.join("opener.sock");
        let opener = OpenerListener::bind(&socket)
            .map_err(|e| format!("cannot listen for the shim: {e}"))?;
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        let base_path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
        for (k, v) in [
            ("HOME", home.display().to_string()),
            ("DISPLAY", display.to_string()),
            ("BROWSER", shim.display().to_string()),
            ("PATH", format!("{}:{base_path}", dir.join("bin").display())),
            ("TERM", "xterm-256color".into()),
            ("LANG", "C.UTF-8".into()),
            (SOCKET_ENV, socket.display().to_string()),
        ] {
            vars.insert(k.into(), v);
        }
        if let Some(proxies) = self.ctx.proxies.get() {
            vars.extend(proxies.env(EgressClient::Login));
        }
        if let Some(ca) = self.ctx.browser.extra_ca() {
            for name in &self.spec.ca_env {
                vars.insert(name.clone(), ca.display().to_string());
            }
        }
        for entry in &self.spec.env {
            let (name, template) = entry
                .split_once('=')
                .ok_or_else(|| format!("bad environment entry {entry:?}"))?;
            let value = expand(template, &vars).map_err(|e| e.to_string())?;
            vars.insert(name.into(), value);
        }
        let mut specs = Vec::new();
        for c in &self.spec.credentials {
            let path = expand(&c.path, &vars).map_err(|e| e.to_string())?;
            if !path.starts_with('/') {
                return Err(format!("credential path {path:?} is not absolute"));
            }
            specs.push(WatchSpec {
                path: path.into(),
                required: c.required.clone(),
            });
        }
        let watch = CredentialWatch::start(specs)
            .map_err(|e| format!("cannot watch the credential files: {e}"))?;
        // Last: the watch created the credential files' directories.
        if let Some(user) = self.ctx.run_as {
            user.own_tree(dir)
                .map_err(|e| format!("cannot give the login's files to its user: {e}"))?;
        }
        Ok(Prepared {
            env: vars.into_iter().collect(),
            home,
            opener,
            watch,
        })
    }

    async fn drive(&mut self, dir: &Path, cancel: &CancellationToken) -> Result<(), String> {
        let cdp = self
            .ctx
            .browser
            .cdp(Duration::from_secs(30))
            .await
            .map_err(|e| e.message)?;
        let display = self
            .ctx
            .browser
            .display_name()
            .ok_or("the display is not running")?;
        let mut p = self.prepare(dir, &display)?;
        let mut pages = Pages {
            navigations: cdp.navigations().await.map_err(|e| e.to_string())?,
            loads: cdp.loads().await.map_err(|e| e.to_string())?,
            cdp,
        };
        let mut child = pty::spawn(
            &self.ctx.reaper,
            &self.spec.argv,
            &p.env,
            &p.home,
            self.ctx.run_as,
        )
        .map_err(|e| format!("cannot start {:?}: {e}", self.spec.argv[0]))?;
        self.report(LoginStep::Started).await;
        let result = self
            .event_loop(&mut p, &mut child, &mut pages, cancel)
            .await;
        let _ = killpg(child.pid, Signal::SIGKILL);
        result
    }

    /// The login's select loop: one branch per thing that can happen.
    async fn event_loop(
        &mut self,
        p: &mut Prepared,
        child: &mut PtyChild,
        pages: &mut Pages,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let mut buf = vec![0u8; 8192];
        let mut opened = false;
        let mut output_url: Option<(String, BoxFut<()>)> = None;
        let mut code: Option<BoxFut<Option<String>>> = None;
        let mut denied = false;
        let mut pty_open = true;
        let url_deadline = tokio::time::sleep(Duration::from_millis(self.spec.url_timeout_ms));
        tokio::pin!(url_deadline);
        let retry = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                url = p.opener.next_url() => {
                    if let Ok(url) = url {
                        if !opened && self.acceptable(&url) {
                            opened = true;
                            output_url = None;
                            self.unacked = None;
                            code = self.open(&url, "shim", cancel).await?;
                        }
                    }
                }
                n = child.pty.read(&mut buf), if pty_open => match n {
                    Ok(n) if n > 0 => {
                        self.keep_tail(&buf[..n]);
                        self.check_failure()?;
                        if self.answer_prompts(child).await? {
                            retry.as_mut().reset(tokio::time::Instant::now() + ANSWER_RETRY);
                        }
                        self.show_user_code().await;
                        if !opened && output_url.is_none() {
                            if let Some(url) = auth_urls(&self.tail).into_iter().find(|u| self.acceptable(u)) {
                                output_url = Some((url, Box::pin(tokio::time::sleep(SHIM_GRACE))));
                            }
                        }
                        // A URL means the CLI got past its prompts: an
                        // answer typed again now would land in the next
                        // one (Gemini CLI's code prompt, when its redraw
                        // repeats the menu's text on a fast machine).
                        if opened || output_url.is_some() {
                            self.unacked = None;
                        }
                    }
                    _ => pty_open = false,
                },
                _ = async { output_url.as_mut().map(|(_, t)| t).expect("guarded").await }, if output_url.is_some() => {
                    let (url, _) = output_url.take().expect("guarded");
                    opened = true;
                    code = self.open(&url, "output", cancel).await?;
                }
                text = async { code.as_mut().expect("guarded").await }, if code.is_some() => {
                    code = None;
                    if let Some(text) = text {
                        child.pty.write_all(format!("{text}\r").as_bytes()).await.map_err(|e| format!("cannot type the code: {e}"))?;
                        self.report(LoginStep::CodeEntered).await;
                    }
                }
                Some(()) = pages.loads.next() => {
                    pages.cdp.settle().await;
                    if let Some(url) = pages.cdp.current_url().await {
                        self.report(LoginStep::PageLoaded { location: location(&url) }).await;
                    }
                }
                Some(url) = pages.navigations.next(), if !denied => {
                    if let Some((error, description)) = oauth_error(&url) {
                        denied = true;
                        self.report(LoginStep::Denied { error, description }).await;
                    }
                }
                _ = p.watch.changed(), if !self.sent => {
                    if let Some(files) = self.try_capture(&p.watch, &p.env, &p.home, None).await? {
                        // Stopped before the credential leaves: neither the
                        // CLI nor a page may refresh (and so revoke) it here.
                        let _ = killpg(child.pid, Signal::SIGKILL);
                        let _ = tokio::time::timeout(STOP_WAIT, &mut child.exit).await;
                        self.stop_browser().await;
                        self.send(files).await;
                        return Ok(());
                    }
                }
                exit = &mut child.exit => {
                    let exit = exit.unwrap_or_default();
                    self.drain_pty(child).await;
                    if !denied {
                        self.report_queued_denial(pages).await;
                    }
                    if !self.sent {
                        if let Some(files) = self.try_capture(&p.watch, &p.env, &p.home, Some(exit)).await? {
                            self.stop_browser().await;
                            self.send(files).await;
                        }
                    }
                    self.report(LoginStep::CliExited {
                        exit_code: exit.exit_code,
                        signal: exit.signal,
                        output_tail: self.tail.clone(),
                    }).await;
                    return Ok(());
                }
                _ = &mut retry, if self.unacked.is_some() => {
                    if self.retry_answer(child).await? {
                        retry.as_mut().reset(tokio::time::Instant::now() + ANSWER_RETRY);
                    }
                }
                _ = &mut url_deadline, if !opened => {
                    return Err(format!(
                        "{} printed no login URL within {} s; its output ends with: {}",
                        self.spec.argv[0], self.spec.url_timeout_ms / 1000, last_lines(&self.tail, 6)
                    ));
                }
            }
        }
    }

    /// Opens the URL, reports it, and for paste-code flows returns the
    /// future that reads the code from the vendor's page (through whatever
    /// Chromium is current, should it restart meanwhile).
    async fn open(
        &self,
        url: &str,
        via: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<BoxFut<Option<String>>>, String> {
        tracing::info!(via, "opening the login page");
        self.ctx
            .browser
            .open(url)
            .await
            .map_err(|e| format!("cannot open the login page: {}", e.message))?;
        self.report(LoginStep::UrlOpened {
            location: location(url),
            via: via.into(),
        })
        .await;
        self.report(LoginStep::WaitingForUser).await;
        let LoginFlow::PasteCode { code_selector } = &self.spec.flow else {
            return Ok(None);
        };
        let (selector, cancel, role) = (
            code_selector.clone(),
            cancel.clone(),
            self.ctx.browser.clone(),
        );
        Ok(Some(Box::pin(async move {
            let cdp = role.cdp(Duration::from_secs(30)).await.ok()?;
            cdp.wait_for_text(&selector, &cancel).await
        })))
    }

    /// Reports an OAuth error redirect the loop has not read yet: the CLI
    /// can exit on the redirect before Chromium's event for it has even
    /// arrived. A history round trip first flushes every event Chromium
    /// sent before it; the history itself is checked last, for a redirect
    /// whose request event was missed.
    async fn report_queued_denial(&mut self, pages: &mut Pages) {
        let history = tokio::time::timeout(DENIAL_CHECK, pages.cdp.history()).await;
        let mut seen: Vec<String> = Vec::new();
        while let Some(Some(url)) = pages.navigations.next().now_or_never() {
            seen.push(url);
        }
        if let Ok(Ok(entries)) = history {
            seen.extend(entries.into_iter().rev());
        }
        if let Some((error, description)) = seen.iter().find_map(|u| oauth_error(u)) {
            self.report(LoginStep::Denied { error, description }).await;
        }
    }

    /// Whether to open `url`. A paste-code flow opens only the URL that
    /// leads to the vendor's page showing the code (its `redirect_uri` is
    /// not the CLI's loopback server): some CLIs hand the browser a loopback
    /// URL first and keep the hosted page as their fallback.
    fn acceptable(&self, url: &str) -> bool {
        match self.spec.flow {
            LoginFlow::PasteCode { .. } => redirects_to_hosted_page(url),
            _ => true,
        }
    }

    /// Reports a device-code flow's user code once the CLI printed it: the
    /// person types it into the vendor's page, which cannot know it.
    async fn show_user_code(&mut self) {
        if self.user_code_shown || self.spec.flow != LoginFlow::DeviceCode {
            return;
        }
        if let Some(code) = user_code(&self.tail) {
            self.user_code_shown = true;
            self.report(LoginStep::UserCode { code }).await;
        }
    }

    /// Types the answer to each configured prompt the CLI has printed;
    /// true when one was typed (its retry timer starts).
    async fn answer_prompts(&mut self, child: &mut PtyChild) -> Result<bool, String> {
        let mut typed = false;
        for (i, a) in self.spec.answers.iter().enumerate() {
            if !self.answered[i] && self.tail.contains(&a.when) {
                self.answered[i] = true;
                child
                    .pty
                    .write_all(a.send.as_bytes())
                    .await
                    .map_err(|e| format!("cannot answer the CLI's prompt: {e}"))?;
                self.unacked = Some(Unacked {
                    index: i,
                    tries: 1,
                    since: String::new(),
                });
                typed = true;
            }
        }
        Ok(typed)
    }

    /// Types the last answer again if the CLI showed no reaction to it;
    /// true when it did (the timer runs again).
    async fn retry_answer(&mut self, child: &mut PtyChild) -> Result<bool, String> {
        let Some(u) = self.unacked.take() else {
            return Ok(false);
        };
        let answer = &self.spec.answers[u.index];
        let ignored = u.since.trim().is_empty() || u.since.contains(&answer.when);
        if !ignored || u.tries >= ANSWER_TRIES {
            return Ok(false);
        }
        tracing::info!(session_id = %self.spec.session_id, prompt = %answer.when, "the CLI did not take the answer; typing it again");
        child
            .pty
            .write_all(answer.send.as_bytes())
            .await
            .map_err(|e| format!("cannot answer the CLI's prompt: {e}"))?;
        self.unacked = Some(Unacked {
            index: u.index,
            tries: u.tries + 1,
            since: String::new(),
        });
        Ok(true)
    }

    fn keep_tail(&mut self, bytes: &[u8]) {
        let text = strip_ansi(&String::from_utf8_lossy(bytes));
        if let Some(u) = &mut self.unacked {
            if u.since.len() < TAIL_BYTES {
                u.since.push_str(&text);
            }
        }
        self.tail.push_str(&text);
        if self.tail.len() > TAIL_BYTES {
            let mut cut = self.tail.len() - TAIL_BYTES;
            while !self.tail.is_char_boundary(cut) {
                cut += 1;
            }
            self.tail.drain(..cut);
        }
    }

    /// Reads what the CLI printed last (it may still be in the PTY buffer).
    async fn drain_pty(&mut self, child: &mut PtyChild) {
        let mut buf = vec![0u8; 8192];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), child.pty.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            self.keep_tail(&buf[..n]);
        }
    }

    /// The files, if they hold a new credential and the profile's
    /// confirmation passes. `exit` is the CLI's exit once it has ended.
    async fn try_capture(
        &mut self,
        watch: &CredentialWatch,
        env: &[(String, String)],
        home: &Path,
        exit: Option<ExitInfo>,
    ) -> Result<Option<Vec<CapturedFile>>, String> {
        let Ok(files) = watch.check() else {
            return Ok(None);
        };
        let confirmed = match &self.spec.confirm {
            Confirm::File => true,
            Confirm::ExitCode => match exit {
                None => return Ok(None),
                Some(e) => e.exit_code == Some(0),
            },
            Confirm::StatusCommand { argv } => self.status_ok(argv, env, home).await,
        };
        Ok(confirmed.then_some(files))
    }

    /// Ends the login when the CLI printed one of the profile's failure
    /// texts (a CLI that goes back to a menu instead of exiting).
    fn check_failure(&self) -> Result<(), String> {
        let Some(text) = self
            .spec
            .fail_when
            .iter()
            .find(|t| self.tail.contains(t.as_str()))
        else {
            return Ok(());
        };
        let line = failure_line(&self.tail, text);
        Err(format!("{}: {line}", self.spec.argv[0]))
    }

    /// Stops Chromium (and its display) once the credential is captured.
    async fn stop_browser(&self) {
        if tokio::time::timeout(STOP_WAIT, self.ctx.browser.stop())
            .await
            .is_err()
        {
            tracing::warn!(session_id = %self.spec.session_id, "Chromium did not stop in time");
        }
    }

    async fn status_ok(&self, argv: &[String], env: &[(String, String)], home: &Path) -> bool {
        let req = ExecRequest {
            argv: argv.to_vec(),
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: Some(home.display().to_string()),
            timeout_ms: self.spec.confirm_timeout_ms,
            max_output_bytes: 4096,
        };
        match self.ctx.reaper.exec(&req, &CancellationToken::new()).await {
            Ok(r) => r.exit_code == Some(0),
            Err(e) => {
                tracing::warn!(error = %e.message, "status command failed to run");
                false
            }
        }
    }

    async fn send(&mut self, files: Vec<CapturedFile>) {
        self.sent = true;
        let credential = CapturedCredential {
            session_id: self.spec.session_id.clone(),
            files,
        };
        // Kept until the host acknowledges it, and awaited, not dropped
        // when busy: a credential must reach the host.
        self.ctx.handoff.keep(credential.clone());
        let _ = self.ctx.events.send(Event::Credential(credential)).await;
        self.report(LoginStep::CredentialCaptured).await;
    }
}

/// `(error, description)` when `url` carries an OAuth error response.
pub fn oauth_error(url: &str) -> Option<(String, Option<String>)> {
    let u = url::Url::parse(url).ok()?;
    let pairs: BTreeMap<String, String> = u.query_pairs().into_owned().collect();
    let error = pairs.get("error")?.chars().take(64).collect();
    let description = pairs
        .get("error_description")
        .map(|d| d.chars().take(512).collect());
    Some((error, description))
}

/// The last `n` lines with text, joined with " | " (box-drawing and
/// padding trimmed: a TUI's frame says nothing).
fn last_lines(text: &str, n: usize) -> String {
    let frame = |c: char| c.is_whitespace() || ('\u{2500}'..='\u{257f}').contains(&c);
    let mut lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_matches(frame))
        .filter(|l| !l.is_empty())
        .rev()
        .take(n)
        .collect();
    lines.reverse();
    if lines.is_empty() {
        return "(nothing)".into();
    }
    lines.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_skip_a_tuis_frame() {
        let tail = "\u{256d}\u{2500}\u{2500}\u{256e}\n\u{2502}  Do you want to continue?  \u{2502}\n\u{2502}\u{2502}\n\u{2502} \u{25cf} 1. Yes \u{2502}\n\u{2570}\u{2500}\u{256f}\n";
        assert_eq!(
            last_lines(tail, 2),
            "Do you want to continue? | \u{25cf} 1. Yes"
        );
        assert_eq!(last_lines("", 3), "(nothing)");
    }

    #[test]
    fn oauth_errors_are_read_from_the_redirect() {
        let (e, d) = oauth_error("http://localhost:1455/auth/callback?error=access_denied&error_description=User+said+no&state=x").unwrap();
        assert_eq!(
            (e.as_str(), d.as_deref()),
            ("access_denied", Some("User said no"))
        );
        assert_eq!(
            oauth_error("http://localhost:1455/auth/callback?code=abc&state=x"),
            None
        );
    }
}
