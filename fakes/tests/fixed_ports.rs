//! The CLIs that bind fixed loopback ports — Codex (1455, fallback 1457)
//! and the demo CLI (1460, fallback 1461) — driven end to end against a
//! fake server, with an HTTP client playing the browser. The ports are
//! global, so every test here holds one process-wide lock.

mod common;

use std::io::{Read, Write};

use common::{
    mode, param, read_json, run_to_end, server, Browser, Cli, OpenerStub, Sandbox, DEADLINE, MARKER,
};
use tokio::sync::Mutex;

static PORTS: Mutex<()> = Mutex::const_new(());

/// `codex login` with `BROWSER` pointing at a stub; returns the CLI and
/// the URL the stub was asked to open.
async fn start_codex(
    sb: &Sandbox,
    base: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<(Cli, String)> {
    let opener = OpenerStub::new(&sb.bin(), "browser-stub").await?;
    let mut cmd = sb.command("codex", base);
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
async fn codex_login_writes_auth_json_and_exits_0_after_the_success_page() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (code, out) = run_to_end({
        let mut c = sb.command("codex", srv.base_url());
        c.args(["login", "status"]);
        c
    })
    .await?;
    assert_eq!(code, 1);
    assert!(out.contains("err: Not logged in"));

    let (mut cli, url) = start_codex(&sb, srv.base_url(), &[]).await?;
    cli.wait_line("Starting local login server on http://localhost:1455.")
        .await?;
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some("http://localhost:1455/auth/callback")
    );
    assert_eq!(param(&url, "client_id").as_deref(), Some("codex-cli"));
    assert_eq!(
        param(&url, "code_challenge_method").as_deref(),
        Some("S256")
    );

    let b = Browser::new()?;
    let callback = b.authorize(&url, true).await?;
    let resp = b.get(&callback).await?;
    assert_eq!(resp.status(), 302);
    let success = common::location(&resp)?;
    assert!(
        success.starts_with("http://localhost:1455/success?id_token="),
        "{success}"
    );
    // The file exists before the browser reaches the success page.
    let auth = sb.home().join(".codex/auth.json");
    assert_eq!(mode(&auth)?, 0o600);
    let page = b.get(&success).await?.text().await?;
    assert!(page.contains("Signed in to Codex"));
    assert_eq!(cli.wait_exit().await?, 0);
    assert!(cli.output().contains("err: Successfully logged in"));

    let json = read_json(&auth)?;
    assert_eq!(json["auth_mode"], "chatgpt");
    assert!(json["OPENAI_API_KEY"].is_null());
    for field in ["id_token", "access_token", "refresh_token"] {
        assert!(
            json["tokens"][field]
                .as_str()
                .unwrap_or_default()
                .contains(MARKER),
            "{field}"
        );
    }
    assert!(json["tokens"]["account_id"].is_string());
    assert!(humantime::parse_rfc3339(json["last_refresh"].as_str().unwrap_or_default()).is_ok());
    let (code, out) = run_to_end({
        let mut c = sb.command("codex", srv.base_url());
        c.args(["login", "status"]);
        c
    })
    .await?;
    assert_eq!(
        (code, out.contains("err: Logged in using ChatGPT")),
        (0, true),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn codex_honours_codex_home_and_keeps_waiting_after_a_state_mismatch() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let codex_home = sb.dir.path().join("elsewhere");
    let (mut cli, url) = start_codex(
        &sb,
        srv.base_url(),
        &[("CODEX_HOME", codex_home.to_str().unwrap_or_default())],
    )
    .await?;
    let b = Browser::new()?;
    let callback = b.authorize(&url, true).await?;
    let state = param(&callback, "state").unwrap_or_default();
    let forged = callback.replace(&format!("state={state}"), "state=forged");
    let resp = b.get(&forged).await?;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.text().await?, "State mismatch");
    // Still running: the real callback completes the login.
    let resp = b.get(&callback).await?;
    b.get(&common::location(&resp)?).await?;
    assert_eq!(cli.wait_exit().await?, 0);
    assert!(codex_home.join("auth.json").is_file());
    assert!(!sb.home().join(".codex/auth.json").exists());
    Ok(())
}

