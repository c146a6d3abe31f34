//! Login sessions end to end: airlockd boots a browser (the browser role
//! as a host process: real Xvfb and Chromium), runs airlock's fake CLI's
//! login in it against the fake OAuth server (the [`FAKE`] provider; the
//! real vendor CLIs run only in VMs, in `vendor_clis`), the test acts as
//! the person through the input endpoint (keyboard only), and the
//! credential is captured, stored encrypted and delivered into a real QEMU
//! CLI VM, where it is read back. Failure paths: deny, stale file, killed
//! CLI, expiry, cancel. Every successful login also checks that its canary
//! token is nowhere in logs, consoles, API responses or the database.
//!
//! Tests run one at a time: the fake CLI binds a fixed port (1460), as
//! Codex does.

use std::path::Path;
use std::time::Duration;

use airlock_host::store::{CredentialStore, StoreConfig};
use airlock_tests::login::{
    give_to_browser_account, providers_with_fake, state_is, step_events, with_rig, LoginRig,
    BROWSER_ACCOUNT, FAKE, FAKE_CREDENTIAL,
};
use airlock_tests::Daemon;
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};

const USER: &str = "user-42";
const COMPLETE: Duration = Duration::from_secs(300);

/// Starts a `provider` login for [`USER`] and waits until it awaits the
/// person; returns its id and view.
async fn awaiting_user(d: &Daemon, provider: &str) -> Result<(String, Value)> {
    let id = d.start_session(USER, provider).await?;
    let v = d
        .wait_session(&id, COMPLETE, |v| state_is(v, "awaiting_user"))
        .await?;
    Ok((id, v))
}

