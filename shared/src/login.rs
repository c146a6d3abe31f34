//! Messages of the browser role: starting the virtual display and Chromium,
//! running a CLI's login in it, injecting input and taking screenshots, and
//! the events the agent reports while a login runs (including the captured
//! credential). Produced by `airlockd`'s session manager and the agent's
//! `login` and `browser` modules.

use serde::{Deserialize, Serialize};

use crate::limits::{
    cut, MAX_CLI_OUTPUT_TAIL, MAX_DENIAL_DESCRIPTION, MAX_FAILURE_REASON, MAX_PATH_BYTES,
    MAX_SHORT_STRING,
};
use crate::message::{check_len, InvalidMessage};
use crate::SecretBytes;

/// Most input events in one batch.
pub const MAX_INPUT_EVENTS: usize = 512;
/// Longest `text` input event (characters).
pub const MAX_INPUT_TEXT: usize = 4096;
/// Largest credential file the agent captures (bytes).
pub const MAX_CREDENTIAL_BYTES: usize = 256 << 10;
/// Most credential files one login may produce.
pub const MAX_CREDENTIAL_FILES: usize = 8;
/// Largest screenshot (bytes of PNG).
pub const MAX_SCREENSHOT_BYTES: usize = 3 << 20;

/// Start Xvfb and a headful Chromium on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrowserSpec {
    /// Screen width in pixels.
    pub width: u32,
    /// Screen height in pixels.
    pub height: u32,
    /// Largest screen a viewer's [`InputEvent::Viewport`] may ask for
    /// (pixels); 0 keeps the screen at `width` x `height`.
    #[serde(default)]
    pub max_width: u32,
    /// Largest screen height a viewer may ask for (pixels).
    #[serde(default)]
    pub max_height: u32,
    /// Egress proxy for Chromium (`--proxy-server`), if any.
    pub proxy: Option<String>,
    /// Chromium binary; `chromium` on `PATH` when absent.
    pub chromium: Option<String>,
    /// Extra Chromium flags (operator-configured).
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// PEM certificates to trust besides the system's (test stand-ins of
    /// vendors only): given to Chromium as its `CACertificates` policy and
    /// to login CLIs through [`LoginSpec::ca_env`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_ca_pem: Option<String>,
}

/// What the agent started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrowserInfo {
    /// The X display, e.g. `:5`.
    pub display: String,
    /// Chromium's product string, e.g. `Chrome/156.0.8078.79`.
    pub chromium_version: String,
    /// How long Xvfb took to serve its display (ms).
    #[serde(default)]
    pub xvfb_ms: u64,
    /// How long Chromium took from its start to a working DevTools
    /// connection (ms).
    #[serde(default)]
    pub chromium_ms: u64,
}

/// How a CLI's login reaches the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum LoginFlow {
    /// The CLI listens on loopback; the vendor redirects the browser there.
    Loopback,
    /// The vendor shows a code on a hosted page; the CLI asks for it.
    PasteCode {
        /// CSS selector of the element that holds the code on that page.
        code_selector: String,
    },
    /// The CLI prints a verification URL and a user code (RFC 8628).
    DeviceCode,
}

/// How the agent confirms a captured credential works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Confirm {
    /// The login command exits 0.
    ExitCode,
    /// This command exits 0 (run with the login's environment).
    StatusCommand {
        /// Program and arguments.
        argv: Vec<String>,
    },
    /// A valid file is enough.
    File,
}

/// A credential file a login writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialSpec {
    /// Path template, `${VAR}` expanded with the login's environment.
    pub path: String,
    /// JSON pointers (RFC 6901) that must exist with a non-empty value.
    pub required: Vec<String>,
}

/// Text to type when the CLI prints a prompt (a consent question before it
/// opens the browser, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptAnswer {
    /// Substring of the CLI's output (escape sequences removed) to wait for.
    pub when: String,
    /// What to type, once.
    pub send: String,
}

