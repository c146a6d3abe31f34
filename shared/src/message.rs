//! Messages exchanged after framing, and the checks the host applies to
//! everything a guest sends.
//!
//! JSON field names are camelCase; enums carry a `type` (or `op`) tag, so an
//! unknown tag from a newer peer fails to parse instead of being misread.
//! Everything here is produced by the agent (`airlock-guest`) and consumed
//! by `airlockd`, or the reverse; see the crate docs for the order.

use serde::{Deserialize, Serialize};

use crate::limits::*;
use crate::login::{
    BrowserEvent, BrowserInfo, BrowserSpec, CapturedCredential, InputBatch, LoginEvent, LoginSpec,
};
use crate::restore::{ClockReading, ClockStep, RefreshReport, RefreshSpec};
use crate::SecretBytes;

// ---------------------------------------------------------------- envelopes

/// Any message the guest sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum GuestMessage {
    /// First message on every connection.
    Hello(Hello),
    /// Answer to a [`Request`].
    Response(Response),
    /// Something the guest reports on its own.
    Event(Event),
}

/// Any message the host sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum HostMessage {
    /// The host accepts the agent and sends the VM's configuration.
    Welcome(Welcome),
    /// The host refuses the agent; the connection closes after this.
    Refused(Refused),
    /// An operation for the agent to perform.
    Request(Request),
}

// ---------------------------------------------------------------- handshake

/// How the agent process is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AgentMode {
    /// As `/init` of an initramfs (it mounts, loads modules, reaps).
    Pid1,
    /// As a systemd service inside a full image.
    Service,
    /// As a plain process on the host, over a Unix socket (tests).
    Process,
}

/// The guest's first message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// Must equal [`crate::PROTOCOL_VERSION`] on the host.
    pub protocol_version: u32,
    /// The agent's semantic version (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// GNU build id of the agent binary (lowercase hex).
    pub build_id: String,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// How the agent runs.
    pub mode: AgentMode,
    /// Kernel uptime when the agent's `main` began (ms).
    pub uptime_at_start_ms: u64,
    /// Kernel uptime when this hello was sent (ms).
    pub uptime_at_hello_ms: u64,
    /// 0 for the first connection of this agent process, then +1 for each
    /// reconnection.
    pub connection_seq: u32,
    /// Operations and features this agent supports (see [`capability`]).
    pub capabilities: Vec<String>,
}

/// Names used in [`Hello::capabilities`].
pub mod capability {
    /// `exec` requests.
    pub const EXEC: &str = "exec";
    /// `writeFile` / `readFile` requests.
    pub const FILES: &str = "files";
    /// `status` requests.
    pub const STATUS: &str = "status";
    /// `shutdown` requests.
    pub const SHUTDOWN: &str = "shutdown";
    /// Forwards its own log lines as [`crate::Event::Log`].
    pub const LOGS: &str = "logs";
    /// Runs Xvfb and Chromium, logins, input and screenshots.
    pub const BROWSER: &str = "browser";
    /// Runs the WebRTC screen streamer (the live view).
    pub const STREAM: &str = "stream";
    /// Survives a snapshot and takes a refresh as a restored copy.
    pub const SNAPSHOT: &str = "snapshot";
}

/// The host's acceptance of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Welcome {
    /// The host's id for this VM.
    pub vm_id: String,
    /// What the agent should apply before it reports [`Event::Ready`].
    pub config: GuestConfig,
}

/// Per-VM settings the host sends after the hello (no disk mounting, no
/// shell parsing: the config is typed and travels over the channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestConfig {
    /// Interval between [`Event::Heartbeat`]s; 0 disables them.
    pub heartbeat_interval_ms: u64,
    /// Lowest level of log lines forwarded: `error` `warn` `info` `debug`.
    pub log_level: String,
    /// Hostname to set inside the VM (PID 1 mode only).
    pub hostname: Option<String>,
    /// The vsock port of the host's egress gateway, when this VM's traffic
    /// may leave through it (see [`crate::egress`]); the agent then runs
    /// its local proxies and points Chromium, logins, the streamer and
    /// commands at them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_port: Option<u32>,
}

/// The host's refusal of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refused {
    /// Why, in words an operator can act on.
    pub reason: String,
}

// ---------------------------------------------------------------- requests

/// A request from the host; answered by a [`Response`] with the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// Chosen by the host, unique among its outstanding requests.
    pub id: u64,
    /// What to do.
    pub op: Operation,
}

