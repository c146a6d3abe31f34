//! Limits on what viewers and guests can make airlockd do: a token bucket
//! for each viewer's WebSocket messages, and a limiter for log lines that
//! a viewer or a guest can trigger (so neither can flood the log). Used by
//! [`super::hub`] and [`super::socket`].

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Log lines let through per window.
const LOG_LINES: u32 = 20;
/// The window of [`LogLimiter`].
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// Lets a log line through at most [`LOG_LINES`] times a minute.
#[derive(Debug, Default)]
pub struct LogLimiter {
    window: Mutex<Option<(Instant, u32)>>,
}

impl LogLimiter {
    /// True when this line may be logged.
    pub fn allow(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match &mut *w {
            Some((start, n)) if now.duration_since(*start) < LOG_WINDOW => {
                *n += 1;
                *n <= LOG_LINES
            }
            _ => {
                *w = Some((now, 1));
                true
            }
        }
    }
}

/// A token bucket: `rate` messages a second on average, bursts up to
/// four times that (a page trickles its candidates in a burst).
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
    warned: Option<Instant>,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            burst: rate * 4.0,
            tokens: rate * 4.0,
            at: Instant::now(),
            warned: None,
        }
    }

    /// Takes a token at `now`; false when the bucket is empty.
    pub fn allow_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True at most once a second: when to tell the sender to slow down.
    pub fn should_warn(&mut self, now: Instant) -> bool {
        let warn = self
            .warned
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1));
        if warn {
            self.warned = Some(now);
        }
        warn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_pass_and_floods_are_cut_then_refilled() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10);
        assert!((0..40).all(|_| r.allow_at(t0)), "a burst of 4x the rate");
        assert!(!r.allow_at(t0));
        assert!(r.should_warn(t0));
        assert!(!r.should_warn(t0 + Duration::from_millis(500)));
        let later = t0 + Duration::from_millis(500);
        assert_eq!((0..10).filter(|_| r.allow_at(later)).count(), 5);
    }

    #[test]
    fn log_lines_are_capped_per_window() {
        let l = LogLimiter::default();
        assert_eq!((0..100).filter(|_| l.allow()).count(), LOG_LINES as usize);
    }
}
