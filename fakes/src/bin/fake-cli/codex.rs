//! Fake OpenAI Codex CLI: `codex login`, `codex login --device-auth`,
//! `codex login status`, `codex logout`.
//!
//! Mimicked from openai/codex `codex-rs/login/src/server.rs`,
//! `device_code_auth.rs`, `auth/storage.rs` and `codex-rs/cli/src/login.rs`:
//! the callback server binds `127.0.0.1:1455`; if that is taken it sends
//! `GET /cancel` to it once (to stop an earlier login), retries 10 times
//! 200 ms apart, then does the same on `1457`. The redirect URI says
//! `localhost`. The browser is opened before the URL is printed (stderr).
//! A callback with a wrong `state` gets `400 State mismatch` and the server
//! keeps waiting; an `error` ends the login. After a good exchange the file
//! is written and the browser is redirected to `/success` on the callback
//! server; the login ends (exit 0) when that page is served. All messages
//! go to stderr, except the device-code prompt (stdout).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, EXIT_USAGE};
use crate::creds::{self, CredFileError};
use crate::exchange::{self, ExchangeError, Tokens};
use crate::loopback::{Incoming, Loopback, Reply};
use crate::opener;
use airlock_fakes::oauth::clients::CODEX as CLIENT_ID;
use airlock_fakes::pkce::{self, PkcePair};

const DEFAULT_PORT: u16 = 1455;
const FALLBACK_PORT: u16 = 1457;
/// The scope the real CLI asks for, minus the connector scopes.
const SCOPE: &str = "openid profile email offline_access";

/// Why a login failed; the text is what the real CLI prints after
/// "Error logging in: ".
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Both ports stayed busy.
    #[error("Port {0} is already in use")]
    PortInUse(String),
    /// Binding failed otherwise.
    #[error("{0}")]
    Bind(#[source] std::io::Error),
    /// `/cancel` was requested (by a newer login).
    #[error("Login cancelled")]
    Cancelled,
    /// The provider sent an error to the callback.
    #[error("{0}")]
    Callback(String),
    /// The code could not be exchanged.
    #[error("Token exchange failed: {0}")]
    Exchange(#[source] ExchangeError),
    /// The file could not be written.
    #[error("Sign-in completed but credentials could not be saved locally: {0}")]
    Persist(#[source] CredFileError),
    /// The fake's own deadline passed.
    #[error("Login was not completed within {0} seconds")]
    TimedOut(u64),
}

/// `$CODEX_HOME/auth.json` as `AuthDotJson` serialises it.
#[derive(Debug, Serialize, Deserialize)]
struct AuthDotJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth_mode: Option<String>,
    #[serde(rename = "OPENAI_API_KEY")]
    openai_api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokens: Option<TokenData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_refresh: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TokenData {
    id_token: String,
    access_token: String,
    refresh_token: String,
    account_id: Option<String>,
}

/// Runs `codex <args>` and returns the exit code.
pub async fn run(args: &[String]) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["login"] => login_browser().await,
        ["login", "--device-auth"] => login_device().await,
        ["login", "status"] => status(),
        ["logout"] => logout(),
        _ => {
            eprintln!("Usage: codex login [--device-auth] | codex login status | codex logout");
            EXIT_USAGE
        }
    }
}

/// `$CODEX_HOME`, else `~/.codex`.
fn codex_home() -> PathBuf {
    common::env_nonempty("CODEX_HOME")
        .map_or_else(|| common::home_dir().join(".codex"), PathBuf::from)
}

fn auth_file() -> PathBuf {
    codex_home().join("auth.json")
}

fn finish(result: Result<(), LoginError>, prefix: &str) -> i32 {
    match result {
        Ok(()) => {
            eprintln!("Successfully logged in");
            0
        }
        Err(e) => {
            eprintln!("{prefix}: {e}");
            1
        }
    }
}

async fn login_browser() -> i32 {
    let base = match common::oauth_base_or_exit() {
        Ok(b) => b,
        Err(code) => return code,
    };
    let limit = common::login_timeout(Duration::from_secs(600));
    let result = tokio::time::timeout(limit, browser_flow(&base))
        .await
        .unwrap_or(Err(LoginError::TimedOut(limit.as_secs())));
    finish(result, "Error logging in")
}

/// What one callback request means for the login.
enum Step {
    Continue,
    Done(Result<(), LoginError>),
}

struct Flow<'a> {
    base: &'a str,
    pkce: PkcePair,
    state: String,
    port: u16,
    redirect_uri: String,
}

