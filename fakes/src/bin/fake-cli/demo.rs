//! `airlock-demo-cli`, the CLI of airlock's built-in "demo" provider:
//! `login`, `status`, `logout`. It has no real counterpart; its login is
//! shaped like Codex's (fixed loopback port 1460, falling back to 1461 when
//! busy, redirect `http://localhost:{port}/auth/callback`, browser opened
//! like the `webbrowser` crate) but simpler: the login ends as soon as the
//! callback is handled, and the credentials are written atomically (temp
//! file + rename) to `$AIRLOCK_DEMO_HOME/credentials.json` (default
//! `~/.airlock-demo/credentials.json`), mode 0600.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::common::{self, EXIT_USAGE};
use crate::creds::{self, CredFileError};
use crate::exchange::{self, ExchangeError, Tokens};
use crate::loopback::{Incoming, Loopback, Reply};
use crate::opener;
use airlock_fakes::oauth::clients::DEMO as CLIENT_ID;
use airlock_fakes::pkce::{self, PkcePair};

const PORTS: [u16; 2] = [1460, 1461];
const SCOPE: &str = "openid profile email offline_access";

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Both ports are taken.
    #[error("ports 1460 and 1461 are both in use: {0}")]
    Ports(#[source] std::io::Error),
    /// The provider sent an error.
    #[error("sign-in failed: {0}")]
    Callback(String),
    /// The exchange failed.
    #[error("token exchange failed: {0}")]
    Exchange(#[source] ExchangeError),
    /// Saving failed.
    #[error("could not save credentials: {0}")]
    Persist(#[source] CredFileError),
    /// No callback in time.
    #[error("login timed out after {0} seconds")]
    TimedOut(u64),
    /// The callback server stopped.
    #[error("login was not completed")]
    NotCompleted,
}

/// `credentials.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Credentials {
    access_token: String,
    refresh_token: Option<String>,
    user: String,
    /// Milliseconds since the Unix epoch.
    expires_at: u64,
}

/// Runs `airlock-demo-cli <args>` and returns the exit code.
pub async fn run(args: &[String]) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["login"] => login().await,
        ["status"] => status(),
        ["logout"] => logout(),
        _ => {
            eprintln!("Usage: airlock-demo-cli login | status | logout");
            EXIT_USAGE
        }
    }
}

fn credentials_file() -> PathBuf {
    common::env_nonempty("AIRLOCK_DEMO_HOME")
        .map_or_else(|| common::home_dir().join(".airlock-demo"), PathBuf::from)
        .join("credentials.json")
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
        Ok(user) => {
            eprintln!("Logged in as {user}");
            0
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}

async fn bind() -> Result<Loopback, LoginError> {
    match Loopback::bind(SocketAddr::from(([127, 0, 0, 1], PORTS[0]))).await {
        Ok(server) => Ok(server),
        Err(_) => Loopback::bind(SocketAddr::from(([127, 0, 0, 1], PORTS[1])))
            .await
            .map_err(LoginError::Ports),
    }
}

async fn flow(base: &str) -> Result<String, LoginError> {
    let mut server = bind().await?;
    let redirect_uri = format!("http://localhost:{}/auth/callback", server.port());
    let (pkce, state) = (pkce::generate(), pkce::random_urlsafe(32));
    let url = common::authorize_url(
        base,
        &[
            ("response_type", "code"),
            ("client_id", CLIENT_ID),
            ("redirect_uri", &redirect_uri),
            ("scope", SCOPE),
            ("code_challenge", &pkce.challenge),
            ("code_challenge_method", "S256"),
            ("state", &state),
        ],
    );
    let _ = opener::open_like_webbrowser_crate(&url);
    eprintln!(
        "Listening on http://localhost:{}.\nOpen this URL to sign in:\n\n{url}\n",
        server.port()
    );
    while let Some(req) = server.next().await {
        if let Some(result) = callback(base, req, &redirect_uri, &pkce, &state).await {
            return result;
        }
    }
    Err(LoginError::NotCompleted)
}

async fn callback(
    base: &str,
    req: Incoming,
    redirect_uri: &str,
    pkce: &PkcePair,
    state: &str,
) -> Option<Result<String, LoginError>> {
    if req.path() != "/auth/callback" {
        req.respond(Reply::text(404, "Not Found")).await;
        return None;
    }
    let q = req.query();
    if q.get("state").map(String::as_str) != Some(state) {
        req.respond(Reply::text(400, "State mismatch")).await;
        return None;
    }
    if let Some(error) = q.get("error") {
        let detail = q
            .get("error_description")
            .map_or(error.clone(), |d| format!("{error}: {d}"));
        req.respond(Reply::html(200, &page("Sign-in failed", &detail)))
            .await;
        return Some(Err(LoginError::Callback(detail)));
    }
    let code = q.get("code").cloned().unwrap_or_default();
    let params = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", redirect_uri),
        ("client_id", CLIENT_ID),
        ("code_verifier", pkce.verifier.as_str()),
    ];
    let result = match exchange::token_form(base, &params).await {
        Ok(tokens) => persist(&tokens).map_err(LoginError::Persist),
        Err(e) => Err(LoginError::Exchange(e)),
    };
    let reply = match &result {
        Ok(user) => page(
            "Signed in",
            &format!("airlock demo CLI is signed in as {user}. You can close this window."),
        ),
        Err(e) => page("Sign-in failed", &e.to_string()),
    };
    req.respond(Reply::html(200, &reply)).await;
    Some(result)
}

fn page(title: &str, text: &str) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body><h1>{t}</h1><p id=\"demo-result\">{x}</p></body></html>",
        t = esc(title),
        x = esc(text)
    )
}

fn persist(tokens: &Tokens) -> Result<String, CredFileError> {
    let claims = tokens
        .id_token
        .as_deref()
        .and_then(common::jwt_claims)
        .unwrap_or_default();
    let user = claims["email"]
        .as_str()
        .or(claims["sub"].as_str())
        .unwrap_or("unknown")
        .to_string();
    let creds = Credentials {
        access_token: tokens.access_token.clone(),
        refresh_token: tokens.refresh_token.clone(),
        user: user.clone(),
        expires_at: common::now_ms() + tokens.expires_in.unwrap_or(3600) * 1000,
    };
    let text = serde_json::to_string_pretty(&creds).unwrap_or_default();
    creds::write_atomic(&credentials_file(), text.as_bytes())?;
    Ok(user)
}

fn status() -> i32 {
    let creds = std::fs::read_to_string(credentials_file())
        .ok()
        .and_then(|t| serde_json::from_str::<Credentials>(&t).ok())
        .filter(|c| !c.access_token.is_empty());
    match creds {
        Some(c) => {
            eprintln!("Logged in as {}", c.user);
            0
        }
        None => {
            eprintln!("Not logged in");
            1
        }
    }
}

fn logout() -> i32 {
    match std::fs::remove_file(credentials_file()) {
        Ok(()) => {
            eprintln!("Logged out");
            0
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("Not logged in");
            0
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}
