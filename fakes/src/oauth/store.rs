//! The fake server's in-memory records: sign-in requests in progress,
//! authorization codes, device grants and refresh tokens. Plain data; the
//! rules live in the handlers (`flow`, `token`), which hold the lock only
//! between awaits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::Rng;

use super::OAuthEvent;

/// Characters of user codes: RFC 8628 §6.1 suggests consonants only, so
/// no vowels spell words and no 0/O or 1/I confusion is possible.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// Everything the server remembers.
#[derive(Default)]
pub(super) struct Store {
    /// Recorded events, oldest first.
    pub events: Vec<OAuthEvent>,
    /// Sign-in requests in progress, by the hidden request id in the forms.
    pub pending: HashMap<String, Pending>,
    /// Authorization codes, by code.
    pub codes: HashMap<String, CodeGrant>,
    /// Device grants, by device code.
    pub devices: HashMap<String, DeviceGrant>,
    /// Refresh tokens, by token.
    pub refresh: HashMap<String, RefreshGrant>,
    /// Access tokens, by token.
    pub access: HashMap<String, AccessGrant>,
    /// Tests: every code exchange is refused (`invalid_grant`), as a
    /// vendor does when it has revoked or never issued the code.
    pub refuse_codes: bool,
    /// Tests: the redirect after consent carries a `state` the client did
    /// not send.
    pub tamper_state: bool,
    /// Tests: the redirect after consent goes to `/favicon.ico` on the
    /// redirect URI's origin instead.
    pub stray_callback: bool,
}

/// The parameters of an accepted `/authorize` request.
#[derive(Debug, Clone)]
pub(super) struct AuthRequest {
    pub client_id: String,
    pub redirect_uri: String,
    pub state: Option<String>,
    pub challenge: String,
    pub scope: String,
}

/// What a sign-in is for.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// An authorization-code request: ends in a redirect with a code.
    Code(AuthRequest),
    /// Approving a device: ends in a page saying so.
    Device { device_code: String },
}

/// A sign-in in progress.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub target: Target,
    /// Set once the right password was given; consent needs it.
    pub user: Option<String>,
}

/// An issued authorization code.
#[derive(Debug)]
pub(super) struct CodeGrant {
    pub req: AuthRequest,
    pub user: String,
    pub issued: Instant,
    /// Set on the first redemption attempt; any later one is a reuse.
    pub used: bool,
    /// Refresh tokens issued from this code, revoked if it is reused
    /// (RFC 6749 §4.1.2).
    pub refresh_tokens: Vec<String>,
}

/// Where a device grant stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeviceStatus {
    Pending,
    Approved(String),
    Denied,
    Redeemed,
}

/// An issued device code.
#[derive(Debug)]
pub(super) struct DeviceGrant {
    pub client_id: String,
    pub scope: String,
    pub user_code: String,
    pub status: DeviceStatus,
    pub issued: Instant,
    pub interval: Duration,
    pub last_poll: Option<Instant>,
}

/// An issued refresh token.
#[derive(Debug)]
pub(super) struct RefreshGrant {
    pub client_id: String,
    pub user: String,
    pub scope: String,
    pub revoked: bool,
}

/// An issued access token.
#[derive(Debug)]
pub(super) struct AccessGrant {
    pub client_id: String,
    pub user: String,
    pub scope: String,
    pub expires: Instant,
}

impl Store {
    /// The device code whose user code is `typed` (case, spaces and dashes
    /// ignored, as RFC 8628 §6.1 recommends), if it is still usable.
    pub fn device_by_user_code(&self, typed: &str, ttl: Duration) -> Option<String> {
        let wanted = normalise_user_code(typed);
        self.devices
            .iter()
            .find(|(_, g)| {
                normalise_user_code(&g.user_code) == wanted
                    && g.status == DeviceStatus::Pending
                    && g.issued.elapsed() < ttl
            })
            .map(|(code, _)| code.clone())
    }
}

/// A fresh user code such as `WDJB-MJHT`.
pub(super) fn new_user_code() -> String {
    let mut rng = rand::rng();
    let mut pick = || USER_CODE_ALPHABET[rng.random_range(0..USER_CODE_ALPHABET.len())] as char;
    let first: String = (0..4).map(|_| pick()).collect();
    let second: String = (0..4).map(|_| pick()).collect();
    format!("{first}-{second}")
}

fn normalise_user_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_have_the_rfc_shape() {
        let code = new_user_code();
        assert_eq!(code.len(), 9);
        assert_eq!(&code[4..5], "-");
        assert!(code
            .bytes()
            .filter(|b| *b != b'-')
            .all(|b| USER_CODE_ALPHABET.contains(&b)));
    }

    #[test]
    fn typed_user_codes_match_loosely() {
        let mut store = Store::default();
        store.devices.insert(
            "dev".into(),
            DeviceGrant {
                client_id: "codex-cli".into(),
                scope: String::new(),
                user_code: "WDJB-MJHT".into(),
                status: DeviceStatus::Pending,
                issued: Instant::now(),
                interval: Duration::from_secs(5),
                last_poll: None,
            },
        );
        let ttl = Duration::from_secs(60);
        assert_eq!(
            store.device_by_user_code(" wdjb mjht ", ttl).as_deref(),
            Some("dev")
        );
        assert_eq!(store.device_by_user_code("WDJBMJHX", ttl), None);
        assert_eq!(store.device_by_user_code("WDJB-MJHT", Duration::ZERO), None);
    }
}
