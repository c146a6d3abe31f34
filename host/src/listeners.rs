//! airlockd's listeners: the operator API on its Unix socket, and on TCP
//! behind bearer tokens when `server.listen` is set; the viewers' surface
//! on a TCP listener of its own, which serves only what a viewer token
//! opens. All are bound before anything else starts, so a taken address
//! fails the start; each gets its router with its own `Host` names; then
//! a line per listener goes to stdout (`airlockd listening on URL (role)`,
//! then `airlockd ready`), which scripts and tests wait for. Called by
//! the daemon.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::api::hosts::AllowedHosts;
use crate::api::tokens::{OperatorTokens, TokensError};
use crate::api::{operator_router, viewer_router, AppState};
use crate::config::Config;
use crate::server::{Limits, Server, ServerError};

/// A listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Binding or TLS failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The operator tokens cannot be used.
    #[error(transparent)]
    Tokens(#[from] TokensError),
    /// `server.socket_group` names no group.
    #[error("server.socket_group {0:?} is not a group of this host")]
    Group(String),
}

/// The bound listeners, not serving yet.
#[derive(Debug)]
pub struct Listeners {
    socket: Server,
    tcp: Option<(Server, OperatorTokens)>,
    viewer: Option<Server>,
    viewer_base: String,
}

impl Listeners {
    /// Binds every listener `config` asks for.
    pub async fn bind(config: &Config) -> Result<Self, ListenError> {
        let s = &config.server;
        let limits = Limits::from(s);
        let gid = match &s.socket_group {
            Some(name) => Some(group_id(name)?),
            None => None,
        };
        let socket = Server::bind_unix(&socket_path(config), s.socket_mode, gid, limits).await?;
        let tcp = match (s.listen, &s.tokens_file) {
            (Some(addr), Some(file)) => {
                let tokens = OperatorTokens::load(file)?;
                let tls = tls(&s.tls_cert, &s.tls_key);
                Some((Server::bind_tcp(addr, tls, limits).await?, tokens))
            }
            // Config validation refuses a TCP listener without tokens.
            _ => None,
        };
        let v = &config.viewer;
        let viewer = match v.listen {
            Some(addr) => Some(Server::bind_tcp(addr, tls(&v.tls_cert, &v.tls_key), limits).await?),
            None => None,
        };
        let viewer_base = match (&v.public_url, &viewer) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(server)) => server.url(),
            (None, None) => String::new(),
        };
        Ok(Self {
            socket,
            tcp,
            viewer,
            viewer_base,
        })
    }

    /// What viewer links start with: `viewer.public_url`, else the
    /// viewers' listener (empty without one: links are paths, for the
    /// operator's listener).
    pub fn viewer_base(&self) -> &str {
        &self.viewer_base
    }

    /// The operator API's TCP address, when it has one.
    pub fn operator_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(s, _)| s.local_addr())
    }

    /// Announces the listeners and serves until `shutdown`; returns when
    /// all of them have drained.
    pub async fn serve(self, state: AppState, config: &Config, shutdown: CancellationToken) {
        let s = &config.server;
        let body = s.max_body_bytes;
        let mut serving = Vec::new();
        let socket_app = operator_router(
            state.clone(),
            body,
            AllowedHosts::for_socket(&s.allowed_hosts),
        );
        serving.push((self.socket, socket_app, "operator"));
        if let Some((server, tokens)) = self.tcp {
            let hosts = AllowedHosts::new(bound(&server), &s.allowed_hosts);
            let app = operator_router(state.clone(), body, hosts).layer(
                axum::middleware::from_fn_with_state(Arc::new(tokens), crate::api::tokens::require),
            );
            serving.push((server, app, "operator"));
        }
        if let Some(server) = self.viewer {
            let v = &config.viewer;
            let mut names = v.allowed_hosts.clone();
            names.extend(v.public_host());
            let hosts = AllowedHosts::new(bound(&server), &names).in_section("viewer");
            serving.push((server, viewer_router(state, body, hosts), "viewers"));
        }
        for (server, _, role) in &serving {
            tracing::info!(url = %server.url(), role, "listening");
            // Stable lines on stdout that scripts and tests wait for.
            println!("airlockd listening on {} ({role})", server.url());
        }
        println!("airlockd ready");
        let runs = serving
            .into_iter()
            .map(|(server, app, _): (Server, Router, _)| server.run(app, shutdown.clone()));
        futures_util::future::join_all(runs).await;
    }
}

/// `server.socket`, else `<run_dir>/api.sock`.
fn socket_path(config: &Config) -> PathBuf {
    config
        .server
        .socket
        .clone()
        .unwrap_or_else(|| config.paths.run_dir.join("api.sock"))
}

fn bound(server: &Server) -> SocketAddr {
    server
        .local_addr()
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn tls<'a>(cert: &'a Option<PathBuf>, key: &'a Option<PathBuf>) -> Option<(&'a Path, &'a Path)> {
    Some((cert.as_deref()?, key.as_deref()?))
}

fn group_id(name: &str) -> Result<u32, ListenError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(ListenError::Group(name.to_string())),
    }
}
