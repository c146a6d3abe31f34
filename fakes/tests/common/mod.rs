//! Helpers shared by this crate's integration tests: a fake OAuth server on
//! 127.0.0.1:0, a "browser" (an HTTP client that does not follow
//! redirects) that signs in and answers the consent page, a stub opener
//! that reports the URL it was asked to open over TCP, and a running demo
//! CLI (`fake-cli` as `airlock-demo-cli`) whose output lines can be
//! awaited. Every wait has a deadline. Each test file uses some of them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use airlock_fakes::oauth::{serve, FakeOAuth, FakeOAuthConfig, RunningServer};
use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Upper bound of every wait in these tests.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// The canary the test servers embed in tokens.
pub const MARKER: &str = "TESTCANARY";

/// Starts a fake server with test defaults (no device poll interval).
pub async fn server() -> anyhow::Result<(FakeOAuth, RunningServer)> {
    server_with(|_| {}).await
}

/// Starts a fake server after letting `tweak` change the config.
pub async fn server_with(
    tweak: impl FnOnce(&mut FakeOAuthConfig),
) -> anyhow::Result<(FakeOAuth, RunningServer)> {
    let mut cfg = FakeOAuthConfig {
        token_marker: MARKER.into(),
        device_poll_interval: Duration::ZERO,
        ..FakeOAuthConfig::default()
    };
    tweak(&mut cfg);
    Ok(serve(cfg, "127.0.0.1:0".parse()?).await?)
}

/// The value of the hidden input `name` in a page.
pub fn hidden(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\" value=\""))?;
    let rest = &html[at + name.len() + 15..];
    Some(rest[..rest.find('"')?].to_string())
}

/// The `Location` header of a response, which must be a redirect.
pub fn location(resp: &reqwest::Response) -> anyhow::Result<String> {
    let loc = resp
        .headers()
        .get("location")
        .context("no Location header")?;
    Ok(loc.to_str()?.to_string())
}

/// A query parameter of a URL.
pub fn param(url: &str, name: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let found = parsed
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned());
    found
}

/// Plays the user's browser, without following redirects.
pub struct Browser {
    pub http: reqwest::Client,
}

impl Browser {
    pub fn new() -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(DEADLINE)
            .build()?;
        Ok(Self { http })
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self.http.get(url).send().await?)
    }

    /// Opens an authorize URL and signs in; returns the consent page.
    pub async fn sign_in(
        &self,
        authorize_url: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<(reqwest::StatusCode, String)> {
        let page = self.get(authorize_url).await?;
        if page.status() != 200 {
            bail!("authorize answered {}", page.status());
        }
        let page = page.text().await?;
        self.submit_login(&page, user, password).await
    }

    /// Submits the sign-in form found in `page`.
    pub async fn submit_login(
        &self,
        page: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<(reqwest::StatusCode, String)> {
        let action = form_action(page)?;
        let rid = hidden(page, "request_id").context("no request_id")?;
        let resp = self
            .http
            .post(action)
            .form(&[
                ("request_id", rid.as_str()),
                ("username", user),
                ("password", password),
            ])
            .send()
            .await?;
        Ok((resp.status(), resp.text().await?))
    }

    /// Presses Allow or Deny on a consent page; returns the response.
    pub async fn decide(
        &self,
        consent_page: &str,
        allow: bool,
    ) -> anyhow::Result<reqwest::Response> {
        let action = form_action(consent_page)?;
        let rid = hidden(consent_page, "request_id").context("no request_id")?;
        let decision = if allow { "allow" } else { "deny" };
        Ok(self
            .http
            .post(action)
            .form(&[("request_id", rid.as_str()), ("decision", decision)])
            .send()
            .await?)
    }

    /// Signs in as alice and decides; returns where the server redirects.
    pub async fn authorize(&self, authorize_url: &str, allow: bool) -> anyhow::Result<String> {
        let (status, consent) = self
            .sign_in(authorize_url, "alice", "correct horse")
            .await?;
        if status != 200 {
            bail!("sign-in answered {status}: {consent}");
        }
        let resp = self.decide(&consent, allow).await?;
        if resp.status() != 302 {
            bail!("decision answered {}", resp.status());
        }
        location(&resp)
    }
}

fn form_action(page: &str) -> anyhow::Result<String> {
    let at = page.find("action=\"").context("no form")?;
    let rest = &page[at + 8..];
    Ok(rest[..rest.find('"').context("bad form")?].to_string())
}

/// A stand-in for a browser launcher: a script that sends its first
/// argument to a TCP port the test listens on.
pub struct OpenerStub {
    pub script: PathBuf,
    listener: TcpListener,
}

impl OpenerStub {
    /// Writes the script as `dir/name`.
    pub async fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let script = dir.join(name);
        let body = format!("#!/bin/bash\nexec 3<>/dev/tcp/127.0.0.1/{port}\nprintf '%s\\n' \"$1\" >&3\nexec 3>&-\n");
        std::fs::write(&script, body)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { script, listener })
    }

    /// The next URL the opener was asked to open.
    pub async fn next_url(&self) -> anyhow::Result<String> {
        let (mut stream, _) = tokio::time::timeout(DEADLINE, self.listener.accept())
            .await
            .context("the opener was never run")??;
        let mut text = String::new();
        tokio::time::timeout(DEADLINE, stream.read_to_string(&mut text)).await??;
        Ok(text.trim().to_string())
    }
}

