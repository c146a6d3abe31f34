//! The demo CLI (`airlock-demo-cli`, the only fake CLI) without a login
//! server: the required environment, usage errors, the same behaviour
//! under any name, and `status` / `logout` on the credentials file. The
//! logins themselves, which bind fixed ports, are in `fixed_ports.rs`.

mod common;

use std::process::Stdio;

use common::{run_to_end, Sandbox};

const USAGE: &str = "Usage: airlock-demo-cli login | status | logout";

#[tokio::test]
async fn a_login_without_a_usable_oauth_url_exits_2_with_a_clear_message() -> anyhow::Result<()> {
    let sb = Sandbox::new()?;
    let mut cmd = sb.command("airlock-demo-cli", "");
    cmd.env_remove("AIRLOCK_FAKE_OAUTH_URL").arg("login");
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("AIRLOCK_FAKE_OAUTH_URL is not set"), "{out}");

    let mut cmd = sb.command("airlock-demo-cli", "ftp://127.0.0.1/oauth");
    cmd.arg("login");
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("\"ftp://127.0.0.1/oauth\" is not an absolute http(s) URL"),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_arguments_print_the_usage_and_exit_2() -> anyhow::Result<()> {
    let sb = Sandbox::new()?;
    for args in [
        vec![],
        vec!["bogus"],
        vec!["login", "extra"],
        vec!["--help"],
    ] {
        let mut cmd = sb.command("airlock-demo-cli", "http://127.0.0.1:9/oauth");
        cmd.args(&args);
        let (code, out) = run_to_end(cmd).await?;
        assert_eq!((code, out.contains(USAGE)), (2, true), "{args:?}: {out}");
    }
    Ok(())
}

#[tokio::test]
async fn it_is_the_demo_cli_under_any_name() -> anyhow::Result<()> {
    let sb = Sandbox::new()?;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-cli"));
    cmd.env_clear()
        .env("HOME", sb.home())
        .arg("status")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!(
        (code, out.contains("err: Not logged in")),
        (1, true),
        "{out}"
    );

    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-cli"));
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (code, out) = run_to_end(cmd).await?;
    assert_eq!((code, out.contains(USAGE)), (2, true), "{out}");
    Ok(())
}

#[tokio::test]
async fn status_and_logout_follow_the_credentials_file() -> anyhow::Result<()> {
    let sb = Sandbox::new()?;
    let demo_home = sb.dir.path().join("elsewhere");
    let run = |arg: &'static str| {
        let mut cmd = sb.command("airlock-demo-cli", "");
        cmd.env("AIRLOCK_DEMO_HOME", &demo_home).arg(arg);
        run_to_end(cmd)
    };
    let (code, out) = run("status").await?;
    assert_eq!(
        (code, out.contains("err: Not logged in")),
        (1, true),
        "{out}"
    );
    let (code, out) = run("logout").await?;
    assert_eq!(
        (code, out.contains("err: Not logged in")),
        (0, true),
        "{out}"
    );

    std::fs::create_dir_all(&demo_home)?;
    let file = demo_home.join("credentials.json");
    std::fs::write(
        &file,
        r#"{"accessToken": "a", "refreshToken": null, "user": "bob@example.com", "expiresAt": 1}"#,
    )?;
    let (code, out) = run("status").await?;
    assert_eq!(
        (code, out.contains("err: Logged in as bob@example.com")),
        (0, true),
        "{out}"
    );
    let (code, out) = run("logout").await?;
    assert_eq!((code, out.contains("err: Logged out")), (0, true), "{out}");
    assert!(!file.exists());

    // An empty access token does not count as logged in.
    std::fs::write(
        &file,
        r#"{"accessToken": "", "refreshToken": null, "user": "bob@example.com", "expiresAt": 1}"#,
    )?;
    let (code, out) = run("status").await?;
    assert_eq!(
        (code, out.contains("err: Not logged in")),
        (1, true),
        "{out}"
    );
    Ok(())
}
