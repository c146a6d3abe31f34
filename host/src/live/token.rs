//! Viewer tokens: the secret in a viewer link (`/session/<id>?token=...`)
//! that lets a person watch and drive one session's browser.
//!
//! Each session holds its own [`TokenSet`], so a token only ever opens the
//! session it was minted for. Across a restart of airlockd a session keeps
//! its tokens by their SHA-256 digests ([`TokenDigest`]), never the tokens. Tokens are 256 bits from the system CSPRNG
//! (base64url), expire, are compared in constant time, and never appear in
//! `Debug` output. Viewer ids (short, not secret) come from here too. Used
//! by [`super::hub`].

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Tokens kept per session; minting more forgets the oldest.
const MAX_TOKENS: usize = 16;

/// Bytes of randomness in a token.
const TOKEN_BYTES: usize = 32;

/// Why a presented token does not open a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// None was given.
    #[error("this needs the session's viewer token: add ?token=<viewerToken> or an `Authorization: Bearer` header (from POST /api/auth/start or GET /api/auth/session/:id)")]
    Missing,
    /// It is not a token of this session.
    #[error("the viewer token is not valid for this session; use the viewerUrl of this session")]
    Wrong,
    /// It was valid and has expired.
    #[error("the viewer token expired at {0}; mint a new link with POST /api/auth/session/:id/viewer-token")]
    Expired(String),
    /// The system's random source failed.
    #[error("cannot draw random bytes for a token")]
    Random,
}

/// A viewer token: a secret whose `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ViewerToken(String);

impl std::fmt::Debug for ViewerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewerToken(<redacted>)")
    }
}

impl ViewerToken {
    /// A fresh random token.
    pub fn mint() -> Result<Self, TokenError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TokenError::Random)?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The token itself, to hand to its viewer (never to a log).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with what a client presented.
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

/// Compares without returning early on the first difference, so the time
/// taken does not tell an attacker how much of a guess was right. Lengths
/// are public (every token has the same).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A token and when it stops working.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The token.
    pub token: ViewerToken,
    /// Its expiry.
    pub expires: SystemTime,
}

/// A token as it is kept across a restart of airlockd (with its session,
/// see `session::persist`): its SHA-256 and its expiry. The token itself
/// is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenDigest {
    /// SHA-256 of the token, lowercase hex.
    pub sha256: String,
    /// Its expiry (Unix ms).
    pub expires_ms: u64,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The tokens of one session: those minted here, and those of an earlier
/// airlockd known by their digests.
#[derive(Debug, Default)]
pub struct TokenSet {
    issued: VecDeque<IssuedToken>,
    restored: Vec<([u8; 32], SystemTime)>,
}

impl TokenSet {
    /// Mints a token valid for `ttl` from `now`.
    pub fn issue(&mut self, now: SystemTime, ttl: Duration) -> Result<IssuedToken, TokenError> {
        let issued = IssuedToken {
            token: ViewerToken::mint()?,
            expires: now + ttl,
        };
        self.issued.retain(|t| t.expires > now);
        while self.issued.len() >= MAX_TOKENS {
            self.issued.pop_front();
        }
        self.issued.push_back(issued.clone());
        Ok(issued)
    }

    /// Checks a presented token; on success returns its expiry. Every
    /// issued token is compared (no early exit), so timing does not reveal
    /// which one matched.
    pub fn check(
        &self,
        presented: Option<&str>,
        now: SystemTime,
    ) -> Result<SystemTime, TokenError> {
        let presented = presented
            .filter(|p| !p.is_empty())
            .ok_or(TokenError::Missing)?;
        let mut found = None;
        for t in &self.issued {
            if t.token.matches(presented) {
                found = Some(t.expires);
            }
        }
        let hashed = digest(presented);
        for (d, expires) in &self.restored {
            if constant_time_eq(d, &hashed) {
                found = Some(*expires);
            }
        }
        match found {
            None => Err(TokenError::Wrong),
            Some(expires) if expires <= now => Err(TokenError::Expired(
                humantime::format_rfc3339_seconds(expires).to_string(),
            )),
            Some(expires) => Ok(expires),
        }
    }

    /// The newest token still valid at `now`.
    pub fn latest(&self, now: SystemTime) -> Option<&IssuedToken> {
        self.issued.back().filter(|t| t.expires > now)
    }

    /// True when no token is valid any more.
    pub fn all_expired(&self, now: SystemTime) -> bool {
        self.issued.iter().all(|t| t.expires <= now) && self.restored.iter().all(|(_, e)| *e <= now)
    }

    /// The digests of the tokens still valid at `now`, to keep them valid
    /// across a restart.
    pub fn digests(&self, now: SystemTime) -> Vec<TokenDigest> {
        let issued = self
            .issued
            .iter()
            .map(|t| (digest(t.token.expose()), t.expires));
        issued
            .chain(self.restored.iter().copied())
            .filter(|(_, e)| *e > now)
            .map(|(d, e)| TokenDigest {
                sha256: d.iter().map(|b| format!("{b:02x}")).collect(),
                expires_ms: unix_ms(e),
            })
            .collect()
    }

