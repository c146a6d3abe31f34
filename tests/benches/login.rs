//! `make bench` for login sessions: `POST /api/auth/start` to
//! `awaiting_user`, several sessions one after another through a real
//! airlockd with the browser role as a host process (Xvfb + Chromium, as
//! the login tests run it) and the fake CLI (`airlock-demo-cli`) against the fake OAuth
//! server. Prints the median of each stage (from the session's own step
//! timestamps) and the memory of the agent, Xvfb and Chromium once the
//! sign-in page is on the screen, ready for the person to type. Figures, not assertions;
//! `SPECIFICATION.md` records them with this command.
//!
//! `AIRLOCK_BENCH_RUNS` sets the number of sessions (default 5).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use airlock_tests::login::{state_is, step_events, LoginRig, FAKE};
use airlock_tests::stats::{median, percentile};
use airlock_tests::Daemon;
use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

/// Consecutive points of a session's history: (label, event, state).
const STAGES: &[(&str, &str, &str)] = &[
    ("created -> booting", "state", "booting"),
    (
        "booting -> browser_ready (agent, Xvfb, Chromium, CDP)",
        "state",
        "browser_ready",
    ),
    (
        "browser_ready -> CLI started in its PTY",
        "loginStarted",
        "",
    ),
    ("CLI started -> login URL opened", "urlOpened", ""),
    ("URL opened -> awaiting_user", "state", "awaiting_user"),
    (
        "awaiting_user -> sign-in page loaded and rendered",
        "pageLoaded",
        "",
    ),
];

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> Result<()> {
    let runs: usize = std::env::var("AIRLOCK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!(
        "\nairlock login benchmark: {runs} sessions of the fake_cli profile (airlock-demo-cli, fake OAuth),\n\
         browser role as a host process (Xvfb + headful Chromium), POST /api/auth/start -> awaiting_user"
    );
    let rig = LoginRig::start(|s| s).await?;
    let result = series(&rig.daemon, runs).await;
    if result.is_err() {
        rig.daemon.print_sessions().await;
        rig.daemon.print_diagnostics();
    }
    let (stages, totals, memory) = result?;
    let mut figures = serde_json::Map::new();
    println!(
        "\n{:<56} {:>9} {:>9} {:>9}",
        "stage", "median", "min", "max"
    );
    for (i, (label, _, _)) in STAGES.iter().enumerate() {
        print_row(label, &stages[i]);
        figures.insert(format!("stage{i}MedianMs"), json!(median(&stages[i])));
    }
    print_row(
        "POST /api/auth/start -> awaiting_user (client clock)",
        &totals[0],
    );
    print_row(
        "POST /api/auth/start -> page rendered (client clock)",
        &totals[1],
    );
    figures.insert(
        "startToAwaitingUserMedianMs".into(),
        json!(median(&totals[0])),
    );
    figures.insert(
        "startToPageRenderedMedianMs".into(),
        json!(median(&totals[1])),
    );
    print_memory(&memory, &mut figures);
    let out = airlock_tests::artifacts()?.repo.join("build/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("login.json"),
        serde_json::to_string_pretty(&figures)?,
    )?;
    println!("\n(figures also written to build/bench/login.json)");
    Ok(())
}

fn print_row(label: &str, xs: &[f64]) {
    println!(
        "{label:<56} {:>6.0} ms {:>6.0} ms {:>6.0} ms",
        median(xs),
        percentile(xs, 0.0),
        percentile(xs, 100.0)
    );
}

/// Per-group memory samples (KiB), one per run: group -> (RSS, PSS).
type Memory = BTreeMap<&'static str, (Vec<f64>, Vec<f64>)>;

/// Stage durations, client-clock totals (to `awaiting_user`, to the page
/// rendered) and memory samples.
type Series = (Vec<Vec<f64>>, [Vec<f64>; 2], Memory);

