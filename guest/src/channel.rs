//! The agent's connection to the host: dial (vsock or Unix socket) with
//! backoff, hello, welcome, then serve requests and send events until the
//! connection drops, and dial again. Driven by [`crate::run`].

use std::sync::Arc;
use std::time::Duration;

use airlock_proto::limits::MAX_FRAME_BYTES;
use airlock_proto::{
    frame, salvage_request_id, ErrorCode, ErrorReply, Event, FrameDecoder, GuestMessage, Heartbeat,
    HostMessage, Operation, Outcome, Ready, Request, Response, Welcome, HOST_CID,
};
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::Agent;
use crate::options::Transport;
use crate::wire::{read_payload, write_message, WireError};

/// How long the agent waits for the host's answer to its hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests served at once; more are answered `busy`.
const MAX_CONCURRENT_REQUESTS: usize = 32;
/// Time the writer gets to flush after the connection ends.
const FLUSH_GRACE: Duration = Duration::from_secs(1);
/// Messages waiting for the writer.
const OUTBOX: usize = 64;
/// Redial pace while a restore is expected.
const QUICK_REDIAL: Duration = Duration::from_millis(10);

/// A byte stream to the host.
pub trait HostStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> HostStream for T {}

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The host refused this agent; reconnecting would not help.
    #[error("host refused this agent: {0}")]
    Refused(String),
    /// The stream or its framing failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The host broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No welcome within the deadline.
    #[error("no answer to hello within {0:?}")]
    WelcomeTimeout(Duration),
}

/// How a connection ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The host closed it; dial again.
    Closed,
    /// The agent is shutting down.
    Shutdown,
}

/// Dials until connected or shut down, backing off from 10 ms to 1 s;
/// every 10 ms while `expect_restore` is set (a snapshot was taken: a
/// restored copy's host is there as soon as its vsock device is).
pub async fn dial(
    transport: &Transport,
    shutdown: &CancellationToken,
    expect_restore: &watch::Sender<bool>,
) -> Option<Box<dyn HostStream>> {
    let mut delay = Duration::from_millis(10);
    for attempt in 0u64.. {
        let result: std::io::Result<Box<dyn HostStream>> = match transport {
            Transport::Vsock { port } => {
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(HOST_CID, *port))
                    .await
                    .map(|s| Box::new(s) as _)
            }
            Transport::Unix { path } => tokio::net::UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as _),
        };
        match result {
            Ok(stream) => return Some(stream),
            // Log the 1st, 2nd, 4th, 8th... failure: enough to diagnose,
            // not enough to flood a slow serial console.
            Err(e) if attempt.is_power_of_two() || attempt == 0 => {
                tracing::warn!(?transport, attempt, error = %e, "cannot reach the host yet");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return None,
        }
        delay = match *expect_restore.borrow() {
            true => QUICK_REDIAL,
            false => (delay * 2).min(Duration::from_secs(1)),
        };
    }
    None
}

/// Runs one connection from hello to its end.
pub async fn serve(
    agent: &Arc<Agent>,
    stream: Box<dyn HostStream>,
    seq: u32,
) -> Result<End, ChannelError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut dec = FrameDecoder::new(MAX_FRAME_BYTES);
    let mut buf = vec![0u8; 64 << 10];
    write_message(
        &mut wr,
        &GuestMessage::Hello(agent.hello(seq)),
        MAX_FRAME_BYTES,
    )
    .await?;
    let first = tokio::time::timeout(WELCOME_TIMEOUT, read_payload(&mut rd, &mut dec, &mut buf))
        .await
        .map_err(|_| ChannelError::WelcomeTimeout(WELCOME_TIMEOUT))??;
    let Some(first) = first else {
        return Ok(End::Closed);
    };
    let welcome = match frame::decode_payload::<HostMessage>(&first).map_err(WireError::from)? {
        HostMessage::Welcome(w) => w,
        HostMessage::Refused(r) => return Err(ChannelError::Refused(r.reason)),
        HostMessage::Request(_) => {
            return Err(ChannelError::Protocol("request before welcome".into()))
        }
    };
    agent.apply(&welcome.config);
    agent.start_egress(&welcome.config).await;
    tracing::info!(vm_id = %welcome.vm_id, seq, "connected to host");
    let conn = Connection::start(agent, wr, &welcome);
    let result = conn.read_loop(&mut rd, &mut dec, &mut buf).await;
    conn.finish().await;
    result
}

/// The tasks of one live connection.
struct Connection {
    agent: Arc<Agent>,
    outbox: mpsc::Sender<GuestMessage>,
    cancel: CancellationToken,
    hard_stop: CancellationToken,
    tasks: TaskTracker,
    permits: Arc<Semaphore>,
}