/// A scratch directory with a `home/` and a `bin/` holding `fake-cli`
/// linked as `airlock-demo-cli`, the name it is installed under.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("home"))?;
        std::fs::create_dir_all(dir.path().join("bin"))?;
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_fake-cli"),
            dir.path().join("bin/airlock-demo-cli"),
        )?;
        Ok(Self { dir })
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// A command for `bin/{name}` with a clean environment: only `HOME`,
    /// `PATH` (sandbox bin first) and `AIRLOCK_FAKE_OAUTH_URL`.
    pub fn command(&self, name: &str, oauth_url: &str) -> Command {
        let mut cmd = Command::new(self.bin().join(name));
        cmd.env_clear()
            .env("HOME", self.home())
            .env(
                "PATH",
                format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin().display()),
            )
            .env("AIRLOCK_FAKE_OAUTH_URL", oauth_url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

/// A running demo CLI whose stdout and stderr lines can be awaited.
pub struct Cli {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line seen so far, prefixed with `out: ` or `err: `.
    seen: Vec<String>,
}

impl Cli {
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd.spawn()?;
        let (tx, lines) = mpsc::unbounded_channel();
        let out = child.stdout.take().context("stdout not piped")?;
        let err = child.stderr.take().context("stderr not piped")?;
        for (tag, stream) in [
            (
                "out",
                Box::new(out) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            ),
            ("err", Box::new(err)),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if tx.send(format!("{tag}: {line}")).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits for a line containing `needle`; returns it without the tag.
    pub async fn wait_line(&mut self, needle: &str) -> anyhow::Result<String> {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return Ok(line[5..].to_string());
        }
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return Some(line[5..].to_string());
                }
            }
            None
        };
        match tokio::time::timeout(DEADLINE, wait).await {
            Ok(Some(line)) => Ok(line),
            _ => Err(anyhow!(
                "no line containing {needle:?}; output so far:\n{}",
                self.seen.join("\n")
            )),
        }
    }

    /// The authorize URL the CLI printed.
    pub async fn printed_url(&mut self, base: &str) -> anyhow::Result<String> {
        let line = self.wait_line(&format!("{base}/authorize?")).await?;
        let start = line.find(base).context("no URL")?;
        Ok(line[start..].trim().to_string())
    }

    /// Waits for the process to exit, then collects the rest of its output.
    pub async fn wait_exit(&mut self) -> anyhow::Result<i32> {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .map_err(|_| {
                anyhow!(
                    "the CLI did not exit; output so far:\n{}",
                    self.seen.join("\n")
                )
            })??;
        while let Ok(Some(line)) = tokio::time::timeout(DEADLINE, self.lines.recv()).await {
            self.seen.push(line);
        }
        status.code().context("killed by a signal")
    }

    /// All output seen, joined.
    pub fn output(&self) -> String {
        self.seen.join("\n")
    }
}

/// Runs a command to completion; returns its exit code and output.
pub async fn run_to_end(cmd: Command) -> anyhow::Result<(i32, String)> {
    let mut cli = Cli::spawn(cmd)?;
    let code = cli.wait_exit().await?;
    Ok((code, cli.output()))
}

/// Unix permission bits of a file.
pub fn mode(path: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}
