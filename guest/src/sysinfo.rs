//! Facts about the agent and its machine: uptime, boot id, the agent's own
//! build id, memory and load. Read for the hello, for `status` requests and
//! for timestamps on log lines and heartbeats.

use std::io::Read;

use nix::time::{clock_gettime, ClockId};

/// Kernel uptime in milliseconds (`CLOCK_BOOTTIME`, counts suspend too).
pub fn uptime_ms() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64) * 1000 + (ts.tv_nsec() as u64) / 1_000_000,
        Err(_) => 0,
    }
}

/// The kernel's random boot id, or `unknown` when `/proc` is missing.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The GNU build id of the running executable, or `unknown` when it cannot
/// be read (the host then refuses the agent and says so).
pub fn own_build_id() -> String {
    read_build_id("/proc/self/exe").unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read own build id");
        "unknown".into()
    })
}

fn read_build_id(path: &str) -> Result<String, std::io::Error> {
    let mut file = std::fs::File::open(path)?;
    // The note sits right after the program headers; 64 KiB is plenty, and
    // the whole file is read only when a linker placed it further out.
    let mut head = Vec::with_capacity(64 << 10);
    (&mut file).take(64 << 10).read_to_end(&mut head)?;
    match airlock_proto::elf::gnu_build_id(&head) {
        Ok(id) => Ok(id),
        Err(_) => {
            file.read_to_end(&mut head)?;
            airlock_proto::elf::gnu_build_id(&head)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        }
    }
}

/// A field of a `/proc` file in `Name:   value kB` form, in KiB.
fn proc_kib(path: &str, field: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident set size of this process (KiB).
pub fn own_rss_kib() -> u64 {
    proc_kib("/proc/self/status", "VmRSS")
}

/// `MemTotal` and `MemAvailable` (KiB).
pub fn memory_kib() -> (u64, u64) {
    (
        proc_kib("/proc/meminfo", "MemTotal"),
        proc_kib("/proc/meminfo", "MemAvailable"),
    )
}

/// One-minute load average.
pub fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_live_values() {
        assert!(uptime_ms() > 0);
        assert!(own_rss_kib() > 0);
        let (total, avail) = memory_kib();
        assert!(total >= avail && total > 0);
        assert_ne!(boot_id(), "unknown");
    }
}
