//! Harness for airlock's end-to-end tests and benches.
//!
//! It finds the built artifacts (`make build image` puts them in `build/`),
//! starts a real `airlockd` per test with its own config and directories in
//! a temp dir, talks to its HTTP API, and cleans up even when a test fails:
//! dropping a [`Daemon`] sends SIGTERM (airlockd then tears its VMs down),
//! kills anything still naming the test's directory, and, when the test is
//! panicking, prints airlockd's log and every VM's console tail.
//!
//! Nothing here sleeps to synchronise: it waits for airlockd's "listening"
//! line, for process exit, or long-polls the API, always with a deadline.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub mod cdp;
pub mod coturn;
pub mod fake_guest;
pub mod live;
pub mod login;
pub mod netem;
pub mod netns;
pub mod peer;
pub mod postgres;
pub mod stats;
pub mod vendors;

/// Paths of the artifacts `make build image` produces.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `build/` in the checkout (or `$AIRLOCK_BUILD_DIR`).
    pub build_dir: PathBuf,
    /// The static agent.
    pub guest_bin: PathBuf,
    /// airlockd (`$AIRLOCK_DAEMON`, else `build/bin/airlockd`).
    pub airlockd_bin: PathBuf,
    /// The live view's streamer (beside the agent, where it looks).
    pub streamer_bin: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Test initramfs.
    pub initramfs: PathBuf,
    /// The image script (for variants such as a stale agent).
    pub image_script: PathBuf,
    /// The fake CLI under the demo provider's name (`airlock-demo-cli`).
    pub fakes_dir: PathBuf,
    /// The checkout.
    pub repo: PathBuf,
}

/// Locates the artifacts; fails with the command that builds them.
pub fn artifacts() -> Result<Artifacts> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repo root")?
        .to_path_buf();
    let build_dir = std::env::var_os("AIRLOCK_BUILD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("build"));
    // `make test` runs the airlockd of its own (debug) build, which shares
    // its compiled dependencies with the tests.
    let airlockd_bin = std::env::var_os("AIRLOCK_DAEMON")
        .map(PathBuf::from)
        .unwrap_or_else(|| build_dir.join("bin/airlockd"));
    let a = Artifacts {
        guest_bin: build_dir.join("bin/airlock-guest"),
        airlockd_bin,
        streamer_bin: build_dir.join("bin/airlock-streamer"),
        kernel: build_dir.join("image/vmlinuz"),
        initramfs: build_dir.join("image/initramfs.cpio.gz"),
        image_script: repo.join("image/build-initramfs.sh"),
        fakes_dir: build_dir.join("fakes"),
        build_dir,
        repo,
    };
    for p in [
        &a.guest_bin,
        &a.airlockd_bin,
        &a.streamer_bin,
        &a.kernel,
        &a.initramfs,
    ] {
        if !p.exists() {
            bail!(
                "{} is missing: run `make build image` (or `make test`) first",
                p.display()
            );
        }
    }
    reachable_by_others(a)
}

