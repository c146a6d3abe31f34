//! `airlockd`: loads the config, sets up logging and the runtime, and runs
//! the daemon ([`airlock_host::daemon::run`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use airlock_host::config::Config;

/// The airlock host supervisor daemon.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file; every key has a default (see --print-config).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Append a new key to the store's key file (`store.key_file`) and
    /// exit. The new key encrypts from the next start; older keys still
    /// decrypt the records they wrote.
    #[arg(long)]
    rotate_store_key: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    if args.rotate_store_key {
        let id = airlock_host::store::rotate_key(&config.store.key_file)
            .with_context(|| format!("cannot rotate {}", config.store.key_file.display()))?;
        println!(
            "added key {id} to {}; restart airlockd to encrypt with it",
            config.store.key_file.display()
        );
        return Ok(());
    }
    airlock_host::telemetry::init(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(airlock_host::daemon::run(config))?;
    Ok(())
}
