//! How the agent was asked to run: from the kernel command line when it is
//! PID 1 (the kernel hands init no usable argv), from its own arguments
//! otherwise. Called once by [`crate::main_entry`].

use std::path::PathBuf;

use airlock_proto::{AgentMode, DEFAULT_AGENT_PORT};

use crate::sandbox::{parse_ids, Isolation};

/// Where the agent dials the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK to the host's CID on this port.
    Vsock {
        /// The port (`airlock.port=` on the kernel command line).
        port: u32,
    },
    /// A Unix stream socket at this path (agent run as a host process).
    Unix {
        /// Socket path, the host's `<uds>_<port>` listener.
        path: PathBuf,
    },
}

/// Everything the agent needs to know before it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// PID 1, systemd service, or host process.
    pub mode: AgentMode,
    /// How to reach the host.
    pub transport: Transport,
    /// Print the probe marker and power off at once (PID 1 only).
    pub probe: bool,
    /// Console log level (`error`..`debug`).
    pub log_level: String,
    /// File listing kernel modules to load, in order (PID 1 only).
    pub modules_file: PathBuf,
    /// Isolate a host process before it starts (`--isolate-as`).
    pub isolation: Option<Isolation>,
}

/// A bad argument, reported on stderr with usage.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// An unknown flag or a missing value.
    #[error("{0}\n\n{USAGE}")]
    Usage(String),
    /// `--version`: not an error, but nothing to run either.
    #[error("version requested")]
    Version,
}

/// Printed for `--help` and after a bad argument.
pub const USAGE: &str = "\
usage: airlock-guest [--mode service|process] [--vsock-port N | --unix PATH]
                     [--log-level LEVEL] [--isolate-as UID:GID [--usr-local DIR]]
       airlock-guest --version     (prints version and GNU build id)

As PID 1 the agent ignores its arguments and reads the kernel command line:
  airlock.port=N       vsock port to dial on the host (default 1024)
  airlock.loglevel=L   console log level (default info)
  airlock.probe=1      print the probe marker and power off at once

--isolate-as (process mode, started as root): own network namespace with
only loopback, own mounts (its own /etc/chromium), then run as
UID:GID. --usr-local mounts DIR read-only over /usr/local there.";

/// The list of kernel modules PID 1 loads (written by the image scripts).
pub const MODULES_FILE: &str = "/etc/airlock/modules";

impl Options {
    /// Options for PID 1, from the kernel command line.
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut opts = Self::defaults(AgentMode::Pid1);
        apply_cmdline(&mut opts, cmdline);
        opts
    }

    /// Options for a service or a host process, from `args` (without
    /// argv[0]); the kernel command line still supplies the vsock port
    /// unless an argument overrides it.
    pub fn from_args(args: &[String], cmdline: &str) -> Result<Self, OptionsError> {
        let mut opts = Self::defaults(AgentMode::Service);
        apply_cmdline(&mut opts, cmdline);
        opts.probe = false;
        let mut usr_local = None;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| OptionsError::Usage(format!("{arg} needs a value")))
            };
            match arg.as_str() {
                "--mode" => {
                    opts.mode = match value()?.as_str() {
                        "service" => AgentMode::Service,
                        "process" => AgentMode::Process,
                        other => {
                            return Err(OptionsError::Usage(format!("unknown mode {other:?}")))
                        }
                    }
                }
                "--vsock-port" => {
                    let v = value()?;
                    let port = v
                        .parse()
                        .map_err(|_| OptionsError::Usage(format!("bad port {v:?}")))?;
                    opts.transport = Transport::Vsock { port };
                }
                "--unix" => {
                    opts.transport = Transport::Unix {
                        path: value()?.into(),
                    }
                }
                "--log-level" => opts.log_level = value()?,
                "--isolate-as" => {
                    let v = value()?;
                    let (uid, gid) = parse_ids(&v)
                        .ok_or_else(|| OptionsError::Usage(format!("bad UID:GID {v:?}")))?;
                    opts.isolation = Some(Isolation {
                        uid,
                        gid,
                        usr_local: None,
                    });
                }
                "--usr-local" => usr_local = Some(PathBuf::from(value()?)),
                "-h" | "--help" => return Err(OptionsError::Usage("help requested".into())),
                "-V" | "--version" => return Err(OptionsError::Version),
                other => return Err(OptionsError::Usage(format!("unknown argument {other:?}"))),
            }
        }
        match (&mut opts.isolation, usr_local) {
            (Some(iso), tree) => iso.usr_local = tree,
            (None, Some(_)) => {
                return Err(OptionsError::Usage("--usr-local needs --isolate-as".into()))
            }
            (None, None) => {}
        }
        if opts.isolation.is_some() && opts.mode != AgentMode::Process {
            return Err(OptionsError::Usage(
                "--isolate-as needs --mode process".into(),
            ));
        }
        Ok(opts)
    }

    fn defaults(mode: AgentMode) -> Self {
        Self {
            mode,
            transport: Transport::Vsock {
                port: DEFAULT_AGENT_PORT,
            },
            probe: false,
            log_level: "info".into(),
            modules_file: MODULES_FILE.into(),
            isolation: None,
        }
    }
}

fn apply_cmdline(opts: &mut Options, cmdline: &str) {
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            // An unparsable port keeps the default: the host listens there
            // too only if it meant to, and its boot timeout names the cause.
            "airlock.port" => {
                if let Ok(port) = value.parse() {
                    opts.transport = Transport::Vsock { port };
                }
            }
            "airlock.loglevel" => opts.log_level = value.to_string(),
            "airlock.probe" => opts.probe = value == "1",
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_sets_port_and_probe() {
        let o = Options::from_cmdline("console=ttyS0 quiet airlock.port=2000 airlock.probe=1");
        assert_eq!(o.transport, Transport::Vsock { port: 2000 });
        assert!(o.probe);
        assert_eq!(o.mode, AgentMode::Pid1);
    }

    #[test]
    fn isolation_is_for_host_processes_and_usr_local_needs_it() {
        let args = |a: &str| a.split(' ').map(String::from).collect::<Vec<_>>();
        let o = Options::from_args(
            &args("--usr-local /v --isolate-as 65534:65533 --mode process"),
            "",
        )
        .unwrap();
        assert_eq!(
            o.isolation,
            Some(Isolation {
                uid: 65534,
                gid: 65533,
                usr_local: Some("/v".into())
            })
        );
        for bad in [
            "--mode process --usr-local /v",
            "--isolate-as 1:1",
            "--mode process --isolate-as nobody",
        ] {
            assert!(Options::from_args(&args(bad), "").is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_port_keeps_default() {
        let o = Options::from_cmdline("airlock.port=banana");
        assert_eq!(
            o.transport,
            Transport::Vsock {
                port: DEFAULT_AGENT_PORT
            }
        );
    }

    #[test]
    fn args_override_cmdline() {
        let args: Vec<String> = ["--mode", "process", "--unix", "/tmp/s_1024"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = Options::from_args(&args, "airlock.port=5").unwrap();
        assert_eq!(o.mode, AgentMode::Process);
        assert_eq!(
            o.transport,
            Transport::Unix {
                path: "/tmp/s_1024".into()
            }
        );
    }

    #[test]
    fn unknown_argument_is_an_error() {
        let args = vec!["--frobnicate".to_string()];
        let err = Options::from_args(&args, "").unwrap_err().to_string();
        assert!(
            err.contains("--frobnicate") && err.contains("usage:"),
            "{err}"
        );
    }
}
