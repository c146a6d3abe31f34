//! Fake Claude Code: `claude auth login`, `claude auth status`,
//! `claude auth logout`.
//!
//! Mimicked from what is public about Claude Code (its docs, issues in
//! anthropics/claude-code, and reimplementations of its OAuth flow):
//! login starts a callback server on a random localhost port (path
//! `/callback`) and opens the browser (npm `open` → `xdg-open`) on the
//! "automatic" authorize URL that redirects there; it also prints the
//! "manual" URL, whose redirect is the hosted code page (here
//! `{base}/code/callback`, really platform.claude.com/oauth/code/callback),
//! and prompts `Paste code here if prompted > ` for the `code#state` that
//! page shows. Whichever arrives first completes the login. Both URLs carry
//! `code=true`, the same PKCE challenge and state. The token exchange is a
//! JSON POST that includes `state`. Credentials go to
//! `$CLAUDE_CONFIG_DIR/.credentials.json` (default `~/.claude`), 0600,
//! under `claudeAiOauth`, keeping other top-level keys of the file.
//! `claude auth status` prints JSON with `loggedIn` (exit 1 when logged out).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::common::{self, EXIT_USAGE};
use crate::creds::{self, CredFileError};
use crate::exchange::{self, ExchangeError, Tokens};
use crate::loopback::{Incoming, Loopback, Reply};
use crate::{opener, prompt};
use airlock_fakes::oauth::clients::{CLAUDE as CLIENT_ID, HOSTED_CODE_PATH};
use airlock_fakes::pkce::{self, PkcePair};

const SCOPE: &str =
    "org:create_api_key user:profile user:inference user:sessions:claude_code user:mcp_servers";
const PASTE_PROMPT: &str = "Paste code here if prompted > ";

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The pasted text was not the `code#state` of this login.
    #[error("Invalid code. Please make sure the full code was copied")]
    BadPaste,
    /// The provider reported an error to the callback.
    #[error("OAuth error: {0}")]
    Callback(String),
    /// The code could not be exchanged.
    #[error("OAuth error: {0}")]
    Exchange(#[source] ExchangeError),
    /// The credentials could not be saved.
    #[error("Failed to save credentials: {0}")]
    Persist(#[source] CredFileError),
    /// The fake's own deadline passed.
    #[error("Login timed out after {0} seconds")]
    TimedOut(u64),
    /// Nothing can complete the login any more.
    #[error("Login was not completed")]
    NotCompleted,
}

/// Runs `claude <args>` and returns the exit code.
pub async fn run(args: &[String]) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        // --claudeai / --console choose the account kind; the fake has one.
        ["auth", "login", rest @ ..] if rest.iter().all(|a| a.starts_with("--")) => login().await,
        ["auth", "status", rest @ ..] => status(rest.contains(&"--text")),
        ["auth", "logout"] => logout(),
        _ => {
            eprintln!("Usage: claude auth login | claude auth status [--json|--text] | claude auth logout");
            EXIT_USAGE
        }
    }
}

fn credentials_file() -> PathBuf {
    common::env_nonempty("CLAUDE_CONFIG_DIR")
        .map_or_else(|| common::home_dir().join(".claude"), PathBuf::from)
        .join(".credentials.json")
}

async fn login() -> i32 {
    let base = match common::oauth_base_or_exit() {
        Ok(b) => b,
        Err(code) => return code,
    };
    let limit = common::login_timeout(Duration::from_secs(600));
    let result = tokio::time::timeout(limit, flow(&base))
        .await
        .unwrap_or(Err(LoginError::TimedOut(limit.as_secs())));
    match result {
        Ok(()) => {
            println!("Login successful.");
            0
        }
        Err(e) => {
            eprintln!("Login failed: {e}");
            1
        }
    }
}

struct Login<'a> {
    base: &'a str,
    pkce: PkcePair,
    state: String,
}

impl Login<'_> {
    fn url(&self, redirect_uri: &str) -> String {
        common::authorize_url(
            self.base,
            &[
                ("code", "true"),
                ("client_id", CLIENT_ID),
                ("response_type", "code"),
                ("redirect_uri", redirect_uri),
                ("scope", SCOPE),
                ("code_challenge", &self.pkce.challenge),
                ("code_challenge_method", "S256"),
                ("state", &self.state),
            ],
        )
    }

    async fn exchange(&self, code: &str, redirect_uri: &str) -> Result<(), LoginError> {
        let body = json!({
            "grant_type": "authorization_code",
            "code": code,
            "state": self.state,
            "client_id": CLIENT_ID,
            "redirect_uri": redirect_uri,
            "code_verifier": self.pkce.verifier,
        });
        let tokens = exchange::token_json(self.base, &body)
            .await
            .map_err(LoginError::Exchange)?;
        persist(&tokens).map_err(LoginError::Persist)
    }
}

