//! A fake guest for tests of the host's channel handling: connects to a
//! VM's `<uds>_<port>` socket as vhost-device-vsock would on behalf of the
//! guest, sends whatever bytes a test wants, and observes whether the host
//! keeps or drops the connection.

use std::path::Path;
use std::time::Duration;

use airlock_proto::{frame, AgentMode, GuestMessage, Hello, PROTOCOL_VERSION};
use anyhow::{bail, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Connects to the socket.
pub async fn connect(path: &Path) -> Result<UnixStream> {
    Ok(UnixStream::connect(path).await?)
}

/// Sends raw bytes.
pub async fn send_raw(s: &mut UnixStream, bytes: &[u8]) -> Result<()> {
    s.write_all(bytes).await?;
    Ok(())
}

/// A well-formed hello with the given build id.
pub fn hello(build_id: &str) -> Vec<u8> {
    hello_with_version(build_id, "0.0.0-fake")
}

/// A hello with the given build id and agent version (which may break the
/// protocol's bounds).
pub fn hello_with_version(build_id: &str, version: &str) -> Vec<u8> {
    let h = GuestMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: version.into(),
        build_id: build_id.into(),
        boot_id: "fake-boot".into(),
        mode: AgentMode::Process,
        uptime_at_start_ms: 1,
        uptime_at_hello_ms: 2,
        connection_seq: 0,
        capabilities: vec![],
    });
    frame::encode(&h, 1 << 20).expect("encode")
}

/// Waits for the host to close the connection (reading and discarding
/// whatever it sends first); fails if it stays open past `within`.
pub async fn expect_closed(s: &mut UnixStream, within: Duration) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if outcome.is_err() {
        bail!("the host kept the connection open for {within:?}");
    }
    Ok(got)
}
