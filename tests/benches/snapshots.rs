//! Browser VMs from snapshots, measured (`make bench`): `POST
//! /api/auth/start` to `awaiting_user` for the demo login with a browser VM
//! booted cold, restored from the snapshot on demand, and taken from the
//! warm pool (median of `AIRLOCK_BENCH_SESSIONS`, default 5, by stage);
//! restore to running; host memory per restored VM (QEMU's own plus its
//! guest RAM) while it waits in the pool and at `awaiting_user`; the
//! snapshot's size and the time to make it.
//! Under QEMU/TCG on this machine, sessions one after another, each
//! cancelled once measured. Figures also go to `build/bench/snapshots.json`.
//! `AIRLOCK_BENCH_ONLY=cold,restored,pool` picks phases;
//! `AIRLOCK_BENCH_STEPS=1` prints each session's steps.

use std::time::{Duration, Instant};

use airlock_tests::login::state_is;
use airlock_tests::stats::{median, row};
use airlock_tests::{artifacts, toml_path, Daemon, Settings};
use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

fn main() -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run())
}

/// How one session's browser VM came up, and what it cost.
#[derive(Debug, Default, Clone)]
struct Sample {
    total_ms: f64,
    /// Request to the streamer playing (it starts once the page is open).
    to_stream_ms: f64,
    to_vm_ready_ms: f64,
    ready_to_url_ms: f64,
    restore_ms: f64,
    resume_ms: f64,
    refresh_ms: f64,
    rss_at_page_mib: f64,
}

fn settings(snapshots: Option<(&std::path::Path, usize)>) -> Result<Settings> {
    let build = artifacts()?.build_dir;
    let image = |k: &str| toml_path(&build.join("images").join(k));
    let s = Settings::new("qemu")
        .set("vm", "browser_image", &image("browser"))
        .set("vm", "cli_image", &image("cli"))
        .set("vm", "boot_timeout_ms", "180000")
        .set("auth", "demo", "true")
        .set("auth", "prestart_cli_vm", "false")
        .set("auth", "browser_timeout_ms", "400000")
        .set("auth", "login_path_append", "[\"/usr/lib/airlock/fakes\"]");
    Ok(match snapshots {
        None => s,
        Some((dir, pool)) => s
            .set("snapshots", "enabled", "true")
            .set("snapshots", "dir", &toml_path(dir))
            .set("snapshots", "warm_pool", &pool.to_string()),
    })
}

async fn snapshots(d: &Daemon) -> Result<Value> {
    let (_, v) = d.request(Method::GET, "/health", None).await?;
    Ok(v["snapshots"].clone())
}

