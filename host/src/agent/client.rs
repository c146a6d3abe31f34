//! Requests to a connected agent, and the tasks that move its frames.
//!
//! A reader task routes responses to their callers by id and records
//! events; a writer task sends queued requests. Anything malformed from the
//! guest (bad frame, unknown message, out-of-bounds field, a second hello)
//! closes this connection only; callers waiting on it get `Disconnected`.
//! Created by [`super::handshake`], used by the VM manager.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use airlock_proto::limits::MAX_EXEC_OUTPUT_BYTES;
use airlock_proto::{
    frame, ErrorReply, Event, GuestMessage, Hello, HostMessage, Operation, Outcome, Reply, Request,
    Response,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::codec::FrameCodec;
use super::guestlog::GuestLog;

/// Requests waiting for the writer.
const OUTBOX: usize = 64;

/// How a connection behaves beyond request/response.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// A connection silent for this long (no heartbeat) is dropped, so a
    /// hung agent with its socket still open is noticed.
    pub silence_limit: Option<Duration>,
    /// Where login, credential and browser events go (the session that owns
    /// the VM); while it has none they are dropped.
    pub events: Arc<EventSink>,
}

/// The session a VM's events go to: none for a VM that waits in the warm
/// pool, set when a session takes it. Shared by every connection of the
/// VM's agent.
#[derive(Debug, Default)]
pub struct EventSink(Mutex<Option<mpsc::Sender<Event>>>);

impl EventSink {
    /// A sink sending to `to`, if any.
    pub fn new(to: Option<mpsc::Sender<Event>>) -> Self {
        Self(Mutex::new(to))
    }

    /// From now on events go to `to`.
    pub fn set(&self, to: mpsc::Sender<Event>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(to);
    }

    fn current(&self) -> Option<mpsc::Sender<Event>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The connection is gone (the VM stopped, or the guest misbehaved).
    #[error("the agent is not connected")]
    Disconnected,
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with an error.
    #[error("{}", .0.message)]
    Guest(ErrorReply),
}

#[derive(Debug)]
struct Inner {
    outbox: mpsc::Sender<HostMessage>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    next_id: AtomicU64,
    closed: CancellationToken,
    hello: Hello,
}

/// A connected agent; clones share the connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

type Reader = FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec>;
type Writer = FramedWrite<tokio::net::unix::OwnedWriteHalf, FrameCodec>;

impl AgentClient {
    /// Starts the connection's tasks on `tracker`; they end when the
    /// connection fails, `closed` is cancelled, or the agent is silent past
    /// `opts.silence_limit` (the VM then waits for it to dial again).
    pub(crate) fn start(
        (reader, writer): (Reader, Writer),
        hello: Hello,
        log: Arc<GuestLog>,
        tracker: &TaskTracker,
        closed: CancellationToken,
        opts: &ClientOptions,
    ) -> Self {
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let inner = Arc::new(Inner {
            outbox,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            closed,
            hello,
        });
        tracker.spawn(write_loop(writer, rx, inner.closed.clone()));
        tracker.spawn(read_loop(reader, inner.clone(), log, opts.clone()));
        Self { inner }
    }

