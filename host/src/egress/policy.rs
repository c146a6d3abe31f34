//! What one browser VM may reach, and the decision for each stream it
//! asks for. A session's policy allows its provider's destinations (from
//! the provider profile) plus the operator's `egress.allow` for Chromium,
//! the login and commands, and only the configured TURN servers for the
//! streamer. Names in `egress.routes` are answered by the address the
//! operator gave (test stand-ins, internal services), which is how an
//! operator allows a private destination by name. Built by the session
//! manager, applied by [`super::gateway`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;

use airlock_proto::egress::{is_host_name, EgressClient, EgressOpen};

/// An allowed destination: `host:port`, `*.example.com:443` (any
/// subdomain), `host:*` (any port); IPv6 addresses in brackets. Kept in a
/// VM's record as that text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DestPattern {
    host: String,
    any_subdomain: bool,
    port: Option<u16>,
}

/// A pattern or route could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {text:?}: {why}")]
pub struct PatternError {
    what: &'static str,
    text: String,
    why: &'static str,
}

/// Splits `host:port` (`[v6]:port`); the port may be `*`.
fn split_host_port(text: &str) -> Option<(String, &str)> {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (h, p) = rest.split_once("]:")?;
            (h, p)
        }
        None => text.rsplit_once(':')?,
    };
    Some((host.trim_end_matches('.').to_ascii_lowercase(), port))
}

fn valid_host(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok() || is_host_name(host)
}

impl FromStr for DestPattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| PatternError {
            what: "egress destination",
            text: text.into(),
            why,
        };
        let (host, port) = split_host_port(text).ok_or(err("write it as host:port"))?;
        let port = match port {
            "*" => None,
            p => Some(p.parse().ok().filter(|p| *p != 0).ok_or(err("bad port"))?),
        };
        let (host, any_subdomain) = match host.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (host, false),
        };
        if !valid_host(&host) {
            return Err(err("not a host name or an IP address"));
        }
        Ok(Self {
            host,
            any_subdomain,
            port,
        })
    }
}

impl TryFrom<String> for DestPattern {
    type Error = PatternError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<DestPattern> for String {
    fn from(p: DestPattern) -> Self {
        p.to_string()
    }
}

impl std::fmt::Display for DestPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let star = if self.any_subdomain { "*." } else { "" };
        let host = match self.host.contains(':') {
            true => format!("[{}]", self.host),
            false => self.host.clone(),
        };
        match self.port {
            Some(p) => write!(f, "{star}{host}:{p}"),
            None => write!(f, "{star}{host}:*"),
        }
    }
}

impl DestPattern {
    /// True when `host`:`port` is this destination.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.any_subdomain {
            host.strip_suffix(&self.host)
                .is_some_and(|head| head.ends_with('.'))
        } else {
            host == self.host
        }
    }
}

/// Names the gateway answers itself: `name:port` → an address.
#[derive(Debug, Clone, Default)]
pub struct Routes(BTreeMap<(String, u16), SocketAddr>);

impl Routes {
    /// Parses `egress.routes`.
    pub fn parse(map: &BTreeMap<String, String>) -> Result<Self, PatternError> {
        let mut routes = BTreeMap::new();
        for (from, to) in map {
            let err = |why| PatternError {
                what: "egress route",
                text: format!("{from} = {to}"),
                why,
            };
            let (host, port) = split_host_port(from).ok_or(err("write the name as host:port"))?;
            let port: u16 = port.parse().map_err(|_| err("bad port in the name"))?;
            if !is_host_name(&host) {
                return Err(err("the name is not a DNS name"));
            }
            let addr: SocketAddr = to.parse().map_err(|_| err("the target is not ip:port"))?;
            routes.insert((host, port), addr);
        }
        Ok(Self(routes))
    }

    /// The address `host`:`port` is routed to, if any.
    pub fn get(&self, host: &str, port: u16) -> Option<SocketAddr> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.0.get(&(host, port)).copied()
    }

    /// Adds a route (the demo OAuth server's own name).
    pub fn insert(&mut self, host: &str, port: u16, addr: SocketAddr) {
        self.0.insert((host.to_ascii_lowercase(), port), addr);
    }
}

/// What one VM may reach.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct EgressPolicy {
    /// For whom, in refusals ("provider codex").
    pub label: String,
    /// Destinations of Chromium, the login and commands.
    pub allow: Vec<DestPattern>,
    /// TURN servers (host, port) the streamer may reach over TCP.
    pub turn: Vec<(String, u16)>,
    /// The user whose upstream proxy applies.
    pub user: Option<String>,
}

/// A VM's policy as it is now: a VM from the warm pool starts with
/// nothing allowed and gets its session's policy when a session takes it.
/// Each new stream reads the current one.
#[derive(Debug)]
pub struct CurrentPolicy(std::sync::RwLock<std::sync::Arc<EgressPolicy>>);

