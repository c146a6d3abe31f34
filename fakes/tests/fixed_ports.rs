//! The demo CLI's logins, which bind its fixed loopback port 1460 (falling
//! back to 1461), driven end to end against a fake server with an HTTP
//! client playing the browser. The ports are global, so every test here
//! holds one process-wide lock.

mod common;

use common::{
    mode, param, read_json, run_to_end, server, Browser, Cli, OpenerStub, Sandbox, MARKER,
};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

static PORTS: Mutex<()> = Mutex::const_new(());

/// `airlock-demo-cli login` with `BROWSER` pointing at a stub; returns the
/// CLI and the URL the stub was asked to open.
async fn start_demo(
    sb: &Sandbox,
    base: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<(Cli, String)> {
    let opener = OpenerStub::new(&sb.bin(), "browser-stub").await?;
    let mut cmd = sb.command("airlock-demo-cli", base);
    cmd.arg("login").env("BROWSER", &opener.script);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut cli = Cli::spawn(cmd)?;
    let opened = opener.next_url().await?;
    let printed = cli.printed_url(base).await?;
    assert_eq!(opened, printed, "the browser gets the URL that is printed");
    Ok((cli, opened))
}

#[tokio::test]
async fn demo_cli_logs_in_on_1460_and_writes_atomically() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (code, _) = run_to_end({
        let mut c = sb.command("airlock-demo-cli", srv.base_url());
        c.arg("status");
        c
    })
    .await?;
    assert_eq!(code, 1);
    let (mut cli, url) = start_demo(&sb, srv.base_url(), &[]).await?;
    cli.wait_line("Listening on http://localhost:1460.").await?;
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some("http://localhost:1460/auth/callback")
    );
    assert_eq!(param(&url, "client_id").as_deref(), Some("airlock-demo"));
    assert_eq!(
        param(&url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    let b = Browser::new()?;
    let page = b.get(&b.authorize(&url, true).await?).await?.text().await?;
    assert!(page.contains("signed in as alice@example.com"), "{page}");
    assert_eq!(cli.wait_exit().await?, 0);
    assert!(cli.output().contains("err: Logged in as alice@example.com"));
    let file = sb.home().join(".airlock-demo/credentials.json");
    assert_eq!(mode(&file)?, 0o600);
    let json = read_json(&file)?;
    assert!(json["accessToken"]
        .as_str()
        .unwrap_or_default()
        .contains(MARKER));
    assert!(json["refreshToken"]
        .as_str()
        .unwrap_or_default()
        .contains(MARKER));
    assert_eq!(json["user"], "alice@example.com");
    assert!(json["expiresAt"].as_u64().unwrap_or_default() > 0);
    let (code, out) = run_to_end({
        let mut c = sb.command("airlock-demo-cli", srv.base_url());
        c.arg("status");
        c
    })
    .await?;
    assert_eq!(
        (code, out.contains("Logged in as alice@example.com")),
        (0, true),
        "{out}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(sb.home().join(".airlock-demo"))?.collect();
    assert_eq!(leftovers.len(), 1, "no temp file left behind");
    Ok(())
}

#[tokio::test]
async fn demo_cli_falls_back_to_1461_when_1460_is_taken() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let _holder = TcpListener::bind("127.0.0.1:1460").await?;
    let (mut cli, url) = start_demo(&sb, srv.base_url(), &[]).await?;
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some("http://localhost:1461/auth/callback")
    );
    let b = Browser::new()?;
    b.get(&b.authorize(&url, true).await?).await?;
    assert_eq!(cli.wait_exit().await?, 0, "{}", cli.output());
    assert!(sb.home().join(".airlock-demo/credentials.json").is_file());
    Ok(())
}

#[tokio::test]
async fn demo_cli_exits_1_when_1460_and_1461_are_both_taken() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let _holders = (
        TcpListener::bind("127.0.0.1:1460").await?,
        TcpListener::bind("127.0.0.1:1461").await?,
    );
    let mut cmd = sb.command("airlock-demo-cli", srv.base_url());
    cmd.arg("login");
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("Error: ports 1460 and 1461 are both in use"),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn demo_cli_honours_its_home_and_keeps_waiting_after_a_state_mismatch() -> anyhow::Result<()>
{
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let demo_home = sb.dir.path().join("elsewhere");
    let (mut cli, url) = start_demo(
        &sb,
        srv.base_url(),
        &[("AIRLOCK_DEMO_HOME", demo_home.to_str().unwrap_or_default())],
    )
    .await?;
    let b = Browser::new()?;
    let callback = b.authorize(&url, true).await?;
    let state = param(&callback, "state").unwrap_or_default();
    let forged = callback.replace(&format!("state={state}"), "state=forged");
    let resp = b.get(&forged).await?;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.text().await?, "State mismatch");
    let resp = b
        .get(&callback.replace("/auth/callback", "/favicon.ico"))
        .await?;
    assert_eq!(resp.status(), 404);
    // Still running: the real callback completes the login.
    b.get(&callback).await?;
    assert_eq!(cli.wait_exit().await?, 0, "{}", cli.output());
    assert!(demo_home.join("credentials.json").is_file());
    assert!(!sb.home().join(".airlock-demo").exists());
    Ok(())
}

#[tokio::test]
async fn demo_cli_deny_ends_the_login_with_exit_1() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (mut cli, url) = start_demo(&sb, srv.base_url(), &[]).await?;
    let b = Browser::new()?;
    let callback = b.authorize(&url, false).await?;
    assert_eq!(param(&callback, "error").as_deref(), Some("access_denied"));
    let page = b.get(&callback).await?.text().await?;
    assert!(page.contains("Sign-in failed"), "{page}");
    assert_eq!(cli.wait_exit().await?, 1);
    assert!(
        cli.output()
            .contains("Error: sign-in failed: access_denied: The user denied the request"),
        "{}",
        cli.output()
    );
    assert!(!sb.home().join(".airlock-demo/credentials.json").exists());
    Ok(())
}

#[tokio::test]
async fn a_login_nobody_completes_times_out_with_exit_1() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let mut cmd = sb.command("airlock-demo-cli", srv.base_url());
    // `true` stands in for the browser, which nobody uses.
    cmd.arg("login")
        .env("BROWSER", "true")
        .env("AIRLOCK_FAKE_CLI_TIMEOUT_SECS", "1");
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("Error: login timed out after 1 seconds"),
        "{out}"
    );
    Ok(())
}
