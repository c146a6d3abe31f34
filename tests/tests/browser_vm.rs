//! Browser VMs for real: logins run in QEMU microVMs booted from the
//! `browser` golden image (Chromium, Xvfb and the streamer inside, no
//! network interface), and credentials land in CLI VMs booted from the
//! `cli` image (systemd starts the agent, the home disk persists).
//!
//! - The demo login end to end, driven through the viewer page in a
//!   headless Chromium on this host (clicks and keys on the video, which
//!   reaches the viewer over a real coturn: the VM's media leaves as TURN
//!   over TCP through airlockd's egress gateway), the credential read back
//!   in the CLI VM with mode 0600, and no browser-role Chromium on the host.
//! - Egress: the VM has no interface but `lo`; a command and a page are
//!   refused for a destination the profile does not name, airlockd's API,
//!   a loopback service of this host (also by a name that resolves to it)
//!   and a private address; an allowed destination works; refusals count.
//! - A browser VM killed mid-login fails its session at once with the
//!   console's tail, and its logs are kept.
//! - A browser VM with too little memory fails with a reason that says so.
//! - A browser image whose agent differs is refused, naming the image.
//! - The CLI image: systemd is PID 1 and started the agent; the home disk
//!   keeps its files across that user's VMs.
//!
//! Every VM is torn down however a test ends (the harness's `Daemon`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_tests::coturn::Coturn;
use airlock_tests::live::demo_login_through_viewer;
use airlock_tests::login::{loaded, state_is, step_events};
use airlock_tests::{artifacts, golden_image, Daemon, Settings};
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

/// Under TCG a browser VM shows its first page about a minute after it
/// was asked for; two tests may share the two cores.
const BROWSER_UP: Duration = Duration::from_secs(300);

/// airlockd with browser and CLI VMs from the golden images, the demo
/// provider, and `coturn` for the live view.
fn settings(coturn: &Coturn) -> Result<Settings> {
    let path = |p: PathBuf| format!("{:?}", p.display().to_string());
    let s = Settings::new("qemu")
        .set("vm", "browser_image", &path(golden_image("browser")?))
        .set("vm", "cli_image", &path(golden_image("cli")?))
        .set("vm", "boot_timeout_ms", "180000")
        .set("auth", "demo", "true")
        .set("auth", "browser_timeout_ms", "400000")
        .set("auth", "login_path_append", "[\"/usr/lib/airlock/fakes\"]");
    Ok(coturn.settings(s))
}

/// Starts a demo session and waits until its sign-in page is on screen;
/// returns the session's view then, with its viewer link.
async fn awaiting_user(d: &Daemon, user: &str) -> Result<Value> {
    d.start_until_page(user, "demo", "/authorize", BROWSER_UP)
        .await
}

/// Runs `body` against a fresh airlockd (and coturn); prints sessions and
/// diagnostics when it fails.
async fn with_vms(
    tune: impl FnOnce(Settings) -> Settings,
    body: impl AsyncFnOnce(&Daemon, &Coturn) -> Result<()>,
) -> Result<()> {
    let coturn = Coturn::start()?;
    let d = Daemon::start(tune(settings(&coturn)?)).await?;
    let result = body(&d, &coturn).await;
    if result.is_err() {
        d.print_sessions().await;
        d.print_diagnostics();
        eprintln!("==== coturn log ====\n{}", coturn.log());
    }
    result
}