impl Connection {
    fn start(agent: &Arc<Agent>, wr: WriteHalf<Box<dyn HostStream>>, welcome: &Welcome) -> Self {
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let conn = Self {
            agent: agent.clone(),
            outbox,
            cancel: agent.shutdown.child_token(),
            hard_stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
        };
        conn.tasks
            .spawn(writer(wr, rx, conn.cancel.clone(), conn.hard_stop.clone()));
        let ready = Event::Ready(Ready {
            uptime_ms: crate::sysinfo::uptime_ms(),
        });
        // The outbox is empty at this point, so this cannot fail.
        let _ = conn.outbox.try_send(GuestMessage::Event(ready));
        // Before any other event (a CLI's exit must not reach the host
        // ahead of the credential it wrote): what the host has not
        // acknowledged, again. Few, so they fit the empty outbox too.
        for c in agent.handoff.pending() {
            tracing::info!(session_id = %c.session_id, "sending the credential again: the host has not acknowledged it");
            let _ = conn
                .outbox
                .try_send(GuestMessage::Event(Event::Credential(c)));
        }
        let interval = welcome.config.heartbeat_interval_ms;
        conn.tasks.spawn(heartbeats(
            agent.expect_restore.subscribe(),
            conn.outbox.clone(),
            (interval > 0).then(|| Duration::from_millis(interval)),
            conn.cancel.clone(),
        ));
        conn.tasks.spawn(
            agent
                .clone()
                .forward_logs(conn.outbox.clone(), conn.cancel.clone()),
        );
        conn.tasks.spawn(
            agent
                .clone()
                .forward_events(conn.outbox.clone(), conn.cancel.clone()),
        );
        conn
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        dec: &mut FrameDecoder,
        buf: &mut [u8],
    ) -> Result<End, ChannelError> {
        loop {
            let payload = tokio::select! {
                // The writer cancels the connection when the host stops
                // taking frames: that is a broken connection to dial again,
                // not the agent's shutdown (which would power the VM off).
                _ = self.cancel.cancelled() => return Ok(match self.agent.shutdown.is_cancelled() {
                    true => End::Shutdown,
                    false => End::Closed,
                }),
                r = read_payload(rd, dec, buf) => match r? {
                    Some(p) => p,
                    None => return Ok(End::Closed),
                },
            };
            match frame::decode_payload::<HostMessage>(&payload) {
                Ok(HostMessage::Request(req)) => self.dispatch(req),
                Ok(other) => {
                    tracing::warn!(message = ?other, "ignoring handshake message after welcome")
                }
                Err(e) => match salvage_request_id(&payload) {
                    // A newer host's operation: answer, keep the connection.
                    Some(id) => self.reply(
                        id,
                        Outcome::Error(ErrorReply::new(
                            ErrorCode::Unsupported,
                            format!("this agent cannot parse the request: {e}"),
                        )),
                    ),
                    None => {
                        return Err(ChannelError::Protocol(format!(
                            "malformed frame from host: {e}"
                        )))
                    }
                },
            }
        }
    }

    fn reply(&self, id: u64, result: Outcome) {
        let outbox = self.outbox.clone();
        self.tasks.spawn(async move {
            let _ = outbox
                .send(GuestMessage::Response(Response { id, result }))
                .await;
        });
    }

    fn dispatch(&self, req: Request) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let busy = ErrorReply::new(
                ErrorCode::Busy,
                format!("{MAX_CONCURRENT_REQUESTS} requests already running"),
            );
            return self.reply(req.id, Outcome::Error(busy));
        };
        let agent = self.agent.clone();
        let outbox = self.outbox.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let is_shutdown = matches!(req.op, Operation::Shutdown);
            let result = match agent.perform(req.op, &cancel).await {
                Ok(reply) => Outcome::Ok(reply),
                Err(e) => Outcome::Error(e),
            };
            let _ = outbox
                .send(GuestMessage::Response(Response { id: req.id, result }))
                .await;
            drop(permit);
            if is_shutdown {
                agent.shutdown.cancel();
            }
        });
    }

    /// Stops the connection's tasks, giving the writer a moment to flush
    /// (so a `shuttingDown` reply reaches the host before power-off).
    async fn finish(self) {
        self.cancel.cancel();
        drop(self.outbox);
        self.tasks.close();
        if tokio::time::timeout(FLUSH_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            self.hard_stop.cancel();
            self.tasks.wait().await;
        }
    }
}

/// Writes queued messages until every sender is gone (or `hard_stop`).
async fn writer(
    mut wr: WriteHalf<Box<dyn HostStream>>,
    mut rx: mpsc::Receiver<GuestMessage>,
    cancel: CancellationToken,
    hard_stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = hard_stop.cancelled() => break,
        };
        let sent = tokio::select! {
            r = write_message(&mut wr, &msg, MAX_FRAME_BYTES) => r,
            _ = hard_stop.cancelled() => break,
        };
        if let Err(e) = sent {
            // Not a log line per message: the reader will see the socket
            // fail too and end the connection.
            if !cancel.is_cancelled() {
                tracing::warn!(error = %e, "cannot write to host");
            }
            cancel.cancel();
            break;
        }
    }
}

/// Beats every `every` (none: no beats), and every [`QUICK_REDIAL`] while
/// a snapshot is expected.
async fn heartbeats(
    mut snapshot: watch::Receiver<bool>,
    outbox: mpsc::Sender<GuestMessage>,
    every: Option<Duration>,
    cancel: CancellationToken,
) {
    let mut seq = 0u64;
    loop {
        let quick = *snapshot.borrow_and_update();
        let pause = match (quick, every) {
            (true, _) => Some(QUICK_REDIAL),
            (false, every) => every,
        };
        tokio::select! {
            _ = async { match pause { Some(p) => tokio::time::sleep(p).await, None => std::future::pending().await } } => {}
            r = snapshot.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
            _ = cancel.cancelled() => return,
        }
        let beat = Event::Heartbeat(Heartbeat {
            seq,
            uptime_ms: crate::sysinfo::uptime_ms(),
        });
        seq += 1;
        // A full outbox means the host is not reading: skip this beat.
        let _ = outbox.try_send(GuestMessage::Event(beat));
    }
}
