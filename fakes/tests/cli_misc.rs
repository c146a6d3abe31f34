//! Fake CLI behaviour common to the profiles: the required environment,
//! the login timeout, profile selection by `--profile`, and Codex's
//! device-code login (which binds no fixed port).

mod common;

use std::process::Stdio;

use common::{read_json, run_to_end, server, Browser, Cli, Sandbox, MARKER};

#[tokio::test]
async fn a_login_without_the_oauth_url_exits_2_with_a_clear_message() -> anyhow::Result<()> {
    let sb = Sandbox::new()?;
    for (name, args) in [
        ("codex", vec!["login"]),
        ("claude", vec!["auth", "login"]),
        ("gemini", vec![]),
        ("airlock-demo-cli", vec!["login"]),
    ] {
        let mut cmd = sb.command(name, "");
        cmd.env_remove("AIRLOCK_FAKE_OAUTH_URL").args(&args);
        let (code, out) = run_to_end(cmd).await?;
        assert_eq!(code, 2, "{name}: {out}");
        assert!(
            out.contains("AIRLOCK_FAKE_OAUTH_URL is not set"),
            "{name}: {out}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_login_nobody_completes_times_out_with_exit_1() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let mut cmd = sb.command("claude", srv.base_url());
    cmd.args(["auth", "login"])
        .env("AIRLOCK_FAKE_CLI_TIMEOUT_SECS", "1");
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!(code, 1);
    assert!(out.contains("Login timed out after 1 seconds"), "{out}");
    Ok(())
}

#[tokio::test]
async fn profile_flag_and_unknown_invocations() -> anyhow::Result<()> {
    let sb = Sandbox::new()?;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-cli"));
    cmd.env_clear()
        .env("HOME", sb.home())
        .args(["--profile", "codex", "login", "status"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!((code, out.contains("Not logged in")), (1, true), "{out}");

    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-cli"));
    cmd.env_clear()
        .arg("--profile=nope")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!(
        (code, out.contains("usage: fake-cli --profile")),
        (2, true),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn codex_device_auth_prints_the_code_then_polls_to_tokens() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let sb = Sandbox::new()?;
    let mut cmd = sb.command("codex", srv.base_url());
    cmd.args(["login", "--device-auth"]);
    let mut cli = Cli::spawn(cmd)?;
    let link = cli.wait_line(&format!("{}/device", srv.base_url())).await?;
    assert!(
        link.contains("\x1b[94m"),
        "link printed in blue like the real prompt"
    );
    // The prompt ends with the phishing warning; the code is the blue line
    // after "2. Enter this one-time code".
    cli.wait_line("Never share this code").await?;
    let step2 = cli
        .seen
        .iter()
        .position(|l| l.contains("2. Enter this one-time code"))
        .expect("step 2 printed");
    let user_code = cli.seen[step2 + 1]
        .trim_start_matches("out:")
        .trim()
        .trim_start_matches("\x1b[94m")
        .trim_end_matches("\x1b[0m")
        .to_string();
    assert_eq!(
        (user_code.len(), &user_code[4..5]),
        (9, "-"),
        "{user_code:?}"
    );
    let b = Browser::new()?;
    let page = b
        .get(&format!("{}/device?user_code={user_code}", srv.base_url()))
        .await?
        .text()
        .await?;
    let (_, consent) = b.submit_login(&page, "alice", "correct horse").await?;
    assert!(b
        .decide(&consent, true)
        .await?
        .text()
        .await?
        .contains("device-approved"));
    assert_eq!(cli.wait_exit().await?, 0, "{}", cli.output());
    assert!(cli.output().contains("err: Successfully logged in"));
    let auth = read_json(&sb.home().join(".codex/auth.json"))?;
    assert!(auth["tokens"]["access_token"]
        .as_str()
        .unwrap_or_default()
        .contains(MARKER));
    Ok(())
}
