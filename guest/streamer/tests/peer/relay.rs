//! The streamer as it runs in a browser VM, with no network interface:
//! it reaches viewers only as a TURN client over TCP through an HTTP
//! `CONNECT` proxy (in the VM, the agent's; here a stand-in), against a
//! real coturn. A child of `peer.rs`, whose harness it drives.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::{Codec, Harness, DEADLINE};

/// coturn on 127.0.0.1 with one long-term user (from a config file), and
/// relays to loopback peers allowed; killed on drop.
struct Turn {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Turn {
    const USER: &'static str = "streamer";
    const PASSWORD: &'static str = "relay-only";

    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.path().join("turnserver.conf");
        let p = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(
            &conf,
            format!(
                "listening-ip=127.0.0.1\nrelay-ip=127.0.0.1\nlistening-port={port}\nlt-cred-mech\n\
                 user={}:{}\nrealm=airlock.test\nno-cli\nno-tls\nno-dtls\nallow-loopback-peers\n\
                 simple-log\nno-stdout-log\nlog-file={}\npidfile={}\nuserdb={}\n",
                Self::USER,
                Self::PASSWORD,
                p("turn.log"),
                p("turn.pid"),
                p("turndb")
            ),
        )?;
        let child = Command::new("turnserver")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting coturn (turnserver)")?;
        let turn = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("coturn did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(turn)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP `CONNECT` proxy on 127.0.0.1, standing in for the
/// agent's egress proxy and the host's gateway; records what was asked.
async fn connect_proxy() -> Result<(String, Arc<Mutex<Vec<String>>>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
                    let Ok(b) = client.read_u8().await else {
                        return;
                    };
                    head.push(b);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let Some(target) = text
                    .strip_prefix("CONNECT ")
                    .and_then(|t| t.split(' ').next())
                else {
                    return;
                };
                record.lock().unwrap().push(target.to_string());
                let Ok(mut remote) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut remote).await;
                }
            });
        }
    });
    Ok((url, seen))
}

/// A browser VM has no network: its streamer reaches the viewer only as a
/// TURN client over TCP through the agent's HTTP proxy, with the relay
/// policy (no host candidates offered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_network_the_streamer_relays_through_turn_over_tcp_via_a_proxy() -> Result<()> {
    let turn = Turn::start()?;
    let (proxy, asked) = connect_proxy().await?;
    let server = airlock_proto::stream::IceServer {
        urls: vec![format!("turn:127.0.0.1:{}?transport=tcp", turn.port)],
        username: Some(Turn::USER.into()),
        credential: Some(airlock_proto::SecretText(Turn::PASSWORD.into())),
    };
    let h = Harness::start_with(|s| {
        s.http_proxy = Some(proxy.clone());
        s.ice_servers = vec![server];
    })
    .await?;
    let mut alice = h.connect("alice", Codec::Vp8).await?;
    alice
        .wait_video("frames through the relay", |v| v.frames >= 20)
        .await?;
    let asked = asked.lock().unwrap().clone();
    let relay = format!("127.0.0.1:{}", turn.port);
    assert!(
        asked.iter().all(|t| *t == relay) && !asked.is_empty(),
        "{asked:?}"
    );
    Ok(())
}
