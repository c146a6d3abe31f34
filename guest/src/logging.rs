//! Logging of the agent: to the console (stderr, the serial port under
//! PID 1) and, through a bounded channel, to the host as `Event::Log`.
//!
//! Installed once by [`crate::main_entry`]; the channel's receiving end is
//! handed from connection to connection by [`crate::channel`]. Lines logged
//! while no connection is up wait in the channel (up to its capacity) and
//! reach the host after the next hello; past that they are counted as
//! dropped, never allowed to block the agent.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use airlock_proto::limits::{cut, MAX_LOG_MESSAGE_BYTES};
use airlock_proto::{LogLevel, LogLine};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Lines buffered for the host while it is not reading.
const FORWARD_CAPACITY: usize = 512;

/// Receiving end of forwarded log lines.
#[derive(Debug)]
pub struct LogReceiver {
    /// Lines in order of logging.
    pub rx: mpsc::Receiver<LogLine>,
    /// Lines lost because the channel was full.
    pub dropped: Arc<AtomicU64>,
}

struct ForwardLayer {
    tx: mpsc::Sender<LogLine>,
    dropped: Arc<AtomicU64>,
}

/// Parses a level name; unknown names mean `info`.
pub fn parse_level(name: &str) -> LogLevel {
    match name.to_ascii_lowercase().as_str() {
        "error" => LogLevel::Error,
        "warn" | "warning" => LogLevel::Warn,
        "debug" | "trace" => LogLevel::Debug,
        _ => LogLevel::Info,
    }
}

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
    }
}

fn to_proto_level(level: &Level) -> LogLevel {
    match *level {
        Level::ERROR => LogLevel::Error,
        Level::WARN => LogLevel::Warn,
        Level::INFO => LogLevel::Info,
        _ => LogLevel::Debug,
    }
}

/// Installs the global subscriber: console output at `console_level`,
/// forwarding of the agent's own events at debug and above.
pub fn install(console_level: &str) -> LogReceiver {
    let (tx, rx) = mpsc::channel(FORWARD_CAPACITY);
    let dropped = Arc::new(AtomicU64::new(0));
    // Only the agent's own lines reach the console at the chosen level:
    // dependencies' logs can quote protocol messages (chromiumoxide logs a
    // DevTools message it cannot parse, URLs with tokens included), and the
    // console is kept on disk by the host.
    let targets = Targets::new()
        .with_target("airlock_guest", level_filter(parse_level(console_level)))
        // Programs' own output goes to the host's per-program logs only.
        .with_target("airlock_guest::output", LevelFilter::OFF)
        .with_target("chromiumoxide", LevelFilter::OFF)
        .with_default(LevelFilter::ERROR);
    let console = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_filter(targets);
    let forward = ForwardLayer {
        tx,
        dropped: dropped.clone(),
    }
    .with_filter(LevelFilter::DEBUG);
    let _ = tracing_subscriber::registry()
        .with(console)
        .with(forward)
        .try_init();
    LogReceiver { rx, dropped }
}

impl<S: Subscriber> Layer<S> for ForwardLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        // Only the agent's own lines: dependencies' debug output is noise.
        if !meta.target().starts_with("airlock_guest") {
            return;
        }
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        let line = LogLine {
            level: to_proto_level(meta.level()),
            uptime_ms: crate::sysinfo::uptime_ms(),
            target: meta.target().to_string(),
            message: cut(visitor.text, MAX_LOG_MESSAGE_BYTES),
        };
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct MessageVisitor {
    text: String,
}

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.text);
            let _ = write!(self.text, "{value:?}{fields}");
        } else {
            let _ = write!(self.text, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            let _ = write!(self.text, " {}={value}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_names() {
        assert_eq!(parse_level("WARN"), LogLevel::Warn);
        assert_eq!(parse_level("nonsense"), LogLevel::Info);
    }
}
