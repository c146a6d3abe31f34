//! VMs that outlive airlockd. Each running VM's directory holds a record
//! (`vm.json`) of what a later airlockd needs to take it over: what it is,
//! whose it is, its egress policy, and its processes by pid and start time
//! (so a recycled pid is never mistaken for the VM's). At startup the
//! daemon reads the records ([`scan`]); the VM manager re-adopts each VM
//! whose processes all still run, and its supervisor watches them through
//! pidfds ([`Adopted`]), since they are not its children. Written by the
//! supervisor when a VM starts and whenever its owner or policy changes.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use super::layout::VmDir;
use super::restore::Origin;
use super::VmKind;
use crate::egress::policy::EgressPolicy;

/// The record's file name in a VM's directory.
pub const RECORD_FILE: &str = "vm.json";
/// A record is small; anything larger is not one of ours.
const MAX_RECORD_BYTES: u64 = 256 << 10;

/// Taking over a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The record cannot be read or parsed.
    #[error("its record {path} is unreadable: {why}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// One of its processes is gone (or its pid now names another one).
    #[error("its {name} (pid {pid}) is no longer running")]
    Gone {
        /// The process's role.
        name: String,
        /// Its recorded pid.
        pid: u32,
    },
    /// The kernel refused a pidfd.
    #[error("cannot watch its {name} (pid {pid}): {source}")]
    Pidfd {
        /// The process's role.
        name: String,
        /// Its pid.
        pid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One process of a VM as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    /// Its role (`qemu`, `vhost-device-vsock`, `agent`).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat`).
    pub start_time: u64,
}

/// What a later airlockd needs to take a running VM over.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    /// The VM's id (also its directory's name).
    pub id: String,
    /// What it is for.
    pub kind: VmKind,
    /// How it started.
    pub origin: Origin,
    /// Still waiting in the warm pool (such a VM is not taken over).
    pub pooled: bool,
    /// The user it belongs to.
    pub owner: Option<String>,
    /// Memory (MiB).
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// `kvm` or `tcg`.
    pub accel: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// What it booted, for messages.
    pub image: String,
    /// The vsock port its agent dials.
    pub agent_port: u32,
    /// Its egress policy, when its traffic leaves through the gateway.
    pub egress: Option<EgressPolicy>,
    /// Its processes, the VMM first.
    pub processes: Vec<ProcessRecord>,
}

impl VmRecord {
    /// Writes the record into `dir` atomically (a crash leaves the old
    /// one or the new one, never half of one).
    pub fn write(&self, dir: &VmDir) -> std::io::Result<()> {
        let tmp = dir.file(".vm.json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        fs::write(&tmp, text)?;
        fs::rename(&tmp, dir.file(RECORD_FILE))
    }

    /// Reads the record in `dir`; `Ok(None)` when there is none (a VM
    /// that had not finished starting).
    pub fn read(dir: &Path) -> Result<Option<Self>, AdoptError> {
        let path = dir.join(RECORD_FILE);
        let bad = |why: String| AdoptError::Record {
            path: path.clone(),
            why,
        };
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        if meta.len() > MAX_RECORD_BYTES {
            return Err(bad(format!("{} bytes", meta.len())));
        }
        let text = fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let record: Self = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let named = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        if named.as_deref() != Some(record.id.as_str()) || record.processes.is_empty() {
            return Err(bad("it names another VM, or no process".into()));
        }
        Ok(Some(record))
    }
}

/// The state letter and start time (clock ticks since boot) of process
/// `pid`, if it exists.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start at the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 22 overall is the 19th after the state.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The start time of process `pid` (clock ticks since boot), if it runs.
pub fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// A record of `pid` as it runs now.
pub fn record_of(name: &str, pid: u32) -> Option<ProcessRecord> {
    Some(ProcessRecord {
        name: name.into(),
        pid,
        start_time: start_time(pid)?,
    })
}

/// The static role name of a recorded process, for messages.
fn role(name: &str) -> &'static str {
    match name {
        "qemu" => "qemu",
        "vhost-device-vsock" => "vhost-device-vsock",
        "agent" => "agent",
        "firecracker" => "firecracker",
        _ => "process",
    }
}

/// A process of a VM that an earlier airlockd started: not a child of
/// this one, so it is watched through a pidfd, which also makes signals
/// reach exactly it even after its pid is reused.
#[derive(Debug)]
pub struct Adopted {
    /// Its role, for messages.
    pub name: &'static str,
    pid: u32,
    start_time: u64,
    fd: AsyncFd<OwnedFd>,
    exited: bool,
}

/// Registers a pidfd with tokio's reactor.
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the
    // descriptor stays open and names the same pidfd for as long as it is
    // registered, which is what registration requires.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