impl CurrentPolicy {
    /// Starts with `policy`.
    pub fn new(policy: EgressPolicy) -> Self {
        Self(std::sync::RwLock::new(std::sync::Arc::new(policy)))
    }

    /// The policy for a stream opened now.
    pub fn get(&self) -> std::sync::Arc<EgressPolicy> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the policy (streams already open keep theirs).
    pub fn set(&self, policy: EgressPolicy) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(policy);
    }
}

/// Where an allowed stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An operator's route: connect there, whatever the address.
    Route(SocketAddr),
    /// A configured TURN server: resolve on the host, connect directly.
    Turn(String, u16),
    /// Anywhere else: resolve on the host (or through the upstream proxy)
    /// and refuse private and local addresses.
    Public(String, u16),
}

impl EgressPolicy {
    /// The decision for one stream: where to connect, or why not.
    pub fn decide(&self, routes: &Routes, open: &EgressOpen) -> Result<Target, String> {
        let (host, port) = (open.host.as_str(), open.port);
        if open.client == EgressClient::Streamer {
            let turn = self
                .turn
                .iter()
                .any(|(h, p)| *p == port && h.eq_ignore_ascii_case(host.trim_end_matches('.')));
            return match turn {
                true => Ok(Target::Turn(host.to_string(), port)),
                false => Err(format!(
                    "{host}:{port} is not a configured TURN server; the streamer may reach only those"
                )),
            };
        }
        if !self.allow.iter().any(|p| p.matches(host, port)) {
            return Err(format!(
                "{host}:{port} is not among the destinations allowed for {}",
                self.label
            ));
        }
        Ok(match routes.get(host, port) {
            Some(addr) => Target::Route(addr),
            None => Target::Public(host.to_string(), port),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_print_as_they_parse() {
        for text in [
            "example.com:443",
            "*.openai.com:443",
            "host.test:*",
            "[::1]:8080",
            "10.0.0.1:53",
        ] {
            let p: DestPattern = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<DestPattern>(&json).unwrap(), p);
        }
        assert!(serde_json::from_str::<DestPattern>("\"no port\"").is_err());
    }

    fn open(client: EgressClient, host: &str, port: u16) -> EgressOpen {
        EgressOpen {
            client,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn patterns_match_hosts_subdomains_and_ports() {
        let p: DestPattern = "*.openai.com:443".parse().unwrap();
        assert!(p.matches("auth.OpenAI.com.", 443));
        assert!(!p.matches("openai.com", 443) && !p.matches("evilopenai.com", 443));
        assert!(!p.matches("auth.openai.com", 80));
        let any: DestPattern = "oauth.test:*".parse().unwrap();
        assert!(any.matches("oauth.test", 8080));
        let v6: DestPattern = "[2001:db8::1]:443".parse().unwrap();
        assert!(v6.matches("2001:db8::1", 443));
        for bad in ["noport", "a.com:0", "a b:1", "*.:1", "a.com:x"] {
            assert!(bad.parse::<DestPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn decisions_follow_client_allow_list_and_routes() {
        let mut routes = Routes::default();
        routes.insert("oauth.test", 80, "127.0.0.1:9000".parse().unwrap());
        let policy = EgressPolicy {
            label: "provider demo".into(),
            allow: vec![
                "oauth.test:80".parse().unwrap(),
                "*.vendor.com:443".parse().unwrap(),
            ],
            turn: vec![("127.0.0.1".into(), 3478)],
            user: None,
        };
        let d = |c, h: &str, p| policy.decide(&routes, &open(c, h, p));
        assert_eq!(
            d(EgressClient::Browser, "oauth.test", 80),
            Ok(Target::Route("127.0.0.1:9000".parse().unwrap()))
        );
        assert_eq!(
            d(EgressClient::Login, "api.vendor.com", 443),
            Ok(Target::Public("api.vendor.com".into(), 443))
        );
        let e = d(EgressClient::Exec, "evil.example", 443).unwrap_err();
        assert!(
            e.contains("evil.example:443") && e.contains("provider demo"),
            "{e}"
        );
        // The TURN server is the streamer's only destination, and only its.
        assert_eq!(
            d(EgressClient::Streamer, "127.0.0.1", 3478),
            Ok(Target::Turn("127.0.0.1".into(), 3478))
        );
        assert!(d(EgressClient::Streamer, "api.vendor.com", 443).is_err());
        assert!(d(EgressClient::Browser, "127.0.0.1", 3478).is_err());
    }

    #[test]
    fn routes_parse_names_and_addresses() {
        let mut m = BTreeMap::new();
        m.insert(
            "auth.openai.com:443".to_string(),
            "127.0.0.1:8443".to_string(),
        );
        let r = Routes::parse(&m).unwrap();
        assert_eq!(
            r.get("AUTH.openai.com", 443),
            Some("127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(r.get("auth.openai.com", 80), None);
        m.insert("bad".into(), "x".into());
        assert!(Routes::parse(&m).is_err());
    }
}