async fn flow(base: &str) -> Result<(), LoginError> {
    let login = Login {
        base,
        pkce: pkce::generate(),
        state: pkce::random_urlsafe(32),
    };
    let manual_redirect = format!("{base}{HOSTED_CODE_PATH}");
    let manual_url = login.url(&manual_redirect);
    // Without a local port only the manual flow is possible.
    let mut server = Loopback::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .ok();
    let auto_redirect = server
        .as_ref()
        .map(|s| format!("http://localhost:{}/callback", s.port()));
    let browser_url = auto_redirect
        .as_deref()
        .map_or_else(|| manual_url.clone(), |r| login.url(r));
    println!("Opening browser to sign in…");
    let _ = opener::open_like_npm_open(&browser_url);
    println!("Browser didn't open? Use the url below to sign in:\n\n{manual_url}\n");
    prompt::show(PASTE_PROMPT);
    let mut lines = Some(prompt::stdin_lines());
    loop {
        tokio::select! {
            Some(req) = next_request(&mut server) => {
                let redirect = auto_redirect.clone().unwrap_or_default();
                if let Some(result) = callback(&login, req, &redirect).await {
                    // End the prompt's line: nothing was typed after it.
                    println!();
                    return result;
                }
            }
            line = next_line(&mut lines) => match line {
                None => lines = None,
                Some(text) if text.trim().is_empty() => prompt::show(PASTE_PROMPT),
                Some(text) => return pasted(&login, text.trim(), &manual_redirect).await,
            },
            else => return Err(LoginError::NotCompleted),
        }
    }
}

async fn next_request(server: &mut Option<Loopback>) -> Option<Incoming> {
    match server {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn next_line(lines: &mut Option<mpsc::Receiver<String>>) -> Option<String> {
    match lines {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Handles one request to the automatic flow's callback server; `None`
/// means keep waiting.
async fn callback(
    login: &Login<'_>,
    req: Incoming,
    redirect_uri: &str,
) -> Option<Result<(), LoginError>> {
    if req.path() != "/callback" {
        req.respond(Reply::text(404, "Not found")).await;
        return None;
    }
    let q = req.query();
    let failure = format!("{}/code/failure?app={CLIENT_ID}", login.base);
    if let Some(error) = q.get("error") {
        req.respond(Reply::redirect(302, &failure)).await;
        let detail = q
            .get("error_description")
            .map_or(error.clone(), |d| format!("{error}: {d}"));
        return Some(Err(LoginError::Callback(detail)));
    }
    if q.get("state") != Some(&login.state) {
        req.respond(Reply::text(400, "Invalid state parameter"))
            .await;
        return None;
    }
    let Some(code) = q.get("code").filter(|c| !c.is_empty()) else {
        req.respond(Reply::text(400, "Authorization code not found"))
            .await;
        return None;
    };
    let result = login.exchange(code, redirect_uri).await;
    let target = match &result {
        Ok(()) => format!("{}/code/success?app={CLIENT_ID}", login.base),
        Err(_) => failure,
    };
    req.respond(Reply::redirect(302, &target)).await;
    Some(result)
}

/// Handles a pasted `code#state`.
async fn pasted(login: &Login<'_>, text: &str, redirect_uri: &str) -> Result<(), LoginError> {
    let Some((code, state)) = text.split_once('#') else {
        return Err(LoginError::BadPaste);
    };
    if code.is_empty() || state != login.state {
        return Err(LoginError::BadPaste);
    }
    login.exchange(code, redirect_uri).await
}

fn persist(tokens: &Tokens) -> Result<(), CredFileError> {
    let path = credentials_file();
    // Keep whatever else the file holds (e.g. `mcpOAuth`).
    let mut doc = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Map<String, Value>>(&t).ok())
        .unwrap_or_default();
    let scopes: Vec<&str> = tokens
        .scope
        .as_deref()
        .unwrap_or(SCOPE)
        .split_whitespace()
        .collect();
    let expires_at = common::now_ms() + tokens.expires_in.unwrap_or(3600) * 1000;
    doc.insert(
        "claudeAiOauth".into(),
        json!({
            "accessToken": tokens.access_token,
            "refreshToken": tokens.refresh_token,
            "expiresAt": expires_at,
            "scopes": scopes,
            "subscriptionType": "max",
            "rateLimitTier": "default_claude_max_5x",
        }),
    );
    let text = serde_json::to_string(&Value::Object(doc)).unwrap_or_default();
    tracing::info!(
        access = common::prefix(&tokens.access_token),
        "writing .credentials.json"
    );
    creds::write_in_place_then_chmod(&path, text.as_bytes())
}

fn logged_in() -> bool {
    std::fs::read_to_string(credentials_file())
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v["claudeAiOauth"]["accessToken"]
                .as_str()
                .map(|s| !s.is_empty())
        })
        .unwrap_or(false)
}

fn status(text: bool) -> i32 {
    let ok = logged_in();
    if text {
        println!(
            "{}",
            if ok {
                "Logged in using Claude account (max)"
            } else {
                "Not logged in. Run claude auth login to authenticate."
            }
        );
    } else {
        let body = if ok {
            json!({"loggedIn": true, "authMethod": "claude.ai", "apiProvider": "firstParty", "subscriptionType": "max"})
        } else {
            json!({"loggedIn": false, "authMethod": "none", "apiProvider": "firstParty"})
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
    }
    if ok {
        0
    } else {
        1
    }
}

fn logout() -> i32 {
    let path = credentials_file();
    let Some(mut doc) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Map<String, Value>>(&t).ok())
    else {
        println!("Successfully logged out from your Anthropic account.");
        return 0;
    };
    doc.remove("claudeAiOauth");
    let text = serde_json::to_string(&Value::Object(doc)).unwrap_or_default();
    match creds::write_in_place_then_chmod(&path, text.as_bytes()) {
        Ok(()) => {
            println!("Successfully logged out from your Anthropic account.");
            0
        }
        Err(e) => {
            eprintln!("Failed to log out: {e}");
            1
        }
    }
}
