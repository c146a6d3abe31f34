//! Input and pictures of the virtual display, through the X protocol
//! itself (x11rb's pure-Rust client, so the static agent needs no libX11):
//! XTest fakes pointer events for the whole screen (Chromium's UI
//! included, which CDP input could not reach), and GetImage takes the
//! screenshot encoded as PNG, and RandR resizes the screen within the
//! size Xvfb was started with (the screen following a viewer's viewport).
//! Keys and text do not go through X but through DevTools, free of any
//! keyboard layout ([`super::keyboard`]). Used by [`super::BrowserRole`].

use airlock_proto::{InputEvent, SecretBytes};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::randr::{ConnectionExt as _, Rotation};
use x11rb::protocol::xproto::{ConnectionExt as _, ImageFormat, Window};
use x11rb::protocol::xtest::ConnectionExt as _;
use x11rb::rust_connection::RustConnection;

/// An X operation failed.
#[derive(Debug, thiserror::Error)]
pub enum X11Error {
    /// Could not connect to the display.
    #[error("cannot connect to display {display}: {reason}")]
    Connect {
        /// The display.
        display: String,
        /// Why.
        reason: String,
    },
    /// A request failed.
    #[error("X request failed: {0}")]
    Request(String),
    /// The server lacks XTEST.
    #[error("the X server has no XTEST extension")]
    NoXtest,
    /// PNG encoding failed.
    #[error("cannot encode the screenshot: {0}")]
    Png(String),
}

fn req<E: std::fmt::Display>(e: E) -> X11Error {
    X11Error::Request(e.to_string())
}

const BUTTON_PRESS: u8 = 4;
const BUTTON_RELEASE: u8 = 5;
const MOTION_NOTIFY: u8 = 6;

/// A connection to the display.
#[derive(Debug)]
pub struct Display {
    conn: RustConnection,
    root: Window,
    width: u16,
    height: u16,
}

impl Display {
    /// Connects to `display` (e.g. `:5`).
    pub fn connect(display: &str) -> Result<Self, X11Error> {
        let (conn, screen) =
            RustConnection::connect(Some(display)).map_err(|e| X11Error::Connect {
                display: display.into(),
                reason: e.to_string(),
            })?;
        if conn
            .extension_information(x11rb::protocol::xtest::X11_EXTENSION_NAME)
            .map_err(req)?
            .is_none()
        {
            return Err(X11Error::NoXtest);
        }
        let setup = conn.setup();
        let s = &setup.roots[screen];
        let (root, width, height) = (s.root, s.width_in_pixels, s.height_in_pixels);
        Ok(Self {
            conn,
            root,
            width,
            height,
        })
    }

    /// Screen size in pixels.
    pub fn size(&self) -> (u16, u16) {
        (self.width, self.height)
    }

    /// Resizes the screen to `width` x `height`, at most the size Xvfb
    /// started with. Xvfb's one output stays at its start mode, which is
    /// larger than the new screen: it is switched off first (nothing reads
    /// it; clients and `ximagesrc` follow the root window).
    pub fn resize(&mut self, width: u16, height: u16) -> Result<(), X11Error> {
        if (width, height) == (self.width, self.height) {
            return Ok(());
        }
        let res = self
            .conn
            .randr_get_screen_resources(self.root)
            .map_err(req)?
            .reply()
            .map_err(req)?;
        for crtc in &res.crtcs {
            self.conn
                .randr_set_crtc_config(
                    *crtc,
                    res.timestamp,
                    res.config_timestamp,
                    0,
                    0,
                    x11rb::NONE,
                    Rotation::ROTATE0,
                    &[],
                )
                .map_err(req)?
                .reply()
                .map_err(req)?;
        }
        // Millimetres at Xvfb's 96 dpi.
        let mm = |px: u16| (u32::from(px) * 254 / 960).max(1);
        self.conn
            .randr_set_screen_size(self.root, width, height, mm(width), mm(height))
            .map_err(req)?
            .check()
            .map_err(req)?;
        (self.width, self.height) = (width, height);
        Ok(())
    }

    fn fake(&self, kind: u8, detail: u8, x: i16, y: i16) -> Result<(), X11Error> {
        self.conn
            .xtest_fake_input(kind, detail, 0, self.root, x, y, 0)
            .map_err(req)?;
        Ok(())
    }

    /// Applies the events in order and waits until the server has them.
    pub fn apply(&mut self, events: &[InputEvent]) -> Result<(), X11Error> {
        for e in events {
            match e {
                InputEvent::MouseMove { x, y } => {
                    let clamp = |v: i32, max: u16| v.clamp(0, i32::from(max) - 1) as i16;
                    self.fake(
                        MOTION_NOTIFY,
                        0,
                        clamp(*x, self.width),
                        clamp(*y, self.height),
                    )?;
                }
                InputEvent::MouseDown { button } => self.fake(BUTTON_PRESS, *button, 0, 0)?,
                InputEvent::MouseUp { button } => self.fake(BUTTON_RELEASE, *button, 0, 0)?,
                InputEvent::Scroll { dx, dy } => self.scroll(*dx, *dy)?,
                // Keysyms depend on the layout (and remapping a spare
                // keycode per character races the client's reading of the
                // map): keys and text go through DevTools instead.
                InputEvent::KeyDown { .. }
                | InputEvent::KeyUp { .. }
                | InputEvent::Text { .. }
                | InputEvent::Viewport { .. } => {
                    return Err(X11Error::Request(
                        "keys and viewports do not go through XTest".into(),
                    ))
                }
            }
        }
        // A round trip: every request above has been processed when it returns.
        self.conn
            .get_input_focus()
            .map_err(req)?
            .reply()
            .map_err(req)?;
        Ok(())
    }

    fn scroll(&self, dx: i32, dy: i32) -> Result<(), X11Error> {
        // Wheel steps are buttons 4/5 (vertical) and 6/7 (horizontal).
        for (steps, neg, pos) in [(dy, 4u8, 5u8), (dx, 6, 7)] {
            let button = if steps < 0 { neg } else { pos };
            for _ in 0..steps.unsigned_abs() {
                self.fake(BUTTON_PRESS, button, 0, 0)?;
                self.fake(BUTTON_RELEASE, button, 0, 0)?;
            }
        }
        Ok(())
    }

    /// The whole screen as PNG.
    pub fn screenshot(&self) -> Result<(u32, u32, SecretBytes), X11Error> {
        let (w, h) = (self.width, self.height);
        let image = self
            .conn
            .get_image(ImageFormat::Z_PIXMAP, self.root, 0, 0, w, h, !0)
            .map_err(req)?
            .reply()
            .map_err(req)?;
        // Depth 24 at 32 bits per pixel, little endian: B, G, R, unused.
        let rgb: Vec<u8> = image
            .data
            .chunks_exact(4)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect();
        let mut png_bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut png_bytes, u32::from(w), u32::from(h));
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder
            .write_header()
            .map_err(|e| X11Error::Png(e.to_string()))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| X11Error::Png(e.to_string()))?;
        writer.finish().map_err(|e| X11Error::Png(e.to_string()))?;
        Ok((u32::from(w), u32::from(h), SecretBytes::new(png_bytes)))
    }
}
