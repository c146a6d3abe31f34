//! Operator bearer tokens: who may use the operator API over TCP. The
//! Unix socket needs none (its file mode and group decide who connects);
//! a TCP listener for the operator API needs `Authorization: Bearer` with
//! a token of `server.tokens_file`. Each line of that file is a name and a
//! token (`alice 3f9c...`): the name goes into audit lines, the token
//! never anywhere. Only the tokens' SHA-256 digests are kept, and a
//! presented token is compared with every one of them without stopping at
//! the first difference. Loaded by [`crate::listeners`]; the check is a
//! middleware on that listener's router.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::audit::Peer;

/// A token shorter than this (bytes) is refused when the file is loaded:
/// `openssl rand -hex 32` gives 64.
pub const MIN_TOKEN_LEN: usize = 32;
/// Tokens one file may hold; a larger file is a mistake.
const MAX_TOKENS: usize = 256;
/// Longest name (it goes into audit lines).
const MAX_NAME: usize = 64;

/// The tokens file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// It could not be read.
    #[error("cannot read the operator tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Others than its owner may read it.
    #[error("the operator tokens file {0} may be read by others than its owner: chmod 600 it")]
    Exposed(PathBuf),
    /// A line is not `name token`.
    #[error("the operator tokens file {path}, line {line}: {problem}")]
    Line {
        /// The file.
        path: PathBuf,
        /// Its line number (from 1).
        line: usize,
        /// What is wrong (never the token).
        problem: String,
    },
    /// It holds no token.
    #[error("the operator tokens file {0} holds no token: add a line `name token` (e.g. `ops $(openssl rand -hex 32)`)")]
    Empty(PathBuf),
}

/// One token's digest and its name.
#[derive(Clone)]
struct Entry {
    name: Arc<str>,
    digest: [u8; 32],
}

/// The tokens of a file (digests only; `Debug` shows the names).
#[derive(Clone)]
pub struct OperatorTokens {
    entries: Arc<[Entry]>,
}

impl std::fmt::Debug for OperatorTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|e| &*e.name).collect();
        f.debug_struct("OperatorTokens")
            .field("names", &names)
            .finish()
    }
}

impl OperatorTokens {
    /// Reads `path`: owner-only, lines `name token`, `#` comments.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let read = |source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.mode() & 0o077 != 0 {
            return Err(TokensError::Exposed(path.to_path_buf()));
        }
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(read)?);
        Self::parse(&text).map_err(|(line, problem)| match line {
            0 => TokensError::Empty(path.to_path_buf()),
            line => TokensError::Line {
                path: path.to_path_buf(),
                line,
                problem,
            },
        })
    }

    /// Parses the file's text; an error names the line (0: no token).
    fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let entry = parse_line(line).map_err(|p| (i + 1, p))?;
            if entries.iter().any(|e| e.name == entry.name) {
                return Err((i + 1, format!("the name {:?} is used twice", &*entry.name)));
            }
            if entries.len() == MAX_TOKENS {
                return Err((i + 1, format!("more than {MAX_TOKENS} tokens")));
            }
            entries.push(entry);
        }
        match entries.is_empty() {
            true => Err((0, String::new())),
            false => Ok(Self {
                entries: entries.into(),
            }),
        }
    }

    /// The name of the token `presented`, when it is one of these.
    pub fn check(&self, presented: &str) -> Option<Arc<str>> {
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        // Every entry is compared, whichever matches.
        for e in self.entries.iter() {
            if constant_time_eq(&e.digest, &digest) {
                found = Some(e.name.clone());
            }
        }
        found
    }
}

fn parse_line(line: &str) -> Result<Entry, String> {
    let mut words = line.split_whitespace();
    let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
        return Err("expected `name token` (two words)".into());
    };
    if name.len() > MAX_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(format!(
            "a name is up to {MAX_NAME} letters, digits and -_.@"
        ));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is shorter than {MIN_TOKEN_LEN} characters (`openssl rand -hex 32` makes one)"
        ));
    }
    Ok(Entry {
        name: name.into(),
        digest: sha256(token.as_bytes()),
    })
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares without returning at the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Middleware: a request without a valid operator token is refused (401).
/// On success the caller's [`Peer`] names the token, and the header is
/// removed so that no handler mistakes it for a viewer token.
pub async fn require(
    State(tokens): State<Arc<OperatorTokens>>,
    mut req: Request,
    next: Next,
) -> Response {
    if is_static_page(&req) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let name = match presented {
        None => return refuse("this API needs `Authorization: Bearer <token>` with a token of the operator tokens file (server.tokens_file)"),
        Some(t) => match tokens.check(t) {
            Some(name) => name,
            None => return refuse("the bearer token is not one of the operator tokens file (server.tokens_file)"),
        },
    };
    req.headers_mut().remove(header::AUTHORIZATION);
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
    req.extensions_mut().insert(peer.as_token(&name));
    next.run(req).await
}

/// The operator's page to start a session and the pages' assets: static,
/// no data in them, and a browser cannot send a bearer token when it
/// navigates (the page asks for the token and sends it itself).
fn is_static_page(req: &Request) -> bool {
    let path = req.uri().path();
    req.method() == axum::http::Method::GET
        && (path == "/session/new" || path.starts_with("/assets/"))
}

fn refuse(message: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn tokens_open_under_their_names_and_nothing_else_does() {
        let t = OperatorTokens::parse(&format!("# ops\nalice {A}\n\n bob  {B} \n")).unwrap();
        assert_eq!(t.check(A).as_deref(), Some("alice"));
        assert_eq!(t.check(B).as_deref(), Some("bob"));
        assert_eq!(t.check(&A[1..]), None);
        assert_eq!(t.check(""), None);
        assert!(!format!("{t:?}").contains(A), "Debug shows no token");
    }

    #[test]
    fn bad_files_are_refused_with_the_line_and_never_the_token() {
        let err = |text: &str| OperatorTokens::parse(text).err().unwrap();
        assert_eq!(err("").0, 0);
        assert_eq!(err("# nothing\n").0, 0);
        let (line, why) = err("alice short\n");
        assert_eq!(line, 1);
        assert!(why.contains("shorter"), "{why}");
        assert!(!why.contains("short\n"));
        assert_eq!(err(&format!("alice {A}\nalice {B}\n")).0, 2);
        assert_eq!(err(&format!("alice {A} extra\n")).0, 1);
        assert_eq!(err(&format!("al/ice {A}\n")).0, 1);
    }
}
