//! airlockd's life: prepare directories, take over the VMs and sessions an
//! earlier airlockd left (or clean up after it), choose the backend, serve
//! the API, and on SIGTERM/SIGINT stop serving and either leave the VMs
//! running for the next airlockd (`vm.keep_on_exit`) or tear them down.
//! Called by `main`.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::AppState;
use crate::config::{BackendKind, Config};
use crate::egress::{Egress, EgressError};
use crate::listeners::{ListenError, Listeners};
use crate::live::Live;
use crate::providers::Providers;
use crate::server::{Server, ServerError};
use crate::session::Sessions;
use crate::store::CredentialStore;
use crate::vm::account::VmAccount;
use crate::vm::backend::VmBackend;
use crate::vm::confine::Confinement;
use crate::vm::firecracker::FirecrackerBackend;
use crate::vm::process::{HostBrowserIsolation, ProcessBackend};
use crate::vm::qemu::QemuBackend;
use crate::vm::VmManager;

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A directory could not be created.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The expected agent build is unknown.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// The API could not be served.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A listener could not be set up.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The provider profiles are unusable.
    #[error(transparent)]
    Providers(#[from] crate::providers::ProviderError),
    /// The credential store cannot be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// VM processes cannot be confined as configured.
    #[error("cannot confine VM processes: {0}")]
    Confine(String),
    /// Host-process browsers cannot be set up safely.
    #[error("unsafe host browser: {0}")]
    HostBrowser(String),
    /// The egress settings are unusable.
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// The demo OAuth server cannot be set up.
    #[error("demo OAuth server: {0}")]
    Demo(String),
}

fn make_dir(path: &std::path::Path) -> Result<(), DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| DaemonError::Dir {
            path: path.to_path_buf(),
            source,
        })
}

/// Runs until SIGTERM or SIGINT; returns after every session and VM is
/// torn down.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    check_demo(config.auth.demo, cfg!(feature = "demo"))?;
    let started = Instant::now();
    let config = Arc::new(config);
    let failed_dir = config.paths.state_dir.join("failed-vms");
    make_dir(&config.paths.run_dir)?;
    make_dir(&config.paths.run_dir.join("vms"))?;
    make_dir(&failed_dir)?;
    // The socket's group must reach it inside run_dir: search-only, so
    // they can neither list nor enter the VMs' directories.
    let group_reaches_socket = config.server.socket_group.is_some();
    if config.vm.unsafe_host_browser || group_reaches_socket {
        std::fs::set_permissions(
            &config.paths.run_dir,
            std::fs::Permissions::from_mode(0o711),
        )
        .map_err(|source| DaemonError::Dir {
            path: config.paths.run_dir.clone(),
            source,
        })?;
    }
    if config.vm.unsafe_host_browser || vms_run_as_another_account(&config) {
        // A host-process browser's agent, or QEMU, runs as another account
        // and must reach its own VM's directory (which it is given);
        // search-only, so it cannot list or enter the others.
        for dir in [
            config.paths.run_dir.clone(),
            config.paths.run_dir.join("vms"),
        ] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|source| DaemonError::Dir { path: dir, source })?;
        }
    }
    // Read before anything can create a VM directory beside them.
    let found = crate::vm::adopt::scan(&config.paths.run_dir);
    let expected = crate::image::expected_agent(&config.vm)?;
    crate::image::warn_if_stale(&config.vm, &expected);
    let providers = Providers::load(&config.auth.providers_file, config.auth.demo)?;
    let store = CredentialStore::open(&config.store).await?;
    let shutdown = CancellationToken::new();
    let background = TaskTracker::new();
    let backend = make_backend(config.vm.backend, &config, &background, &shutdown)?;
    let browser_backend = config
        .vm
        .browser_backend
        .filter(|k| *k != config.vm.backend)
        .map(|k| make_backend(k, &config, &background, &shutdown))
        .transpose()?;
    let mut auth = config.auth.clone();
    let egress = Egress::new(config.egress.clone())?;
    let (demo, egress) = demo_oauth(&config, &mut auth, egress).await?;
    let vms = VmManager::new(
        config.clone(),
        (backend, browser_backend),
        expected,
        Arc::new(egress),
        shutdown.child_token(),
    );
    let listeners = Listeners::bind(&config).await?;
    if let Some((demo_server, demo_app)) = demo {
        let stop = shutdown.clone();
        background.spawn(async move { demo_server.run(demo_app, stop).await });
    }
    match crate::session::browser_spec(&auth) {
        Ok(spec) => vms.enable_snapshots(spec),
        Err(e) => tracing::warn!(error = %e, "no browser VM snapshots: sessions will fail too"),
    }
    let live = Live::new(config.live.clone(), vms.clone(), listeners.viewer_base());
    let sessions = Sessions::new(
        vms.clone(),
        store,
        providers,
        auth,
        live.clone(),
        shutdown.child_token(),
    );
    sessions.resume(found).await;
    let state = AppState {
        vms: vms.clone(),
        sessions: sessions.clone(),
        live,
        started,
    };
    watch_signals(&background, shutdown.clone())?;
    if let Some(ca) = &config.auth.extra_ca_file {
        // Whoever holds this CA's key can impersonate any site to logins.
        tracing::warn!(path = %ca.display(), "auth.extra_ca_file is set: browser VMs and login CLIs trust this CA besides the system's (meant for tests against a vendor sandbox)");
    }
    tracing::info!(backend = ?config.vm.backend, demo = config.auth.demo, "airlockd ready");
    // On SIGTERM sessions and VMs start tearing down while requests drain.
    listeners.serve(state, &config, shutdown.clone()).await;
    tracing::info!("stopping: waiting for sessions and VMs");
    sessions.shutdown().await;
    vms.shutdown().await;
    background.close();
    background.wait().await;
    tracing::info!("airlockd stopped");
    Ok(())
}

