//! The agent's local HTTP proxies: a browser VM has no network interface,
//! so Chromium, the login CLI, the streamer and commands run through the
//! agent are pointed at proxies on 127.0.0.1 (one port per program, so the
//! host can allow each its own destinations). Each proxied stream (an
//! HTTP `CONNECT`, or a plain `http://` request in absolute form) becomes
//! one connection to the host's egress gateway ([`airlock_proto::egress`]):
//! the host decides and connects, the agent only carries bytes. Started
//! by [`crate::agent::Agent`] when the host's welcome names an egress port.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use airlock_proto::egress::{EgressClient, EgressOpen, EgressReply, MAX_EGRESS_FRAME_BYTES};
use airlock_proto::frame::{self, HEADER_LEN};
use airlock_proto::HOST_CID;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::options::Transport;

/// Largest request head a program may send the proxy.
const MAX_HEAD: usize = 16 << 10;
/// Time a program gets to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the host gets to decide and connect.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams proxied at once (all programs together).
const MAX_STREAMS: usize = 256;

/// How to reach the host's egress gateway.
#[derive(Debug, Clone)]
pub enum Dialer {
    /// vsock to the host on this port.
    Vsock(u32),
    /// A Unix socket (the agent as a host process).
    Unix(PathBuf),
}

impl Dialer {
    /// The gateway beside the agent's own channel: the same transport,
    /// `port` instead of the agent's port.
    pub fn beside(transport: &Transport, port: u32) -> Option<Self> {
        match transport {
            Transport::Vsock { .. } => Some(Self::Vsock(port)),
            Transport::Unix { path } => {
                let name = path.file_name()?.to_str()?;
                let (stem, _) = name.rsplit_once('_')?;
                Some(Self::Unix(path.with_file_name(format!("{stem}_{port}"))))
            }
        }
    }

    async fn dial(&self) -> std::io::Result<Box<dyn crate::channel::HostStream>> {
        Ok(match self {
            Self::Vsock(port) => Box::new(
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(HOST_CID, *port))
                    .await?,
            ),
            Self::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        })
    }
}

/// The proxies' ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyPorts {
    ports: [u16; 4],
}

impl ProxyPorts {
    /// The proxy URL for `client`.
    pub fn url(&self, client: EgressClient) -> String {
        let i = EgressClient::ALL
            .iter()
            .position(|c| *c == client)
            .unwrap_or(0);
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// Environment that points a command at the proxy for `client`, with
    /// loopback excluded (a CLI's own callback server must stay local).
    pub fn env(&self, client: EgressClient) -> Vec<(String, String)> {
        let url = self.url(client);
        let mut env = Vec::new();
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
            env.push((name.to_string(), url.clone()));
            env.push((name.to_ascii_lowercase(), url.clone()));
        }
        for name in ["NO_PROXY", "no_proxy"] {
            env.push((name.to_string(), "localhost,127.0.0.1,::1".to_string()));
        }
        env
    }
}

/// Binds one proxy per client on 127.0.0.1 and serves them until `cancel`.
pub async fn start(
    dialer: Dialer,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> std::io::Result<ProxyPorts> {
    let slots = Arc::new(Semaphore::new(MAX_STREAMS));
    let mut ports = [0u16; 4];
    for (i, client) in EgressClient::ALL.into_iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        ports[i] = listener.local_addr()?.port();
        let proxy = Proxy {
            client,
            dialer: dialer.clone(),
        };
        tracker.spawn(proxy.serve(listener, slots.clone(), tracker.clone(), cancel.clone()));
    }
    tracing::info!(?ports, "egress proxies listening");
    Ok(ProxyPorts { ports })
}

#[derive(Debug, Clone)]
struct Proxy {
    client: EgressClient,
    dialer: Dialer,
}

impl Proxy {
    async fn serve(
        self,
        listener: TcpListener,
        slots: Arc<Semaphore>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) {
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let (proxy, cancel) = (self.clone(), cancel.clone());
            tasks.spawn(async move {
                tokio::select! {
                    r = proxy.handle(stream) => {
                        if let Err(e) = r {
                            tracing::debug!(client = proxy.client.as_str(), error = %e, "proxied stream ended");
                        }
                    }
                    _ = cancel.cancelled() => {}
                }
                drop(slot);
            });
        }
    }

    async fn handle(&self, mut client: TcpStream) -> std::io::Result<()> {
        let _ = client.set_nodelay(true);
        let (head, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        let req = match Request::parse(&head) {
            Ok(r) => r,
            Err(why) => return respond(&mut client, "400 Bad Request", why).await,
        };
        let open = EgressOpen {
            client: self.client,
            host: req.host.clone(),
            port: req.port,
        };
        if let Err(e) = open.validate() {
            return respond(&mut client, "400 Bad Request", &e.to_string()).await;
        }
        let mut host = match self.open(&open).await {
            Ok(h) => h,
            Err(why) => {
                tracing::debug!(client = self.client.as_str(), host = %open.host, port = open.port, reason = %why, "egress refused");
                return respond(&mut client, "403 Forbidden", &why).await;
            }
        };
        match &req.forward {
            None => {
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await?
            }
            Some(head) => host.write_all(head).await?,
        }
        host.write_all(&rest).await?;
        tokio::io::copy_bidirectional(&mut client, &mut host).await?;
        Ok(())
    }

    /// Asks the host for a stream; the error is the host's reason.
    async fn open(&self, open: &EgressOpen) -> Result<Box<dyn crate::channel::HostStream>, String> {
        let mut s = self
            .dialer
            .dial()
            .await
            .map_err(|e| format!("the host's egress gateway is unreachable: {e}"))?;
        let frame = frame::encode(open, MAX_EGRESS_FRAME_BYTES).map_err(|e| e.to_string())?;
        s.write_all(&frame).await.map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, read_reply(&mut s))
            .await
            .map_err(|_| "the host did not answer in time".to_string())??;
        match reply {
            EgressReply::Connected => Ok(s),
            EgressReply::Refused { reason } => Err(reason),
        }
    }
}

