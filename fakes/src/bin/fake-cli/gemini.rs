//! Fake Gemini CLI: running `gemini` without cached credentials starts the
//! "Login with Google" flow.
//!
//! Mimicked from google-gemini/gemini-cli `packages/core/src/code_assist/
//! oauth2.ts`, `utils/authConsent.ts`, `utils/browser.ts`, `utils/paths.ts`,
//! `config/storage.ts` and `utils/errors.ts`:
//! * credentials: `$GEMINI_CLI_HOME/.gemini/oauth_creds.json` when
//!   `GEMINI_CLI_HOME` is set, else `~/.gemini/oauth_creds.json`; written
//!   with `JSON.stringify(creds, null, 2)`, mode 0600, then chmod 0600;
//! * browser launch only if allowed (`shouldAttemptBrowserLaunch`): not
//!   with `NO_BROWSER`, `BROWSER=www-browser`, `CI`,
//!   `DEBIAN_FRONTEND=noninteractive`, nor on Linux without `DISPLAY`,
//!   `WAYLAND_DISPLAY` or `MIR_SOCKET`. Then it asks for consent
//!   ("Opening authentication page in your browser. Do you want to
//!   continue? [Y/n]: "), listens on `OAUTH_CALLBACK_HOST` (default
//!   127.0.0.1) : `OAUTH_CALLBACK_PORT` (default a free port), redirect
//!   `http://127.0.0.1:{port}/oauth2callback`, opens the URL with the npm
//!   `open` package and gives up on the first request that is not a good
//!   callback; the whole wait is bounded by 5 minutes;
//! * otherwise the user-code flow: print the URL, prompt "Enter the
//!   authorization code: ", two attempts.
//!
//! Authentication failures are `FatalAuthenticationError`, exit code 41;
//! refusing consent is `FatalCancellationError`, exit code 130. Deviation:
//! the real web flow sends no PKCE (Google's client has a secret); the fake
//! server requires PKCE from every client, so the fake sends it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::common;
use crate::creds::{self, CredFileError};
use crate::exchange::{self, ExchangeError, Tokens};
use crate::loopback::{Incoming, Loopback, Reply};
use crate::{opener, prompt};
use airlock_fakes::oauth::clients::{GEMINI as CLIENT_ID, HOSTED_CODE_PATH};
use airlock_fakes::pkce::{self, PkcePair};

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/userinfo.profile";
/// `FatalAuthenticationError.exitCode`.
const EXIT_AUTH: i32 = 41;
/// `FatalCancellationError.exitCode`.
const EXIT_CANCELLED: i32 = 130;
/// The real web flow's `authTimeout`.
const WEB_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// A fatal login failure, worded as the real CLI words it.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The first request to the callback server was not a callback.
    #[error("OAuth callback not received. Unexpected request: {0}")]
    Unexpected(String),
    /// Google sent an error.
    #[error("Google OAuth error: {0}. {1}")]
    Provider(String, String),
    /// Wrong `state`.
    #[error("OAuth state mismatch. Possible CSRF attack or browser session issue.")]
    StateMismatch,
    /// A callback without a code.
    #[error("No authorization code received from Google OAuth. Please try authenticating again.")]
    NoCode,
    /// The exchange failed.
    #[error("Failed to exchange authorization code for tokens: {0}")]
    Exchange(#[source] ExchangeError),
    /// Saving failed.
    #[error("Failed to save credentials: {0}")]
    Persist(#[source] CredFileError),
    /// The callback server could not listen.
    #[error("OAuth callback server error: {0}")]
    Listen(#[source] std::io::Error),
    /// No callback in time.
    #[error("Authentication timed out after {0} seconds. The browser tab may have gotten stuck in a loading state. Please try again or use NO_BROWSER=true for manual authentication.")]
    TimedOut(u64),
    /// The user-code flow failed twice.
    #[error("Failed to authenticate with user code.")]
    UserCode,
    /// The user answered no.
    #[error("Authentication cancelled by user.")]
    Cancelled,
}

/// Runs `gemini <args>` and returns the exit code.
pub async fn run(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("Usage: gemini   (the fake signs in with Google when no credentials are cached)");
        return 0;
    }
    if has_cached_credentials() {
        println!("Loaded cached credentials.");
        return 0;
    }
    let base = match common::oauth_base_or_exit() {
        Ok(b) => b,
        Err(code) => return code,
    };
    let result = if should_attempt_browser_launch() {
        web_login(&base).await
    } else {
        user_code_login(&base).await
    };
    match result {
        Ok(()) => {
            println!("Authentication succeeded");
            0
        }
        Err(LoginError::Cancelled) => {
            eprintln!("{}", LoginError::Cancelled);
            EXIT_CANCELLED
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_AUTH
        }
    }
}

fn creds_file() -> PathBuf {
    common::env_nonempty("GEMINI_CLI_HOME")
        .map_or_else(common::home_dir, PathBuf::from)
        .join(".gemini")
        .join("oauth_creds.json")
}

fn has_cached_credentials() -> bool {
    std::fs::read_to_string(creds_file())
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["access_token"].is_string() || v["refresh_token"].is_string())
}

