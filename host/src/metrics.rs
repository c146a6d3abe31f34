//! Prometheus metrics of airlockd, served as text (format 0.0.4) at
//! `GET /metrics` on the operator API. Counters and histograms are
//! process-wide (as Firecracker keeps its `METRICS`): the places that see
//! an event bump them, the scrape reads them. Gauges (VMs and sessions by
//! state, viewers, the warm pool) are read from their owners at the
//! scrape, so they cannot drift. Labels come from fixed sets, never from
//! outside input.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Upper bounds of the duration buckets, in seconds: a restored VM is
/// ready in under a second, a cold one under TCG in about a minute.
const BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0,
];

/// A histogram of durations with [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket (not cumulative; summed at the scrape).
    buckets: [AtomicU64; BUCKETS.len()],
    /// Observations beyond the last bucket are only in `count`.
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// How a VM started, as a label.
pub const ORIGINS: [&str; 3] = ["boot", "snapshot", "pool"];
/// Login stages timed from `POST /api/auth/start`, as a label.
pub const STAGES: [&str; 2] = ["browser_ready", "awaiting_user"];

/// The counters and histograms of this airlockd.
#[derive(Debug, Default)]
pub struct Metrics {
    /// VM request to its agent ready, by [`ORIGINS`].
    pub vm_ready: [Histogram; ORIGINS.len()],
    /// Login start to each of [`STAGES`].
    pub login_stage: [Histogram; STAGES.len()],
    /// Egress streams a browser VM opened and were allowed.
    pub egress_allowed: AtomicU64,
    /// Egress streams refused by policy.
    pub egress_refused: AtomicU64,
    /// Streamer restarts the agents reported.
    pub streamer_restarts: AtomicU64,
    /// Credential store operations that failed.
    pub store_errors: AtomicU64,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// Adds one to a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Values read at the scrape from their owners.
#[derive(Debug, Default)]
pub struct Gauges {
    /// VMs by (kind, state).
    pub vms: Vec<((String, String), u64)>,
    /// Sessions by state.
    pub sessions: Vec<(String, u64)>,
    /// Viewers connected.
    pub viewers: u64,
    /// Warm VMs ready in the pool.
    pub pool_ready: u64,
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
}

impl Metrics {
    /// The exposition text: these metrics and `gauges`.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        header(&mut out, "airlock_vms", "gauge", "VMs by kind and state.");
        for ((kind, state), n) in &gauges.vms {
            let _ = writeln!(out, "airlock_vms{{kind=\"{kind}\",state=\"{state}\"}} {n}");
        }
        header(
            &mut out,
            "airlock_sessions",
            "gauge",
            "Login sessions by state.",
        );
        for (state, n) in &gauges.sessions {
            let _ = writeln!(out, "airlock_sessions{{state=\"{state}\"}} {n}");
        }
        header(
            &mut out,
            "airlock_viewers",
            "gauge",
            "Live-view viewers connected.",
        );
        let _ = writeln!(out, "airlock_viewers {}", gauges.viewers);
        header(
            &mut out,
            "airlock_pool_ready",
            "gauge",
            "Warm browser VMs ready.",
        );
        let _ = writeln!(out, "airlock_pool_ready {}", gauges.pool_ready);
        let name = "airlock_vm_ready_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "From a VM's request to its agent being ready, by how it started.",
        );
        for (origin, h) in ORIGINS.iter().zip(&self.vm_ready) {
            h.write(&mut out, name, &format!("origin=\"{origin}\""));
        }
        let name = "airlock_login_stage_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "From POST /api/auth/start to a stage of the login.",
        );
        for (stage, h) in STAGES.iter().zip(&self.login_stage) {
            h.write(&mut out, name, &format!("stage=\"{stage}\""));
        }
        header(
            &mut out,
            "airlock_egress_streams_total",
            "counter",
            "Egress streams of browser VMs, by outcome.",
        );
        for (outcome, c) in [
            ("allowed", &self.egress_allowed),
            ("refused", &self.egress_refused),
        ] {
            let n = c.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "airlock_egress_streams_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "airlock_streamer_restarts_total",
            "Streamer restarts in browser VMs.",
            &self.streamer_restarts,
        );
        counter(
            &mut out,
            "airlock_store_errors_total",
            "Failed credential store operations.",
            &self.store_errors,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        m.vm_ready[0].observe(Duration::from_millis(300));
        m.vm_ready[0].observe(Duration::from_secs(30));
        m.vm_ready[0].observe(Duration::from_secs(900));
        let text = m.render(&Gauges::default());
        for line in [
            "airlock_vm_ready_seconds_bucket{origin=\"boot\",le=\"0.25\"} 0",
            "airlock_vm_ready_seconds_bucket{origin=\"boot\",le=\"0.5\"} 1",
            "airlock_vm_ready_seconds_bucket{origin=\"boot\",le=\"40\"} 2",
            "airlock_vm_ready_seconds_bucket{origin=\"boot\",le=\"300\"} 2",
            "airlock_vm_ready_seconds_bucket{origin=\"boot\",le=\"+Inf\"} 3",
            "airlock_vm_ready_seconds_sum{origin=\"boot\"} 930.3",
            "airlock_vm_ready_seconds_count{origin=\"boot\"} 3",
            "airlock_vm_ready_seconds_count{origin=\"pool\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn every_sample_line_has_a_declared_type() {
        let gauges = Gauges {
            vms: vec![(("browser".into(), "ready".into()), 2)],
            sessions: vec![("awaiting_user".into(), 1)],
            viewers: 1,
            pool_ready: 1,
        };
        let text = Metrics::default().render(&gauges);
        let typed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains(b)))
                .unwrap_or(name);
            assert!(typed.contains(&base), "{line}: no # TYPE for {base}");
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "{line}: not a number");
        }
        assert!(text.contains("airlock_vms{kind=\"browser\",state=\"ready\"} 2"));
    }
}
