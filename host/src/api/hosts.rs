//! Which names a request may use for airlockd. The `Host` header (or an
//! HTTP/2 authority) must name this server, or a page on any site could
//! drive the API from the operator's own browser by DNS rebinding; and a
//! browser's `Origin` on a WebSocket upgrade or a state-changing request
//! must be this server too, so no other site's page can act through a
//! person's browser. Built by the daemon from the bound address and
//! `[server] allowed_hosts`; applied to every route by [`super::router`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Longest name quoted back in an error.
const MAX_QUOTED: usize = 80;

/// One allowed name: a host, and a port unless any port will do.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Name {
    host: String,
    port: Option<u16>,
}

/// The names requests may use.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    names: Vec<Name>,
    /// The config section whose `allowed_hosts` adds names.
    section: &'static str,
}

impl AllowedHosts {
    /// The bound address (with `localhost` and both loopback addresses
    /// when it is loopback or unspecified), plus `extra` names from the
    /// config (`host` for any port, `host:port` for one).
    pub fn new(bound: SocketAddr, extra: &[String]) -> Self {
        let port = Some(bound.port());
        let mut names = Vec::new();
        let ip = bound.ip();
        if ip.is_loopback() || ip.is_unspecified() {
            for host in ["localhost", "127.0.0.1", "[::1]"] {
                names.push(Name {
                    host: host.into(),
                    port,
                });
            }
        }
        if !ip.is_unspecified() {
            names.push(Name {
                host: ip_host(ip),
                port,
            });
        }
        names.extend(extra.iter().filter_map(|e| parse_authority(e)));
        Self {
            names,
            section: "server",
        }
    }

    /// For a Unix socket: `localhost` (what HTTP clients on a socket
    /// send, on any port), plus `extra` names.
    pub fn for_socket(extra: &[String]) -> Self {
        let mut names = vec![Name {
            host: "localhost".into(),
            port: None,
        }];
        names.extend(extra.iter().filter_map(|e| parse_authority(e)));
        Self {
            names,
            section: "server",
        }
    }

    /// The same names, added to by `[section] allowed_hosts` (for the
    /// error message).
    pub fn in_section(self, section: &'static str) -> Self {
        Self { section, ..self }
    }

    /// True when `authority` (`host` or `host:port`) is an allowed name.
    pub fn allows(&self, authority: &str) -> bool {
        let Some(a) = parse_authority(authority) else {
            return false;
        };
        self.names
            .iter()
            .any(|n| n.host == a.host && (n.port.is_none() || n.port == a.port))
    }

    /// True when `origin` (`scheme://host[:port]`) is this server.
    fn allows_origin(&self, origin: &str) -> bool {
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false;
        };
        matches!(scheme, "http" | "https") && !authority.contains('/') && self.allows(authority)
    }
}

/// Checks a valid config entry: a host, or a host and port.
pub fn valid_entry(entry: &str) -> bool {
    parse_authority(entry).is_some()
}

/// Refuses requests naming another host, and cross-origin WebSocket
/// upgrades and state-changing requests.
pub async fn check(State(hosts): State<Arc<AllowedHosts>>, req: Request, next: Next) -> Response {
    let named = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(authority) = named else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the request names no host (no Host header)".into(),
        );
    };
    if !hosts.allows(&authority) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this airlockd does not answer for the host {:?}; if that is its name, add it to [{}] allowed_hosts",
                quoted(&authority),
                hosts.section
            ),
        );
    }
    if checks_origin(&req) {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !hosts.allows_origin(origin) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "a request from the page of another site ({:?}) is refused; open airlockd's own pages",
                        quoted(origin)
                    ),
                );
            }
        }
    }
    next.run(req).await
}

/// WebSocket upgrades and methods that change state. (A browser sends
/// `Origin` on both; clients that are not browsers need not.)
fn checks_origin(req: &Request) -> bool {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    upgrade || !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
}

fn refuse(status: StatusCode, message: String) -> Response {
    ApiError::new(status, message).into_response()
}

/// At most [`MAX_QUOTED`] characters of a name a client sent.
fn quoted(text: &str) -> String {
    text.chars().take(MAX_QUOTED).collect()
}

fn ip_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `host` or `host:port`, lower-cased (IPv6 in brackets); `None` when it
/// is not one.
fn parse_authority(text: &str) -> Option<Name> {
    let text = text.trim().to_ascii_lowercase();
    let (host, port) = if text.starts_with('[') {
        let end = text.find(']')?;
        let rest = &text[end + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if rest.is_empty() => None,
            None => return None,
        };
        (text[..=end].to_string(), port)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (text.clone(), None),
        }
    };
    let chars_ok = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':'));
    (!host.is_empty() && chars_ok).then_some(Name { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> AllowedHosts {
        AllowedHosts::new(
            "127.0.0.1:4000".parse().expect("addr"),
            &["airlock.example.com".into(), "view.example.com:8443".into()],
        )
    }

    #[test]
    fn the_bound_address_and_configured_names_are_allowed() {
        let h = loopback();
        for ok in [
            "127.0.0.1:4000",
            "localhost:4000",
            "LOCALHOST:4000",
            "[::1]:4000",
            "airlock.example.com",
            "airlock.example.com:443",
            "view.example.com:8443",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for refused in [
            "127.0.0.1:4001",
            "evil.example",
            "localhost",
            "view.example.com",
            "view.example.com:443",
            "127.0.0.1:4000/x",
            "",
            "[::1",
        ] {
            assert!(!h.allows(refused), "{refused}");
        }
    }

    #[test]
    fn origins_are_this_server_or_refused() {
        let h = loopback();
        assert!(h.allows_origin("http://127.0.0.1:4000"));
        assert!(h.allows_origin("https://airlock.example.com"));
        for refused in [
            "null",
            "http://evil.example",
            "http://127.0.0.1:4000.evil.example",
            "ftp://127.0.0.1:4000",
            "http://127.0.0.1:4000/path",
        ] {
            assert!(!h.allows_origin(refused), "{refused}");
        }
    }

    #[test]
    fn an_unspecified_bind_allows_loopback_names_only() {
        let h = AllowedHosts::new("0.0.0.0:4000".parse().expect("addr"), &[]);
        assert!(h.allows("localhost:4000"));
        assert!(!h.allows("0.0.0.0:4000"));
        assert!(!h.allows("10.0.0.5:4000"));
    }
}
