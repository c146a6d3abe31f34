//! `airlock-streamer`: streams the browser VM's X display to viewers over
//! WebRTC (GStreamer `webrtcbin`), one process beside the agent.
//!
//! The agent spawns it with `DISPLAY` set and talks to it over stdin/stdout
//! in frames (`airlock_proto::stream::StreamerCommand` in,
//! `StreamerReport` out); logs go to stderr. Exit status 0 means it was
//! told to stop (or stdin ended); anything else is a failure, explained on
//! stderr.

mod branch;
mod damage;
mod datachannel;
mod encoder;
mod ice;
mod jpeg;
mod pipe;
mod pipeline;
mod rate;
mod sdp;
mod streamer;
mod viewer;

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if std::env::args().nth(1).as_deref() == Some("--warm-up") {
        return warm_up();
    }
    match streamer::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "streamer failed");
            ExitCode::FAILURE
        }
    }
}

/// `--warm-up`: builds GStreamer's plugin registry (its cache file, about
/// 20 s of scanning in a VM under TCG) and loads the elements the pipeline
/// uses, then exits. The agent runs it in a browser VM before that VM is
/// snapshotted, so that every restored copy's first streamer starts warm.
fn warm_up() -> ExitCode {
    if let Err(e) = gstreamer::init() {
        tracing::error!(error = %e, "cannot initialise GStreamer");
        return ExitCode::FAILURE;
    }
    let missing: Vec<&str> = pipeline::ELEMENTS
        .iter()
        .copied()
        .filter(|name| gstreamer::ElementFactory::make(name).build().is_err())
        .collect();
    if !missing.is_empty() {
        tracing::warn!(?missing, "elements the pipeline may use are not installed");
    }
    ExitCode::SUCCESS
}
