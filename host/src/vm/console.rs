//! Capture of a VM's serial console: every byte goes to `console.log` (up to
//! a cap), the last 64 KiB stay in memory for error messages, the moment
//! the agent's init marker appears is timestamped on the host clock, and
//! the kernel's out-of-memory kills are noticed (so a VM given too little
//! memory fails with that reason, not with a timeout).
//!
//! Backends feed it: QEMU through a Unix socket airlockd listens on before
//! QEMU starts (so not a byte of early boot is lost; QEMU dials it again
//! when a later airlockd takes the VM over), the process backend through a
//! FIFO the agent's stdout and stderr write to (which a later airlockd
//! opens again). The console is guest-controlled
//! text, so the tail handed out is stripped of escape sequences.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use airlock_proto::INIT_MARKER;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bytes of console kept in memory for error messages.
const TAIL_BYTES: usize = 64 << 10;
/// Longest line scanned for the init marker.
const LINE_BYTES: usize = 4096;

#[derive(Debug)]
struct Sink {
    file: Option<File>,
    written: u64,
    max: u64,
    dropped: u64,
    tail: Vec<u8>,
    line: Vec<u8>,
}

/// Handle on a VM's console capture; cheap to clone.
#[derive(Debug, Clone)]
pub struct Console {
    sink: Arc<Mutex<Sink>>,
    init_at: watch::Receiver<Option<Instant>>,
    init_tx: Arc<watch::Sender<Option<Instant>>>,
    oom: Arc<watch::Sender<Option<String>>>,
}

/// What the kernel prints when it kills a process for memory.
const OOM_MARKER: &[u8] = b"Out of memory: Killed process";

/// `Out of memory: Killed process 812 (chromium) total-vm:...` -> `chromium`.
fn oom_victim(line: &[u8]) -> String {
    let text = sanitize(line);
    text.split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(name, _)| name.chars().take(64).collect())
        .unwrap_or_else(|| "a process".into())
}

impl Console {
    /// Creates `log_path` and a capture that writes at most `max_bytes` to it.
    pub fn create(log_path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        Ok(Self::over(File::create(log_path)?, 0, max_bytes))
    }

    /// A capture appending to the existing `log_path` of a VM taken over
    /// from an earlier airlockd (what it wrote counts against the cap).
    pub fn append(log_path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log_path)?;
        let written = file.metadata()?.len();
        Ok(Self::over(file, written, max_bytes))
    }

    fn over(file: File, written: u64, max_bytes: u64) -> Self {
        let (init_tx, init_at) = watch::channel(None);
        Self {
            sink: Arc::new(Mutex::new(Sink {
                file: Some(file),
                written,
                max: max_bytes,
                dropped: 0,
                tail: Vec::with_capacity(TAIL_BYTES),
                line: Vec::new(),
            })),
            init_at,
            init_tx: Arc::new(init_tx),
            oom: Arc::new(watch::channel(None).0),
        }
    }

    /// The first process the guest's kernel killed for lack of memory.
    pub fn oom(&self) -> watch::Receiver<Option<String>> {
        self.oom.subscribe()
    }

    /// Feeds console bytes.
    pub fn feed(&self, data: &[u8]) {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        let room = sink.max.saturating_sub(sink.written) as usize;
        let keep = room.min(data.len());
        if let Some(f) = sink.file.as_mut() {
            if f.write_all(&data[..keep]).is_err() {
                sink.file = None;
            }
        }
        sink.written += keep as u64;
        sink.dropped += (data.len() - keep) as u64;
        sink.tail.extend_from_slice(data);
        if sink.tail.len() > TAIL_BYTES {
            let cut = sink.tail.len() - TAIL_BYTES;
            sink.tail.drain(..cut);
        }
        for &b in data {
            if b == b'\n' {
                if self.init_tx.borrow().is_none() && contains(&sink.line, INIT_MARKER.as_bytes()) {
                    let _ = self.init_tx.send(Some(Instant::now()));
                }
                if self.oom.borrow().is_none() && contains(&sink.line, OOM_MARKER) {
                    self.oom.send_replace(Some(oom_victim(&sink.line)));
                }
                sink.line.clear();
            } else if sink.line.len() < LINE_BYTES {
                sink.line.push(b);
            }
        }
    }

    /// Host time at which the agent's init marker appeared.
    pub fn init_at(&self) -> Option<Instant> {
        *self.init_at.borrow()
    }

    /// The last `n` lines, decoded lossily and without control sequences.
    pub fn tail_lines(&self, n: usize) -> String {
        let sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        let text = sanitize(&sink.tail);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let start = lines.len().saturating_sub(n);
        let mut out = lines[start..].join("\n");
        if sink.dropped > 0 {
            out.push_str(&format!(
                "\n[{} console bytes beyond the log cap were not written to disk]",
                sink.dropped
            ));
        }
        out
    }

    /// Reads `reader` to its end (or `cancel`) into this console.
    pub async fn pump<R: AsyncRead + Unpin>(&self, mut reader: R, cancel: &CancellationToken) {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = tokio::select! {
                _ = cancel.cancelled() => return,
                r = reader.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
            };
            self.feed(&buf[..n]);
        }
    }

    /// Accepts QEMU's one connection on `listener` and pumps it, on
    /// `tracker`, until it closes or `cancel` fires.
    pub fn serve(&self, listener: UnixListener, tracker: &TaskTracker, cancel: CancellationToken) {
        let console = self.clone();
        tracker.spawn(async move {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "console socket accept failed");
                        return;
                    }
                },
            };
            // One peer only: QEMU. Nobody else may attach later.
            drop(listener);
            console.pump(stream, &cancel).await;
        });
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Lossy UTF-8 without ANSI/VT escape sequences or control characters
/// (other than newline and tab).
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: drop ESC + 1.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\n' | '\t' => out.push(c),
            '\r' => {}
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_is_sanitised_and_capped_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let c = Console::create(&path, 10).unwrap();
        c.feed(b"\x1b[?7l\x1b[2Jhello\r\nworld\x07\n");
        assert_eq!(std::fs::read(&path).unwrap().len(), 10);
        let tail = c.tail_lines(5);
        assert!(tail.starts_with("hello\nworld"), "{tail:?}");
        assert!(tail.contains("not written to disk"));
    }

    #[test]
    fn init_marker_is_timestamped_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let c = Console::create(&dir.path().join("c.log"), 1 << 20).unwrap();
        let line = format!("noise\n{INIT_MARKER} uptime_ms=5\n");
        let (a, b) = line.as_bytes().split_at(12);
        c.feed(a);
        assert!(c.init_at().is_none());
        c.feed(b);
        assert!(c.init_at().is_some());
        assert!(c.oom().borrow().is_none());
        c.feed(b"[  9.1] Out of memory: Killed process 812 (chromium) total-vm:1kB\n");
        assert_eq!(c.oom().borrow().as_deref(), Some("chromium"));
    }

    #[test]
    fn tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let c = Console::create(&dir.path().join("c.log"), 1 << 20).unwrap();
        for i in 0..100 {
            c.feed(format!("line {i}\n").as_bytes());
        }
        assert_eq!(c.tail_lines(2), "line 98\nline 99");
    }
}
