//! The live view on a bad network (issue 10, item 5): airlockd (with the
//! browser role and its streamer) in one network namespace, a headless
//! Chromium viewer in another, netem between them (2 % loss each way,
//! 80 ms round trip, 2 Mbit/s towards the viewer). While the remote page
//! scrolls a text pane 25 times a second, the viewer must render at least
//! 15 frames a second over 20 s with no gap over 1 s, and the streamer's
//! encoder must stay below the cap (its bitrate follows the viewer's
//! receiver reports). Then the viewer's network vanishes: airlockd drops
//! it and the streamer frees its `webrtcbin` within seconds.
//!
//! Needs root (namespaces) and `ip`/`tc` (iproute2, from scripts/setup.sh).

use std::time::{Duration, Instant};

use airlock_tests::cdp::{Tab, Viewer};
use airlock_tests::live::LiveSession;
use airlock_tests::login::{state_is, FAKE};
use airlock_tests::netns::{Link, NetRig, BAD_NETWORK, VIEWER_ARGS};
use anyhow::{ensure, Context, Result};
use serde_json::Value;

/// The measurement window after the first frame.
const WINDOW_MS: f64 = 20_000.0;

/// A white pane of text across the middle half of the remote screen,
/// scrolled 3 pixels every 40 ms: most of the picture changes in every
/// frame, so the encoder would spend well over the cap if it did not adapt.
pub const SCROLLING_TEXT: &str = r#"(() => {
  const d = document.createElement('div');
  d.style.cssText = 'position:fixed;left:0;top:25%;width:100%;height:50%;overflow:hidden;' +
    'background:#fff;color:#111;font:16px/20px sans-serif;z-index:2147483647';
  const inner = document.createElement('div');
  inner.textContent = 'Sign in to continue. Enter your password and the code from your phone. '.repeat(300);
  d.appendChild(inner); document.body.appendChild(d);
  let y = 0;
  window.__airlockScroll = setInterval(() => {
    y = (y + 3) % 1500; inner.style.transform = 'translateY(' + (-y) + 'px)'; }, 40);
  return true; })()"#;

/// Notes every rendered frame's time, and every streamer `stats` message
/// (encoded bytes, target) with its arrival time.
const RECORDER: &str = r#"(() => {
  const v = document.querySelector('#screen');
  window.netem = { frames: [], stats: [] };
  const cb = (now) => { window.netem.frames.push(now); v.requestVideoFrameCallback(cb); };
  v.requestVideoFrameCallback(cb);
  let last = null;
  setInterval(() => {
    const s = window.airlockViewer.stats;
    if (s && s !== last) { last = s; window.netem.stats.push([performance.now(), s.bytes, s.targetKbps || 0]); }
  }, 50);
  return true; })()"#;

#[tokio::test(flavor = "multi_thread")]
async fn under_loss_delay_and_a_rate_cap_video_keeps_flowing_below_the_cap() -> Result<()> {
    let link = Link::create(BAD_NETWORK).await?;
    let net = NetRig::start(&link, |s| s.set("live", "viewer_idle_ms", "3000")).await?;
    let started = Instant::now();
    let result = run(&link, &net).await;
    if result.is_err() {
        net.rig.daemon.print_sessions().await;
        net.rig.daemon.print_diagnostics();
        eprintln!("==== shapers ====\n{}", link.describe());
    }
    eprintln!("netem test took {:?}", started.elapsed());
    result
}

