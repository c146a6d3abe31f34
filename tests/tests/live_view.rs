//! The live view end to end: airlockd, the browser role as a host process
//! (real Xvfb, Chromium and the GStreamer streamer), and two kinds of
//! viewer. An independent webrtc-rs peer negotiates through the signalling
//! WebSocket, counts complete VP8 frames and gets keyframes on request. A
//! headless Chromium opens the viewer page: its `<video>` renders frames, a
//! click and typed text reach the browser role's page (checked there over
//! DevTools), the stream comes back after the streamer is killed without a
//! reload, and a whole login (the fake CLI) is completed through it.
//!
//! Tests run one at a time: the fake CLI binds its fixed port.

use std::time::{Duration, Instant};

use airlock_tests::cdp::{browser_role_tab, Tab, Viewer};
use airlock_tests::live::{
    click_screen, compose, dead_key_e, element_center, keep_changing, paste, press_ctrl, press_key,
    swipe_screen, tap_screen, type_keys, LiveSession,
};
use airlock_tests::login::{state_is, step_events, with_rig, LoginRig, FAKE, FAKE_CREDENTIAL};
use airlock_tests::peer::Peer;
use airlock_tests::Settings;
use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

const USER: &str = "viewer-user";
const LONG: Duration = Duration::from_secs(120);

/// Loopback-only ICE for the streamer, and no CLI VM unless asked for.
fn loopback(s: Settings) -> Settings {
    s.set("live", "ice_addresses", "[\"127.0.0.1\"]")
        .set("auth", "prestart_cli_vm", "false")
}

