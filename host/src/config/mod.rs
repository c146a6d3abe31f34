//! airlockd's configuration: a TOML file whose every key has a default.
//!
//! Loaded once by `main` (`airlockd --config PATH`); `--print-config` prints
//! the effective result. Relative paths are resolved against the directory
//! of the config file, so a config can live next to the files it names.
//! Unknown keys are errors: a typo must not silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod listen;
mod vmm;

pub use listen::{ServerConfig, ViewerConfig};
pub use vmm::{
    AccelChoice, CgroupMode, FirecrackerConfig, JailerConfig, QemuConfig, SnapshotsConfig,
};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause (names the key and line).
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The operator API's listeners.
    pub server: ServerConfig,
    /// The viewers' listener.
    pub viewer: ViewerConfig,
    /// Where airlockd keeps files.
    pub paths: PathsConfig,
    /// VM sizes, limits and timeouts.
    pub vm: VmConfig,
    /// The QEMU backend.
    pub qemu: QemuConfig,
    /// The Firecracker backend.
    pub firecracker: FirecrackerConfig,
    /// Browser VMs restored from snapshots, and the warm pool.
    pub snapshots: SnapshotsConfig,
    /// Login sessions.
    pub auth: AuthConfig,
    /// The encrypted credential store.
    pub store: crate::store::StoreConfig,
    /// The live view of browser VMs (WebRTC, viewer links, TURN).
    pub live: LiveConfig,
    /// What browser VMs may reach (their only way out is the host).
    pub egress: crate::egress::EgressConfig,
    /// Logging of airlockd itself.
    pub log: LogConfig,
}

/// Directories.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PathsConfig {
    /// Sockets and per-VM working files (`<run_dir>/vms/<id>/`); removed
    /// when a VM stops. Keep it short: Unix socket paths are limited to
    /// 107 bytes.
    pub run_dir: PathBuf,
    /// Durable state: logs of failed VMs (`<state_dir>/failed-vms/<id>/`)
    /// and the acceleration probe's cached result.
    pub state_dir: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            run_dir: "/run/airlock".into(),
            state_dir: "/var/lib/airlock".into(),
        }
    }
}

/// Which VM backend runs VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// QEMU with vhost-device-vsock (real microVMs).
    Qemu,
    /// The agent as a plain host process over a Unix socket (tests of the
    /// host logic, and roles that need no isolation in development).
    Process,
    /// Firecracker (KVM only), optionally under its jailer.
    Firecracker,
}

