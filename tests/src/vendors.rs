//! Harness for the real vendor CLIs' tests (`vendor_clis`,
//! `vendor_failures`): the vendor sandbox (`airlock_fakes::vendors`) on
//! loopback behind airlockd's egress gateway, over TLS from a CA that only
//! the test's airlockd trusts, coturn, and an airlockd whose browser role
//! runs either in browser VMs booted from the `browser` image, or as an
//! isolated host process (its own network namespace with only loopback,
//! the image's vendor layer mounted over its `/usr/local`): the same real
//! CLIs, Chromium and TLS, in seconds instead of minutes under TCG. Also
//! the steps every such test shares: waiting for the vendor's page, and a
//! failure that must end the session at once with the CLI's own words.
//!
//! Nothing here reaches a vendor: browser VMs have no network interface,
//! the isolated host browser has only loopback, and CLI VMs have neither.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use airlock_fakes::vendors::{SandboxConfig, VendorSandbox};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::coturn::Coturn;
use crate::login::state_is;
use crate::{artifacts, toml_path, Daemon, Settings};

/// Under TCG a browser VM shows its first page about a minute after it
/// was asked for; two tests may share the two cores. Gemini CLI (96 MB of
/// bundled JavaScript) has taken three minutes more to show its first
/// menu while another test's VMs were busy.
pub const BROWSER_UP: Duration = Duration::from_secs(480);

/// The images: `make image`'s, or `AIRLOCK_IMAGES_DIR`'s (`make
/// vendor-check` builds some with the newest CLIs there).
pub fn image(kind: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("AIRLOCK_IMAGES_DIR") {
        Some(d) => PathBuf::from(d).join(kind),
        None => artifacts()?.build_dir.join("images").join(kind),
    };
    ensure!(
        dir.join("manifest.json").is_file(),
        "{} is missing: run `make image`",
        dir.display()
    );
    Ok(dir)
}

/// One unpacking at a time within a test binary.
static UNPACKING: Mutex<()> = Mutex::new(());