    /// What the agent said in its hello.
    pub fn hello(&self) -> &Hello {
        &self.inner.hello
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Ends the connection.
    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    /// Sends `op` and waits up to `timeout` for its outcome.
    pub async fn call(&self, op: Operation, timeout: Duration) -> Result<Reply, AgentError> {
        if self.is_closed() {
            return Err(AgentError::Disconnected);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id, tx);
        let request = HostMessage::Request(Request { id, op });
        let outcome = tokio::time::timeout(timeout, async {
            self.inner
                .outbox
                .send(request)
                .await
                .map_err(|_| AgentError::Disconnected)?;
            rx.await.map_err(|_| AgentError::Disconnected)
        })
        .await;
        match outcome {
            Ok(Ok(Outcome::Ok(reply))) => Ok(reply),
            Ok(Ok(Outcome::Error(e))) => Err(AgentError::Guest(e)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.pending().remove(&id);
                Err(AgentError::Timeout(timeout))
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Outcome>>> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

async fn write_loop(
    mut writer: Writer,
    mut rx: mpsc::Receiver<HostMessage>,
    closed: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = closed.cancelled() => break,
            m = rx.recv() => match m { Some(m) => m, None => break },
        };
        let sent = tokio::select! {
            _ = closed.cancelled() => break,
            r = writer.send(msg) => r,
        };
        if sent.is_err() {
            break;
        }
    }
    closed.cancel();
}

async fn read_loop(mut reader: Reader, inner: Arc<Inner>, log: Arc<GuestLog>, opts: ClientOptions) {
    let silence_limit = opts.silence_limit;
    let why = loop {
        let silence = async {
            match silence_limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            _ = inner.closed.cancelled() => break None,
            f = reader.next() => f,
            _ = silence => break Some(format!(
                "dropped the agent connection: nothing from the agent for {:?}, not even a heartbeat",
                silence_limit.unwrap_or_default()
            )),
        };
        let payload = match next {
            None => break Some("the agent closed the connection".to_string()),
            Some(Err(e)) => break Some(format!("dropped the agent connection: {e}")),
            Some(Ok(p)) => p,
        };
        let msg = match frame::decode_payload::<GuestMessage>(&payload) {
            Ok(m) => m,
            Err(e) => break Some(format!("dropped the agent connection: {e}")),
        };
        match handle(&inner, &log, msg) {
            Err(violation) => break Some(format!("dropped the agent connection: {violation}")),
            Ok(Some(event)) => forward(&opts, &log, event).await,
            Ok(None) => {}
        }
    };
    if let Some(why) = why {
        log.note(&why);
    }
    inner.closed.cancel();
    // Dropping the senders wakes every waiting caller with Disconnected.
    inner
        .pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

/// Hands a session event to the VM's owner. Awaited: a slow owner slows
/// the guest down rather than losing a credential.
async fn forward(opts: &ClientOptions, log: &GuestLog, event: Event) {
    // Cloned out: no lock is held while the send waits.
    match opts.events.current() {
        Some(sink) => {
            if sink.send(event).await.is_err() {
                log.note("a session event arrived after its session ended; dropped");
            }
        }
        None => log.note("a session event arrived for a VM without a session; dropped"),
    }
}

/// Routes one message: `Ok(Some(event))` for events the VM's owner takes,
/// `Err` for a protocol violation.
fn handle(inner: &Inner, log: &GuestLog, msg: GuestMessage) -> Result<Option<Event>, String> {
    match msg {
        GuestMessage::Response(Response { id, result }) => {
            if let Outcome::Ok(Reply::Exec(r)) = &result {
                r.validate(MAX_EXEC_OUTPUT_BYTES)
                    .map_err(|e| e.to_string())?;
            }
            let waiter = inner
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            match waiter {
                Some(tx) => {
                    let _ = tx.send(result);
                }
                // Late answers to requests that timed out land here.
                None => tracing::debug!(id, "response to no pending request"),
            }
        }
        GuestMessage::Event(Event::Log(line)) => {
            line.validate().map_err(|e| e.to_string())?;
            log.line(&line);
        }
        // Any frame resets the silence deadline; heartbeats exist for that.
        GuestMessage::Event(Event::Heartbeat(_)) => {}
        GuestMessage::Event(Event::ProcessExit(p)) => {
            log.note(&format!(
                "guest process {} exited (code {:?}, signal {:?})",
                p.pid, p.exit_code, p.signal
            ));
        }
        GuestMessage::Event(Event::Ready(_)) => {}
        GuestMessage::Event(Event::Login(e)) => {
            e.validate().map_err(|e| e.to_string())?;
            return Ok(Some(Event::Login(e)));
        }
        // Bounds per file are checked here; the owner checks them against
        // its provider's file list.
        GuestMessage::Event(Event::Credential(c)) => {
            c.validate(airlock_proto::MAX_CREDENTIAL_FILES)
                .map_err(|e| e.to_string())?;
            return Ok(Some(Event::Credential(c)));
        }
        GuestMessage::Event(Event::Browser(e)) => {
            e.validate().map_err(|e| e.to_string())?;
            return Ok(Some(Event::Browser(e)));
        }
        GuestMessage::Event(Event::Stream(e)) => {
            e.validate().map_err(|e| e.to_string())?;
            return Ok(Some(Event::Stream(e)));
        }
        GuestMessage::Hello(_) => return Err("a second hello on a live connection".into()),
    }
    Ok(None)
}
