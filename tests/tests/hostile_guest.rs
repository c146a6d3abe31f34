//! A hostile guest over the real host transport: a session's browser VM
//! (the browser role as a host process, fake OAuth) is taken over. Its
//! agent is stopped (SIGSTOP: it can neither answer nor dial again) and
//! the test connects in its place with the agent's build id, then:
//!
//! - floods events as fast as the host takes them: page loads of distinct
//!   maximum-size URLs for the session, maximum-size log lines, maximum-
//!   size JPEG frames for the live view, and never reads what the host
//!   sends it;
//! - sends an invalid event (a URL over its bound): the host drops that
//!   connection;
//! - connects again and disconnects halfway through a credential frame.
//!
//! Meanwhile another login on the same airlockd completes, `/health`
//! answers within 1 s every time (its times printed beside those before
//! the flood), and an operator's exec in the hostile VM fails within its
//! deadline instead of hanging. Afterwards the hostile session's history
//! is bounded (at most 128 steps), airlockd's resident memory grew by
//! less than 150 MiB (printed), and cancelling the session tears the VM
//! down within a minute: the stopped agent and every process it started
//! (Chromium, the login CLI), none left running.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_proto::stream::StreamEvent;
use airlock_proto::{
    frame, CapturedCredential, CapturedFile, Event, GuestMessage, LogLevel, LogLine, LoginEvent,
    LoginStep, Ready, SecretBytes,
};
use airlock_tests::fake_guest;
use airlock_tests::login::{state_is, with_rig, FAKE};
use airlock_tests::{guest_build_id, rss_kib, Daemon};
use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const HOSTILE: &str = "hostile";
const BYSTANDER: &str = "bystander";
const WITHIN: Duration = Duration::from_secs(240);

fn encode(m: &GuestMessage) -> Result<Vec<u8>> {
    Ok(frame::encode(m, airlock_proto::limits::MAX_FRAME_BYTES)?)
}

/// The agent's socket of VM `vm`.
fn socket(d: &Daemon, vm: &str) -> PathBuf {
    d.run_dir().join(format!("vms/{vm}/vmm/vsock.sock_1024"))
}

/// Connects in the agent's place: hello, the host's welcome, ready.
async fn take_over(d: &Daemon, vm: &str) -> Result<UnixStream> {
    let mut s = fake_guest::connect(&socket(d, vm)).await?;
    fake_guest::send_raw(&mut s, &fake_guest::hello(&guest_build_id()?)).await?;
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len))
        .await
        .context("no welcome within 10 s")??;
    let mut welcome = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut welcome).await?;
    ensure!(
        String::from_utf8_lossy(&welcome).contains("welcome"),
        "the host answered the hello with {}",
        String::from_utf8_lossy(&welcome)
    );
    let ready = GuestMessage::Event(Event::Ready(Ready { uptime_ms: 5 }));
    s.write_all(&encode(&ready)?).await?;
    Ok(s)
}

/// The flood's events, in turn: a page load of a distinct URL of the
/// largest size a step may carry, a largest log line, a largest JPEG.
fn flood_event(session: &str, i: usize, jpeg: &str) -> GuestMessage {
    let event = match i % 3 {
        0 => Event::Login(LoginEvent {
            session_id: session.into(),
            step: LoginStep::PageLoaded {
                location: format!("https://flood.example/{i}/{}", "x".repeat(4000)),
            },
        }),
        1 => Event::Log(LogLine {
            level: LogLevel::Warn,
            uptime_ms: i as u64,
            target: "airlock_guest::flood".into(),
            message: "m".repeat(airlock_proto::limits::MAX_LOG_MESSAGE_BYTES),
        }),
        _ => Event::Stream(StreamEvent::Jpeg { data: jpeg.into() }),
    };
    GuestMessage::Event(event)
}

