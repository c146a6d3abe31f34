//! The pipe to the agent: [`StreamerCommand`] frames in on stdin,
//! [`StreamerReport`] frames out on stdout (the frame codec of
//! `airlock_proto::frame`).
//!
//! `streamer` starts one reader thread (stdin → [`Inbound`] callbacks) and
//! one writer thread that alone owns the protocol's stdout. Everything else,
//! GStreamer's threads included, reports through a cloned [`Reporter`].

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::{self, JoinHandle};

use airlock_proto::frame::{self, FrameDecoder, FrameError};
use airlock_proto::limits::MAX_FRAME_BYTES;
use airlock_proto::stream::{Signal, StreamerCommand, StreamerReport, ViewerSignal};

/// Reports waiting for stdout. Lossy reports (JPEG, stats) are dropped when
/// it is full, so a slow agent never stalls the media threads.
const QUEUE_LEN: usize = 256;

/// Why the pipe broke.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// stdin could not be read.
    #[error("reading stdin: {0}")]
    Read(#[source] std::io::Error),
    /// A frame header was bad, so the stream is out of sync.
    #[error("bad frame on stdin: {0}")]
    Frame(#[from] FrameError),
    /// The protocol's stdout could not be set up.
    #[error("setting up stdout: {0}")]
    Stdout(String),
}

/// What the reader thread hands over.
#[derive(Debug)]
pub enum Inbound {
    /// One command.
    Command(StreamerCommand),
    /// stdin reached end of file: the agent wants us gone.
    Closed,
    /// stdin is unusable.
    Broken(PipeError),
}

enum Outgoing {
    Report(StreamerReport),
    Close,
}

/// A cheap, thread-safe handle that queues reports for stdout.
#[derive(Clone)]
pub struct Reporter {
    tx: SyncSender<Outgoing>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporter")
    }
}

impl Reporter {
    /// Queues a report that must not be lost (signals, input); waits while
    /// the queue is full.
    pub fn send(&self, report: StreamerReport) {
        // An error means the writer is gone (stdout closed): nobody listens.
        let _ = self.tx.send(Outgoing::Report(report));
    }

    /// Queues a report that may be dropped when the agent is behind.
    pub fn send_lossy(&self, report: StreamerReport) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Outgoing::Report(report)) {
            tracing::debug!("report queue full, dropped a frame or stats report");
        }
    }

    /// Queues a signal for one viewer.
    pub fn signal(&self, viewer_id: &str, signal: Signal) {
        self.send(StreamerReport::Viewer(ViewerSignal {
            viewer_id: viewer_id.to_owned(),
            signal,
        }));
    }

    /// Queues an error signal for one viewer.
    pub fn viewer_error(&self, viewer_id: &str, message: impl Into<String>) {
        let mut message: String = message.into();
        let max = airlock_proto::stream::MAX_SIGNAL_MESSAGE_BYTES;
        if message.len() > max {
            let cut = (0..=max).rev().find(|&i| message.is_char_boundary(i));
            message.truncate(cut.unwrap_or(0));
        }
        self.signal(viewer_id, Signal::Error { message });
    }
}

/// The writer thread; [`Writer::finish`] flushes what is queued and joins it.
#[derive(Debug)]
pub struct Writer {
    reporter: Reporter,
    thread: JoinHandle<()>,
}

impl Writer {
    /// Takes over stdout for frames and points fd 1 at stderr, so a stray
    /// print from a library can never corrupt the protocol.
    pub fn start() -> Result<Self, PipeError> {
        let stdout = std::io::stdout();
        let owned = stdout
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| PipeError::Stdout(e.to_string()))?;
        nix::unistd::dup2_stdout(std::io::stderr())
            .map_err(|e| PipeError::Stdout(e.to_string()))?;
        Ok(Self::with_output(File::from(owned)))
    }

    /// A writer onto any byte sink (tests).
    pub fn with_output<W: Write + Send + 'static>(out: W) -> Self {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LEN);
        let thread = thread::Builder::new()
            .name("stdout".into())
            .spawn(move || write_loop(rx, out))
            .expect("spawning the stdout thread");
        Self {
            reporter: Reporter { tx },
            thread,
        }
    }

    /// A handle for queueing reports.
    pub fn reporter(&self) -> Reporter {
        self.reporter.clone()
    }

    /// Writes everything queued so far, then stops the thread.
    pub fn finish(self) {
        let _ = self.reporter.tx.send(Outgoing::Close);
        let _ = self.thread.join();
    }
}

