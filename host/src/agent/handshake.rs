//! The host's half of the handshake on a new agent connection: read the
//! hello (bounded, with a deadline), validate it, refuse a stale or
//! incompatible agent with a reason that names the image, otherwise send
//! the welcome and wait for the agent's ready event. Run by the acceptor in
//! [`super::listener`] for every connection that arrives on a VM's socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_proto::{
    frame, Event, FrameError, GuestConfig, GuestMessage, Hello, HostMessage, InvalidMessage,
    Refused, Welcome, PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{AgentClient, ClientOptions};
use super::codec::{CodecError, FrameCodec};
use super::guestlog::GuestLog;
use crate::image::ExpectedAgent;

/// What the handshake needs to know about the VM and the expected agent.
#[derive(Debug)]
pub struct HandshakeConfig {
    /// The VM's id (sent in the welcome).
    pub vm_id: String,
    /// The build the host expects, and where that expectation comes from.
    pub expected: Arc<ExpectedAgent>,
    /// The image the VM booted, as refusals name it.
    pub image: String,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Deadline for the hello after the connection arrives.
    pub hello_timeout: Duration,
    /// Deadline for the ready event after the welcome.
    pub ready_timeout: Duration,
    /// Config sent in the welcome.
    pub guest: GuestConfig,
    /// Silence limit and event sink of the connection.
    pub client: ClientOptions,
}

/// An agent that completed the handshake.
#[derive(Debug)]
pub struct Accepted {
    /// Client for requests on this connection.
    pub client: AgentClient,
    /// What the agent said about itself.
    pub hello: Hello,
    /// When the hello arrived (host clock).
    pub hello_at: Instant,
    /// When the ready event arrived (host clock).
    pub ready_at: Instant,
}

/// Why a connection did not become a usable agent.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The stream or its framing failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The peer closed the connection.
    #[error("the agent closed the connection during the handshake")]
    Closed,
    /// A deadline passed.
    #[error("no {stage} from the agent within {waited:?}")]
    Timeout {
        /// `hello` or `ready event`.
        stage: &'static str,
        /// The deadline.
        waited: Duration,
    },
    /// A frame did not parse.
    #[error("malformed message from the agent: {0}")]
    Malformed(#[source] FrameError),
    /// A message arrived out of order.
    #[error("unexpected message during the handshake: {0}")]
    Unexpected(&'static str),
    /// The hello broke the protocol's bounds.
    #[error("invalid hello: {0}")]
    Invalid(#[from] InvalidMessage),
    /// The agent is stale or incompatible; the VM cannot be used.
    #[error("{0}")]
    Refused(String),
}

type Reader = FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec>;

async fn next_message(reader: &mut Reader) -> Result<GuestMessage, HandshakeError> {
    let payload = reader.next().await.ok_or(HandshakeError::Closed)??;
    frame::decode_payload(&payload).map_err(HandshakeError::Malformed)
}

/// Runs the handshake; on success the returned client's tasks run on
/// `tracker` until the connection ends or `cancel` fires.
pub async fn handshake(
    stream: UnixStream,
    cfg: &HandshakeConfig,
    log: Arc<GuestLog>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Accepted, HandshakeError> {
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, FrameCodec::new(cfg.max_frame));
    let mut writer = FramedWrite::new(wr, FrameCodec::new(cfg.max_frame));
    let first = tokio::time::timeout(cfg.hello_timeout, next_message(&mut reader))
        .await
        .map_err(|_| HandshakeError::Timeout {
            stage: "hello",
            waited: cfg.hello_timeout,
        })??;
    let hello_at = Instant::now();
    let GuestMessage::Hello(hello) = first else {
        return Err(HandshakeError::Unexpected(
            "the first message is not a hello",
        ));
    };
    hello.validate()?;
    if let Some(reason) = refusal(&hello, &cfg.expected, &cfg.image) {
        let _ = writer
            .send(HostMessage::Refused(Refused {
                reason: reason.clone(),
            }))
            .await;
        return Err(HandshakeError::Refused(reason));
    }
    let welcome = Welcome {
        vm_id: cfg.vm_id.clone(),
        config: cfg.guest.clone(),
    };
    writer.send(HostMessage::Welcome(welcome)).await?;
    tokio::time::timeout(cfg.ready_timeout, wait_ready(&mut reader, &log))
        .await
        .map_err(|_| HandshakeError::Timeout {
            stage: "ready event",
            waited: cfg.ready_timeout,
        })??;
    let ready_at = Instant::now();
    let client = AgentClient::start(
        (reader, writer),
        hello.clone(),
        log,
        tracker,
        cancel.child_token(),
        &cfg.client,
    );
    Ok(Accepted {
        client,
        hello,
        hello_at,
        ready_at,
    })
}

/// Reads until the ready event, recording log lines that arrive first.
async fn wait_ready(reader: &mut Reader, log: &GuestLog) -> Result<(), HandshakeError> {
    loop {
        match next_message(reader).await? {
            GuestMessage::Event(Event::Ready(_)) => return Ok(()),
            GuestMessage::Event(Event::Log(line)) => {
                line.validate()?;
                log.line(&line);
            }
            GuestMessage::Event(_) => {}
            GuestMessage::Hello(_) => return Err(HandshakeError::Unexpected("a second hello")),
            GuestMessage::Response(_) => {
                return Err(HandshakeError::Unexpected("a response before any request"))
            }
        }
    }
}

/// The reason to refuse this agent, if any; `image` names what the VM
/// booted ("image /path/initramfs.cpio.gz", "browser image /dir").
pub fn refusal(hello: &Hello, expected: &ExpectedAgent, image: &str) -> Option<String> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Some(format!(
            "incompatible agent in {image}: it speaks protocol v{}, airlockd speaks v{PROTOCOL_VERSION}; rebuild the image with `make image`",
            hello.protocol_version
        ));
    }
    if hello.build_id != expected.build_id {
        return Some(format!(
            "stale {image}: its agent is build {} (version {}), but airlockd expects build {} ({}); rebuild the image with `make image`",
            hello.build_id, hello.agent_version, expected.build_id, expected.source
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::AgentMode;

    fn hello(build: &str, proto: u32) -> Hello {
        Hello {
            protocol_version: proto,
            agent_version: "0.1.0".into(),
            build_id: build.into(),
            boot_id: "b".into(),
            mode: AgentMode::Pid1,
            uptime_at_start_ms: 1,
            uptime_at_hello_ms: 2,
            connection_seq: 0,
            capabilities: vec![],
        }
    }

    const IMAGE: &str = "image /img/initramfs.cpio.gz";

    fn expected() -> ExpectedAgent {
        ExpectedAgent {
            build_id: "aaaa".into(),
            source: "agent binary /x/airlock-guest".into(),
        }
    }

    #[test]
    fn stale_build_is_refused_naming_the_image() {
        let r = refusal(&hello("bbbb", PROTOCOL_VERSION), &expected(), IMAGE).unwrap();
        assert!(r.contains("stale image /img/initramfs.cpio.gz"), "{r}");
        assert!(r.contains("bbbb") && r.contains("aaaa"), "{r}");
    }

    #[test]
    fn other_protocol_is_refused() {
        let r = refusal(&hello("aaaa", PROTOCOL_VERSION + 1), &expected(), IMAGE).unwrap();
        assert!(r.contains("protocol"), "{r}");
    }

    #[test]
    fn matching_agent_is_accepted() {
        assert_eq!(
            refusal(&hello("aaaa", PROTOCOL_VERSION), &expected(), IMAGE),
            None
        );
    }
}
