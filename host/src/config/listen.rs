//! Where airlockd listens, and who may reach what: the operator API on a
//! Unix socket (file mode and group decide who connects) and, when asked,
//! on TCP (bearer tokens, and TLS unless on loopback); the viewer surface
//! on a TCP listener of its own that serves nothing but viewer-token
//! routes. Part of [`super::Config`]; the checks here refuse the
//! combinations that would expose the operator API, with what to set.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The operator API: VMs (exec, files), sessions, metrics, health.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Its Unix socket; none: `<paths.run_dir>/api.sock`.
    pub socket: Option<PathBuf>,
    /// The socket's permission bits (owner and group only).
    pub socket_mode: u32,
    /// The socket's group (a name), whose members may use the API.
    pub socket_group: Option<String>,
    /// A TCP address for it too; needs `tokens_file`, and TLS when it is
    /// not loopback.
    pub listen: Option<SocketAddr>,
    /// Operator tokens for TCP: lines `name token` (owner-only file).
    pub tokens_file: Option<PathBuf>,
    /// PEM certificate chain; with `tls_key`, the TCP listener is HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Largest request body accepted (bytes).
    pub max_body_bytes: usize,
    /// How long in-flight requests may finish after SIGTERM (ms).
    pub shutdown_grace_ms: u64,
    /// Names requests may give as their `Host` besides the bound address
    /// (and `localhost` when that is loopback or the socket): `host` for
    /// any port or `host:port`. Others are refused (421), and so are
    /// WebSocket and state-changing requests from another site's page
    /// (403).
    pub allowed_hosts: Vec<String>,
    /// Connections open at once, per listener; further ones wait.
    pub max_connections: usize,
    /// A connection that has not sent a request's headers within this is
    /// closed (ms).
    pub header_read_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: None,
            socket_mode: 0o660,
            socket_group: None,
            listen: None,
            tokens_file: None,
            tls_cert: None,
            tls_key: None,
            max_body_bytes: 4 << 20,
            shutdown_grace_ms: 5000,
            allowed_hosts: Vec::new(),
            max_connections: 1024,
            header_read_timeout_ms: 10_000,
        }
    }
}

impl ServerConfig {
    /// Refuses an operator API anyone on the network could use.
    pub(super) fn validate(&self) -> Result<(), String> {
        tls_pair("server", &self.tls_cert, &self.tls_key)?;
        hosts("server", &self.allowed_hosts)?;
        if self.socket_mode & !0o770 != 0 {
            return Err(format!(
                "server.socket_mode {:#o} lets others than the owner and group connect: the operator API runs commands in every VM; use 0o600 or 0o660",
                self.socket_mode
            ));
        }
        if let Some(addr) = self.listen {
            if self.tokens_file.is_none() {
                return Err(format!(
                    "server.listen = {addr:?} puts the operator API (commands in every VM, credentials) on TCP: set server.tokens_file to a file of `name token` lines, or drop server.listen and use the Unix socket (server.socket)"
                ));
            }
            if !addr.ip().is_loopback() && self.tls_cert.is_none() {
                return Err(format!(
                    "server.listen = {addr:?} is not loopback: operator tokens would cross the network in clear; set server.tls_cert and server.tls_key"
                ));
            }
        }
        if self.max_connections == 0 || self.header_read_timeout_ms == 0 {
            return Err(
                "server.max_connections and server.header_read_timeout_ms must be above 0".into(),
            );
        }
        Ok(())
    }
}

/// The viewers' surface: the viewer page, its socket, the session's
/// events for it, ICE servers and the HTTP offer/answer, each opened by a
/// viewer token alone. Meant to face the internet, behind TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ViewerConfig {
    /// Its TCP address; none: no viewer listener (only operators, on
    /// their own listeners, can watch).
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain; with `tls_key`, it serves HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// What viewer links start with (`https://view.example.com`), when
    /// people reach this listener under another name (a proxy); default:
    /// the bound address.
    pub public_url: Option<String>,
    /// Names requests may give as their `Host`, as `server.allowed_hosts`
    /// (the public URL's host is added).
    pub allowed_hosts: Vec<String>,
}

impl Default for ViewerConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 4001))),
            tls_cert: None,
            tls_key: None,
            public_url: None,
            allowed_hosts: Vec::new(),
        }
    }
}

