//! The egress channel: how traffic leaves a browser VM, which has no
//! network interface. Programs in the VM talk to the agent's local HTTP
//! proxies; for each proxied stream the agent opens a new vsock connection
//! to the host on the egress port (the agent port + [`EGRESS_PORT_OFFSET`]),
//! sends one [`EgressOpen`] frame naming the destination and which proxy
//! it came through, and reads one [`EgressReply`] frame. After `connected`
//! the connection carries the stream's raw bytes both ways; after
//! `refused` it is closed. The host decides, resolves names and connects;
//! the guest never sees an address it was not given.

use serde::{Deserialize, Serialize};

use crate::message::{check_len, InvalidMessage};

/// The egress port is the agent's port plus this.
pub const EGRESS_PORT_OFFSET: u32 = 1;

/// Largest [`EgressOpen`] or [`EgressReply`] frame (bytes).
pub const MAX_EGRESS_FRAME_BYTES: usize = 2048;

/// Longest host name (DNS allows 253 bytes).
pub const MAX_HOST_BYTES: usize = 253;

/// Longest refusal reason (bytes).
pub const MAX_REASON_BYTES: usize = 512;

/// Which program's proxy a stream came through; the host allows each a
/// different set of destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressClient {
    /// Chromium (the vendor's pages).
    Browser,
    /// The vendor CLI's login (token exchange, profile lookups).
    Login,
    /// The screen streamer (TURN over TCP only).
    Streamer,
    /// A command the host ran through the agent.
    Exec,
}

impl EgressClient {
    /// Every client, in a fixed order.
    pub const ALL: [EgressClient; 4] = [Self::Browser, Self::Login, Self::Streamer, Self::Exec];

    /// Its name in logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Browser => "browser",
            Self::Login => "login",
            Self::Streamer => "streamer",
            Self::Exec => "exec",
        }
    }
}

/// The agent asks for a stream to `host`:`port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressOpen {
    /// The proxy it came through.
    pub client: EgressClient,
    /// A DNS name or an IP address (IPv6 without brackets), as the program
    /// in the VM asked for it.
    pub host: String,
    /// The destination port.
    pub port: u16,
}

impl EgressOpen {
    /// Checks the destination's shape (not whether it is allowed).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        check_len("host", &self.host, MAX_HOST_BYTES)?;
        let bad = |problem: &str| {
            Err(InvalidMessage {
                field: "host",
                problem: problem.into(),
            })
        };
        if self.port == 0 {
            return Err(InvalidMessage {
                field: "port",
                problem: "port 0 is not a destination".into(),
            });
        }
        if self.host.parse::<std::net::IpAddr>().is_ok() {
            return Ok(());
        }
        if !is_host_name(&self.host) {
            return bad("not a DNS name or an IP address");
        }
        Ok(())
    }
}

/// True for a DNS name: dot-separated labels of 1 to 63 letters, digits,
/// `-` or `_`, neither starting nor ending with `-`.
pub fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_BYTES
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The host's answer to an [`EgressOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum EgressReply {
    /// The stream is open; raw bytes follow.
    Connected,
    /// Not allowed, or the destination could not be reached.
    Refused {
        /// Why, for the program's error page or message.
        reason: String,
    },
}

impl EgressReply {
    /// Checks sizes.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::Connected => Ok(()),
            Self::Refused { reason } => check_len("reason", reason, MAX_REASON_BYTES),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(host: &str, port: u16) -> EgressOpen {
        EgressOpen {
            client: EgressClient::Browser,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn destinations_are_names_or_addresses() {
        for ok in ["auth.openai.com", "10.0.0.1", "::1", "a_b.example", "x."] {
            assert!(open(ok, 443).validate().is_ok(), "{ok}");
        }
        for bad in ["", "a..b", "-a.com", "a b", "a/b", "[::1]", "a:1", "é.com"] {
            assert!(open(bad, 443).validate().is_err(), "{bad:?}");
        }
        assert!(open("a.com", 0).validate().is_err());
        assert!(open(&"a".repeat(254), 1).validate().is_err());
    }

    #[test]
    fn the_wire_form_is_tagged_camel_case() {
        let j = serde_json::to_string(&open("a.com", 443)).unwrap();
        assert_eq!(j, r#"{"client":"browser","host":"a.com","port":443}"#);
        let r: EgressReply = serde_json::from_str(r#"{"type":"refused","reason":"no"}"#).unwrap();
        assert_eq!(
            r,
            EgressReply::Refused {
                reason: "no".into()
            }
        );
    }
}
