//! A real PostgreSQL server for one test, for the credential store suite
//! (`tests/tests/store.rs`) and anything else that needs a database.
//!
//! [`Postgres::start`] runs Debian's server binaries
//! (`/usr/lib/postgresql/<ver>/bin`, from the `postgresql` package) on a
//! fresh cluster in a temp dir: `initdb --auth=trust`, then `pg_ctl -w
//! start`, which itself waits until the server accepts connections. The
//! server listens on 127.0.0.1 on a free port and on a Unix socket in the
//! temp dir, and is tuned for throwaway data (no fsync). Dropping the
//! [`Postgres`] stops it (`pg_ctl -m fast stop`, SIGKILL as a backstop)
//! and removes the directory; when the test is panicking the server log is
//! printed first.
//!
//! PostgreSQL refuses to run as root, so under root the binaries run as
//! the `postgres` system user (the temp dir is chowned to it); otherwise
//! as the current user.

use std::fmt;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, geteuid, Gid, Pid, Uid, User};

/// Where Debian installs the server binaries, one directory per version.
const PG_ROOT: &str = "/usr/lib/postgresql";
/// Ports tried before giving up (another process may grab a free port
/// between our probe and the server's bind).
const START_ATTEMPTS: usize = 5;
/// Seconds `pg_ctl` may wait for the server to start or stop.
const PG_CTL_TIMEOUT_S: &str = "60";

/// A running PostgreSQL server owned by one test.
pub struct Postgres {
    /// `postgres://postgres@127.0.0.1:PORT/postgres` (superuser, trust auth).
    pub url: String,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// Directory of the server's Unix socket (`.s.PGSQL.PORT`).
    pub socket_dir: PathBuf,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    run_as: Option<(Uid, Gid)>,
    running: bool,
    // Declared last: removed after the server has stopped.
    dir: tempfile::TempDir,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.url)
            .field("data", &self.data)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl Postgres {
    /// Creates a cluster in a temp dir and starts a server on it. Blocks
    /// for about a second (call it from `spawn_blocking` in async code
    /// that runs other tasks meanwhile).
    pub fn start() -> Result<Self> {
        let bin = server_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("airlock-pg")
            .tempdir_in("/tmp")?;
        let run_as = if geteuid().is_root() {
            let user = User::from_name("postgres")?.context(
                "running as root, PostgreSQL must run as the `postgres` user, which does not \
                 exist: `make test` installs the `postgresql` package that creates it",
            )?;
            chown(dir.path(), Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {} to postgres", dir.path().display()))?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        let mut pg = Self {
            url: String::new(),
            port: 0,
            socket_dir: dir.path().to_path_buf(),
            data: dir.path().join("data"),
            log: dir.path().join("server.log"),
            bin,
            run_as,
            running: false,
            dir,
        };
        pg.init_cluster()?;
        pg.start_on_free_port()?;
        Ok(pg)
    }

    /// The cluster's data directory (tests may scan its files).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), n)
    }

    /// Stops the server (`pg_ctl -m fast stop`, which waits for it to exit).
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let out = self.pg_ctl(&["-m", "fast", "stop"])?;
        if !out.status.success() {
            bail!("pg_ctl stop failed: {}", output_text(&out));
        }
        self.running = false;
        Ok(())
    }

    fn init_cluster(&self) -> Result<()> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data)
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--no-locale", "--no-sync"])
            .output()
            .context("run initdb")?;
        if !out.status.success() {
            bail!("initdb failed ({}): {}", out.status, output_text(&out));
        }
        Ok(())
    }

    fn start_on_free_port(&mut self) -> Result<()> {
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port()?;
            self.write_settings(port)?;
            let out = self.pg_ctl(&["-l", path_str(&self.log)?, "start"])?;
            if out.status.success() {
                self.running = true;
                self.port = port;
                self.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                return Ok(());
            }
            let log = self.log_tail(20);
            if !log.contains("could not bind") && !log.contains("already in use") {
                bail!(
                    "PostgreSQL did not start: {}\n==== server log ====\n{log}",
                    output_text(&out)
                );
            }
            eprintln!("postgres: port {port} was taken (attempt {attempt}); trying another");
        }
        bail!(
            "PostgreSQL could not bind a free port in {START_ATTEMPTS} attempts:\n{}",
            self.log_tail(20)
        )
    }

    /// Appends the test settings to `postgresql.conf` (later lines win, so
    /// a retry with another port just appends again).
    fn write_settings(&self, port: u16) -> Result<()> {
        let conf = self.data.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .with_context(|| format!("open {}", conf.display()))?;
        writeln!(
            file,
            "\n# airlock test server\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 50",
            self.socket_dir.display()
        )?;
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output> {
        self.command("pg_ctl")
            .args(["-w", "-t", PG_CTL_TIMEOUT_S, "-D"])
            .arg(&self.data)
            .args(args)
            // pg_ctl start leaves the server holding its stdout; a pipe
            // would never reach EOF, so its output goes to the log instead.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("run pg_ctl {}", args.join(" ")))
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        // The test's working directory may be unreadable for `postgres`.
        cmd.current_dir(self.dir.path())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        if let Some((uid, gid)) = self.run_as {
            // std drops root's supplementary groups when switching uid.
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    /// Last resort when `pg_ctl stop` failed: SIGKILL the postmaster.
    fn kill_postmaster(&self) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== PostgreSQL log (last 40 lines) ====\n{}",
                self.log_tail(40)
            );
        }
        if let Err(e) = self.stop() {
            eprintln!("postgres: {e:#}; killing the postmaster");
            self.kill_postmaster();
        }
    }
}

/// The newest `/usr/lib/postgresql/<ver>/bin` that has the server binaries.
fn server_bin_dir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(PG_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries not found in {PG_ROOT}/<version>/bin: \
             `make test` installs the `postgresql` package (or run `apt-get install -y postgresql`)"
        )
    })
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("probe a free port")?;
    Ok(listener.local_addr()?.port())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_string()
}
