//! The host's side of the agent channel: framing, handshake, requests and
//! events. The VM supervisor binds the listener and receives
//! [`listener::AgentEvent`]s; API handlers call the [`client::AgentClient`].

pub mod client;
pub mod codec;
pub mod guestlog;
pub mod handshake;
pub mod listener;

pub use client::{AgentClient, AgentError, ClientOptions, EventSink};
