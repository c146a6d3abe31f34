//! Egress of browser VMs. A browser VM has no network interface: every
//! byte it sends leaves through its agent, over vsock, to a gateway in
//! airlockd ([`gateway`]) that allows only what the VM's policy names
//! ([`policy`]: the session's provider, the operator's extra destinations,
//! the TURN server for the streamer), resolves names on the host, refuses
//! this host's and private addresses unless an operator routes a name there
//! ([`addr`]), optionally chains through an upstream proxy ([`connect`]),
//! and refuses and counts everything else.
//!
//! [`Egress`] holds the daemon-wide settings; the VM manager gives each
//! browser VM a gateway with the policy its creator (a session) chose.

pub mod addr;
pub mod connect;
pub mod gateway;
pub mod policy;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::ConfigSecret;
use policy::{DestPattern, PatternError, Routes};

/// Egress settings (`[egress]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// Destinations every browser VM may reach besides its provider's:
    /// `host:port`, `*.example.com:443`, `host:*`.
    pub allow: Vec<String>,
    /// Names the gateway answers itself: `"name:port" = "ip:port"` (test
    /// stand-ins for vendors, internal services). Naming a private or
    /// loopback address here is how an operator allows one.
    pub routes: BTreeMap<String, String>,
    /// Upstream HTTP proxy (`http://host:port`) that every other stream is
    /// chained through (`CONNECT`); none: streams connect directly.
    pub upstream_proxy: Option<String>,
    /// File holding `user:password` for `upstream_proxy` (never in this
    /// config, never logged).
    pub upstream_proxy_auth_file: Option<PathBuf>,
    /// Per-user upstream proxies (user id -> proxy), instead of
    /// `upstream_proxy` for that user's sessions.
    pub user_proxies: BTreeMap<String, UserProxyConfig>,
    /// Deadline to reach a destination (ms).
    pub connect_timeout_ms: u64,
    /// Streams open at once per VM; more are refused.
    pub max_streams_per_vm: usize,
    /// Give CLI VMs the gateway too, allowing them `allow` (a QEMU CLI VM
    /// has no network interface: without this it reaches nothing; tests
    /// use it to let the real CLIs there reach the vendor sandbox).
    pub cli_vms: bool,
    /// Refusals written to airlockd's log per VM and minute; all are
    /// counted.
    pub log_refusals_per_min: u32,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            routes: BTreeMap::new(),
            upstream_proxy: None,
            upstream_proxy_auth_file: None,
            user_proxies: BTreeMap::new(),
            connect_timeout_ms: 10_000,
            max_streams_per_vm: 256,
            cli_vms: false,
            log_refusals_per_min: 20,
        }
    }
}

/// One user's upstream proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserProxyConfig {
    /// `http://host:port`.
    pub url: String,
    /// File holding `user:password`, if the proxy wants credentials.
    pub auth_file: Option<PathBuf>,
}

/// The egress settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// A destination or route does not parse.
    #[error("invalid egress config: {0}")]
    Pattern(#[from] PatternError),
    /// A proxy URL does not parse.
    #[error("invalid egress config: proxy {url:?}: {why}")]
    Proxy {
        /// The URL.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A credentials file cannot be read.
    #[error("cannot read the proxy credentials file {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// An upstream proxy, ready to use.
#[derive(Debug, Clone)]
pub struct UpstreamProxy {
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `user:password`, when it wants Basic credentials.
    pub credentials: Option<ConfigSecret>,
}

impl UpstreamProxy {
    fn load(url: &str, auth_file: Option<&PathBuf>) -> Result<Self, EgressError> {
        let bad = |why| EgressError::Proxy {
            url: url.into(),
            why,
        };
        let parsed = url::Url::parse(url).map_err(|_| bad("not a URL"))?;
        if parsed.scheme() != "http" || !parsed.username().is_empty() {
            return Err(bad(
                "write it as http://host:port; credentials go in a file",
            ));
        }
        let host = parsed.host_str().ok_or(bad("no host"))?;
        let credentials = match auth_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| EgressError::Credentials {
                        path: path.clone(),
                        source,
                    })?;
                Some(ConfigSecret::new(text.trim()))
            }
            None => None,
        };
        Ok(Self {
            host: host.trim_matches(['[', ']']).to_string(),
            port: parsed.port_or_known_default().unwrap_or(3128),
            credentials,
        })
    }
}

