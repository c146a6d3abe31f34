//! Per-VM record of what the agent said and what happened on its channel:
//! `agent.log` in the VM's directory (capped), echoed into airlockd's own
//! log at a limited rate, because a guest can produce lines as fast as it
//! likes. Written by the handshake and the client's reader task.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_proto::{LogLevel, LogLine};

use crate::vm::console::sanitize;

#[derive(Debug)]
struct State {
    file: Option<File>,
    written: u64,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

/// The agent log of one VM.
#[derive(Debug)]
pub struct GuestLog {
    vm_id: String,
    max_bytes: u64,
    rate_per_sec: u32,
    state: Mutex<State>,
}

impl GuestLog {
    /// Creates `path`; at most `max_bytes` are written to it, and at most
    /// `rate_per_sec` lines a second are echoed to airlockd's log.
    pub fn create(
        path: &Path,
        vm_id: &str,
        max_bytes: u64,
        rate_per_sec: u32,
    ) -> std::io::Result<Self> {
        Ok(Self {
            vm_id: vm_id.to_string(),
            max_bytes,
            rate_per_sec,
            state: Mutex::new(State {
                file: Some(File::create(path)?),
                written: 0,
                window_start: Instant::now(),
                in_window: 0,
                suppressed: 0,
            }),
        })
    }

    /// Records a log line the agent forwarded.
    pub fn line(&self, l: &LogLine) {
        let text = format!(
            "[{:>10.3}] {:?} {}: {}",
            l.uptime_ms as f64 / 1000.0,
            l.level,
            sanitize(l.target.as_bytes()),
            sanitize(l.message.as_bytes())
        );
        if self.record(&text) {
            match l.level {
                LogLevel::Error => tracing::error!(vm_id = %self.vm_id, guest = %text, "guest log"),
                LogLevel::Warn => tracing::warn!(vm_id = %self.vm_id, guest = %text, "guest log"),
                _ => tracing::debug!(vm_id = %self.vm_id, guest = %text, "guest log"),
            }
        }
    }

    /// Records something the host observed on the channel (a dropped
    /// connection, a refusal), echoed as a warning within the rate limit.
    pub fn note(&self, text: &str) {
        if self.record(&format!("[host] {text}")) {
            tracing::warn!(vm_id = %self.vm_id, "{text}");
        }
    }

    /// Writes the line to the file (within the cap) and says whether the
    /// rate limit allows echoing it.
    fn record(&self, text: &str) -> bool {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = text.len() as u64 + 1;
        if st.written + bytes <= self.max_bytes {
            if let Some(f) = st.file.as_mut() {
                if writeln!(f, "{text}").is_err() {
                    st.file = None;
                }
            }
            st.written += bytes;
        }
        if st.window_start.elapsed() >= Duration::from_secs(1) {
            if st.suppressed > 0 {
                tracing::warn!(vm_id = %self.vm_id, suppressed = st.suppressed, "guest-triggered log lines suppressed by the rate limit (all are in agent.log)");
            }
            st.window_start = Instant::now();
            st.in_window = 0;
            st.suppressed = 0;
        }
        if st.in_window < self.rate_per_sec {
            st.in_window += 1;
            true
        } else {
            st.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_file_and_rate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let log = GuestLog::create(&path, "vm-1", 100, 3).unwrap();
        let echoed = (0..50).filter(|i| log.record(&format!("line {i}"))).count();
        assert_eq!(echoed, 3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 100 && text.starts_with("line 0\n"), "{text}");
    }
}
