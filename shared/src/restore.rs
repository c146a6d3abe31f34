//! Messages for browser VMs restored from a snapshot: the host asks a VM
//! to get ready for a snapshot (nothing session-specific in it yet), and
//! gives each restored copy what must not be shared between copies (fresh
//! entropy, the current time). Produced by `airlockd`'s VM supervisor and
//! snapshot maker, performed by the agent's `restore` module.

use serde::{Deserialize, Serialize};

use crate::message::InvalidMessage;
use crate::SecretBytes;

/// Bytes of host entropy a restored VM mixes into its kernel's pool: as
/// much as the kernel's ChaCha key, twice.
pub const REFRESH_SEED_BYTES: usize = 64;

/// Make a restored copy of this VM its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshSpec {
    /// Random bytes from the host (redacted in `Debug`): credited to the
    /// guest kernel's pool, which then reseeds at once.
    pub seed: SecretBytes,
    /// The host's wall clock (ms since the Unix epoch) when it sent this:
    /// a restored guest's clock resumes from the moment of the save.
    pub unix_time_ms: u64,
}

impl RefreshSpec {
    /// Checks the seed's size.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        if self.seed.len() != REFRESH_SEED_BYTES {
            return Err(InvalidMessage {
                field: "seed",
                problem: format!(
                    "must be {REFRESH_SEED_BYTES} bytes, not {}",
                    self.seed.len()
                ),
            });
        }
        Ok(())
    }
}

/// What the agent did to make this copy its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshReport {
    /// How far the clock was stepped (ms, forward positive).
    pub clock_step_ms: i64,
    /// Browser processes restarted so that none keeps random state drawn
    /// before the refresh (Chromium's network service).
    pub restarted: Vec<String>,
}
