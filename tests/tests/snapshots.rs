//! Browser VMs from snapshots, under TCG with the real `browser` image:
//!
//! - The demo login completes through the viewer page in a browser VM
//!   taken from the warm pool and in one restored on demand, and the pool
//!   refills after use.
//! - Two copies of one snapshot do not share randomness: each one's
//!   Chromium opens a TLS connection to a server of the test, and their
//!   ClientHello randoms and key shares differ; each copy's clock is
//!   within 250 ms of the host's (brought in line by airlockd).
//! - A snapshot whose manifest names another agent build is refused (said
//!   on `/health`) and a new one is made.
//! - The pool holds no more VMs than its memory bound allows and leaves
//!   no process or file behind when airlockd stops.
//!
//! Snapshots are shared by the tests (and kept across runs) in
//! `$AIRLOCK_CACHE/snapshots`: the first test to need one makes it (about
//! a minute), the others wait for it (the store is locked meanwhile).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_tests::coturn::Coturn;
use airlock_tests::live::demo_login_through_viewer;
use airlock_tests::login::state_is;
use airlock_tests::{artifacts, golden_image, toml_path, with_daemon, Daemon, Settings};
use anyhow::{bail, ensure, Context, Result};
use reqwest::Method;
use serde_json::Value;
use tokio::io::AsyncReadExt;

/// How far a restored VM's clock may be from the host's around an exec of
/// `date`: the host brings it to within half a round trip of its agent
/// (milliseconds), so this leaves room only for the exec's own jitter.
const CLOCK_MARGIN_MS: i64 = 250;

/// Making a snapshot under TCG: boot, Chromium, warm-up, save (about a
/// minute alone; more beside other tests), or waiting for another test's.
const SNAPSHOT_READY: Duration = Duration::from_secs(600);

/// Where the tests keep snapshots.
fn shared_snapshots() -> PathBuf {
    std::env::var_os("AIRLOCK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            artifacts()
                .map(|a| a.build_dir.join("cache"))
                .unwrap_or_default()
        })
        .join("snapshots")
}

/// Browser VMs from the image with snapshots in `dir` and a pool of
/// `pool` VMs; no CLI VM ahead of delivery (it would compete for the CPU).
fn settings(coturn: &Coturn, dir: &Path, pool: usize) -> Result<Settings> {
    let s = Settings::new("qemu")
        .set("vm", "browser_image", &toml_path(&golden_image("browser")?))
        .set("vm", "cli_image", &toml_path(&golden_image("cli")?))
        .set("vm", "boot_timeout_ms", "180000")
        .set("snapshots", "enabled", "true")
        .set("snapshots", "dir", &toml_path(dir))
        .set("snapshots", "warm_pool", &pool.to_string())
        .set("auth", "demo", "true")
        .set("auth", "prestart_cli_vm", "false")
        .set("auth", "browser_timeout_ms", "400000")
        .set("auth", "login_path_append", "[\"/usr/lib/airlock/fakes\"]");
    Ok(coturn.settings(s))
}

async fn health(d: &Daemon) -> Result<Value> {
    let (status, v) = d.request(Method::GET, "/health", None).await?;
    ensure!(status == 200, "{status} {v}");
    Ok(v)
}

