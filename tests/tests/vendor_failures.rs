//! The failure modes of the real vendor CLIs end the session at once with
//! the CLI's own words: failed token exchange, denied consent, state
//! mismatch, a stray request to the callback, a CLI that goes back to its
//! menu instead of exiting. The CLIs are the `browser` image's (its vendor
//! layer, unpacked), run with real Chromium and real TLS against the vendor
//! sandbox, but the browser role is an isolated host process (its own
//! network namespace with only loopback, so everything goes through
//! airlockd's egress gateway as in a browser VM): these sessions end
//! before any credential exists, so nothing here needs a VM, and each test
//! takes seconds where a browser VM under TCG takes minutes. The logins
//! that succeed, and deliver, run in browser VMs in `vendor_clis`.
//!
//! airlockd must run as root for the isolation; the host browser runs as
//! `nobody`.

use std::time::Duration;

use airlock_tests::vendors::{fails_with, with_world, BrowserRole, World};
use airlock_tests::Settings;
use anyhow::Result;

/// The isolated host browser; no CLI VM is booted (no credential comes).
fn host_no_cli_vm(s: Settings) -> Settings {
    s.set("auth", "prestart_cli_vm", "false")
}

/// Runs `body` with an isolated host browser.
async fn on_host(body: impl AsyncFnOnce(&World) -> Result<()>) -> Result<()> {
    with_world(BrowserRole::IsolatedHost, host_no_cli_vm, body).await
}

/// Far from the ten-minute timeout a missed failure would wait for, and
/// long enough for a CLI's own retry (Gemini CLI gives its callback server
/// a few seconds after a stray request).
const AT_ONCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn codex_failing_to_redeem_its_code_ends_the_session_with_codex_s_message() -> Result<()> {
    on_host(async |w| {
        w.sandbox.openai.refuse_code_exchanges(true);
        fails_with(
            w,
            "codex",
            "/oauth/authorize",
            true,
            &["Error logging in"],
            AT_ONCE,
        )
        .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn claude_code_denied_consent_ends_the_session_with_claude_s_message() -> Result<()> {
    on_host(async |w| {
        fails_with(
            w,
            "claude_code",
            "/cai/oauth/authorize",
            false,
            &["denied access", "Couldn't log in"],
            AT_ONCE,
        )
        .await
    })
    .await
}

/// The Anthropic stand-in sends the browser back with another `state` than
/// Claude Code sent: its callback server answers 400 and the CLI exits
/// with "Couldn't log in: Invalid state parameter".
#[tokio::test(flavor = "multi_thread")]
async fn claude_code_state_mismatch_ends_the_session_with_claude_s_message() -> Result<()> {
    on_host(async |w| {
        w.sandbox.anthropic.tamper_state(true);
        fails_with(
            w,
            "claude_code",
            "/cai/oauth/authorize",
            true,
            &["Couldn't log in: Invalid state parameter"],
            AT_ONCE,
        )
        .await
    })
    .await
}

/// Anthropic's token endpoint refuses the code: Claude Code's callback
/// server tells the browser the sign-in failed and the CLI exits with
/// "Couldn't log in: Request failed with status code 400".
#[tokio::test(flavor = "multi_thread")]
async fn claude_code_failing_to_redeem_its_code_ends_the_session_with_claude_s_message(
) -> Result<()> {
    on_host(async |w| {
        w.sandbox.anthropic.refuse_code_exchanges(true);
        fails_with(
            w,
            "claude_code",
            "/cai/oauth/authorize",
            true,
            &["Couldn't log in: Request failed with status code 400"],
            AT_ONCE,
        )
        .await
    })
    .await
}

/// Gemini CLI does not exit: it goes back to its menu with "Failed to
/// sign in", which the profile's `fail_when` turns into the end.
#[tokio::test(flavor = "multi_thread")]
async fn gemini_cli_denied_consent_back_at_its_menu_ends_the_session_with_its_message() -> Result<()>
{
    on_host(async |w| {
        fails_with(
            w,
            "gemini_cli",
            "/o/oauth2/v2/auth",
            false,
            &["Failed to sign in. Message:", "access_denied"],
            AT_ONCE,
        )
        .await
    })
    .await
}

/// The Google stand-in sends the browser to `/favicon.ico` on Gemini CLI's
/// callback server instead of the callback: the server takes exactly one
/// request, so the CLI gives up ("Unexpected request") and goes back to
/// its menu, which `fail_when` turns into the end.
#[tokio::test(flavor = "multi_thread")]
async fn gemini_cli_stray_callback_request_ends_the_session_with_its_message() -> Result<()> {
    on_host(async |w| {
        w.sandbox.google.stray_callback(true);
        fails_with(
            w,
            "gemini_cli",
            "/o/oauth2/v2/auth",
            true,
            &[
                "Failed to sign in. Message:",
                "Unexpected request: /favicon.ico",
            ],
            AT_ONCE,
        )
        .await
    })
    .await
}

/// Google's token endpoint refuses the code: Gemini CLI goes back to its
/// menu with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn gemini_cli_failing_to_redeem_its_code_ends_the_session_with_its_message() -> Result<()> {
    on_host(async |w| {
        w.sandbox.google.refuse_code_exchanges(true);
        fails_with(
            w,
            "gemini_cli",
            "/o/oauth2/v2/auth",
            true,
            &[
                "Failed to sign in. Message:",
                "Failed to exchange authorization code",
            ],
            AT_ONCE,
        )
        .await
    })
    .await
}

/// Google sends the browser back with another `state`: Gemini CLI goes
/// back to its menu with "OAuth state mismatch".
#[tokio::test(flavor = "multi_thread")]
async fn gemini_cli_state_mismatch_ends_the_session_with_its_message() -> Result<()> {
    on_host(async |w| {
        w.sandbox.google.tamper_state(true);
        fails_with(
            w,
            "gemini_cli",
            "/o/oauth2/v2/auth",
            true,
            &["Failed to sign in. Message:", "OAuth state mismatch"],
            AT_ONCE,
        )
        .await
    })
    .await
}