/// VM settings shared by all backends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// Backend: `qemu`, `firecracker` or `process`.
    pub backend: BackendKind,
    /// Backend of browser VMs, when it differs from `backend` (`process`
    /// runs the browser role on this host: development and CI, until the
    /// golden image carries Chromium).
    pub browser_backend: Option<BackendKind>,
    /// Guest kernel (a Debian cloud kernel; `make image` copies one here).
    pub kernel: PathBuf,
    /// Initramfs with the agent as `/init` (`make image`).
    pub initramfs: PathBuf,
    /// Golden image of browser VMs (a directory made by `make image`:
    /// kernel, stage-1 initrd, read-only squashfs layers, manifest). Unset:
    /// browser VMs boot `kernel` + `initramfs` like the test VMs.
    pub browser_image: Option<PathBuf>,
    /// Golden image of CLI VMs (systemd starts the agent); each user's VM
    /// gets a persistent home disk. Unset: `kernel` + `initramfs`.
    pub cli_image: Option<PathBuf>,
    /// Memory of a browser VM when the request names none (MiB). Measured
    /// under TCG: 768 MiB paints the demo's login page, 512 MiB never does;
    /// with a real vendor CLI beside Chromium the guest uses 480-700 MiB
    /// at the sign-in page, and in 1024 MiB Claude Code's logins stalled.
    pub browser_memory_mib: u32,
    /// vCPUs of a browser VM when the request names none.
    pub browser_vcpus: u32,
    /// Size of a user's persistent home disk (MiB; a sparse file, so it
    /// takes only what is written).
    pub home_disk_mib: u64,
    /// Allow browser VMs on the `process` backend: Chromium then runs on
    /// this host, sharing its network. For fast tests only; airlockd
    /// refuses that backend for browser VMs unless this is set.
    pub unsafe_host_browser: bool,
    /// The account such a host-process browser runs as (when airlockd runs
    /// as root), with an empty environment: it must not reach airlockd's
    /// keys, database or secrets.
    pub unsafe_host_browser_user: String,
    /// Gives such a host-process browser what a browser VM has: its own
    /// network namespace with only loopback (out only through the egress
    /// gateway) and its own mounts (its own Chromium policy directory).
    /// Needs airlockd to run as root.
    pub unsafe_host_browser_isolated: bool,
    /// With isolation: a tree mounted read-only over /usr/local in the
    /// browser's mount namespace (an image's vendor layer, unpacked), so a
    /// login runs the image's CLIs and Node.js.
    pub unsafe_host_browser_usr_local: Option<PathBuf>,
    /// The agent build the host expects: its GNU build id must match the
    /// one a guest reports. The process backend also runs this binary.
    pub agent_binary: PathBuf,
    /// Overrides the build id read from `agent_binary`.
    pub expected_build_id: Option<String>,
    /// vsock port the agent dials (host side listens on `<uds>_<port>`).
    pub agent_port: u32,
    /// Memory of a VM when the request names none (MiB). The vendor CLIs
    /// need room: Claude Code (a Bun binary) dies of SIGSEGV at start in a
    /// 256 MiB VM.
    pub default_memory_mib: u32,
    /// vCPUs of a VM when the request names none.
    pub default_vcpus: u32,
    /// Largest memory a request may ask for (MiB).
    pub max_memory_mib: u32,
    /// Most vCPUs a request may ask for.
    pub max_vcpus: u32,
    /// Most VMs booting or running at once (failed ones do not count).
    pub max_vms: usize,
    /// How long a failed VM stays listed with its error before airlockd
    /// forgets it (ms); its logs stay under `failed-vms/`.
    pub failed_vm_keep_ms: u64,
    /// From VMM start to the agent's ready event (ms).
    pub boot_timeout_ms: u64,
    /// From a guest connection to its hello (ms).
    pub hello_timeout_ms: u64,
    /// From welcome to the agent's ready event (ms).
    pub ready_timeout_ms: u64,
    /// A ready VM whose agent disconnected fails after this long without a
    /// reconnection (ms).
    pub reconnect_timeout_ms: u64,
    /// Time a VM gets to power off after a shutdown request before it is
    /// killed (ms).
    pub stop_grace_ms: u64,
    /// Default deadline of an exec request (ms).
    pub exec_timeout_ms: u64,
    /// Margin on top of a request's own deadline before the host gives up
    /// on the agent's answer (ms).
    pub request_margin_ms: u64,
    /// Interval of agent heartbeats (ms; 0 disables them).
    pub heartbeat_interval_ms: u64,
    /// Lowest level of agent log lines forwarded to the host.
    pub guest_log_level: String,
    /// Largest frame accepted from a guest (bytes).
    pub max_frame_bytes: usize,
    /// Console bytes kept on disk per VM; the rest is dropped and counted.
    pub console_max_bytes: u64,
    /// Agent log bytes kept on disk per VM.
    pub agent_log_max_bytes: u64,
    /// Console lines included in a failed VM's error.
    pub console_tail_lines: usize,
    /// Guest log lines per second echoed into airlockd's own log, per VM
    /// (all of them still go to the VM's agent log file).
    pub guest_log_rate_per_sec: u32,
    /// Log directories of failed VMs kept; the oldest beyond are deleted.
    pub failed_logs_keep: usize,
    /// VMs keep running when airlockd exits (SIGTERM, a crash), and the
    /// next airlockd takes them over: users' CLI VMs and the browser VMs
    /// of logins in progress. Off: airlockd stops every VM on SIGTERM.
    pub keep_on_exit: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Qemu,
            browser_backend: None,
            kernel: "/var/lib/airlock/image/vmlinuz".into(),
            initramfs: "/var/lib/airlock/image/initramfs.cpio.gz".into(),
            browser_image: None,
            cli_image: None,
            browser_memory_mib: 1536,
            browser_vcpus: 2,
            home_disk_mib: 4096,
            unsafe_host_browser: false,
            unsafe_host_browser_user: "nobody".into(),
            unsafe_host_browser_isolated: false,
            unsafe_host_browser_usr_local: None,
            agent_binary: "/usr/local/lib/airlock/airlock-guest".into(),
            expected_build_id: None,
            agent_port: airlock_proto::DEFAULT_AGENT_PORT,
            default_memory_mib: 1024,
            default_vcpus: 1,
            max_memory_mib: 8192,
            max_vcpus: 8,
            max_vms: 16,
            failed_vm_keep_ms: 600_000,
            boot_timeout_ms: 30_000,
            hello_timeout_ms: 5_000,
            ready_timeout_ms: 5_000,
            reconnect_timeout_ms: 15_000,
            stop_grace_ms: 3_000,
            exec_timeout_ms: 30_000,
            request_margin_ms: 5_000,
            heartbeat_interval_ms: 5_000,
            guest_log_level: "info".into(),
            max_frame_bytes: airlock_proto::limits::MAX_FRAME_BYTES,
            console_max_bytes: 16 << 20,
            agent_log_max_bytes: 8 << 20,
            console_tail_lines: 30,
            guest_log_rate_per_sec: 20,
            failed_logs_keep: 200,
            keep_on_exit: true,
        }
    }
}

