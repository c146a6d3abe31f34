//! Serves a router over HTTP or HTTPS (rustls, when given a certificate
//! and key) on TCP, or over HTTP on a Unix socket. One accept loop for
//! all, so TLS is not a separate code path; at most `max_connections`
//! open at once, and a connection that sends no complete request headers
//! in time is closed. Each request carries its connection's
//! [`Peer`](crate::audit::Peer). Stops accepting on shutdown and lets
//! in-flight requests finish within a grace period; a socket file is
//! removed when its server stops. Called by [`crate::listeners`].

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::Layer;

use crate::audit::Peer;
use crate::config::ServerConfig;

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be made.
    #[error("cannot listen on the Unix socket {path}: {source}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process listens on the socket already.
    #[error("another process (an airlockd?) listens on {0} already: stop it, or give this one another server.socket")]
    SocketInUse(PathBuf),
    /// The certificate or key could not be used.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// What every listener keeps to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// A connection without complete request headers within this closes.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may finish after shutdown.
    pub grace: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(cfg: &ServerConfig) -> Self {
        Self {
            max_connections: cfg.max_connections,
            header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
            grace: Duration::from_millis(cfg.shutdown_grace_ms),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound listener, ready to serve.
pub struct Server {
    listener: Listener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("url", &self.url()).finish()
    }
}

impl Server {
    /// Binds a TCP address; with a certificate and key, serves HTTPS.
    pub async fn bind_tcp(
        addr: SocketAddr,
        tls: Option<(&Path, &Path)>,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        let tls = tls.map(|(cert, key)| tls_acceptor(cert, key)).transpose()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self::new(Listener::Tcp(listener), tls, limits))
    }

    /// Makes the Unix socket `path` with `mode` (and `gid`, when given),
    /// replacing a stale one that nobody listens on.
    pub async fn bind_unix(
        path: &Path,
        mode: u32,
        gid: Option<u32>,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        let err = |source| ServerError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ServerError::SocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
        }
        Ok(Self::new(
            Listener::Unix(listener, path.to_path_buf()),
            None,
            limits,
        ))
    }

    fn new(listener: Listener, tls: Option<TlsAcceptor>, limits: Limits) -> Self {
        Self {
            listener,
            tls,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
        }
    }

    /// The bound TCP address (useful with port 0); none for a socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// `http://addr`, `https://addr` or `unix:/path`.
    pub fn url(&self) -> String {
        match (&self.listener, &self.tls) {
            (Listener::Unix(_, path), _) => format!("unix:{}", path.display()),
            (Listener::Tcp(_), tls) => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                match self.local_addr() {
                    Some(addr) => format!("{scheme}://{addr}"),
                    None => format!("{scheme}://?"),
                }
            }
        }
    }

    /// Serves `app` until `shutdown`, then drains connections.
    pub async fn run(self, app: Router, shutdown: CancellationToken) {
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // A client that opens connections and sends nothing (or headers a
        // byte at a time) must not hold them.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        loop {
            // At the cap, wait for a connection to close before accepting
            // (the kernel's backlog holds the rest).
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = self.connections.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.accept() => r,
            };
            let (conn, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let app = axum::Extension(peer.clone()).layer(app.clone());
            let service = TowerToHyperService::new(app);
            let (builder, watcher) = (builder.clone(), graceful.watcher());
            match (conn, &self.tls) {
                (Conn::Unix(s), _) => spawn_serve(builder, watcher, s, service, permit, peer),
                (Conn::Tcp(s), None) => spawn_serve(builder, watcher, s, service, permit, peer),
                (Conn::Tcp(tcp), Some(acceptor)) => {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let handshake = acceptor.accept(tcp);
                        match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                            Ok(Ok(tls)) => {
                                spawn_serve(builder, watcher, tls, service, permit, peer)
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
        let socket = match &self.listener {
            Listener::Unix(_, path) => Some(path.clone()),
            Listener::Tcp(_) => None,
        };
        drop(self.listener);
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        if tokio::time::timeout(self.limits.grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.limits.grace, "requests still running after the shutdown grace; closing them");
        }
    }

    async fn accept(&self) -> std::io::Result<(Conn, Peer)> {
        match &self.listener {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                Ok((Conn::Tcp(s), Peer::tcp(addr)))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let cred = s.peer_cred().ok();
                Ok((Conn::Unix(s), Peer::unix(cred)))
            }
        }
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

type Service = TowerToHyperService<axum::middleware::AddExtension<Router, Peer>>;

/// Serves one connection in a task of its own, which holds its permit and
/// is watched by the graceful shutdown.
fn spawn_serve<S>(
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stream: S,
    service: Service,
    permit: OwnedSemaphorePermit,
    peer: Peer,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        if let Err(e) = watcher.watch(conn.into_owned()).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    });
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ServerError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ServerError::Tls(format!("cannot read {}: {e}", p.display())))
    };
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Tls(format!("bad certificate {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "no certificate in {}",
            cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| ServerError::Tls(format!("bad key {}: {e}", key.display())))?
        .ok_or_else(|| ServerError::Tls(format!("no private key in {}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