fn chromium_children_of(pid: i32) -> Vec<i32> {
    airlock_tests::cdp::children_named(pid, "chromium")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_login_runs_in_a_browser_vm_through_the_viewer_page() -> Result<()> {
    with_vms(|s| s, async |d, _| {
        let v = awaiting_user(d, "vm-alice").await?;
        // Chromium in the VM: an unprivileged user, its own sandbox on.
        let vm = v["browserVmId"].as_str().context("browserVmId")?;
        let list = "for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); \
                    case \"$c\" in /usr/lib/chromium/*) echo \"$(awk '/^Uid:/ {print $2}' $p/status) $c\";; esac; done";
        let out = d.exec(vm, &["sh", "-c", list]).await?;
        let procs: Vec<&str> = out["stdout"].as_str().unwrap_or("").lines().collect();
        ensure!(procs.len() >= 3, "Chromium's processes in the VM: {out}");
        for p in &procs {
            ensure!(!p.starts_with("0 "), "a Chromium process runs as root: {p}");
            ensure!(!p.contains("--no-sandbox"), "Chromium runs without its sandbox: {p}");
        }
        let (done, _viewer) = demo_login_through_viewer(d, &v).await?;
        ensure!(
            chromium_children_of(d.pid()).is_empty(),
            "a browser-role Chromium runs on the host"
        );
        let events = step_events(&done);
        ensure!(events.iter().any(|e| e == "streamerRunning"), "{events:?}");
        ensure!(events.iter().any(|e| e == "egress"), "{events:?}");
        let vm = done["cliVmId"].as_str().context("cliVmId")?;
        let stat = d
            .exec(vm, &["stat", "-c", "%a %U", "/root/.airlock-demo/credentials.json"])
            .await?;
        ensure!(stat["stdout"] == "600 root\n", "{stat}");
        let init = d.exec(vm, &["cat", "/proc/1/comm"]).await?;
        ensure!(init["stdout"] == "systemd\n", "PID 1 of the CLI VM: {init}");
        Ok(())
    })
    .await
}

/// Runs `curl` in the VM (through the agent, so through its proxy unless
/// `--noproxy` says otherwise); returns its exit code and output.
async fn curl(d: &Daemon, vm: &str, args: &[&str]) -> Result<(i64, String)> {
    let mut argv = vec![
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ];
    argv.extend_from_slice(args);
    let out = d.exec(vm, &argv).await?;
    let text = format!(
        "{}{}",
        out["stdout"].as_str().unwrap_or(""),
        out["stderr"].as_str().unwrap_or("")
    );
    Ok((out["exitCode"].as_i64().unwrap_or(-1), text))
}

async fn egress_of(d: &Daemon, vm: &str) -> Result<Value> {
    let (status, v) = d
        .request(Method::GET, &format!("/api/vms/{vm}"), None)
        .await?;
    ensure!(status == 200, "{status} {v}");
    Ok(v["egress"].clone())
}

/// Where a probe page's reports arrive: `(target, outcome)`, the outcome
/// `unreachable`, `refused` (by airlock's proxy) or `reached`.
type Reports = tokio::sync::mpsc::UnboundedReceiver<(String, String)>;

/// The probe page's server. `GET /` is a page that asks `GET /targets`
/// for its list (set by the test once airlockd listens), tries to fetch
/// each (as a hostile page would) and reports each outcome with
/// `GET /report?outcome=...&target=...`, which lands on the returned
/// receiver.
async fn probe_server() -> Result<(u16, Arc<Mutex<Vec<String>>>, Reports)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let targets = Arc::new(Mutex::new(Vec::<String>::new()));
    let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
    // A no-cors fetch rejects only when nothing answered; a readable
    // answer starting with "airlock:" is the agent's proxy refusing.
    let page = "<!doctype html><title>probe</title><script>(async () => {\n\
        const targets = await (await fetch('/targets')).json();\n\
        for (const t of targets) { let outcome = 'unreachable';\n\
          try { await fetch(t, { mode: 'no-cors', cache: 'no-store', signal: AbortSignal.timeout(30000) });\n\
            outcome = 'reached';\n\
            try { const r = await fetch(t, { cache: 'no-store', signal: AbortSignal.timeout(30000) });\n\
              if (r.status === 403 && (await r.text()).startsWith('airlock:')) outcome = 'refused'; } catch (e) {}\n\
          } catch (e) {}\n\
          await fetch('/report?outcome=' + outcome + '&target=' + encodeURIComponent(t)); }\n\
        })();</script>";
    let list = targets.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (tx, list) = (tx.clone(), list.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let body = if path == "/targets" {
                    serde_json::to_string(&*list.lock().unwrap_or_else(|p| p.into_inner()))
                        .unwrap_or_default()
                } else if let Some(query) = path.strip_prefix("/report?") {
                    let q: std::collections::HashMap<String, String> =
                        url::form_urlencoded::parse(query.as_bytes())
                            .into_owned()
                            .collect();
                    let target = q.get("target").cloned().unwrap_or_default();
                    let _ = tx.send((target, q.get("outcome").cloned().unwrap_or_default()));
                    String::new()
                } else {
                    page.to_string()
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok((port, targets, reports))
}

/// A provider whose "login" opens the probe page in Chromium: what a
/// hostile page in a browser VM can reach.
fn probe_provider(dir: &std::path::Path, port: u16) -> Result<String> {
    let shipped = std::fs::read_to_string(artifacts()?.repo.join("config/providers.toml"))?;
    let probe = format!(
        "\n[probe]\ndisplay_name = \"probe\"\n\
         command = [\"sh\", \"-c\", \"xdg-open http://probe.test:{port}/ && exec sleep 3600\"]\n\
         flow = {{ type = \"loopback\" }}\nconfirm = {{ type = \"file\" }}\n\
         egress = [\"probe.test:{port}\"]\n\
         [[probe.credentials]]\npath = \"${{HOME}}/never.json\"\ndeliver_to = \"/root/never.json\"\n"
    );
    let path = dir.join("providers.toml");
    std::fs::write(&path, shipped + &probe)?;
    Ok(format!("{:?}", path.display().to_string()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_vm_reaches_only_what_its_profile_allows() -> Result<()> {
    let service = std::net::TcpListener::bind("127.0.0.1:0")?;
    let service_port = service.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let (probe_port, targets, mut reports) = probe_server().await?;
    let providers = probe_provider(dir.path(), probe_port)?;
    // `localhost` is allowed by name, so that the gateway's address check
    // (not the allow-list) is what refuses it; the probe page's name is
    // routed to the test's server, as an operator routes a stand-in.
    let tune = |s: Settings| {
        s.set("auth", "providers_file", &providers)
            .set("auth", "prestart_cli_vm", "false")
            .set("egress", "allow", "[\"localhost:*\"]")
            .set(
                "egress",
                "routes",
                &format!("{{ \"probe.test:{probe_port}\" = \"127.0.0.1:{probe_port}\" }}"),
            )
    };
    with_vms(tune, async |d, _| {
        let api_port = d.base.rsplit(':').next().context("port")?.to_string();
        let viewer_port = d.viewer_base.rsplit(':').next().context("port")?;
        let page_targets = vec![
            "https://not-allowed.example/".to_string(),
            "http://10.1.2.3/".to_string(),
            "http://169.254.169.254/latest/meta-data/".to_string(),
            format!("http://127.0.0.1:{api_port}/health"),
            format!("http://127.0.0.1:{viewer_port}/assets/viewer.js"),
            format!("http://127.0.0.1:{service_port}/"),
        ];
        *targets.lock().unwrap_or_else(|p| p.into_inner()) = page_targets.clone();
        let id = d.start_session("vm-bob", "probe").await?;
        let v = d
            .wait_session(&id, BROWSER_UP, |v| {
                loaded(v).iter().any(|l| l.contains("probe.test")) || v["state"] == "failed"
            })
            .await?;
        ensure!(state_is(&v, "awaiting_user"), "{v:#}");
        let vm = v["browserVmId"].as_str().context("browserVmId")?;

        // The page: every target failed, reported through the allowed
        // destination (the page's own server).
        let mut seen = std::collections::BTreeMap::new();
        while seen.len() < page_targets.len() {
            let (target, ok) = tokio::time::timeout(Duration::from_secs(180), reports.recv())
                .await
                .context("the probe page stopped reporting")?
                .context("the probe server ended")?;
            seen.insert(target, ok);
        }
        for (target, outcome) in &seen {
            ensure!(
                outcome == "unreachable" || outcome == "refused",
                "the page in the browser VM got {outcome} for {target}"
            );
        }
        // (Chromium declines link-local addresses itself: the metadata
        // request never leaves it, so only these two reach the gateway.)
        let e = egress_of(d, vm).await?;
        for refused in ["not-allowed.example:443", "10.1.2.3:80"] {
            let wanted = format!("browser stream to {refused} refused");
            ensure!(
                e["recentRefusals"].as_array().is_some_and(|r| r
                    .iter()
                    .any(|l| l.as_str().is_some_and(|l| l.contains(&wanted)))),
                "no refusal of the page's request to {refused}: {e}"
            );
        }

        // Commands, through the agent's proxy.
        let nics = d.exec(vm, &["ls", "/sys/class/net"]).await?;
        ensure!(nics["stdout"] == "lo\n", "network interfaces: {nics}");
        // No route at all without the proxy (a documentation address:
        // nothing could answer even if a packet left).
        let (code, out) = curl(d, vm, &["--noproxy", "*", "http://192.0.2.1/"]).await?;
        ensure!(
            code == 7,
            "a direct connection did not fail at once: {code} {out}"
        );
        let refused = [
            "https://blocked.example/".to_string(),
            format!("http://127.0.0.1:{api_port}/health"),
            format!("http://127.0.0.1:{service_port}/"),
            format!("http://localhost:{service_port}/"),
            "http://10.1.2.3/".to_string(),
            "http://169.254.169.254/latest/meta-data/".to_string(),
        ];
        let before = e["refused"].as_u64().unwrap_or(0);
        for url in &refused {
            let (code, out) = curl(d, vm, &["--noproxy", "", url]).await?;
            ensure!(
                code != 0 || out.starts_with("403"),
                "{url} was not refused: {code} {out}"
            );
        }
        let after = egress_of(d, vm).await?["refused"].as_u64().unwrap_or(0);
        ensure!(
            after >= before + refused.len() as u64,
            "refusals counted: {before} -> {after}"
        );
        // The profile's destination works for a command too.
        let (code, out) = curl(d, vm, &[&format!("http://probe.test:{probe_port}/")]).await?;
        ensure!(
            code == 0 && out.starts_with("200"),
            "allowed destination: {code} {out}"
        );
        drop(service);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_vm_killed_mid_login_fails_its_session_at_once() -> Result<()> {
    with_vms(
        |s| s.set("auth", "prestart_cli_vm", "false"),
        async |d, _| {
            let v = awaiting_user(d, "vm-carol").await?;
            let id = v["sessionId"].as_str().context("sessionId")?;
            let vm = v["browserVmId"].as_str().context("browserVmId")?;
            // Everything runs (and has written to its log) when it dies.
            d.wait_session(id, BROWSER_UP, |v| {
                step_events(v).iter().any(|e| e == "streamerRunning")
            })
            .await?;
            let (_, view) = d
                .request(Method::GET, &format!("/api/vms/{vm}"), None)
                .await?;
            let pid = view["vmmPid"].as_i64().context("vmmPid")? as i32;
            let killed = std::time::Instant::now();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            let done = d
                .wait_session(id, Duration::from_secs(20), |v| v["state"] == "failed")
                .await?;
            let error = done["error"].as_str().unwrap_or("");
            ensure!(
                killed.elapsed() < Duration::from_secs(10),
                "took {:?}",
                killed.elapsed()
            );
            ensure!(error.contains("last console lines"), "{error}");
            let kept = d.state_dir().join("failed-vms").join(vm);
            // The session names where the logs are.
            let done = d
                .wait_session(id, Duration::from_secs(20), |v| {
                    step_events(v).iter().any(|e| e == "logsKept")
                })
                .await?;
            let named = done["steps"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["event"] == "logsKept"))
                .and_then(|s| s["detail"].as_str())
                .unwrap_or_default();
            ensure!(
                std::path::Path::new(named) == kept,
                "logsKept names {named:?}, the logs are in {}",
                kept.display()
            );
            for file in [
                "console.log",
                "agent.log",
                "chromium.log",
                "streamer.log",
                "error.txt",
            ] {
                ensure!(
                    kept.join(file).is_file(),
                    "{file} not kept in {}",
                    kept.display()
                );
            }
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_vm_with_too_little_memory_fails_saying_so() -> Result<()> {
    let tune = |s: Settings| {
        s.set("vm", "browser_memory_mib", "320")
            .set("auth", "prestart_cli_vm", "false")
    };
    with_vms(tune, async |d, _| {
        let id = d.start_session("vm-dave", "demo").await?;
        let done = d
            .wait_session(&id, BROWSER_UP, |v| {
                v["state"] == "failed" || v["state"] == "awaiting_user"
            })
            .await?;
        let error = done["error"].as_str().unwrap_or("");
        ensure!(state_is(&done, "failed"), "{done}");
        ensure!(
            error.contains("ran out of memory") && error.contains("320 MiB"),
            "{error}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_image_with_another_agent_is_refused_by_name() -> Result<()> {
    let real = golden_image("browser")?;
    let copy = tempfile::tempdir()?;
    for entry in std::fs::read_dir(&real)? {
        let entry = entry?;
        std::os::unix::fs::symlink(entry.path(), copy.path().join(entry.file_name()))?;
    }
    let manifest_path = copy.path().join("manifest.json");
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)?;
    manifest["agentBuildId"] = json!("0123456789abcdef0123456789abcdef01234567");
    std::fs::remove_file(&manifest_path)?;
    std::fs::write(&manifest_path, manifest.to_string())?;
    let dir = copy.path().display().to_string();
    let tune = |s: Settings| s.set("vm", "browser_image", &format!("{dir:?}"));
    with_vms(tune, async |d, _| {
        let (status, v) = d
            .request(Method::POST, "/api/vms", Some(json!({"kind": "browser"})))
            .await?;
        let error = v["error"].as_str().unwrap_or("");
        ensure!(status == 503, "{status} {v}");
        ensure!(
            error.contains("stale browser image") && error.contains(&dir),
            "{error}"
        );
        let id = d.start_session("vm-erin", "demo").await?;
        let done = d
            .wait_session(&id, Duration::from_secs(30), |v| v["state"] == "failed")
            .await?;
        ensure!(
            done["error"].as_str().unwrap_or("").contains(&dir),
            "{done}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_image_runs_the_agent_under_systemd_and_keeps_the_home_disk() -> Result<()> {
    with_vms(
        |s| s,
        async |d, _| {
            let first = d
                .ready_vm(json!({"kind": "cli", "userId": "vm-frank"}))
                .await?;
            let vm = first["id"].as_str().context("id")?;
            let init = d.exec(vm, &["cat", "/proc/1/comm"]).await?;
            ensure!(init["stdout"] == "systemd\n", "{init}");
            let unit = d
                .exec(vm, &["systemctl", "is-active", "airlock-guest.service"])
                .await?;
            ensure!(unit["stdout"] == "active\n", "{unit}");
            let put = d
                .http
                .put(format!(
                    "{}/api/vms/{vm}/files?path=/root/notes.txt&mode=600",
                    d.base
                ))
                .body("kept")
                .send()
                .await?;
            ensure!(put.status() == 200, "{}", put.status());
            // Created on first use, sparse: nothing like a full image copied.
            let disk = airlock_host::vm::home::disk_path(&d.state_dir(), "vm-frank");
            let meta = std::fs::metadata(&disk).with_context(|| format!("{}", disk.display()))?;
            let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
            ensure!(
                allocated * 8 < meta.len(),
                "the home disk is not sparse: {allocated} of {} bytes allocated",
                meta.len()
            );
            d.delete_vm(vm).await?;
            let second = d
                .ready_vm(json!({"kind": "cli", "userId": "vm-frank"}))
                .await?;
            let vm = second["id"].as_str().context("id")?;
            let cat = d.exec(vm, &["cat", "/root/notes.txt"]).await?;
            ensure!(cat["stdout"] == "kept", "{cat}");
            Ok(())
        },
    )
    .await
}