/// Where the demo OAuth server is mounted on its listener.
pub const DEMO_PATH: &str = "/demo/oauth";

/// The name browser VMs reach the demo OAuth server under (an egress
/// route: it runs on this host's loopback, which they may not reach).
pub const DEMO_HOST: &str = "demo-oauth.airlock.internal";

/// Why `auth.demo` cannot be on in this build.
pub const DEMO_NOT_BUILT: &str = "auth.demo is on, but this airlockd was built without the demo \
    OAuth server (cargo feature `demo`, which `make run` and `make test` turn on); \
    turn auth.demo off in production";

/// A demo OAuth server and the app it serves.
type DemoServer = Option<(Server, axum::Router)>;

/// Refuses `auth.demo` in a build without the demo OAuth server, before
/// anything is set up.
fn check_demo(demo: bool, built: bool) -> Result<(), DaemonError> {
    match demo && !built {
        true => Err(DaemonError::Demo(DEMO_NOT_BUILT.into())),
        false => Ok(()),
    }
}

/// A production build: no demo OAuth server ([`check_demo`] refused
/// `auth.demo` at start).
#[cfg(not(feature = "demo"))]
async fn demo_oauth(
    _config: &Config,
    _auth: &mut crate::config::AuthConfig,
    egress: Egress,
) -> Result<(DemoServer, Egress), DaemonError> {
    Ok((None, egress))
}

/// The demo OAuth server, when `auth.demo` is on: on a listener of its own
/// (`auth.demo_listen`), never on the API's, so that browser VMs can be
/// allowed to reach it and nothing else here. Points the demo CLI at it.
#[cfg(feature = "demo")]
async fn demo_oauth(
    config: &Config,
    auth: &mut crate::config::AuthConfig,
    egress: Egress,
) -> Result<(DemoServer, Egress), DaemonError> {
    use airlock_fakes::oauth::{FakeOAuth, FakeOAuthConfig};
    if !auth.demo {
        return Ok((None, egress));
    }
    let limits = crate::server::Limits::from(&config.server);
    let server = Server::bind_tcp(auth.demo_listen, None, limits).await?;
    let addr = server
        .local_addr()
        .ok_or_else(|| DaemonError::Demo("its listener has no address".into()))?;
    // Browser VMs without a network reach it through their gateway under a
    // name; a host-process browser reaches the address itself.
    let vms_isolated =
        config.vm.browser_backend.unwrap_or(config.vm.backend) != BackendKind::Process;
    let (base_url, egress) = match vms_isolated {
        true => (
            format!("http://{DEMO_HOST}:{}{DEMO_PATH}", addr.port()),
            egress.with_route(DEMO_HOST, addr.port(), addr),
        ),
        false => (format!("http://{addr}{DEMO_PATH}"), egress),
    };
    let fake = FakeOAuth::new(FakeOAuthConfig {
        base_url: base_url.clone(),
        ..FakeOAuthConfig::default()
    })
    .map_err(|e| DaemonError::Demo(e.to_string()))?;
    auth.login_env
        .entry("AIRLOCK_FAKE_OAUTH_URL".into())
        .or_insert(base_url.clone());
    tracing::warn!(%base_url, listen = %addr, "the demo OAuth server is on (development only)");
    let app = axum::Router::new().nest(DEMO_PATH, fake.router());
    Ok((Some((server, app)), egress))
}

