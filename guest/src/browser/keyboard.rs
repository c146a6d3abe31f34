//! The viewer's keys as DevTools key events. Keys arrive as X keysyms
//! (the wire format of [`airlock_proto::InputEvent`]); they are delivered
//! to the tab through DevTools, the same ordered channel as typed text, so
//! a Backspace can never overtake the character it deletes, nor Tab the
//! text meant for the next field. The modifiers a person holds are kept
//! here and sent with every key (Ctrl+A, Shift+Tab). Used by
//! [`super::BrowserRole::input`].

use chromiumoxide::cdp::browser_protocol::input::{DispatchKeyEventParams, DispatchKeyEventType};

/// DevTools modifier bits.
const ALT: i64 = 1;
const CTRL: i64 = 2;
const META: i64 = 4;
const SHIFT: i64 = 8;

/// Modifier keysyms: bit, `key`, `code`, Windows key code, location.
const MODIFIERS: [(u32, i64, &str, &str, i64, i64); 9] = [
    (0xffe1, SHIFT, "Shift", "ShiftLeft", 16, 1),
    (0xffe2, SHIFT, "Shift", "ShiftRight", 16, 2),
    (0xffe3, CTRL, "Control", "ControlLeft", 17, 1),
    (0xffe4, CTRL, "Control", "ControlRight", 17, 2),
    (0xffe9, ALT, "Alt", "AltLeft", 18, 1),
    (0xffea, ALT, "Alt", "AltRight", 18, 2),
    (0xffeb, META, "Meta", "MetaLeft", 91, 1),
    (0xffec, META, "Meta", "MetaRight", 92, 2),
    // AltGr chooses characters, which arrive as text: no modifier bit.
    (0xfe03, 0, "AltGraph", "AltRight", 225, 2),
];

/// Keys that make no character: keysym, `key`, `code`, Windows key code,
/// and the text the key produces (Enter submits forms through it).
const SPECIAL: [(u32, &str, &str, i64, Option<&str>); 20] = [
    (0xff0d, "Enter", "Enter", 13, Some("\r")),
    (0xff08, "Backspace", "Backspace", 8, None),
    (0xff09, "Tab", "Tab", 9, None),
    (0xff1b, "Escape", "Escape", 27, None),
    (0xffff, "Delete", "Delete", 46, None),
    (0xff63, "Insert", "Insert", 45, None),
    (0xff50, "Home", "Home", 36, None),
    (0xff57, "End", "End", 35, None),
    (0xff55, "PageUp", "PageUp", 33, None),
    (0xff56, "PageDown", "PageDown", 34, None),
    (0xff51, "ArrowLeft", "ArrowLeft", 37, None),
    (0xff52, "ArrowUp", "ArrowUp", 38, None),
    (0xff53, "ArrowRight", "ArrowRight", 39, None),
    (0xff54, "ArrowDown", "ArrowDown", 40, None),
    (0xffe5, "CapsLock", "CapsLock", 20, None),
    (0xff7f, "NumLock", "NumLock", 144, None),
    (0xff14, "ScrollLock", "ScrollLock", 145, None),
    (0xff13, "Pause", "Pause", 19, None),
    (0xff61, "PrintScreen", "PrintScreen", 44, None),
    (0xff67, "ContextMenu", "ContextMenu", 93, None),
];

/// F1 to F12.
const F1: u32 = 0xffbe;

/// The modifiers held now.
#[derive(Debug, Default)]
pub struct Keyboard {
    held: i64,
}

impl Keyboard {
    /// The DevTools event for `keysym` going down or up, or `None` for a
    /// keysym that names no key or character.
    pub fn event(&mut self, keysym: u32, down: bool) -> Option<DispatchKeyEventParams> {
        if let Some(&(_, bit, key, code, vk, location)) = MODIFIERS.iter().find(|m| m.0 == keysym) {
            // Bits of both sides: releasing one Shift of two is rare
            // enough not to track per side.
            if down {
                self.held |= bit;
            } else {
                self.held &= !bit;
            }
            let mut e = self.base(down, key, code, vk);
            e.location = Some(location);
            return Some(e);
        }
        if let Some(&(_, key, code, vk, text)) = SPECIAL.iter().find(|s| s.0 == keysym) {
            let mut e = self.base(down, key, code, vk);
            if down && self.held & (CTRL | ALT | META) == 0 {
                e = with_text(e, text);
            }
            return Some(e);
        }
        if (F1..F1 + 12).contains(&keysym) {
            let n = keysym - F1 + 1;
            return Some(self.base(down, &format!("F{n}"), &format!("F{n}"), 111 + i64::from(n)));
        }
        let c = keysym_char(keysym)?;
        let (code, vk) = char_code(c);
        let mut e = self.base(down, &c.to_string(), &code, vk);
        // Without Ctrl, Alt or Meta a character key types itself; with
        // them it is a shortcut.
        if down && self.held & (CTRL | ALT | META) == 0 {
            e = with_text(e, Some(&c.to_string()));
        }
        Some(e)
    }

