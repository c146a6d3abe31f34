//! `make bench` for the live view: glass-to-glass latency on loopback at
//! 1280x720, 30 fps. The browser role's Chromium (a host process, as in
//! the tests) shows a full-screen block whose colour the bench flips over
//! DevTools at known instants; a headless Chromium viewer samples a pixel
//! of every decoded video frame (`requestVideoFrameCallback`) and notes
//! when the new colour is due on its screen. Latency = viewer's expected
//! display time - the instant the colour was set (both pages read the
//! same system clock: `performance.timeOrigin + now`). Also the
//! streamer's CPU time per second of video and the received bitrate.
//! Figures, not assertions; `SPECIFICATION.md` records them.
//!
//! A second phase measures the same under the bad-network profile of the
//! CI test `live_netem` (2 % loss each way, 80 ms round trip, 2 Mbit/s
//! towards the viewer; `airlock_tests::netns`): airlockd in one network
//! namespace, the viewer in another. `AIRLOCK_BENCH_NETEM=0` skips it.
//!
//! `AIRLOCK_BENCH_CHANGES` sets the number of colour changes (default 60);
//! `AIRLOCK_BENCH_CHROMIUM_ARGS` (a TOML list) adds flags to the browser
//! role's Chromium, to try what changes the source side.

use std::time::{Duration, Instant};

use airlock_tests::cdp::{browser_role_tab, Tab, Viewer};
use airlock_tests::login::{state_is, LoginRig, FAKE};
use airlock_tests::netns::{Link, NetRig, BAD_NETWORK, VIEWER_ARGS};
use airlock_tests::stats::{median, percentile};
use anyhow::{bail, Context, Result};
use serde_json::Value;

const COLOURS: [&str; 2] = ["rgb(255,0,0)", "rgb(0,0,255)"];

/// Covers the page with a block the bench recolours.
const SOURCE_SETUP: &str = r#"(() => {
  let d = document.getElementById('g2g');
  if (!d) { d = document.createElement('div'); d.id = 'g2g';
    d.style.cssText = 'position:fixed;inset:0;z-index:2147483647;background:rgb(0,0,0)';
    document.body.appendChild(d); }
  return true; })()"#;

/// Samples every decoded frame below and left of the middle (the pointer,
/// drawn into the stream, rests in the middle); records colour changes
/// with the frame's expected display time.
const VIEWER_SETUP: &str = r#"(() => {
  const v = document.querySelector('#screen');
  const c = document.createElement('canvas'); c.width = 8; c.height = 8;
  const ctx = c.getContext('2d', { willReadFrequently: true });
  window.g2g = { last: null, seen: [] };
  const name = (p) => p[0] > 160 && p[1] < 90 && p[2] < 90 ? 'red'
                    : p[2] > 160 && p[0] < 90 && p[1] < 90 ? 'blue' : 'other';
  const cb = (now, meta) => {
    ctx.drawImage(v, v.videoWidth * 0.3, v.videoHeight * 0.7, 8, 8, 0, 0, 8, 8);
    const col = name(ctx.getImageData(4, 4, 1, 1).data);
    if (col !== window.g2g.last) {
      window.g2g.last = col;
      const t0 = performance.timeOrigin;
      window.g2g.seen.push([col, t0 + (meta.expectedDisplayTime || now), t0 + now,
                            t0 + (meta.receiveTime || now), t0 + meta.presentationTime,
                            (meta.processingDuration || 0) * 1000]);
    }
    v.requestVideoFrameCallback(cb);
  };
  v.requestVideoFrameCallback(cb);
  return true; })()"#;

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> Result<()> {
    let changes: usize = std::env::var("AIRLOCK_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    println!(
        "\nairlock live-view benchmark: glass-to-glass latency, 1280x720 at 30 fps, VP8,\n\
         streamer and viewer on loopback, {changes} colour changes"
    );
    let rig = LoginRig::start(|s| {
        s.set("live", "ice_addresses", "[\"127.0.0.1\"]")
            .set("live", "framerate", "30")
            .set("auth", "screen_width", "1280")
            .set("auth", "screen_height", "720")
            .set("auth", "prestart_cli_vm", "false")
            .set(
                "auth",
                "chromium_args",
                &std::env::var("AIRLOCK_BENCH_CHROMIUM_ARGS").unwrap_or_else(|_| "[]".into()),
            )
    })
    .await?;
    let result = measure(&rig, changes, None).await;
    if result.is_err() {
        rig.daemon.print_sessions().await;
        rig.daemon.print_diagnostics();
    }
    result?;
    drop(rig);
    if std::env::var("AIRLOCK_BENCH_NETEM").as_deref() == Ok("0") {
        return Ok(());
    }
    println!(
        "\nthe same under the bad-network profile: {}% loss each way, {} ms round trip, \
         {} kbit/s towards the viewer",
        BAD_NETWORK.loss_pct,
        BAD_NETWORK.delay_ms * 2,
        BAD_NETWORK.rate_kbit
    );
    let link = Link::create(BAD_NETWORK).await?;
    let net = NetRig::start(&link, |s| {
        s.set("live", "framerate", "30")
            .set("auth", "screen_width", "1280")
            .set("auth", "screen_height", "720")
    })
    .await?;
    let result = measure(&net.rig, changes, Some((&link, &net))).await;
    if result.is_err() {
        net.rig.daemon.print_sessions().await;
        net.rig.daemon.print_diagnostics();
        eprintln!("==== shaper ====\n{}", link.describe());
    }
    result
}