/// Login sessions: providers, the browser, and every wait's deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Provider profiles (see `config/providers.toml`).
    pub providers_file: PathBuf,
    /// Serve the built-in demo OAuth server at `/demo/oauth` and offer the
    /// `demo` provider (development only).
    pub demo: bool,
    /// Where the demo OAuth server listens (its own listener: browser VMs
    /// may be allowed to reach it, never the API). Port 0 picks one.
    pub demo_listen: SocketAddr,
    /// Screen of the browser VM (pixels).
    pub screen_width: u32,
    /// Screen of the browser VM (pixels).
    pub screen_height: u32,
    /// Largest screen a viewer's viewport may ask for (pixels; the screen
    /// follows the controlling viewer's viewport and pixel ratio within
    /// it). 0 keeps the screen at `screen_width` x `screen_height`.
    pub screen_max_width: u32,
    /// Largest screen height a viewer's viewport may ask for (pixels).
    pub screen_max_height: u32,
    /// Chromium binary in the browser VM.
    pub chromium: String,
    /// Extra Chromium flags.
    pub chromium_args: Vec<String>,
    /// Egress proxy for Chromium (`--proxy-server`), if any.
    pub proxy: Option<String>,
    /// Browser VM boot plus Chromium start (ms).
    pub browser_timeout_ms: u64,
    /// For the CLI to print or open its login URL (ms).
    pub url_timeout_ms: u64,
    /// For the person to finish the login; past it the session expires (ms).
    pub user_timeout_ms: u64,
    /// For a provider's status command (ms).
    pub confirm_timeout_ms: u64,
    /// For the user's CLI VM to be ready and take the credential (ms);
    /// past it the credential stays stored and is delivered when the VM
    /// comes up.
    pub delivery_timeout_ms: u64,
    /// Boot the user's CLI VM when a session starts (if they have none),
    /// so it is ready by the time the credential is: delivery then takes
    /// milliseconds instead of a boot.
    pub prestart_cli_vm: bool,
    /// Directories appended to the login's `PATH` inside the browser VM
    /// (development: the demo CLI; relative entries follow this file).
    pub login_path_append: Vec<String>,
    /// Extra environment for every login (development: the fakes' OAuth URL).
    pub login_env: std::collections::BTreeMap<String, String>,
    /// PEM file of CAs browser VMs trust besides the system's: Chromium as
    /// a policy, login CLIs through their profile's `ca_env`. Only for
    /// test stand-ins of the vendors (the vendor sandbox); unset in
    /// production.
    pub extra_ca_file: Option<PathBuf>,
    /// Logins running at once (a session whose credential waits for its
    /// delivery does not count).
    pub max_sessions: usize,
    /// Ended sessions remembered for `GET /api/auth/session/:id`.
    pub ended_sessions_keep: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            providers_file: "/etc/airlock/providers.toml".into(),
            demo: false,
            demo_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            screen_width: 1280,
            screen_height: 720,
            screen_max_width: 1280,
            screen_max_height: 1280,
            chromium: "chromium".into(),
            chromium_args: Vec::new(),
            proxy: None,
            browser_timeout_ms: 240_000,
            url_timeout_ms: 30_000,
            user_timeout_ms: 600_000,
            confirm_timeout_ms: 15_000,
            delivery_timeout_ms: 180_000,
            prestart_cli_vm: true,
            login_path_append: Vec::new(),
            login_env: Default::default(),
            extra_ca_file: None,
            max_sessions: 8,
            ended_sessions_keep: 500,
        }
    }
}

