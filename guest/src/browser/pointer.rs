//! The pointer while the page is drawn at the viewer's pixel ratio
//! ([`super::viewport`]). Chromium's device-metrics emulation takes XTest
//! pointer events as unscaled CSS pixels (a click at screen (300, 1000) on
//! a ratio-2 page landed at CSS (300, 913)), so events over the page go to
//! it through DevTools in CSS pixels instead; events over Chromium's own
//! bar, which the emulation does not scale, stay on XTest. A press keeps
//! its route until its release, so a drag that leaves the page stays one.
//! [`Pointer::route`] is pure; [`super::BrowserRole::input`] applies what
//! it returns.

use std::time::{Duration, Instant};

use airlock_proto::InputEvent;
use chromiumoxide::cdp::browser_protocol::input::{
    DispatchMouseEventParams, DispatchMouseEventType, MouseButton,
};

/// Pixels a wheel step scrolls in Chromium on X11, as the viewer assumes.
const WHEEL_STEP_PX: f64 = 53.0;

/// Presses this close in time and place count as a double click.
const MULTI_CLICK: Duration = Duration::from_millis(500);
const MULTI_CLICK_PX: i32 = 4;

/// How the page is drawn: its pixel ratio, and where it starts on the
/// screen (below Chromium's bar, in screen pixels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Emulation {
    /// Screen pixels per CSS pixel.
    pub scale: f64,
    /// Height of Chromium's bar (screen pixels).
    pub bar: i32,
}

/// Where one input event goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// To the display, as it came.
    X(InputEvent),
    /// To the page, in CSS pixels.
    Page(DispatchMouseEventParams),
}

/// What the pointer did so far (screen pixels).
#[derive(Debug, Default)]
pub struct Pointer {
    at: (i32, i32),
    /// CDP's `buttons` mask of the buttons held over the page.
    held: i64,
    /// A press that began over the page, not yet released.
    page_press: bool,
    last_press: Option<(Instant, (i32, i32))>,
    clicks: i64,
}

impl Pointer {
    /// Where `event` goes under `emu`, updating the pointer's state.
    pub fn route(&mut self, emu: Emulation, event: &InputEvent, now: Instant) -> Step {
        if let InputEvent::MouseMove { x, y } = *event {
            self.at = (x, y);
        }
        let over_page = self.page_press || self.at.1 >= emu.bar;
        let Some(kind) = self.page_event(event, over_page, now) else {
            return Step::X(event.clone());
        };
        let (x, y) = (
            f64::from(self.at.0) / emu.scale,
            (f64::from(self.at.1 - emu.bar) / emu.scale).max(0.0),
        );
        let (kind, button) = kind;
        let click = matches!(
            kind,
            DispatchMouseEventType::MousePressed | DispatchMouseEventType::MouseReleased
        );
        let mut params = DispatchMouseEventParams::new(kind, x, y);
        params.button = button;
        params.buttons = Some(self.held);
        if click {
            params.click_count = Some(self.clicks);
        }
        if let InputEvent::Scroll { dx, dy } = *event {
            params.delta_x = Some(f64::from(dx) * WHEEL_STEP_PX / emu.scale);
            params.delta_y = Some(f64::from(dy) * WHEEL_STEP_PX / emu.scale);
        }
        Step::Page(params)
    }

    /// The DevTools event for `event` over the page, and its button;
    /// `None` when it goes to the display.
    fn page_event(
        &mut self,
        event: &InputEvent,
        over_page: bool,
        now: Instant,
    ) -> Option<(DispatchMouseEventType, Option<MouseButton>)> {
        use DispatchMouseEventType as T;
        match *event {
            InputEvent::MouseMove { .. } if over_page => Some((T::MouseMoved, None)),
            InputEvent::Scroll { .. } if over_page => Some((T::MouseWheel, None)),
            InputEvent::MouseDown { button } if over_page => {
                let (name, bit) = cdp_button(button)?;
                self.count_click(now);
                self.held |= bit;
                self.page_press = true;
                Some((T::MousePressed, Some(name)))
            }
            InputEvent::MouseUp { button } if over_page => {
                let (name, bit) = cdp_button(button)?;
                self.held &= !bit;
                self.page_press = self.held != 0;
                Some((T::MouseReleased, Some(name)))
            }
            _ => None,
        }
    }