    /// Takes the tokens an earlier airlockd issued (by digest), at most
    /// [`MAX_TOKENS`]; a malformed digest is skipped.
    pub fn restore(&mut self, digests: &[TokenDigest]) {
        for d in digests.iter().rev().take(MAX_TOKENS) {
            let bytes: Option<Vec<u8>> = (0..d.sha256.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(d.sha256.get(i..i + 2)?, 16).ok())
                .collect();
            if let Some(Ok(hash)) = bytes.map(<[u8; 32]>::try_from) {
                let expires = SystemTime::UNIX_EPOCH + Duration::from_millis(d.expires_ms);
                self.restored.push((hash, expires));
            }
        }
    }
}

/// A viewer id: short, random, made of characters the protocol accepts in
/// ids (`v-` and 10 lowercase letters or digits). Not a secret.
pub fn viewer_id() -> Result<String, TokenError> {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 10];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::Random)?;
    let tail: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    Ok(format!("v-{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(900);

    #[test]
    fn tokens_are_long_random_and_url_safe() {
        let a = ViewerToken::mint().unwrap();
        let b = ViewerToken::mint().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 43, "256 bits in base64url");
        assert!(a
            .expose()
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn a_token_opens_only_its_own_session_and_only_until_it_expires() {
        let now = SystemTime::now();
        let (mut mine, mut other) = (TokenSet::default(), TokenSet::default());
        let t = mine.issue(now, TTL).unwrap();
        let o = other.issue(now, TTL).unwrap();
        assert_eq!(mine.check(Some(t.token.expose()), now), Ok(now + TTL));
        assert_eq!(
            mine.check(Some(o.token.expose()), now),
            Err(TokenError::Wrong)
        );
        assert_eq!(mine.check(None, now), Err(TokenError::Missing));
        assert_eq!(mine.check(Some(""), now), Err(TokenError::Missing));
        let mut truncated = t.token.expose().to_string();
        truncated.pop();
        assert_eq!(mine.check(Some(&truncated), now), Err(TokenError::Wrong));
        let later = now + TTL;
        assert!(matches!(
            mine.check(Some(t.token.expose()), later),
            Err(TokenError::Expired(_))
        ));
        assert!(mine.all_expired(later));
        assert!(mine.latest(later).is_none());
    }

    #[test]
    fn several_tokens_work_at_once_and_the_oldest_are_forgotten() {
        let now = SystemTime::now();
        let mut set = TokenSet::default();
        let first = set.issue(now, TTL).unwrap();
        let second = set.issue(now, TTL).unwrap();
        assert!(set.check(Some(first.token.expose()), now).is_ok());
        assert_eq!(set.latest(now).unwrap().token, second.token);
        for _ in 0..MAX_TOKENS {
            set.issue(now, TTL).unwrap();
        }
        assert_eq!(
            set.check(Some(first.token.expose()), now),
            Err(TokenError::Wrong)
        );
    }

    #[test]
    fn tokens_outlive_a_restart_by_their_digests_only() {
        let now = SystemTime::now();
        let mut before = TokenSet::default();
        let t = before.issue(now, TTL).unwrap();
        let old = before.issue(now - TTL * 2, TTL).unwrap();
        let kept = before.digests(now);
        assert_eq!(kept.len(), 1, "the expired one is not kept");
        let text = serde_json::to_string(&kept).unwrap();
        assert!(!text.contains(t.token.expose()), "no token at rest");
        let mut after = TokenSet::default();
        after.restore(&serde_json::from_str::<Vec<TokenDigest>>(&text).unwrap());
        let expires = after.check(Some(t.token.expose()), now).unwrap();
        assert_eq!(unix_ms(expires), unix_ms(now + TTL));
        assert_eq!(
            after.check(Some(old.token.expose()), now),
            Err(TokenError::Wrong)
        );
        let mut truncated = t.token.expose().to_string();
        truncated.pop();
        assert_eq!(after.check(Some(&truncated), now), Err(TokenError::Wrong));
        assert!(after.latest(now).is_none(), "no link can be shown for it");
        assert!(!after.all_expired(now));
        assert!(after.all_expired(now + TTL));
        after.restore(&[TokenDigest {
            sha256: "zz".into(),
            expires_ms: 1,
        }]);
        assert_eq!(after.digests(now).len(), 1, "a malformed digest is skipped");
    }

    #[test]
    fn viewer_ids_pass_the_protocol_check() {
        let id = viewer_id().unwrap();
        let v = airlock_proto::stream::ViewerSignal {
            viewer_id: id,
            signal: airlock_proto::stream::Signal::KeyFrame,
        };
        v.validate().unwrap();
    }
}
