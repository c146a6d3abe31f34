//! TURN credentials against a real TURN server: the test starts coturn on
//! 127.0.0.1 with `use-auth-secret` and a random shared secret, airlockd is
//! configured with the same secret and the server's URL, and a session's
//! viewer asks airlockd for ICE servers. A TURN allocation (the `turn`
//! crate's client) with airlockd's credentials succeeds; one with a
//! credential whose expiry has passed, or signed with another secret, is
//! refused. coturn is killed however the test ends.

use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_host::live::turn::rest_credential;
use airlock_tests::login::LoginRig;
use anyhow::{bail, ensure, Context, Result};
use reqwest::Method;
use turn::client::{Client, ClientConfig};
use webrtc::util::Conn;

const REALM: &str = "airlock.test";
const USER: &str = "turn-user";

/// A coturn process; killed when dropped.
struct Coturn {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (coturn listens on both).
fn free_port() -> Result<u16> {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port")
}

/// A secret for this run: 32 random bytes as hex, from the kernel.
fn random_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Coturn {
    /// Starts coturn and waits (up to 10 s) until it accepts connections.
    fn start(secret: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let arg = |k: &str, v: &Path| format!("--{k}={}", v.display());
        let child = Command::new("/usr/bin/turnserver")
            .args([
                "-n",
                "--listening-ip=127.0.0.1",
                "--relay-ip=127.0.0.1",
                &format!("--listening-port={port}"),
                "--use-auth-secret",
                &format!("--static-auth-secret={secret}"),
                &format!("--realm={REALM}"),
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--simple-log",
                "--no-stdout-log",
                &arg("log-file", &dir.path().join("turn.log")),
                &arg("pidfile", &dir.path().join("turn.pid")),
                &arg("userdb", &dir.path().join("turndb")),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start /usr/bin/turnserver (coturn)")?;
        let mut coturn = Self { child, port, dir };
        coturn.wait_listening(Duration::from_secs(10))?;
        Ok(coturn)
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("coturn exited with {status}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("coturn did not listen within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        airlock_tests::tail(
            &std::fs::read_to_string(self.dir.path().join("turn.log")).unwrap_or_default(),
            30,
        )
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Allocates a relay on the TURN server with `username`/`password`;
/// returns the relayed address.
async fn allocate(server: &str, username: &str, password: &str) -> Result<String> {
    let conn = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.into(),
        turn_serv_addr: server.into(),
        username: username.into(),
        password: password.into(),
        realm: REALM.into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await?;
    client.listen().await?;
    let result = tokio::time::timeout(Duration::from_secs(15), client.allocate()).await;
    let outcome = match result {
        Ok(Ok(relay)) => Ok(relay.local_addr()?.to_string()),
        Ok(Err(e)) => Err(anyhow::anyhow!("allocation refused: {e}")),
        Err(_) => Err(anyhow::anyhow!("no allocation answer within 15 s")),
    };
    let _ = client.close().await;
    outcome
}

/// True when the TURN server refused the allocation as unauthorised (401),
/// rather than failing for another reason.
fn unauthorized(outcome: &Result<String>) -> bool {
    matches!(outcome, Err(e) if e.to_string().contains("401"))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn turn_credentials_from_airlockd_allocate_and_expired_ones_do_not() -> Result<()> {
    let secret = random_secret()?;
    let coturn = Coturn::start(&secret)?;
    let url = format!("turn:{}?transport=udp", coturn.addr());
    let rig = LoginRig::start(|s| {
        s.set("auth", "prestart_cli_vm", "false")
            .set("live", "ice_addresses", "[\"127.0.0.1\"]")
            .set("live", "turn_urls", &format!("[{url:?}]"))
            .set("live", "turn_secret", &format!("{secret:?}"))
            .set("live", "turn_ttl_secs", "600")
    })
    .await?;
    let d = &rig.daemon;
    let result = async {
        let link = d.start_live(USER, "codex").await?;
        let path = format!(
            "/api/webrtc/ice-servers?session={}&token={}",
            link.id, link.token
        );
        let (status, v) = d.request(Method::GET, &path, None).await?;
        ensure!(status == 200, "{status} {}", v["error"]);
        ensure!(v["ttl"] == 600, "ttl {}", v["ttl"]);
        let turn = &v["iceServers"][0];
        ensure!(turn["urls"][0] == url.as_str(), "urls {}", turn["urls"]);
        let username = turn["username"].as_str().context("username")?;
        let password = turn["credential"].as_str().context("credential")?;
        let (expiry, user) = username.split_once(':').context("<expiry>:<user>")?;
        ensure!(user == USER, "{username}");
        let expiry: i64 = expiry.parse()?;
        let now = unix_now();
        ensure!(
            (now + 590..=now + 610).contains(&expiry),
            "expiry {expiry} vs now {now}"
        );
        // The password is the HMAC airlockd computes from the shared secret.
        let expected = rest_credential(&secret, USER, expiry);
        ensure!(
            expected.credential.0 == password,
            "the credential is not HMAC-SHA1 of the username"
        );

        let relayed = allocate(&coturn.addr(), username, password).await?;
        ensure!(relayed.starts_with("127.0.0.1:"), "relayed at {relayed}");

        let stale = rest_credential(&secret, USER, now - 60);
        let refused = allocate(&coturn.addr(), &stale.username, &stale.credential.0).await;
        ensure!(unauthorized(&refused), "an expired credential: {refused:?}");

        let forged = rest_credential("another-secret", USER, now + 600);
        let refused = allocate(&coturn.addr(), &forged.username, &forged.credential.0).await;
        ensure!(
            unauthorized(&refused),
            "another secret's credential: {refused:?}"
        );

        let config = std::fs::read_to_string(d.dir.path().join("airlockd.log"))?;
        ensure!(
            !config.contains(&secret),
            "the TURN secret is in airlockd's log"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("==== coturn log ====\n{}", coturn.log());
        d.print_sessions().await;
        d.print_diagnostics();
    }
    result
}
