//! The DevTools connection to Chromium (chromiumoxide, pinned to the CDP
//! revision that matches the image's Chromium). It opens URLs in the
//! browser's one tab, reports main-frame navigations (how a vendor's OAuth
//! error redirect is noticed), and reads text from a page as soon as an
//! element appears (how a paste-code flow gets its code). Messages the
//! crate cannot parse (events newer than its CDP revision) are logged and
//! skipped: the handler keeps running, so they never break the connection.
//! Used by [`super::BrowserRole`] and the login session.

use std::time::Duration;

use chromiumoxide::cdp::browser_protocol::browser::{
    Bounds, GetWindowForTargetParams, SetWindowBoundsParams, WindowState,
};
use chromiumoxide::cdp::browser_protocol::emulation::{
    ClearDeviceMetricsOverrideParams, SetDeviceMetricsOverrideParams,
};
use chromiumoxide::cdp::browser_protocol::input::{
    DispatchKeyEventParams, DispatchMouseEventParams, InsertTextParams,
};
use chromiumoxide::cdp::browser_protocol::network::{EventRequestWillBeSent, ResourceType};
use chromiumoxide::cdp::browser_protocol::page::{
    AddScriptToEvaluateOnNewDocumentParams, EventFrameNavigated, EventLoadEventFired,
    GetNavigationHistoryParams, NavigateParams,
};
use chromiumoxide::cdp::js_protocol::runtime::{AddBindingParams, EventBindingCalled};
use chromiumoxide::handler::HandlerConfig;
use chromiumoxide::{Browser, Page};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::notes;
use super::pointer::Emulation;

/// A DevTools operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CdpError {
    /// The connection or a command failed.
    #[error("DevTools: {0}")]
    Protocol(String),
    /// Chromium has no page to show.
    #[error("Chromium has no open tab")]
    NoPage,
}

fn proto<E: std::fmt::Display>(e: E) -> CdpError {
    CdpError::Protocol(e.to_string())
}

/// A live DevTools connection and the tab it drives.
#[derive(Debug)]
pub struct Cdp {
    browser: Browser,
    page: Page,
    version: String,
    closed: CancellationToken,
}

impl Cdp {
    /// Connects to the browser WebSocket `ws_url` and takes its first tab.
    /// The connection's handler runs until the socket closes; `closed`
    /// fires then.
    pub async fn connect(ws_url: &str) -> Result<Self, CdpError> {
        let config = HandlerConfig {
            ignore_invalid_messages: true,
            // Keep the real window size: no device-metrics emulation.
            viewport: None,
            // A navigation answers when the page commits: under TCG, with
            // a CLI starting beside it, that has taken over 20 s.
            request_timeout: Duration::from_secs(60),
            ..HandlerConfig::default()
        };
        let (mut browser, mut handler) = Browser::connect_with_config(ws_url, config)
            .await
            .map_err(proto)?;
        let closed = CancellationToken::new();
        let done = closed.clone();
        // Owned by the connection: the stream ends when the socket closes.
        tokio::spawn(async move {
            while let Some(item) = handler.next().await {
                // Not the error itself: it can quote the message, and
                // messages carry URLs with tokens in them.
                if item.is_err() {
                    tracing::debug!("a DevTools message could not be parsed and was skipped");
                }
            }
            done.cancel();
        });
        let version = browser.version().await.map_err(proto)?.product;
        let page = first_page(&mut browser).await?;
        Ok(Self {
            browser,
            page,
            version,
            closed,
        })
    }

    /// Chromium's product string.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Resolves when the DevTools connection has gone (Chromium died).
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Navigates the tab to `url` and brings it to the front. Returns when
    /// the navigation is committed, not when the page has loaded.
    pub async fn open(&self, url: &str) -> Result<(), CdpError> {
        self.page
            .execute(NavigateParams::new(url))
            .await
            .map_err(proto)?;
        let _ = self.page.bring_to_front().await;
        Ok(())
    }

    /// Inserts `text` into the tab's focused element the way an input
    /// method commits it: no key codes, so no keyboard layout stands
    /// between what the person typed and what arrives (accents, CJK,
    /// emoji alike). The error never quotes the text: it may be a password.
    pub async fn insert_text(&self, text: &str) -> Result<(), CdpError> {
        self.page
            .execute(InsertTextParams::new(text))
            .await
            .map(|_| ())
            .map_err(|_| CdpError::Protocol("the tab did not take the typed text".into()))
    }

