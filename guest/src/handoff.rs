//! Credentials the host has not confirmed storing. A login's captured
//! credential is kept here from the moment it is sent until the host
//! acknowledges it (`AckCredential`, once it is stored), and is sent again
//! at the start of every connection: bytes written into a connection that
//! then breaks are lost with it (vsock keeps nothing), so sending once is
//! at most once. The host recognises a credential it already has. Kept in
//! memory only (a credential never touches the guest's disk for this) and
//! bounded to the newest few. Filled by the login session, emptied by the
//! agent's request handler, read by the channel at each connection.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use airlock_proto::CapturedCredential;

/// Credentials kept at most; a VM serves one login, so more is a bug.
const MAX_PENDING: usize = 4;

/// The credentials awaiting the host's acknowledgement.
#[derive(Debug, Default)]
pub struct Handoff {
    pending: Mutex<VecDeque<CapturedCredential>>,
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<CapturedCredential>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `c` until acknowledged (replacing an older one of its
    /// session; the oldest goes beyond [`MAX_PENDING`]).
    pub fn keep(&self, c: CapturedCredential) {
        let mut pending = self.lock();
        pending.retain(|p| p.session_id != c.session_id);
        if pending.len() == MAX_PENDING {
            pending.pop_front();
        }
        pending.push_back(c);
    }

    /// The host has stored `session_id`'s credential: forget it. False
    /// when none was pending (already acknowledged: the host may repeat).
    pub fn acknowledge(&self, session_id: &str) -> bool {
        let mut pending = self.lock();
        let before = pending.len();
        pending.retain(|p| p.session_id != session_id);
        pending.len() != before
    }

    /// What to send again on a new connection, oldest first.
    pub fn pending(&self) -> Vec<CapturedCredential> {
        self.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::{CapturedFile, SecretBytes};

    fn credential(session: &str, token: &str) -> CapturedCredential {
        CapturedCredential {
            session_id: session.into(),
            files: vec![CapturedFile {
                index: 0,
                mode: 0o600,
                contents: SecretBytes::new(token.as_bytes().to_vec()),
            }],
        }
    }

    #[test]
    fn a_credential_stays_until_acknowledged_and_only_the_newest_per_session() {
        let h = Handoff::default();
        h.keep(credential("ses-a", "one"));
        h.keep(credential("ses-a", "two"));
        h.keep(credential("ses-b", "three"));
        let pending = h.pending();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].files[0].contents.expose(), b"two");
        assert!(h.acknowledge("ses-a"));
        assert!(
            !h.acknowledge("ses-a"),
            "a repeated acknowledgement finds nothing"
        );
        assert_eq!(h.pending().len(), 1);
    }

    #[test]
    fn it_keeps_only_the_newest_few() {
        let h = Handoff::default();
        for i in 0..10 {
            h.keep(credential(&format!("ses-{i}"), "t"));
        }
        let pending = h.pending();
        assert_eq!(pending.len(), MAX_PENDING);
        assert_eq!(pending[0].session_id, "ses-6");
    }
}