/// True when every directory from `p` up is searchable by others.
fn searchable_by_others(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    p.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// The host-process browser's agent runs as an unprivileged account
/// (`vm.unsafe_host_browser_user`), which must reach the agent, the
/// streamer and the fake CLI. When the checkout is out of its reach (a
/// home directory), they are staged once under /tmp, named by their
/// content, and the artifacts point there.
fn reachable_by_others(mut a: Artifacts) -> Result<Artifacts> {
    if searchable_by_others(&a.fakes_dir) && searchable_by_others(&a.build_dir.join("bin")) {
        return Ok(a);
    }
    let fake_cli = a.build_dir.join("bin/fake-cli");
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    for f in [&a.guest_bin, &a.streamer_bin, &fake_cli] {
        sha2::Digest::update(&mut hasher, std::fs::read(f)?);
    }
    let digest = sha2::Digest::finalize(hasher);
    let stamp: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let dest = std::env::temp_dir().join(format!("airlock-build-{stamp}"));
    if !dest.join("fakes").is_dir() {
        // Unique per caller: two tests of one binary may stage at once.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("airlock-build-{stamp}."))
            .tempdir_in(std::env::temp_dir())?
            .keep();
        std::fs::create_dir_all(tmp.join("bin"))?;
        std::fs::create_dir_all(tmp.join("fakes"))?;
        for f in [&a.guest_bin, &a.streamer_bin, &fake_cli] {
            std::fs::copy(f, tmp.join("bin").join(f.file_name().context("name")?))?;
        }
        std::os::unix::fs::symlink(
            "../bin/fake-cli",
            tmp.join("fakes").join("airlock-demo-cli"),
        )?;
        use std::os::unix::fs::PermissionsExt;
        for d in [&tmp, &tmp.join("bin"), &tmp.join("fakes")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        // Another test binary may have staged the same build meanwhile.
        if std::fs::rename(&tmp, &dest).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    a.guest_bin = dest.join("bin/airlock-guest");
    a.streamer_bin = dest.join("bin/airlock-streamer");
    a.fakes_dir = dest.join("fakes");
    Ok(a)
}

/// Settings of one airlockd: TOML sections of raw key = value literals.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    sections: BTreeMap<String, BTreeMap<String, String>>,
    /// The network namespace airlockd runs in (`netns::Link`); this
    /// process's own when `None`.
    netns: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

impl Settings {
    /// Defaults for tests: the given backend, quick timeouts, TCG. With
    /// the process backend, browser VMs are host processes, which airlockd
    /// allows only when told it is unsafe.
    pub fn new(backend: &str) -> Self {
        let s = Self::default()
            .set("vm", "backend", &format!("{backend:?}"))
            .set("server", "listen", "\"127.0.0.1:0\"")
            .set("viewer", "listen", "\"127.0.0.1:0\"")
            .set("qemu", "accel", "\"tcg\"")
            .set("vm", "boot_timeout_ms", "60000")
            // Snapshots cost a minute of both cores to make: the tests
            // that are about them turn them on (`tests/snapshots.rs`).
            .set("snapshots", "enabled", "false")
            // Tests check that nothing outlives airlockd; those about
            // restarts (`tests/restart.rs`) turn this on.
            .set("vm", "keep_on_exit", "false")
            // A fixed screen: tests place clicks by the remote page's
            // layout, which a viewer's viewport would change under them.
            // `live_view`'s phone test turns the following on.
            .set("auth", "screen_max_width", "0")
            .set("auth", "screen_max_height", "0");
        match backend {
            "process" => s.set("vm", "unsafe_host_browser", "true"),
            _ => s,
        }
    }

    /// Sets `key = value` in `[section]`; `value` is a TOML literal.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Self {
        self.sections
            .entry(section.into())
            .or_default()
            .insert(key.into(), value.into());
        self
    }

    /// Runs airlockd (and so the browser role) inside network namespace
    /// `ns`: its loopback listeners are then reachable only through
    /// `netns::Forward`.
    pub fn in_netns(mut self, ns: std::sync::Arc<std::os::fd::OwnedFd>) -> Self {
        self.netns = Some(ns);
        self
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (section, keys) in &self.sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }
}

/// A running airlockd and its temp directory.
#[derive(Debug)]
pub struct Daemon {
    pid: i32,
    exited: mpsc::Receiver<ExitStatus>,
    exit: Option<ExitStatus>,
    /// The operator API on TCP: `http://127.0.0.1:PORT` (or https).
    pub base: String,
    /// The viewers' listener (`http://127.0.0.1:PORT`); empty without one.
    pub viewer_base: String,
    /// The operator API's Unix socket.
    pub socket: PathBuf,
    /// The operator token `http` sends (name `tests`).
    pub token: String,
    /// The temp dir holding config, run and state dirs.
    pub dir: tempfile::TempDir,
    /// HTTP client for the operator API (it sends the operator token).
    pub http: reqwest::Client,
    /// HTTP client as a viewer (or anyone) has it: no operator token.
    pub viewer_http: reqwest::Client,
    log: PathBuf,
    netns: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Login sessions started through this harness (printed on failure).
    pub sessions: std::sync::Mutex<Vec<String>>,
    /// Where this airlockd makes its VMs' cgroups (`/health`).
    cgroup_parents: Vec<PathBuf>,
}

/// Starts airlockd on `config`, its log appended to `log`; returns its
/// pid, its exit status (when it comes) and its stdout lines.
#[allow(clippy::type_complexity)]
fn spawn_airlockd(
    config: &Path,
    log: &Path,
    netns: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
) -> Result<(i32, mpsc::Receiver<ExitStatus>, mpsc::Receiver<String>)> {
    let a = artifacts()?;
    let mut command = Command::new(&a.airlockd_bin);
    if let Some(ns) = netns {
        // SAFETY: between fork and exec the closure only calls
        // setns(2), async-signal-safe, on a descriptor opened before.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || netns::enter(&ns));
        }
    }
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = command
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "airlock_host=debug,info")
        // An error it exits with, not 40 lines of its backtrace, is
        // what a failed start's log tail shows (panics keep theirs).
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("start {}", a.airlockd_bin.display()))?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().context("stdout")?;
    let (line_tx, line_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let (exit_tx, exited) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = exit_tx.send(status);
        }
    });
    Ok((pid, exited, line_rx))
}

