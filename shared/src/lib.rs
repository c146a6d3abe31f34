//! Protocol between `airlockd` (host) and `airlock-guest` (the agent in a VM).
//!
//! Both sides link this crate: the host to talk to agents over vsock (or a
//! Unix socket in tests), the agent to answer. It holds the message types,
//! their validation rules and the frame codec, and does no I/O of its own so
//! that each side can drive it from its own runtime.
//!
//! The wire format is a stream of frames: a 4-byte big-endian payload length
//! followed by a UTF-8 JSON payload (see [`frame`]). The guest speaks first
//! with a [`Hello`]; the host answers with a [`Welcome`] or a [`Refused`].
//! After that the host sends [`Request`]s and the guest sends [`Response`]s
//! and unsolicited [`Event`]s.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod b64;
pub mod egress;
pub mod elf;
pub mod frame;
pub mod limits;
pub mod login;
pub mod message;
pub mod restore;
pub mod secret;
pub mod stream;

pub use frame::{FrameDecoder, FrameError};
pub use login::*;
pub use message::*;
pub use secret::SecretBytes;

/// Version of this protocol. A host refuses an agent that reports another.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock context id of the host, as seen from a guest.
pub const HOST_CID: u32 = 2;

/// The vsock port the agent dials when the kernel command line names none.
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// Line the agent prints on the console as soon as it runs as `/init`, so
/// the host can timestamp the moment the kernel handed over to userspace.
pub const INIT_MARKER: &str = "airlock-guest: init started";

/// Line the agent prints on the console when booted with `airlock.probe=1`
/// (used by the host to find out whether hardware acceleration works).
pub const PROBE_MARKER: &str = "airlock-guest: probe ok";

/// The environment variable in which airlockd's process backend names the
/// state directory of an agent it runs as a host process (not isolated),
/// so that it can remove the directory should the agent be killed.
pub const AGENT_STATE_DIR_ENV: &str = "AIRLOCK_AGENT_STATE_DIR";
