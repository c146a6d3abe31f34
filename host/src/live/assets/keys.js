// airlock viewer: maps browser keyboard events to X keysyms, the way the
// browser VM's XTest injection wants them (printable characters: Latin-1
// keysyms, or 0x01000000 + the code point). Loaded by viewer.html before
// viewer.js, which calls window.airlockKeys.keysym(event) for keys that
// are not typed as text (shortcuts, Enter, Tab, arrows, F-keys, ...).
'use strict';

(function () {
  // Keys by `event.key` that are not characters.
  const SPECIAL = {
    Enter: 0xff0d,
    Backspace: 0xff08,
    Tab: 0xff09,
    Escape: 0xff1b,
    Delete: 0xffff,
    Insert: 0xff63,
    Home: 0xff50,
    End: 0xff57,
    PageUp: 0xff55,
    PageDown: 0xff56,
    ArrowLeft: 0xff51,
    ArrowUp: 0xff52,
    ArrowRight: 0xff53,
    ArrowDown: 0xff54,
    CapsLock: 0xffe5,
    NumLock: 0xff7f,
    ScrollLock: 0xff14,
    Pause: 0xff13,
    PrintScreen: 0xff61,
    ContextMenu: 0xff67,
    AltGraph: 0xfe03,
  };

  // Modifiers by `event.code`, so left and right stay apart. The browser's
  // "Meta" is the Windows/Command key, which X calls Super.
  const MODIFIERS = {
    ShiftLeft: 0xffe1,
    ShiftRight: 0xffe2,
    ControlLeft: 0xffe3,
    ControlRight: 0xffe4,
    AltLeft: 0xffe9,
    AltRight: 0xffea,
    MetaLeft: 0xffeb,
    MetaRight: 0xffec,
  };
  const MODIFIER_KEYS = { Shift: 0xffe1, Control: 0xffe3, Alt: 0xffe9, Meta: 0xffeb };

  // The keysym of a character: Latin-1 keysyms equal their code point;
  // every other Unicode character is 0x01000000 + its code point.
  function charKeysym(ch) {
    const cp = ch.codePointAt(0);
    if ((cp >= 0x20 && cp <= 0x7e) || (cp >= 0xa0 && cp <= 0xff)) return cp;
    if (cp > 0xff) return 0x01000000 + cp;
    return null;
  }

  // The keysym of a keydown/keyup event, or null for keys X cannot take
  // (dead keys, IME composition, unidentified keys).
  function keysym(ev) {
    const key = ev.key;
    if (key in MODIFIER_KEYS) return MODIFIERS[ev.code] || MODIFIER_KEYS[key];
    if (key in SPECIAL) return SPECIAL[key];
    const f = /^F([1-9]|1[0-2])$/.exec(key);
    if (f) return 0xffbe + Number(f[1]) - 1;
    const chars = Array.from(key || '');
    if (chars.length === 1) return charKeysym(chars[0]);
    return null;
  }

  // True for the modifiers a paste must release before typing its text.
  function isModifier(sym) {
    return (sym >= 0xffe1 && sym <= 0xffee) || sym === 0xfe03;
  }

  window.airlockKeys = { keysym, charKeysym, isModifier };
})();