/// Starts a session of the fake CLI and waits for its sign-in page on screen.
async fn live_session(rig: &LoginRig) -> Result<LiveSession> {
    let d = &rig.daemon;
    let live = d.start_live(USER, FAKE).await?;
    d.wait_session(&live.id, LONG, |v| state_is(v, "awaiting_user"))
        .await?;
    d.wait_page(&live.id, "/authorize", 1).await?;
    Ok(live)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_independent_peer_gets_complete_frames_and_keyframes_on_request() -> Result<()> {
    with_rig(loopback, async |rig| {
        let live = live_session(rig).await?;
        keep_changing(&browser_role_tab(rig.daemon.pid()).await?).await?;
        let peer = Peer::connect(&live.ws_url).await?;
        ensure!(peer.welcome["controlling"] == true, "{}", peer.welcome);
        peer.connected(Duration::from_secs(15)).await?;
        let started = Instant::now();
        peer.wait_counts(Duration::from_secs(10), "30 complete frames", |c| {
            c.complete_frames >= 30
        })
        .await?;
        eprintln!("30 complete frames after {:?}", started.elapsed());
        // A keyframe for an RTCP picture loss indication...
        let before = peer.counts().keyframes;
        peer.send_pli().await?;
        peer.wait_counts(Duration::from_secs(3), "a keyframe after a PLI", |c| {
            c.keyframes > before
        })
        .await?;
        // ... and for a keyframe request on the signalling socket.
        let before = peer.counts().keyframes;
        peer.send(json!({ "type": "keyFrame" })).await?;
        peer.wait_counts(Duration::from_secs(3), "a keyframe after a request", |c| {
            c.keyframes > before
        })
        .await?;
        peer.close().await;
        Ok(())
    })
    .await
}

/// The viewer's count of rendered video frames.
async fn frames(viewer: &Tab) -> Result<u64> {
    Ok(viewer
        .eval("window.airlockViewer ? window.airlockViewer.framesRendered : 0")
        .await?
        .as_u64()
        .unwrap_or(0))
}

async fn wait_frames(viewer: &Tab, at_least: u64, timeout: Duration) -> Result<()> {
    viewer
        .wait_for(
            &format!("window.airlockViewer && window.airlockViewer.framesRendered >= {at_least}"),
            timeout,
        )
        .await
        .map(|_| ())
        .with_context(|| format!("the viewer did not render {at_least} frames"))
}

/// Clicks the remote page's field `id` through the viewer and waits until
/// it has the focus (checked over DevTools in the browser role).
async fn click_field(browser: &Tab, viewer: &Tab, id: &str) -> Result<()> {
    let (x, y) = element_center(browser, &format!("#{id}")).await?;
    click_screen(viewer, x, y).await?;
    browser
        .wait_for(
            &format!("document.activeElement && document.activeElement.id === '{id}'"),
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("the click did not reach the {id} field"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_viewer_page_shows_the_screen_takes_input_and_outlives_a_streamer_crash() -> Result<()>
{
    with_rig(loopback, async |rig| {
        let d = &rig.daemon;
        let live = live_session(rig).await?;
        let browser = browser_role_tab(d.pid()).await?;
        keep_changing(&browser).await?;
        let viewer = Viewer::open(&live.page_url).await?;
        wait_frames(&viewer.tab, 30, Duration::from_secs(30)).await?;
        // A click on the password field and typing, as a person would.
        click_field(&browser, &viewer.tab, "password").await?;
        type_keys(&viewer.tab, "Typed-via-viewer 1").await?;
        browser
            .wait_for(
                "document.querySelector('#password').value === 'Typed-via-viewer 1'",
                Duration::from_secs(10),
            )
            .await
            .context("the typed text did not arrive")?;
        // The streamer dies; the agent restarts it and the same page
        // (no reload) shows frames again.
        viewer.tab.eval("window.__sameDocument = true").await?;
        let old = d.streamers();
        ensure!(old.len() == 1, "streamers: {old:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old[0]),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let killed_at = frames(&viewer.tab).await?;
        wait_frames(&viewer.tab, killed_at + 30, Duration::from_secs(45)).await?;
        let new = d.streamers();
        ensure!(
            new.len() == 1 && new != old,
            "streamers after the kill: {new:?}"
        );
        ensure!(
            viewer.tab.eval("window.__sameDocument === true").await? == true,
            "the viewer page was reloaded"
        );
        Ok(())
    })
    .await
}

/// Text no keyboard layout of the browser VM could type: accents, sharp s,
/// CJK, an emoji outside the BMP.
const WORLD: &str = "p\u{e4}ssw\u{f6}rd-\u{df}-\u{65e5}\u{672c}\u{8a9e}-\u{1f600}";

#[tokio::test(flavor = "multi_thread")]
async fn text_in_any_language_arrives_exactly_as_typed_composed_and_pasted() -> Result<()> {
    let copy_out = |s: Settings| loopback(s).set("live", "copy_out", "true");
    with_rig(copy_out, async |rig| {
        let d = &rig.daemon;
        let live = live_session(rig).await?;
        let browser = browser_role_tab(d.pid()).await?;
        let viewer = Viewer::open(&live.page_url).await?;
        wait_frames(&viewer.tab, 5, Duration::from_secs(30)).await?;
        click_field(&browser, &viewer.tab, "password").await?;
        // Typed key by key, then a dead key, an input method's
        // composition, a shortcut-free Backspace, and a paste.
        type_keys(&viewer.tab, WORLD).await?;
        dead_key_e(&viewer.tab).await?;
        compose(&viewer.tab, "\u{306b}\u{307b}\u{3093}", "\u{65e5}\u{672c}").await?;
        type_keys(&viewer.tab, "x").await?;
        press_key(&viewer.tab, "Backspace", 8).await?;
        paste(&viewer.tab, &format!(" {WORLD}")).await?;
        let want = format!("{WORLD}\u{e9}\u{65e5}\u{672c} {WORLD}");
        let check = format!(
            "document.querySelector('#password').value === {}",
            serde_json::to_string(&want)?
        );
        if let Err(e) = browser.wait_for(&check, Duration::from_secs(15)).await {
            let got = browser
                .eval("Array.from(document.querySelector('#password').value).map(c => c.codePointAt(0).toString(16)).join(' ')")
                .await?;
            let want: Vec<String> = want.chars().map(|c| format!("{:x}", c as u32)).collect();
            anyhow::bail!("{e:#}: the remote field holds code points {got}, expected {}", want.join(" "));
        }
        // The viewer's own textarea keeps nothing of what was typed.
        let left = viewer.tab.eval("document.querySelector('#keys').value").await?;
        ensure!(left == "", "the viewer's textarea kept {left}");
        copied_text_reaches_the_viewers_clipboard(&browser, &viewer.tab).await
    })
    .await
}

/// With `live.copy_out` on: text selected and copied (Ctrl+A, Ctrl+C from
/// the viewer) in the remote page's username field lands on the viewer
/// browser's clipboard, exactly.
async fn copied_text_reaches_the_viewers_clipboard(browser: &Tab, viewer: &Tab) -> Result<()> {
    click_field(browser, viewer, "username").await?;
    type_keys(viewer, WORLD).await?;
    let typed = format!(
        "document.querySelector('#username').value === {}",
        serde_json::to_string(WORLD)?
    );
    browser.wait_for(&typed, Duration::from_secs(10)).await?;
    press_ctrl(viewer, "a", 65).await?;
    press_ctrl(viewer, "c", 67).await?;
    viewer
        .wait_for("window.airlockViewer.copies >= 1", Duration::from_secs(10))
        .await
        .context("the copy in the remote page did not reach the viewer")?;
    let clip = viewer.eval("navigator.clipboard.readText()").await?;
    ensure!(
        clip == WORLD,
        "the viewer's clipboard holds {clip}, not {WORLD}"
    );
    Ok(())
}

/// The viewer on a phone: 390x844 CSS pixels at 3x, touch only. The screen
/// is shown (it was squeezed to nothing beside the steps), a tap on a field
/// focuses it and gives the viewer the keyboard, typing reaches the field,
/// and a swipe up scrolls the remote page.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_phone_the_screen_shows_and_taps_typing_and_swipes_work() -> Result<()> {
    let follow = |s: Settings| {
        loopback(s)
            .set("auth", "screen_max_width", "1280")
            .set("auth", "screen_max_height", "1280")
    };
    with_rig(follow, async |rig| {
        let d = &rig.daemon;
        let live = live_session(rig).await?;
        let browser = browser_role_tab(d.pid()).await?;
        // Room to scroll in the remote page.
        browser
            .eval("document.body.style.minHeight = '4000px'; true")
            .await?;
        let viewer = Viewer::open("about:blank").await?;
        let phone = json!({ "width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": true });
        viewer
            .tab
            .call("Emulation.setDeviceMetricsOverride", phone)
            .await?;
        viewer
            .tab
            .call(
                "Emulation.setTouchEmulationEnabled",
                json!({ "enabled": true, "maxTouchPoints": 5 }),
            )
            .await?;
        viewer
            .tab
            .call("Page.navigate", json!({ "url": live.page_url }))
            .await?;
        wait_frames(&viewer.tab, 5, Duration::from_secs(30)).await?;
        let (screen_w, screen_h) = remote_page_follows_the_phone(&viewer.tab, &browser).await?;
        let (x, y) = emulated_center(&browser, screen_h, "#password").await?;
        browser
            .eval("window.taps = []; addEventListener('pointerdown', (e) => taps.push([e.clientX, e.clientY])); true")
            .await?;
        tap_screen(&viewer.tab, x, y).await?;
        let focused = browser
            .wait_for(
                "document.activeElement && document.activeElement.id === 'password'",
                Duration::from_secs(10),
            )
            .await;
        if let Err(e) = focused {
            let taps = browser.eval("JSON.stringify(window.taps)").await.unwrap_or_default();
            bail!("the tap at screen ({x:.0}, {y:.0}) did not focus the password field: the page saw pointers at {taps} (CSS): {e}");
        }
        let keys = viewer.tab.eval("document.activeElement && document.activeElement.id").await?;
        ensure!(keys == "keys", "after the tap the viewer's focus is on {keys}");
        keyboard_follows_the_remote_focus(&viewer.tab, true).await?;
        type_keys(&viewer.tab, "tapped").await?;
        browser
            .wait_for(
                "document.querySelector('#password').value === 'tapped'",
                Duration::from_secs(10),
            )
            .await
            .context("typing after the tap did not arrive")?;
        let (x, h) = (screen_w / 2.0, screen_h);
        // A tap on nothing editable: the remote field loses the focus, and
        // the phone's keyboard goes.
        tap_screen(&viewer.tab, x, h * 0.9).await?;
        keyboard_follows_the_remote_focus(&viewer.tab, false).await?;
        swipe_screen(&viewer.tab, x, h * 0.8, h * 0.3).await?;
        browser
            .wait_for("window.scrollY > 100", Duration::from_secs(10))
            .await
            .context("the swipe did not scroll the remote page")?;
        Ok(())
    })
    .await
}

/// Waits until the remote screen and page have followed the phone's
/// viewer: the video portrait, the remote page as wide as the viewer's
/// screen area (CSS pixels) at the pixel ratio that fits 1280x1280, in
/// portrait orientation. Returns the remote screen's size in pixels.
async fn remote_page_follows_the_phone(viewer: &Tab, browser: &Tab) -> Result<(f64, f64)> {
    let stage = viewer
        .wait_for(
            "(() => { const v = window.airlockViewer.viewport; return v && [v.width, v.height, v.scale, v.mobile]; })()",
            Duration::from_secs(10),
        )
        .await
        .context("the viewer page sent no viewport")?;
    let (w, h) = (
        stage[0].as_f64().unwrap_or(0.0),
        stage[1].as_f64().unwrap_or(0.0),
    );
    ensure!(
        stage[2] == 3.0 && stage[3] == true,
        "the viewer sent {stage}"
    );
    ensure!(
        h > w && w >= 350.0,
        "the phone's screen area is {w}x{h} CSS pixels"
    );
    let scale = (1280.0 / w).min(1280.0 / h).min(3.0);
    let expect = format!(
        "Math.abs(innerWidth - {w}) <= 2 && Math.abs(devicePixelRatio - {scale}) < 0.01 \
         && matchMedia('(orientation: portrait)').matches"
    );
    let seen = "[innerWidth, innerHeight, devicePixelRatio]";
    if let Err(e) = browser.wait_for(&expect, Duration::from_secs(15)).await {
        let now = browser.eval(seen).await.unwrap_or_default();
        bail!("the remote page is {now} (width, height, ratio), not {w} wide at {scale:.3}: {e}");
    }
    let video = viewer
        .wait_for(
            &format!(
                "(() => {{ const v = document.querySelector('#screen'); \
                 return v.videoHeight > v.videoWidth && Math.abs(v.videoWidth - {w} * {scale}) <= 4 \
                 && [v.videoWidth, v.videoHeight]; }})()"
            ),
            Duration::from_secs(15),
        )
        .await
        .context("the video did not turn into the phone's portrait screen")?;
    Ok((
        video[0].as_f64().unwrap_or(0.0),
        video[1].as_f64().unwrap_or(0.0),
    ))
}

/// Waits until the viewer's keys element asks for the on-screen keyboard
/// (`inputmode` text) when the remote focus is `editable`, and for none
/// otherwise.
async fn keyboard_follows_the_remote_focus(viewer: &Tab, editable: bool) -> Result<()> {
    let mode = if editable { "text" } else { "none" };
    let check = format!("document.querySelector('#keys').inputMode === '{mode}'");
    if let Err(e) = viewer.wait_for(&check, Duration::from_secs(10)).await {
        let now = viewer
            .eval("document.querySelector('#keys').inputMode")
            .await?;
        bail!(
            "the remote focus is {}editable, but the viewer's keyboard mode is {now}: {e}",
            if editable { "" } else { "not " }
        );
    }
    Ok(())
}

/// Where the middle of `selector` is on the remote screen (pixels) when
/// the page is emulated at a pixel ratio: the page fills the screen below
/// Chromium's bar, and its CSS pixels are `devicePixelRatio` screen pixels.
async fn emulated_center(browser: &Tab, screen_h: f64, selector: &str) -> Result<(f64, f64)> {
    let expr = format!(
        r#"(() => {{ const e = document.querySelector({sel}); if (!e) return null;
            const r = e.getBoundingClientRect(), s = devicePixelRatio;
            return [(r.left + r.width / 2) * s, {screen_h} - innerHeight * s + (r.top + r.height / 2) * s]; }})()"#,
        sel = serde_json::to_string(selector)?
    );
    let v = browser.wait_for(&expr, Duration::from_secs(10)).await?;
    Ok((v[0].as_f64().unwrap_or(0.0), v[1].as_f64().unwrap_or(0.0)))
}

/// A network where no direct path works and the TURN server cannot be
/// reached: the viewer may only relay (`iceTransportPolicy=relay`), and the
/// TURN server it is given (UDP and TCP) swallows everything unanswered.
#[tokio::test(flavor = "multi_thread")]
async fn without_udp_or_turn_the_viewer_shows_jpeg_frames_and_still_sends_input() -> Result<()> {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    let udp = std::net::UdpSocket::bind(tcp.local_addr()?)?;
    let port = udp.local_addr()?.port();
    // Held until the test ends: bound, never answering.
    let _blackhole = (tcp, udp);
    let tune = move |s: Settings| {
        loopback(s)
            .set(
                "live",
                "turn_urls",
                &format!("[\"turn:127.0.0.1:{port}?transport=udp\", \"turn:127.0.0.1:{port}?transport=tcp\"]"),
            )
            .set("live", "turn_secret", "\"unreachable\"")
            .set("live", "connect_timeout_ms", "4000")
    };
    with_rig(tune, async |rig| {
        let d = &rig.daemon;
        let live = live_session(rig).await?;
        let browser = browser_role_tab(d.pid()).await?;
        keep_changing(&browser).await?;
        // No direct path: the page may only relay through TURN.
        let url = format!("{}&iceTransportPolicy=relay", live.page_url);
        let viewer = Viewer::open(&url).await?;
        let fell_back = viewer
            .tab
            .wait_for(
                "window.airlockViewer.fallback && window.airlockViewer.jpegFrames >= 10 && document.querySelector('#fallback').naturalWidth > 0",
                Duration::from_secs(45),
            )
            .await;
        if let Err(e) = fell_back {
            let hook = viewer.tab.eval("JSON.stringify(window.airlockViewer)").await?;
            bail!("the viewer did not fall back to JPEG frames: {e:#}; the viewer: {hook}");
        }
        let state = viewer.tab.eval("window.airlockViewer.connection").await?;
        ensure!(state != "connected", "WebRTC connected after all: {state}");
        click_field(&browser, &viewer.tab, "password").await?;
        type_keys(&viewer.tab, "over-jpeg").await?;
        browser
            .wait_for(
                "document.querySelector('#password').value === 'over-jpeg'",
                Duration::from_secs(10),
            )
            .await
            .context("the typed text did not arrive over the fallback")?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_completes_through_the_viewer_page() -> Result<()> {
    let tune = |s: Settings| s.set("live", "ice_addresses", "[\"127.0.0.1\"]");
    with_rig(tune, async |rig| {
        let d = &rig.daemon;
        let live = live_session(rig).await?;
        let viewer = Viewer::open(&live.page_url).await?;
        wait_frames(&viewer.tab, 10, Duration::from_secs(30)).await?;
        let browser = browser_role_tab(d.pid()).await?;
        // Sign in: click the username field, type, Tab, type, Enter.
        let (x, y) = element_center(&browser, "#username").await?;
        click_screen(&viewer.tab, x, y).await?;
        type_keys(&viewer.tab, "alice").await?;
        press_key(&viewer.tab, "Tab", 9).await?;
        type_keys(&viewer.tab, "correct horse").await?;
        press_key(&viewer.tab, "Enter", 13).await?;
        d.wait_page(&live.id, "/authorize/login", 1).await?;
        // Consent: click Allow.
        let (x, y) = element_center(&browser, "#allow").await?;
        click_screen(&viewer.tab, x, y).await?;
        let done = d
            .wait_session(&live.id, Duration::from_secs(300), |v| {
                state_is(v, "completed")
            })
            .await?;
        let events = step_events(&done);
        for state in ["captured", "stored", "delivered"] {
            ensure!(
                done["steps"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["state"] == state)),
                "no {state} step: {events:?}"
            );
        }
        // In the CLI VM, with this login's tokens.
        let vm = done["cliVmId"].as_str().context("cliVmId")?;
        let file = FAKE_CREDENTIAL;
        let grep = d.exec(vm, &["grep", "-c", &rig.canary, file]).await?;
        ensure!(
            grep["stdout"].as_str().map(str::trim) != Some("0"),
            "{grep}"
        );
        Ok(())
    })
    .await
}