    /// Sends a key event to the tab ([`super::keyboard`] makes them). The
    /// error never quotes the event: a key down carries its text.
    pub async fn key(&self, event: DispatchKeyEventParams) -> Result<(), CdpError> {
        self.page
            .execute(event)
            .await
            .map(|_| ())
            .map_err(|_| CdpError::Protocol("the tab did not take a key".into()))
    }

    /// Makes the window fill a screen of `fit.screen` pixels and draws
    /// the page at `fit.scale` (the viewer's pixel ratio; a mobile layout
    /// for touch devices). Chromium's own bar keeps its size: the page
    /// gets the rest.
    ///
    /// Returns how the page is drawn when it is scaled (pointer events
    /// over it must then come through [`Self::mouse`]).
    pub async fn fill_screen(
        &self,
        fit: super::viewport::Fit,
    ) -> Result<Option<Emulation>, CdpError> {
        self.page
            .execute(ClearDeviceMetricsOverrideParams::default())
            .await
            .map_err(proto)?;
        // Measured unemulated, before the resize: the bar's height does
        // not depend on the window's.
        let bar = self
            .evaluate("outerHeight - innerHeight")
            .await?
            .as_i64()
            .unwrap_or(0)
            .clamp(0, 400);
        let window = self
            .browser
            .execute(GetWindowForTargetParams {
                target_id: Some(self.page.target_id().clone()),
            })
            .await
            .map_err(proto)?;
        let (w, h) = (i64::from(fit.screen.0), i64::from(fit.screen.1));
        let bounds = Bounds {
            left: Some(0),
            top: Some(0),
            width: Some(w),
            height: Some(h),
            window_state: Some(WindowState::Normal),
        };
        self.browser
            .execute(SetWindowBoundsParams::new(window.result.window_id, bounds))
            .await
            .map_err(proto)?;
        if fit.scale == 1.0 && !fit.mobile {
            return Ok(None);
        }
        let css = |px: i64| (px as f64 / fit.scale).floor() as i64;
        let mut metrics =
            SetDeviceMetricsOverrideParams::new(css(w), css(h - bar), fit.scale, fit.mobile);
        metrics.screen_width = Some(css(w));
        metrics.screen_height = Some(css(h));
        self.page.execute(metrics).await.map_err(proto)?;
        Ok((fit.scale != 1.0).then_some(Emulation {
            scale: fit.scale,
            bar: bar as i32,
        }))
    }

    /// A mouse event for the tab, in CSS pixels ([`super::pointer`]).
    pub async fn mouse(&self, event: DispatchMouseEventParams) -> Result<(), CdpError> {
        self.page
            .execute(event)
            .await
            .map(|_| ())
            .map_err(|_| CdpError::Protocol("the tab did not take a mouse event".into()))
    }

