//! airlockd: the host supervisor of airlock. It boots microVMs (QEMU with
//! vhost-device-vsock, Firecracker, or the agent as a host process for
//! tests), restores browser VMs from snapshots, knows the
//! moment each VM's agent is alive from its hello over vsock, relays
//! requests to it, and serves all of this over an HTTP API.
//!
//! `main.rs` parses the command line and calls [`daemon::run`].

// Denied, not forbidden: one registration of a pidfd with tokio's reactor
// (`vm::adopt`) is `unsafe` in tokio's API, and allowed there alone.
#![deny(unsafe_code)]

pub mod agent;
pub mod api;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod egress;
pub mod image;
pub mod listeners;
pub mod live;
pub mod metrics;
pub mod providers;
pub mod server;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod vm;
