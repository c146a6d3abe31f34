//! The real vendor CLIs, as image/vendor/package.json pins them, log in
//! for real: each runs in a browser VM booted from the `browser` image,
//! the person's part is done through the viewer page (keys on the video),
//! Chromium and the CLI reach the vendors' host names through airlockd's
//! egress gateway, which routes them to the vendor sandbox
//! (`airlock_fakes::vendors`) on this host's loopback, over TLS from a CA
//! that only this test's airlockd (`auth.extra_ca_file`) trusts. The
//! credential is then delivered into a CLI VM booted from the `cli` image,
//! where the same real CLI must report itself logged in with it. Nothing
//! here reaches a vendor: browser VMs have no network interface, and CLI
//! VMs none at all.
//!
//! Also: each CLI's other login path (Codex's device code, shown to the
//! person in the viewer; Gemini CLI's user code; Claude Code's pasted
//! code); and the CLI and Chromium are stopped before the credential
//! leaves the browser VM, so the sandbox sees no refresh of it from
//! there. The failure modes, which end before any credential exists, are
//! in `vendor_failures`.
//!
//! Every VM is torn down however a test ends (the harness's `Daemon`).

use std::path::PathBuf;
use std::time::Duration;

use airlock_fakes::oauth::OAuthEvent;
use airlock_tests::cdp::Viewer;
use airlock_tests::live::{focus_screen, press_key, sign_in_and_allow, type_keys};
use airlock_tests::login::{state_is, step_events};
use airlock_tests::vendors::{self, BrowserRole, World, BROWSER_UP};
use airlock_tests::{artifacts, toml_path, Daemon, Settings};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// Starts a session for `provider` and waits until the vendor's sign-in
/// page is on screen; in a browser VM, prints what the login costs it
/// (for SPECIFICATION.md).
async fn awaiting_user(
    w: &World,
    user: &str,
    provider: &str,
    authorize_path: &str,
) -> Result<Value> {
    let d = &w.d;
    let v = vendors::awaiting_user(d, user, provider, authorize_path).await?;
    if w.role != BrowserRole::Vm {
        return Ok(v);
    }
    let vm = v["browserVmId"].as_str().context("browserVmId")?;
    let mem = d
        .exec(
            vm,
            &[
                "sh",
                "-c",
                "awk '/^(MemTotal|MemAvailable):/ {print $2}' /proc/meminfo",
            ],
        )
        .await?;
    let kib: Vec<u64> = mem["stdout"]
        .as_str()
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let [total, available] = kib[..] {
        println!(
            "{provider}: guest memory in use with the sign-in page shown: {} MiB of {} MiB",
            (total - available) / 1024,
            total / 1024
        );
    }
    Ok(v)
}

/// The person's part, through the viewer page: signs in as alice on the
/// vendor's page and allows access. The viewer is returned: closing it at
/// once could drop the last key before it crossed the data channel.
async fn sign_in_through_the_viewer(d: &Daemon, v: &Value) -> Result<Viewer> {
    let viewer = open_viewer(v).await?;
    let id = v["sessionId"].as_str().context("sessionId")?;
    sign_in_and_allow(d, id, &viewer).await?;
    Ok(viewer)
}

/// Opens the session's viewer link and waits until it shows video.
async fn open_viewer(v: &Value) -> Result<Viewer> {
    let link = v["viewerUrl"].as_str().context("viewerUrl")?;
    let viewer = Viewer::open(link).await?;
    viewer
        .tab
        .wait_for(
            "(() => { const v = document.querySelector('#screen'); return v && v.videoWidth > 0 && v.currentTime > 0 ? true : null; })()",
            Duration::from_secs(90),
        )
        .await
        .context("the viewer never showed video")?;
    Ok(viewer)
}

/// Runs `script` with `sh -c` in a VM as root with root's home, with a
/// deadline that allows a first start of a large CLI under TCG.
async fn sh(d: &Daemon, vm: &str, script: &str) -> Result<Value> {
    d.exec_request(
        vm,
        json!({"argv": ["sh", "-c", script], "env": ["HOME=/root"], "timeoutMs": 120_000}),
    )
    .await
}

/// Logs `provider` in through the viewer and waits for the session to
/// complete; returns the final view.
async fn login(w: &World, user: &str, provider: &str, authorize_path: &str) -> Result<Value> {
    let v = awaiting_user(w, user, provider, authorize_path).await?;
    let id = v["sessionId"].as_str().context("sessionId")?.to_string();
    let _viewer = sign_in_through_the_viewer(&w.d, &v).await?;
    let done =
        w.d.wait_session(&id, Duration::from_secs(300), |v| {
            v["state"] == "completed" || v["state"] == "failed"
        })
        .await?;
    ensure!(
        state_is(&done, "completed"),
        "the session ended {}: {}",
        done["state"],
        done["error"]
    );
    ensure!(
        done["cliVmId"].is_string(),
        "no CLI VM took the credential: {:?}",
        step_events(&done)
    );
    Ok(done)
}