/// Operations the agent performs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "camelCase")]
pub enum Operation {
    /// Run a command to completion.
    Exec(ExecRequest),
    /// Write a file atomically.
    WriteFile(WriteFileRequest),
    /// Read a file.
    ReadFile(ReadFileRequest),
    /// Report the agent's and the VM's state.
    Status,
    /// Stop the VM (PID 1 / service) or the agent (process mode).
    Shutdown,
    /// Start the virtual display and Chromium.
    StartBrowser(BrowserSpec),
    /// Stop Chromium and the display.
    StopBrowser,
    /// Run a CLI's login; progress comes as events.
    StartLogin(LoginSpec),
    /// Stop a running login (kills the CLI).
    CancelLogin {
        /// The session whose login to stop.
        session_id: String,
    },
    /// Inject input into the display.
    Input(InputBatch),
    /// Take a PNG of the display.
    Screenshot,
    /// Start (or keep) the screen streamer and supervise it.
    StreamStart(crate::stream::StreamSpec),
    /// Stop the streamer.
    StreamStop,
    /// Relay a viewer's signal to the streamer.
    StreamSignal(crate::stream::ViewerSignal),
    /// Set which viewer's input is injected (`None`: nobody's).
    StreamControl {
        /// The controlling viewer.
        viewer_id: Option<String>,
    },
    /// A snapshot of this VM follows: its connection to the host is about
    /// to break, so dial again quickly until a restored copy connects.
    PrepareSnapshot,
    /// Make this restored copy its own (first request on its connection).
    Refresh(RefreshSpec),
    /// Step the wall clock (restored VMs), and read it.
    Clock(ClockStep),
    /// The host has stored this session's credential: the agent may
    /// forget it (until then it sends it again on every connection).
    AckCredential {
        /// The session whose credential is stored.
        session_id: String,
    },
}

/// Run `argv` with a deadline and bounded output capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, `NAME=value`; added to the agent's base env.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Killed (with its process group) after this long.
    pub timeout_ms: u64,
    /// Bytes of stdout/stderr kept, each; the rest is counted and dropped.
    #[serde(default = "default_output_cap")]
    pub max_output_bytes: u32,
}

fn default_output_cap() -> u32 {
    DEFAULT_EXEC_OUTPUT_BYTES
}

/// Write `contents` to `path` through a temporary file and a rename.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteFileRequest {
    /// Absolute path.
    pub path: String,
    /// Permission bits of the new file (e.g. `0o600`).
    pub mode: u32,
    /// Create missing parent directories (mode 0700).
    #[serde(default)]
    pub create_parents: bool,
    /// The bytes (base64 on the wire, redacted in `Debug`).
    pub contents: SecretBytes,
}

/// Read a file of at most `max_bytes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadFileRequest {
    /// Absolute path.
    pub path: String,
    /// A larger file is refused with [`ErrorCode::TooLarge`].
    pub max_bytes: u32,
}

// ---------------------------------------------------------------- responses

/// The guest's answer to the request with the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// Id of the request answered.
    pub id: u64,
    /// Success or failure.
    pub result: Outcome,
}

/// Result of an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// The operation succeeded.
    Ok(Reply),
    /// It failed.
    Error(ErrorReply),
}

/// Successful results, one per [`Operation`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Reply {
    /// The command ran (whatever its exit status).
    Exec(ExecResult),
    /// The file was written and synced.
    FileWritten(FileWritten),
    /// The file's contents.
    File(FileContents),
    /// The agent's state.
    Status(StatusReport),
    /// Shutdown has begun; the connection will close.
    ShuttingDown,
    /// The display and Chromium run.
    BrowserStarted(BrowserInfo),
    /// The operation was carried out (stop, cancel, input).
    Done,
    /// The login runs.
    LoginStarted,
    /// A screenshot.
    Screenshot(Screenshot),
    /// The restored copy is its own.
    Refreshed(RefreshReport),
    /// The wall clock after the step.
    Clock(ClockReading),
}

/// A PNG of the display.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Screenshot {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The PNG (redacted in `Debug`: it may show personal data).
    pub png: SecretBytes,
}

/// How a command ended and what it printed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecResult {
    /// Exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// Terminating signal, when killed.
    pub signal: Option<i32>,
    /// True when the agent killed it at the deadline.
    pub timed_out: bool,
    /// Captured stdout (at most the requested cap).
    #[serde(with = "crate::b64")]
    pub stdout: Vec<u8>,
    /// Captured stderr (at most the requested cap).
    #[serde(with = "crate::b64")]
    pub stderr: Vec<u8>,
    /// Bytes of stdout dropped past the cap.
    pub stdout_dropped: u64,
    /// Bytes of stderr dropped past the cap.
    pub stderr_dropped: u64,
    /// Wall time from spawn to exit.
    pub duration_ms: u64,
}