/// True when QEMU runs as `qemu.run_as` (airlockd is root and some VMs
/// use QEMU).
fn vms_run_as_another_account(config: &Config) -> bool {
    let qemu = config.vm.backend == BackendKind::Qemu
        || config.vm.browser_backend == Some(BackendKind::Qemu);
    qemu && !config.qemu.run_as.is_empty() && nix::unistd::geteuid().is_root()
}

fn make_backend(
    kind: BackendKind,
    config: &Arc<Config>,
    background: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn VmBackend>, DaemonError> {
    Ok(match kind {
        BackendKind::Qemu => {
            let confine = Confinement::from_config(&config.qemu, &config.paths.run_dir)
                .map_err(DaemonError::Confine)?;
            let mut qemu_config = config.qemu.clone();
            confine
                .resolve_binaries(&mut qemu_config)
                .map_err(DaemonError::Confine)?;
            let qemu = Arc::new(QemuBackend::new(
                qemu_config,
                config.vm.clone(),
                config.paths.state_dir.clone(),
                confine,
            ));
            // Decide KVM/TCG now, so the first VM does not pay for the probe.
            let (probe, stop) = (qemu.clone(), shutdown.clone());
            background.spawn(async move {
                tokio::select! { _ = probe.detect_accel() => {}, _ = stop.cancelled() => {} }
            });
            qemu
        }
        // Checks its binary and /dev/kvm at each launch, like QEMU's.
        BackendKind::Firecracker => Arc::new(FirecrackerBackend::new(
            config.firecracker.clone(),
            config.vm.clone(),
        )),
        BackendKind::Process => Arc::new(ProcessBackend::new(
            config.vm.agent_binary.clone(),
            config.vm.console_max_bytes,
            host_browser_user(config)?,
            HostBrowserIsolation {
                isolated: config.vm.unsafe_host_browser_isolated,
                usr_local: config.vm.unsafe_host_browser_usr_local.clone(),
            },
        )),
    })
}

/// The account host-process browsers run as, after checking it can reach
/// the agent, the streamer beside it and the login's extra `PATH`.
fn host_browser_user(config: &Config) -> Result<Option<VmAccount>, DaemonError> {
    if !config.vm.unsafe_host_browser {
        return Ok(None);
    }
    let user = VmAccount::lookup(
        &config.vm.unsafe_host_browser_user,
        "vm.unsafe_host_browser_user",
    )
    .map_err(DaemonError::HostBrowser)?;
    if config.vm.unsafe_host_browser_isolated && user.is_none() {
        return Err(DaemonError::HostBrowser(
            "vm.unsafe_host_browser_isolated needs airlockd to run as root (the agent unshares namespaces and mounts before it drops to vm.unsafe_host_browser_user)".into(),
        ));
    }
    if let Some(tree) = &config.vm.unsafe_host_browser_usr_local {
        if !tree.join("bin").is_dir() {
            return Err(DaemonError::HostBrowser(format!(
                "vm.unsafe_host_browser_usr_local {} is not a /usr/local tree (no bin/ in it)",
                tree.display()
            )));
        }
    }
    if let Some(u) = &user {
        let agent = &config.vm.agent_binary;
        let streamer = agent.with_file_name("airlock-streamer");
        let extra = config
            .auth
            .login_path_append
            .iter()
            .map(|d| Path::new(d).join("x"));
        for path in [agent.clone(), streamer].into_iter().chain(extra) {
            u.check_reachable(&path).map_err(DaemonError::HostBrowser)?;
        }
    }
    tracing::warn!(
        user = %config.vm.unsafe_host_browser_user,
        "browser VMs run as host processes (vm.unsafe_host_browser): fast tests only, never in production"
    );
    Ok(user)
}

fn watch_signals(tracker: &TaskTracker, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    tracker.spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = shutdown.cancelled() => return,
        }
        shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_the_demo_refuses_auth_demo_saying_what_to_do() {
        let e = check_demo(true, false).unwrap_err().to_string();
        assert!(e.contains("cargo feature `demo`"), "{e}");
        assert!(e.contains("turn auth.demo off"), "{e}");
        assert!(check_demo(false, false).is_ok());
        assert!(check_demo(true, true).is_ok());
    }
}
