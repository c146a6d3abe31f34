//! `fake-cli`: airlock's demo CLI (`airlock-demo-cli`), the CLI of the
//! built-in "demo" provider, talking to the fake OAuth server named by
//! `AIRLOCK_FAKE_OAUTH_URL`. It is the only fake CLI: the demo provider has
//! no real CLI, while the vendor CLIs (Codex, Claude Code, Gemini CLI) are
//! tested for real, against the vendor sandbox.
//!
//! Installed as `fake-cli` and run through an `airlock-demo-cli` symlink in
//! the browser image and the end-to-end tests; it behaves the same under
//! any name. Logs (tracing) go to stderr only when `RUST_LOG` is set, so
//! the output stays what the CLI prints.

#![forbid(unsafe_code)]

mod common;
mod creds;
mod demo;
mod exchange;
mod loopback;
mod opener;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = runtime.block_on(demo::run(&args));
    // Do not wait for detached openers.
    drop(runtime);
    std::process::exit(code);
}