/// Confirmation of a write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileWritten {
    /// Bytes written.
    pub bytes: u64,
    /// SHA-256 of what was written (lowercase hex): the writer's check
    /// that the agent wrote what it was sent, with nothing read back.
    pub sha256: String,
}

/// A file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileContents {
    /// Permission bits of the file.
    pub mode: u32,
    /// The bytes (redacted in `Debug`).
    pub contents: SecretBytes,
}

/// Snapshot of the agent and its VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// Kernel uptime (ms).
    pub uptime_ms: u64,
    /// Resident set size of the agent (KiB).
    pub agent_rss_kib: u64,
    /// `MemTotal` (KiB).
    pub mem_total_kib: u64,
    /// `MemAvailable` (KiB).
    pub mem_available_kib: u64,
    /// 1-minute load average.
    pub load_1m: f64,
    /// Commands currently running under `exec`.
    pub running_commands: u32,
    /// Log lines dropped because the channel to the host was full or down.
    pub dropped_log_lines: u64,
}

/// A failed operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorReply {
    /// Category, for programs.
    pub code: ErrorCode,
    /// Explanation, for people.
    pub message: String,
}

/// Categories of [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCode {
    /// The request was invalid (bad path, empty argv, limits exceeded).
    BadRequest,
    /// The file or program does not exist.
    NotFound,
    /// The guest refused access.
    PermissionDenied,
    /// The file is larger than allowed.
    TooLarge,
    /// The agent does not know this operation.
    Unsupported,
    /// Any other I/O failure.
    Io,
    /// The agent is busy (too many concurrent requests).
    Busy,
    /// The VM ran out of memory doing it (the browser could not start).
    OutOfMemory,
}

// ---------------------------------------------------------------- events

/// Unsolicited reports from the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum Event {
    /// The agent applied the [`Welcome`] config and serves requests.
    Ready(Ready),
    /// A log line of the agent.
    Log(LogLine),
    /// Periodic sign of life.
    Heartbeat(Heartbeat),
    /// A process the agent did not start under `exec` was reaped (PID 1).
    ProcessExit(ProcessExit),
    /// Progress of a login.
    Login(LoginEvent),
    /// The credential a login produced.
    Credential(CapturedCredential),
    /// The display or browser changed state.
    Browser(BrowserEvent),
    /// The live view: streamer state, viewer signals, fallback frames.
    Stream(crate::stream::StreamEvent),
}

/// Sent once per connection after the config is applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// Kernel uptime at that moment (ms).
    pub uptime_ms: u64,
}

/// Severity of a [`LogLine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something looks wrong.
    Warn,
    /// Normal operation.
    Info,
    /// Detail for debugging.
    Debug,
}

/// One log line of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    /// Severity.
    pub level: LogLevel,
    /// Kernel uptime when logged (ms).
    pub uptime_ms: u64,
    /// Module that logged it.
    pub target: String,
    /// The formatted message with its fields.
    pub message: String,
}

/// Target prefix of [`LogLine`]s that carry a line of a program's error
/// output (`airlock_guest::output::chromium`); the host keeps each
/// program's lines in a file of its own.
pub const OUTPUT_TARGET_PREFIX: &str = "airlock_guest::output::";

/// The programs whose output the host keeps apart.
pub const OUTPUT_PROGRAMS: [&str; 3] = ["xvfb", "chromium", "streamer"];

/// Periodic liveness report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// Increments per heartbeat on a connection.
    pub seq: u64,
    /// Kernel uptime (ms).
    pub uptime_ms: u64,
}

/// A reaped process that was not started by `exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessExit {
    /// Its pid.
    pub pid: i32,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal, when killed.
    pub signal: Option<i32>,
}

// ---------------------------------------------------------------- validation

/// A message from a guest that parses but breaks the protocol's bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {problem}")]
pub struct InvalidMessage {
    /// Which field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

pub(crate) fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), InvalidMessage> {
    if s.len() > max {
        return Err(InvalidMessage {
            field,
            problem: format!("{} bytes, at most {max} allowed", s.len()),
        });
    }
    Ok(())
}

pub(crate) fn check_token(field: &'static str, s: &str) -> Result<(), InvalidMessage> {
    check_len(field, s, MAX_SHORT_STRING)?;
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._+".contains(&b));
    if !ok {
        return Err(InvalidMessage {
            field,
            problem: "must be non-empty ASCII letters, digits or -._+".into(),
        });
    }
    Ok(())
}

