//! Restarts of airlockd that lose nothing: VMs keep running while airlockd
//! is killed (`kill -9`) or restarted (SIGTERM) and the next airlockd takes
//! them over (`vm.keep_on_exit`); a VM that died meanwhile is cleaned up
//! with its reason. A QEMU microVM (test initramfs, TCG) and a host-process
//! agent, each owned by a user, under real airlockd processes.
//!
//! Logins across a `kill -9` (the fake CLI against the fake OAuth server in
//! this process, as in `tests/login.rs`): killed (and, once, stopped with
//! SIGTERM) while the login awaits the person, killed after the login produced its credential but before the
//! host could store it (airlockd hung with SIGSTOP, then killed), and
//! killed while the stored credential waits for the CLI VM to boot. Each
//! completes under the next airlockd with exactly one credential record,
//! delivered into the user's CLI VM, which ran throughout; nothing is left
//! once that VM is deleted.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock_fakes::oauth::OAuthEvent;
use airlock_host::store::{CredentialStore, StoreConfig};
use airlock_tests::login::{
    key, sign_in_keys, state_is, step_events, with_rig, LoginRig, FAKE, FAKE_CREDENTIAL, RETURN,
};
use airlock_tests::{with_daemon, Daemon, Settings};
use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

fn settings(backend: &str) -> Settings {
    Settings::new(backend).set("vm", "keep_on_exit", "true")
}

fn pid_of(vm: &Value) -> Result<u32> {
    Ok(vm["vmmPid"].as_u64().context("vmmPid")? as u32)
}

/// Running: it exists and is not a zombie (nobody may reap an orphan
/// here).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    matches!(state, Some(s) if s != "Z" && s != "X")
}

