//! `airlock-fakes`: stand-ins for the things airlock cannot reach from a
//! test machine — a vendor OAuth 2.0 authorization server ([`oauth`]), the
//! vendor sandbox ([`vendors`]) the real vendor CLIs are tested against,
//! and, in the `fake-cli` binary, airlock's own demo CLI
//! (`airlock-demo-cli`), the only CLI with no real counterpart.
//!
//! Used by this crate's tests, by the end-to-end tests in `tests/`, and by
//! airlockd, which mounts [`oauth::FakeOAuth::router`] for its built-in
//! "demo" provider. The fakes mimic the real servers closely (host names,
//! endpoints, redirect and PKCE rules, token shapes) so that airlock and
//! the real CLIs are exercised the way the real vendors will exercise them.

#![forbid(unsafe_code)]

pub mod oauth;
pub mod pkce;
pub mod vendors;