fn write_loop<W: Write>(rx: Receiver<Outgoing>, mut out: W) {
    while let Ok(Outgoing::Report(report)) = rx.recv() {
        let bytes = match frame::encode(&report, MAX_FRAME_BYTES) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a report");
                continue;
            }
        };
        if let Err(e) = out.write_all(&bytes).and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "stdout closed, reports stop");
            break;
        }
    }
}

/// Starts the thread that reads commands from `input` until end of file or
/// a broken frame; `deliver` returns false once nobody listens any more.
pub fn spawn_reader<R, F>(input: R, deliver: F) -> JoinHandle<()>
where
    R: Read + Send + 'static,
    F: Fn(Inbound) -> bool + Send + 'static,
{
    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let last = match read_loop(input, &deliver) {
                Ok(()) => Inbound::Closed,
                Err(e) => Inbound::Broken(e),
            };
            deliver(last);
        })
        .expect("spawning the stdin thread")
}

fn read_loop<R: Read>(mut input: R, deliver: &impl Fn(Inbound) -> bool) -> Result<(), PipeError> {
    let mut decoder = FrameDecoder::new(MAX_FRAME_BYTES);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let want = decoder.wants().min(buf.len());
        let n = match input.read(&mut buf[..want]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(PipeError::Read(e)),
        };
        decoder.push(&buf[..n]);
        while let Some(payload) = decoder.next_payload()? {
            match frame::decode_payload::<StreamerCommand>(&payload) {
                Ok(command) => {
                    if !deliver(Inbound::Command(command)) {
                        return Ok(());
                    }
                }
                // The stream is still in sync: skip the one bad command.
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed command"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reports_come_out_as_frames_in_order() {
        let sink = Sink::default();
        let writer = Writer::with_output(sink.clone());
        let r = writer.reporter();
        r.send(StreamerReport::Ready {
            width: 1,
            height: 2,
        });
        r.signal("v1", Signal::EndOfCandidates);
        writer.finish();
        let bytes = sink.0.lock().unwrap().clone();
        let mut dec = FrameDecoder::new(MAX_FRAME_BYTES);
        dec.push(&bytes);
        let a: StreamerReport = dec.next_message().unwrap().unwrap();
        let b: StreamerReport = dec.next_message().unwrap().unwrap();
        assert!(matches!(a, StreamerReport::Ready { width: 1, .. }));
        assert!(matches!(b, StreamerReport::Viewer(_)));
    }

    #[test]
    fn reader_skips_malformed_commands_and_reports_eof() {
        let mut input = frame::encode(&serde_json::json!({"cmd": "nonsense"}), 1024).unwrap();
        input.extend(frame::encode(&StreamerCommand::Stop, 1024).unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        spawn_reader(std::io::Cursor::new(input), move |i| {
            sink.lock().unwrap().push(i);
            true
        })
        .join()
        .unwrap();
        let got = got.lock().unwrap();
        assert!(matches!(got[0], Inbound::Command(StreamerCommand::Stop)));
        assert!(matches!(got[1], Inbound::Closed));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let sink = Sink::default();
        let writer = Writer::with_output(sink.clone());
        writer.reporter().viewer_error("v", "é".repeat(2000));
        writer.finish();
        let bytes = sink.0.lock().unwrap().clone();
        let mut dec = FrameDecoder::new(MAX_FRAME_BYTES);
        dec.push(&bytes);
        let StreamerReport::Viewer(v) = dec.next_message().unwrap().unwrap() else {
            panic!("not a viewer report");
        };
        assert!(v.validate().is_ok());
    }
}
