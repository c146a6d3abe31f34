//! What the remote page tells the controlling viewer about itself: whether
//! its focus is on something that takes typing (a phone's viewer raises
//! its on-screen keyboard then, and lowers it otherwise), and text the
//! person copied or cut in it (for the viewer's clipboard, when the
//! operator allows copying out).
//!
//! A small script watches `focusin`/`focusout` and `copy`/`cut`. It runs
//! in an isolated world of its own, whose binding is the only way out: the
//! page's scripts share the DOM with it but can neither see it nor call
//! its binding, so a page cannot forge notes. [`super::cdp::Cdp::page_notes`]
//! installs it on each DevTools connection; the browser supervisor
//! publishes what it reports through [`Notes`], and the streamer relays it
//! to the controlling viewer.

use airlock_proto::SecretText;
use tokio::sync::{broadcast, watch};

/// The isolated world the script runs in.
pub const WORLD: &str = "airlock-notes";

/// The binding the script reports through (exposed in [`WORLD`] only).
pub const BINDING: &str = "airlockNote";

/// Longest copied text passed on (characters); the script cuts there too.
pub const MAX_COPIED_CHARS: usize = 16 << 10;

/// Longest payload the agent reads from the script (bytes): a page's
/// selection is the page's to make as large as it likes.
const MAX_PAYLOAD_BYTES: usize = MAX_COPIED_CHARS * 4 + 64;

/// The watcher, run in every document of the tab. Frames other than the
/// focused one do not report on load, or their "nothing focused" would
/// override the focused frame's.
pub const SCRIPT: &str = r#"(() => {
  if (window.__airlockNotes) return; window.__airlockNotes = true;
  const note = (n) => { try { airlockNote(JSON.stringify(n)); } catch (e) {} };
  const NOT_TEXT = /^(button|checkbox|radio|submit|reset|range|color|file|image|hidden)$/i;
  const editable = (e) => !!e && (e.isContentEditable || e.tagName === 'TEXTAREA'
    || (e.tagName === 'INPUT' && !NOT_TEXT.test(e.type)));
  let last = null;
  const focus = () => {
    const e = document.activeElement;
    if (e && /^I?FRAME$/.test(e.tagName)) return;
    const now = editable(e);
    if (now !== last) { last = now; note({ focus: now }); }
  };
  addEventListener('focusin', focus, true);
  addEventListener('focusout', () => setTimeout(focus, 0), true);
  const copied = () => {
    const e = document.activeElement;
    if (e && e.type === 'password') return;
    const field = e && (e.tagName === 'TEXTAREA' || e.tagName === 'INPUT')
      && typeof e.selectionStart === 'number';
    const text = field ? e.value.slice(e.selectionStart, e.selectionEnd) : String(getSelection());
    if (text) note({ copied: text.slice(0, 16384) });
  };
  addEventListener('copy', copied, true);
  addEventListener('cut', copied, true);
  if (window === top) {
    if (document.readyState === 'loading') addEventListener('DOMContentLoaded', focus);
    else focus();
  }
})()"#;

/// One report of the script.
#[derive(Debug, Clone, PartialEq)]
pub enum PageNote {
    /// Whether the focus is on an editable element.
    Focus(bool),
    /// Text copied or cut (redacted in `Debug`).
    Copied(SecretText),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    focus: Option<bool>,
    copied: Option<String>,
}

/// Reads one binding payload; anything else is ignored (it can only come
/// from our own script, but is bounded all the same).
pub fn parse(payload: &str) -> Option<PageNote> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return None;
    }
    let p: Payload = serde_json::from_str(payload).ok()?;
    match (p.focus, p.copied) {
        (Some(editable), None) => Some(PageNote::Focus(editable)),
        (None, Some(text)) if !text.is_empty() => {
            let text = text.chars().take(MAX_COPIED_CHARS).collect();
            Some(PageNote::Copied(SecretText(text)))
        }
        _ => None,
    }
}

/// Where the notes go: the newest focus state (a viewer that gets control
/// later is told it), and copies as they happen.
#[derive(Debug)]
pub struct Notes {
    focus: watch::Sender<bool>,
    copies: broadcast::Sender<SecretText>,
}

impl Default for Notes {
    fn default() -> Self {
        Self {
            focus: watch::channel(false).0,
            copies: broadcast::channel(4).0,
        }
    }
}

impl Notes {
    /// Passes a note on (nobody listening is fine).
    pub fn publish(&self, note: PageNote) {
        match note {
            PageNote::Focus(editable) => {
                self.focus.send_replace(editable);
            }
            PageNote::Copied(text) => {
                let _ = self.copies.send(text);
            }
        }
    }

    /// The focus state, newest first.
    pub fn focus(&self) -> watch::Receiver<bool> {
        self.focus.subscribe()
    }

    /// Copies from now on.
    pub fn copies(&self) -> broadcast::Receiver<SecretText> {
        self.copies.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_focus_or_copies_and_nothing_else() {
        assert_eq!(parse(r#"{"focus":true}"#), Some(PageNote::Focus(true)));
        assert_eq!(
            parse(r#"{"copied":"abc"}"#),
            Some(PageNote::Copied(SecretText("abc".into())))
        );
        assert_eq!(parse(r#"{"copied":""}"#), None);
        assert_eq!(parse(r#"{"focus":true,"copied":"x"}"#), None);
        assert_eq!(parse(r#"{"other":1}"#), None);
        assert_eq!(parse("not json"), None);
        let huge = format!(r#"{{"copied":"{}"}}"#, "x".repeat(MAX_PAYLOAD_BYTES));
        assert_eq!(parse(&huge), None);
    }

    #[test]
    fn long_copies_are_cut_on_a_character_boundary() {
        let text = "ü".repeat(MAX_COPIED_CHARS + 5);
        let Some(PageNote::Copied(t)) = parse(&format!(r#"{{"copied":"{text}"}}"#)) else {
            panic!("not a copy");
        };
        assert_eq!(t.0.chars().count(), MAX_COPIED_CHARS);
    }

    #[test]
    fn a_late_subscriber_sees_the_newest_focus() {
        let notes = Notes::default();
        notes.publish(PageNote::Focus(true));
        assert!(*notes.focus().borrow());
    }
}
