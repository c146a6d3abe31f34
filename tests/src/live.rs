//! Live-view harness: starts a login session and hands out what a viewer
//! needs (its token, page URL and signalling URL), finds the streamer
//! process the browser-role agent runs, and drives the viewer page as the
//! person would (real mouse and keyboard events dispatched to the page
//! through DevTools, mapped by the page onto the video).

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::cdp::{children_named, Tab};
use crate::Daemon;

/// A session and its viewer credentials.
#[derive(Debug, Clone)]
pub struct LiveSession {
    /// Session id.
    pub id: String,
    /// Its viewer token.
    pub token: String,
    /// Its viewer page as the API gives it (`viewerUrl`): the viewers'
    /// listener's `/session/<id>?token=<token>`.
    pub page_url: String,
    /// Absolute URL of its signalling WebSocket (token included).
    pub ws_url: String,
}

impl Daemon {
    /// `POST /api/auth/start` and the viewer credentials it returns.
    pub async fn start_live(&self, user: &str, provider: &str) -> Result<LiveSession> {
        let v = self.start_view(user, provider).await?;
        let id = v["sessionId"].as_str().context("sessionId")?.to_string();
        let token = v["viewerToken"]
            .as_str()
            .context("viewerToken")?
            .to_string();
        let page_url = v["viewerUrl"].as_str().context("viewerUrl")?.to_string();
        let ws_base = self.viewer_base.replacen("http", "ws", 1);
        Ok(LiveSession {
            page_url,
            ws_url: format!("{ws_base}/api/webrtc/session/{id}/ws?token={token}"),
            id,
            token,
        })
    }

    /// The streamer processes under the browser-role agent.
    pub fn streamers(&self) -> Vec<i32> {
        children_named(self.pid(), "airlock-guest")
            .into_iter()
            .flat_map(|agent| children_named(agent, "airlock-streamer"))
            .collect()
    }

    /// Waits until the session's streamer has been reported `running`
    /// `nth` times (1 = first start) in the session's steps.
    pub async fn wait_streaming(&self, id: &str, nth: usize) -> Result<Value> {
        self.wait_session(id, Duration::from_secs(60), |v| {
            crate::login::step_events(v)
                .iter()
                .filter(|e| *e == "streamerRunning")
                .count()
                >= nth
        })
        .await
        .context("the streamer did not report running")
    }
}

/// Where an element of the browser role's page is, in screen pixels
/// (the browser role's window fills the screen, so page CSS pixels plus
/// the browser's top chrome offset).
pub async fn element_center(browser: &Tab, selector: &str) -> Result<(f64, f64)> {
    let expr = format!(
        r#"(() => {{ const e = document.querySelector({sel}); if (!e) return null;
            const r = e.getBoundingClientRect();
            const top = window.outerHeight - window.innerHeight;
            return [r.left + r.width / 2 + window.screenX, r.top + r.height / 2 + window.screenY + top]; }})()"#,
        sel = serde_json::to_string(selector)?
    );
    let v = browser
        .wait_for(&expr, Duration::from_secs(20))
        .await
        .with_context(|| format!("{selector} in the browser role's page"))?;
    Ok((v[0].as_f64().unwrap_or(0.0), v[1].as_f64().unwrap_or(0.0)))
}

/// Where screen position (`x`, `y`) of the streamed display is in the
/// viewer's page: on its video, or its JPEG frames when it fell back.
async fn viewer_point(viewer: &Tab, x: f64, y: f64) -> Result<(f64, f64)> {
    let expr = format!(
        r#"(() => {{ const jpeg = window.airlockViewer.fallback;
            const v = document.querySelector(jpeg ? '#fallback' : '#screen'); const r = v.getBoundingClientRect();
            const w = jpeg ? v.naturalWidth : v.videoWidth, h = jpeg ? v.naturalHeight : v.videoHeight;
            const s = Math.min(r.width / w, r.height / h);
            const ox = r.left + (r.width - w * s) / 2, oy = r.top + (r.height - h * s) / 2;
            return [ox + {x} * s, oy + {y} * s]; }})()"#
    );
    let p = viewer.eval(&expr).await?;
    Ok((p[0].as_f64().unwrap_or(0.0), p[1].as_f64().unwrap_or(0.0)))
}

/// Clicks on the viewer's screen at screen position (`x`, `y`) of the
/// streamed display: a real mouse event in the viewer's page.
pub async fn click_screen(viewer: &Tab, x: f64, y: f64) -> Result<()> {
    let (x, y) = viewer_point(viewer, x, y).await?;
    for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
        let mut params = json!({ "type": kind, "x": x, "y": y });
        if kind != "mouseMoved" {
            params["button"] = json!("left");
            params["clickCount"] = json!(1);
        }
        viewer.call("Input.dispatchMouseEvent", params).await?;
    }
    Ok(())
}

