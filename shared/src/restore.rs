//! Messages for browser VMs restored from a snapshot: the host asks a VM
//! to get ready for a snapshot (nothing session-specific in it yet), and
//! gives each restored copy what must not be shared between copies (fresh
//! entropy, the current time), then reads and steps its clock until it
//! agrees with the host's. Produced by `airlockd`'s VM supervisor and
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

/// The largest step the host may ask of a guest's clock (ms): a day.
/// Corrections after a refresh are milliseconds to seconds; anything near
/// this is a host bug, refused rather than carried out.
pub const MAX_CLOCK_STEP_MS: i64 = 86_400_000;

/// Read the guest's wall clock, after stepping it by `step_ms` (zero:
/// only read). A step relative to the guest's own clock is exact however
/// long the request took to arrive, which an absolute time is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClockStep {
    /// Milliseconds to add to the guest's wall clock (negative: back).
    pub step_ms: i64,
}

impl ClockStep {
    /// Checks the step against [`MAX_CLOCK_STEP_MS`].
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        if self.step_ms.unsigned_abs() > MAX_CLOCK_STEP_MS.unsigned_abs() {
            return Err(InvalidMessage {
                field: "stepMs",
                problem: format!(
                    "{} ms is more than the {MAX_CLOCK_STEP_MS} ms a clock may be stepped",
                    self.step_ms
                ),
            });
        }
        Ok(())
    }
}

/// The guest's wall clock when it answered a [`ClockStep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClockReading {
    /// Milliseconds since the Unix epoch.
    pub unix_time_ms: i64,
}