impl ViewerConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        tls_pair("viewer", &self.tls_cert, &self.tls_key)?;
        hosts("viewer", &self.allowed_hosts)?;
        let public = match &self.public_url {
            Some(url) => Some(public_authority(url).ok_or_else(|| {
                format!("viewer.public_url {url:?} must be http(s)://host[:port], with no path")
            })?),
            None => None,
        };
        if let Some(addr) = self.listen {
            let behind_tls = self.tls_cert.is_some()
                || self
                    .public_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https://"));
            if addr.ip().is_unspecified() && self.public_url.is_none() {
                return Err(format!(
                    "viewer.listen = {addr:?} is every interface: set viewer.public_url to the address people open (viewer links start with it)"
                ));
            }
            if !addr.ip().is_loopback() && !behind_tls {
                return Err(format!(
                    "viewer.listen = {addr:?} is not loopback: viewer tokens would cross the network in clear; set viewer.tls_cert and viewer.tls_key, or a viewer.public_url of https:// for a TLS proxy in front"
                ));
            }
        }
        if let Some((_, authority)) = public {
            if !crate::api::hosts::valid_entry(authority) {
                return Err(format!(
                    "viewer.public_url: {authority:?} is not a host name or host:port"
                ));
            }
        }
        Ok(())
    }

    /// The public URL's `host[:port]`, to allow as a `Host`.
    pub fn public_host(&self) -> Option<String> {
        let url = self.public_url.as_deref()?;
        public_authority(url).map(|(_, a)| a.to_string())
    }
}

/// `(scheme, authority)` of `scheme://authority` with no path.
fn public_authority(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let ok = matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@']);
    ok.then_some((scheme, rest))
}

fn tls_pair(section: &str, cert: &Option<PathBuf>, key: &Option<PathBuf>) -> Result<(), String> {
    match cert.is_some() == key.is_some() {
        true => Ok(()),
        false => Err(format!(
            "{section}.tls_cert and {section}.tls_key must be set together"
        )),
    }
}

fn hosts(section: &str, entries: &[String]) -> Result<(), String> {
    match entries.iter().find(|e| !crate::api::hosts::valid_entry(e)) {
        Some(e) => Err(format!(
            "{section}.allowed_hosts: {e:?} is not a host name or host:port (no scheme, no path)"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addr: &str) -> ServerConfig {
        ServerConfig {
            listen: Some(addr.parse().unwrap()),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn the_operator_api_on_tcp_needs_tokens_and_off_loopback_tls() {
        assert!(
            ServerConfig::default().validate().is_ok(),
            "the socket alone"
        );
        let e = tcp("127.0.0.1:4000").validate().unwrap_err();
        assert!(e.contains("server.tokens_file"), "{e}");
        let with_tokens = ServerConfig {
            tokens_file: Some("/etc/airlock/tokens".into()),
            ..tcp("127.0.0.1:4000")
        };
        assert!(with_tokens.validate().is_ok());
        let exposed = ServerConfig {
            listen: Some("0.0.0.0:4000".parse().unwrap()),
            ..with_tokens.clone()
        };
        let e = exposed.validate().unwrap_err();
        assert!(e.contains("server.tls_cert"), "{e}");
        let tls = ServerConfig {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..exposed
        };
        assert!(tls.validate().is_ok());
        let open = ServerConfig {
            socket_mode: 0o666,
            ..ServerConfig::default()
        };
        assert!(open.validate().unwrap_err().contains("socket_mode"));
    }

    #[test]
    fn viewers_off_loopback_need_tls_here_or_in_front() {
        let v = |listen: &str, public: Option<&str>| ViewerConfig {
            listen: Some(listen.parse().unwrap()),
            public_url: public.map(String::from),
            ..ViewerConfig::default()
        };
        assert!(ViewerConfig::default().validate().is_ok());
        assert!(v("0.0.0.0:4001", None).validate().is_err());
        assert!(v("0.0.0.0:4001", Some("http://view.example.com"))
            .validate()
            .is_err());
        assert!(v("0.0.0.0:4001", Some("https://view.example.com"))
            .validate()
            .is_ok());
        let tls_everywhere = ViewerConfig {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..v("0.0.0.0:4001", None)
        };
        let e = tls_everywhere.validate().unwrap_err();
        assert!(
            e.contains("viewer.public_url"),
            "links to 0.0.0.0 reach nobody: {e}"
        );
        let tls_one_address = ViewerConfig {
            listen: Some("192.0.2.7:4001".parse().unwrap()),
            ..tls_everywhere
        };
        assert!(tls_one_address.validate().is_ok());
        assert!(v("127.0.0.1:4001", Some("https://view.example.com/x"))
            .validate()
            .is_err());
        assert_eq!(
            v("127.0.0.1:4001", Some("https://view.example.com:8443/"))
                .public_host()
                .as_deref(),
            Some("view.example.com:8443")
        );
    }
}