/// airlockd's stdout up to `airlockd ready`.
fn ready_lines(rx: &mpsc::Receiver<String>) -> Result<Vec<String>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx.recv_timeout(left).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                anyhow!("no `airlockd ready` within 30 s; got {lines:?}")
            }
            mpsc::RecvTimeoutError::Disconnected => {
                anyhow!("airlockd exited; it printed {lines:?}")
            }
        })?;
        if line == "airlockd ready" {
            return Ok(lines);
        }
        lines.push(line);
    }
}

/// The GNU build id of the agent under test (what its hello names).
pub fn guest_build_id() -> Result<String> {
    Ok(airlock_proto::elf::gnu_build_id(&std::fs::read(
        artifacts()?.guest_bin,
    )?)?)
}

/// Resident memory of process `pid` (KiB).
pub fn rss_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// `n` random bytes from the kernel, in hex.
pub fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// `p` as a TOML string, for [`Settings::set`].
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

impl Daemon {
    /// Starts airlockd with `settings` (paths filled in from the
    /// artifacts unless set) and waits for it to listen.
    pub async fn start(settings: Settings) -> Result<Self> {
        Self::start_with(settings, reqwest::Client::builder()).await
    }

    /// As [`Daemon::start`], with a custom HTTP client (TLS roots).
    pub async fn start_with(settings: Settings, client: reqwest::ClientBuilder) -> Result<Self> {
        let a = artifacts()?;
        let dir = tempfile::Builder::new().prefix("al").tempdir_in("/tmp")?;
        // Search-only for others: a host-process browser's agent runs as
        // another account and must reach its socket under run_dir.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )?;
        let mut settings = settings
            .set("paths", "run_dir", &toml_path(&dir.path().join("run")))
            .set("paths", "state_dir", &toml_path(&dir.path().join("state")));
        let state = dir.path().join("state");
        let defaults = [
            ("vm", "kernel", a.kernel.clone()),
            ("vm", "initramfs", a.initramfs.clone()),
            ("vm", "agent_binary", a.guest_bin.clone()),
            (
                "auth",
                "providers_file",
                a.repo.join("config/providers.toml"),
            ),
            ("store", "key_file", state.join("store.keys")),
        ];
        for (section, key, path) in defaults {
            if !settings
                .sections
                .get(section)
                .is_some_and(|s| s.contains_key(key))
            {
                settings = settings.set(section, key, &toml_path(&path));
            }
        }
        if !settings
            .sections
            .get("store")
            .is_some_and(|s| s.contains_key("url"))
        {
            let db = state.join("airlock.db");
            settings = settings.set("store", "url", &format!("\"sqlite://{}\"", db.display()));
        }
        let token = random_hex(32)?;
        if !settings
            .sections
            .get("server")
            .is_some_and(|s| s.contains_key("tokens_file"))
        {
            let file = dir.path().join("operator.tokens");
            std::fs::write(&file, format!("tests {token}\n"))?;
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            settings = settings.set("server", "tokens_file", &toml_path(&file));
        }
        let config = dir.path().join("airlockd.toml");
        std::fs::write(&config, settings.render())?;
        let log = dir.path().join("airlockd.log");
        let mut auth = reqwest::header::HeaderMap::new();
        auth.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse()?,
        );
        let (pid, exited, line_rx) = spawn_airlockd(&config, &log, settings.netns.clone())?;
        let mut daemon = Self {
            sessions: std::sync::Mutex::default(),
            pid,
            exited,
            exit: None,
            base: String::new(),
            viewer_base: String::new(),
            socket: PathBuf::new(),
            token,
            dir,
            http: client.default_headers(auth).build()?,
            viewer_http: reqwest::Client::new(),
            log,
            netns: settings.netns,
            cgroup_parents: Vec::new(),
        };
        daemon.await_ready(line_rx).await?;
        Ok(daemon)
    }

    /// Waits for airlockd's `ready` line and takes its listeners' addresses
    /// from the lines before it.
    async fn await_ready(&mut self, line_rx: mpsc::Receiver<String>) -> Result<()> {
        let lines = tokio::task::spawn_blocking(move || ready_lines(&line_rx)).await?;
        let lines = lines.map_err(|e| {
            anyhow!(
                "airlockd did not start listening ({e}):\n{}",
                self.log_tail(40)
            )
        })?;
        for line in lines {
            let Some(rest) = line.strip_prefix("airlockd listening on ") else {
                continue;
            };
            match rest.split_once(' ') {
                Some((url, "(viewers)")) => self.viewer_base = url.into(),
                Some((url, "(operator)")) => match url.strip_prefix("unix:") {
                    Some(path) => self.socket = path.into(),
                    None => self.base = url.into(),
                },
                _ => bail!("unexpected line from airlockd: {line}"),
            }
        }
        // Best effort: a daemon started to be refused has no /health.
        if let Ok((_, health)) = self.request(reqwest::Method::GET, "/health", None).await {
            self.cgroup_parents = health["cgroupParents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str().map(PathBuf::from))
                .collect();
        }
        Ok(())
    }

    /// Ends this airlockd (`kill -9` when `crash`, else SIGTERM and its
    /// exit awaited) and starts a new one on the same configuration and
    /// directories; its listeners' addresses replace the old ones.
    pub async fn restart(&mut self, crash: bool) -> Result<()> {
        match crash {
            true => self.kill9()?,
            false => self.terminate().map(drop)?,
        }
        self.respawn().await
    }

    /// `kill -9` of airlockd; waits until it is gone.
    pub fn kill9(&mut self) -> Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid), Signal::SIGKILL)?;
        let status = self
            .exited
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("airlockd did not die of SIGKILL within 30 s"))?;
        self.exit = Some(status);
        Ok(())
    }

    /// Starts airlockd again (after [`Daemon::kill9`] or
    /// [`Daemon::terminate`]) on the same configuration and directories.
    pub async fn respawn(&mut self) -> Result<()> {
        ensure!(self.exit.is_some(), "airlockd still runs");
        let config = self.dir.path().join("airlockd.toml");
        let (pid, exited, line_rx) = spawn_airlockd(&config, &self.log, self.netns.clone())?;
        self.pid = pid;
        self.exited = exited;
        self.exit = None;
        self.await_ready(line_rx).await
    }

    /// airlockd's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends a request and returns the status and JSON body (or the body
    /// as a JSON string when it is not JSON).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// `POST /api/vms` expecting 201; returns the VM id.
    pub async fn create_vm(&self, body: Value) -> Result<String> {
        let (status, v) = self
            .request(reqwest::Method::POST, "/api/vms", Some(body))
            .await?;
        if status != 201 {
            bail!("create VM: {status} {v}");
        }
        Ok(v["id"].as_str().context("id")?.to_string())
    }

    /// Long-polls until the VM is in one of `states` (comma-separated, or
    /// `settled`); returns its view then.
    pub async fn wait_state(&self, id: &str, states: &str, timeout: Duration) -> Result<Value> {
        let path = format!(
            "/api/vms/{id}?wait={states}&timeoutMs={}",
            timeout.as_millis()
        );
        let (status, v) = self.request(reqwest::Method::GET, &path, None).await?;
        if status != 200 {
            bail!("wait for {id}: {status} {v}");
        }
        Ok(v)
    }

    /// Creates a VM and waits for it to be ready; fails with its error.
    pub async fn ready_vm(&self, body: Value) -> Result<Value> {
        let id = self.create_vm(body).await?;
        let v = self
            .wait_state(&id, "settled", Duration::from_secs(120))
            .await?;
        if v["state"] != "ready" {
            bail!(
                "VM {id} is {} instead of ready: {}",
                v["state"],
                v["error"].as_str().unwrap_or("")
            );
        }
        Ok(v)
    }

    /// Runs a command in a VM, expecting 200.
    pub async fn exec(&self, id: &str, argv: &[&str]) -> Result<Value> {
        let body = serde_json::json!({ "argv": argv, "timeoutMs": 20000 });
        let (status, v) = self
            .request(
                reqwest::Method::POST,
                &format!("/api/vms/{id}/exec"),
                Some(body),
            )
            .await?;
        if status != 200 {
            bail!("exec {argv:?} in {id}: {status} {v}");
        }
        Ok(v)
    }

    /// `DELETE /api/vms/:id`, expecting 200.
    pub async fn delete_vm(&self, id: &str) -> Result<Value> {
        let (status, v) = self
            .request(reqwest::Method::DELETE, &format!("/api/vms/{id}"), None)
            .await?;
        if status != 200 {
            bail!("delete {id}: {status} {v}");
        }
        Ok(v)
    }

    /// airlockd's `run_dir`.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// airlockd's `state_dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Processes other than airlockd whose command line names this test's
    /// directory (VMMs, device helpers, agents).
    pub fn leftover_processes(&self) -> Vec<String> {
        processes_naming(self.dir.path(), Some(self.pid))
    }

    /// Entries left in `run_dir/vms`.
    pub fn leftover_vm_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.run_dir().join("vms"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// VM cgroups left under this airlockd's cgroup parents, and once it
    /// has exited, the parents themselves.
    pub fn leftover_cgroups(&self) -> Vec<String> {
        let mut left = Vec::new();
        for parent in &self.cgroup_parents {
            let Ok(entries) = std::fs::read_dir(parent) else {
                continue;
            };
            left.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("vm-"))
                    .map(|e| e.path().display().to_string()),
            );
            if self.exit.is_some() {
                left.push(parent.display().to_string());
            }
        }
        left
    }

    /// The last `n` lines of airlockd's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), n)
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("{}/metrics", self.base);
        Ok(self.http.get(url).send().await?.text().await?)
    }

    /// Sends SIGTERM and waits (up to 60 s) for airlockd to exit.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.exit {
            return Ok(s);
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        let status = self
            .exited
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow!("airlockd did not exit within 60 s of SIGTERM"))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Prints airlockd's log and the tails of every VM's logs (running or
    /// failed: VMM, agent, console, the browser's programs), for a failing
    /// test.
    pub fn print_diagnostics(&self) {
        eprintln!(
            "==== airlockd log (last 60 lines) ====\n{}",
            self.log_tail(60)
        );
        for dir in [
            self.run_dir().join("vms"),
            self.state_dir().join("failed-vms"),
        ] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                for (log, lines) in [
                    ("error.txt", 5),
                    ("vmm.log", 10),
                    ("vhost.log", 5),
                    ("agent.log", 15),
                    ("console.log", 30),
                    ("xvfb.log", 10),
                    ("chromium.log", 20),
                    ("streamer.log", 30),
                ] {
                    if let Ok(text) = std::fs::read(entry.path().join(log)) {
                        eprintln!(
                            "==== {log} of {} (last {lines} lines) ====\n{}",
                            entry.path().display(),
                            tail(&String::from_utf8_lossy(&text), lines)
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_diagnostics();
        }
        if self.terminate().is_err() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        // Backstop: nothing of this test may outlive it, nor anything
        // those processes started (with `vm.keep_on_exit` airlockd leaves
        // its VMs running, and a host-process agent's Chromium and login
        // CLI name no directory of the test).
        let roots: Vec<i32> = processes_naming(self.dir.path(), None)
            .iter()
            .filter_map(|line| line.split_whitespace().next()?.parse().ok())
            .collect();
        for pid in with_descendants(&roots) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `roots` and every process below them.
fn with_descendants(roots: &[i32]) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut all = roots.to_vec();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|(pid, ppid)| *ppid == parent && !all.contains(pid))
                .map(|(pid, _)| *pid)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    all
}

/// Runs a test body against a fresh airlockd. When the body fails (an
/// error or a panic) its sessions, airlockd's log and the VMs' consoles
/// are printed; in every case the daemon and its VMs are torn down.
pub async fn with_daemon(
    settings: Settings,
    body: impl AsyncFnOnce(&mut Daemon) -> Result<()>,
) -> Result<()> {
    let mut d = Daemon::start(settings).await?;
    let result = body(&mut d).await;
    if result.is_err() {
        d.print_sessions().await;
        d.print_diagnostics();
    }
    result
}

/// A golden image `make image` built (`browser` or `cli`).
pub fn golden_image(kind: &str) -> Result<PathBuf> {
    let dir = artifacts()?.build_dir.join("images").join(kind);
    anyhow::ensure!(
        dir.join("manifest.json").is_file(),
        "{} is missing: run `make image`",
        dir.display()
    );
    Ok(dir)
}

/// `pid cmdline` of every process whose command line contains `needle`.
pub fn processes_naming(needle: &Path, except: Option<i32>) -> Vec<String> {
    let needle = needle.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if Some(pid) == except || pid == std::process::id() as i32 {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(&needle) {
            found.push(format!("{pid} {cmd}"));
        }
    }
    found
}

/// Last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Builds an initramfs whose agent has a different GNU build id than the
/// current build (as an image built from older agent code would); returns
/// its path.
pub fn stale_image(out: &Path) -> Result<PathBuf> {
    let a = artifacts()?;
    let mut bytes = std::fs::read(&a.guest_bin)?;
    let id = airlock_proto::elf::gnu_build_id(&bytes)?;
    let raw: Vec<u8> = (0..id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&id[i..i + 2], 16))
        .collect::<Result<_, _>>()?;
    let at = bytes
        .windows(raw.len())
        .position(|w| w == raw)
        .context("build id bytes not found")?;
    for b in &mut bytes[at..at + raw.len()] {
        *b ^= 0xff;
    }
    let agent = out.join("stale-agent");
    std::fs::write(&agent, &bytes)?;
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let status = Command::new(&a.image_script)
        .args([
            "--agent",
            agent.to_str().context("path")?,
            "--out",
            out.to_str().context("path")?,
            "--name",
            "stale",
        ])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("image script failed: {status}");
    }
    Ok(out.join("stale.cpio.gz"))
}