#[tokio::test]
async fn codex_deny_ends_the_login_with_exit_1() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (mut cli, url) = start_codex(&sb, srv.base_url(), &[]).await?;
    let b = Browser::new()?;
    let callback = b.authorize(&url, false).await?;
    assert_eq!(param(&callback, "error").as_deref(), Some("access_denied"));
    let page = b.get(&callback).await?.text().await?;
    assert!(page.contains("Sign-in could not be completed"));
    assert_eq!(cli.wait_exit().await?, 1);
    assert!(
        cli.output()
            .contains("Error logging in: Sign-in failed: The user denied the request"),
        "{}",
        cli.output()
    );
    assert!(!sb.home().join(".codex/auth.json").exists());
    Ok(())
}

#[tokio::test]
async fn codex_cancels_the_holder_of_1455_then_falls_back_to_1457() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    // Something that holds 1455 and ignores /cancel.
    let holder = tokio::net::TcpListener::bind("127.0.0.1:1455").await?;
    let saw_cancel = tokio::spawn(async move {
        let (mut conn, _) = holder.accept().await?;
        let mut buf = vec![0u8; 256];
        let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await?;
        // Hand the listener back so 1455 stays taken.
        anyhow::Ok((String::from_utf8_lossy(&buf[..n]).to_string(), holder))
    });
    let (mut cli, url) = start_codex(&sb, srv.base_url(), &[]).await?;
    let (request, _still_holding) = tokio::time::timeout(DEADLINE, saw_cancel).await???;
    assert!(request.starts_with("GET /cancel HTTP/1.1"), "{request}");
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some("http://localhost:1457/auth/callback")
    );
    let b = Browser::new()?;
    let resp = b.get(&b.authorize(&url, true).await?).await?;
    b.get(&common::location(&resp)?).await?;
    assert_eq!(cli.wait_exit().await?, 0);
    Ok(())
}

#[tokio::test]
async fn codex_rewrites_auth_json_in_place_in_two_writes() -> anyhow::Result<()> {
    let _ports = PORTS.lock().await;
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let auth = sb.home().join(".codex/auth.json");
    std::fs::create_dir_all(auth.parent().unwrap_or(sb.dir.path()))?;
    std::fs::write(&auth, "{\"OPENAI_API_KEY\": \"sk-old-key-0123456789\"}")?;
    let inode_before = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&auth)?);
    let gate = sb.dir.path().join("gate");
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let (mut cli, url) = start_codex(
        &sb,
        srv.base_url(),
        &[(
            "AIRLOCK_FAKE_CLI_WRITE_GATE",
            gate.to_str().unwrap_or_default(),
        )],
    )
    .await?;
    let b = Browser::new()?;
    let callback = b.authorize(&url, true).await?;
    let pending_callback = tokio::spawn({
        let http = b.http.clone();
        async move { http.get(callback).send().await }
    });
    // Opening the gate for writing returns once the CLI, having written
    // its first chunk, opens it for reading. Look at the file then.
    let (auth2, gate2) = (auth.clone(), gate.clone());
    let torn = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let mut writer = std::fs::OpenOptions::new().write(true).open(&gate2)?;
            let mut text = String::new();
            std::fs::File::open(&auth2)?.read_to_string(&mut text)?;
            writer.write_all(b"x")?;
            Ok(text)
        }),
    )
    .await???;
    assert!(!torn.is_empty(), "the first chunk is on disk");
    assert!(
        serde_json::from_str::<serde_json::Value>(&torn).is_err(),
        "a reader in between sees a torn file: {torn}"
    );
    assert!(
        torn.starts_with("{\n  \"auth_mode\": \"chatgpt\""),
        "{torn}"
    );
    let resp = tokio::time::timeout(DEADLINE, pending_callback).await???;
    b.get(&common::location(&resp)?).await?;
    assert_eq!(cli.wait_exit().await?, 0);
    let text = std::fs::read_to_string(&auth)?;
    assert!(text.starts_with(&torn) && serde_json::from_str::<serde_json::Value>(&text).is_ok());
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&auth)?),
        inode_before,
        "same file, not a rename"
    );
    Ok(())
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
    let opener = OpenerStub::new(&sb.bin(), "browser-stub").await?;
    let mut cmd = sb.command("airlock-demo-cli", srv.base_url());
    cmd.arg("login").env("BROWSER", &opener.script);
    let mut cli = Cli::spawn(cmd)?;
    let url = opener.next_url().await?;
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some("http://localhost:1460/auth/callback")
    );
    let b = Browser::new()?;
    let page = b.get(&b.authorize(&url, true).await?).await?.text().await?;
    assert!(page.contains("signed in as alice@example.com"), "{page}");
    assert_eq!(cli.wait_exit().await?, 0);
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