/// `shouldAttemptBrowserLaunch()` on Linux.
fn should_attempt_browser_launch() -> bool {
    let set = |name: &str| common::env_nonempty(name).is_some();
    if set("NO_BROWSER") || std::env::var("BROWSER").is_ok_and(|b| b == "www-browser") {
        return false;
    }
    if set("CI") || std::env::var("DEBIAN_FRONTEND").is_ok_and(|v| v == "noninteractive") {
        return false;
    }
    ["DISPLAY", "WAYLAND_DISPLAY", "MIR_SOCKET"]
        .iter()
        .any(|v| set(v))
}

fn auth_url(base: &str, redirect_uri: &str, pkce: &PkcePair, state: &str) -> String {
    // google-auth-library's generateAuthUrl order, plus PKCE (see above).
    common::authorize_url(
        base,
        &[
            ("access_type", "offline"),
            ("scope", SCOPE),
            ("state", state),
            ("response_type", "code"),
            ("client_id", CLIENT_ID),
            ("redirect_uri", redirect_uri),
            ("code_challenge_method", "S256"),
            ("code_challenge", &pkce.challenge),
        ],
    )
}

async fn ask_consent() -> Result<(), LoginError> {
    prompt::show("\nOpening authentication page in your browser. Do you want to continue? [Y/n]: ");
    // End of input counts as "no" rather than hanging (the real one waits).
    match prompt::stdin_lines().recv().await {
        Some(answer) if matches!(answer.trim().to_ascii_lowercase().as_str(), "" | "y") => Ok(()),
        _ => Err(LoginError::Cancelled),
    }
}