/// Polls `/health` until the snapshot status satisfies `done`.
async fn wait(d: &Daemon, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let s = snapshots(d).await?;
        if done(&s) {
            return Ok(s);
        }
        if s["state"] == "failed" || Instant::now() > deadline {
            bail!("snapshots: {s}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn at_ms(v: &Value, event: &str) -> Option<f64> {
    let step = v["steps"]
        .as_array()?
        .iter()
        .find(|s| s["event"] == event)?;
    let t = humantime::parse_rfc3339(step["at"].as_str()?).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64() * 1000.0)
}

async fn session(d: &Daemon, user: &str) -> Result<Sample> {
    let started = Instant::now();
    let id = d.start_session(user, "demo").await?;
    let v = d
        .wait_session(&id, Duration::from_secs(400), |v| {
            v["state"] == "awaiting_user" || v["state"] == "failed"
        })
        .await?;
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    if !state_is(&v, "awaiting_user") {
        bail!("session {id}: {v}");
    }
    let streaming = d
        .wait_session(&id, Duration::from_secs(120), |v| {
            at_ms(v, "streamerRunning").is_some() || at_ms(v, "streamUnavailable").is_some()
        })
        .await?;
    let to_stream_ms = match at_ms(&streaming, "streamerRunning") {
        Some(t) => t - at_ms(&v, "state").unwrap_or(f64::NAN),
        None => bail!("session {id}: the live view did not start: {streaming}"),
    };
    let vm_id = v["browserVmId"].as_str().context("browserVmId")?;
    let (_, vm) = d
        .request(Method::GET, &format!("/api/vms/{vm_id}"), None)
        .await?;
    let t = &vm["timings"];
    let num = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
    let created = at_ms(&v, "state").unwrap_or(f64::NAN);
    let ready = at_ms(&v, "loginStarted").unwrap_or(f64::NAN);
    let url = at_ms(&v, "urlOpened").unwrap_or(f64::NAN);
    let sample = Sample {
        total_ms,
        to_stream_ms,
        to_vm_ready_ms: ready - created,
        ready_to_url_ms: url - ready,
        restore_ms: num("restoreMs"),
        resume_ms: num("resumeMs"),
        refresh_ms: num("refreshMs"),
        rss_at_page_mib: host_mib(&vm),
    };
    if std::env::var_os("AIRLOCK_BENCH_STEPS").is_some() {
        print_steps(&streaming, &vm);
    }
    d.cancel_session(&id).await?;
    Ok(sample)
}

/// Host memory a VM holds (MiB): QEMU's own (anonymous) memory plus its
/// guest RAM, which is shared memory: a memfd QEMU maps whole, or a
/// tmpfs file (`/dev/shm/airlock-<id>.ram`) of which QEMU maps only the
/// pages the guest touched since its restore.
fn host_mib(vm: &Value) -> f64 {
    let Some(pid) = vm["vmmPid"].as_i64() else {
        return f64::NAN;
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let id = vm["id"].as_str().unwrap_or_default();
    let file_kib = std::fs::metadata(format!("/dev/shm/airlock-{id}.ram"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) as f64 / 2.0)
        .unwrap_or(0.0);
    (kib("RssAnon:") + kib("RssShmem:").max(file_kib)) / 1024.0
}

/// The session's steps, ms after its first, and the VM's timings
/// (`AIRLOCK_BENCH_STEPS=1`: where the time goes).
fn print_steps(session: &Value, vm: &Value) {
    let steps = session["steps"].as_array().cloned().unwrap_or_default();
    let t0 = steps
        .first()
        .and_then(|s| at_ms(&json!({"steps": [s]}), s["event"].as_str()?));
    for s in &steps {
        let at = at_ms(
            &json!({"steps": [s]}),
            s["event"].as_str().unwrap_or_default(),
        );
        let rel = at.zip(t0).map(|(a, b)| a - b).unwrap_or(f64::NAN);
        println!("  {rel:>8.0} ms  {} {}", s["event"], s["detail"]);
    }
    println!("  VM timings: {}", vm["timings"]);
}

fn report(label: &str, xs: &[Sample], figures: &mut serde_json::Map<String, Value>) {
    println!("\n{label} ({} sessions): median, min, max", xs.len());
    let col = |f: fn(&Sample) -> f64| xs.iter().map(f).collect::<Vec<f64>>();
    let rows: [(&str, Vec<f64>, &str); 8] = [
        (
            "POST /api/auth/start to awaiting_user",
            col(|s| s.total_ms),
            "ms",
        ),
        (
            "  request to the streamer playing (after the page opens)",
            col(|s| s.to_stream_ms),
            "ms",
        ),
        (
            "  request to browser VM ready (login starts)",
            col(|s| s.to_vm_ready_ms),
            "ms",
        ),
        (
            "  login start to the sign-in page opened",
            col(|s| s.ready_to_url_ms),
            "ms",
        ),
        (
            "  loading the state (pool: before the request)",
            col(|s| s.restore_ms),
            "ms",
        ),
        (
            "  attaching vsock and running (resume)",
            col(|s| s.resume_ms),
            "ms",
        ),
        (
            "  refresh (entropy, clock, network service)",
            col(|s| s.refresh_ms),
            "ms",
        ),
        (
            "  host memory of the VM at awaiting_user",
            col(|s| s.rss_at_page_mib),
            "MiB",
        ),
    ];
    for (name, values, unit) in &rows {
        row(name, values, unit);
        figures.insert(format!("{label}: {name}"), json!(median(values)));
    }
}

async fn run() -> Result<()> {
    let n: usize = std::env::var("AIRLOCK_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut figures = serde_json::Map::new();
    let dir = tempfile::tempdir()?;

    let only = std::env::var("AIRLOCK_BENCH_ONLY").unwrap_or_default();
    let wanted = |phase: &str| only.is_empty() || only.split(',').any(|p| p == phase);
    if wanted("cold") {
        let d = Daemon::start(settings(None)?).await?;
        let mut cold = Vec::new();
        for i in 0..n {
            cold.push(session(&d, &format!("cold-{i}")).await?);
        }
        drop(d);
        report("cold boot", &cold, &mut figures);
    }

    // A fresh snapshot directory: the first daemon makes one.
    let made = Instant::now();
    let d = Daemon::start(settings(Some((dir.path(), 0)))?).await?;
    let s = wait(&d, |s| s["state"] == "ready").await?;
    let m = &s["manifest"];
    println!(
        "\nsnapshot: device state {:.0} KiB + guest RAM {:.0} MiB, made in {:.1} s after airlockd started (template boot + Chromium + warm-up {} ms, save {} ms)",
        m["stateBytes"].as_f64().unwrap_or(0.0) / 1024.0,
        m["ramBytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        made.elapsed().as_secs_f64(),
        m["bootMs"],
        m["saveMs"]
    );
    figures.insert("snapshot".into(), m.clone());
    if wanted("restored") {
        let mut restored = Vec::new();
        for i in 0..n {
            restored.push(session(&d, &format!("restored-{i}")).await?);
        }
        report("restored on demand", &restored, &mut figures);
    }
    drop(d);

    if wanted("pool") {
        let d = Daemon::start(settings(Some((dir.path(), 1)))?).await?;
        let mut pooled = Vec::new();
        let mut warm_rss = Vec::new();
        for i in 0..n {
            wait(&d, |s| s["poolReady"] == 1).await?;
            // The warm VM: restored, refreshed and running, before anyone
            // takes it.
            let (_, vms) = d.request(Method::GET, "/api/vms", None).await?;
            let warm: Vec<f64> = vms["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["pooled"] == true)
                .map(host_mib)
                .collect();
            warm_rss.extend(warm);
            pooled.push(session(&d, &format!("pool-{i}")).await?);
        }
        drop(d);
        report("from the warm pool", &pooled, &mut figures);
        row(
            "host memory of a warm VM (restored, refreshed, running)",
            &warm_rss,
            "MiB",
        );
        figures.insert("warm VM host memory MiB".into(), json!(median(&warm_rss)));
    }

    let out = artifacts()?.build_dir.join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("snapshots.json"),
        serde_json::to_vec_pretty(&figures)?,
    )?;
    Ok(())
}
