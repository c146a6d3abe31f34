//! A real TURN server (coturn) for tests: started on 127.0.0.1 with
//! `use-auth-secret` and a random shared secret, which it reads from a
//! config file of mode 0600 (never from its command line), and killed when
//! dropped. Readiness is a TCP connect, with a deadline.

use std::net::{TcpStream, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The realm tests' TURN servers use.
pub const REALM: &str = "airlock.test";

/// A coturn process; killed when dropped.
#[derive(Debug)]
pub struct Coturn {
    child: Child,
    /// Its port (UDP and TCP) on 127.0.0.1.
    pub port: u16,
    /// The shared secret of its TURN REST credentials.
    pub secret: String,
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
pub fn random_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Coturn {
    /// Starts coturn and waits (up to 10 s) until it accepts connections.
    /// Relays to loopback peers are allowed: viewers and relays all live
    /// on this machine's loopback in tests.
    pub fn start() -> Result<Self> {
        Self::launch(
            "use-auth-secret\nfingerprint\nno-cli\nno-tls\nno-dtls\nallow-loopback-peers\n",
        )
    }

    /// Starts coturn from a production config (such as
    /// `config/turnserver.example.conf`) moved onto loopback: its
    /// addresses, port, secret, realm and files are replaced by the
    /// test's, everything else is kept as written.
    pub fn start_from(config: &str) -> Result<Self> {
        const OURS: [&str; 11] = [
            "listening-ip",
            "relay-ip",
            "external-ip",
            "listening-port",
            "static-auth-secret",
            "realm",
            "log-file",
            "pidfile",
            "userdb",
            "simple-log",
            "syslog",
        ];
        let kept: String = config
            .lines()
            .filter(|l| {
                let key = l.trim().split('=').next().unwrap_or("").trim();
                !OURS.contains(&key)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        Self::launch(&kept)
    }

    fn launch(body: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let secret = random_secret()?;
        let p = |name: &str| dir.path().join(name).display().to_string();
        let conf = format!(
            "{body}listening-ip=127.0.0.1\nrelay-ip=127.0.0.1\nlistening-port={port}\n\
             static-auth-secret={secret}\nrealm={REALM}\nsimple-log\nno-stdout-log\n\
             log-file={}\npidfile={}\nuserdb={}\n",
            p("turn.log"),
            p("turn.pid"),
            p("turndb")
        );
        let conf_path = dir.path().join("turnserver.conf");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&conf_path)?;
        std::io::Write::write_all(&mut f, conf.as_bytes())?;
        let child = Command::new("/usr/bin/turnserver")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start /usr/bin/turnserver (coturn)")?;
        let mut coturn = Self {
            child,
            port,
            secret,
            dir,
        };
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

    /// The end of its log (for a failing test).
    pub fn log(&self) -> String {
        crate::tail(
            &std::fs::read_to_string(self.dir.path().join("turn.log")).unwrap_or_default(),
            30,
        )
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// airlockd settings that use this server for viewers (UDP and TCP)
    /// and streamers (TCP).
    pub fn settings(&self, s: crate::Settings) -> crate::Settings {
        let urls = format!(
            "[\"turn:{0}?transport=udp\", \"turn:{0}?transport=tcp\"]",
            self.addr()
        );
        s.set("live", "turn_urls", &urls)
            .set("live", "turn_secret", &format!("{:?}", self.secret))
    }
}