/// Writes the flood until `stop`; never reads. Frames and bytes sent.
async fn flood(
    mut s: UnixStream,
    session: String,
    stop: Arc<AtomicBool>,
) -> (usize, usize, UnixStream) {
    let jpeg = "A".repeat(airlock_proto::stream::MAX_JPEG_BYTES / 3 * 4);
    let (mut frames, mut bytes) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let Ok(buf) = encode(&flood_event(&session, frames, &jpeg)) else {
            break;
        };
        // A write the host does not take within a second is the host
        // pushing back, which is what it should do.
        match tokio::time::timeout(Duration::from_secs(1), s.write_all(&buf)).await {
            Ok(Ok(())) => {
                frames += 1;
                bytes += buf.len();
            }
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    (frames, bytes, s)
}

/// True while `pid` runs (a zombie has ended).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

fn command(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// Times of `n` `GET /health` (ms), each one's answer checked.
async fn health_times(d: &Daemon, n: usize) -> Result<Vec<u128>> {
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let (status, _) = d.request(Method::GET, "/health", None).await?;
        ensure!(status == 200, "/health: {status}");
        times.push(t.elapsed().as_millis());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    times.sort_unstable();
    Ok(times)
}

/// The hostile session, at its sign-in page, and its browser VM and
/// that VM's agent (a host process).
async fn victim(d: &Daemon) -> Result<(String, String, i32)> {
    let id = d.start_session(HOSTILE, FAKE).await?;
    let v = d
        .wait_session(&id, WITHIN, |v| {
            state_is(v, "awaiting_user") || v["state"] == "failed"
        })
        .await?;
    ensure!(state_is(&v, "awaiting_user"), "{}", v["error"]);
    let vm = v["browserVmId"]
        .as_str()
        .context("browserVmId")?
        .to_string();
    let (_, view) = d
        .request(Method::GET, &format!("/api/vms/{vm}"), None)
        .await?;
    let pid = view["vmmPid"].as_i64().context("vmmPid")? as i32;
    Ok((id, vm, pid))
}

/// A login of another user, from start to `completed`.
async fn bystander_login(d: &Daemon) -> Result<Value> {
    let id = d.start_session(BYSTANDER, FAKE).await?;
    let v = d
        .wait_session(&id, WITHIN, |v| {
            state_is(v, "awaiting_user") || v["state"] == "failed"
        })
        .await?;
    ensure!(state_is(&v, "awaiting_user"), "bystander: {}", v["error"]);
    d.sign_in_and(&id, true).await?;
    d.wait_session(&id, WITHIN, |v| {
        v["state"] == "completed" || v["state"] == "failed"
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_guest_hurts_neither_the_host_nor_another_session() -> Result<()> {
    with_rig(|s| s, async |rig| {
        let d = &rig.daemon;
        let (session, vm, agent) = victim(d).await?;
        let before = health_times(d, 10).await?;
        // The agent and what it started (Chromium, the login CLI): all
        // must be gone after the teardown, though the agent cannot help.
        let tree = airlock_host::vm::proctree::tree(agent);
        ensure!(tree.len() > 2, "the agent started nothing? {tree:?}");
        kill(Pid::from_raw(agent), Signal::SIGSTOP)?;
        let guest = take_over(d, &vm).await?;
        let rss_before = rss_kib(d.pid())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flooding = tokio::spawn(flood(guest, session.clone(), stop.clone()));

        let done = bystander_login(d).await?;
        ensure!(done["state"] == "completed", "the bystander's login: {}", done["error"]);
        let during = health_times(d, 20).await?;
        let t = Instant::now();
        let exec = d
            .request(
                Method::POST,
                &format!("/api/vms/{vm}/exec"),
                Some(json!({ "argv": ["true"], "timeoutMs": 2000 })),
            )
            .await?;
        let exec_ms = t.elapsed().as_millis();
        ensure!(exec.0 != 200, "an exec in the hostile VM succeeded: {}", exec.1);
        ensure!(exec_ms < 30_000, "the exec took {exec_ms} ms to fail");

        stop.store(true, Ordering::Relaxed);
        let (frames, bytes, mut guest) = flooding.await?;
        let rss_after = rss_kib(d.pid())?;

        // An event over its bound: the host drops the connection.
        let invalid = GuestMessage::Event(Event::Login(LoginEvent {
            session_id: session.clone(),
            step: LoginStep::PageLoaded {
                location: "y".repeat(100_000),
            },
        }));
        let _ = guest.write_all(&encode(&invalid)?).await;
        fake_guest::expect_closed(&mut guest, Duration::from_secs(10))
            .await
            .context("the connection with an invalid event stayed open")?;

        // Halfway through a credential, gone.
        let mut guest = take_over(d, &vm).await?;
        let credential = GuestMessage::Event(Event::Credential(CapturedCredential {
            session_id: session.clone(),
            files: vec![CapturedFile {
                index: 0,
                mode: 0o600,
                contents: SecretBytes::new(b"{\"access_token\":\"half\"}".to_vec()),
            }],
        }));
        let whole = encode(&credential)?;
        let partial = &whole[..whole.len() / 2];
        guest.write_all(partial).await?;
        drop(guest);

        let (_, v) = d
            .request(Method::GET, &format!("/api/auth/session/{session}"), None)
            .await?;
        let steps = v["steps"].as_array().map_or(0, Vec::len);
        let worst = *during.last().context("times")?;
        println!(
            "hostile guest: {frames} frames, {} MiB sent; /health median {} ms, worst {} ms before; \
             median {} ms, worst {worst} ms during; exec failed after {exec_ms} ms; \
             airlockd RSS {} -> {} MiB; session history {steps} steps, {} omitted",
            bytes >> 20,
            before[before.len() / 2],
            before[before.len() - 1],
            during[during.len() / 2],
            rss_before >> 10,
            rss_after >> 10,
            v["stepsOmitted"],
        );
        ensure!(frames > 100, "the flood sent only {frames} frames");
        ensure!(worst < 1000, "/health took {worst} ms during the flood");
        ensure!(steps <= 128, "the hostile session holds {steps} steps");
        ensure!(
            rss_after.saturating_sub(rss_before) < 150 << 10,
            "airlockd grew from {rss_before} to {rss_after} KiB"
        );

        let t = Instant::now();
        let (status, end) = d
            .request(Method::POST, &format!("/api/auth/session/{session}/cancel"), None)
            .await?;
        ensure!(status == 200 || status == 409, "cancel: {status} {end}");
        let gone = d.wait_state(&vm, "stopped,failed", Duration::from_secs(60)).await;
        let listed = d.request(Method::GET, &format!("/api/vms/{vm}"), None).await?;
        ensure!(
            gone.is_ok() || listed.0 == 404,
            "the hostile VM was not torn down: {}",
            listed.1
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        for pid in &tree {
            while alive(*pid) {
                ensure!(
                    Instant::now() < deadline,
                    "{pid} ({}) of the hostile VM outlived it",
                    command(*pid)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        println!("hostile guest: torn down in {} ms", t.elapsed().as_millis());
        Ok(())
    })
    .await
}
