//! Opening the demo CLI's authorize URL in a browser the way the Rust
//! `webbrowser` crate does on Linux. It tries, in order (webbrowser-rs
//! `src/unix.rs`): every entry of `$BROWSER` (colon-separated, `%s` = URL,
//! `%c` = `:`, `%%` = `%`; URL appended when no `%s`), then `xdg-settings
//! get default-web-browser` and that desktop file's `Exec=` line, then
//! desktop-specific openers (`gio open`, `kde-open`, `exo-open` …), then
//! `x-www-browser`. It does not run `xdg-open` itself. GUI browsers are
//! spawned in the background with stdio detached; known text browsers run
//! in the foreground.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// No opener could be started.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing usable was found (the `webbrowser` crate's words).
    #[error("No valid browsers detected. You can specify one in BROWSER environment variable")]
    NotFound,
}

const TEXT_BROWSERS: [&str; 9] = [
    "lynx", "links", "links2", "elinks", "w3m", "eww", "netrik", "retawq", "curl",
];

/// Like `webbrowser::open(url)` on Linux.
pub fn open_like_webbrowser_crate(url: &str) -> Result<(), OpenError> {
    if try_browser_env(url) || try_xdg_settings(url) || try_desktop(url) {
        return Ok(());
    }
    if run(&["x-www-browser", url]) {
        Ok(())
    } else {
        Err(OpenError::NotFound)
    }
}

fn try_browser_env(url: &str) -> bool {
    let value = std::env::var("BROWSER").unwrap_or_default();
    value.split(':').filter(|b| !b.is_empty()).any(|browser| {
        let cmdline = browser
            .replace("%s", url)
            .replace("%c", ":")
            .replace("%%", "%");
        let mut argv: Vec<&str> = cmdline.split_ascii_whitespace().collect();
        if !browser.contains("%s") {
            argv.push(url);
        }
        run(&argv)
    })
}

fn try_xdg_settings(url: &str) -> bool {
    let Some(program) = find_executable("xdg-settings") else {
        return false;
    };
    let Ok(out) = Command::new(program)
        .args(["get", "default-web-browser"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if name.is_empty() {
        return false;
    }
    xdg_data_dirs().into_iter().any(|dir| {
        let apps = dir.join("applications");
        let direct = apps.join(&name);
        let file = if direct.is_file() {
            direct
        } else {
            apps.join(name.replace('-', "/"))
        };
        desktop_exec(&file).is_some_and(|exec| {
            let mut argv: Vec<&str> = Vec::new();
            let mut url_added = false;
            for arg in exec.split_ascii_whitespace() {
                if matches!(arg, "%u" | "%U" | "%f" | "%F") {
                    url_added = true;
                    argv.push(url);
                } else {
                    argv.push(arg);
                }
            }
            if !url_added {
                argv.push(url);
            }
            run(&argv)
        })
    })
}

/// The `Exec=` of a desktop file's `[Desktop Entry]`, unless it is hidden.
fn desktop_exec(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut in_entry = false;
    let (mut exec, mut hidden) = (None, false);
    for line in text.lines() {
        if line == "[Desktop Entry]" {
            in_entry = true;
        } else if line.starts_with('[') {
            in_entry = false;
        } else if in_entry && !line.starts_with('#') {
            if let Some(v) = line.strip_prefix("Exec=") {
                exec = Some(v.to_string());
            } else if line == "Hidden=true" {
                hidden = true;
            }
        }
    }
    exec.filter(|_| !hidden)
}

fn xdg_data_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let home = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    dirs.extend(home);
    match std::env::var("XDG_DATA_DIRS") {
        Ok(list) => dirs.extend(list.split(':').map(PathBuf::from)),
        Err(_) => dirs.extend([
            PathBuf::from("/usr/local/share"),
            PathBuf::from("/usr/share"),
        ]),
    }
    dirs
}

fn try_desktop(url: &str) -> bool {
    let current = std::env::var("XDG_CURRENT_DESKTOP")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let session = std::env::var("DESKTOP_SESSION")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let candidates: &[&[&str]] =
        if current.contains("gnome") || current.contains("cinnamon") || session.contains("gnome") {
            &[&["gio", "open"], &["gvfs-open"], &["gnome-open"]]
        } else if current.contains("kde") || std::env::var_os("KDE_FULL_SESSION").is_some() {
            &[&["kde-open"], &["kde-open5"], &["kfmclient", "newTab"]]
        } else if current.contains("mate") || session.contains("mate") {
            &[&["gio", "open"], &["gvfs-open"], &["mate-open"]]
        } else if current.contains("xfce") || session.contains("xfce") {
            &[&["exo-open"], &["gio", "open"], &["gvfs-open"]]
        } else {
            &[]
        };
    candidates.iter().any(|prefix| {
        let mut argv = prefix.to_vec();
        argv.push(url);
        run(&argv)
    })
}

/// A command name resolved the way the crate does: a name with a `/` is
/// used as is, anything else is looked up on `PATH`; either way it must be
/// an executable file.
fn find_executable(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| is_exec(p))
}

/// Runs `argv`: in the background with stdio detached for GUI browsers,
/// waited for (and judged by its exit status) for text browsers.
fn run(argv: &[&str]) -> bool {
    let Some((name, args)) = argv.split_first() else {
        return false;
    };
    let Some(program) = find_executable(name) else {
        return false;
    };
    let text = TEXT_BROWSERS.iter().any(|t| program.ends_with(t));
    let mut cmd = Command::new(&program);
    cmd.args(args);
    if text {
        return cmd.status().is_ok_and(|s| s.success());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let spawned = cmd.spawn().is_ok();
    tracing::debug!(program = %program.display(), spawned, "browser opener");
    spawned
}