/// One phase: on loopback (`net` None) or across the shaped link.
async fn measure(rig: &LoginRig, changes: usize, net: Option<(&Link, &NetRig)>) -> Result<()> {
    let d = &rig.daemon;
    let live = d.start_live("bench", FAKE).await?;
    d.wait_session(&live.id, Duration::from_secs(120), |v| {
        state_is(v, "awaiting_user")
    })
    .await?;
    d.wait_page(&live.id, "/authorize", 1).await?;
    let viewer = match net {
        Some((link, _)) => {
            Viewer::open_in(&live.page_url, Some(link.b.handle()), VIEWER_ARGS).await?
        }
        None => Viewer::open(&live.page_url).await?,
    };
    // Frames of a still screen come once a second: the first few show
    // the stream is up.
    viewer
        .tab
        .wait_for(
            "window.airlockViewer && window.airlockViewer.framesRendered >= 3",
            Duration::from_secs(30),
        )
        .await?;
    let source = match net {
        Some((_, n)) => n.browser_role_tab().await?,
        None => browser_role_tab(d.pid()).await?,
    };
    source.eval(SOURCE_SETUP).await?;
    viewer.tab.eval(VIEWER_SETUP).await?;
    let answer = viewer
        .tab
        .eval("window.airlockViewer.pc.remoteDescription.sdp")
        .await?;
    let zero_delay = answer
        .as_str()
        .is_some_and(|s| s.contains("rtp-hdrext/playout-delay"));
    let streamer = *d.streamers().first().context("no streamer process")?;
    let (cpu0, bytes0, t0) = (
        cpu_seconds(streamer)?,
        received_bytes(&viewer.tab).await?,
        Instant::now(),
    );
    let mut sets = Vec::with_capacity(changes);
    for i in 0..changes {
        let colour = COLOURS[i % 2];
        let expr = format!(
            "(() => {{ document.getElementById('g2g').style.background = '{colour}'; \
             return performance.timeOrigin + performance.now(); }})()"
        );
        let at = source.eval(&expr).await?.as_f64().context("set time")?;
        sets.push((if i % 2 == 0 { "red" } else { "blue" }, at));
        // Spread the changes over the capture period (33 ms) so that the
        // phase against the capture clock varies: 300 ms + i * 7 ms mod 33.
        let pause = 300 + (i as u64 * 7) % 33;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(streamer)? - cpu0;
    let bytes = received_bytes(&viewer.tab).await? - bytes0;
    // A still screen for comparison: what the stream costs between changes.
    let (cpu1, bytes1, t1) = (
        cpu_seconds(streamer)?,
        received_bytes(&viewer.tab).await?,
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let still_wall = t1.elapsed().as_secs_f64();
    let still_cpu = (cpu_seconds(streamer)? - cpu1) / still_wall;
    let still_kbps = (received_bytes(&viewer.tab).await? - bytes1) * 8.0 / still_wall / 1000.0;
    let seen = viewer.tab.eval("window.g2g.seen").await?;
    let shown = pair(&sets, &seen, 1)?;
    let called = pair(&sets, &seen, 2)?;
    let received = pair(&sets, &seen, 3)?;
    let presented = pair(&sets, &seen, 4)?;
    let decode: Vec<f64> = seen
        .as_array()
        .map(|a| a.iter().filter_map(|e| e[5].as_f64()).collect())
        .unwrap_or_default();
    println!(
        "  set -> frame presented median {:.1} ms; decode (processingDuration) median {:.1} ms",
        median(&presented),
        median(&decode)
    );
    report(&shown, changes, cpu / wall, bytes * 8.0 / wall / 1000.0);
    println!(
        "  set -> frame received (receiveTime)  median {:.1} ms; -> frame callback median {:.1} ms",
        median(&received),
        median(&called)
    );
    println!("  playout delay 0 negotiated           {zero_delay}");
    println!(
        "  still screen: streamer CPU           {still_cpu:.3} s per s; bitrate {still_kbps:.0} kbit/s"
    );
    Ok(())
}

/// For each change, the first later frame of that colour, timed by the
/// `field`th time the viewer noted (1 expected display, 2 callback,
/// 3 packet receipt).
fn pair(sets: &[(&str, f64)], seen: &Value, field: usize) -> Result<Vec<f64>> {
    let seen: Vec<(String, f64)> = seen
        .as_array()
        .context("seen")?
        .iter()
        .filter_map(|e| Some((e[0].as_str()?.to_string(), e[field].as_f64()?)))
        .collect();
    let mut out = Vec::new();
    for (i, (colour, at)) in sets.iter().enumerate() {
        let until = sets.get(i + 1).map(|s| s.1).unwrap_or(f64::MAX);
        if let Some((_, shown)) = seen
            .iter()
            .find(|(c, t)| c == colour && *t >= *at && *t < until + 1000.0)
        {
            out.push(shown - at);
        }
    }
    if out.len() < sets.len() * 9 / 10 {
        let first: Vec<_> = seen.iter().take(10).collect();
        bail!(
            "only {} of {} changes were seen by the viewer; it saw {first:?}; set {:?}",
            out.len(),
            sets.len(),
            &sets[..sets.len().min(4)]
        );
    }
    Ok(out)
}

fn report(lat: &[f64], changes: usize, cpu_per_s: f64, kbps: f64) {
    println!(
        "  changes detected                     {} of {changes}",
        lat.len()
    );
    println!(
        "  glass-to-glass latency               median {:.1} ms, p95 {:.1} ms (min {:.1}, max {:.1})",
        median(lat),
        percentile(lat, 95.0),
        lat.iter().cloned().fold(f64::MAX, f64::min),
        lat.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "  streamer CPU per second of video     {:.3} s ({:.1}% of one core)",
        cpu_per_s,
        cpu_per_s * 100.0
    );
    println!("  received video bitrate               {kbps:.0} kbit/s (with a full-screen change every ~0.3 s)");
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // USER_HZ: 100 on every Linux x86_64 kernel.
    Ok(ticks / 100.0)
}

/// Video bytes the viewer's peer connection has received.
async fn received_bytes(viewer: &Tab) -> Result<f64> {
    let v = viewer
        .eval(
            "(async () => { const s = await window.airlockViewer.pc.getStats(); let b = 0; \
             s.forEach(r => { if (r.type === 'inbound-rtp' && r.kind === 'video') b += r.bytesReceived; }); return b; })()",
        )
        .await?;
    v.as_f64().context("bytesReceived")
}
