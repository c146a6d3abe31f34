//! What makes a browser VM restored from a snapshot its own copy: the
//! host's fresh entropy credited to the kernel's pool followed by an
//! immediate reseed of its generator, the wall clock stepped to the
//! host's, and Chromium's network service restarted, since it holds a
//! userspace random generator seeded before the snapshot (BoringSSL mixes
//! nothing new into it per call when the CPU has no fast RDRAND, so every
//! copy would send the same TLS randoms and key shares). Performed by
//! [`crate::agent::Agent`] for the host's `refresh` request.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use airlock_proto::restore::{RefreshReport, RefreshSpec};
use nix::sys::signal::{kill, Signal};
use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};
use nix::unistd::Pid;

/// What identifies Chromium's network service among its processes.
const NETWORK_SERVICE: &str = "--utility-sub-type=network.mojom.NetworkService";
/// How long the browser gets to bring its network service back. Generous:
/// a pool VM refreshes at the lowest CPU priority, where the relaunch can
/// take several seconds under TCG, and a VM handed out before its network
/// service is back only moves that wait into the session's first page.
const RESTART_WAIT: Duration = Duration::from_secs(30);

/// A refresh step failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The kernel's random pool could not be reseeded.
    #[error("cannot reseed the kernel's random generator: {0}")]
    Reseed(#[source] std::io::Error),
    /// The clock could not be set.
    #[error("cannot set the clock: {0}")]
    Clock(#[source] nix::Error),
}

/// Makes this restored VM its own; see the module docs.
pub fn refresh(spec: &RefreshSpec) -> Result<RefreshReport, RestoreError> {
    reseed(spec.seed.expose()).map_err(RestoreError::Reseed)?;
    let clock_step_ms = step_clock(spec.unix_time_ms).map_err(RestoreError::Clock)?;
    let restarted = restart_network_service();
    Ok(RefreshReport {
        clock_step_ms,
        restarted,
    })
}

/// `struct rand_pool_info` with its buffer inline.
#[repr(C)]
struct PoolInfo {
    entropy_bits: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; airlock_proto::restore::REFRESH_SEED_BYTES],
}

/// `RNDADDENTROPY` (_IOW('R', 0x03, int[2])) and `RNDRESEEDCRNG` (_IO('R', 0x07)).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits `seed` to the input pool, then makes the generator reseed now
/// rather than at its next scheduled reseed (up to a minute later).
fn reseed(seed: &[u8]) -> std::io::Result<()> {
    let mut info = PoolInfo {
        entropy_bits: (seed.len() * 8) as libc::c_int,
        buf_size: seed.len() as libc::c_int,
        buf: [0; airlock_proto::restore::REFRESH_SEED_BYTES],
    };
    let n = seed.len().min(info.buf.len());
    info.buf[..n].copy_from_slice(&seed[..n]);
    let urandom = File::options().write(true).open("/dev/urandom")?;
    // SAFETY: the fd is open for the call's duration; `info` is a
    // rand_pool_info whose buf_size matches its inline buffer.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, &info) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    info.buf.fill(0);
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Steps CLOCK_REALTIME to the host's time; returns the step (ms).
fn step_clock(host_ms: u64) -> nix::Result<i64> {
    let guest_ms = epoch_ms(clock_gettime(ClockId::CLOCK_REALTIME)?);
    let host = TimeSpec::new((host_ms / 1000) as _, ((host_ms % 1000) * 1_000_000) as _);
    clock_settime(ClockId::CLOCK_REALTIME, host)?;
    Ok(host_ms as i64 - guest_ms)
}

/// Steps CLOCK_REALTIME by `step_ms` (none for zero) from its own
/// reading, so that the step is exact whenever it runs; returns the clock
/// afterwards (ms since the epoch).
pub fn step_clock_by(step_ms: i64) -> Result<i64, RestoreError> {
    let now = clock_gettime(ClockId::CLOCK_REALTIME).map_err(RestoreError::Clock)?;
    if step_ms == 0 {
        return Ok(epoch_ms(now));
    }
    let by = TimeSpec::from(Duration::from_millis(step_ms.unsigned_abs()));
    let stepped = if step_ms > 0 { now + by } else { now - by };
    clock_settime(ClockId::CLOCK_REALTIME, stepped).map_err(RestoreError::Clock)?;
    Ok(epoch_ms(stepped))
}

fn epoch_ms(t: TimeSpec) -> i64 {
    t.tv_sec() * 1000 + t.tv_nsec() / 1_000_000
}

/// Kills Chromium's network service (the browser starts a new one, whose
/// generator seeds from the reseeded kernel) and waits for its successor.
fn restart_network_service() -> Vec<String> {
    let old = network_services(Path::new("/proc"));
    if old.is_empty() {
        return Vec::new();
    }
    for pid in &old {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + RESTART_WAIT;
    while Instant::now() < deadline {
        let now = network_services(Path::new("/proc"));
        if now.iter().any(|p| !old.contains(p)) {
            return vec!["chromium network service".into()];
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!("Chromium did not restart its network service within {RESTART_WAIT:?}");
    vec!["chromium network service (not back yet)".into()]
}

/// True when a command line has the network service's switch as a word.
/// Chromium rewrites its helpers' process titles, so the words may be
/// separated by spaces rather than NULs.
fn names_network_service(cmdline: &[u8]) -> bool {
    cmdline
        .split(|b| *b == 0 || *b == b' ')
        .any(|arg| arg == NETWORK_SERVICE.as_bytes())
}

/// Pids of network service processes under `proc`.
fn network_services(proc: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(proc.join(pid.to_string()).join("cmdline"))
                .is_ok_and(|c| names_network_service(&c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_network_service_processes_by_their_switch() {
        let proc = tempfile::tempdir().unwrap();
        for (pid, cmd) in [
            (10, "chromium\0--type=utility\0--utility-sub-type=network.mojom.NetworkService\0"),
            (11, "chromium\0--type=renderer\0"),
            (12, "sh\0-c\0echo --utility-sub-type=network.mojom.NetworkService.x\0"),
            (13, "/usr/lib/chromium/chromium --type=utility --utility-sub-type=network.mojom.NetworkService --lang=en-US"),
        ] {
            let dir = proc.path().join(pid.to_string());
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("cmdline"), cmd).unwrap();
        }
        std::fs::create_dir(proc.path().join("self")).unwrap();
        let mut found = network_services(proc.path());
        found.sort();
        assert_eq!(found, vec![10, 13]);
    }

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        // _IOW('R', 0x03, int[2]): dir write (1) << 30 | size 8 << 16 | 'R' << 8 | 3.
        assert_eq!(
            RNDADDENTROPY,
            (1 << 30) | (8 << 16) | ((b'R' as u64) << 8) | 3
        );
        assert_eq!(RNDRESEEDCRNG, ((b'R' as u64) << 8) | 7);
    }
}