/// Polls `/health` until its snapshot status satisfies `done` (or fails).
async fn wait_snapshots(d: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + SNAPSHOT_READY;
    loop {
        let s = health(d).await?["snapshots"].clone();
        if done(&s) {
            return Ok(s);
        }
        if s["state"] == "failed" {
            bail!("snapshots failed while waiting for {what}: {s}");
        }
        if Instant::now() > deadline {
            bail!("no {what} within {SNAPSHOT_READY:?}: {s}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `browserVm` step: how the session's VM started.
fn vm_origin(v: &Value) -> String {
    v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["event"] == "browserVm")
        .and_then(|s| s["detail"].as_str())
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn logins_complete_in_browser_vms_from_the_pool_and_restored_on_demand() -> Result<()> {
    let coturn = Coturn::start()?;
    with_daemon(settings(&coturn, &shared_snapshots(), 1)?, async |d| {
        wait_snapshots(d, "a warm VM", |s| s["poolReady"] == 1).await?;
        let started = Instant::now();
        let first = d
            .start_until_page("pool-alice", "demo", "/authorize", Duration::from_secs(300))
            .await?;
        let to_page = started.elapsed();
        // Started before the pool refilled: restored on demand.
        let second = d
            .start_until_page(
                "restore-bob",
                "demo",
                "/authorize",
                Duration::from_secs(300),
            )
            .await?;
        let (a, b) = (vm_origin(&first), vm_origin(&second));
        ensure!(a.starts_with("taken from the warm pool"), "first VM: {a}");
        ensure!(
            b.starts_with("restored from a snapshot") || b.starts_with("taken from the warm pool"),
            "second VM: {b}"
        );
        eprintln!("from the pool: {a}; sign-in page {to_page:?} after the request\nsecond: {b}");
        for v in [&first, &second] {
            let (done, _viewer) = demo_login_through_viewer(d, v).await?;
            ensure!(state_is(&done, "completed"), "{done}");
        }
        // The pool refills after use.
        wait_snapshots(d, "the pool refilled", |s| s["poolReady"] == 1).await?;
        Ok(())
    })
    .await
}

/// What a ClientHello says: its random and its key shares.
#[derive(Debug, Clone, PartialEq)]
struct Hello {
    random: Vec<u8>,
    key_shares: Vec<u8>,
}

/// Parses the first TLS record of a connection as a ClientHello.
fn parse_client_hello(rec: &[u8]) -> Result<Hello> {
    ensure!(
        rec.len() > 5 && rec[0] == 0x16,
        "not a TLS handshake record"
    );
    let hs = &rec[5..];
    ensure!(hs[0] == 0x01, "not a ClientHello");
    let body = &hs[4..];
    let random = body.get(2..34).context("short hello")?.to_vec();
    let mut at = 34;
    let sid = *body.get(at).context("session id")? as usize;
    at += 1 + sid;
    let suites = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    at += 2 + suites;
    let comp = body[at] as usize;
    at += 1 + comp;
    let ext_len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    at += 2;
    let end = (at + ext_len).min(body.len());
    let mut key_shares = Vec::new();
    while at + 4 <= end {
        let ty = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let data = body.get(at + 4..at + 4 + len).context("extension")?;
        if ty == 0x0033 {
            key_shares = data.to_vec();
        }
        at += 4 + len;
    }
    ensure!(!key_shares.is_empty(), "no key_share extension");
    Ok(Hello { random, key_shares })
}

/// A TCP server that reads the first ClientHello sent to it and closes.
async fn hello_catcher() -> Result<(u16, tokio::sync::oneshot::Receiver<Result<Hello>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let read = async {
            let (mut s, _) = listener.accept().await?;
            let mut rec = vec![0u8; 5];
            s.read_exact(&mut rec).await?;
            let len = u16::from_be_bytes([rec[3], rec[4]]) as usize;
            rec.resize(5 + len, 0);
            s.read_exact(&mut rec[5..]).await?;
            parse_client_hello(&rec)
        };
        let _ = tx.send(read.await);
    });
    Ok((port, rx))
}

/// Providers whose "login" opens `https://probeN.test:PORT/` (one per port).
fn probe_providers(dir: &Path, ports: &[u16]) -> Result<String> {
    let mut text = std::fs::read_to_string(artifacts()?.repo.join("config/providers.toml"))?;
    for (i, port) in ports.iter().enumerate() {
        text.push_str(&format!(
            "\n[probe{i}]\ndisplay_name = \"probe {i}\"\n\
             command = [\"sh\", \"-c\", \"xdg-open https://probe{i}.test:{port}/ && exec sleep 3600\"]\n\
             flow = {{ type = \"loopback\" }}\nconfirm = {{ type = \"file\" }}\n\
             egress = [\"probe{i}.test:{port}\"]\n\
             [[probe{i}.credentials]]\npath = \"${{HOME}}/never.json\"\ndeliver_to = \"/root/never.json\"\n"
        ));
    }
    let path = dir.join("providers.toml");
    std::fs::write(&path, text)?;
    Ok(toml_path(&path))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_of_one_snapshot_draw_their_own_randomness_and_keep_the_hosts_time() -> Result<()> {
    let coturn = Coturn::start()?;
    let dir = tempfile::tempdir()?;
    let (p0, hello0) = hello_catcher().await?;
    let (p1, hello1) = hello_catcher().await?;
    let routes = format!(
        "{{ \"probe0.test:{p0}\" = \"127.0.0.1:{p0}\", \"probe1.test:{p1}\" = \"127.0.0.1:{p1}\" }}"
    );
    let s = settings(&coturn, &shared_snapshots(), 1)?
        .set(
            "auth",
            "providers_file",
            &probe_providers(dir.path(), &[p0, p1])?,
        )
        .set("egress", "routes", &routes);
    with_daemon(s, async |d| {
        wait_snapshots(d, "a warm VM", |s| s["poolReady"] == 1).await?;
        let a = d.start_session("rand-a", "probe0").await?;
        let b = d.start_session("rand-b", "probe1").await?;
        let wait = Duration::from_secs(240);
        // Each copy's clock is read as soon as its ClientHello arrived:
        // the catcher answers no TLS, so the session fails once its page
        // times out, and its VM goes with it.
        let ha = tokio::time::timeout(wait, hello0)
            .await
            .context("no ClientHello from the first copy")???;
        clock_is_the_hosts(d, &a, wait).await?;
        let hb = tokio::time::timeout(wait, hello1)
            .await
            .context("no ClientHello from the second copy")???;
        clock_is_the_hosts(d, &b, wait).await?;
        ensure!(
            ha.random != hb.random,
            "both copies sent the ClientHello random {:02x?}",
            ha.random
        );
        ensure!(
            ha.key_shares != hb.key_shares,
            "both copies sent the same key shares"
        );
        Ok(())
    })
    .await
}

/// Session `id`'s browser VM was restored (not booted) and its clock is
/// the host's.
async fn clock_is_the_hosts(d: &Daemon, id: &str, wait: Duration) -> Result<()> {
    let v = d
        .wait_session(id, wait, |v| v["browserVmId"].is_string())
        .await?;
    let origin = vm_origin(&v);
    ensure!(
        !origin.starts_with("booted"),
        "{id} was not restored: {origin}"
    );
    let vm = v["browserVmId"].as_str().context("browserVmId")?;
    let before = now_ms();
    let out = d.exec(vm, &["date", "+%s%3N"]).await?;
    let after = now_ms();
    let guest: i64 = out["stdout"]
        .as_str()
        .unwrap_or("")
        .trim()
        .parse()
        .context("date")?;
    let (_, view) = d
        .request(Method::GET, &format!("/api/vms/{vm}"), None)
        .await?;
    ensure!(
        guest >= before - CLOCK_MARGIN_MS && guest <= after + CLOCK_MARGIN_MS,
        "the restored VM's clock is {guest}, the host's {before}..{after} \
         (its timings: {})",
        view["timings"]
    );
    Ok(())
}

/// A private copy of the shared snapshot directory (hard links where
/// possible), so that a test may spoil it. Taken under the store's lock,
/// as airlockd takes it: another test's daemon may be making or pruning.
fn copy_snapshots(from: &Path, to: &Path) -> Result<()> {
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(from.join(".lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("locking the shared snapshot store")?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if !entry.path().is_dir() || name.to_string_lossy().starts_with('.') {
            continue;
        }
        let dest = to.join(&name);
        std::fs::create_dir_all(&dest)?;
        for f in std::fs::read_dir(entry.path())? {
            let f = f?.path();
            let target = dest.join(f.file_name().context("name")?);
            if std::fs::hard_link(&f, &target).is_err() {
                std::fs::copy(&f, &target)?;
            }
        }
    }
    Ok(())
}

/// A private copy of the shared snapshot (made first if missing) with
/// each snapshot directory in it spoiled by `spoil`. A spoiler replaces
/// files rather than writing into them: they are hard links to the
/// shared copy, which stays intact.
async fn spoiled_copy(
    coturn: &Coturn,
    spoil: impl Fn(&Path) -> Result<()>,
) -> Result<tempfile::TempDir> {
    with_daemon(settings(coturn, &shared_snapshots(), 0)?, async |d| {
        wait_snapshots(d, "a snapshot", |s| s["state"] == "ready").await?;
        Ok(())
    })
    .await?;
    let private = tempfile::tempdir()?;
    copy_snapshots(&shared_snapshots(), private.path())?;
    let mut spoiled = 0;
    for entry in std::fs::read_dir(private.path())? {
        spoil(&entry?.path())?;
        spoiled += 1;
    }
    if spoiled == 0 {
        let listing: Vec<String> = std::fs::read_dir(shared_snapshots())?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        bail!(
            "no snapshot to spoil in {} (it holds {listing:?})",
            shared_snapshots().display()
        );
    }
    Ok(private)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_of_another_agent_is_refused_and_made_again() -> Result<()> {
    let coturn = Coturn::start()?;
    let private = spoiled_copy(&coturn, |dir| {
        let manifest = dir.join("manifest.json");
        let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest)?)?;
        m["inputs"]["agentBuildId"] = "0000000000000000000000000000000000000000".into();
        std::fs::remove_file(&manifest)?;
        std::fs::write(&manifest, serde_json::to_vec(&m)?)?;
        Ok(())
    })
    .await?;
    with_daemon(settings(&coturn, private.path(), 0)?, async |d| {
        let s = wait_snapshots(d, "a new snapshot", |s| s["state"] == "ready").await?;
        let problems = s["problems"].to_string();
        ensure!(
            problems.contains(
                "was made for agent build \\\"0000000000000000000000000000000000000000\\\""
            ),
            "the spoiled snapshot was not refused by name: {s}"
        );
        ensure!(s["made"] == 1, "no new snapshot was made: {s}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_that_does_not_restore_gives_way_to_a_cold_boot_and_is_made_again() -> Result<()>
{
    let coturn = Coturn::start()?;
    // Zeros of the saved state's size: the manifest still matches, QEMU
    // refuses to load it.
    let private = spoiled_copy(&coturn, |dir| {
        let state = dir.join("state.bin");
        let len = std::fs::metadata(&state)?.len();
        std::fs::remove_file(&state)?;
        std::fs::write(&state, vec![0u8; len as usize])?;
        Ok(())
    })
    .await?;
    // With a pool, whose refills fail too: three failures in a row and the
    // snapshot is made again.
    with_daemon(settings(&coturn, private.path(), 1)?, async |d| {
        wait_snapshots(d, "the spoiled snapshot", |s| s["state"] == "ready").await?;
        let v = d
            .start_until_page("cold-carol", "demo", "/authorize", Duration::from_secs(400))
            .await?;
        let notes: Vec<&str> = v["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["event"] == "browserVm")
            .filter_map(|s| s["detail"].as_str())
            .collect();
        ensure!(notes.len() == 2, "{notes:?}");
        ensure!(
            notes[0].contains("restored from a snapshot")
                && notes[0].contains("booting one from the image instead"),
            "{notes:?}"
        );
        ensure!(notes[1].starts_with("booted from its image"), "{notes:?}");
        let s = wait_snapshots(d, "a new snapshot and a warm VM from it", |s| {
            s["made"] == 1 && s["poolReady"] == 1
        })
        .await?;
        ensure!(
            s["problems"].to_string().contains("failed in a row"),
            "the snapshot was not given up by name: {s}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_keeps_to_its_memory_bound_and_leaves_nothing_behind() -> Result<()> {
    let coturn = Coturn::start()?;
    // Room for two browser VMs (1536 MiB each) though three are asked for.
    let s = settings(&coturn, &shared_snapshots(), 3)?.set("snapshots", "pool_memory_mib", "3500");
    with_daemon(s, async |d| {
        let s = wait_snapshots(d, "two warm VMs", |s| s["poolReady"] == 2).await?;
        ensure!(s["poolTarget"] == 2, "{s}");
        // Running, unowned, listed as pooled: a QEMU each.
        let (_, vms) = d.request(Method::GET, "/api/vms", None).await?;
        let pooled: Vec<&Value> = vms["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["pooled"] == true && v["state"] == "ready" && v["owner"].is_null())
            .collect();
        ensure!(pooled.len() == 2, "{vms}");
        // Their guest RAM lives in /dev/shm, named by id (see `ramfile`).
        let ram_files: Vec<PathBuf> = pooled
            .iter()
            .filter_map(|v| v["id"].as_str())
            .map(|id| PathBuf::from(format!("/dev/shm/airlock-{id}.ram")))
            .collect();
        ensure!(
            ram_files.iter().all(|f| f.exists()),
            "no RAM files: {ram_files:?}"
        );
        let procs = d.leftover_processes();
        ensure!(
            procs.iter().filter(|p| p.contains("qemu-system")).count() == 2,
            "{procs:#?}"
        );
        let status = d.terminate()?;
        ensure!(status.success(), "airlockd exited with {status}");
        let procs = d.leftover_processes();
        ensure!(procs.is_empty(), "left running after shutdown: {procs:#?}");
        let dirs = d.leftover_vm_dirs();
        ensure!(dirs.is_empty(), "VM directories left: {dirs:?}");
        let cgroups = d.leftover_cgroups();
        ensure!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        let left: Vec<&PathBuf> = ram_files.iter().filter(|f| f.exists()).collect();
        ensure!(left.is_empty(), "guest RAM files left: {left:?}");
        Ok(())
    })
    .await
}