async fn web_login(base: &str) -> Result<(), LoginError> {
    ask_consent().await?;
    let host: IpAddr = common::env_nonempty("OAUTH_CALLBACK_HOST")
        .and_then(|h| h.parse().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let port: u16 = common::env_nonempty("OAUTH_CALLBACK_PORT")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let mut server = Loopback::bind(SocketAddr::new(host, port))
        .await
        .map_err(LoginError::Listen)?;
    let redirect_uri = format!("http://127.0.0.1:{}/oauth2callback", server.port());
    let (pkce, state) = (pkce::generate(), hex_state());
    let url = auth_url(base, &redirect_uri, &pkce, &state);
    println!("\n\nAttempting to open authentication page in your browser.\nOtherwise navigate to:\n\n{url}\n\n\n");
    if let Err(e) = opener::open_like_npm_open(&url) {
        // The real one reports a failed spawn and keeps waiting.
        eprintln!("Failed to open browser with error: {e}\nPlease try running again with NO_BROWSER=true set.");
    }
    println!("Waiting for authentication...");
    let limit = common::login_timeout(WEB_TIMEOUT);
    let first = tokio::time::timeout(limit, server.next()).await;
    let Ok(Some(req)) = first else {
        return Err(LoginError::TimedOut(limit.as_secs()));
    };
    first_request(base, req, &redirect_uri, &pkce, &state).await
}

/// The real server resolves or rejects on the first request, whatever it is.
async fn first_request(
    base: &str,
    req: Incoming,
    redirect_uri: &str,
    pkce: &PkcePair,
    state: &str,
) -> Result<(), LoginError> {
    let failure = format!("{base}/code/failure?app={CLIENT_ID}");
    if !req.target.contains("/oauth2callback") {
        let target = req.target.clone();
        req.respond(Reply::redirect(301, &failure)).await;
        return Err(LoginError::Unexpected(target));
    }
    let q = req.query();
    if let Some(error) = q.get("error").filter(|e| !e.is_empty()) {
        req.respond(Reply::redirect(301, &failure)).await;
        let description = q
            .get("error_description")
            .cloned()
            .unwrap_or_else(|| "No additional details provided".into());
        return Err(LoginError::Provider(error.clone(), description));
    }
    if q.get("state").map(String::as_str) != Some(state) {
        req.respond(Reply::text(200, "State mismatch. Possible CSRF attack"))
            .await;
        return Err(LoginError::StateMismatch);
    }
    let Some(code) = q.get("code").filter(|c| !c.is_empty()) else {
        // The real one never answers this request; dropping closes it.
        drop(req);
        return Err(LoginError::NoCode);
    };
    match exchange(base, code, redirect_uri, pkce).await {
        Ok(()) => {
            req.respond(Reply::redirect(
                301,
                &format!("{base}/code/success?app={CLIENT_ID}"),
            ))
            .await;
            Ok(())
        }
        Err(e) => {
            req.respond(Reply::redirect(301, &failure)).await;
            Err(e)
        }
    }
}

/// `crypto.randomBytes(32).toString('hex')`.
fn hex_state() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn exchange(
    base: &str,
    code: &str,
    redirect_uri: &str,
    pkce: &PkcePair,
) -> Result<(), LoginError> {
    let params = [
        ("code", code),
        ("client_id", CLIENT_ID),
        ("client_secret", "fake-installed-app-secret"),
        ("redirect_uri", redirect_uri),
        ("grant_type", "authorization_code"),
        ("code_verifier", pkce.verifier.as_str()),
    ];
    let tokens = exchange::token_form(base, &params)
        .await
        .map_err(LoginError::Exchange)?;
    persist(&tokens).map_err(LoginError::Persist)
}

async fn user_code_login(base: &str) -> Result<(), LoginError> {
    let mut lines = prompt::stdin_lines();
    for attempt in 0..2 {
        if user_code_attempt(base, &mut lines).await {
            return Ok(());
        }
        let retry = if attempt == 0 { " Retrying...\n" } else { "" };
        eprint!("\nFailed to authenticate with user code.{retry}");
    }
    Err(LoginError::UserCode)
}

async fn user_code_attempt(base: &str, lines: &mut tokio::sync::mpsc::Receiver<String>) -> bool {
    let redirect_uri = format!("{base}{HOSTED_CODE_PATH}");
    let (pkce, state) = (pkce::generate(), hex_state());
    let url = auth_url(base, &redirect_uri, &pkce, &state);
    println!("Please visit the following URL to authorize the application:\n\n{url}\n");
    prompt::show("Enter the authorization code: ");
    let line = lines.recv().await.unwrap_or_default();
    // The fake hosted page shows `code#state`; Google's shows the code alone.
    let code = line.trim().split('#').next().unwrap_or("").to_string();
    if code.is_empty() {
        eprintln!("Authorization code is required.");
        return false;
    }
    match exchange(base, &code, &redirect_uri, &pkce).await {
        Ok(()) => true,
        Err(e) => {
            eprintln!("Failed to authenticate with authorization code:{e}");
            false
        }
    }
}

fn persist(tokens: &Tokens) -> Result<(), CredFileError> {
    // google-auth-library's Credentials: expiry_date replaces expires_in.
    let mut creds = Map::new();
    creds.insert("access_token".into(), json!(tokens.access_token));
    if let Some(r) = &tokens.refresh_token {
        creds.insert("refresh_token".into(), json!(r));
    }
    creds.insert(
        "scope".into(),
        json!(tokens.scope.clone().unwrap_or_else(|| SCOPE.to_string())),
    );
    creds.insert(
        "token_type".into(),
        json!(tokens.token_type.clone().unwrap_or_else(|| "Bearer".into())),
    );
    if let Some(id) = &tokens.id_token {
        creds.insert("id_token".into(), json!(id));
    }
    creds.insert(
        "expiry_date".into(),
        json!(common::now_ms() + tokens.expires_in.unwrap_or(3600) * 1000),
    );
    let text = serde_json::to_string_pretty(&Value::Object(creds)).unwrap_or_default();
    tracing::info!(
        access = common::prefix(&tokens.access_token),
        "writing oauth_creds.json"
    );
    creds::write_in_place_then_chmod(&creds_file(), text.as_bytes())
}