/// A secret string from the config: `Debug` shows only whether it is set,
/// and `--print-config` replaces it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConfigSecret(String);

impl ConfigSecret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself (to compute with it, never to print it).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for ConfigSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.0.is_empty() {
            "unset"
        } else {
            "redacted"
        };
        write!(f, "ConfigSecret(<{shown}>)")
    }
}

/// The live view: how the browser VM's screen is streamed to viewers, who
/// may watch (viewer links), and how their browsers reach the streamer
/// (STUN/TURN).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LiveConfig {
    /// Frames per second captured and encoded.
    pub framerate: u32,
    /// Text the controlling viewer copies in the remote page reaches its
    /// clipboard. Off by default: a login page has little worth copying
    /// out, and a page's text should not leave without the operator's say.
    pub copy_out: bool,
    /// Target video bitrate (kbit/s, CBR).
    pub bitrate_kbps: u32,
    /// Frames per second of the JPEG fallback (viewers whose WebRTC does
    /// not connect).
    pub jpeg_fps: u32,
    /// JPEG quality of the fallback (1-100).
    pub jpeg_quality: u32,
    /// Local addresses the streamer's ICE may use; empty: every interface.
    pub ice_addresses: Vec<String>,
    /// STUN servers (`stun:host:port`) for viewers and the streamer.
    pub stun_urls: Vec<String>,
    /// TURN servers (`turn:host:port?transport=udp`); they need
    /// `turn_secret`.
    pub turn_urls: Vec<String>,
    /// Shared secret of the TURN server (coturn `static-auth-secret`):
    /// airlockd mints short-lived TURN REST credentials from it.
    pub turn_secret: ConfigSecret,
    /// File holding `turn_secret` (read at start; wins over `turn_secret`).
    pub turn_secret_file: Option<PathBuf>,
    /// Lifetime of minted TURN credentials (s).
    pub turn_ttl_secs: u64,
    /// Lifetime of a viewer link's token (ms). Connected viewers are sent a
    /// fresh one before theirs expires.
    pub viewer_token_ttl_ms: u64,
    /// Viewers per session at once (the first one controls the input).
    pub max_viewers: usize,
    /// A viewer's socket with nothing from it, not even a pong to the
    /// pings sent every third of this, is closed after this long (ms): a
    /// viewer that vanished without closing (a phone that lost its
    /// network) frees its place within it.
    pub viewer_idle_ms: u64,
    /// The page falls back to JPEG frames when WebRTC has not connected
    /// within this (ms).
    pub connect_timeout_ms: u64,
    /// `POST /api/webrtc/session/:id/offer` waits this long for the
    /// complete answer before answering `202` (ms).
    pub legacy_answer_wait_ms: u64,
    /// A viewer of the HTTP signalling API whose peer never connected is
    /// dropped after this long without a request (ms).
    pub legacy_idle_ms: u64,
    /// Largest WebSocket message a viewer may send (bytes).
    pub max_message_bytes: usize,
    /// Messages per second a viewer may send over its WebSocket (bursts of
    /// four times that are allowed).
    pub messages_per_sec: u32,
    /// For the agent to start the streamer (ms).
    pub start_timeout_ms: u64,
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            framerate: 30,
            copy_out: false,
            bitrate_kbps: 2500,
            jpeg_fps: 5,
            jpeg_quality: 60,
            ice_addresses: Vec::new(),
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_secret: ConfigSecret::default(),
            turn_secret_file: None,
            turn_ttl_secs: 3600,
            viewer_token_ttl_ms: 900_000,
            max_viewers: 4,
            viewer_idle_ms: 6_000,
            connect_timeout_ms: 5000,
            legacy_answer_wait_ms: 5000,
            legacy_idle_ms: 30_000,
            max_message_bytes: 128 << 10,
            messages_per_sec: 100,
            start_timeout_ms: 100_000,
        }
    }
}

