//! Chooses KVM or TCG for the QEMU backend by trying, not assuming.
//!
//! `/dev/kvm` existing proves nothing: on some hosts (nested under another
//! hypervisor) QEMU aborts setting MSRs or the guest hangs right after the
//! kernel decompressor. So `auto` boots the real kernel and initramfs under
//! KVM with `airlock.probe=1`, where the agent prints a marker and powers
//! off at once, and uses KVM only when that marker arrives in time. The
//! verdict is cached in `<state_dir>/accel-probe.json`, keyed by everything
//! it depends on. Called once per daemon by [`super::qemu::QemuBackend`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use airlock_proto::PROBE_MARKER;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::config::{AccelChoice, QemuConfig};

/// Acceleration QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The choice and why it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    /// The choice.
    pub accel: Accel,
    /// Why, for `/health` and the log.
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    key: String,
    decision: AccelDecision,
}

/// Inputs of the probe boot.
#[derive(Debug)]
pub struct ProbeInputs<'a> {
    /// QEMU settings (binary, machine, cpu, firmware, choice, deadline).
    pub qemu: &'a QemuConfig,
    /// Guest kernel.
    pub kernel: &'a Path,
    /// Initramfs with the agent.
    pub initramfs: &'a Path,
    /// Where the verdict is cached.
    pub cache_file: PathBuf,
}

/// Decides, probing when the config says `auto`.
pub async fn decide(inputs: &ProbeInputs<'_>) -> AccelDecision {
    let configured = |accel| AccelDecision {
        accel,
        reason: "set in the config (qemu.accel)".into(),
    };
    match inputs.qemu.accel {
        AccelChoice::Kvm => return configured(Accel::Kvm),
        AccelChoice::Tcg => return configured(Accel::Tcg),
        AccelChoice::Auto => {}
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return AccelDecision {
            accel: Accel::Tcg,
            reason: format!("/dev/kvm is not usable: {e}"),
        };
    }
    let key = cache_key(inputs);
    if let Some(d) = read_cache(&inputs.cache_file, &key) {
        return d;
    }
    let decision = probe(inputs).await;
    let cached = Cached {
        key,
        decision: decision.clone(),
    };
    if let Ok(text) = serde_json::to_string_pretty(&cached) {
        let _ = std::fs::write(&inputs.cache_file, text);
    }
    decision
}

/// Everything the verdict depends on: host kernel, QEMU, guest kernel, CPU
/// model and machine.
fn cache_key(inputs: &ProbeInputs<'_>) -> String {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| format!("{}:{}:{:?}", p.display(), m.len(), m.modified().ok()))
            .unwrap_or_else(|_| format!("{}:missing", p.display()))
    };
    let host = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let q = inputs.qemu;
    format!(
        "host={host}|qemu={}|kernel={}|cpu={}|machine={}",
        q.binary.display(),
        stamp(inputs.kernel),
        q.cpu,
        q.machine
    )
}

fn read_cache(path: &Path, key: &str) -> Option<AccelDecision> {
    let cached: Cached = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    (cached.key == key).then_some(cached.decision)
}

async fn probe(inputs: &ProbeInputs<'_>) -> AccelDecision {
    let q = inputs.qemu;
    let deadline = Duration::from_millis(q.accel_probe_timeout_ms);
    let mut cmd = Command::new(&q.binary);
    cmd.args([
        "-M", &q.machine, "-accel", "kvm", "-cpu", &q.cpu, "-m", "128", "-smp", "1",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
    ])
    .args(["-serial", "stdio"]);
    if let Some(fw) = &q.firmware {
        cmd.arg("-bios").arg(fw);
    }
    cmd.arg("-kernel")
        .arg(inputs.kernel)
        .arg("-initrd")
        .arg(inputs.initramfs);
    cmd.args(["-append", "console=ttyS0 panic=-1 quiet airlock.probe=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return tcg(format!(
                "cannot start {} for the KVM probe: {e}",
                q.binary.display()
            ))
        }
    };
    let stdout = child.stdout.take();
    let found = tokio::time::timeout(deadline, async move {
        let Some(out) = stdout else { return false };
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(PROBE_MARKER) {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.start_kill();
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), err.read_to_string(&mut stderr)).await;
    }
    let _ = child.wait().await;
    let why = stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("no error output")
        .to_string();
    match found {
        Ok(true) => AccelDecision {
            accel: Accel::Kvm,
            reason: format!(
                "a probe VM reached /init under KVM in {} ms",
                started.elapsed().as_millis()
            ),
        },
        Ok(false) => tcg(format!(
            "the KVM probe VM exited without reaching /init ({why})"
        )),
        Err(_) => tcg(format!(
            "the KVM probe VM did not reach /init within {deadline:?} (KVM hangs on this host)"
        )),
    }
}

fn tcg(reason: String) -> AccelDecision {
    AccelDecision {
        accel: Accel::Tcg,
        reason: format!("using TCG: {reason}"),
    }
}
