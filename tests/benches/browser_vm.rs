//! `make bench` for browser VMs (QEMU under TCG here, from the `browser`
//! golden image): `POST /api/auth/start` to `awaiting_user` for the demo
//! login, median of several sessions one after another, split by stage
//! (VMM start, kernel to stage-1 `/init`, stage 1 and the agent to ready,
//! Xvfb, Chromium to DevTools, the login's URL opened, the page shown);
//! the memory of a browser VM at `awaiting_user` (inside the guest, and
//! QEMU's and vhost-device-vsock's RSS on the host); what one more VM
//! costs on disk; the images' sizes and build times (cached, and the
//! Debian layers rebuilt); and the live view's input-to-photon latency
//! with the source in the VM (a key pressed in a headless Chromium viewer
//! on this host to the change on its screen, through TURN over TCP).
//! Figures, not assertions; `SPECIFICATION.md` records them.
//!
//! `AIRLOCK_BENCH_RUNS` sets the number of sessions (default 5);
//! `AIRLOCK_BENCH_MEMORY_MIB` the browser VM's memory (default 1536, as
//! `vm.browser_memory_mib`); `AIRLOCK_BENCH_REBUILD=0` skips the Debian
//! layers' rebuild (minutes).

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use airlock_tests::cdp::Viewer;
use airlock_tests::coturn::Coturn;
use airlock_tests::live::click_screen;
use airlock_tests::login::{state_is, step_events};
use airlock_tests::stats::{median, percentile, row, rss_mib};
use airlock_tests::{artifacts, Daemon, Settings};
use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run() -> Result<()> {
    let runs = env_or("AIRLOCK_BENCH_RUNS", 5);
    let memory = env_or("AIRLOCK_BENCH_MEMORY_MIB", 1536);
    let a = artifacts()?;
    let image = |kind: &str| a.build_dir.join("images").join(kind);
    println!(
        "\nairlock browser VM benchmark: {runs} demo sessions one after another, browser VMs\n\
         from the browser image under QEMU (TCG) with {memory} MiB, POST /api/auth/start -> sign-in page shown"
    );
    let coturn = Coturn::start()?;
    let path = |p: std::path::PathBuf| format!("{:?}", p.display().to_string());
    let settings = Settings::new("qemu")
        .set("vm", "browser_image", &path(image("browser")))
        .set("vm", "cli_image", &path(image("cli")))
        .set("vm", "boot_timeout_ms", "180000")
        .set("vm", "browser_memory_mib", &memory.to_string())
        .set("auth", "demo", "true")
        .set("auth", "prestart_cli_vm", "false")
        .set("auth", "login_path_append", "[\"/usr/lib/airlock/fakes\"]");
    let d = Daemon::start(coturn.settings(settings)).await?;
    let mut figures = serde_json::Map::new();
    let result = async {
        sessions(&d, runs, &mut figures).await?;
        latency(&d, &mut figures).await
    }
    .await;
    if result.is_err() {
        d.print_sessions().await;
        d.print_diagnostics();
    }
    result?;
    images(&mut figures)?;
    let out = a.repo.join("build/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("browser_vm.json"),
        serde_json::to_string_pretty(&figures)?,
    )?;
    println!("\n(figures also written to build/bench/browser_vm.json)");
    Ok(())
}

const STAGES: [&str; 8] = [
    "request -> VMM started",
    "VMM started -> stage-1 /init (kernel)",
    "/init -> agent ready (stage 1, overlay root, agent)",
    "agent ready -> Xvfb serving",
    "Xvfb -> Chromium's DevTools connected",
    "DevTools -> browser_ready (first tab)",
    "browser_ready -> login URL opened in Chromium",
    "URL opened -> sign-in page shown (loaded)",
];

/// One session's figures.
#[derive(Default)]
struct Sample {
    stages: Vec<f64>,
    total: f64,
    guest_used_mib: f64,
    guest_total_mib: f64,
    qemu_rss_mib: f64,
    vhost_rss_mib: f64,
    vm_dir_kib: f64,
}

async fn sessions(
    d: &Daemon,
    runs: usize,
    figures: &mut serde_json::Map<String, Value>,
) -> Result<()> {
    let mut samples = Vec::new();
    for run in 0..runs {
        let started = Instant::now();
        let id = d.start_session(&format!("bench-vm-{run}"), "demo").await?;
        d.wait_session(&id, Duration::from_secs(400), |v| {
            step_events(v).iter().any(|e| e == "pageLoaded") || v["state"] == "failed"
        })
        .await?;
        let total = started.elapsed().as_secs_f64() * 1000.0;
        let (_, view) = d
            .request(Method::GET, &format!("/api/auth/session/{id}"), None)
            .await?;
        if !state_is(&view, "awaiting_user") {
            bail!("session {id} is not awaiting the user: {view}");
        }
        let mut sample = measure(d, &view).await?;
        sample.total = total;
        println!(
            "run {run}: {:.1} s to the page shown, guest uses {:.0} MiB, QEMU RSS {:.0} MiB",
            total / 1000.0,
            sample.guest_used_mib,
            sample.qemu_rss_mib
        );
        samples.push(sample);
        d.cancel_session(&id).await?;
    }
    report(&samples, figures);
    Ok(())
}