    /// URLs the tab's main frame navigates to, from now on: each document
    /// request as it is about to be sent (every hop of a redirect chain
    /// included), then the committed URL. The request comes first on
    /// purpose: a CLI's loopback server can answer an OAuth error redirect
    /// and exit before the navigation commits, and the error must be seen
    /// before the exit is.
    pub async fn navigations(&self) -> Result<BoxStream<'static, String>, CdpError> {
        let committed = self
            .page
            .event_listener::<EventFrameNavigated>()
            .await
            .map_err(proto)?
            .filter_map(
                |e| async move { e.frame.parent_id.is_none().then(|| e.frame.url.clone()) },
            );
        let main = self.page.mainframe().await.map_err(proto)?;
        let requested = self
            .page
            .event_listener::<EventRequestWillBeSent>()
            .await
            .map_err(proto)?
            .filter_map(move |e| {
                let main_document = e.r#type == Some(ResourceType::Document)
                    && main.is_some()
                    && e.frame_id == main;
                async move { main_document.then(|| e.request.url.clone()) }
            });
        Ok(futures_util::stream::select(requested, committed).boxed())
    }

    /// Installs the notes script ([`super::notes`]) in an isolated world
    /// of every document of the tab, the current one included, and returns
    /// what it reports.
    pub async fn page_notes(&self) -> Result<BoxStream<'static, notes::PageNote>, CdpError> {
        let events = self
            .page
            .event_listener::<EventBindingCalled>()
            .await
            .map_err(proto)?;
        let binding = AddBindingParams::builder()
            .name(notes::BINDING)
            .execution_context_name(notes::WORLD)
            .build()
            .map_err(CdpError::Protocol)?;
        self.page.execute(binding).await.map_err(proto)?;
        let script = AddScriptToEvaluateOnNewDocumentParams {
            source: notes::SCRIPT.into(),
            world_name: Some(notes::WORLD.into()),
            include_command_line_api: None,
            run_immediately: Some(true),
        };
        self.page.execute(script).await.map_err(proto)?;
        Ok(events
            .filter_map(|e| async move {
                (e.name == notes::BINDING)
                    .then(|| notes::parse(&e.payload))
                    .flatten()
            })
            .boxed())
    }

    /// Fires each time the tab finishes loading a page (its load event).
    pub async fn loads(&self) -> Result<BoxStream<'static, ()>, CdpError> {
        let events = self
            .page
            .event_listener::<EventLoadEventFired>()
            .await
            .map_err(proto)?;
        Ok(events.map(|_| ()).boxed())
    }

    /// Evaluates a JavaScript expression in the tab (promises awaited) and
    /// returns its JSON value. For checks of what a page shows; the login
    /// flow itself never runs script in a vendor's page.
    pub async fn evaluate(&self, expression: &str) -> Result<serde_json::Value, CdpError> {
        let result = self
            .page
            .evaluate_expression(expression)
            .await
            .map_err(proto)?;
        Ok(result.value().cloned().unwrap_or(serde_json::Value::Null))
    }

    /// Waits until the page has rendered twice after its load event, by
    /// which time `autofocus` has been applied (Chromium applies it in a
    /// rendering update, which can come after `load`): keys typed from then
    /// on reach the focused field. Bounded: gives up after 2 s.
    pub async fn settle(&self) {
        let frames =
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))";
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.page.evaluate_expression(frames),
        )
        .await;
    }

    /// The tab's current URL.
    pub async fn current_url(&self) -> Option<String> {
        self.page.url().await.ok().flatten()
    }

    /// The tab's history as Chromium holds it now, oldest first. This is a
    /// round trip to the browser, so every event Chromium sent before it
    /// answers has already reached the listeners when it returns.
    pub async fn history(&self) -> Result<Vec<String>, CdpError> {
        let h = self
            .page
            .execute(GetNavigationHistoryParams::default())
            .await
            .map_err(proto)?;
        Ok(h.result.entries.into_iter().map(|e| e.url).collect())
    }

    /// The trimmed text of the first element matching `selector`, as soon
    /// as one exists in the tab (across navigations), or `None` at `cancel`.
    pub async fn wait_for_text(
        &self,
        selector: &str,
        cancel: &CancellationToken,
    ) -> Option<String> {
        let script = wait_script(selector);
        loop {
            let attempt = tokio::select! {
                _ = cancel.cancelled() => return None,
                r = self.page.evaluate_expression(script.as_str()) => r,
            };
            if let Ok(result) = attempt {
                if let Ok(Some(text)) = result.into_value::<Option<String>>() {
                    if !text.is_empty() {
                        return Some(text);
                    }
                }
            }
            // The page navigated (context destroyed) or the wait timed out
            // inside the page: try again in the new document.
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = self.closed() => return None,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Closes the DevTools connection (Chromium keeps running).
    pub async fn disconnect(mut self) {
        let _ = self.browser.close().await;
    }
}

/// A promise that resolves with the element's text once it appears (a
/// MutationObserver, so no polling inside the page), or null after 20 s.
fn wait_script(selector: &str) -> String {
    let sel = serde_json::to_string(selector).unwrap_or_else(|_| "\"\"".into());
    format!(
        r#"new Promise((resolve) => {{
  const read = () => {{ const el = document.querySelector({sel}); return el ? el.textContent.trim() : null; }};
  const now = read();
  if (now) {{ resolve(now); return; }}
  const obs = new MutationObserver(() => {{ const t = read(); if (t) {{ obs.disconnect(); resolve(t); }} }});
  obs.observe(document, {{ childList: true, subtree: true, characterData: true }});
  setTimeout(() => {{ obs.disconnect(); resolve(null); }}, 20000);
}})"#
    )
}

/// The one tab the person sees. Chromium starts without a window
/// (`--no-startup-window`), so this creates it and nothing else is open.
async fn first_page(browser: &mut Browser) -> Result<Page, CdpError> {
    browser
        .new_page("about:blank")
        .await
        .map_err(|_| CdpError::NoPage)
}