impl LiveConfig {
    fn validate(&self) -> Result<(), String> {
        if !(1..=60).contains(&self.framerate) {
            return Err("live.framerate must be 1-60".into());
        }
        if !(100..=50_000).contains(&self.bitrate_kbps) {
            return Err("live.bitrate_kbps must be 100-50000".into());
        }
        if !(1..=30).contains(&self.jpeg_fps) || !(1..=100).contains(&self.jpeg_quality) {
            return Err("live.jpeg_fps must be 1-30 and live.jpeg_quality 1-100".into());
        }
        let urls_ok = |urls: &[String], schemes: &[&str]| {
            urls.iter().all(|u| {
                schemes.iter().any(|s| u.starts_with(s)) && !u.contains(char::is_whitespace)
            })
        };
        if !urls_ok(&self.stun_urls, &["stun:", "stuns:"]) {
            return Err("live.stun_urls must be stun: or stuns: URLs".into());
        }
        if !urls_ok(&self.turn_urls, &["turn:", "turns:"]) {
            return Err("live.turn_urls must be turn: or turns: URLs".into());
        }
        if !self.turn_urls.is_empty() && self.turn_secret.is_empty() {
            return Err("live.turn_urls need live.turn_secret (or live.turn_secret_file): the TURN server's static-auth-secret".into());
        }
        if self.turn_ttl_secs == 0 || self.viewer_token_ttl_ms == 0 {
            return Err("live.turn_ttl_secs and live.viewer_token_ttl_ms must be positive".into());
        }
        if !(1..=32).contains(&self.max_viewers) {
            return Err("live.max_viewers must be 1-32".into());
        }
        if !(1_000..=600_000).contains(&self.viewer_idle_ms) {
            return Err("live.viewer_idle_ms must be 1000-600000".into());
        }
        if self.max_message_bytes < 4096 || self.messages_per_sec == 0 {
            return Err(
                "live.max_message_bytes must be at least 4096 and live.messages_per_sec positive"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Logging of airlockd.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Filter in `tracing` syntax (`info`, `airlock_host=debug`, ...);
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Longest `run_dir` that leaves room for the per-VM socket names.
const MAX_RUN_DIR_BYTES: usize = 60;

impl Config {
    /// Loads `path`, resolves relative paths against its directory, and
    /// validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        // Absolute, so every resolved path (and the SQLite URL) is too.
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(parent).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        config.resolve_paths(&base);
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.paths.run_dir);
        fix(&mut self.paths.state_dir);
        fix(&mut self.vm.kernel);
        fix(&mut self.vm.initramfs);
        fix(&mut self.vm.agent_binary);
        for p in [
            &mut self.vm.browser_image,
            &mut self.vm.cli_image,
            &mut self.vm.unsafe_host_browser_usr_local,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        fix(&mut self.auth.providers_file);
        if let Some(p) = &mut self.snapshots.dir {
            fix(p);
        }
        if let Some(p) = &mut self.auth.extra_ca_file {
            fix(p);
        }
        // Relative entries are development paths on this host (the fake
        // CLIs for a browser role running as a host process).
        for dir in &mut self.auth.login_path_append {
            if Path::new(dir).is_relative() {
                *dir = base.join(&*dir).display().to_string();
            }
        }
        fix(&mut self.store.key_file);
        if let Some(p) = &mut self.live.turn_secret_file {
            fix(p);
        }
        let e = &mut self.egress;
        for p in e.upstream_proxy_auth_file.iter_mut().chain(
            e.user_proxies
                .values_mut()
                .filter_map(|u| u.auth_file.as_mut()),
        ) {
            fix(p);
        }
        // A relative SQLite path follows the config file like every path.
        if let Some(rest) = self.store.url.strip_prefix("sqlite://") {
            if !rest.starts_with('/') && !rest.is_empty() {
                self.store.url = format!("sqlite://{}", base.join(rest).display());
            }
        }
        for p in [
            &mut self.server.tls_cert,
            &mut self.server.tls_key,
            &mut self.server.socket,
            &mut self.server.tokens_file,
            &mut self.viewer.tls_cert,
            &mut self.viewer.tls_key,
            &mut self.qemu.firmware,
            &mut self.firecracker.kernel,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(j) = &mut self.firecracker.jailer {
            for p in [&mut j.chroot_base, &mut j.netns].into_iter().flatten() {
                fix(p);
            }
        }
    }

    /// Reads secrets kept in files of their own.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.live.turn_secret_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            self.live.turn_secret = ConfigSecret::new(text.trim());
        }
        Ok(())
    }

    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        self.server.validate().map_err(ConfigError::Invalid)?;
        self.viewer.validate().map_err(ConfigError::Invalid)?;
        if self.paths.run_dir.as_os_str().len() > MAX_RUN_DIR_BYTES {
            return bad(format!(
                "paths.run_dir {} is longer than {MAX_RUN_DIR_BYTES} bytes; Unix socket paths under it would not fit",
                self.paths.run_dir.display()
            ));
        }
        let vm = &self.vm;
        if vm.default_memory_mib < 64 || vm.default_memory_mib > vm.max_memory_mib {
            return bad("vm.default_memory_mib must be between 64 and vm.max_memory_mib".into());
        }
        if vm.default_vcpus == 0 || vm.default_vcpus > vm.max_vcpus {
            return bad("vm.default_vcpus must be between 1 and vm.max_vcpus".into());
        }
        if vm.browser_memory_mib < 64 || vm.browser_memory_mib > vm.max_memory_mib {
            return bad("vm.browser_memory_mib must be between 64 and vm.max_memory_mib".into());
        }
        if vm.browser_vcpus == 0 || vm.browser_vcpus > vm.max_vcpus {
            return bad("vm.browser_vcpus must be between 1 and vm.max_vcpus".into());
        }
        let browser_on_host = vm.browser_backend.unwrap_or(vm.backend) == BackendKind::Process;
        if browser_on_host && !vm.unsafe_host_browser {
            return bad("browser VMs would run as host processes (vm.backend or vm.browser_backend is \"process\"), where Chromium shares this host's network: use the qemu backend, or set vm.unsafe_host_browser = true for fast tests".into());
        }
        if vm.unsafe_host_browser_isolated && !browser_on_host {
            return bad("vm.unsafe_host_browser_isolated applies to host-process browsers only: set vm.browser_backend = \"process\" or drop it".into());
        }
        if vm.unsafe_host_browser_usr_local.is_some() && !vm.unsafe_host_browser_isolated {
            return bad("vm.unsafe_host_browser_usr_local is mounted in the browser's own mount namespace: set vm.unsafe_host_browser_isolated = true".into());
        }
        if !(64..=1 << 20).contains(&vm.home_disk_mib) {
            return bad("vm.home_disk_mib must be between 64 and 1048576".into());
        }
        if !(32..=4096).contains(&self.qemu.tcg_tb_size_mib) {
            return bad("qemu.tcg_tb_size_mib must be between 32 and 4096".into());
        }
        if let Some(j) = &self.firecracker.jailer {
            if j.uid == 0 || j.gid == 0 {
                return bad("firecracker.jailer.uid and gid must not be 0: the jailer exists to run Firecracker unprivileged".into());
            }
            if j.cgroup_version.is_some_and(|v| !(1..=2).contains(&v)) {
                return bad("firecracker.jailer.cgroup_version must be 1 or 2".into());
            }
        }
        if vm.max_frame_bytes < 4096
            || vm.max_frame_bytes > airlock_proto::limits::MAX_FRAME_BYTES_CEILING
        {
            return bad("vm.max_frame_bytes must be between 4096 and 16 MiB".into());
        }
        if vm.boot_timeout_ms == 0 || vm.hello_timeout_ms == 0 || vm.ready_timeout_ms == 0 {
            return bad("vm timeouts must be positive".into());
        }
        let a = &self.auth;
        if a.screen_width < 320 || a.screen_height < 240 {
            return bad("auth.screen_width/height must be at least 320x240".into());
        }
        let follows = a.screen_max_width != 0 || a.screen_max_height != 0;
        if follows
            && (a.screen_max_width < a.screen_width
                || a.screen_max_height < a.screen_height
                || a.screen_max_width > 7680
                || a.screen_max_height > 4320)
        {
            return bad(format!(
                "auth.screen_max_width/height ({}x{}) must be at least the screen \
                 ({}x{}) and at most 7680x4320, or both 0 for a fixed screen",
                a.screen_max_width, a.screen_max_height, a.screen_width, a.screen_height
            ));
        }
        if a.user_timeout_ms == 0 || a.url_timeout_ms == 0 || a.browser_timeout_ms == 0 {
            return bad("auth timeouts must be positive".into());
        }
        self.live.validate().map_err(ConfigError::Invalid)?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format must be text or json".into());
        }
        Ok(())
    }

