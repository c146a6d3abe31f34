//! TURN credentials against a real TURN server: the test starts coturn on
//! 127.0.0.1 with `use-auth-secret` and a random shared secret (the
//! harness's [`Coturn`]), airlockd is
//! configured with the same secret and the server's URL, and a session's
//! viewer asks airlockd for ICE servers. A TURN allocation (the `turn`
//! crate's client) with airlockd's credentials succeeds; one with a
//! credential whose expiry has passed, or signed with another secret, is
//! refused. coturn is killed however the test ends.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_host::live::turn::rest_credential;
use airlock_tests::coturn::{Coturn, REALM};
use airlock_tests::login::{LoginRig, FAKE};
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use turn::client::{Client, ClientConfig};
use webrtc::util::Conn;

const USER: &str = "turn-user";

/// Allocates a relay on the TURN server with `username`/`password`;
/// returns the relayed address.
async fn allocate(server: &str, username: &str, password: &str) -> Result<String> {
    let conn = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.into(),
        turn_serv_addr: server.into(),
        username: username.into(),
        password: password.into(),
        realm: REALM.into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await?;
    client.listen().await?;
    let result = tokio::time::timeout(Duration::from_secs(15), client.allocate()).await;
    let outcome = match result {
        Ok(Ok(relay)) => Ok(relay.local_addr()?.to_string()),
        Ok(Err(e)) => Err(anyhow::anyhow!("allocation refused: {e}")),
        Err(_) => Err(anyhow::anyhow!("no allocation answer within 15 s")),
    };
    let _ = client.close().await;
    outcome
}

/// True when the TURN server refused the allocation as unauthorised (401),
/// rather than failing for another reason.
fn unauthorized(outcome: &Result<String>) -> bool {
    matches!(outcome, Err(e) if e.to_string().contains("401"))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn turn_credentials_from_airlockd_allocate_and_expired_ones_do_not() -> Result<()> {
    let coturn = Coturn::start()?;
    let secret = coturn.secret.clone();
    let url = format!("turn:{}?transport=udp", coturn.addr());
    let rig = LoginRig::start(|s| {
        s.set("auth", "prestart_cli_vm", "false")
            .set("live", "ice_addresses", "[\"127.0.0.1\"]")
            .set("live", "turn_urls", &format!("[{url:?}]"))
            .set("live", "turn_secret", &format!("{secret:?}"))
            .set("live", "turn_ttl_secs", "600")
    })
    .await?;
    let d = &rig.daemon;
    let result = async {
        let link = d.start_live(USER, FAKE).await?;
        let path = format!(
            "/api/webrtc/ice-servers?session={}&token={}",
            link.id, link.token
        );
        let (status, v) = d.request(Method::GET, &path, None).await?;
        ensure!(status == 200, "{status} {}", v["error"]);
        ensure!(v["ttl"] == 600, "ttl {}", v["ttl"]);
        let turn = &v["iceServers"][0];
        ensure!(turn["urls"][0] == url.as_str(), "urls {}", turn["urls"]);
        let username = turn["username"].as_str().context("username")?;
        let password = turn["credential"].as_str().context("credential")?;
        let (expiry, user) = username.split_once(':').context("<expiry>:<user>")?;
        ensure!(user == USER, "{username}");
        let expiry: i64 = expiry.parse()?;
        let now = unix_now();
        ensure!(
            (now + 590..=now + 610).contains(&expiry),
            "expiry {expiry} vs now {now}"
        );
        // The password is the HMAC airlockd computes from the shared secret.
        let expected = rest_credential(&secret, USER, expiry);
        ensure!(
            expected.credential.0 == password,
            "the credential is not HMAC-SHA1 of the username"
        );

        let relayed = allocate(&coturn.addr(), username, password).await?;
        ensure!(relayed.starts_with("127.0.0.1:"), "relayed at {relayed}");

        let stale = rest_credential(&secret, USER, now - 60);
        let refused = allocate(&coturn.addr(), &stale.username, &stale.credential.0).await;
        ensure!(unauthorized(&refused), "an expired credential: {refused:?}");

        let forged = rest_credential("another-secret", USER, now + 600);
        let refused = allocate(&coturn.addr(), &forged.username, &forged.credential.0).await;
        ensure!(
            unauthorized(&refused),
            "another secret's credential: {refused:?}"
        );

        let config = std::fs::read_to_string(d.dir.path().join("airlockd.log"))?;
        ensure!(
            !config.contains(&secret),
            "the TURN secret is in airlockd's log"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("==== coturn log ====\n{}", coturn.log());
        d.print_sessions().await;
        d.print_diagnostics();
    }
    result
}

/// The production coturn config the README points to
/// (`config/turnserver.example.conf`), moved onto loopback, takes the TURN
/// REST credentials airlockd hands out and refuses forged ones.
#[tokio::test(flavor = "multi_thread")]
async fn the_example_production_config_takes_airlockds_credentials() -> Result<()> {
    let path = airlock_tests::artifacts()?
        .repo
        .join("config/turnserver.example.conf");
    let coturn = Coturn::start_from(&std::fs::read_to_string(path)?)?;
    let now = unix_now();
    let good = rest_credential(&coturn.secret, USER, now + 600);
    let relayed = allocate(&coturn.addr(), &good.username, &good.credential.0)
        .await
        .with_context(|| coturn.log())?;
    ensure!(relayed.starts_with("127.0.0.1:"), "relayed at {relayed}");
    let forged = rest_credential("another-secret", USER, now + 600);
    let refused = allocate(&coturn.addr(), &forged.username, &forged.credential.0).await;
    ensure!(unauthorized(&refused), "a forged credential: {refused:?}");
    Ok(())
}
