//! Fake Claude Code (`claude auth login|status`) end to end: the browser
//! opened through `xdg-open` completes the automatic flow on a random
//! localhost port, or the code shown by the hosted page is pasted at the
//! prompt; a wrong paste fails.

mod common;

use std::process::Stdio;

use common::{
    location, mode, param, read_json, run_to_end, server, Browser, Cli, OpenerStub, Sandbox, MARKER,
};

/// Starts `claude auth login` with an `xdg-open` stub on `PATH`; returns
/// the CLI, the URL given to `xdg-open` and the printed manual URL.
async fn start(sb: &Sandbox, base: &str) -> anyhow::Result<(Cli, String, String)> {
    let opener = OpenerStub::new(&sb.bin(), "xdg-open").await?;
    let mut cmd = sb.command("claude", base);
    cmd.args(["auth", "login"]).stdin(Stdio::piped());
    let mut cli = Cli::spawn(cmd)?;
    let opened = opener.next_url().await?;
    let manual = cli.printed_url(base).await?;
    Ok((cli, opened, manual))
}

fn status_cmd(sb: &Sandbox, base: &str) -> tokio::process::Command {
    let mut c = sb.command("claude", base);
    c.args(["auth", "status"]);
    c
}

fn check_credentials(sb: &Sandbox) -> anyhow::Result<()> {
    let file = sb.home().join(".claude/.credentials.json");
    assert_eq!(mode(&file)?, 0o600);
    let oauth = &read_json(&file)?["claudeAiOauth"];
    assert!(oauth["accessToken"]
        .as_str()
        .unwrap_or_default()
        .starts_with("sk-ant-oat01-TESTCANARY"));
    assert!(oauth["refreshToken"]
        .as_str()
        .unwrap_or_default()
        .contains(MARKER));
    assert!(
        oauth["expiresAt"].as_u64().unwrap_or_default() > 1_600_000_000_000,
        "milliseconds"
    );
    assert!(oauth["scopes"]
        .as_array()
        .is_some_and(|s| s.iter().any(|x| x == "user:inference")));
    assert!(oauth["subscriptionType"].is_string());
    Ok(())
}

#[tokio::test]
async fn automatic_flow_via_the_localhost_callback() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (code, out) = run_to_end(status_cmd(&sb, srv.base_url())).await?;
    assert_eq!(code, 1);
    assert!(out.contains("\"loggedIn\": false"), "{out}");

    let (mut cli, opened, manual) = start(&sb, srv.base_url()).await?;
    let auto_redirect = param(&opened, "redirect_uri").unwrap_or_default();
    assert!(
        auto_redirect.starts_with("http://localhost:") && auto_redirect.ends_with("/callback"),
        "{auto_redirect}"
    );
    assert_eq!(
        param(&manual, "redirect_uri"),
        Some(format!("{}/code/callback", srv.base_url()))
    );
    assert_eq!(param(&opened, "state"), param(&manual, "state"));
    assert_eq!(param(&opened, "code").as_deref(), Some("true"));
    assert_eq!(param(&opened, "client_id").as_deref(), Some("claude-code"));

    let b = Browser::new()?;
    let callback = b.authorize(&opened, true).await?;
    let resp = b.get(&callback).await?;
    assert_eq!(resp.status(), 302);
    assert_eq!(
        location(&resp)?,
        format!("{}/code/success?app=claude-code", srv.base_url())
    );
    assert_eq!(cli.wait_exit().await?, 0);
    assert!(cli.output().contains("out: Login successful."));
    check_credentials(&sb)?;
    let (code, out) = run_to_end(status_cmd(&sb, srv.base_url())).await?;
    assert_eq!(code, 0);
    assert!(out.contains("\"loggedIn\": true"), "{out}");
    Ok(())
}

#[tokio::test]
async fn manual_flow_pasting_code_hash_state_keeps_other_keys() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let config = sb.dir.path().join("claude-config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(
        config.join(".credentials.json"),
        r#"{"mcpOAuth":{"kept":true}}"#,
    )?;
    let opener = OpenerStub::new(&sb.bin(), "xdg-open").await?;
    let mut cmd = sb.command("claude", srv.base_url());
    cmd.args(["auth", "login"])
        .env("CLAUDE_CONFIG_DIR", &config)
        .stdin(Stdio::piped());
    let mut cli = Cli::spawn(cmd)?;
    let _ignored = opener.next_url().await?;
    let manual = cli.printed_url(srv.base_url()).await?;

    let b = Browser::new()?;
    let hosted = b.authorize(&manual, true).await?;
    let page = b.get(&hosted).await?.text().await?;
    let start = page.find("<code id=\"oauth-code\">").expect("code element") + 22;
    let shown = &page[start..start + page[start..].find("</code>").unwrap_or(0)];
    cli.send_line(shown).await?;
    assert_eq!(cli.wait_exit().await?, 0, "{}", cli.output());
    let json = read_json(&config.join(".credentials.json"))?;
    assert_eq!(json["mcpOAuth"]["kept"], true);
    assert!(json["claudeAiOauth"]["accessToken"]
        .as_str()
        .unwrap_or_default()
        .contains(MARKER));
    Ok(())
}

#[tokio::test]
async fn pasting_a_wrong_code_fails_with_exit_1() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (mut cli, _opened, manual) = start(&sb, srv.base_url()).await?;
    let state = param(&manual, "state").unwrap_or_default();
    cli.send_line(&format!("not-a-real-code#{state}")).await?;
    assert_eq!(cli.wait_exit().await?, 1);
    assert!(
        cli.output()
            .contains("Login failed: OAuth error: token endpoint returned status 400"),
        "{}",
        cli.output()
    );
    assert!(!sb.home().join(".claude/.credentials.json").exists());

    let (mut cli, _opened, _manual) = start(&sb, srv.base_url()).await?;
    cli.send_line("abc#wrong-state").await?;
    assert_eq!(cli.wait_exit().await?, 1);
    assert!(
        cli.output()
            .contains("Invalid code. Please make sure the full code was copied"),
        "{}",
        cli.output()
    );
    Ok(())
}

#[tokio::test]
async fn deny_in_the_browser_fails_with_exit_1() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (mut cli, opened, _manual) = start(&sb, srv.base_url()).await?;
    let b = Browser::new()?;
    let callback = b.authorize(&opened, false).await?;
    let resp = b.get(&callback).await?;
    assert_eq!(
        location(&resp)?,
        format!("{}/code/failure?app=claude-code", srv.base_url())
    );
    assert_eq!(cli.wait_exit().await?, 1);
    assert!(cli.output().contains("access_denied"), "{}", cli.output());
    Ok(())
}