    fn count_click(&mut self, now: Instant) {
        let near = self.last_press.is_some_and(|(t, (x, y))| {
            now.duration_since(t) <= MULTI_CLICK
                && (x - self.at.0).abs() <= MULTI_CLICK_PX
                && (y - self.at.1).abs() <= MULTI_CLICK_PX
        });
        self.clicks = if near { self.clicks + 1 } else { 1 };
        self.last_press = Some((now, self.at));
    }
}

/// CDP's name and `buttons` bit for an X button (1 left, 2 middle, 3
/// right); other buttons stay on XTest.
fn cdp_button(button: u8) -> Option<(MouseButton, i64)> {
    match button {
        1 => Some((MouseButton::Left, 1)),
        2 => Some((MouseButton::Middle, 4)),
        3 => Some((MouseButton::Right, 2)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMU: Emulation = Emulation {
        scale: 2.0,
        bar: 80,
    };

    fn page(step: Step) -> DispatchMouseEventParams {
        match step {
            Step::Page(p) => p,
            Step::X(e) => panic!("went to X: {e:?}"),
        }
    }

    #[test]
    fn a_click_on_the_page_lands_at_its_css_pixels() {
        let (mut p, now) = (Pointer::default(), Instant::now());
        let moved = page(p.route(EMU, &InputEvent::MouseMove { x: 300, y: 1000 }, now));
        assert_eq!((moved.x, moved.y), (150.0, 460.0));
        let down = page(p.route(EMU, &InputEvent::MouseDown { button: 1 }, now));
        assert_eq!(down.button, Some(MouseButton::Left));
        assert_eq!((down.click_count, down.buttons), (Some(1), Some(1)));
        let up = page(p.route(EMU, &InputEvent::MouseUp { button: 1 }, now));
        assert_eq!((up.click_count, up.buttons), (Some(1), Some(0)));
        p.route(EMU, &InputEvent::MouseDown { button: 1 }, now);
        let second = page(p.route(EMU, &InputEvent::MouseUp { button: 1 }, now));
        assert_eq!(second.click_count, Some(2));
    }

    #[test]
    fn chromiums_bar_stays_on_xtest_but_a_drag_from_the_page_does_not() {
        let (mut p, now) = (Pointer::default(), Instant::now());
        let bar = InputEvent::MouseMove { x: 300, y: 40 };
        assert_eq!(p.route(EMU, &bar, now), Step::X(bar.clone()));
        let down = InputEvent::MouseDown { button: 1 };
        assert_eq!(p.route(EMU, &down, now), Step::X(down.clone()));
        p.route(EMU, &InputEvent::MouseUp { button: 1 }, now);
        p.route(EMU, &InputEvent::MouseMove { x: 300, y: 500 }, now);
        page(p.route(EMU, &down, now));
        let dragged = page(p.route(EMU, &bar, now));
        assert_eq!((dragged.y, dragged.buttons), (0.0, Some(1)));
    }

    #[test]
    fn wheel_steps_become_css_pixels_and_odd_buttons_stay_on_xtest() {
        let (mut p, now) = (Pointer::default(), Instant::now());
        p.route(EMU, &InputEvent::MouseMove { x: 10, y: 500 }, now);
        let wheel = page(p.route(EMU, &InputEvent::Scroll { dx: 0, dy: 3 }, now));
        assert_eq!(wheel.delta_y, Some(3.0 * WHEEL_STEP_PX / 2.0));
        let back = InputEvent::MouseDown { button: 8 };
        assert_eq!(p.route(EMU, &back, now), Step::X(back.clone()));
    }
}