/// Taps the viewer's screen at screen position (`x`, `y`): a real touch
/// in the viewer's page (touch emulation on).
pub async fn tap_screen(viewer: &Tab, x: f64, y: f64) -> Result<()> {
    let (x, y) = viewer_point(viewer, x, y).await?;
    touch(viewer, "touchStart", json!([{ "x": x, "y": y, "id": 1 }])).await?;
    touch(viewer, "touchEnd", json!([])).await
}

/// Swipes one finger on the viewer's screen from screen position
/// (`x`, `from_y`) to (`x`, `to_y`), in ten moves.
pub async fn swipe_screen(viewer: &Tab, x: f64, from_y: f64, to_y: f64) -> Result<()> {
    let (vx, y0) = viewer_point(viewer, x, from_y).await?;
    let (_, y1) = viewer_point(viewer, x, to_y).await?;
    let point = |y: f64| json!([{ "x": vx, "y": y, "id": 1 }]);
    touch(viewer, "touchStart", point(y0)).await?;
    for i in 1..=10 {
        let y = y0 + (y1 - y0) * f64::from(i) / 10.0;
        touch(viewer, "touchMove", point(y)).await?;
    }
    touch(viewer, "touchEnd", json!([])).await
}

async fn touch(viewer: &Tab, kind: &str, points: Value) -> Result<()> {
    let params = json!({ "type": kind, "touchPoints": points });
    viewer.call("Input.dispatchTouchEvent", params).await?;
    Ok(())
}

/// Types `text` into the viewer page as real key events (keydown, char,
/// keyup per character), as a person at a keyboard does.
pub async fn type_keys(viewer: &Tab, text: &str) -> Result<()> {
    for c in text.chars() {
        let s = c.to_string();
        let down = json!({ "type": "keyDown", "key": s, "text": s });
        viewer.call("Input.dispatchKeyEvent", down).await?;
        let up = json!({ "type": "keyUp", "key": s });
        viewer.call("Input.dispatchKeyEvent", up).await?;
    }
    Ok(())
}

/// Composes `text` in the viewer page the way an input method or a dead
/// key does: `preview` shown while composing (no key makes text meanwhile),
/// then `text` committed, which ends the composition.
pub async fn compose(viewer: &Tab, preview: &str, text: &str) -> Result<()> {
    let n = preview.encode_utf16().count();
    let params = json!({ "text": preview, "selectionStart": n, "selectionEnd": n });
    viewer.call("Input.imeSetComposition", params).await?;
    viewer
        .call("Input.insertText", json!({ "text": text }))
        .await?;
    Ok(())
}

/// A dead key (`´` on a US-international layout) and then `e`: the key
/// events a browser reports for it, with the composition they start.
pub async fn dead_key_e(viewer: &Tab) -> Result<()> {
    let dead = json!({ "key": "Dead", "code": "Quote", "windowsVirtualKeyCode": 222 });
    key_event(viewer, "rawKeyDown", &dead).await?;
    viewer
        .call(
            "Input.imeSetComposition",
            json!({ "text": "\u{b4}", "selectionStart": 1, "selectionEnd": 1 }),
        )
        .await?;
    key_event(viewer, "keyUp", &dead).await?;
    let e = json!({ "key": "e", "code": "KeyE", "windowsVirtualKeyCode": 69 });
    key_event(viewer, "rawKeyDown", &e).await?;
    viewer
        .call("Input.insertText", json!({ "text": "\u{e9}" }))
        .await?;
    key_event(viewer, "keyUp", &e).await
}

async fn key_event(viewer: &Tab, kind: &str, key: &Value) -> Result<()> {
    let mut params = key.clone();
    params["type"] = json!(kind);
    viewer.call("Input.dispatchKeyEvent", params).await?;
    Ok(())
}

/// Pastes `text` into the viewer page as a person does: the text on the
/// viewer browser's own clipboard, then Ctrl+V.
pub async fn paste(viewer: &Tab, text: &str) -> Result<()> {
    let origin = viewer.eval("location.origin").await?;
    viewer
        .call(
            "Browser.grantPermissions",
            json!({ "origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"] }),
        )
        .await?;
    let write = format!(
        "navigator.clipboard.writeText({}).then(() => true)",
        serde_json::to_string(text)?
    );
    viewer
        .eval(&write)
        .await
        .context("writing the viewer's clipboard")?;
    let ctrl = json!({ "key": "Control", "code": "ControlLeft", "windowsVirtualKeyCode": 17, "modifiers": 2 });
    let v = json!({ "key": "v", "code": "KeyV", "windowsVirtualKeyCode": 86, "modifiers": 2, "commands": ["paste"] });
    key_event(viewer, "rawKeyDown", &ctrl).await?;
    key_event(viewer, "rawKeyDown", &v).await?;
    key_event(viewer, "keyUp", &v).await?;
    key_event(
        viewer,
        "keyUp",
        &json!({ "key": "Control", "code": "ControlLeft", "windowsVirtualKeyCode": 17 }),
    )
    .await
}