/// The daemon's egress settings, parsed.
#[derive(Debug)]
pub struct Egress {
    cfg: EgressConfig,
    routes: Routes,
    allow: Vec<DestPattern>,
    upstream: Option<UpstreamProxy>,
    users: BTreeMap<String, UpstreamProxy>,
    /// This host's own addresses (never reachable by resolution).
    local: Vec<IpAddr>,
}

impl Egress {
    /// Parses the settings and reads the proxy credentials files.
    pub fn new(cfg: EgressConfig) -> Result<Self, EgressError> {
        let routes = Routes::parse(&cfg.routes)?;
        let allow = cfg
            .allow
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()?;
        let upstream = cfg
            .upstream_proxy
            .as_deref()
            .map(|u| UpstreamProxy::load(u, cfg.upstream_proxy_auth_file.as_ref()))
            .transpose()?;
        let users = cfg
            .user_proxies
            .iter()
            .map(|(user, p)| {
                Ok((
                    user.clone(),
                    UpstreamProxy::load(&p.url, p.auth_file.as_ref())?,
                ))
            })
            .collect::<Result<_, EgressError>>()?;
        Ok(Self {
            cfg,
            routes,
            allow,
            upstream,
            users,
            local: addr::local_addresses(),
        })
    }

    /// Adds a route (the demo OAuth server's name, once it listens).
    pub fn with_route(mut self, host: &str, port: u16, to: std::net::SocketAddr) -> Self {
        self.routes.insert(host, port, to);
        self
    }

    /// The operator's destinations allowed for every browser VM.
    pub fn allowed(&self) -> &[DestPattern] {
        &self.allow
    }

    /// Whether CLI VMs get a gateway (`cli_vms`).
    pub fn for_cli_vms(&self) -> bool {
        self.cfg.cli_vms
    }

    fn upstream_for(&self, user: Option<&str>) -> Option<&UpstreamProxy> {
        user.and_then(|u| self.users.get(u))
            .or(self.upstream.as_ref())
    }
}

/// Counters of one VM's egress, shown in its view.
#[derive(Debug, Default)]
pub struct EgressStats {
    streams: AtomicU64,
    refused: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    log: Mutex<RefusalLog>,
}

/// Refusals kept in a VM's view, newest last.
const RECENT_REFUSALS: usize = 16;

#[derive(Debug, Default)]
struct RefusalLog {
    window: Option<Instant>,
    in_window: u32,
    recent: std::collections::VecDeque<String>,
}

/// A VM's egress counters (`egress` in its view).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EgressView {
    /// Streams opened.
    pub streams: u64,
    /// Streams refused.
    pub refused: u64,
    /// Bytes from the VM out.
    pub bytes_out: u64,
    /// Bytes back into the VM.
    pub bytes_in: u64,
    /// The latest refusals, newest last (at most sixteen).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recent_refusals: Vec<String>,
}

impl EgressStats {
    fn opened(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
        crate::metrics::inc(&crate::metrics::global().egress_allowed);
    }

    fn bytes(&self, out: u64, back: u64) {
        self.bytes_out.fetch_add(out, Ordering::Relaxed);
        self.bytes_in.fetch_add(back, Ordering::Relaxed);
    }

    /// Counts a refusal and logs it unless this VM already logged
    /// `per_min` in the current minute.
    fn refused(&self, vm_id: &str, what: &str, per_min: u32) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        crate::metrics::inc(&crate::metrics::global().egress_refused);
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.recent.len() == RECENT_REFUSALS {
            log.recent.pop_front();
        }
        log.recent.push_back(what.chars().take(300).collect());
        let now = Instant::now();
        if log
            .window
            .is_none_or(|w| now.duration_since(w) > Duration::from_secs(60))
        {
            log.window = Some(now);
            log.in_window = 0;
        }
        log.in_window += 1;
        if log.in_window <= per_min {
            tracing::info!(vm_id, refusal = what, "egress refused");
        } else if log.in_window == per_min + 1 {
            tracing::info!(vm_id, "more egress refusals this minute are only counted");
        }
    }

    /// The counters now.
    pub fn view(&self) -> EgressView {
        EgressView {
            streams: self.streams.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            recent_refusals: self
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recent
                .iter()
                .cloned()
                .collect(),
        }
    }
}