/// The `browser` image's vendor layer (the pinned CLIs and their Node.js),
/// unpacked once per layer hash under `build/vendor-trees/`; returns its
/// `usr/local`, which the isolated host browser mounts over its own.
pub fn vendor_tree() -> Result<PathBuf> {
    let image = image("browser")?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(image.join("manifest.json"))?)?;
    let sha = manifest["files"]["vendor.squashfs"]["sha256"]
        .as_str()
        .context("the browser image's manifest has no vendor.squashfs hash")?;
    let trees = artifacts()?.build_dir.join("vendor-trees");
    let tree = trees.join(&sha[..16]);
    let usr_local = tree.join("usr/local");
    let _one = UNPACKING.lock().unwrap_or_else(|e| e.into_inner());
    if usr_local.join("bin").is_dir() {
        return Ok(usr_local);
    }
    // Older unpackings go: each is a gigabyte.
    if trees.is_dir() {
        for old in std::fs::read_dir(&trees)?.flatten() {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    std::fs::create_dir_all(&trees)?;
    let partial = trees.join(format!(".{}.partial", &sha[..16]));
    let _ = std::fs::remove_dir_all(&partial);
    let out = Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(&partial)
        .arg(image.join("vendor.squashfs"))
        .output()
        .context("run unsquashfs (make setup installs squashfs-tools)")?;
    if !out.status.success() {
        bail!(
            "unsquashfs of the vendor layer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&partial, &tree)?;
    Ok(usr_local)
}

/// Where the browser role runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrowserRole {
    /// In browser VMs booted from the `browser` image (QEMU).
    Vm,
    /// As an isolated host process with the image's vendor layer.
    IsolatedHost,
}

/// The sandbox, coturn and an airlockd whose browsers reach the sandbox
/// under the vendors' names.
#[derive(Debug)]
pub struct World {
    /// Where its browsers run.
    pub role: BrowserRole,
    /// The vendors' stand-ins.
    pub sandbox: VendorSandbox,
    /// airlockd.
    pub d: Daemon,
    coturn: Coturn,
    _ca: tempfile::TempDir,
}

/// Starts a [`World`]; `tune` adjusts airlockd's settings last.
pub async fn world(role: BrowserRole, tune: impl FnOnce(Settings) -> Settings) -> Result<World> {
    let sandbox = VendorSandbox::start(SandboxConfig::default()).await?;
    let ca = tempfile::tempdir()?;
    let ca_file = ca.path().join("vendor-sandbox-ca.pem");
    std::fs::write(&ca_file, sandbox.ca_pem())?;
    let coturn = Coturn::start()?;
    let mut s = Settings::new("qemu")
        .set("vm", "cli_image", &toml_path(&image("cli")?))
        .set("vm", "boot_timeout_ms", "180000")
        .set("auth", "browser_timeout_ms", "400000")
        .set("auth", "url_timeout_ms", "420000")
        .set("auth", "user_timeout_ms", "900000")
        .set("auth", "confirm_timeout_ms", "120000")
        .set("auth", "extra_ca_file", &toml_path(&ca_file))
        // Fewer frames to encode under TCG: the live view only has to show
        // the page, and two logins share two cores.
        .set("live", "framerate", "10");
    s = match role {
        BrowserRole::Vm => s.set("vm", "browser_image", &toml_path(&image("browser")?)),
        BrowserRole::IsolatedHost => s
            .set("vm", "browser_backend", "\"process\"")
            .set("vm", "unsafe_host_browser", "true")
            .set("vm", "unsafe_host_browser_isolated", "true")
            .set(
                "vm",
                "unsafe_host_browser_usr_local",
                &toml_path(&vendor_tree()?),
            ),
    };
    for (name, addr) in sandbox.egress_routes() {
        s = s.set("egress.routes", &format!("{name:?}"), &format!("{addr:?}"));
    }
    let d = Daemon::start(tune(coturn.settings(s))).await?;
    Ok(World {
        role,
        sandbox,
        d,
        coturn,
        _ca: ca,
    })
}

impl World {
    /// Prints what helps when a test failed.
    pub async fn diagnose(&self) {
        self.d.print_sessions().await;
        self.d.print_diagnostics();
        eprintln!("==== vendor sandbox requests ====");
        for r in self.sandbox.requests() {
            eprintln!("{} {} {} -> {}", r.method, r.host, r.path, r.status);
        }
        for (vendor, oauth) in [
            ("openai", &self.sandbox.openai),
            ("anthropic", &self.sandbox.anthropic),
            ("google", &self.sandbox.google),
        ] {
            eprintln!("==== {vendor} events ====\n{:#?}", oauth.events());
        }
        eprintln!("==== coturn log ====\n{}", self.coturn.log());
    }
}

/// Runs `body` in a fresh [`World`]; diagnoses when it fails. Every VM
/// and host browser is torn down however it ends (the `Daemon`).
pub async fn with_world(
    role: BrowserRole,
    tune: impl FnOnce(Settings) -> Settings,
    body: impl AsyncFnOnce(&World) -> Result<()>,
) -> Result<()> {
    let w = world(role, tune).await?;
    let result = body(&w).await;
    if result.is_err() {
        w.diagnose().await;
    }
    result
}

/// Starts a session for `provider` and waits until the vendor's sign-in
/// page (served at `authorize_path`) is on screen; returns the view with
/// its viewer link.
pub async fn awaiting_user(
    d: &Daemon,
    user: &str,
    provider: &str,
    authorize_path: &str,
) -> Result<Value> {
    d.start_until_page(user, provider, authorize_path, BROWSER_UP)
        .await
}

/// A failure the real CLI reports ends the session at once with the CLI's
/// own words: signs in (allowing or denying) through the API's input and
/// waits for the session to fail, which must happen within `within` of
/// the decision (far from any timeout), with each of `expect` in its
/// error.
pub async fn fails_with(
    w: &World,
    provider: &str,
    authorize_path: &str,
    allow: bool,
    expect: &[&str],
    within: Duration,
) -> Result<()> {
    let v = awaiting_user(&w.d, &format!("{provider}-fails"), provider, authorize_path).await?;
    let id = v["sessionId"].as_str().context("sessionId")?;
    w.d.sign_in_on_shown_page(id, allow).await?;
    let acted = std::time::Instant::now();
    let done =
        w.d.wait_session(id, Duration::from_secs(180), |v| {
            v["state"] == "failed" || v["state"] == "completed"
        })
        .await?;
    let took = acted.elapsed();
    let error = done["error"].as_str().unwrap_or_default();
    ensure!(
        state_is(&done, "failed"),
        "the session {}: {done:#}",
        done["state"]
    );
    for e in expect {
        ensure!(
            error.contains(e),
            "the session's error lacks {e:?}: {error}"
        );
    }
    ensure!(
        took < within,
        "the session failed {took:?} after the decision (allowed {within:?}): {error}"
    );
    println!("{provider}: failed {took:?} after the decision: {error}");
    Ok(())
}
