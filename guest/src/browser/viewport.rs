//! The remote screen following the controlling viewer's viewport: a
//! phone in portrait gets a portrait screen and the page's mobile layout,
//! a desktop window gets a screen of its shape, both at the viewer's pixel
//! ratio as far as the bounds allow.
//! The viewer sends its screen area in CSS pixels with its device pixel
//! ratio ([`InputEvent::Viewport`]); [`fit`] turns that into a screen size
//! within the browser's bounds, which RandR applies to Xvfb (the streamer
//! follows the root window's size), and DevTools to Chromium: its window
//! fills the screen, and the page is emulated at the viewer's CSS size and
//! pixel ratio (pointer events over a scaled page then go through
//! [`super::pointer`]). Nothing restarts: the login page stays as it is. Called by
//! [`super::BrowserRole::input`]; re-applied after a Chromium restart.

use std::sync::PoisonError;

use airlock_proto::{ErrorReply, InputEvent};

use super::{clamp_u16, unavailable, BrowserRole, Shared};

/// Smallest screen side a viewer can cause (pixels).
const MIN_SIDE: u32 = 240;

/// What the viewer asked for, in its CSS pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wanted {
    /// CSS width.
    pub width: u32,
    /// CSS height.
    pub height: u32,
    /// Device pixel ratio.
    pub scale: f64,
    /// A touch device (the page's mobile layout).
    pub mobile: bool,
}

impl Wanted {
    /// The viewport of an [`InputEvent::Viewport`].
    pub fn of(event: &InputEvent) -> Option<Self> {
        match *event {
            InputEvent::Viewport {
                width,
                height,
                scale,
                mobile,
            } => Some(Self {
                width,
                height,
                scale,
                mobile,
            }),
            _ => None,
        }
    }
}

/// A screen and the page emulation that fills it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Screen size (pixels).
    pub screen: (u16, u16),
    /// Pixel ratio the page is drawn at.
    pub scale: f64,
    /// Mobile layout.
    pub mobile: bool,
}

/// The screen for `wanted` within `max` (pixels). The viewer's pixel
/// ratio is kept while the screen fits; past the bounds the ratio drops,
/// down to 1; below 1 the CSS size shrinks instead, keeping its shape (the
/// viewer scales the video up). Sides are even: encoders want whole
/// chroma pixels.
pub fn fit(wanted: Wanted, max: (u32, u32)) -> Fit {
    let (w, h) = (f64::from(wanted.width), f64::from(wanted.height));
    let (max_w, max_h) = (f64::from(max.0), f64::from(max.1));
    let room = (max_w / w).min(max_h / h);
    let scale = wanted.scale.min(room);
    let (scale, css_w, css_h) = if scale >= 1.0 {
        (scale, w, h)
    } else {
        let shrink = room.min(1.0);
        (1.0, w * shrink, h * shrink)
    };
    let side = |css: f64, max: u32| {
        let px = ((css * scale).floor() as u32).clamp(MIN_SIDE, max.max(MIN_SIDE));
        clamp_u16(px & !1)
    };
    Fit {
        screen: (side(css_w, max.0), side(css_h, max.1)),
        scale: (scale * 1000.0).floor() / 1000.0,
        mobile: wanted.mobile,
    }
}

impl BrowserRole {
    /// Fits the screen and the page to the viewer's viewport (nothing when
    /// the screen is fixed, or already fits).
    pub(super) async fn follow(&self, wanted: Wanted) -> Result<(), ErrorReply> {
        let Some(max) = self.screen_bounds() else {
            return Ok(());
        };
        let fit = fit(wanted, max);
        let mut last = self.shared.viewport.lock().await;
        if *last == Some(fit) {
            return Ok(());
        }
        apply(&self.shared, fit).await?;
        *last = Some(fit);
        tracing::info!(
            width = fit.screen.0,
            height = fit.screen.1,
            scale = fit.scale,
            mobile = fit.mobile,
            "screen follows the viewer"
        );
        Ok(())
    }

    /// The largest screen a viewer may ask for; `None` for a fixed screen.
    fn screen_bounds(&self) -> Option<(u32, u32)> {
        let guard = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let spec = &guard.as_ref()?.spec;
        let max = (
            spec.max_width.max(spec.width),
            spec.max_height.max(spec.height),
        );
        (spec.max_width != 0 || spec.max_height != 0).then_some(max)
    }
}

/// Resizes the X screen, then Chromium's window and page.
pub(super) async fn apply(shared: &Shared, fit: Fit) -> Result<(), ErrorReply> {
    let display = shared.display()?;
    let (w, h) = fit.screen;
    tokio::task::spawn_blocking(move || {
        display
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resize(w, h)
    })
    .await
    .map_err(|e| unavailable(e.to_string()))?
    .map_err(|e| unavailable(e.to_string()))?;
    let cdp = shared
        .cdp
        .borrow()
        .clone()
        .ok_or_else(|| unavailable("the browser is not running"))?;
    let emulation = cdp
        .fill_screen(fit)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    *shared
        .emulation
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = emulation;
    if emulation.is_some() {
        park_pointer(shared, fit.screen).await;
    }
    Ok(())
}

/// Moves the X pointer to the screen's corner, off the scaled page: the
/// page's pointer events now come through DevTools, and the pointer the
/// streamer draws would otherwise sit where the last XTest event left it.
async fn park_pointer(shared: &Shared, (w, h): (u16, u16)) {
    let Ok(display) = shared.display() else {
        return;
    };
    let corner = InputEvent::MouseMove {
        x: i32::from(w) - 1,
        y: i32::from(h) - 1,
    };
    let _ = tokio::task::spawn_blocking(move || {
        display
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(&[corner])
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(width: u32, height: u32, scale: f64) -> Wanted {
        Wanted {
            width,
            height,
            scale,
            mobile: false,
        }
    }

    #[test]
    fn a_phone_keeps_its_shape_and_as_much_of_its_ratio_as_fits() {
        let f = fit(want(374, 700, 3.0), (1280, 1280));
        assert_eq!(f.screen, (682, 1280));
        assert!((f.scale - 1.828).abs() < 0.001, "{f:?}");
    }

    #[test]
    fn a_small_window_at_ratio_one_gets_its_own_size() {
        assert_eq!(fit(want(1000, 600, 1.0), (1280, 1280)).screen, (1000, 600));
    }

    #[test]
    fn a_large_window_shrinks_at_ratio_one_keeping_its_shape() {
        let f = fit(want(1600, 900, 2.0), (1280, 1280));
        assert_eq!(f.screen, (1280, 720));
        assert_eq!(f.scale, 1.0);
    }

    #[test]
    fn sides_are_even_and_never_below_the_minimum() {
        let f = fit(want(101, 333, 1.0), (1280, 1280));
        assert_eq!(f.screen, (240, 332));
    }
}
