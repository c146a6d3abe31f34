//! The `BROWSER` / `xdg-open` shim. A login puts a directory first on the
//! CLI's `PATH` whose `xdg-open`, `x-www-browser`, ... are symlinks to the
//! agent binary, and sets `BROWSER` to one of them. Started under one of
//! those names, the agent sends its URL argument to the login that owns the
//! socket in `AIRLOCK_OPENER_SOCKET` and exits 0, as a browser opener does.
//! [`run_if_shim`] is called first thing by `main_entry`; the listening side
//! is used by [`super::session`].

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// Environment variable naming the login's opener socket.
pub const SOCKET_ENV: &str = "AIRLOCK_OPENER_SOCKET";

/// Names under which the binary acts as the shim (what CLIs call).
pub const SHIM_NAMES: &[&str] = &[
    "xdg-open",
    "x-www-browser",
    "sensible-browser",
    "www-browser",
    "open",
];

/// Longest URL accepted from a shim.
const MAX_URL: u64 = 8 << 10;

/// When started as a shim, forwards the URL and returns the exit code.
pub fn run_if_shim() -> Option<ExitCode> {
    let argv0 = std::env::args_os().next()?;
    let name = Path::new(&argv0)
        .file_name()?
        .to_string_lossy()
        .into_owned();
    if !SHIM_NAMES.contains(&name.as_str()) {
        return None;
    }
    let url = std::env::args().nth(1).unwrap_or_default();
    Some(match forward(&url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            // xdg-open's code for "no application to open the URL".
            ExitCode::from(3)
        }
    })
}

fn forward(url: &str) -> Result<(), String> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(format!("not an http(s) URL: {url:?}"));
    }
    let socket = std::env::var_os(SOCKET_ENV).ok_or_else(|| format!("{SOCKET_ENV} is not set"))?;
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)
        .map_err(|e| format!("cannot reach the agent: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{url}").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| e.to_string())?;
    if reply.trim() == "ok" {
        Ok(())
    } else {
        Err(format!("the agent refused: {}", reply.trim()))
    }
}

/// Creates `dir` with the shim names linked to this executable; returns
/// the path to use as `BROWSER`.
pub fn install_shims(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let exe = std::env::current_exe()?;
    for name in SHIM_NAMES {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link)?;
    }
    Ok(dir.join("xdg-open"))
}

/// Receives URLs from shims of one login.
#[derive(Debug)]
pub struct OpenerListener {
    listener: UnixListener,
}

impl OpenerListener {
    /// Listens on `path`.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        Ok(Self {
            listener: UnixListener::bind(path)?,
        })
    }

    /// The next URL a shim sends (acknowledged so the shim exits 0).
    /// Cancel-safe between connections.
    pub async fn next_url(&self) -> std::io::Result<String> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_URL))
                    .read_line(&mut line)
                    .await
            })
            .await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                continue;
            }
            let _ = wr.write_all(b"ok\n").await;
            return Ok(line.trim().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shim_hands_its_url_over() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("opener.sock");
        let listener = OpenerListener::bind(&sock).unwrap();
        std::env::set_var(SOCKET_ENV, &sock);
        let shim = tokio::task::spawn_blocking(|| forward("https://auth.example/authorize?x=1"));
        assert_eq!(
            listener.next_url().await.unwrap(),
            "https://auth.example/authorize?x=1"
        );
        assert_eq!(shim.await.unwrap(), Ok(()));
        assert!(
            forward("file:///etc/passwd").is_err(),
            "only web URLs are forwarded"
        );
    }
}