/// The store airlockd uses, opened from this process.
async fn store(d: &Daemon) -> Result<CredentialStore> {
    let state = d.state_dir();
    let cfg = StoreConfig {
        url: format!("sqlite://{}", state.join("airlock.db").display()),
        key_file: state.join("store.keys"),
    };
    Ok(CredentialStore::open(&cfg).await?)
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs a provider's login to completion and checks the credential in the
/// CLI VM and the store; returns the final view.
async fn complete(rig: &LoginRig, file_in_vm: &str) -> Result<Value> {
    let d = &rig.daemon;
    let (id, _) = awaiting_user(d, FAKE).await?;
    d.sign_in_and(&id, true).await?;
    let done = d
        .wait_session(&id, COMPLETE, |v| state_is(v, "completed"))
        .await?;
    let events = step_events(&done);
    for state in [
        "booting",
        "browser_ready",
        "awaiting_user",
        "captured",
        "stored",
        "delivered",
        "completed",
    ] {
        ensure!(
            done["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["state"] == state)),
            "no {state} step: {events:?}"
        );
    }
    // The browser VM's agent kept the credential until the host said it
    // was stored (it would have sent it again on a new connection).
    let log = std::fs::read_to_string(d.dir.path().join("airlockd.log"))?;
    ensure!(
        log.contains("the host has stored the credential"),
        "the agent was not told its credential is stored"
    );
    let vm = done["cliVmId"].as_str().context("cliVmId")?;
    let stat = d.exec(vm, &["stat", "-c", "%a", file_in_vm]).await?;
    assert_eq!(
        stat["stdout"].as_str().map(str::trim),
        Some("600"),
        "{stat}"
    );
    let grep = d.exec(vm, &["grep", "-c", &rig.canary, file_in_vm]).await?;
    assert_ne!(
        grep["stdout"].as_str().map(str::trim),
        Some("0"),
        "the file holds this login's tokens"
    );
    let (record, bundle) = store(d)
        .await?
        .latest(USER, FAKE)
        .await?
        .context("stored")?;
    assert_eq!(Some(record.id.as_str()), done["credentialId"].as_str());
    assert_eq!(record.delivered_vm.as_deref(), Some(vm));
    let sum = d.exec(vm, &["sha256sum", file_in_vm]).await?;
    let in_vm = sum["stdout"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        in_vm,
        hex(bundle.files[0].contents.expose()),
        "the VM holds exactly what was stored"
    );
    let (_, browser) = d.request(Method::GET, "/api/vms", None).await?;
    assert!(
        !browser.to_string().contains("\"browser\""),
        "the browser VM is gone: {browser}"
    );
    assert_no_canary(rig, &id).await?;
    // Audit lines name the credential, stored and delivered.
    let log = d.log_tail(usize::MAX);
    for action in ["credentialStored", "credentialDelivered"] {
        ensure!(
            log.lines()
                .any(|l| l.contains(" audit: ") && l.contains(action) && l.contains(&record.id)),
            "no {action} audit line for {}",
            record.id
        );
    }
    Ok(done)
}

/// The canary is in no file of airlockd (logs, consoles, kept VM logs,
/// the database and its WAL), in no API response, and no agent state
/// (with the login's home) is left in /dev/shm.
async fn assert_no_canary(rig: &LoginRig, session: &str) -> Result<()> {
    let d = &rig.daemon;
    let mut responses = Vec::new();
    for path in [
        "/api/vms".to_string(),
        format!("/api/auth/session/{session}"),
        "/health".into(),
    ] {
        responses.push(d.request(Method::GET, &path, None).await?.1.to_string());
    }
    let events = d
        .http
        .get(format!("{}/api/auth/session/{session}/events", d.base))
        .send()
        .await?
        .text()
        .await?;
    responses.push(events);
    for r in &responses {
        ensure!(
            !r.contains(&rig.canary),
            "an API response holds the token: {r}"
        );
    }
    let mut leaks = Vec::new();
    scan(d.dir.path(), &rig.canary, &mut leaks);
    ensure!(leaks.is_empty(), "the token is in {leaks:?}");
    // No VM of this airlockd left agent state (other tests' VMs run beside
    // this one: only the ones its log names count), and no agent's state
    // holds the token.
    let log = d.log_tail(usize::MAX);
    let vms = vm_ids(&log);
    ensure!(!vms.is_empty(), "airlockd's log names no VM");
    for vm in vms {
        let state = std::path::PathBuf::from(format!("/dev/shm/airlock-agent-{vm}"));
        ensure!(!state.exists(), "agent state left in {}", state.display());
    }
    for entry in std::fs::read_dir("/dev/shm")?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("airlock-agent-")
        {
            scan(&entry.path(), &rig.canary, &mut leaks);
        }
    }
    ensure!(leaks.is_empty(), "the token is in {leaks:?}");
    Ok(())
}

/// The VM ids (`vm-` and 12 hex digits) a log mentions.
fn vm_ids(log: &str) -> std::collections::BTreeSet<&str> {
    log.match_indices("vm-")
        .filter_map(|(i, _)| log.get(i..i + 15))
        .filter(|id| id[3..].bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

fn scan(dir: &Path, needle: &str, leaks: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            scan(&path, needle, leaks);
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                leaks.push(path.display().to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_end_to_end_leaves_its_token_only_in_the_cli_vm_and_the_store() -> Result<()> {
    with_rig(
        |s| s,
        async |rig| {
            let done = complete(rig, FAKE_CREDENTIAL).await?;
            let events = step_events(&done);
            assert!(events.contains(&"urlOpened".to_string()), "{events:?}");
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_is_delivered_once_the_cli_vm_is_up() -> Result<()> {
    // Delivery gives up waiting at once: the CLI VM is still booting, so
    // the credential stays stored and goes in when the VM is ready.
    // Meanwhile it holds no login slot: with room for one login, another
    // starts.
    with_rig(
        |s| {
            s.set("auth", "delivery_timeout_ms", "200")
                .set("auth", "prestart_cli_vm", "false")
                .set("auth", "max_sessions", "1")
        },
        async |rig| {
            let d = &rig.daemon;
            let another_while_pending = tokio::time::timeout(COMPLETE, async {
                // The first login's id, once `complete` has started it.
                let first = loop {
                    let started = d.sessions.lock().ok().and_then(|s| s.first().cloned());
                    if let Some(id) = started {
                        break id;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let pending = d
                    .wait_session(&first, COMPLETE, |v| {
                        step_events(v).contains(&"deliveryPending".to_string())
                    })
                    .await?;
                ensure!(state_is(&pending, "stored"), "{pending}");
                let other = d.start_session("user-43", FAKE).await?;
                d.cancel_session(&other).await?;
                // Its browser is gone once it is cancelled.
                d.wait_session(&other, COMPLETE, |v| state_is(v, "cancelled"))
                    .await?;
                anyhow::Ok(())
            });
            let (done, other) = tokio::join!(complete(rig, FAKE_CREDENTIAL), another_while_pending);
            let done = done?;
            other
                .context("the first login never waited for its delivery")?
                .context("a login while a credential waits for delivery")?;
            let events = step_events(&done);
            assert!(
                events.contains(&"deliveryPending".to_string()),
                "{events:?}"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn denying_consent_fails_the_session_and_stores_nothing() -> Result<()> {
    with_rig(
        |s| s,
        async |rig| {
            let d = &rig.daemon;
            let (id, _) = awaiting_user(d, FAKE).await?;
            d.sign_in_and(&id, false).await?;
            let v = d
                .wait_session(&id, COMPLETE, |v| state_is(v, "failed"))
                .await?;
            let error = v["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("the user denied access on the consent page (access_denied"),
                "{error}"
            );
            assert!(
                store(d).await?.latest(USER, FAKE).await?.is_none(),
                "nothing stored"
            );
            assert!(v["browserVmId"].is_null());
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_credential_file_is_not_taken_for_a_login() -> Result<()> {
    let home = tempfile::tempdir()?;
    let cli_home = home.path().join(".airlock-demo");
    std::fs::create_dir_all(&cli_home)?;
    let stale = r#"{"accessToken":"STALE-TOKEN","refreshToken":"STALE-REFRESH","user":"alice","expiresAt":4102444800000}"#;
    std::fs::write(cli_home.join("credentials.json"), stale)?;
    // The login CLI runs as the browser role's own account.
    give_to_browser_account(home.path())?;
    let providers = home.path().join("providers.toml");
    std::fs::write(
        &providers,
        providers_with_fake()?.replace(
            "AIRLOCK_DEMO_HOME=${HOME}/.airlock-demo",
            &format!("AIRLOCK_DEMO_HOME={}", cli_home.display()),
        ),
    )?;
    let path = format!("{:?}", providers.display().to_string());
    with_rig(
        |s| s.set("auth", "providers_file", &path),
        async |rig| {
            let d = &rig.daemon;
            let (id, _) = awaiting_user(d, FAKE).await?;
            // The stale file is rewritten (same bytes) while the login waits:
            // the watcher looks at it, and must not take it.
            std::fs::write(cli_home.join("credentials.json"), stale)?;
            d.sign_in_and(&id, true).await?;
            let done = d
                .wait_session(&id, COMPLETE, |v| state_is(v, "completed"))
                .await?;
            let vm = done["cliVmId"].as_str().context("cliVmId")?;
            let stale_in_vm = d
                .exec(vm, &["grep", "-c", "STALE-TOKEN", FAKE_CREDENTIAL])
                .await?;
            assert_eq!(
                stale_in_vm["stdout"].as_str().map(str::trim),
                Some("0"),
                "the stale token was not delivered"
            );
            let fresh = d
                .exec(vm, &["grep", "-c", &rig.canary, FAKE_CREDENTIAL])
                .await?;
            assert_ne!(
                fresh["stdout"].as_str().map(str::trim),
                Some("0"),
                "the new login was"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_cli_fails_the_session_with_its_exit_status() -> Result<()> {
    with_rig(
        |s| s,
        async |rig| {
            let d = &rig.daemon;
            let (id, _) = awaiting_user(d, FAKE).await?;
            let pid = process_with_cmdline("airlock-demo-cli login")
                .context("the fake CLI is running")?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            let v = d
                .wait_session(&id, COMPLETE, |v| state_is(v, "failed"))
                .await?;
            let error = v["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("exited with signal 9 before logging in"),
                "{error}"
            );
            assert!(store(d).await?.latest(USER, FAKE).await?.is_none());
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_nobody_finishes_expires_and_loses_its_browser() -> Result<()> {
    with_rig(
        |s| s.set("auth", "user_timeout_ms", "20000"),
        async |rig| {
            let d = &rig.daemon;
            let (id, waiting) = awaiting_user(d, FAKE).await?;
            let agent = browser_agent_pid(d, &waiting).await?;
            let vm = waiting["browserVmId"]
                .as_str()
                .context("browserVmId")?
                .to_string();
            let v = d
                .wait_session(&id, Duration::from_secs(90), |v| state_is(v, "expired"))
                .await?;
            assert!(
                v["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("nobody finished the login"),
                "{v}"
            );
            assert_browser_gone(d, agent, &vm).await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_destroys_the_browser_and_stores_nothing() -> Result<()> {
    with_rig(
        |s| s,
        async |rig| {
            let d = &rig.daemon;
            let (id, waiting) = awaiting_user(d, FAKE).await?;
            let agent = browser_agent_pid(d, &waiting).await?;
            let vm = waiting["browserVmId"]
                .as_str()
                .context("browserVmId")?
                .to_string();
            let (status, v) = d
                .request(
                    Method::POST,
                    &format!("/api/auth/session/{id}/cancel"),
                    None,
                )
                .await?;
            assert_eq!(
                (status, v["state"].as_str()),
                (200, Some("cancelled")),
                "{v}"
            );
            assert!(store(d).await?.latest(USER, FAKE).await?.is_none());
            assert_browser_gone(d, agent, &vm).await
        },
    )
    .await
}

/// The host-process browser (`vm.unsafe_host_browser`, fast tests only)
/// gets none of airlockd's environment and, airlockd being root here, the
/// unprivileged account: a command run in it cannot read the store's key
/// file or airlockd's environment.
#[tokio::test(flavor = "multi_thread")]
async fn the_host_process_browser_cannot_reach_airlockds_keys_or_environment() -> Result<()> {
    with_rig(
        |s| s,
        async |rig| {
            let d = &rig.daemon;
            let (_, waiting) = awaiting_user(d, FAKE).await?;
            let agent = browser_agent_pid(d, &waiting).await?;
            let vm = waiting["browserVmId"]
                .as_str()
                .context("browserVmId")?
                .to_string();
            // Its profile is in the agent's state directory, named after
            // the VM by the process backend.
            let marker = format!("airlock-agent-{vm}");
            let chromium = airlock_tests::processes_naming(Path::new(&marker), None);
            let chromium: i32 = chromium
                .first()
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .context("no Chromium of the browser VM found")?;
            let root = nix::unistd::geteuid().is_root();
            for pid in [agent, chromium] {
                let env = std::fs::read(format!("/proc/{pid}/environ"))?;
                let names: Vec<String> = env
                    .split(|b| *b == 0)
                    .filter_map(|kv| kv.split(|b| *b == b'=').next())
                    .filter(|k| !k.is_empty())
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect();
                ensure!(
                    !names.iter().any(|n| n == "RUST_LOG"),
                    "process {pid} has airlockd's environment: {names:?}"
                );
                if root {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
                    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
                    let want = nix::unistd::User::from_name(BROWSER_ACCOUNT)?
                        .context("account")?
                        .uid
                        .to_string();
                    ensure!(
                        uid.split_whitespace().skip(1).all(|u| u == want),
                        "process {pid} does not run as {BROWSER_ACCOUNT}: {uid}"
                    );
                }
            }
            ensure!(
                waiting["browserVmId"].is_string(),
                "no browser VM: {waiting}"
            );
            let vm = waiting["browserVmId"].as_str().unwrap_or_default();
            let key_file = d.state_dir().join("store.keys");
            ensure!(key_file.exists(), "airlockd made no key file");
            let airlockd_env = format!("/proc/{}/environ", d.pid());
            // Not root: the browser runs as this same account, which owns both.
            let forbidden = if root {
                vec![key_file.display().to_string(), airlockd_env]
            } else {
                Vec::new()
            };
            for path in forbidden {
                let out = d.exec(vm, &["cat", &path]).await?;
                ensure!(
                    out["exitCode"] != 0 && out["stdout"].as_str().unwrap_or("x").is_empty(),
                    "the browser read {path}: {out}"
                );
            }
            Ok(())
        },
    )
    .await
}

/// The pid of the browser VM's agent (a host process here).
async fn browser_agent_pid(d: &Daemon, view: &Value) -> Result<i32> {
    let vm = view["browserVmId"].as_str().context("browserVmId")?;
    let (_, v) = d
        .request(Method::GET, &format!("/api/vms/{vm}"), None)
        .await?;
    Ok(v["vmmPid"].as_i64().context("vmmPid")? as i32)
}

/// No VM of kind browser, and nothing of that agent (Chromium, Xvfb) runs.
async fn assert_browser_gone(d: &Daemon, agent: i32, vm: &str) -> Result<()> {
    let (_, vms) = d.request(Method::GET, "/api/vms", None).await?;
    ensure!(
        !vms.to_string().contains("\"browser\""),
        "a browser VM remains: {vms}"
    );
    // Chromium's crashpad handlers leave on their own once Chromium is
    // gone, a moment after it; anything else is not expected to linger.
    // Its processes name the agent's state directory, named after the VM.
    let marker = format!("airlock-agent-{vm}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left = airlock_tests::processes_naming(Path::new(&marker), None);
        let only_crashpad = left.iter().all(|p| p.contains("chrome_crashpad_handler"));
        if left.is_empty() || !only_crashpad || std::time::Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(left.is_empty(), "processes of the browser remain: {left:?}");
    ensure!(
        !Path::new("/proc").join(agent.to_string()).exists(),
        "the agent still runs"
    );
    Ok(())
}

fn process_with_cmdline(cmd: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
        let raw = std::fs::read(e.path().join("cmdline")).ok()?;
        (String::from_utf8_lossy(&raw).replace('\0', " ").trim() == cmd).then_some(pid)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn providers_are_listed_and_an_unknown_one_is_refused() -> Result<()> {
    let shipped = airlock_tests::artifacts()?
        .repo
        .join("config/providers.toml");
    let shipped = format!("{:?}", shipped.display().to_string());
    with_rig(
        |s| s.set("auth", "providers_file", &shipped),
        async |rig| {
            let d = &rig.daemon;
            let (status, v) = d.request(Method::GET, "/api/auth/providers", None).await?;
            assert_eq!(status, 200, "{v}");
            let names: Vec<&str> = v["providers"]
                .as_array()
                .context("providers")?
                .iter()
                .filter_map(|p| p["name"].as_str())
                .collect();
            // The demo provider is off unless auth.demo is on.
            assert_eq!(names, ["claude_code", "codex", "gemini_cli"], "{v}");
            assert_eq!(v["providers"][1]["displayName"], "OpenAI Codex CLI");
            assert_eq!(v["providers"][0]["flow"], "loopback");
            let body = serde_json::json!({ "userId": USER, "provider": "cursor" });
            let (status, v) = d
                .request(Method::POST, "/api/auth/start", Some(body))
                .await?;
            assert_eq!(status, 400, "{v}");
            let error = v["error"].as_str().unwrap_or_default();
            assert!(error.contains("unknown provider \"cursor\""), "{error}");
            assert!(error.contains("codex"), "names what exists: {error}");
            Ok(())
        },
    )
    .await
}

/// The CLI VM's copy of the fake credential: its SHA-256, or `None` while
/// it has none.
async fn credential_in(d: &Daemon, vm: &str) -> Result<Option<String>> {
    let out = d.exec(vm, &["sha256sum", FAKE_CREDENTIAL]).await?;
    Ok((out["exitCode"] == 0).then(|| {
        out["stdout"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_new_cli_vm_gets_the_newest_credential_and_a_refreshed_copy_stays() -> Result<()> {
    with_rig(
        |s| s.set("vm", "keep_on_exit", "true"),
        async |rig| {
            let done = complete(rig, FAKE_CREDENTIAL).await?;
            let d = &mut rig.daemon;
            let first = done["cliVmId"].as_str().context("cliVmId")?.to_string();
            let (_, bundle) = store(d).await?.latest(USER, FAKE).await?.context("stored")?;
            let stored = hex(bundle.files[0].contents.expose());
            d.delete_vm(&first).await?;
            // A new CLI VM of the user (the test image has no home disk:
            // nothing of the first VM is in it) gets the credential once
            // it is ready.
            let vm = d
                .ready_vm(serde_json::json!({"kind": "cli", "userId": USER}))
                .await?;
            let id = vm["id"].as_str().context("id")?.to_string();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let got = loop {
                if let Some(sum) = credential_in(d, &id).await? {
                    break sum;
                }
                ensure!(std::time::Instant::now() < deadline, "never delivered to {id}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            ensure!(got == stored, "the new VM got another credential");
            let (record, _) = store(d).await?.latest(USER, FAKE).await?.context("stored")?;
            ensure!(record.delivered_vm.as_deref() == Some(id.as_str()));
            // The CLI refreshes its token there: that copy is newer than
            // the stored one and stays, also when the VM is seen ready
            // again (taken over by a restarted airlockd).
            let refreshed = format!(
                "printf '{{\"accessToken\":\"refreshed\",\"refreshToken\":\"r2\"}}' > {FAKE_CREDENTIAL}"
            );
            d.exec(&id, &["sh", "-c", &refreshed]).await?;
            let mine = credential_in(d, &id).await?.context("written")?;
            let log = d.dir.path().join("airlockd.log");
            let before = std::fs::metadata(&log)?.len() as usize;
            d.restart(true).await?;
            let back = d.wait_state(&id, "ready", Duration::from_secs(60)).await?;
            ensure!(back["adoptedAt"].is_string(), "{back}");
            // Once the new airlockd has looked at the VM's files:
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let text = std::fs::read(&log)?;
                let after = String::from_utf8_lossy(text.get(before..).unwrap_or_default());
                let seen = after
                    .lines()
                    .find(|l| l.contains("has the user's newest credentials") && l.contains(&id));
                if let Some(line) = seen {
                    ensure!(line.contains("written=0"), "{line}");
                    break;
                }
                ensure!(std::time::Instant::now() < deadline, "the VM's files were never looked at");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ensure!(
                credential_in(d, &id).await? == Some(mine),
                "the refreshed credential was overwritten by the stored one"
            );
            Ok(())
        },
    )
    .await
}