    /// The effective configuration as TOML (for `--print-config`), with
    /// any password in the store URL and the TURN secret replaced.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.store.url = crate::store::redact_url(&shown.store.url);
        if !shown.live.turn_secret.is_empty() {
            shown.live.turn_secret = ConfigSecret::new("(redacted)");
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.server.listen, None, "the operator API on its socket only");
        assert_eq!(
            c.viewer.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 4001)))
        );
        assert_eq!(c.vm.backend, BackendKind::Qemu);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = toml::from_str::<Config>("[vm]\nboot_timeout = 5\n").unwrap_err();
        assert!(e.to_string().contains("boot_timeout"), "{e}");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[vm]\nkernel = \"img/vmlinuz\"\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.vm.kernel, dir.path().join("img/vmlinuz"));
    }

    #[test]
    fn printed_config_parses_back() {
        let c = Config::default();
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.vm.boot_timeout_ms, c.vm.boot_timeout_ms);
    }

    #[test]
    fn the_turn_secret_is_never_shown() {
        let mut c = Config::default();
        c.live.turn_secret = ConfigSecret::new("north-wind");
        c.live.turn_urls = vec!["turn:127.0.0.1:3478".into()];
        c.validate().unwrap();
        assert!(!c.to_toml().contains("north-wind"));
        assert!(!format!("{c:?}").contains("north-wind"));
        c.live.turn_secret = ConfigSecret::default();
        assert!(c.validate().is_err(), "TURN URLs without a secret");
    }

    #[test]
    fn the_turn_secret_comes_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("turn.secret"), "from-file\n").unwrap();
        let path = dir.path().join("c.toml");
        let text =
            "[live]\nturn_urls = [\"turn:127.0.0.1:3478\"]\nturn_secret_file = \"turn.secret\"\n";
        std::fs::write(&path, text).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.live.turn_secret.expose(), "from-file");
    }

    #[test]
    fn a_host_process_browser_needs_the_unsafe_flag() {
        let mut c = Config::default();
        c.vm.browser_backend = Some(BackendKind::Process);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("vm.unsafe_host_browser"), "{e}");
        c.vm.unsafe_host_browser = true;
        c.validate().unwrap();
        c.vm.unsafe_host_browser_usr_local = Some("/v".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("unsafe_host_browser_isolated = true"), "{e}");
        c.vm.unsafe_host_browser_isolated = true;
        c.validate().unwrap();
        c.vm.browser_backend = None;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("host-process browsers only"), "{e}");
    }

    #[test]
    fn a_firecracker_jailer_must_not_run_as_root() {
        let c: Config = toml::from_str(
            "[vm]\nbackend = \"firecracker\"\n[firecracker.jailer]\nuid = 0\ngid = 100\n",
        )
        .unwrap();
        assert_eq!(c.vm.backend, BackendKind::Firecracker);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("firecracker.jailer.uid"), "{e}");
        let c: Config = toml::from_str("[firecracker.jailer]\nuid = 123\ngid = 100\n").unwrap();
        c.validate().unwrap();
        let j = c.firecracker.jailer.unwrap();
        assert_eq!(j.binary, PathBuf::from("jailer"));
    }

    #[test]
    fn half_tls_is_rejected() {
        let mut c = Config::default();
        c.server.tls_cert = Some("/x.pem".into());
        assert!(c.validate().is_err());
    }
}
