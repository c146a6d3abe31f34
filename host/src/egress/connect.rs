//! Opening the host side of an allowed stream: to an operator's route, to
//! a TURN server, or to a public destination, resolved on the host with
//! private and local addresses refused, or chained through an upstream
//! HTTP proxy (`CONNECT`, Basic credentials from a file). Used by
//! [`super::gateway`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::addr::forbidden;
use super::policy::Target;
use super::UpstreamProxy;

/// Largest response head accepted from an upstream proxy.
const MAX_PROXY_HEAD: usize = 8 << 10;

/// Why a stream could not be opened; the text goes back to the guest.
pub type ConnectError = String;

/// Connects to `target` within `timeout`. `local` are this host's own
/// addresses, which public destinations may never resolve to.
pub async fn connect(
    target: &Target,
    upstream: Option<&UpstreamProxy>,
    local: &[IpAddr],
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let work = async {
        match target {
            Target::Route(addr) => dial(&[*addr], &addr.to_string()).await,
            Target::Turn(host, port) => {
                let addrs = resolve(host, *port).await?;
                dial(&addrs, &format!("{host}:{port}")).await
            }
            Target::Public(host, port) => match upstream {
                Some(proxy) => via_proxy(proxy, host, *port).await,
                None => {
                    let addrs = public_addresses(host, *port, local).await?;
                    dial(&addrs, &format!("{host}:{port}")).await
                }
            },
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} has no address"));
    }
    Ok(addrs)
}

/// The addresses of `host` a VM may reach; refuses when none is left.
async fn public_addresses(
    host: &str,
    port: u16,
    local: &[IpAddr],
) -> Result<Vec<SocketAddr>, ConnectError> {
    let all = resolve(host, port).await?;
    let mut why = None;
    let allowed: Vec<SocketAddr> = all
        .into_iter()
        .filter(|a| {
            let reason = if local.contains(&a.ip()) {
                Some("an address of this host")
            } else {
                forbidden(a.ip())
            };
            if let Some(r) = reason {
                why = Some(format!("{host} resolves to {} ({r})", a.ip()));
            }
            reason.is_none()
        })
        .collect();
    match (allowed.is_empty(), why) {
        (true, Some(why)) => Err(format!("{why}; browser VMs may not reach it")),
        _ => Ok(allowed),
    }
}

async fn dial(addrs: &[SocketAddr], what: &str) -> Result<TcpStream, ConnectError> {
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(format!("cannot connect to {what}: {last}"))
}

/// Opens a tunnel to `host`:`port` through the upstream proxy.
async fn via_proxy(
    proxy: &UpstreamProxy,
    host: &str,
    port: u16,
) -> Result<TcpStream, ConnectError> {
    let addrs = resolve(&proxy.host, proxy.port).await?;
    let mut s = dial(&addrs, "the upstream proxy").await?;
    let authority = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = &proxy.credentials {
        let b64 = base64::engine::general_purpose::STANDARD.encode(auth.expose());
        head.push_str(&format!("Proxy-Authorization: Basic {b64}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("the upstream proxy: {e}"))?;
    let status = read_status(&mut s).await?;
    if status != 200 {
        return Err(format!(
            "the upstream proxy answered {status} for {authority}"
        ));
    }
    Ok(s)
}

/// Reads a response head byte by byte (nothing of the tunnel may be
/// consumed) and returns its status code.
async fn read_status(s: &mut TcpStream) -> Result<u16, ConnectError> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEAD {
            return Err("the upstream proxy sent an oversized answer".into());
        }
        let b = s
            .read_u8()
            .await
            .map_err(|e| format!("the upstream proxy closed: {e}"))?;
        head.push(b);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_ascii_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "the upstream proxy sent no HTTP status".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_public_name_resolving_to_loopback_is_refused() {
        let t = Target::Public("localhost".into(), 80);
        let e = connect(&t, None, &[], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.contains("loopback") && e.contains("may not reach"), "{e}");
    }

    #[tokio::test]
    async fn routes_connect_even_to_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t = Target::Route(l.local_addr().unwrap());
        assert!(connect(&t, None, &[], Duration::from_secs(5)).await.is_ok());
    }

    #[tokio::test]
    async fn the_upstream_proxy_gets_connect_with_credentials() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\ntunnel").await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let proxy = UpstreamProxy {
            host: "127.0.0.1".into(),
            port,
            credentials: Some(crate::config::ConfigSecret::new("u:p")),
        };
        let t = Target::Public("api.vendor.example".into(), 443);
        let mut s = connect(&t, Some(&proxy), &[], Duration::from_secs(5))
            .await
            .unwrap();
        let mut rest = [0u8; 6];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"tunnel");
        let req = server.await.unwrap();
        assert!(
            req.starts_with("CONNECT api.vendor.example:443 HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.contains("Proxy-Authorization: Basic dTpw\r\n"), "{req}");
    }
}
