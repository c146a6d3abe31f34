//! A minimal QMP client (QEMU's JSON control protocol on a Unix socket):
//! greeting, capabilities negotiation, commands, and waiting for events.
//! The QEMU backend uses it to unplug and plug the vsock device, save a
//! VM's state and load it into a new QEMU ([`super::qemu`]). QMP serves one
//! client at a time, so callers connect, act and drop the client.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest line QEMU sends that we read (query replies are small).
const MAX_LINE: usize = 1 << 20;
/// Events kept while waiting for a command's answer.
const MAX_QUEUED_EVENTS: usize = 256;

/// A QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be used.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection.
    #[error("QEMU closed its QMP connection")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("QEMU sent an unreadable QMP message: {0}")]
    Protocol(String),
    /// A command failed.
    #[error("QMP {command} failed: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer or event in time.
    #[error("QEMU did not {what} within {waited:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
    },
}

/// One QMP connection, in command mode.
#[derive(Debug)]
pub struct Qmp {
    path: String,
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects to `path`, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Io {
                path: shown.clone(),
                source,
            })?;
        let (rd, wr) = stream.into_split();
        let mut qmp = Self {
            path: shown,
            rd: BufReader::new(rd),
            wr,
            events: VecDeque::new(),
        };
        let greeting = within(timeout, "greet on QMP", qmp.read()).await??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol("no greeting".into()));
        }
        qmp.execute("qmp_capabilities", json!({}), timeout).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = (&mut self.rd)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(e.to_string()))
    }

    /// Runs `command` and returns its `return` value; events that arrive
    /// meanwhile are kept for [`Qmp::wait_event`].
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let msg = message(command, arguments)?;
        self.wr
            .write_all(&msg)
            .await
            .map_err(|source| self.io_error(source))?;
        self.answer(command, timeout).await
    }

    /// Hands QEMU the descriptor `fd` under `name` (`getfd`), for a later
    /// command that names it (an `fd:` migration); QEMU keeps its own
    /// copy, so the caller may close `fd` afterwards.
    pub async fn pass_fd(
        &mut self,
        name: &str,
        fd: RawFd,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let msg = message("getfd", json!({ "fdname": name }))?;
        let stream: &UnixStream = self.wr.as_ref();
        // The descriptor rides on the command's first byte; QEMU reads
        // both with one recvmsg.
        let sent = within(timeout, "take a descriptor", async {
            loop {
                stream.writable().await?;
                let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
                    let iov = [std::io::IoSlice::new(&msg)];
                    let fds = [fd];
                    let cmsg = [ControlMessage::ScmRights(&fds)];
                    sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                        .map_err(std::io::Error::from)
                });
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        })
        .await?
        .map_err(|source| self.io_error(source))?;
        self.wr
            .write_all(&msg[sent..])
            .await
            .map_err(|source| self.io_error(source))?;
        self.answer("getfd", timeout).await.map(drop)
    }

    fn io_error(&self, source: std::io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The answer to `command`, keeping events that come first.
    async fn answer(&mut self, command: &str, timeout: Duration) -> Result<Value, QmpError> {
        within(timeout, &format!("answer {command}"), async {
            loop {
                let v = self.read().await?;
                if v.get("event").is_some() {
                    if self.events.len() < MAX_QUEUED_EVENTS {
                        self.events.push_back(v);
                    }
                    continue;
                }
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                let desc = v["error"]["desc"].as_str().unwrap_or("unknown error");
                return Err(QmpError::Command {
                    command: command.into(),
                    desc: desc.into(),
                });
            }
        })
        .await?
    }

    /// Waits for the first event (queued or new) that `matches`.
    pub async fn wait_event(
        &mut self,
        what: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if let Some(i) = self.events.iter().position(&matches) {
            return Ok(self.events.remove(i).unwrap_or_default());
        }
        within(timeout, what, async {
            loop {
                let v = self.read().await?;
                if matches(&v) {
                    return Ok(v);
                }
            }
        })
        .await?
    }
}

/// One QMP command as sent.
fn message(command: &str, arguments: Value) -> Result<Vec<u8>, QmpError> {
    let mut msg = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))
        .map_err(|e| QmpError::Protocol(e.to_string()))?;
    msg.push(b'\n');
    Ok(msg)
}

async fn within<T>(
    timeout: Duration,
    what: &str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, QmpError> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| QmpError::Timeout {
            what: what.into(),
            waited: timeout,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A QMP peer that greets, answers each command from `answers` in
    /// order, and sends an event before the second answer.
    async fn fake_qemu(listener: UnixListener, answers: Vec<&'static str>) {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        for (i, answer) in answers.into_iter().enumerate() {
            let _ = s.read(&mut buf).await.unwrap();
            if i == 1 {
                s.write_all(b"{\"event\": \"STOP\"}\n").await.unwrap();
            }
            s.write_all(answer.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn commands_answer_errors_name_the_command_and_events_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(fake_qemu(
            listener,
            vec![
                "{\"return\": {}}\n",
                "{\"return\": {\"status\": \"paused\"}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such device\"}}\n",
            ],
        ));
        let t = Duration::from_secs(5);
        let mut q = Qmp::connect(&path, t).await.unwrap();
        let status = q.execute("query-status", json!({}), t).await.unwrap();
        assert_eq!(status["status"], "paused");
        let err = q
            .execute("device_del", json!({"id": "x"}), t)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "QMP device_del failed: no such device");
        let stop = q
            .wait_event("stop", |v| v["event"] == "STOP", t)
            .await
            .unwrap();
        assert_eq!(stop["event"], "STOP");
        let late = q
            .wait_event(
                "resume",
                |v| v["event"] == "RESUME",
                Duration::from_millis(50),
            )
            .await
            .unwrap_err();
        assert!(matches!(late, QmpError::Closed | QmpError::Timeout { .. }));
        peer.await.unwrap();
    }
}
