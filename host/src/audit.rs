//! Audit lines: one structured event, on the tracing target `audit`, per
//! operator action on a VM (create, delete, exec, file written or read)
//! and per credential stored or delivered. They say who asked (the peer's
//! address or Unix credentials, and its operator token's name) and what was done to what, never with what was in it: a
//! command by its program and argument count (arguments may carry
//! secrets), a file by its path, size and hash, a credential by its id.
//! Called by the `/api/vms` handlers and by the session's store and
//! delivery steps.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

/// The tracing target of audit lines (to route or keep them apart with a
/// subscriber's filter, e.g. `RUST_LOG=audit=info`).
pub const TARGET: &str = "audit";

/// Who made an API request, as far as its listener knows: the TCP peer's
/// address or the Unix socket peer's uid and pid, and the name of the
/// operator token it presented. The server adds it to every request it
/// reads; the token check names the token (none for a router used
/// without them: "unknown").
#[derive(Debug, Clone, Default)]
pub struct Peer(Option<Arc<str>>);

impl Peer {
    /// A TCP peer.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self(Some(addr.to_string().into()))
    }

    /// A Unix socket peer, by its credentials when the kernel gave them.
    pub fn unix(cred: Option<tokio::net::unix::UCred>) -> Self {
        let who = match cred {
            Some(c) => match c.pid() {
                Some(pid) => format!("unix uid {} pid {pid}", c.uid()),
                None => format!("unix uid {}", c.uid()),
            },
            None => "unix".into(),
        };
        Self(Some(who.into()))
    }

    /// This peer, having presented the operator token named `name`.
    pub fn as_token(&self, name: &str) -> Self {
        Self(Some(format!("{} token {name}", who(self)).into()))
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&who(self))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Peer>().cloned().unwrap_or_default())
    }
}

fn who(peer: &Peer) -> String {
    peer.0.as_deref().unwrap_or("unknown").to_string()
}

/// An operator's action on VM `vm_id` that succeeded; `what` says what it
/// touched without its contents.
pub fn vm_action(peer: Peer, action: &str, vm_id: &str, what: &str) {
    tracing::info!(target: TARGET, peer = %peer, action, vm_id, what, "operator action on a VM");
}

/// `exec` of `argv` in a VM: the program and how many arguments, not them.
pub fn exec(peer: Peer, vm_id: &str, argv: &[String], exit_code: Option<i32>) {
    let program = argv.first().map(String::as_str).unwrap_or_default();
    let what = format!(
        "{program} with {} argument(s), exit code {}",
        argv.len().saturating_sub(1),
        exit_code.map_or_else(|| "none".into(), |c| c.to_string())
    );
    vm_action(peer, "exec", vm_id, &what);
}

/// A credential stored for `user` and `provider` by session `session_id`.
pub fn credential_stored(session_id: &str, user: &str, provider: &str, credential_id: &str) {
    tracing::info!(target: TARGET, action = "credentialStored", session_id, user_id = user, provider, credential_id, "credential stored");
}

/// A stored credential written into CLI VM `vm_id` and verified there.
pub fn credential_delivered(user: &str, provider: &str, credential_id: &str, vm_id: &str) {
    tracing::info!(target: TARGET, action = "credentialDelivered", user_id = user, provider, credential_id, vm_id, "credential delivered");
}
