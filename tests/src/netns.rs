//! A bad network for the live-view tests and bench: two network namespaces
//! this process creates, a point-to-point link between them shaped by
//! [`crate::netem`] (loss, delay, and a rate cap from A to B: this kernel
//! has no `sch_netem`). airlockd runs in A (started
//! with [`crate::Settings::in_netns`]), the viewer's Chromium in B; the
//! test process reaches what listens on either side's loopback through
//! [`Forward`]ers, whose sockets are made by short-lived threads that
//! entered the namespace.
//!
//! Safety: nothing is added to the main namespace (no link, address or
//! route); each TUN device is made by a thread inside its namespace.
//! The namespaces are deleted on drop, and leftovers of a killed test
//! process are deleted by the next [`Link::create`].

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nix::sched::CloneFlags;

use crate::netem::Shaper;

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Names of this module's namespaces: `alnet-<pid>-<a|b>`.
const PREFIX: &str = "alnet-";

/// Flags for a viewer Chromium in B: the viewers' listener's certificate
/// is the rig's own.
pub const VIEWER_ARGS: &[&str] = &["--ignore-certificate-errors"];

/// The bad network: 2 % loss each way, 80 ms round trip, 2 Mbit/s
/// from airlockd to the viewer.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// Loss each way, in percent.
    pub loss_pct: f64,
    /// One-way delay each way (ms).
    pub delay_ms: u32,
    /// The cap from A (airlockd) to B (the viewer), in kbit/s.
    pub rate_kbit: u32,
}

/// 2 % loss, 40 ms each way, 2 Mbit/s down.
pub const BAD_NETWORK: Profile = Profile {
    loss_pct: 2.0,
    delay_ms: 40,
    rate_kbit: 2000,
};

/// One namespace made by `ip netns add`; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    fd: Arc<OwnedFd>,
}

impl Netns {
    fn add(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let file = std::fs::File::open(PathBuf::from(NETNS_DIR).join(name));
        let fd = match file {
            Ok(f) => Arc::new(OwnedFd::from(f)),
            Err(e) => {
                let _ = ip(&["netns", "del", name]);
                return Err(e).context("opening the new namespace");
            }
        };
        Ok(Self {
            name: name.into(),
            fd,
        })
    }