fn at(view: &Value, event: &str, state: &str) -> Result<SystemTime> {
    let step = view["steps"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s["event"] == event && (state.is_empty() || s["state"] == state))
        })
        .with_context(|| format!("no {event} {state} step"))?;
    Ok(humantime::parse_rfc3339(
        step["at"].as_str().context("at")?,
    )?)
}

fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).unwrap_or_default().as_secs_f64() * 1000.0
}

/// `(Xvfb N ms, Chromium M ms)` from the browser_ready step.
fn browser_split(view: &Value) -> Result<(f64, f64)> {
    let detail = view["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["state"] == "browser_ready"))
        .and_then(|s| s["detail"].as_str())
        .context("browser_ready detail")?;
    let number = |after: &str| -> Result<f64> {
        let rest = detail.split(after).nth(1).context("split")?;
        Ok(rest.split_whitespace().next().context("n")?.parse()?)
    };
    Ok((number("Xvfb ")?, number("Chromium ")?))
}

async fn measure(d: &Daemon, view: &Value) -> Result<Sample> {
    let vm_id = view["browserVmId"].as_str().context("browserVmId")?;
    let (_, vm) = d
        .request(Method::GET, &format!("/api/vms/{vm_id}"), None)
        .await?;
    let t = &vm["timings"];
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let (to_vmm, to_init, to_ready) = (
        f(&t["requestToVmmMs"]),
        f(&t["vmmToInitMs"]),
        f(&t["requestToReadyMs"]),
    );
    let booting = at(view, "state", "booting")?;
    let ready_browser = at(view, "state", "browser_ready")?;
    let (xvfb, chromium) = browser_split(view)?;
    let browser_start = ms_between(booting, ready_browser);
    let stages = vec![
        to_vmm,
        to_init,
        to_ready - to_vmm - to_init,
        xvfb,
        chromium,
        browser_start - to_ready - xvfb - chromium,
        ms_between(ready_browser, at(view, "urlOpened", "")?),
        ms_between(at(view, "urlOpened", "")?, at(view, "pageLoaded", "")?),
    ];
    let meminfo = d.exec(vm_id, &["cat", "/proc/meminfo"]).await?;
    let field = |name: &str| -> f64 {
        meminfo["stdout"]
            .as_str()
            .unwrap_or("")
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (total, available) = (field("MemTotal:"), field("MemAvailable:"));
    let dir = d.run_dir().join("vms").join(vm_id);
    let pid_of = |name: &str| -> Option<i32> {
        std::fs::read_to_string(dir.join("pids"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
    };
    Ok(Sample {
        stages,
        total: 0.0,
        guest_used_mib: (total - available) / 1024.0,
        guest_total_mib: total / 1024.0,
        qemu_rss_mib: pid_of("qemu").map(rss_mib).unwrap_or(f64::NAN),
        vhost_rss_mib: pid_of("vhost").map(rss_mib).unwrap_or(f64::NAN),
        vm_dir_kib: du_kib(&dir),
    })
}

/// Disk blocks used under `path` (KiB), as `du -sk` counts them.
fn du_kib(path: &std::path::Path) -> f64 {
    Command::new("du")
        .arg("-sk")
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(f64::NAN)
}

fn report(samples: &[Sample], figures: &mut serde_json::Map<String, Value>) {
    println!(
        "\n{:<58} {:>11} {:>11} {:>11}",
        "stage", "median", "min", "max"
    );
    for (i, label) in STAGES.iter().enumerate() {
        let xs: Vec<f64> = samples.iter().map(|s| s.stages[i]).collect();
        row(label, &xs, "ms");
        figures.insert(format!("stage{i}MedianMs"), json!(median(&xs)));
    }
    let totals: Vec<f64> = samples.iter().map(|s| s.total).collect();
    row(
        "POST /api/auth/start -> sign-in page shown (client)",
        &totals,
        "ms",
    );
    figures.insert("startToPageShownMedianMs".into(), json!(median(&totals)));
    println!(
        "\n{:<58} {:>11} {:>11} {:>11}",
        "memory at awaiting_user", "median", "min", "max"
    );
    let series = [
        ("guest: used (MemTotal - MemAvailable)", "guestUsedMiB"),
        ("guest: MemTotal", "guestTotalMiB"),
        ("host: QEMU RSS", "qemuRssMiB"),
        ("host: vhost-device-vsock RSS", "vhostRssMiB"),
        ("host: files of the VM (run dir: sockets, logs)", "vmDirKiB"),
    ];
    for (i, (label, key)) in series.iter().enumerate() {
        let xs: Vec<f64> = samples
            .iter()
            .map(|s| match i {
                0 => s.guest_used_mib,
                1 => s.guest_total_mib,
                2 => s.qemu_rss_mib,
                3 => s.vhost_rss_mib,
                _ => s.vm_dir_kib,
            })
            .collect();
        row(label, &xs, if i == 4 { "KiB" } else { "MiB" });
        figures.insert(key.to_string(), json!(median(&xs)));
    }
    println!("(a browser VM's disk is the shared read-only image: nothing is copied per VM)");
}

/// Input-to-photon through the VM: with nothing focused on the sign-in
/// page, Ctrl+A highlights its text; the viewer measures from its own
/// keydown (a capturing listener, before the page sends the key) to the
/// expected display time of the first decoded frame that looks more like
/// the highlighted screen than the plain one, compared over the pixels
/// where the two differ (so codec noise on one pixel cannot fake a hit).
/// A click on an empty spot clears the highlight between rounds.
const PROBE: &str = r#"(() => {
  const v = document.querySelector('#screen');
  const c = document.createElement('canvas'); c.width = 128; c.height = 72;
  const ctx = c.getContext('2d', { willReadFrequently: true });
  const grab = () => { ctx.drawImage(v, 0, 0, 128, 72); return ctx.getImageData(0, 0, 128, 72).data; };
  const s = { grab, plain: null, lit: null, mask: [], t0: null, hits: [] };
  window.i2p = s;
  s.calibrate = () => {
    s.mask = [];
    for (let i = 0; i < s.plain.length; i += 4) {
      const d = Math.abs(s.plain[i] - s.lit[i]) + Math.abs(s.plain[i+1] - s.lit[i+1]) + Math.abs(s.plain[i+2] - s.lit[i+2]);
      if (d > 90) s.mask.push(i);
    }
    return s.mask.length;
  };
  const lit = (f) => {
    let toPlain = 0, toLit = 0;
    for (const i of s.mask) for (let k = 0; k < 3; k++) {
      toPlain += Math.abs(f[i+k] - s.plain[i+k]); toLit += Math.abs(f[i+k] - s.lit[i+k]);
    }
    return toLit < toPlain;
  };
  document.addEventListener('keydown', (e) => {
    if (e.key === 'a' && e.ctrlKey) s.t0 = performance.now();
  }, true);
  const cb = (now, meta) => {
    if (s.mask.length > 0 && s.t0 !== null && lit(grab())) {
      s.hits.push((meta.expectedDisplayTime || now) - s.t0); s.t0 = null;
    }
    v.requestVideoFrameCallback(cb);
  };
  v.requestVideoFrameCallback(cb);
  return true; })()"#;

async fn latency(d: &Daemon, figures: &mut serde_json::Map<String, Value>) -> Result<()> {
    let rounds = env_or("AIRLOCK_BENCH_CHANGES", 20);
    let v = d.start_view("bench-vm-live", "demo").await?;
    let id = v["sessionId"].as_str().context("sessionId")?.to_string();
    let link = v["viewerUrl"].as_str().context("viewerUrl")?.to_string();
    d.wait_session(&id, Duration::from_secs(400), |v| {
        step_events(v).iter().any(|e| e == "streamerRunning")
            && step_events(v).iter().any(|e| e == "pageLoaded")
    })
    .await?;
    let viewer = Viewer::open(&link).await?;
    let tab = &viewer.tab;
    tab.wait_for(
        "(() => { const v = document.querySelector('#screen'); return v && v.videoWidth > 0 && v.currentTime > 0 ? true : null; })()",
        Duration::from_secs(90),
    )
    .await
    .context("no video in the viewer")?;
    tab.eval(PROBE).await?;
    // Pacing, not synchronisation: each change must have reached the
    // screen (tens of ms) before the next, and rounds stay independent.
    let settle = Duration::from_millis(1500);
    click_screen(tab, 12.0, 700.0).await?;
    tokio::time::sleep(settle).await;
    tab.eval("(() => { window.i2p.plain = window.i2p.grab().slice(); return true; })()")
        .await?;
    ctrl_a(tab).await?;
    tokio::time::sleep(settle).await;
    let pixels = tab
        .eval("(() => { const s = window.i2p; s.lit = s.grab().slice(); s.t0 = null; return s.calibrate(); })()")
        .await?;
    if pixels.as_f64().unwrap_or(0.0) < 20.0 {
        bail!("Ctrl+A changed too few pixels of the viewer's video ({pixels})");
    }
    for _ in 0..rounds {
        click_screen(tab, 12.0, 700.0).await?;
        tokio::time::sleep(settle).await;
        ctrl_a(tab).await?;
        tokio::time::sleep(settle).await;
    }
    let hits: Vec<f64> = serde_json::from_value(tab.eval("window.i2p.hits").await?)?;
    println!(
        "\nlive view with the source in the VM, input to photon ({} of {rounds} rounds seen, {pixels} of 9216 probe pixels change):",
        hits.len()
    );
    println!(
        "  key pressed in the viewer -> highlight displayed by it: median {:.0} ms, p95 {:.0} ms (min {:.0}, max {:.0})",
        median(&hits),
        percentile(&hits, 95.0),
        percentile(&hits, 0.0),
        percentile(&hits, 100.0)
    );
    println!(
        "  (key over the data channel, video back; both through TURN over TCP and the egress gateway; under TCG)"
    );
    figures.insert("inputToPhotonMedianMs".into(), json!(median(&hits)));
    figures.insert("inputToPhotonP95Ms".into(), json!(percentile(&hits, 95.0)));
    d.cancel_session(&id).await?;
    Ok(())
}

/// Ctrl+A as a person types it: Control goes down first (the viewer
/// sends it to the VM as its own keysym), then A, then both come up.
async fn ctrl_a(tab: &airlock_tests::cdp::Tab) -> Result<()> {
    let control = |kind: &str, modifiers: u8| {
        json!({ "type": kind, "key": "Control", "code": "ControlLeft",
                "windowsVirtualKeyCode": 17, "modifiers": modifiers })
    };
    let a = |kind: &str| {
        json!({ "type": kind, "key": "a", "code": "KeyA",
                "windowsVirtualKeyCode": 65, "modifiers": 2 })
    };
    for params in [
        control("rawKeyDown", 2),
        a("rawKeyDown"),
        a("keyUp"),
        control("keyUp", 0),
    ] {
        tab.call("Input.dispatchKeyEvent", params).await?;
    }
    Ok(())
}

/// Sizes from the manifests; build times of a cached `build-image.sh`
/// and of the Debian layers built again (`--rebuild`, the .deb files kept).
fn images(figures: &mut serde_json::Map<String, Value>) -> Result<()> {
    let a = artifacts()?;
    println!(
        "\n{:<10} {:>10} {:>14} {:>16} {:>18}",
        "image", "size", "base layer", "cached build", "layers rebuilt"
    );
    for kind in ["browser", "cli"] {
        let dir = a.build_dir.join("images").join(kind);
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json"))?)?;
        let size: u64 = manifest["files"]
            .as_object()
            .map(|f| f.values().filter_map(|v| v["size"].as_u64()).sum())
            .unwrap_or(0);
        let base = manifest["files"]["base.squashfs"]["size"]
            .as_u64()
            .unwrap_or(0);
        let cached = time_build(kind, None)?;
        let rebuilt = match std::env::var("AIRLOCK_BENCH_REBUILD").as_deref() {
            Ok("0") => f64::NAN,
            _ => {
                let tmp = tempfile::tempdir()?;
                time_build(kind, Some(tmp.path()))?
            }
        };
        println!(
            "{kind:<10} {:>6.0} MiB {:>10.0} MiB {:>14.1} s {:>16.0} s",
            size as f64 / 1048576.0,
            base as f64 / 1048576.0,
            cached,
            rebuilt
        );
        figures.insert(format!("{kind}ImageMiB"), json!(size as f64 / 1048576.0));
        figures.insert(format!("{kind}CachedBuildS"), json!(cached));
        figures.insert(format!("{kind}RebuildS"), json!(rebuilt));
    }
    Ok(())
}

/// Seconds `image/build-image.sh` takes for `kind`: into a scratch copy of
/// the cached output (cache hit), or rebuilt from the Debian packages into
/// `rebuild`.
fn time_build(kind: &str, rebuild: Option<&std::path::Path>) -> Result<f64> {
    let a = artifacts()?;
    let bin = a.build_dir.join("bin");
    let scratch = tempfile::tempdir()?;
    let out = match rebuild {
        Some(dir) => dir.join(kind),
        None => scratch.path().join(kind),
    };
    let mut cmd = Command::new(a.repo.join("image/build-image.sh"));
    cmd.args(["--kind", kind])
        .arg("--agent")
        .arg(bin.join("airlock-guest"))
        .arg("--out")
        .arg(&out);
    match kind {
        "browser" => cmd
            .arg("--streamer")
            .arg(bin.join("airlock-streamer"))
            .arg("--fake-cli")
            .arg(bin.join("fake-cli")),
        _ => cmd
            .arg("--unit")
            .arg(a.repo.join("systemd/airlock-guest.service")),
    };
    if rebuild.is_some() {
        cmd.arg("--rebuild");
    }
    let started = Instant::now();
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "build-image.sh {kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}