async fn run(link: &Link, net: &NetRig) -> Result<()> {
    let d = &net.rig.daemon;
    let live: LiveSession = d.start_live("netem-user", FAKE).await?;
    d.wait_session(&live.id, Duration::from_secs(120), |v| {
        state_is(v, "awaiting_user")
    })
    .await?;
    d.wait_page(&live.id, "/authorize", 1).await?;
    let source = net.browser_role_tab().await?;
    source.eval(SCROLLING_TEXT).await?;
    let viewer = Viewer::open_in(&live.page_url, Some(link.b.handle()), VIEWER_ARGS).await?;
    viewer
        .tab
        .wait_for(
            "window.airlockViewer && window.airlockViewer.framesRendered >= 1",
            Duration::from_secs(60),
        )
        .await
        .context("no frame reached the viewer over the shaped link")?;
    viewer.tab.eval(RECORDER).await?;
    let (sent0, _, drops0) = link.down();
    let t0 = Instant::now();
    let window = format!(
        "(() => {{ const f = window.netem.frames; return f.length > 1 && f[f.length - 1] - f[0] >= {WINDOW_MS}; }})()"
    );
    viewer
        .tab
        .wait_for(&window, Duration::from_secs(60))
        .await
        .context("the viewer did not render over 20 s")?;
    let (sent1, _, drops1) = link.down();
    let wire_kbps = (sent1 - sent0) as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1000.0;
    let m = Measured::read(&viewer.tab).await?;
    let quality = viewer.tab.eval("window.airlockViewer.quality").await?;
    println!(
        "netem (2 % loss, 80 ms RTT, 2 Mbit/s): {:.1} frames/s over 20 s, longest gap {:.0} ms, \
         encoder {:.0} kbit/s (target now {} kbit/s), offered to the link {wire_kbps:.0} kbit/s, \
         dropped packets {}, viewer's quality label {}",
        m.fps,
        m.longest_gap_ms,
        m.encoder_kbps,
        m.target_kbps,
        drops1 - drops0,
        quality
    );
    ensure!(m.fps >= 15.0, "only {:.1} frames/s", m.fps);
    ensure!(
        m.longest_gap_ms <= 1000.0,
        "a {:.0} ms freeze",
        m.longest_gap_ms
    );
    ensure!(
        m.encoder_kbps < f64::from(BAD_NETWORK.rate_kbit),
        "the encoder sent {:.0} kbit/s, over the cap",
        m.encoder_kbps
    );
    ensure!(quality["label"].is_string(), "no quality label: {quality}");
    vanished_viewer_is_freed(link, net).await
}

/// The viewer's network goes (100 % loss both ways; its Chromium keeps
/// its sockets): its `webrtcbin` is gone from the streamer within seconds.
async fn vanished_viewer_is_freed(link: &Link, net: &NetRig) -> Result<()> {
    let log = streamer_log(net)?;
    let before = removals(&log);
    link.cut();
    let cut = Instant::now();
    let deadline = cut + Duration::from_secs(15);
    while removals(&log) == before {
        ensure!(
            Instant::now() < deadline,
            "the streamer still serves the vanished viewer 15 s later"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "a viewer whose network vanished was removed from the streamer {:.1} s later",
        cut.elapsed().as_secs_f64()
    );
    Ok(())
}

fn streamer_log(net: &NetRig) -> Result<std::path::PathBuf> {
    let vms = net.rig.daemon.run_dir().join("vms");
    std::fs::read_dir(&vms)?
        .flatten()
        .map(|e| e.path().join("streamer.log"))
        .find(|p| p.exists())
        .with_context(|| format!("no streamer.log under {}", vms.display()))
}

fn removals(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("viewer removed")
        .count()
}

/// Frame rate, longest gap and encoder bitrate over the window.
struct Measured {
    fps: f64,
    longest_gap_ms: f64,
    encoder_kbps: f64,
    target_kbps: u64,
}

impl Measured {
    async fn read(viewer: &Tab) -> Result<Self> {
        let frames: Vec<f64> = floats(&viewer.eval("window.netem.frames").await?);
        let first = *frames.first().context("no frames")?;
        let inside: Vec<f64> = frames
            .into_iter()
            .filter(|t| *t <= first + WINDOW_MS)
            .collect();
        let (longest_gap_ms, gap_at) = inside
            .windows(2)
            .map(|w| (w[1] - w[0], w[0] - first))
            .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
        println!("the longest gap starts {gap_at:.0} ms after the first frame");
        let stats = viewer.eval("window.netem.stats").await?;
        let stats = stats.as_array().context("stats")?;
        let (a, b) = (
            stats.first().context("no stats")?,
            stats.last().context("no stats")?,
        );
        let ms = b[0].as_f64().unwrap_or(0.0) - a[0].as_f64().unwrap_or(0.0);
        let bytes = b[1].as_f64().unwrap_or(0.0) - a[1].as_f64().unwrap_or(0.0);
        ensure!(ms > 5000.0, "too few stats reports: {stats:?}");
        Ok(Self {
            fps: (inside.len() - 1) as f64 * 1000.0 / WINDOW_MS,
            longest_gap_ms,
            encoder_kbps: bytes * 8.0 / ms,
            target_kbps: b[2].as_u64().unwrap_or(0),
        })
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}