    /// Its name, for `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle a child process or thread can enter.
    pub fn handle(&self) -> Arc<OwnedFd> {
        self.fd.clone()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netns: could not delete {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread (or a child between fork and exec) into `ns`.
pub fn enter(ns: &OwnedFd) -> std::io::Result<()> {
    nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2; scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces joined by a shaped point-to-point link.
#[derive(Debug)]
pub struct Link {
    /// Dropped first: closing the TUN descriptors removes the devices.
    shaper: Shaper,
    /// airlockd's side.
    pub a: Netns,
    /// The viewer's side.
    pub b: Netns,
    /// A's address on the link.
    pub a_addr: Ipv4Addr,
    /// B's address on the link.
    pub b_addr: Ipv4Addr,
}

const TUN_A: &str = "tun-al-a";
const TUN_B: &str = "tun-al-b";

impl Link {
    /// Creates both namespaces and the shaped link between them.
    pub async fn create(profile: Profile) -> Result<Self> {
        delete_leftovers();
        let pid = std::process::id();
        let a = Netns::add(&format!("{PREFIX}{pid}-a"))?;
        let b = Netns::add(&format!("{PREFIX}{pid}-b"))?;
        let (a_addr, b_addr) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2));
        // Each device is made by a thread inside its namespace: the main
        // namespace never holds either.
        let tun_a = in_netns(Some(a.handle()), || crate::netem::open_tun(TUN_A)).await?;
        let tun_b = in_netns(Some(b.handle()), || crate::netem::open_tun(TUN_B)).await?;
        for (ns, dev, addr, peer) in [(&a, TUN_A, a_addr, b_addr), (&b, TUN_B, b_addr, a_addr)] {
            ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
            let (addr, peer) = (addr.to_string(), peer.to_string());
            ip(&[
                "-n", &ns.name, "addr", "add", &addr, "peer", &peer, "dev", dev,
            ])?;
            ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
        }
        let delay = std::time::Duration::from_millis(profile.delay_ms.into());
        let shaper = Shaper::start(tun_a, tun_b, profile.loss_pct, delay, profile.rate_kbit);
        Ok(Self {
            shaper,
            a,
            b,
            a_addr,
            b_addr,
        })
    }

    /// Loss 100 % both ways: the viewer's network is gone, its processes
    /// and sockets stay.
    pub fn cut(&self) {
        self.shaper.set_loss(100.0);
    }

    /// Bytes A offered towards B (before loss and the cap), bytes
    /// delivered to B, packets dropped (at random and by the full queue).
    pub fn down(&self) -> (u64, u64, u64) {
        let c = self.shaper.down();
        let get = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        (
            get(&c.offered_bytes),
            get(&c.delivered_bytes),
            get(&c.lost) + get(&c.overflowed),
        )
    }

    /// The shaper's counters, for a failure's diagnostics.
    pub fn describe(&self) -> String {
        format!(
            "down (A to B): {:?}\nup (B to A): {:?}",
            self.shaper.down(),
            self.shaper.up()
        )
    }
}

/// Deletes this module's namespaces whose process is gone (a test killed
/// before its drops ran).
fn delete_leftovers() {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for name in dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// A TCP forwarder: listens on loopback in one namespace and connects each
/// accepted connection to `target` in another (`None`: this process's).
/// Stops on drop.
#[derive(Debug)]
pub struct Forward {
    /// The port it listens on.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Forward {
    /// Listens on `127.0.0.1:port` (0: any) inside `listen_in` and
    /// forwards to `target` inside `connect_in`.
    pub async fn start(
        listen_in: Option<Arc<OwnedFd>>,
        port: u16,
        connect_in: Option<Arc<OwnedFd>>,
        target: SocketAddr,
    ) -> Result<Self> {
        let listener = in_netns(listen_in, move || {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .await
        .context("forwarder listen")?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let ns = connect_in.clone();
                tokio::spawn(async move {
                    let Ok(out) = in_netns(ns, move || connect(target)).await else {
                        return;
                    };
                    let Ok(mut out) = tokio::net::TcpStream::from_std(out) else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                });
            }
        });
        Ok(Self { port, task })
    }
}

fn connect(target: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect(target)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `f` on a fresh thread inside `ns` (this process's namespace when
/// `None`): a socket keeps the namespace it was made in, the thread ends.
async fn in_netns<T: Send + 'static>(
    ns: Option<Arc<OwnedFd>>,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let thread = std::thread::spawn(move || {
        if let Some(ns) = ns {
            enter(&ns)?;
        }
        f()
    });
    let joined = tokio::task::spawn_blocking(move || thread.join()).await?;
    Ok(joined.map_err(|_| anyhow::anyhow!("namespace thread panicked"))??)
}

/// A [`crate::login::LoginRig`] whose airlockd runs in `link`'s namespace
/// A: viewers' listener and ICE on A's veth address, the operator API and
/// the fake OAuth server reached across the namespace by forwarders.
#[derive(Debug)]
pub struct NetRig {
    /// The rig; its daemon's `base` goes through a forwarder.
    pub rig: crate::login::LoginRig,
    ns: Arc<OwnedFd>,
    _forwards: Vec<Forward>,
    _tls: tempfile::TempDir,
}

impl NetRig {
    /// Starts the rig in `link`'s A; `tune` adjusts airlockd's settings.
    pub async fn start(
        link: &Link,
        tune: impl FnOnce(crate::Settings) -> crate::Settings,
    ) -> Result<Self> {
        let (ns, addr) = (link.a.handle(), link.a_addr);
        // Off loopback the viewers' listener must speak TLS: a certificate
        // for A's address, which the viewer accepts (VIEWER_ARGS).
        let cert = rcgen::generate_simple_self_signed(vec![addr.to_string()])?;
        let tls = tempfile::tempdir()?;
        let (cert_file, key_file) = (tls.path().join("cert.pem"), tls.path().join("key.pem"));
        std::fs::write(&cert_file, cert.cert.pem())?;
        std::fs::write(&key_file, cert.key_pair.serialize_pem())?;
        let mut rig = crate::login::LoginRig::start(|s| {
            tune(
                s.in_netns(ns.clone())
                    .set("viewer", "listen", &format!("\"{addr}:0\""))
                    .set("viewer", "tls_cert", &crate::toml_path(&cert_file))
                    .set("viewer", "tls_key", &crate::toml_path(&key_file))
                    .set("live", "ice_addresses", &format!("[\"{addr}\"]"))
                    .set("auth", "prestart_cli_vm", "false"),
            )
        })
        .await?;
        let api = loopback_port(&rig.daemon.base)?;
        // The same port on this side: airlockd checks the Host header.
        let api = Forward::start(None, api, Some(ns.clone()), local(api)).await?;
        rig.daemon.base = format!("http://127.0.0.1:{}", api.port);
        // The fake vendor listens in this namespace; the login CLI and the
        // browser role dial it at the same address inside A.
        let oauth = loopback_port(rig.oauth.base_url())?;
        let oauth = Forward::start(Some(ns.clone()), oauth, None, local(oauth)).await?;
        Ok(Self {
            rig,
            ns,
            _forwards: vec![api, oauth],
            _tls: tls,
        })
    }

    /// The browser role's page over DevTools (its Chromium listens in A).
    pub async fn browser_role_tab(&self) -> Result<crate::cdp::Tab> {
        let port = crate::cdp::browser_role_port(self.rig.daemon.pid()).await?;
        let forward = Forward::start(None, port, Some(self.ns.clone()), local(port)).await?;
        // The tab's socket outlives the forwarder's listener.
        crate::cdp::Tab::first_page(forward.port).await
    }
}

fn local(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// The port of `http://127.0.0.1:PORT[/...]`.
fn loopback_port(url: &str) -> Result<u16> {
    url.strip_prefix("http://127.0.0.1:")
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("not a loopback URL: {url}"))
}
