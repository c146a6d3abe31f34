//! The demo CLI's loopback HTTP/1.1 server for the OAuth callback, shaped
//! like the ones real CLIs run (tiny_http, Node's `http.createServer`):
//! each connection is read on its own task, requests are handed to the
//! login flow one at a time, and every response closes its connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::common::query_params;

/// Requests larger than this are dropped; callbacks are tiny.
const MAX_HEAD: usize = 16 * 1024;
/// A connection that sends nothing (a browser preconnect) is closed after this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a flow waits for its response to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A response to send back.
#[derive(Debug)]
pub struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Reply {
    /// A `text/plain` response.
    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// A `text/html` response.
    pub fn html(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", "text/html; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        ));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Unknown",
    }
}

/// One request received on the loopback server.
#[derive(Debug)]
pub struct Incoming {
    /// Request target as sent (`/auth/callback?code=…`).
    pub target: String,
    reply: oneshot::Sender<(Reply, oneshot::Sender<()>)>,
}

impl Incoming {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Decoded query parameters.
    pub fn query(&self) -> HashMap<String, String> {
        query_params(&self.target)
    }

    /// Sends the response and waits until it is written, so a flow that
    /// ends right after still delivers its last page. Dropping an
    /// `Incoming` instead closes the connection without a response.
    pub async fn respond(self, reply: Reply) {
        let (written_tx, written_rx) = oneshot::channel();
        if self.reply.send((reply, written_tx)).is_ok() {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, written_rx).await;
        }
    }
}

/// A listening callback server.
#[derive(Debug)]
pub struct Loopback {
    addr: SocketAddr,
    requests: mpsc::Receiver<Incoming>,
    accept: JoinHandle<()>,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Loopback {
    /// Binds `addr` and starts accepting.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, requests) = mpsc::channel(16);
        let accept = tokio::spawn(accept_loop(listener, tx));
        Ok(Self {
            addr,
            requests,
            accept,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The next request, in arrival order.
    pub async fn next(&mut self) -> Option<Incoming> {
        self.requests.recv().await
    }
}

async fn accept_loop(listener: TcpListener, tx: mpsc::Sender<Incoming>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        tracing::debug!(%peer, "callback connection");
        tokio::spawn(serve_connection(stream, tx.clone()));
    }
}

async fn serve_connection(mut stream: TcpStream, tx: mpsc::Sender<Incoming>) {
    let Ok(Some(target)) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .unwrap_or(Ok(None))
    else {
        return;
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let incoming = Incoming {
        target,
        reply: reply_tx,
    };
    if tx.send(incoming).await.is_err() {
        return;
    }
    if let Ok((reply, written)) = reply_rx.await {
        let _ = stream.write_all(&reply.into_bytes()).await;
        let _ = stream.shutdown().await;
        let _ = written.send(());
    }
}

/// Reads up to the blank line and returns the request target.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_HEAD {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(_method), Some(target)) => Ok(Some(target.to_string())),
        _ => Ok(None),
    }
}
