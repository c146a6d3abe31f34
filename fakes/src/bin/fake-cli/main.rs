//! `fake-cli`: the login flows of the vendor CLIs airlock drives (Codex,
//! Claude Code, Gemini CLI) and of airlock's demo CLI, talking to the fake
//! OAuth server named by `AIRLOCK_FAKE_OAUTH_URL`.
//!
//! Multi-call: the profile comes from the name it is run as (`codex`,
//! `claude`, `gemini`, `airlock-demo-cli`, e.g. through symlinks), or from
//! `fake-cli --profile <codex|claude|gemini|demo> …`. Installed in test
//! images and run by the end-to-end tests and by this crate's tests.
//! Logs (tracing) go to stderr only when `RUST_LOG` is set, so the output
//! stays what the real CLI would print.

#![forbid(unsafe_code)]

mod claude;
mod codex;
mod common;
mod creds;
mod demo;
mod exchange;
mod gemini;
mod loopback;
mod opener;
mod prompt;

use std::path::Path;

use anyhow::Context;

/// Which CLI to be.
#[derive(Debug, Clone, Copy)]
enum Profile {
    Codex,
    Claude,
    Gemini,
    Demo,
}

impl Profile {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "codex" => Some(Self::Codex),
            "claude" => Some(Self::Claude),
            "gemini" => Some(Self::Gemini),
            "demo" | "airlock-demo-cli" => Some(Self::Demo),
            _ => None,
        }
    }
}

const USAGE: &str = "usage: fake-cli --profile <codex|claude|gemini|demo> [ARGS...]\n\
   or: run it as codex, claude, gemini or airlock-demo-cli (e.g. via a symlink)";

/// The profile and its arguments, from argv.
fn select(argv: &[String]) -> Option<(Profile, Vec<String>)> {
    let name = argv.first().map(|a0| {
        Path::new(a0)
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    })?;
    if let Some(profile) = Profile::from_name(&name) {
        return Some((profile, argv[1..].to_vec()));
    }
    match argv.get(1).map(String::as_str) {
        Some("--profile") => Some((Profile::from_name(argv.get(2)?)?, argv.get(3..)?.to_vec())),
        Some(flag) => {
            let value = flag.strip_prefix("--profile=")?;
            Some((Profile::from_name(value)?, argv[2..].to_vec()))
        }
        None => None,
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let argv: Vec<String> = std::env::args().collect();
    let Some((profile, args)) = select(&argv) else {
        eprintln!("{USAGE}");
        std::process::exit(common::EXIT_USAGE);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = runtime.block_on(async move {
        match profile {
            Profile::Codex => codex::run(&args).await,
            Profile::Claude => claude::run(&args).await,
            Profile::Gemini => gemini::run(&args).await,
            Profile::Demo => demo::run(&args).await,
        }
    });
    // Do not wait for the stdin reader thread or detached openers.
    drop(runtime);
    std::process::exit(code);
}