async fn browser_flow(base: &str) -> Result<(), LoginError> {
    let mut server = bind_with_fallback().await?;
    let port = server.port();
    let flow = Flow {
        base,
        pkce: pkce::generate(),
        state: pkce::random_urlsafe(32),
        port,
        redirect_uri: format!("http://localhost:{port}/auth/callback"),
    };
    let url = common::authorize_url(
        base,
        &[
            ("response_type", "code"),
            ("client_id", CLIENT_ID),
            ("redirect_uri", &flow.redirect_uri),
            ("scope", SCOPE),
            ("code_challenge", &flow.pkce.challenge),
            ("code_challenge_method", "S256"),
            ("id_token_add_organizations", "true"),
            ("codex_cli_simplified_flow", "true"),
            ("state", &flow.state),
            ("originator", "codex_cli_rs"),
        ],
    );
    let _ = opener::open_like_webbrowser_crate(&url);
    eprintln!(
        "Starting local login server on http://localhost:{port}.\nIf your browser did not open, navigate to this URL to authenticate:\n\n{url}"
    );
    while let Some(request) = server.next().await {
        if let Step::Done(result) = flow.handle(request).await {
            return result;
        }
    }
    Err(LoginError::Callback("Login was not completed".into()))
}

impl Flow<'_> {
    async fn handle(&self, req: Incoming) -> Step {
        match req.path() {
            "/auth/callback" => self.callback(req).await,
            "/success" => {
                req.respond(Reply::html(200, SUCCESS_PAGE)).await;
                Step::Done(Ok(()))
            }
            "/cancel" => {
                req.respond(Reply::text(200, "Login cancelled")).await;
                Step::Done(Err(LoginError::Cancelled))
            }
            _ => {
                req.respond(Reply::text(404, "Not Found")).await;
                Step::Continue
            }
        }
    }

    async fn callback(&self, req: Incoming) -> Step {
        let q = req.query();
        if q.get("state") != Some(&self.state) {
            req.respond(Reply::text(400, "State mismatch")).await;
            return Step::Continue;
        }
        if let Some(code) = q.get("error") {
            let message = match q.get("error_description").filter(|d| !d.trim().is_empty()) {
                Some(d) => format!("Sign-in failed: {d}"),
                None => format!("Sign-in failed: {code}"),
            };
            eprintln!("OAuth callback error: {message}");
            req.respond(Reply::html(200, &error_page(&message))).await;
            return Step::Done(Err(LoginError::Callback(message)));
        }
        let Some(code) = q.get("code").filter(|c| !c.is_empty()) else {
            let message = "Missing authorization code. Sign-in could not be completed.";
            req.respond(Reply::html(200, &error_page(message))).await;
            return Step::Done(Err(LoginError::Callback(message.into())));
        };
        let params = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("client_id", CLIENT_ID),
            ("code_verifier", self.pkce.verifier.as_str()),
        ];
        let tokens = match exchange::token_form(self.base, &params).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("Token exchange error: {e}");
                req.respond(Reply::html(
                    200,
                    &error_page(&format!("Token exchange failed: {e}")),
                ))
                .await;
                return Step::Done(Err(LoginError::Exchange(e)));
            }
        };
        if let Err(e) = persist(&tokens) {
            eprintln!("Persist error: {e}");
            req.respond(Reply::html(
                200,
                &error_page("Sign-in completed but credentials could not be saved locally."),
            ))
            .await;
            return Step::Done(Err(LoginError::Persist(e)));
        }
        req.respond(Reply::redirect(302, &self.success_url(&tokens)))
            .await;
        Step::Continue
    }

    /// `http://localhost:{port}/success?id_token=…&…`: the real CLI puts
    /// the id token in this URL, so the fake does too.
    fn success_url(&self, tokens: &Tokens) -> String {
        let id_token = tokens.id_token.clone().unwrap_or_default();
        let plan = common::jwt_claims(&tokens.access_token)
            .and_then(|c| {
                c["https://api.openai.com/auth"]["chatgpt_plan_type"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default();
        format!(
            "http://localhost:{}/success?id_token={}&needs_setup=false&org_id=&project_id=&plan_type={}&platform_url={}",
            self.port,
            common::encode(&id_token),
            common::encode(&plan),
            common::encode("https://platform.api.openai.org"),
        )
    }
}

const SUCCESS_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>Codex sign-in</title></head>\
<body><h1 id=\"codex-success\">Signed in to Codex</h1><p>You may now close this page.</p></body></html>";

fn error_page(message: &str) -> String {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sign-in could not be completed</title></head>\
<body><h1>Sign-in could not be completed</h1><p id=\"codex-error\">{escaped}</p>\
<p>Return to Codex to retry, switch accounts, or contact your workspace admin if access is restricted.</p></body></html>"
    )
}

/// Binds 1455, or 1457 as the real `bind_server` does.
async fn bind_with_fallback() -> Result<Loopback, LoginError> {
    let (mut port, mut attempts, mut cancel_attempted, mut using_fallback) =
        (DEFAULT_PORT, 0u32, false, false);
    loop {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match Loopback::bind(addr).await {
            Ok(server) => return Ok(server),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                attempts += 1;
                if !cancel_attempted && !using_fallback {
                    cancel_attempted = true;
                    if let Err(err) = send_cancel(port).await {
                        eprintln!("Failed to cancel previous login server: {err}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if attempts >= 10 {
                    if using_fallback {
                        return Err(LoginError::PortInUse(addr.to_string()));
                    }
                    tracing::warn!("default login callback port is unavailable; falling back");
                    (port, attempts, using_fallback) = (FALLBACK_PORT, 0, true);
                }
            }
            Err(e) => return Err(LoginError::Bind(e)),
        }
    }
}

/// `GET /cancel` to whatever holds `port`, with 2 s timeouts.
async fn send_cancel(port: u16) -> std::io::Result<()> {
    let limit = Duration::from_secs(2);
    let timed_out = |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out");
    let mut stream =
        tokio::time::timeout(limit, tokio::net::TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(timed_out)??;
    let request =
        format!("GET /cancel HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(limit, stream.read(&mut buf)).await;
    Ok(())
}

fn persist(tokens: &Tokens) -> Result<(), CredFileError> {
    let id_token = tokens.id_token.clone().unwrap_or_default();
    let account_id = common::jwt_claims(&id_token).and_then(|c| {
        c["https://api.openai.com/auth"]["chatgpt_account_id"]
            .as_str()
            .map(str::to_string)
    });
    let auth = AuthDotJson {
        auth_mode: Some("chatgpt".into()),
        openai_api_key: None,
        tokens: Some(TokenData {
            id_token,
            access_token: tokens.access_token.clone(),
            refresh_token: tokens.refresh_token.clone().unwrap_or_default(),
            account_id,
        }),
        last_refresh: Some(humantime::format_rfc3339_nanos(SystemTime::now()).to_string()),
    };
    let json = serde_json::to_string_pretty(&auth).unwrap_or_default();
    tracing::info!(
        access = common::prefix(&tokens.access_token),
        "writing auth.json"
    );
    creds::write_in_place_two_chunks(&auth_file(), json.as_bytes())
}

async fn login_device() -> i32 {
    let base = match common::oauth_base_or_exit() {
        Ok(b) => b,
        Err(code) => return code,
    };
    let limit = common::login_timeout(Duration::from_secs(600));
    let result = tokio::time::timeout(limit, device_flow(&base))
        .await
        .unwrap_or(Err(LoginError::TimedOut(limit.as_secs())));
    finish(result, "Error logging in with device code")
}

async fn device_flow(base: &str) -> Result<(), LoginError> {
    let device = exchange::request_device_code(base, CLIENT_ID, SCOPE)
        .await
        .map_err(LoginError::Exchange)?;
    let (gray, blue, reset) = ("\x1b[90m", "\x1b[94m", "\x1b[0m");
    println!(
        "\nWelcome to Codex [v{gray}{}{reset}]\n{gray}OpenAI's command-line coding agent{reset}\n\
\nFollow these steps to sign in with ChatGPT using device code authorization:\n\
\n1. Open this link in your browser and sign in to your account\n   {blue}{}{reset}\n\
\n2. Enter this one-time code {gray}(expires in {} minutes){reset}\n   {blue}{}{reset}\n\
\n{gray}Device codes are a common phishing target. Never share this code.{reset}\n",
        env!("CARGO_PKG_VERSION"),
        device.verification_uri,
        device.expires_in / 60,
        device.user_code,
    );
    let tokens = exchange::poll_device(base, CLIENT_ID, &device)
        .await
        .map_err(LoginError::Exchange)?;
    persist(&tokens).map_err(LoginError::Persist)
}

fn status() -> i32 {
    let text = match std::fs::read_to_string(auth_file()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("Not logged in");
            return 1;
        }
        Err(e) => {
            eprintln!("Error checking login status: {e}");
            return 1;
        }
    };
    match serde_json::from_str::<AuthDotJson>(&text) {
        Ok(AuthDotJson {
            tokens: Some(t), ..
        }) if common::jwt_claims(&t.id_token).is_some() => {
            eprintln!("Logged in using ChatGPT");
            0
        }
        Ok(AuthDotJson {
            openai_api_key: Some(key),
            ..
        }) => {
            eprintln!("Logged in using an API key - {}", safe_format_key(&key));
            0
        }
        Ok(_) => {
            eprintln!("Not logged in");
            1
        }
        Err(e) => {
            eprintln!("Error checking login status: {e}");
            1
        }
    }
}

/// `sk-proj-***ABCDE`, as `codex login status` shows keys.
fn safe_format_key(key: &str) -> String {
    if key.len() <= 13 || !key.is_ascii() {
        return "***".to_string();
    }
    format!("{}***{}", &key[..8], &key[key.len() - 5..])
}

fn logout() -> i32 {
    match std::fs::remove_file(auth_file()) {
        Ok(()) => {
            eprintln!("Successfully logged out");
            0
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("Not logged in");
            0
        }
        Err(e) => {
            eprintln!("Error logging out: {e}");
            1
        }
    }
}