/// Run one provider's login.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginSpec {
    /// The host's session id (names the login in events).
    pub session_id: String,
    /// Provider name, for messages.
    pub provider: String,
    /// The login command.
    pub argv: Vec<String>,
    /// Environment, in order, `NAME=value` with `${VAR}` expanded against
    /// what precedes it (the agent sets `HOME`, `DISPLAY`, `BROWSER`,
    /// `PATH`, `TERM` first).
    pub env: Vec<String>,
    /// How the user is reached.
    pub flow: LoginFlow,
    /// Prompts of the CLI to answer.
    #[serde(default)]
    pub answers: Vec<PromptAnswer>,
    /// Files that together are the credential.
    pub credentials: Vec<CredentialSpec>,
    /// How the capture is confirmed.
    pub confirm: Confirm,
    /// Deadline for the CLI to produce its URL (ms).
    pub url_timeout_ms: u64,
    /// Deadline for a status command (ms).
    pub confirm_timeout_ms: u64,
    /// Environment variables that name a CA file for this CLI (for
    /// example `NODE_EXTRA_CA_CERTS`): set to the browser's extra CA
    /// file when it was given one ([`BrowserSpec::extra_ca_pem`]).
    #[serde(default)]
    pub ca_env: Vec<String>,
    /// Texts the CLI prints when its login has failed but it stays running
    /// (back at a menu): seeing one ends the login at once with the line
    /// that holds it.
    #[serde(default)]
    pub fail_when: Vec<String>,
}

/// One input event for the X display (XTest), in screen pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum InputEvent {
    /// Move the pointer.
    MouseMove {
        /// X.
        x: i32,
        /// Y.
        y: i32,
    },
    /// Press a button (1 left, 2 middle, 3 right).
    MouseDown {
        /// Button.
        button: u8,
    },
    /// Release a button.
    MouseUp {
        /// Button.
        button: u8,
    },
    /// Scroll by wheel steps (positive: down / right).
    Scroll {
        /// Horizontal steps.
        dx: i32,
        /// Vertical steps.
        dy: i32,
    },
    /// Press a key by X keysym.
    KeyDown {
        /// The keysym (e.g. 0xff0d Return).
        keysym: u32,
    },
    /// Release a key by X keysym.
    KeyUp {
        /// The keysym.
        keysym: u32,
    },
    /// Insert text into the focused element of the page, as an input
    /// method commits it (layout-independent; Enter and Tab are keys).
    Text {
        /// The text (redacted in `Debug`: it may be a password).
        text: SecretText,
    },
    /// The viewer's screen area changed: the remote screen and page follow
    /// it within the browser's bounds ([`BrowserSpec::max_width`]).
    Viewport {
        /// Width in the viewer's CSS pixels.
        width: u32,
        /// Height in the viewer's CSS pixels.
        height: u32,
        /// The viewer's device pixel ratio.
        scale: f64,
        /// A touch device: pages get their mobile layout.
        mobile: bool,
    },
}

/// Text whose `Debug` shows only its length (typed passwords).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretText(<{} chars redacted>)", self.0.chars().count())
    }
}

/// A batch of input events, applied in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InputBatch {
    /// The events.
    pub events: Vec<InputEvent>,
}

/// A captured credential file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapturedFile {
    /// Index into [`LoginSpec::credentials`].
    pub index: u32,
    /// The file's permission bits.
    pub mode: u32,
    /// Its bytes (redacted in `Debug`).
    pub contents: SecretBytes,
}

