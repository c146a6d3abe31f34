//! STUN/TURN servers for viewers and the streamer, with short-lived TURN
//! credentials in the TURN REST scheme that coturn implements
//! (`use-auth-secret`): the username is `<expiry unix seconds>:<user>` and
//! the password is base64(HMAC-SHA1(shared secret, username)). The TURN
//! server checks the HMAC and refuses an expired username, so no TURN
//! password is ever stored or configured per user. Used by
//! `GET /api/webrtc/ice-servers`, the viewers' welcome and the
//! [`airlock_proto::stream::StreamSpec`] of each session.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_proto::stream::IceServer;
use airlock_proto::SecretText;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::hmac;

use crate::config::LiveConfig;

/// A TURN REST username and its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnCredential {
    /// `<expiry>:<user>`.
    pub username: String,
    /// base64(HMAC-SHA1(secret, username)); redacted in `Debug`.
    pub credential: SecretText,
}

/// Mints the credential for `user` expiring at `expiry` (Unix seconds).
/// Public so tests can mint credentials that are already expired.
pub fn rest_credential(secret: &str, user: &str, expiry: i64) -> TurnCredential {
    let username = format!("{expiry}:{}", turn_user(user));
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    let tag = hmac::sign(&key, username.as_bytes());
    TurnCredential {
        username,
        credential: SecretText(STANDARD.encode(tag.as_ref())),
    }
}

/// The user part of a TURN username. TURN servers split the username at
/// the first `:` and run it through SASLprep, so a user id with other
/// characters is replaced by a stable digest of itself.
fn turn_user(user: &str) -> String {
    let plain = !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._@+".contains(&b));
    if plain {
        return user.to_string();
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(user.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("u-{hex}")
}

/// The STUN and TURN servers for `user`, TURN credentials valid for `ttl`
/// from `now`.
pub fn ice_servers(cfg: &LiveConfig, user: &str, now: SystemTime, ttl: Duration) -> Vec<IceServer> {
    let mut servers = Vec::new();
    if !cfg.stun_urls.is_empty() {
        servers.push(IceServer {
            urls: cfg.stun_urls.clone(),
            username: None,
            credential: None,
        });
    }
    if !cfg.turn_urls.is_empty() && !cfg.turn_secret.is_empty() {
        let expiry = (now + ttl)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let c = rest_credential(cfg.turn_secret.expose(), user, expiry);
        servers.push(IceServer {
            urls: cfg.turn_urls.clone(),
            username: Some(c.username),
            credential: Some(c.credential),
        });
    }
    servers
}

/// The TURN servers a streamer without a network reaches through the
/// egress gateway: `(host, port)` of each `turn:` URL with
/// `transport=tcp` (UDP cannot cross a TCP proxy).
pub fn tcp_servers(cfg: &LiveConfig) -> Vec<(String, u16)> {
    cfg.turn_urls
        .iter()
        .filter(|u| u.starts_with("turn:") && u.contains("transport=tcp"))
        .filter_map(|u| {
            let rest = u.strip_prefix("turn:")?;
            let authority = rest.split('?').next()?;
            let (host, port) = match authority.strip_prefix('[') {
                Some(v6) => v6.split_once("]:")?,
                None => authority.rsplit_once(':').unwrap_or((authority, "3478")),
            };
            Some((host.to_ascii_lowercase(), port.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcp_servers_are_the_tcp_turn_urls() {
        let cfg = LiveConfig {
            turn_urls: vec![
                "turn:127.0.0.1:3478?transport=udp".into(),
                "turn:127.0.0.1:3478?transport=tcp".into(),
                "turn:Turn.Example.com?transport=tcp".into(),
                "turns:t.example.com:5349?transport=tcp".into(),
            ],
            ..LiveConfig::default()
        };
        assert_eq!(
            tcp_servers(&cfg),
            vec![
                ("127.0.0.1".into(), 3478),
                ("turn.example.com".into(), 3478)
            ]
        );
    }

    use super::*;
    use crate::config::ConfigSecret;

    #[test]
    fn the_credential_is_hmac_sha1_of_the_username() {
        // python3 -c 'import hmac,hashlib,base64;
        //   print(base64.b64encode(hmac.new(b"north-wind-secret",
        //   b"1700000000:alice", hashlib.sha1).digest()).decode())'
        let c = rest_credential("north-wind-secret", "alice", 1_700_000_000);
        assert_eq!(c.username, "1700000000:alice");
        assert_eq!(c.credential.0, "r/l6ttQtMIfbS2lfULS0mDRRNUg=");
        assert!(!format!("{c:?}").contains("r/l6"));
    }

    #[test]
    fn odd_user_ids_become_a_stable_digest() {
        let a = rest_credential("s", "Ana María:1", 5);
        let b = rest_credential("s", "Ana María:1", 5);
        assert_eq!(a, b);
        let user = a.username.strip_prefix("5:").unwrap();
        assert!(user.starts_with("u-") && !user.contains(':'), "{user}");
    }

    #[test]
    fn servers_carry_stun_and_expiring_turn_credentials() {
        let cfg = LiveConfig {
            stun_urls: vec!["stun:127.0.0.1:3478".into()],
            turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
            turn_secret: ConfigSecret::new("s3cret"),
            ..LiveConfig::default()
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let servers = ice_servers(&cfg, "bob", now, Duration::from_secs(60));
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].urls, ["stun:127.0.0.1:3478"]);
        assert!(servers[0].username.is_none());
        assert_eq!(servers[1].username.as_deref(), Some("1060:bob"));
        let expected = rest_credential("s3cret", "bob", 1060).credential;
        assert_eq!(servers[1].credential.as_ref(), Some(&expected));
        let none = ice_servers(&LiveConfig::default(), "bob", now, Duration::from_secs(60));
        assert!(none.is_empty());
    }
}
