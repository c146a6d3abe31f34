//! The demo CLI's plumbing: the environment contract
//! (`AIRLOCK_FAKE_OAUTH_URL`, `AIRLOCK_FAKE_CLI_TIMEOUT_SECS`), the usage
//! exit code, building the authorize URL, reading JWT claims and callback
//! query parameters.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

/// Env var naming the fake OAuth server's base URL.
pub const OAUTH_URL_VAR: &str = "AIRLOCK_FAKE_OAUTH_URL";
/// Env var overriding how long a login may take, in seconds.
pub const TIMEOUT_VAR: &str = "AIRLOCK_FAKE_CLI_TIMEOUT_SECS";

/// Exit code of a usage or configuration error (missing env, bad args).
pub const EXIT_USAGE: i32 = 2;

/// The environment was not usable.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// `AIRLOCK_FAKE_OAUTH_URL` is unset or empty.
    #[error("{OAUTH_URL_VAR} is not set: it must name the fake OAuth server, e.g. http://127.0.0.1:4000/demo/oauth")]
    MissingOAuthUrl,
    /// `AIRLOCK_FAKE_OAUTH_URL` is not an absolute http(s) URL.
    #[error("{OAUTH_URL_VAR}={0:?} is not an absolute http(s) URL")]
    BadOAuthUrl(String),
}

/// The fake OAuth server's base URL, without a trailing slash.
pub fn oauth_base() -> Result<String, EnvError> {
    let raw = std::env::var(OAUTH_URL_VAR).unwrap_or_default();
    let trimmed = raw.trim().trim_end_matches('/').to_string();
    if trimmed.is_empty() {
        return Err(EnvError::MissingOAuthUrl);
    }
    match url::Url::parse(&trimmed) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(trimmed),
        _ => Err(EnvError::BadOAuthUrl(trimmed)),
    }
}

/// [`oauth_base`], or the exit code after printing why not.
pub fn oauth_base_or_exit() -> Result<String, i32> {
    oauth_base().map_err(|e| {
        eprintln!("fake-cli: {e}");
        EXIT_USAGE
    })
}

/// How long a login may take: `AIRLOCK_FAKE_CLI_TIMEOUT_SECS`, else
/// `default`.
pub fn login_timeout(default: Duration) -> Duration {
    std::env::var(TIMEOUT_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(default, Duration::from_secs)
}

/// `$HOME`, or `/` when unset (as a login shell would have it).
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// The value of an env var that counts only when set and non-empty.
pub fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Percent-encodes everything but RFC 3986 unreserved characters, as the
/// `urlencoding` crate does (spaces become `%20`).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `{base}/authorize?k=v&…`, encoded with [`encode`], in the given order.
pub fn authorize_url(base: &str, pairs: &[(&str, &str)]) -> String {
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    format!("{base}/authorize?{}", query.join("&"))
}

/// The claims of a JWT-shaped token, if its payload decodes.
pub fn jwt_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Query parameters of a request target such as `/cb?code=x&state=y`.
pub fn query_params(target: &str) -> std::collections::HashMap<String, String> {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_matches_urlencoding() {
        assert_eq!(encode("openid profile"), "openid%20profile");
        assert_eq!(
            encode("http://localhost:1460/auth/callback"),
            "http%3A%2F%2Flocalhost%3A1460%2Fauth%2Fcallback"
        );
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
    }

    #[test]
    fn query_params_are_decoded() {
        let q = query_params("/auth/callback?code=a%2Bb&state=s+1");
        assert_eq!(q.get("code").map(String::as_str), Some("a+b"));
        assert_eq!(q.get("state").map(String::as_str), Some("s 1"));
    }
}
