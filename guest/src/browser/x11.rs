//! Input and pictures of the virtual display, through the X protocol
//! itself (x11rb's pure-Rust client, so the static agent needs no libX11):
//! XTest fakes pointer and key events for the whole screen (Chromium's UI
//! included, which CDP input could not reach), and GetImage takes the
//! screenshot encoded as PNG. Used by [`super::BrowserRole`].

use airlock_proto::{InputEvent, SecretBytes};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::xproto::{ConnectionExt as _, ImageFormat, Keycode, Keysym, Window};
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

const KEY_PRESS: u8 = 2;
const KEY_RELEASE: u8 = 3;
const BUTTON_PRESS: u8 = 4;
const BUTTON_RELEASE: u8 = 5;
const MOTION_NOTIFY: u8 = 6;
const SHIFT_L: Keysym = 0xffe1;

/// A connection to the display with its keyboard map.
#[derive(Debug)]
pub struct Display {
    conn: RustConnection,
    root: Window,
    width: u16,
    height: u16,
    min_keycode: Keycode,
    per_keycode: usize,
    keymap: Vec<Keysym>,
}

impl Display {
    /// Connects to `display` (e.g. `:5`) and reads its keyboard map.
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
        let (min_keycode, max_keycode) = (setup.min_keycode, setup.max_keycode);
        let map = conn
            .get_keyboard_mapping(min_keycode, max_keycode - min_keycode + 1)
            .map_err(req)?
            .reply()
            .map_err(req)?;
        Ok(Self {
            conn,
            root,
            width,
            height,
            min_keycode,
            per_keycode: map.keysyms_per_keycode as usize,
            keymap: map.keysyms,
        })
    }

    /// Screen size in pixels.
    pub fn size(&self) -> (u16, u16) {
        (self.width, self.height)
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
                InputEvent::KeyDown { keysym } => self.key(*keysym, true)?,
                InputEvent::KeyUp { keysym } => self.key(*keysym, false)?,
                InputEvent::Text { text } => self.type_text(&text.0)?,
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

    /// The keycode and shift level that produce `keysym`, if mapped.
    fn lookup(&self, keysym: Keysym) -> Option<(Keycode, usize)> {
        self.keymap
            .chunks(self.per_keycode)
            .enumerate()
            .find_map(|(i, syms)| {
                let level = syms.iter().take(2).position(|&s| s == keysym)?;
                Some((self.min_keycode + i as u8, level))
            })
    }

    /// A keycode with no symbols, or the last one, to remap on demand.
    fn spare_keycode(&self) -> (Keycode, usize) {
        let unused = self
            .keymap
            .chunks(self.per_keycode)
            .rposition(|syms| syms.iter().all(|&s| s == 0));
        let index = unused.unwrap_or(self.keymap.len() / self.per_keycode - 1);
        (self.min_keycode + index as u8, index)
    }

    fn key(&mut self, keysym: Keysym, down: bool) -> Result<(), X11Error> {
        let keycode = match self.lookup(keysym) {
            Some((code, _)) => code,
            None => self.remap_spare(keysym)?,
        };
        self.fake(if down { KEY_PRESS } else { KEY_RELEASE }, keycode, 0, 0)
    }

    /// Maps `keysym` onto the spare keycode (as xdotool does for symbols
    /// the layout lacks) and returns that keycode.
    fn remap_spare(&mut self, keysym: Keysym) -> Result<Keycode, X11Error> {
        let (code, index) = self.spare_keycode();
        let syms = vec![keysym; self.per_keycode];
        self.conn
            .change_keyboard_mapping(1, code, self.per_keycode as u8, &syms)
            .map_err(req)?;
        self.keymap[index * self.per_keycode..(index + 1) * self.per_keycode]
            .copy_from_slice(&syms);
        self.conn
            .get_input_focus()
            .map_err(req)?
            .reply()
            .map_err(req)?;
        Ok(code)
    }

    fn type_text(&mut self, text: &str) -> Result<(), X11Error> {
        let shift = self.lookup(SHIFT_L).map(|(c, _)| c);
        for c in text.chars() {
            let keysym = char_keysym(c);
            let (code, level) = match self.lookup(keysym) {
                Some(found) => found,
                None => (self.remap_spare(keysym)?, 0),
            };
            let shifted = level == 1 && shift.is_some();
            if let (true, Some(s)) = (shifted, shift) {
                self.fake(KEY_PRESS, s, 0, 0)?;
            }
            self.fake(KEY_PRESS, code, 0, 0)?;
            self.fake(KEY_RELEASE, code, 0, 0)?;
            if let (true, Some(s)) = (shifted, shift) {
                self.fake(KEY_RELEASE, s, 0, 0)?;
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

/// The X keysym for a character: Latin-1 maps to itself, control keys to
/// their function keysyms, the rest to the Unicode keysym range.
pub fn char_keysym(c: char) -> Keysym {
    match c {
        '\n' | '\r' => 0xff0d,
        '\t' => 0xff09,
        '\u{8}' => 0xff08,
        c if (' '..='~').contains(&c) || ('\u{a0}'..='\u{ff}').contains(&c) => c as u32,
        c => 0x0100_0000 + c as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keysyms() {
        assert_eq!(char_keysym('a'), 0x61);
        assert_eq!(char_keysym('\n'), 0xff0d);
        assert_eq!(char_keysym('é'), 0xe9);
        assert_eq!(char_keysym('€'), 0x0100_20ac);
    }
}