    fn base(&self, down: bool, key: &str, code: &str, vk: i64) -> DispatchKeyEventParams {
        let kind = if down {
            DispatchKeyEventType::RawKeyDown
        } else {
            DispatchKeyEventType::KeyUp
        };
        let mut e = DispatchKeyEventParams::new(kind);
        e.modifiers = Some(self.held);
        e.key = Some(key.to_string());
        e.code = Some(code.to_string());
        e.windows_virtual_key_code = Some(vk);
        e
    }
}

/// A key down that also types `text` (a `keyDown` rather than a raw one).
fn with_text(mut e: DispatchKeyEventParams, text: Option<&str>) -> DispatchKeyEventParams {
    if let Some(t) = text {
        e.r#type = DispatchKeyEventType::KeyDown;
        e.text = Some(t.to_string());
        e.unmodified_text = Some(t.to_string());
    }
    e
}

/// The character of a Latin-1 or Unicode keysym.
fn keysym_char(keysym: u32) -> Option<char> {
    match keysym {
        0x20..=0x7e | 0xa0..=0xff => char::from_u32(keysym),
        0x0100_0100..=0x0110_ffff => char::from_u32(keysym - 0x0100_0000),
        _ => None,
    }
}

/// The physical key (`code`) and Windows key code of a character, as a
/// US layout has it; shortcuts are matched by these.
fn char_code(c: char) -> (String, i64) {
    match c {
        'a'..='z' | 'A'..='Z' => {
            let up = c.to_ascii_uppercase();
            (format!("Key{up}"), i64::from(up as u8))
        }
        '0'..='9' => (format!("Digit{c}"), i64::from(c as u8)),
        ' ' => ("Space".into(), 32),
        _ => (String::new(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_types_itself_and_is_a_shortcut_under_ctrl() {
        let mut k = Keyboard::default();
        let a = k.event(0x61, true).expect("a");
        assert_eq!(a.r#type, DispatchKeyEventType::KeyDown);
        assert_eq!(a.text.as_deref(), Some("a"));
        assert_eq!(
            (a.code.as_deref(), a.windows_virtual_key_code),
            (Some("KeyA"), Some(65))
        );
        k.event(0xffe3, true).expect("ctrl");
        let ctrl_a = k.event(0x61, true).expect("ctrl+a");
        assert_eq!(ctrl_a.r#type, DispatchKeyEventType::RawKeyDown);
        assert_eq!((ctrl_a.text, ctrl_a.modifiers), (None, Some(CTRL)));
        k.event(0xffe3, false).expect("ctrl up");
        assert_eq!(k.event(0x61, false).expect("a up").modifiers, Some(0));
    }

    #[test]
    fn enter_submits_and_tab_moves_with_shift() {
        let mut k = Keyboard::default();
        let enter = k.event(0xff0d, true).expect("enter");
        assert_eq!(
            (enter.text.as_deref(), enter.windows_virtual_key_code),
            (Some("\r"), Some(13))
        );
        k.event(0xffe1, true).expect("shift");
        let tab = k.event(0xff09, true).expect("tab");
        assert_eq!(tab.r#type, DispatchKeyEventType::RawKeyDown);
        assert_eq!(
            (tab.key.as_deref(), tab.modifiers),
            (Some("Tab"), Some(SHIFT))
        );
    }

    #[test]
    fn function_and_unicode_keys_map_and_unknown_ones_do_not() {
        let mut k = Keyboard::default();
        let f5 = k.event(0xffc2, true).expect("F5");
        assert_eq!(
            (f5.key.as_deref(), f5.windows_virtual_key_code),
            (Some("F5"), Some(116))
        );
        let euro = k.event(0x0100_20ac, true).expect("euro");
        assert_eq!(euro.text.as_deref(), Some("\u{20ac}"));
        assert!(k.event(0xfe50, true).is_none(), "a dead-key keysym");
        assert!(k.event(0x0100_0009, true).is_none(), "a control character");
    }
}
