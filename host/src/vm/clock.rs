//! Brings a restored browser VM's wall clock to within a few milliseconds
//! of the host's. The refresh's absolute time is late by however long the
//! request waited to be read: a pool VM refreshes at nice 19 and, under
//! TCG beside other VMs, that wait reached seconds. So the host measures
//! the guest's offset the way NTP does (the guest's reading against the
//! midpoint of the round trip, keeping the fastest of a few tries) and
//! steps the guest's clock by it, relative to the guest's own reading.
//! Called by the VM supervisor after a refresh and when a pool VM is
//! claimed (its priority raised, so its round trips are short again).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_proto::restore::ClockStep;
use airlock_proto::{Operation, Reply};

use crate::agent::{AgentClient, AgentError};

/// Round trips tried at most per measurement.
const PROBES: usize = 5;
/// A round trip this short ends the tries early: its error bound (half
/// of it) is already below anything a page could notice.
const GOOD_RTT: Duration = Duration::from_millis(4);
/// Offsets within this (beyond the measurement's own bound) are left be.
const TOLERANCE_MS: i64 = 2;
/// Deadline of one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A synchronisation could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// The agent did not answer, or refused.
    #[error("the guest's clock could not be read or stepped: {0}")]
    Agent(#[source] AgentError),
    /// It answered with something else.
    #[error("the guest answered a clock request with {0}")]
    Unexpected(String),
}

/// The guest's clock against the host's, as last measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    /// Guest minus host (ms).
    pub offset_ms: i64,
    /// The round trip of the measurement (ms); the offset is exact to
    /// within half of it.
    pub rtt_ms: u64,
}

/// What a synchronisation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    /// The offset found first.
    pub before: Offset,
    /// The offset after the step (equal to `before` when none was due).
    pub after: Offset,
}

impl Synced {
    /// Puts the offset now into a VM's timings.
    pub fn record(&self, t: &mut super::Timings) {
        t.clock_offset_ms = Some(self.after.offset_ms);
        t.clock_rtt_ms = Some(self.after.rtt_ms);
    }
}

/// Measures the guest's offset and steps its clock when it is off.
pub async fn sync(client: &AgentClient) -> Result<Synced, ClockError> {
    let before = measure(client).await?;
    if !is_off(before) {
        return Ok(Synced {
            before,
            after: before,
        });
    }
    step(client, -before.offset_ms).await?;
    let after = measure(client).await?;
    Ok(Synced { before, after })
}

/// True when the offset is beyond what the measurement can tell apart.
fn is_off(o: Offset) -> bool {
    o.offset_ms.unsigned_abs() > o.rtt_ms / 2 + TOLERANCE_MS.unsigned_abs()
}

/// The best of up to [`PROBES`] readings: the one with the shortest trip.
async fn measure(client: &AgentClient) -> Result<Offset, ClockError> {
    let mut best: Option<Offset> = None;
    for _ in 0..PROBES {
        let o = probe(client).await?;
        if best.is_none_or(|b| o.rtt_ms < b.rtt_ms) {
            best = Some(o);
        }
        if Duration::from_millis(o.rtt_ms) <= GOOD_RTT {
            break;
        }
    }
    Ok(best.expect("at least one probe"))
}

/// One reading of the guest's clock, placed at the round trip's midpoint.
async fn probe(client: &AgentClient) -> Result<Offset, ClockError> {
    let sent_wall = unix_ms(SystemTime::now());
    let sent = Instant::now();
    let guest = step(client, 0).await?;
    let rtt = sent.elapsed();
    let midpoint = sent_wall + (rtt.as_millis() / 2) as i64;
    Ok(Offset {
        offset_ms: guest - midpoint,
        rtt_ms: rtt.as_millis() as u64,
    })
}

/// Steps the guest's clock by `step_ms` (zero: reads it); its reading.
async fn step(client: &AgentClient, step_ms: i64) -> Result<i64, ClockError> {
    match client
        .call(Operation::Clock(ClockStep { step_ms }), PROBE_TIMEOUT)
        .await
        .map_err(ClockError::Agent)?
    {
        Reply::Clock(r) => Ok(r.unix_time_ms),
        other => Err(ClockError::Unexpected(format!("{other:?}"))),
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_within_the_measurements_bound_is_left_be() {
        let o = |offset_ms, rtt_ms| Offset { offset_ms, rtt_ms };
        assert!(!is_off(o(0, 0)));
        assert!(!is_off(o(2, 0)));
        assert!(is_off(o(3, 0)));
        assert!(!is_off(o(-12, 20)));
        assert!(is_off(o(-13, 20)));
        assert!(is_off(o(2_400_000, 900)));
    }
}