/// Waits (up to 10 s) until process `pid` has died.
async fn dead(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        ensure!(Instant::now() < deadline, "process {pid} did not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// What the guest calls its boot: the same after a takeover means the VM
/// was not started again.
async fn boot_id(d: &Daemon, id: &str) -> Result<String> {
    let out = d
        .exec(id, &["cat", "/proc/sys/kernel/random/boot_id"])
        .await?;
    ensure!(out["exitCode"] == 0, "{out}");
    Ok(out["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Waits (up to `timeout`) until `file` has `needle` past its first
/// `from` bytes.
async fn wait_for_text(file: &Path, from: usize, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read(file).unwrap_or_default();
        let new = text.get(from..).unwrap_or_default();
        if String::from_utf8_lossy(new).contains(needle) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} has no {needle:?} after byte {from} within {timeout:?}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nothing of the test's VMs is left: no process, no directory, no
/// cgroup.
fn nothing_left(d: &Daemon) -> Result<()> {
    let procs = d.leftover_processes();
    ensure!(procs.is_empty(), "processes left: {procs:?}");
    let dirs = d.leftover_vm_dirs();
    ensure!(dirs.is_empty(), "VM directories left: {dirs:?}");
    let cgroups = d.leftover_cgroups();
    ensure!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    Ok(())
}

/// One VM before a restart.
struct Before {
    id: String,
    pid: u32,
    boot: String,
}

async fn started(d: &Daemon, kind: &str, user: &str) -> Result<Before> {
    let vm = d
        .ready_vm(json!({"kind": kind, "userId": user, "memoryMib": 256}))
        .await?;
    ensure!(vm["adoptedAt"].is_null(), "{vm}");
    let id = vm["id"].as_str().context("id")?.to_string();
    let boot = boot_id(d, &id).await?;
    Ok(Before {
        pid: pid_of(&vm)?,
        boot,
        id,
    })
}

/// The VM is the same one, ready under the new airlockd, and serves.
async fn taken_over(d: &Daemon, before: &Before) -> Result<()> {
    let vm = d
        .wait_state(&before.id, "ready", Duration::from_secs(60))
        .await?;
    ensure!(vm["state"] == "ready", "not taken over: {vm}");
    ensure!(vm["adoptedAt"].is_string(), "no adoptedAt: {vm}");
    ensure!(pid_of(&vm)? == before.pid, "another process: {vm}");
    // A host-process agent shares the host's boot id: its pid says it.
    ensure!(
        boot_id(d, &before.id).await? == before.boot,
        "the guest booted again"
    );
    let out = d.exec(&before.id, &["echo", "still here"]).await?;
    ensure!(out["stdout"] == "still here\n", "{out}");
    Ok(())
}

/// Restarts airlockd twice (`kill -9`, then SIGTERM) under a running VM of
/// `backend` and checks each time that the next airlockd took it over.
async fn outlives_two_restarts(backend: &str) -> Result<()> {
    with_daemon(settings(backend), async |d| {
        let vm = started(d, "cli", "alice").await?;
        let console = d.run_dir().join("vms").join(&vm.id).join("console.log");
        for crash in [true, false] {
            let how = if crash { "kill -9" } else { "SIGTERM" };
            match crash {
                true => d.kill9()?,
                false => d.terminate().map(drop)?,
            }
            ensure!(alive(vm.pid), "the VM died with airlockd ({how})");
            if crash {
                // The next airlockd's agent port is another: a VM taken
                // over keeps the one it was started with.
                let config = d.dir.path().join("airlockd.toml");
                let text = std::fs::read_to_string(&config)?;
                std::fs::write(
                    &config,
                    text.replacen("[vm]\n", "[vm]\nagent_port = 1030\n", 1),
                )?;
            }
            let before = std::fs::metadata(&console)?.len() as usize;
            d.respawn().await?;
            taken_over(d, &vm).await.context(how)?;
            // Its console is read again (QEMU dialled the new console
            // socket, a host-process agent's FIFO is read by the new
            // airlockd): the agent's line about its new connection is in
            // it.
            wait_for_text(
                &console,
                before,
                "connected to host",
                Duration::from_secs(10),
            )
            .await
            .context(how)?;
            eprintln!("{backend} after {how}: taken over");
        }
        d.delete_vm(&vm.id).await?;
        nothing_left(d)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_vms_outlive_airlockd_and_the_next_one_takes_them_over() -> Result<()> {
    outlives_two_restarts("qemu").await
}

#[tokio::test(flavor = "multi_thread")]
async fn host_process_agents_outlive_airlockd_and_the_next_one_takes_them_over() -> Result<()> {
    outlives_two_restarts("process").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_that_died_while_airlockd_was_down_is_cleaned_up_with_the_reason() -> Result<()> {
    with_daemon(settings("qemu"), async |d| {
        let cli = started(d, "cli", "carol").await?;
        d.kill9()?;
        kill(Pid::from_raw(cli.pid as i32), Signal::SIGKILL)?;
        dead(cli.pid).await?;
        d.respawn().await?;
        let (status, _) = d
            .request(reqwest::Method::GET, &format!("/api/vms/{}", cli.id), None)
            .await?;
        ensure!(status == 404, "a dead VM is not taken over (got {status})");
        let why = std::fs::read_to_string(
            d.state_dir()
                .join("failed-vms")
                .join(&cli.id)
                .join("error.txt"),
        )?;
        ensure!(
            why.contains("qemu") && why.contains("no longer running"),
            "{why}"
        );
        // Its vhost-device-vsock too.
        nothing_left(d)
    })
    .await
}

// ---- Logins across a restart -------------------------------------------

const USER: &str = "restart-user";
const COMPLETE: Duration = Duration::from_secs(300);

fn login_settings(s: Settings) -> Settings {
    s.set("vm", "keep_on_exit", "true")
}

/// The user's CLI VM once it is in one of `states` (names joined by
/// `|`), polled every 50 ms (a VM boots in about 2 s) up to 2 minutes.
async fn cli_vm_of(d: &Daemon, states: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, vms) = d.request(reqwest::Method::GET, "/api/vms", None).await?;
        let cli = vms["vms"].as_array().into_iter().flatten().find(|v| {
            v["kind"] == "cli" && v["owner"] == USER && states.split('|').any(|s| v["state"] == s)
        });
        if let Some(v) = cli {
            return Ok(v.clone());
        }
        ensure!(
            Instant::now() < deadline,
            "no CLI VM of {USER} in {states}: {vms}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The user's ready CLI VM: its id and VMM pid.
async fn ready_cli_vm(d: &Daemon) -> Result<(String, u32)> {
    let v = cli_vm_of(d, "ready").await?;
    Ok((v["id"].as_str().context("id")?.to_string(), pid_of(&v)?))
}

/// Follows the session to `completed` and checks what a restart must not
/// have lost: one credential record, this session's, delivered into the
/// CLI VM that ran throughout; then that nothing is left once that VM goes.
async fn completed_without_loss(rig: &LoginRig, id: &str, cli: &(String, u32)) -> Result<()> {
    let d = &rig.daemon;
    let done = d
        .wait_session(id, COMPLETE, |v| {
            state_is(v, "completed") || v["state"] == "failed"
        })
        .await?;
    ensure!(
        state_is(&done, "completed"),
        "the login did not complete: {}",
        done["error"]
    );
    let events = step_events(&done);
    eprintln!("session {id}: {events:?}");
    ensure!(
        events.iter().any(|e| e == "resumed"),
        "no resumed step: {events:?}"
    );
    ensure!(
        done["cliVmId"] == cli.0.as_str(),
        "delivered elsewhere: {done}"
    );
    let vm = d
        .wait_state(&cli.0, "ready", Duration::from_secs(60))
        .await?;
    ensure!(pid_of(&vm)? == cli.1, "the CLI VM was started again: {vm}");
    let grep = d
        .exec(&cli.0, &["grep", "-c", &rig.canary, FAKE_CREDENTIAL])
        .await?;
    ensure!(
        grep["stdout"].as_str().map(str::trim) != Some("0"),
        "{grep}"
    );
    let state = d.state_dir();
    let store = CredentialStore::open(&StoreConfig {
        url: format!("sqlite://{}", state.join("airlock.db").display()),
        key_file: state.join("store.keys"),
    })
    .await?;
    let (n,): (i64,) = airlock_host::store::sqlx::query_as(
        "SELECT COUNT(*) FROM credential_records WHERE user_id = $1",
    )
    .bind(USER)
    .fetch_one(store.pool())
    .await?;
    ensure!(n == 1, "{n} credential records for one login");
    let (record, _) = store.latest(USER, FAKE).await?.context("stored")?;
    ensure!(Some(record.id.as_str()) == done["credentialId"].as_str());
    ensure!(record.delivered_vm.as_deref() == Some(cli.0.as_str()));
    d.delete_vm(&cli.0).await?;
    nothing_left(d)
}

/// A login awaiting the person when airlockd is killed (`crash`) or
/// stopped: the next airlockd carries it on in the same browser VM, where
/// the person then signs in.
async fn login_awaiting_the_person_goes_on(crash: bool) -> Result<()> {
    with_rig(login_settings, async |rig| {
        let started = rig.daemon.start_view(USER, FAKE).await?;
        let id = started["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_string();
        let token = started["viewerToken"]
            .as_str()
            .context("viewerToken")?
            .to_string();
        rig.daemon.wait_page(&id, "/authorize", 1).await?;
        let cli = ready_cli_vm(&rig.daemon).await?;
        let browser = rig.daemon.get_session(&id).await?["browserVmId"]
            .as_str()
            .context("browserVmId")?
            .to_string();
        rig.daemon.restart(crash).await?;
        let v = rig.daemon.get_session(&id).await?;
        ensure!(state_is(&v, "awaiting_user"), "after the restart: {v}");
        // The person's viewer link from before the restart still opens the
        // session (its token was kept as a digest); a made-up one does not.
        let d = &rig.daemon;
        for (which, tok, want) in [
            ("the link from before", token.as_str(), 200),
            ("a made-up token", "not-a-token-of-this-session", 403),
        ] {
            let url = format!("{}/session/{id}?token={tok}", d.viewer_base);
            let status = d.viewer_http.get(url).send().await?.status();
            ensure!(
                status == want,
                "viewer page with {which}: {status}, not {want}"
            );
        }
        let vm = rig
            .daemon
            .wait_state(&browser, "ready", Duration::from_secs(60))
            .await?;
        ensure!(
            vm["state"] == "ready",
            "the browser VM was not taken over: {vm}"
        );
        rig.daemon.sign_in_on_shown_page(&id, true).await?;
        completed_without_loss(rig, &id, &cli).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_goes_on_after_airlockd_is_killed_while_it_awaits_the_person() -> Result<()> {
    login_awaiting_the_person_goes_on(true).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_goes_on_after_airlockd_is_restarted_while_it_awaits_the_person() -> Result<()> {
    login_awaiting_the_person_goes_on(false).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_credential_captured_while_airlockd_hangs_and_dies_is_stored_by_the_next() -> Result<()> {
    with_rig(login_settings, async |rig| {
        let d = &rig.daemon;
        let id = d.start_session(USER, FAKE).await?;
        d.wait_page(&id, "/authorize", 1).await?;
        let cli = ready_cli_vm(d).await?;
        d.input(&id, sign_in_keys()).await?;
        d.wait_page(&id, "/authorize/login", 1).await?;
        // The person allows; airlockd hangs from then on (SIGSTOP), so
        // the credential the login produces reaches no host that could
        // store it. Then it dies.
        let pid = Pid::from_raw(d.pid());
        let mut redeemed = false;
        for _ in 0..3 {
            d.input(&id, json!([key(RETURN, true), key(RETURN, false)]))
                .await?;
            kill(pid, Signal::SIGSTOP)?;
            let code = rig
                .oauth
                .wait_for_event(
                    |e| matches!(e, OAuthEvent::CodeRedeemed { .. }),
                    Duration::from_secs(20),
                )
                .await;
            if code.is_some() {
                redeemed = true;
                break;
            }
            // The Enter was lost on a busy host: press again.
            kill(pid, Signal::SIGCONT)?;
        }
        ensure!(redeemed, "the login never exchanged its code");
        rig.daemon.restart(true).await?;
        completed_without_loss(rig, &id, &cli).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_cut_by_a_restart_is_finished_by_the_next_airlockd() -> Result<()> {
    // No CLI VM ahead of time: the delivery waits for one to boot, and
    // airlockd dies meanwhile.
    let tune = |s: Settings| login_settings(s).set("auth", "prestart_cli_vm", "false");
    with_rig(tune, async |rig| {
        let d = &rig.daemon;
        let id = d.start_session(USER, FAKE).await?;
        d.sign_in_and(&id, true).await?;
        let stored = d
            .wait_session(&id, COMPLETE, |v| {
                state_is(v, "stored") || v["state"] == "completed"
            })
            .await?;
        ensure!(
            state_is(&stored, "stored"),
            "delivered before the restart: {stored}"
        );
        let booting = cli_vm_of(d, "booting").await?;
        let cli_id = booting["id"].as_str().context("id")?.to_string();
        // Killed once its VMM runs (its record is written then): a VM
        // killed with its launch half done is cleaned up instead, and the
        // delivery goes to a new one (also fine, but not this test).
        let record = d.run_dir().join("vms").join(&cli_id).join("vm.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !record.exists() {
            ensure!(
                Instant::now() < deadline,
                "{} never appeared",
                record.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rig.daemon.restart(true).await?;
        let vm = rig
            .daemon
            .wait_state(&cli_id, "ready", Duration::from_secs(120))
            .await?;
        let cli = (cli_id, pid_of(&vm)?);
        ensure!(vm["adoptedAt"].is_string(), "{vm}");
        completed_without_loss(rig, &id, &cli).await
    })
    .await
}
