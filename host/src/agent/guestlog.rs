//! Per-VM record of what the agent said and what happened on its channel:
//! `agent.log` in the VM's directory (capped), echoed into airlockd's own
//! log at a limited rate, because a guest can produce lines as fast as it
//! likes. The error output of the browser's programs arrives the same way
//! and is kept apart, never echoed: `xvfb.log`, `chromium.log`,
//! `streamer.log` (each capped). Written by the handshake and the client's
//! reader task.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use airlock_proto::{LogLevel, LogLine, OUTPUT_PROGRAMS, OUTPUT_TARGET_PREFIX};

use crate::vm::console::sanitize;

#[derive(Debug)]
struct State {
    file: Option<File>,
    written: u64,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

/// One program's output log.
#[derive(Debug)]
struct Output {
    file: Option<File>,
    written: u64,
}

/// The agent log of one VM.
#[derive(Debug)]
pub struct GuestLog {
    vm_id: String,
    dir: PathBuf,
    max_bytes: u64,
    rate_per_sec: u32,
    outputs: Mutex<Vec<(&'static str, Output)>>,
    state: Mutex<State>,
}

impl GuestLog {
    /// Creates `path` (with `append`, continues the log a VM taken over
    /// from an earlier airlockd has, counted against the cap); at most
    /// `max_bytes` are written to it, and at most `rate_per_sec` lines a
    /// second are echoed to airlockd's log.
    pub fn open(
        path: &Path,
        vm_id: &str,
        max_bytes: u64,
        rate_per_sec: u32,
        append: bool,
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            vm_id: vm_id.to_string(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            max_bytes,
            rate_per_sec,
            outputs: Mutex::default(),
            state: Mutex::new(State {
                file: Some(file),
                written,
                window_start: Instant::now(),
                in_window: 0,
                suppressed: 0,
            }),
        })
    }

    /// Records a log line the agent forwarded.
    pub fn line(&self, l: &LogLine) {
        if let Some(program) = l
            .target
            .strip_prefix(OUTPUT_TARGET_PREFIX)
            .and_then(|p| OUTPUT_PROGRAMS.iter().find(|known| **known == p))
        {
            return self.output(program, l);
        }
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

    /// Appends a line of `program`'s output to its own capped file.
    fn output(&self, program: &'static str, l: &LogLine) {
        let mut outputs = self.outputs.lock().unwrap_or_else(PoisonError::into_inner);
        let at = match outputs.iter().position(|(p, _)| *p == program) {
            Some(i) => i,
            None => {
                let file = File::create(self.dir.join(format!("{program}.log"))).ok();
                outputs.push((program, Output { file, written: 0 }));
                outputs.len() - 1
            }
        };
        let out = &mut outputs[at].1;
        let text = format!(
            "[{:>10.3}] {}",
            l.uptime_ms as f64 / 1000.0,
            sanitize(l.message.as_bytes())
        );
        let bytes = text.len() as u64 + 1;
        if out.written + bytes > self.max_bytes {
            return;
        }
        out.written += bytes;
        if let Some(f) = out.file.as_mut() {
            if writeln!(f, "{text}").is_err() {
                out.file = None;
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
        let log = GuestLog::open(&path, "vm-1", 100, 3, false).unwrap();
        let echoed = (0..50).filter(|i| log.record(&format!("line {i}"))).count();
        assert_eq!(echoed, 3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 100 && text.starts_with("line 0\n"), "{text}");
    }

    #[test]
    fn program_output_goes_to_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = GuestLog::open(&dir.path().join("agent.log"), "vm-1", 1000, 3, false).unwrap();
        let line = |target: &str, message: &str| LogLine {
            level: LogLevel::Info,
            uptime_ms: 1500,
            target: target.into(),
            message: message.into(),
        };
        log.line(&line(
            "airlock_guest::output::chromium",
            "GPU process exited",
        ));
        log.line(&line("airlock_guest::output::evil/../x", "nope"));
        let chromium = std::fs::read_to_string(dir.path().join("chromium.log")).unwrap();
        assert_eq!(chromium, "[     1.500] GPU process exited\n");
        let agent = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
        assert!(agent.contains("nope") && !agent.contains("GPU"), "{agent}");
    }
}