async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<EgressReply, String> {
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header)
        .await
        .map_err(|e| format!("the host closed the stream: {e}"))?;
    let len = frame::parse_header(header, MAX_EGRESS_FRAME_BYTES).map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)
        .await
        .map_err(|e| format!("the host closed the stream: {e}"))?;
    let reply: EgressReply = frame::decode_payload(&payload).map_err(|e| e.to_string())?;
    reply.validate().map_err(|e| e.to_string())?;
    Ok(reply)
}

/// Reads up to the end of the request head; returns it and whatever
/// arrived after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The proxy's own answer. Readable by any page's script (it says only
/// that airlock refused the request and why), so a page can tell a refusal
/// from the destination's answer.
async fn respond<S: AsyncWrite + Unpin>(s: &mut S, status: &str, why: &str) -> std::io::Result<()> {
    let body = format!("airlock: {why}\n");
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(text.as_bytes()).await
}

/// A proxy request: where to, and for plain HTTP the head to forward.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    host: String,
    port: u16,
    /// `None` for `CONNECT`; otherwise the rewritten request head.
    forward: Option<Vec<u8>>,
}

/// Headers meant for the proxy, not the destination.
const HOP_HEADERS: [&str; 4] = [
    "proxy-connection",
    "proxy-authorization",
    "connection",
    "keep-alive",
];

impl Request {
    fn parse(head: &[u8]) -> Result<Self, &'static str> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err("not an HTTP request"),
        }
        let method = req.method.ok_or("no method")?;
        let target = req.path.ok_or("no target")?;
        if method.eq_ignore_ascii_case("CONNECT") {
            let (host, port) = split_authority(target, None).ok_or("CONNECT needs host:port")?;
            return Ok(Self {
                host,
                port,
                forward: None,
            });
        }
        let rest = target
            .strip_prefix("http://")
            .ok_or("only CONNECT and http:// requests go through this proxy")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = split_authority(authority, Some(80)).ok_or("bad host in the URL")?;
        // One request per stream: a kept-alive connection could name
        // another host in its next request.
        let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
        for h in req.headers.iter() {
            if HOP_HEADERS.iter().any(|n| h.name.eq_ignore_ascii_case(n)) {
                continue;
            }
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        Ok(Self {
            host,
            port,
            forward: Some(out),
        })
    }
}

/// `host:port`, `[v6]:port`, or (with a default port) `host`.
fn split_authority(a: &str, default: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = match a.strip_prefix('[') {
        Some(rest) => {
            let (h, p) = rest.split_once(']')?;
            (h, p.strip_prefix(':'))
        }
        None => match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default?,
    };
    (!host.is_empty()).then(|| (host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_and_absolute_requests_parse() {
        let r = Request::parse(b"CONNECT auth.openai.com:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.forward),
            ("auth.openai.com", 443, None)
        );
        let r = Request::parse(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("::1", 8443));
        let r = Request::parse(
            b"POST http://Oauth.Test:8080/token?a=1 HTTP/1.1\r\nHost: oauth.test:8080\r\nProxy-Connection: keep-alive\r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.host.as_str(), r.port), ("oauth.test", 8080));
        let fwd = String::from_utf8(r.forward.unwrap()).unwrap();
        assert_eq!(
            fwd,
            "POST /token?a=1 HTTP/1.1\r\nHost: oauth.test:8080\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        let r = Request::parse(b"GET http://example.com HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("example.com", 80));
    }

    #[test]
    fn other_requests_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"[..],
            b"GET https://a.com/ HTTP/1.1\r\n\r\n",
            b"CONNECT a.com HTTP/1.1\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(
                Request::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_gateway_sits_beside_the_agent_socket() {
        let t = Transport::Unix {
            path: "/run/x/vsock.sock_1024".into(),
        };
        match Dialer::beside(&t, 1025) {
            Some(Dialer::Unix(p)) => assert_eq!(p, PathBuf::from("/run/x/vsock.sock_1025")),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_stream_gets_the_hosts_reason() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vsock.sock_1025");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let host = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut header = [0u8; 4];
            s.read_exact(&mut header).await.unwrap();
            let mut p = vec![0u8; u32::from_be_bytes(header) as usize];
            s.read_exact(&mut p).await.unwrap();
            let open: EgressOpen = serde_json::from_slice(&p).unwrap();
            let reply = EgressReply::Refused {
                reason: format!("{} is not allowed", open.host),
            };
            s.write_all(&frame::encode(&reply, 1024).unwrap())
                .await
                .unwrap();
        });
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let ports = start(Dialer::Unix(sock), &tracker, cancel.clone())
            .await
            .unwrap();
        let addr = ports.url(EgressClient::Exec).replace("http://", "");
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden"), "{answer}");
        assert!(answer.contains("evil.example is not allowed"), "{answer}");
        host.await.unwrap();
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