impl Adopted {
    /// Watches the recorded process, if it is still the one recorded.
    pub fn open(rec: &ProcessRecord) -> Result<Self, AdoptError> {
        let gone = || AdoptError::Gone {
            name: rec.name.clone(),
            pid: rec.pid,
        };
        let failed = |source| AdoptError::Pidfd {
            name: rec.name.clone(),
            pid: rec.pid,
            source,
        };
        let pid = i32::try_from(rec.pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(gone)?;
        let fd = match pidfd_open(pid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Err(gone()),
            Err(e) => return Err(failed(e.into())),
        };
        // Checked after the pidfd exists: had the pid been reused before,
        // the start time differs; after, the pidfd still names ours.
        if start_time(rec.pid) != Some(rec.start_time) {
            return Err(gone());
        }
        let fd = register(fd).map_err(failed)?;
        let mut adopted = Self {
            name: role(&rec.name),
            pid: rec.pid,
            start_time: rec.start_time,
            fd,
            exited: false,
        };
        match adopted.has_exited() {
            true => Err(gone()),
            false => Ok(adopted),
        }
    }

    /// Its pid while it runs.
    pub fn id(&self) -> Option<u32> {
        (!self.exited).then_some(self.pid)
    }

    /// Waits until it exits. Cancel-safe.
    pub async fn wait(&mut self) {
        if self.exited {
            return;
        }
        // A pidfd turns readable once the process has exited.
        if let Ok(mut guard) = self.fd.readable().await {
            guard.retain_ready();
        }
        self.exited = true;
    }

    /// True once it has exited (checked without waiting): it is a
    /// zombie, or its pid is gone or names a newer process.
    pub fn has_exited(&mut self) -> bool {
        if !self.exited {
            self.exited = match proc_stat(self.pid) {
                Some((state, start)) => state == 'Z' || start != self.start_time,
                None => true,
            };
        }
        self.exited
    }

    /// Asks it to stop (SIGTERM), through its pidfd: only it is signalled.
    pub fn terminate(&self) {
        self.signal(Signal::TERM);
    }

    /// Kills it (SIGKILL), through its pidfd.
    pub fn kill(&self) {
        self.signal(Signal::KILL);
    }

    fn signal(&self, signal: Signal) {
        if !self.exited {
            // It may have exited meanwhile (ESRCH): nothing to do then.
            let _ = pidfd_send_signal(self.fd.get_ref(), signal);
        }
    }
}

/// What [`scan`] found in one VM directory.
#[derive(Debug)]
pub enum Found {
    /// A VM to take over: its record, and its processes, watched.
    Running(Box<VmRecord>, Vec<Adopted>),
    /// A VM that cannot be taken over, and why; its processes (those
    /// still running) are to be stopped and its directory cleaned.
    Lost {
        /// Its directory.
        dir: VmDir,
        /// Why it cannot be taken over.
        why: String,
    },
}

/// Reads every VM directory under `<run_dir>/vms`.
pub fn scan(run_dir: &Path) -> Vec<Found> {
    let Ok(entries) = fs::read_dir(run_dir.join("vms")) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = VmDir::existing(entry.path());
        let record = match VmRecord::read(dir.root()) {
            Ok(Some(r)) => r,
            Ok(None) => {
                let why = "airlockd stopped before this VM had finished starting".into();
                found.push(Found::Lost { dir, why });
                continue;
            }
            Err(e) => {
                found.push(Found::Lost {
                    dir,
                    why: e.to_string(),
                });
                continue;
            }
        };
        if record.pooled {
            let why = "it waited in the warm pool, which starts afresh".into();
            found.push(Found::Lost { dir, why });
            continue;
        }
        match record
            .processes
            .iter()
            .map(Adopted::open)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(procs) => found.push(Found::Running(Box::new(record), procs)),
            Err(e) => found.push(Found::Lost {
                dir,
                why: format!("{e} after airlockd stopped"),
            }),
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t), "stable");
        assert_eq!(start_time(u32::MAX), None);
    }

    #[tokio::test]
    async fn an_adopted_process_is_watched_signalled_and_its_exit_seen() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let rec = record_of("agent", child.id()).unwrap();
        let mut adopted = Adopted::open(&rec).unwrap();
        assert_eq!(adopted.id(), Some(child.id()));
        assert!(!adopted.has_exited());
        adopted.kill();
        // The child is ours here, so reap it as its parent would.
        child.wait().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), adopted.wait())
            .await
            .expect("exit seen");
        assert!(adopted.has_exited());
        assert_eq!(adopted.id(), None);
    }

    #[test]
    fn a_recycled_pid_is_not_adopted() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let mut rec = record_of("qemu", child.id()).unwrap();
        rec.start_time += 1;
        let e = Adopted::open(&rec).unwrap_err();
        assert!(matches!(e, AdoptError::Gone { .. }), "{e}");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn records_round_trip_and_a_foreign_one_is_refused() {
        let run = tempfile::tempdir().unwrap();
        let dir = VmDir::create(run.path(), "vm-abc").unwrap();
        let record = VmRecord {
            id: "vm-abc".into(),
            kind: VmKind::Cli,
            origin: Origin::Boot,
            pooled: false,
            owner: Some("alice".into()),
            memory_mib: 512,
            vcpus: 1,
            accel: Some("tcg".into()),
            created_at: "2026-12-01T00:00:00Z".into(),
            image: "image x".into(),
            agent_port: 1024,
            egress: Some(EgressPolicy {
                label: "provider codex".into(),
                allow: vec!["*.openai.com:443".parse().unwrap()],
                turn: vec![("turn.example".into(), 3478)],
                user: Some("alice".into()),
            }),
            processes: vec![record_of("qemu", std::process::id()).unwrap()],
        };
        record.write(&dir).unwrap();
        let back = VmRecord::read(dir.root()).unwrap().unwrap();
        assert_eq!(back.owner.as_deref(), Some("alice"));
        assert_eq!(back.processes, record.processes);
        let allow = &back.egress.unwrap().allow[0];
        assert!(allow.matches("auth.openai.com", 443));
        let other = VmDir::create(run.path(), "vm-other").unwrap();
        fs::copy(dir.file(RECORD_FILE), other.file(RECORD_FILE)).unwrap();
        assert!(VmRecord::read(other.root()).is_err());
        let found = scan(run.path());
        assert_eq!(found.len(), 2);
        assert!(found
            .iter()
            .any(|f| matches!(f, Found::Running(r, _) if r.id == "vm-abc")));
    }
}
