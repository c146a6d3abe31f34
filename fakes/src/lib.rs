//! `airlock-fakes`: stand-ins for the things airlock cannot reach from a
//! test machine — a vendor OAuth 2.0 authorization server ([`oauth`]) and,
//! in the `fake-cli` binary, the login flows of the vendor CLIs (Codex,
//! Claude Code, Gemini CLI) plus airlock's own demo CLI.
//!
//! Used by this crate's tests, by the end-to-end tests in `tests/`, and by
//! airlockd, which mounts [`oauth::FakeOAuth::router`] for its built-in
//! "demo" provider. The fakes mimic the real flows closely (ports, redirect
//! paths, prompts, file shapes, write style, exit codes) so that airlock is
//! exercised the way the real vendors will exercise it.

#![forbid(unsafe_code)]

pub mod oauth;
pub mod pkce;
pub mod vendors;