/// No refresh reached the sandbox: the browser VM's CLI and Chromium were
/// stopped before the credential left, and the delivered copy was used
/// without one.
fn no_refresh(w: &World) -> Result<()> {
    let refreshes = w.sandbox.refreshes();
    ensure!(
        refreshes == 0,
        "{refreshes} refresh(es) of the captured token reached the vendor sandbox"
    );
    Ok(())
}

fn redeemed(events: &[OAuthEvent]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, OAuthEvent::CodeRedeemed { .. }))
}

#[tokio::test(flavor = "multi_thread")]
async fn codex_logs_in_for_real_and_codex_login_status_passes_in_the_cli_vm() -> Result<()> {
    vendors::with_world(
        BrowserRole::Vm,
        |s| s,
        async |w| {
            let done = login(w, "codex-alice", "codex", "/oauth/authorize").await?;
            ensure!(
                redeemed(&w.sandbox.openai.events()),
                "OpenAI never redeemed a code"
            );
            let vm = done["cliVmId"].as_str().context("cliVmId")?;
            let out = sh(
                &w.d,
                vm,
                "stat -c '%a %U' /root/.codex/auth.json && codex login status 2>&1",
            )
            .await?;
            ensure!(
                out["exitCode"] == 0,
                "codex login status in the CLI VM: {out}"
            );
            let text = out["stdout"].as_str().unwrap_or("");
            ensure!(
                text.starts_with("600 root\n") && text.contains("Logged in"),
                "{out}"
            );
            no_refresh(w)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn claude_code_logs_in_for_real_and_claude_auth_status_passes_in_the_cli_vm() -> Result<()> {
    vendors::with_world(
        BrowserRole::Vm,
        |s| s,
        async |w| {
            // The person's CLI VM, with their own ~/.claude.json, before
            // the login: the account is merged into it, not over it.
            let vm =
                w.d.create_vm(json!({"kind": "cli", "userId": "claude-alice"}))
                    .await?;
            let booted = w.d.wait_state(&vm, "settled", BROWSER_UP).await?;
            ensure!(booted["state"] == "ready", "the CLI VM: {booted}");
            let own = r#"{"theme":"dark","numStartups":7}"#;
            sh(
                &w.d,
                &vm,
                &format!("umask 077 && printf '%s' '{own}' > /root/.claude.json"),
            )
            .await?;
            let done = login(w, "claude-alice", "claude_code", "/cai/oauth/authorize").await?;
            ensure!(
                redeemed(&w.sandbox.anthropic.events()),
                "Anthropic never redeemed a code"
            );
            ensure!(
                done["cliVmId"] == vm.as_str(),
                "delivered elsewhere: {done}"
            );
            // As delivered, before Claude Code rewrites the file (it
            // migrates some keys of its own at every start).
            let config = sh(
                &w.d,
                &vm,
                "stat -c '%a' /root/.claude.json && cat /root/.claude.json",
            )
            .await?;
            let text = config["stdout"].as_str().unwrap_or("");
            let (mode, json_text) = text.split_once('\n').unwrap_or_default();
            let merged: Value = serde_json::from_str(json_text)
                .with_context(|| format!("~/.claude.json after delivery: {config}"))?;
            ensure!(mode == "600", "~/.claude.json has mode {mode}");
            ensure!(
                merged["theme"] == "dark" && merged["numStartups"] == 7,
                "the person's own settings were not kept: {merged}"
            );
            ensure!(
                merged.as_object().is_some_and(|o| o.len() == 3),
                "more than oauthAccount came from the browser VM: {merged}"
            );
            let out = sh(&w.d, &vm, "claude auth status").await?;
            ensure!(
                out["exitCode"] == 0,
                "claude auth status in the CLI VM: {out}"
            );
            let status: Value = serde_json::from_str(out["stdout"].as_str().unwrap_or(""))
                .with_context(|| format!("claude auth status printed no JSON: {out}"))?;
            // The plan from the delivered credential; the account from the
            // oauthAccount merged into ~/.claude.json.
            ensure!(status["loggedIn"] == true, "{status}");
            ensure!(status["authMethod"] == "claude.ai", "{status}");
            ensure!(status["planTier"] == "max_20x", "{status}");
            ensure!(status["email"] == "alice@example.com", "{status}");
            ensure!(status["orgName"] == "Sandbox Org", "{status}");
            no_refresh(w)
        },
    )
    .await
}

/// CLI VMs get the gateway too, to Google's API hosts only: Gemini CLI
/// has no offline status, so a prompt answered by the sandbox's model is
/// what proves the delivered login works.
fn cli_vms_reach_google(s: Settings) -> Settings {
    s.set("egress", "cli_vms", "true").set(
        "egress",
        "allow",
        r#"["oauth2.googleapis.com:443", "www.googleapis.com:443", "cloudcode-pa.googleapis.com:443"]"#,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn gemini_cli_logs_in_for_real_and_answers_a_prompt_in_the_cli_vm() -> Result<()> {
    vendors::with_world(
        BrowserRole::Vm,
        cli_vms_reach_google, async |w| {
        let done = login(w, "gemini-alice", "gemini_cli", "/o/oauth2/v2/auth").await?;
        ensure!(redeemed(&w.sandbox.google.events()), "Google never redeemed a code");
        let vm = done["cliVmId"].as_str().context("cliVmId")?;
        // The CLI VM trusts the sandbox's CA only for this command.
        let script = format!(
            "printf '%s' '{}' > /tmp/sandbox-ca.pem && cd /root && \
             NODE_EXTRA_CA_CERTS=/tmp/sandbox-ca.pem NO_BROWSER=true GEMINI_CLI_TRUST_WORKSPACE=true \
             gemini -p ping -m gemini-2.5-flash -o json </dev/null",
            w.sandbox.ca_pem()
        );
        let out = sh(&w.d, vm, &script).await?;
        ensure!(out["exitCode"] == 0, "gemini -p in the CLI VM: {out}");
        let answer: Value = serde_json::from_str(out["stdout"].as_str().unwrap_or(""))
            .with_context(|| format!("gemini printed no JSON: {out}"))?;
        ensure!(answer["response"].as_str().is_some_and(|r| r.contains("pong")), "{answer}");
        // Tokens live an hour: nothing anywhere had a reason to refresh.
        no_refresh(w)
    })
    .await
}

/// Codex's device-code path (`codex login --device-auth`): Codex opens no
/// browser and listens nowhere; it prints auth.openai.com's device page and
/// a one-time code. The agent opens the page and reports the code, the
/// viewer shows it beside the stream, and the person types it into the
/// page, signs in and allows. Codex's poll then gets an authorization code
/// and its PKCE verifier from OpenAI and redeems them.
#[tokio::test(flavor = "multi_thread")]
async fn codex_device_code_login_shows_the_code_in_the_viewer_and_codex_works_in_the_cli_vm(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let providers = with_other_paths(dir.path())?;
    let file = toml_path(&providers);
    vendors::with_world(
        BrowserRole::IsolatedHost,
        |s| s.set("auth", "providers_file", &file),
        async |w| {
            let v = awaiting_user(w, "codex-device-alice", "codex_device", "/airlock/device")
                .await?;
            let id = v["sessionId"].as_str().context("sessionId")?;
            let view = w
                .d
                .wait_session(id, Duration::from_secs(30), |v| v["userCode"].is_string())
                .await
                .context("no user code in the session")?;
            let code = view["userCode"].as_str().context("userCode")?.to_string();
            let viewer = open_viewer(&v).await?;
            let shown = viewer
                .tab
                .wait_for(
                    "(() => { const b = document.querySelector('#usercode'); return b && !b.hidden ? document.querySelector('#usercode-value').textContent : null; })()",
                    Duration::from_secs(30),
                )
                .await
                .context("the viewer does not show the user code")?;
            ensure!(shown == code.as_str(), "the viewer shows {shown}, the session has {code}");
            // The person types the code shown into the page's code field
            // (it has the focus).
            focus_screen(&viewer.tab).await?;
            type_keys(&viewer.tab, &code).await?;
            press_key(&viewer.tab, "Enter", 13).await?;
            w.d.wait_page(id, "/airlock/device", 2)
                .await
                .context("the code was not taken")?;
            sign_in_and_allow(&w.d, id, &viewer).await?;
            let done =
                w.d.wait_session(id, Duration::from_secs(300), |v| {
                    v["state"] == "completed" || v["state"] == "failed"
                })
                .await?;
            ensure!(
                state_is(&done, "completed"),
                "the session ended {}: {}",
                done["state"],
                done["error"]
            );
            let events = w.sandbox.openai.events();
            ensure!(
                events
                    .iter()
                    .any(|e| matches!(e, OAuthEvent::DeviceTokenIssued { .. }))
                    && redeemed(&events),
                "Codex did not finish the device flow: {events:#?}"
            );
            let vm = done["cliVmId"].as_str().context("cliVmId")?;
            let out = sh(&w.d, vm, "codex login status 2>&1").await?;
            ensure!(
                out["exitCode"] == 0
                    && out["stdout"].as_str().unwrap_or("").contains("Logged in"),
                "codex login status in the CLI VM: {out}"
            );
            no_refresh(w)
        },
    )
    .await
}

/// Each CLI's other login path, as profiles an operator could add: Gemini
/// CLI's user-code flow (NO_BROWSER: it prints a URL whose redirect is
/// Google's code page and asks for the code) and Claude Code's pasted
/// code (its full sign-in link, whose redirect is Anthropic's code page).
/// The agent opens the printed link, reads the code off the vendor's page
/// and types it into the CLI.
const OTHER_PATHS: &str = r##"
[codex_device]
display_name = "OpenAI Codex CLI (device code)"
command = ["codex", "login", "--device-auth"]
env = ["CODEX_HOME=${HOME}/.codex"]
flow = { type = "deviceCode" }
confirm = { type = "statusCommand", argv = ["codex", "login", "status"] }
ca_env = ["CODEX_CA_CERTIFICATE"]
egress = ["auth.openai.com:443", "chatgpt.com:443", "*.chatgpt.com:443", "api.openai.com:443"]

[[codex_device.credentials]]
path = "${CODEX_HOME}/auth.json"
required = ["/tokens/access_token", "/tokens/refresh_token", "/tokens/id_token"]
deliver_to = "/root/.codex/auth.json"

[gemini_cli_user_code]
display_name = "Gemini CLI (user code)"
command = ["gemini"]
env = ["GEMINI_CLI_TRUST_WORKSPACE=true", "NO_BROWSER=true"]
flow = { type = "pasteCode", codeSelector = "#auth-code" }
answers = [{ when = "How would you like to authenticate", send = "\r" }]
fail_when = ["Failed to sign in. Message:", "Failed to authenticate with user code."]
confirm = { type = "file" }
ca_env = ["NODE_EXTRA_CA_CERTS"]
egress = ["accounts.google.com:443", "oauth2.googleapis.com:443", "www.googleapis.com:443", "cloudcode-pa.googleapis.com:443", "codeassist.google.com:443"]

[[gemini_cli_user_code.credentials]]
path = "${HOME}/.gemini/oauth_creds.json"
required = ["/access_token", "/refresh_token"]
deliver_to = "/root/.gemini/oauth_creds.json"

[claude_code_pasted_code]
display_name = "Claude Code (pasted code)"
command = ["claude", "auth", "login"]
env = ["CLAUDE_CONFIG_DIR=${HOME}/.claude", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "DISABLE_AUTOUPDATER=1", "CLAUDE_CODE_FULL_SIGN_IN_LINK=1"]
flow = { type = "pasteCode", codeSelector = "#oauth-code" }
confirm = { type = "exitCode" }
ca_env = ["NODE_EXTRA_CA_CERTS"]
egress = ["claude.ai:443", "claude.com:443", "platform.claude.com:443", "api.anthropic.com:443"]

[[claude_code_pasted_code.credentials]]
path = "${CLAUDE_CONFIG_DIR}/.credentials.json"
required = ["/claudeAiOauth/accessToken", "/claudeAiOauth/refreshToken"]
deliver_to = "/root/.claude/.credentials.json"
"##;

/// The shipped profiles plus [`OTHER_PATHS`], in a file beside the CA.
fn with_other_paths(w_dir: &std::path::Path) -> Result<PathBuf> {
    let shipped = std::fs::read_to_string(artifacts()?.repo.join("config/providers.toml"))?;
    let path = w_dir.join("providers.toml");
    std::fs::write(&path, format!("{shipped}\n{OTHER_PATHS}"))?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread")]
async fn gemini_cli_user_code_flow_and_claude_code_pasted_code_log_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let providers = with_other_paths(dir.path())?;
    let file = toml_path(&providers);
    vendors::with_world(
        BrowserRole::IsolatedHost,
        |s| s.set("auth", "providers_file", &file),
        async |w| {
            // One after the other: two more browser VMs beside another
            // test's would starve each other on two cores.
            let gemini = login(
                w,
                "gemini-code-alice",
                "gemini_cli_user_code",
                "/o/oauth2/v2/auth",
            )
            .await?;
            let claude = login(
                w,
                "claude-code-alice",
                "claude_code_pasted_code",
                "/oauth/authorize",
            )
            .await?;
            for (name, done) in [("gemini", gemini), ("claude", claude)] {
                let events = step_events(&done);
                ensure!(
                    events.iter().any(|e| e == "codeEntered"),
                    "{name}: the code was not typed into the CLI: {events:?}"
                );
            }
            ensure!(
                redeemed(&w.sandbox.google.events()),
                "Google never redeemed a code"
            );
            ensure!(
                redeemed(&w.sandbox.anthropic.events()),
                "Anthropic never redeemed a code"
            );
            no_refresh(w)
        },
    )
    .await
}