async fn series(d: &Daemon, runs: usize) -> Result<Series> {
    let mut stages = vec![Vec::new(); STAGES.len()];
    let mut totals = Vec::new();
    let mut rendered = Vec::new();
    let mut memory = Memory::new();
    for run in 0..runs {
        let started = Instant::now();
        let id = d.start_session(&format!("bench-{run}"), FAKE).await?;
        let view = d
            .wait_session(&id, Duration::from_secs(120), |v| {
                state_is(v, "awaiting_user")
            })
            .await?;
        totals.push(started.elapsed().as_secs_f64() * 1000.0);
        d.wait_session(&id, Duration::from_secs(60), |v| {
            step_events(v).iter().any(|e| e == "pageLoaded")
        })
        .await?;
        rendered.push(started.elapsed().as_secs_f64() * 1000.0);
        for (group, (rss, pss)) in sample_memory(d, &view).await? {
            let entry = memory.entry(group).or_default();
            entry.0.push(rss);
            entry.1.push(pss);
        }
        let (_, full) = d
            .request(Method::GET, &format!("/api/auth/session/{id}"), None)
            .await?;
        for (i, ms) in stage_durations(&full)?.into_iter().enumerate() {
            stages[i].push(ms);
        }
        d.cancel_session(&id).await?;
        d.wait_session(&id, Duration::from_secs(30), |v| {
            v["browserVmId"].is_null() && state_is(v, "cancelled")
        })
        .await?;
    }
    Ok((stages, [totals, rendered], memory))
}

/// Milliseconds between consecutive [`STAGES`], from the session's steps.
fn stage_durations(view: &Value) -> Result<Vec<f64>> {
    let steps = view["steps"].as_array().context("steps")?;
    let at = |event: &str, state: &str| -> Result<SystemTime> {
        let step = steps
            .iter()
            .find(|s| s["event"] == event && (state.is_empty() || s["state"] == state))
            .with_context(|| format!("no {event} {state} step in {view}"))?;
        Ok(humantime::parse_rfc3339(
            step["at"].as_str().context("at")?,
        )?)
    };
    let mut previous = at("state", "created")?;
    let mut out = Vec::new();
    for (_, event, state) in STAGES {
        let t = at(event, state)?;
        out.push(t.duration_since(previous).unwrap_or_default().as_secs_f64() * 1000.0);
        previous = t;
    }
    Ok(out)
}

/// RSS and PSS (KiB) of the browser agent's process tree, by group.
async fn sample_memory(d: &Daemon, view: &Value) -> Result<BTreeMap<&'static str, (f64, f64)>> {
    let vm = view["browserVmId"].as_str().context("browserVmId")?;
    let (_, v) = d
        .request(Method::GET, &format!("/api/vms/{vm}"), None)
        .await?;
    let agent = v["vmmPid"].as_i64().context("vmmPid")? as i32;
    let mut groups: BTreeMap<&'static str, (f64, f64)> = BTreeMap::new();
    for pid in descendants(agent) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let group = match comm.trim() {
            "Xvfb" => "Xvfb",
            c if c.starts_with("chrom") => "Chromium (all processes)",
            "airlock-guest" => "agent",
            _ => "login CLI (the fake CLI)",
        };
        let Some((rss, pss)) = rss_pss_kib(pid) else {
            continue;
        };
        let entry = groups.entry(group).or_default();
        entry.0 += rss;
        entry.1 += pss;
    }
    Ok(groups)
}

/// `pid` and every process below it.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which may itself hold spaces.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((p, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

fn rss_pss_kib(pid: i32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("Rss:")?, field("Pss:")?))
}

fn print_memory(memory: &Memory, figures: &mut serde_json::Map<String, Value>) {
    println!(
        "\n{:<56} {:>12} {:>12}",
        "memory with the sign-in page shown (median)", "RSS", "PSS"
    );
    let (mut rss_total, mut pss_total) = (0.0, 0.0);
    for (group, (rss, pss)) in memory {
        let (r, p) = (median(rss), median(pss));
        println!(
            "{group:<56} {:>8.1} MiB {:>8.1} MiB",
            r / 1024.0,
            p / 1024.0
        );
        if *group != "login CLI (the fake CLI)" {
            rss_total += r;
            pss_total += p;
        }
        let key: String = group.chars().filter(char::is_ascii_alphanumeric).collect();
        figures.insert(format!("{key}PssMiB"), json!(p / 1024.0));
    }
    println!(
        "{:<56} {:>8.1} MiB {:>8.1} MiB",
        "agent + Xvfb + Chromium",
        rss_total / 1024.0,
        pss_total / 1024.0
    );
    println!(
        "(RSS counts pages shared between Chromium's processes once per process; PSS splits them)"
    );
    figures.insert("browserStackPssMiB".into(), json!(pss_total / 1024.0));
    figures.insert("browserStackRssMiB".into(), json!(rss_total / 1024.0));
}