/// Steps of a login, reported as [`crate::Event::Login`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "step",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum LoginStep {
    /// The CLI was started in a PTY.
    Started,
    /// Its authorization URL was opened in Chromium (origin and path only).
    UrlOpened {
        /// `scheme://host/path` of the URL.
        location: String,
        /// `shim` (BROWSER / xdg-open) or `output` (found in its output).
        via: String,
    },
    /// The page is in front of the user; nothing to do until they act.
    WaitingForUser,
    /// A page finished loading and rendering in the browser, its autofocus
    /// applied: ready for the person's input (origin and path only).
    PageLoaded {
        /// `scheme://host/path` of the page.
        location: String,
    },
    /// A code was read from the vendor's page and typed into the CLI.
    CodeEntered,
    /// A device-code flow's CLI printed the one-time code the person enters
    /// on the vendor's page (the page shows no way to get it otherwise).
    UserCode {
        /// The code, as printed (see [`is_user_code`]).
        code: String,
    },
    /// The vendor redirected with an OAuth error (e.g. `access_denied`).
    Denied {
        /// The OAuth error code.
        error: String,
        /// Its description, if the vendor gave one.
        description: Option<String>,
    },
    /// All credential files were written and valid.
    CredentialCaptured,
    /// The CLI process ended.
    CliExited {
        /// Exit code, when it exited.
        exit_code: Option<i32>,
        /// Signal, when killed.
        signal: Option<i32>,
        /// The last lines it printed (escape sequences removed).
        output_tail: String,
    },
    /// The login cannot continue.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A login progress report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginEvent {
    /// The session.
    pub session_id: String,
    /// What happened.
    #[serde(flatten)]
    pub step: LoginStep,
}

/// The credential of a login, sent once it is captured and confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapturedCredential {
    /// The session.
    pub session_id: String,
    /// The files, one per [`CredentialSpec`].
    pub files: Vec<CapturedFile>,
}

/// State changes of the display and the browser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum BrowserEvent {
    /// Xvfb is serving the display.
    DisplayUp {
        /// E.g. `:5`.
        display: String,
    },
    /// Chromium is up and its DevTools connection works.
    BrowserUp,
    /// A process of the browser role died and is being restarted.
    Crashed {
        /// `xvfb` or `chromium`.
        process: String,
        /// How it ended.
        status: String,
        /// Restarts so far.
        restarts: u32,
    },
    /// Chromium could not get memory (its own out-of-memory report, or the
    /// kernel killing one of its processes): the VM is too small.
    OutOfMemory {
        /// The first line that said so.
        detail: String,
    },
}

/// Longest text in a [`BrowserEvent`] (bytes).
pub const MAX_BROWSER_EVENT_TEXT: usize = 1024;

impl BrowserEvent {
    /// Checks the sizes of its texts.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::DisplayUp { display } => check_len("display", display, MAX_SHORT_STRING),
            Self::BrowserUp => Ok(()),
            Self::Crashed {
                process, status, ..
            } => {
                check_len("process", process, MAX_SHORT_STRING)?;
                check_len("status", status, MAX_BROWSER_EVENT_TEXT)
            }
            Self::OutOfMemory { detail } => check_len("detail", detail, MAX_BROWSER_EVENT_TEXT),
        }
    }
}

