//! The vendor sandbox over real TLS, as a client that trusts only its CA
//! sees it: every vendor host name is served with a certificate the CA
//! signed, requests go to the vendor the `Host` names, unknown hosts are
//! refused, the API endpoints want a token the vendor issued, and the
//! real clients' registrations refuse what the vendors refuse.

use std::time::Duration;

use airlock_fakes::oauth::clients::{GOOGLE_GEMINI_CLI, OPENAI_CODEX};
use airlock_fakes::vendors::{SandboxConfig, VendorSandbox};
use anyhow::{ensure, Result};

async fn sandbox() -> Result<(VendorSandbox, reqwest::Client)> {
    let sandbox = VendorSandbox::start(SandboxConfig::default()).await?;
    let mut client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(sandbox.ca_pem().as_bytes())?)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    for route in sandbox.egress_routes().keys() {
        let host = route.trim_end_matches(":443");
        client = client.resolve(host, sandbox.addr());
    }
    client = client.resolve("example.com", sandbox.addr());
    Ok((sandbox, client.build()?))
}

#[tokio::test]
async fn every_vendor_host_is_served_over_tls_from_the_test_ca() -> Result<()> {
    let (sandbox, http) = sandbox().await?;
    let routes = sandbox.egress_routes();
    for host in [
        "auth.openai.com",
        "platform.claude.com",
        "oauth2.googleapis.com",
    ] {
        ensure!(
            routes.get(&format!("{host}:443")) == Some(&sandbox.addr().to_string()),
            "{host} is not routed to the sandbox: {routes:?}"
        );
    }
    // Google's tokeninfo wants a token Google issued.
    let r = http
        .post("https://oauth2.googleapis.com/tokeninfo")
        .bearer_auth("ya29.not-issued")
        .send()
        .await?;
    ensure!(
        r.status() == 400,
        "tokeninfo of a foreign token: {}",
        r.status()
    );
    let r = http
        .get("https://api.anthropic.com/api/oauth/profile")
        .send()
        .await?;
    ensure!(r.status() == 401, "profile without a token: {}", r.status());
    // A name the sandbox does not stand in for is refused, not answered.
    let r = http.get("https://example.com/").send().await;
    ensure!(
        r.is_err() || r.is_ok_and(|r| r.status() == 421),
        "example.com was answered"
    );
    let seen = sandbox.requests();
    ensure!(
        seen.iter()
            .any(|s| s.host == "oauth2.googleapis.com" && s.path == "/tokeninfo"),
        "{seen:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_real_clients_get_what_the_vendors_allow_and_nothing_else() -> Result<()> {
    let (_sandbox, http) = sandbox().await?;
    // Codex's registered redirect, with PKCE: the sign-in page.
    let ok = format!(
        "https://auth.openai.com/oauth/authorize?response_type=code&client_id={OPENAI_CODEX}\
         &redirect_uri=http%3A%2F%2F127.0.0.1%3A1455%2Fauth%2Fcallback&state=s\
         &code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM&code_challenge_method=S256"
    );
    let r = http.get(&ok).send().await?;
    ensure!(r.status() == 200, "Codex's own request: {}", r.status());
    // Another port is not registered: refused without a redirect.
    let r = http.get(ok.replace("1455", "1456")).send().await?;
    ensure!(
        r.status() == 400,
        "an unregistered redirect: {}",
        r.status()
    );
    // Google's loopback flow needs no PKCE, any port on 127.0.0.1.
    let google = format!(
        "https://accounts.google.com/o/oauth2/v2/auth?redirect_uri=http%3A%2F%2F127.0.0.1%3A39131%2Foauth2callback\
         &access_type=offline&scope=openid&state=abc&response_type=code&client_id={GOOGLE_GEMINI_CLI}"
    );
    let r = http.get(&google).send().await?;
    ensure!(r.status() == 200, "Gemini CLI's request: {}", r.status());
    // Google's token endpoint wants the client's secret.
    let r = http
        .post("https://oauth2.googleapis.com/token")
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", "x"),
            ("client_id", GOOGLE_GEMINI_CLI),
            ("redirect_uri", "http://127.0.0.1:1/oauth2callback"),
            ("client_secret", "wrong"),
        ])
        .send()
        .await?;
    ensure!(r.status() == 401, "a wrong client secret: {}", r.status());
    Ok(())
}