/// Presses a named key (`Enter`, `Tab`) with its Windows key code in the
/// viewer page.
pub async fn press_key(viewer: &Tab, key: &str, code: i64) -> Result<()> {
    for kind in ["rawKeyDown", "keyUp"] {
        let params = json!({
            "type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code,
        });
        viewer.call("Input.dispatchKeyEvent", params).await?;
    }
    Ok(())
}

/// Presses Ctrl+`key` in the viewer page (`code`: the key's virtual key
/// code), as a person's shortcut: the viewer sends it on as keys.
pub async fn press_ctrl(viewer: &Tab, key: &str, code: i64) -> Result<()> {
    let ctrl = json!({ "key": "Control", "code": "ControlLeft", "windowsVirtualKeyCode": 17 });
    let k = json!({ "key": key, "code": format!("Key{}", key.to_uppercase()),
                    "windowsVirtualKeyCode": code, "modifiers": 2 });
    key_event(viewer, "rawKeyDown", &ctrl).await?;
    key_event(viewer, "rawKeyDown", &k).await?;
    key_event(viewer, "keyUp", &k).await?;
    key_event(viewer, "keyUp", &ctrl).await
}

/// Signs in to the demo provider as a person would, through the viewer
/// page of the session `v` (awaiting the user, on its sign-in page): waits
/// for video, clicks and types on it, allows on the consent page, and
/// returns the session once it completed. The viewer is returned too, for
/// whatever else the caller checks while it is open.
pub async fn demo_login_through_viewer(
    d: &Daemon,
    v: &Value,
) -> Result<(Value, crate::cdp::Viewer)> {
    let id = v["sessionId"].as_str().context("sessionId")?;
    let link = v["viewerUrl"].as_str().context("viewerUrl")?;
    let viewer = crate::cdp::Viewer::open(link).await?;
    viewer
        .tab
        .wait_for(
            "(() => { const v = document.querySelector('#screen'); return v && v.videoWidth > 0 && v.currentTime > 0 ? true : null; })()",
            Duration::from_secs(90),
        )
        .await
        .context("the viewer never showed video (TURN over TCP through the egress gateway)")?;
    sign_in_and_allow(d, id, &viewer).await?;
    let done = d
        .wait_session(id, Duration::from_secs(300), |v| {
            v["state"] == "completed" || v["state"] == "failed"
        })
        .await?;
    anyhow::ensure!(done["state"] == "completed", "{done}");
    Ok((done, viewer))
}

/// Gives the viewer's screen the keyboard as a keyboard user does, with
/// Tab (the screen is the page's first stop), touching nothing in the
/// remote page: what has the focus there keeps it.
pub async fn focus_screen(viewer: &Tab) -> Result<()> {
    press_key(viewer, "Tab", 9).await?;
    viewer
        .wait_for(
            "document.activeElement && document.activeElement.id === 'keys'",
            Duration::from_secs(5),
        )
        .await
        .context("Tab did not give the viewer's screen the keyboard")?;
    Ok(())
}

/// Through the viewer: types alice's name and password into the sign-in
/// form on screen (its username field has the focus), then allows on the
/// consent page (Allow has the focus there).
pub async fn sign_in_and_allow(d: &Daemon, id: &str, viewer: &crate::cdp::Viewer) -> Result<()> {
    if viewer
        .tab
        .eval("document.activeElement && document.activeElement.id")
        .await?
        != "keys"
    {
        focus_screen(&viewer.tab).await?;
    }
    type_keys(&viewer.tab, "alice").await?;
    press_key(&viewer.tab, "Tab", 9).await?;
    type_keys(&viewer.tab, "correct horse").await?;
    press_key(&viewer.tab, "Enter", 13).await?;
    d.wait_page(id, "/authorize/login", 1).await?;
    d.press_until_past_consent(id, Duration::from_secs(45), async |_| {
        press_key(&viewer.tab, "Enter", 13).await
    })
    .await
}

/// Keeps the page in `tab` changing (a counter in its corner redrawn 25
/// times a second), for tests that count video frames: the streamer sends
/// frames of a still screen only about once a second.
pub async fn keep_changing(tab: &Tab) -> Result<()> {
    tab.eval(
        "(() => { const e = document.createElement('div'); \
         e.style.cssText = 'position:fixed;right:0;bottom:0;font:12px monospace'; \
         document.body.appendChild(e); \
         window.__airlockTicker = setInterval(() => { e.textContent = String(performance.now()); }, 40); \
         return true; })()",
    )
    .await
    .context("cannot animate the page")?;
    Ok(())
}