impl InputBatch {
    /// Checks the batch's bounds.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let bad = |problem: String| InvalidMessage {
            field: "events",
            problem,
        };
        if self.events.len() > MAX_INPUT_EVENTS {
            return Err(bad(format!(
                "{} events, at most {MAX_INPUT_EVENTS}",
                self.events.len()
            )));
        }
        for e in &self.events {
            match e {
                InputEvent::MouseDown { button } | InputEvent::MouseUp { button }
                    if !(1..=9).contains(button) =>
                {
                    return Err(bad(format!("button {button} is not 1-9")));
                }
                InputEvent::Scroll { dx, dy } if dx.abs() > 100 || dy.abs() > 100 => {
                    return Err(bad("scroll steps must be within -100..100".into()));
                }
                InputEvent::Text { text } if text.0.chars().count() > MAX_INPUT_TEXT => {
                    return Err(bad(format!("text longer than {MAX_INPUT_TEXT} characters")));
                }
                InputEvent::Viewport {
                    width,
                    height,
                    scale,
                    ..
                } if !viewport_ok(*width, *height, *scale) => {
                    return Err(bad(format!(
                        "viewport {width}x{height} at scale {scale}: must be \
                         {MIN_VIEWPORT}-{MAX_VIEWPORT} pixels each way at scale 0.5-8"
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Smallest viewport side a viewer may send (CSS pixels).
pub const MIN_VIEWPORT: u32 = 100;

/// Largest viewport side a viewer may send (CSS pixels).
pub const MAX_VIEWPORT: u32 = 16384;

fn viewport_ok(width: u32, height: u32, scale: f64) -> bool {
    let side = MIN_VIEWPORT..=MAX_VIEWPORT;
    side.contains(&width) && side.contains(&height) && (0.5..=8.0).contains(&scale)
}

/// A credential file that lacks the shape its profile requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// It is not a JSON document (serde's syntax error, which quotes no
    /// input).
    #[error("not valid JSON ({0})")]
    NotJson(String),
    /// A required field is absent, null or empty.
    #[error("{0} is missing or empty")]
    Missing(String),
}

/// Checks that `bytes` is a JSON document in which every pointer of
/// `required` (RFC 6901) holds a non-empty value: what the agent waits
/// for before it captures a file, and what the host checks again (the
/// guest is not trusted to have done it).
pub fn check_shape(bytes: &[u8], required: &[String]) -> Result<(), ShapeError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ShapeError::NotJson(e.to_string()))?;
    for pointer in required {
        let empty = match value.pointer(pointer) {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::String(s)) => s.is_empty(),
            Some(serde_json::Value::Array(a)) => a.is_empty(),
            Some(serde_json::Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        if empty {
            return Err(ShapeError::Missing(pointer.clone()));
        }
    }
    Ok(())
}

impl CapturedCredential {
    /// Checks what a guest sends as a credential (the host's side).
    pub fn validate(&self, expected_files: usize) -> Result<(), InvalidMessage> {
        let bad = |problem: String| InvalidMessage {
            field: "files",
            problem,
        };
        if self.files.is_empty() || self.files.len() > MAX_CREDENTIAL_FILES.min(expected_files) {
            return Err(bad(format!(
                "{} files, expected {expected_files}",
                self.files.len()
            )));
        }
        for (i, f) in self.files.iter().enumerate() {
            if f.index as usize >= expected_files
                || f.contents.len() > MAX_CREDENTIAL_BYTES
                || f.mode > 0o7777
            {
                return Err(bad("index, size or mode out of bounds".into()));
            }
            if self.files[..i].iter().any(|g| g.index == f.index) {
                return Err(bad(format!("file {} sent twice", f.index)));
            }
        }
        Ok(())
    }
}

/// Longest user code accepted (RFC 8628 codes are 8-9 characters).
pub const MAX_USER_CODE: usize = 24;

/// Whether `s` has the shape of a device flow's user code: groups of
/// capital letters and digits joined by single dashes (`WDJB-MJHT`,
/// `ABCD-12345`), at least two groups, 6 to [`MAX_USER_CODE`] characters.
/// The shape is what the agent looks for in a CLI's output and what the
/// host accepts before showing it to the person.
pub fn is_user_code(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    (6..=MAX_USER_CODE).contains(&s.len())
        && groups.len() >= 2
        && groups.iter().all(|g| {
            g.len() >= 2
                && g.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        })
        && s.bytes().any(|b| b.is_ascii_uppercase())
}

impl LoginStep {
    /// The step with each text cut, on a character boundary, to what
    /// [`LoginEvent::validate`] accepts: the agent reports what a page or
    /// a CLI gave it (a URL's path, a vendor's error text, output), and an
    /// event past the bounds would be refused with its connection.
    pub fn bounded(self) -> Self {
        match self {
            Self::UrlOpened { location, via } => Self::UrlOpened {
                location: cut(location, MAX_PATH_BYTES),
                via: cut(via, MAX_SHORT_STRING),
            },
            Self::PageLoaded { location } => Self::PageLoaded {
                location: cut(location, MAX_PATH_BYTES),
            },
            Self::Denied { error, description } => Self::Denied {
                error: cut(error, MAX_SHORT_STRING),
                description: description.map(|d| cut(d, MAX_DENIAL_DESCRIPTION)),
            },
            Self::CliExited {
                exit_code,
                signal,
                output_tail,
            } => Self::CliExited {
                exit_code,
                signal,
                output_tail: cut(output_tail, MAX_CLI_OUTPUT_TAIL),
            },
            Self::Failed { reason } => Self::Failed {
                reason: cut(reason, MAX_FAILURE_REASON),
            },
            other => other,
        }
    }
}

impl LoginEvent {
    /// Checks the bounds of a login event from a guest.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let long = |field: &'static str, s: &str, max: usize| {
            if s.len() > max {
                Err(InvalidMessage {
                    field,
                    problem: format!("{} bytes, at most {max}", s.len()),
                })
            } else {
                Ok(())
            }
        };
        long("sessionId", &self.session_id, MAX_SHORT_STRING)?;
        match &self.step {
            LoginStep::PageLoaded { location } => long("location", location, MAX_PATH_BYTES),
            LoginStep::UrlOpened { location, via } => {
                long("location", location, MAX_PATH_BYTES)?;
                long("via", via, MAX_SHORT_STRING)
            }
            LoginStep::Denied { error, description } => {
                long("error", error, MAX_SHORT_STRING)?;
                let description = description.as_deref().unwrap_or("");
                long("description", description, MAX_DENIAL_DESCRIPTION)
            }
            LoginStep::CliExited { output_tail, .. } => {
                long("outputTail", output_tail, MAX_CLI_OUTPUT_TAIL)
            }
            LoginStep::Failed { reason } => long("reason", reason, MAX_FAILURE_REASON),
            LoginStep::UserCode { code } if !is_user_code(code) => Err(InvalidMessage {
                field: "code",
                problem: "not a user code (capital letters and digits in dash-separated groups)"
                    .into(),
            }),
            _ => Ok(()),
        }
    }
}

impl LoginSpec {
    /// Checks a login request (both sides).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        if self.argv.is_empty()
            || self.credentials.is_empty()
            || self.credentials.len() > MAX_CREDENTIAL_FILES
        {
            return Err(InvalidMessage {
                field: "login",
                problem: "needs a command and 1 to 8 credential files".into(),
            });
        }
        for c in &self.credentials {
            if c.path.len() > MAX_PATH_BYTES || c.path.contains('\0') {
                return Err(InvalidMessage {
                    field: "credentials",
                    problem: "bad path template".into(),
                });
            }
        }
        let env_name = |n: &String| {
            !n.is_empty()
                && n.len() <= 64
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if self.fail_when.len() > 16
            || self
                .fail_when
                .iter()
                .any(|t| t.is_empty() || t.len() > MAX_SHORT_STRING)
        {
            return Err(InvalidMessage {
                field: "failWhen",
                problem: format!("at most 16 texts of 1 to {MAX_SHORT_STRING} bytes"),
            });
        }
        if self.ca_env.len() > 8 || !self.ca_env.iter().all(env_name) {
            return Err(InvalidMessage {
                field: "caEnv",
                problem: "at most 8 environment variable names".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(index: u32, contents: &str) -> CapturedFile {
        CapturedFile {
            index,
            mode: 0o600,
            contents: SecretBytes::new(contents.as_bytes().to_vec()),
        }
    }

    #[test]
    fn bounded_steps_pass_validation_whatever_the_characters() {
        // 512 characters of 4 bytes: within a character count, past the
        // byte limit (the agent once cut by characters).
        let wide = "😀".repeat(2000);
        for step in [
            LoginStep::Denied {
                error: wide.clone(),
                description: Some(wide.clone()),
            },
            LoginStep::PageLoaded {
                location: format!("https://a/{wide}"),
            },
            LoginStep::UrlOpened {
                location: wide.clone(),
                via: wide.clone(),
            },
            LoginStep::CliExited {
                exit_code: Some(1),
                signal: None,
                output_tail: wide.repeat(3),
            },
            LoginStep::Failed {
                reason: wide.clone(),
            },
        ] {
            let event = LoginEvent {
                session_id: "s".into(),
                step: step.clone(),
            };
            assert!(event.validate().is_err(), "{step:?} is past the bounds");
            let bounded = LoginEvent {
                session_id: "s".into(),
                step: step.bounded(),
            };
            assert_eq!(bounded.validate(), Ok(()));
        }
    }

    #[test]
    fn a_credential_file_sent_twice_is_refused() {
        let twice = CapturedCredential {
            session_id: "s".into(),
            files: vec![file(0, "{}"), file(0, "{}")],
        };
        let e = twice.validate(2).unwrap_err();
        assert!(e.problem.contains("sent twice"), "{e}");
        let once = CapturedCredential {
            session_id: "s".into(),
            files: vec![file(0, "{}"), file(1, "{}")],
        };
        assert_eq!(once.validate(2), Ok(()));
    }

    #[test]
    fn shape_needs_json_with_every_required_field_non_empty() {
        let required = ["/tokens/access_token".to_string()];
        assert_eq!(
            check_shape(br#"{"tokens":{"access_token":"x"}}"#, &required),
            Ok(())
        );
        for (bytes, want) in [
            (
                &br#"{"tokens":{"access_token":""}}"#[..],
                "missing or empty",
            ),
            (br#"{"tokens":{}}"#, "missing or empty"),
            (br#"{"tokens":{"access_token":null}}"#, "missing or empty"),
            (b"secret-token-not-json", "not valid JSON"),
        ] {
            let e = check_shape(bytes, &required).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("secret"), "the reason quotes no contents: {e}");
        }
    }

    #[test]
    fn user_codes_are_told_from_words() {
        for ok in ["WDJB-MJHT", "ABCD-12345", "AB-CD-EF"] {
            assert!(is_user_code(ok), "{ok}");
        }
        for bad in [
            "ABCDEFGH",
            "abcd-efgh",
            "1234-5678",
            "ABCD--EFGH",
            "-ABCD",
            "A-BCDEFG",
            "ABCD-EFGH-IJKL-MNOP-QRSTU",
            "https://a.b/device",
        ] {
            assert!(!is_user_code(bad), "{bad}");
        }
        let e = LoginEvent {
            session_id: "s".into(),
            step: LoginStep::UserCode {
                code: "<script>".into(),
            },
        };
        assert!(e.validate().is_err());
    }

    #[test]
    fn typed_text_is_redacted_in_debug() {
        let e = InputEvent::Text {
            text: SecretText("hunter2".into()),
        };
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    #[test]
    fn input_bounds() {
        let ok = InputBatch {
            events: vec![InputEvent::MouseDown { button: 1 }],
        };
        assert!(ok.validate().is_ok());
        let bad = InputBatch {
            events: vec![InputEvent::MouseDown { button: 0 }],
        };
        assert!(bad.validate().is_err());
        let many = InputBatch {
            events: vec![InputEvent::KeyDown { keysym: 0x61 }; MAX_INPUT_EVENTS + 1],
        };
        assert!(many.validate().is_err());
    }

    #[test]
    fn viewports_must_be_plausible_screens() {
        let view = |width, height, scale| InputBatch {
            events: vec![InputEvent::Viewport {
                width,
                height,
                scale,
                mobile: true,
            }],
        };
        assert!(view(390, 844, 3.0).validate().is_ok());
        assert!(view(390, 844, f64::NAN).validate().is_err());
        assert!(view(390, 844, 0.1).validate().is_err());
        assert!(view(20, 844, 1.0).validate().is_err());
        assert!(view(390, 100_000, 1.0).validate().is_err());
        let json = r#"{"type":"viewport","width":390,"height":844,"scale":2.5,"mobile":false}"#;
        let parsed: InputEvent = serde_json::from_str(json).unwrap();
        assert_eq!(
            parsed,
            InputEvent::Viewport {
                width: 390,
                height: 844,
                scale: 2.5,
                mobile: false
            }
        );
    }

    #[test]
    fn struct_variant_fields_are_camel_case_too() {
        let flow = LoginFlow::PasteCode {
            code_selector: "#c".into(),
        };
        assert_eq!(
            serde_json::to_value(&flow).unwrap(),
            serde_json::json!({"type": "pasteCode", "codeSelector": "#c"})
        );
        let exit = LoginStep::CliExited {
            exit_code: Some(1),
            signal: None,
            output_tail: String::new(),
        };
        assert_eq!(serde_json::to_value(&exit).unwrap()["exitCode"], 1);
    }

    #[test]
    fn login_event_json_is_flat() {
        let e = LoginEvent {
            session_id: "s1".into(),
            step: LoginStep::WaitingForUser,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["step"], "waitingForUser");
        assert_eq!(v["sessionId"], "s1");
    }
}