impl Hello {
    /// Checks the bounds the host enforces on a hello (it comes from an
    /// untrusted guest and ends up in logs and API responses).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        check_token("agentVersion", &self.agent_version)?;
        check_token("buildId", &self.build_id)?;
        check_token("bootId", &self.boot_id)?;
        if self.capabilities.len() > MAX_CAPABILITIES {
            return Err(InvalidMessage {
                field: "capabilities",
                problem: format!(
                    "{} entries, at most {MAX_CAPABILITIES}",
                    self.capabilities.len()
                ),
            });
        }
        for c in &self.capabilities {
            check_token("capabilities", c)?;
        }
        if self.uptime_at_hello_ms < self.uptime_at_start_ms {
            return Err(InvalidMessage {
                field: "uptimeAtHelloMs",
                problem: "earlier than uptimeAtStartMs".into(),
            });
        }
        Ok(())
    }
}

impl LogLine {
    /// Checks the bounds the host enforces on a forwarded log line.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        check_len("target", &self.target, MAX_SHORT_STRING)?;
        check_len("message", &self.message, MAX_LOG_MESSAGE_BYTES)
    }
}

impl ExecResult {
    /// Checks that the captured output respects the cap that was asked for.
    pub fn validate(&self, cap: u32) -> Result<(), InvalidMessage> {
        for (field, out) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if out.len() > cap as usize {
                return Err(InvalidMessage {
                    field,
                    problem: format!("{} bytes, the request allowed {cap}", out.len()),
                });
            }
        }
        Ok(())
    }
}

impl ExecRequest {
    /// Checks an exec request against the protocol limits (both sides).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(InvalidMessage {
                field: "argv",
                problem: "must name a program".into(),
            });
        }
        if self.argv.len() > MAX_ARGV || self.env.len() > MAX_ENV {
            return Err(InvalidMessage {
                field: "argv",
                problem: format!("at most {MAX_ARGV} arguments and {MAX_ENV} variables"),
            });
        }
        for a in self.argv.iter().chain(self.env.iter()) {
            check_len("argv", a, MAX_ARG_BYTES)?;
            if a.contains('\0') {
                return Err(InvalidMessage {
                    field: "argv",
                    problem: "contains a NUL byte".into(),
                });
            }
        }
        if let Some(bad) = self
            .env
            .iter()
            .find(|e| !e.contains('=') || e.starts_with('='))
        {
            return Err(InvalidMessage {
                field: "env",
                problem: format!("{bad:?} is not NAME=value"),
            });
        }
        if self.max_output_bytes > MAX_EXEC_OUTPUT_BYTES {
            return Err(InvalidMessage {
                field: "maxOutputBytes",
                problem: format!("at most {MAX_EXEC_OUTPUT_BYTES}"),
            });
        }
        if let Some(cwd) = &self.cwd {
            check_path("cwd", cwd)?;
        }
        Ok(())
    }
}

/// Checks that `path` is absolute, bounded and free of NUL bytes.
pub fn check_path(field: &'static str, path: &str) -> Result<(), InvalidMessage> {
    check_len(field, path, MAX_PATH_BYTES)?;
    if !path.starts_with('/') || path.contains('\0') {
        return Err(InvalidMessage {
            field,
            problem: "must be an absolute path without NUL bytes".into(),
        });
    }
    Ok(())
}

impl WriteFileRequest {
    /// Checks a write request against the protocol limits.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        check_path("path", &self.path)?;
        if self.path.ends_with('/') {
            return Err(InvalidMessage {
                field: "path",
                problem: "names a directory".into(),
            });
        }
        if self.mode > 0o7777 {
            return Err(InvalidMessage {
                field: "mode",
                problem: format!("{:o} is not a permission mode", self.mode),
            });
        }
        if self.contents.len() > MAX_FILE_BYTES as usize {
            return Err(InvalidMessage {
                field: "contents",
                problem: format!("{} bytes, at most {MAX_FILE_BYTES}", self.contents.len()),
            });
        }
        Ok(())
    }
}

impl ReadFileRequest {
    /// Checks a read request against the protocol limits.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        check_path("path", &self.path)?;
        if self.max_bytes > MAX_FILE_BYTES {
            return Err(InvalidMessage {
                field: "maxBytes",
                problem: format!("at most {MAX_FILE_BYTES}"),
            });
        }
        Ok(())
    }
}

impl ErrorReply {
    /// Convenience constructor.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Extracts the request id from a payload that failed to parse as a
/// [`HostMessage`], so the agent can answer "unsupported" instead of
/// dropping the connection when a newer host sends an unknown operation.
pub fn salvage_request_id(payload: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        kind: String,
        id: u64,
    }
    let probe: Probe = serde_json::from_slice(payload).ok()?;
    (probe.kind == "request").then_some(probe.id)
}
