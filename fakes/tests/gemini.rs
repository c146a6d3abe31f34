//! Fake Gemini CLI end to end: with a display it asks for consent, opens
//! the browser with `xdg-open` on a 127.0.0.1 callback and gives up on the
//! first stray request (exit 41); without one it runs the user-code flow;
//! with cached credentials it just starts.

mod common;

use std::process::Stdio;

use common::{
    location, mode, param, read_json, run_to_end, server, Browser, Cli, OpenerStub, Sandbox, MARKER,
};

/// `gemini` with `DISPLAY` set and an `xdg-open` stub; answers the consent
/// prompt and returns the CLI and the opened URL.
async fn start(sb: &Sandbox, base: &str, extra: &[(&str, &str)]) -> anyhow::Result<(Cli, String)> {
    let opener = OpenerStub::new(&sb.bin(), "xdg-open").await?;
    let mut cmd = sb.command("gemini", base);
    cmd.env("DISPLAY", ":99").stdin(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut cli = Cli::spawn(cmd)?;
    cli.send_line("").await?; // Enter at "Do you want to continue? [Y/n]"
    let opened = opener.next_url().await?;
    assert_eq!(cli.printed_url(base).await?, opened);
    Ok((cli, opened))
}

#[tokio::test]
async fn web_login_writes_oauth_creds_and_redirects_to_success() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let gemini_home = sb.dir.path().join("ghome");
    let (mut cli, opened) = start(
        &sb,
        srv.base_url(),
        &[("GEMINI_CLI_HOME", gemini_home.to_str().unwrap_or_default())],
    )
    .await?;
    let redirect = param(&opened, "redirect_uri").unwrap_or_default();
    assert!(
        redirect.starts_with("http://127.0.0.1:") && redirect.ends_with("/oauth2callback"),
        "{redirect}"
    );
    assert_eq!(param(&opened, "access_type").as_deref(), Some("offline"));
    let b = Browser::new()?;
    let resp = b.get(&b.authorize(&opened, true).await?).await?;
    assert_eq!(resp.status(), 301);
    assert_eq!(
        location(&resp)?,
        format!("{}/code/success?app=gemini-cli", srv.base_url())
    );
    assert_eq!(cli.wait_exit().await?, 0, "{}", cli.output());
    assert!(cli.output().contains("out: Authentication succeeded"));
    let file = gemini_home.join(".gemini/oauth_creds.json");
    assert_eq!(mode(&file)?, 0o600);
    let creds = read_json(&file)?;
    assert!(creds["access_token"]
        .as_str()
        .unwrap_or_default()
        .starts_with("ya29.TESTCANARY"));
    assert!(creds["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .contains(MARKER));
    assert!(creds["id_token"]
        .as_str()
        .unwrap_or_default()
        .contains(MARKER));
    assert_eq!(creds["token_type"], "Bearer");
    assert!(creds["scope"].is_string());
    assert!(creds["expiry_date"].as_u64().unwrap_or_default() > 1_600_000_000_000);
    assert!(
        std::fs::read_to_string(&file)?.contains("\n  \""),
        "pretty-printed like JSON.stringify(.., null, 2)"
    );

    // Cached credentials: the next run just starts.
    let mut cmd = sb.command("gemini", srv.base_url());
    cmd.env("GEMINI_CLI_HOME", &gemini_home);
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!(
        (code, out.contains("Loaded cached credentials.")),
        (0, true),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn the_first_stray_request_ends_the_login_with_exit_41() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (mut cli, opened) = start(&sb, srv.base_url(), &[]).await?;
    let redirect = param(&opened, "redirect_uri").unwrap_or_default();
    let favicon = redirect.replace("/oauth2callback", "/favicon.ico");
    let resp = Browser::new()?.get(&favicon).await?;
    assert_eq!(resp.status(), 301);
    assert_eq!(
        location(&resp)?,
        format!("{}/code/failure?app=gemini-cli", srv.base_url())
    );
    assert_eq!(cli.wait_exit().await?, 41);
    assert!(
        cli.output()
            .contains("OAuth callback not received. Unexpected request: /favicon.ico"),
        "{}",
        cli.output()
    );
    assert!(!sb.home().join(".gemini/oauth_creds.json").exists());
    Ok(())
}

#[tokio::test]
async fn a_state_mismatch_ends_the_login_with_exit_41() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let (mut cli, opened) = start(&sb, srv.base_url(), &[]).await?;
    let redirect = param(&opened, "redirect_uri").unwrap_or_default();
    let resp = Browser::new()?
        .get(&format!("{redirect}?code=abc&state=forged"))
        .await?;
    assert_eq!(resp.text().await?, "State mismatch. Possible CSRF attack");
    assert_eq!(cli.wait_exit().await?, 41);
    assert!(cli.output().contains("OAuth state mismatch"));
    Ok(())
}

#[tokio::test]
async fn without_a_display_it_runs_the_user_code_flow() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let mut cmd = sb.command("gemini", srv.base_url());
    cmd.stdin(Stdio::piped());
    let mut cli = Cli::spawn(cmd)?;
    cli.wait_line("Please visit the following URL to authorize the application:")
        .await?;
    let url = cli.printed_url(srv.base_url()).await?;
    assert_eq!(
        param(&url, "redirect_uri"),
        Some(format!("{}/code/callback", srv.base_url()))
    );
    let b = Browser::new()?;
    let page = b.get(&b.authorize(&url, true).await?).await?.text().await?;
    let start = page.find("<code id=\"oauth-code\">").expect("code element") + 22;
    let shown = &page[start..start + page[start..].find("</code>").unwrap_or(0)];
    cli.send_line(shown).await?;
    assert_eq!(cli.wait_exit().await?, 0, "{}", cli.output());
    assert!(sb.home().join(".gemini/oauth_creds.json").is_file());
    Ok(())
}

#[tokio::test]
async fn refusing_consent_exits_130() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let mut cmd = sb.command("gemini", srv.base_url());
    cmd.env("DISPLAY", ":99").stdin(Stdio::piped());
    let mut cli = Cli::spawn(cmd)?;
    cli.send_line("n").await?;
    assert_eq!(cli.wait_exit().await?, 130);
    assert!(cli.output().contains("Authentication cancelled by user."));
    Ok(())
}
