//! The vendor sandbox over real TLS, as a client that trusts only its CA
//! sees it: every vendor host name is served with a certificate the CA
//! signed, requests go to the vendor the `Host` names, unknown hosts are
//! refused, the API endpoints want a token the vendor issued, and the
//! real clients' registrations refuse what the vendors refuse. Also
//! Codex's device login (`codex login --device-auth`) against OpenAI's
//! device API, and the consent-redirect knobs of the failure tests.

mod common;

use std::time::Duration;

use airlock_fakes::oauth::clients::{ANTHROPIC_CLAUDE_CODE, GOOGLE_GEMINI_CLI, OPENAI_CODEX};
use airlock_fakes::oauth::OAuthEvent;
use airlock_fakes::pkce;
use airlock_fakes::vendors::openai::DEVICE_REDIRECT_URI;
use airlock_fakes::vendors::{SandboxConfig, VendorSandbox};
use anyhow::{ensure, Context, Result};
use common::{location, param, Browser};
use serde_json::{json, Value};

async fn sandbox() -> Result<(VendorSandbox, reqwest::Client)> {
    sandbox_with(SandboxConfig::default()).await
}

async fn sandbox_with(cfg: SandboxConfig) -> Result<(VendorSandbox, reqwest::Client)> {
    let sandbox = VendorSandbox::start(cfg).await?;
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

const USERCODE: &str = "https://auth.openai.com/api/accounts/deviceauth/usercode";
const DEVICE_TOKEN: &str = "https://auth.openai.com/api/accounts/deviceauth/token";

/// POSTs a JSON body as Codex does; returns the status and the JSON answer.
async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Result<(u16, Value)> {
    let r = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

/// Step 1 of `codex login --device-auth`: (device_auth_id, user_code, interval).
async fn usercode(http: &reqwest::Client) -> Result<(String, String, Value)> {
    let (status, body) = post_json(http, USERCODE, &json!({"client_id": OPENAI_CODEX})).await?;
    ensure!(status == 200, "usercode: {status} {body}");
    let id = body["device_auth_id"]
        .as_str()
        .context("no device_auth_id")?;
    let user_code = body["user_code"].as_str().context("no user_code")?;
    Ok((
        id.to_string(),
        user_code.to_string(),
        body["interval"].clone(),
    ))
}

async fn poll(http: &reqwest::Client, id: &str, user_code: &str) -> Result<(u16, Value)> {
    let body = json!({"device_auth_id": id, "user_code": user_code});
    post_json(http, DEVICE_TOKEN, &body).await
}

/// What the person does: opens Codex's verification URL, follows it to the
/// entry page, types the code, signs in as alice and decides.
async fn approve_on_the_device_page(b: &Browser, user_code: &str, allow: bool) -> Result<String> {
    let r = b.get("https://auth.openai.com/codex/device").await?;
    ensure!(r.status() == 302, "/codex/device: {}", r.status());
    let entry_url = location(&r)?;
    ensure!(
        entry_url == "https://auth.openai.com/airlock/device",
        "{entry_url}"
    );
    let entry = b.get(&entry_url).await?.text().await?;
    // The entry form submits by GET to its action, under the nest.
    let action = entry
        .split("action=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("no entry form")?;
    let r = b
        .http
        .get(action)
        .query(&[("user_code", user_code)])
        .send()
        .await?;
    ensure!(r.status() == 200, "entering the code: {}", r.status());
    let sign_in = r.text().await?;
    ensure!(sign_in.contains(user_code), "{sign_in}");
    let (status, consent) = b.submit_login(&sign_in, "alice", "correct horse").await?;
    ensure!(status == 200, "sign-in: {status}");
    let r = b.decide(&consent, allow).await?;
    ensure!(r.status() == 200, "decision: {}", r.status());
    Ok(r.text().await?)
}

async fn exchange_device_code(
    http: &reqwest::Client,
    code: &str,
    verifier: &str,
) -> Result<(u16, Value)> {
    let r = http
        .post("https://auth.openai.com/oauth/token")
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", DEVICE_REDIRECT_URI),
            ("client_id", OPENAI_CODEX),
            ("code_verifier", verifier),
        ])
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

#[tokio::test]
async fn codex_device_auth_ends_in_tokens_once() -> Result<()> {
    let cfg = SandboxConfig {
        device_poll_interval: Duration::from_secs(2),
        ..SandboxConfig::default()
    };
    let (sandbox, http) = sandbox_with(cfg).await?;
    let (id, user_code, interval) = usercode(&http).await?;
    ensure!(id.starts_with("deviceauth_"), "{id}");
    ensure!(
        interval == json!("2"),
        "interval is a string of seconds: {interval}"
    );
    let (status, body) = poll(&http, &id, &user_code).await?;
    ensure!(status == 403, "pending: {status} {body}");
    // The id and the user code must name the same grant.
    let (status, _) = poll(&http, &id, "BCDF-GHJK").await?;
    ensure!(status == 404, "a foreign user code: {status}");

    let b = Browser { http: http.clone() };
    let done = approve_on_the_device_page(&b, &user_code, true).await?;
    ensure!(done.contains("id=\"device-approved\""), "{done}");
    let (status, granted) = poll(&http, &id, &user_code).await?;
    ensure!(status == 200, "approved: {status} {granted}");
    let code = granted["authorization_code"].as_str().context("no code")?;
    let verifier = granted["code_verifier"].as_str().context("no verifier")?;
    let challenge = granted["code_challenge"].as_str().context("no challenge")?;
    ensure!(verifier.len() >= 43 && pkce::challenge_s256(verifier) == challenge);

    let (status, tokens) = exchange_device_code(&http, code, verifier).await?;
    ensure!(status == 200, "exchange: {status} {tokens}");
    for field in ["id_token", "access_token", "refresh_token"] {
        ensure!(
            tokens[field].as_str().is_some_and(|t| !t.is_empty()),
            "no {field}: {tokens}"
        );
    }
    ensure!(tokens["scope"]
        .as_str()
        .is_some_and(|s| s.contains("offline_access")));
    let (status, body) = poll(&http, &id, &user_code).await?;
    ensure!(status == 400, "a second poll: {status} {body}");
    let (status, body) = exchange_device_code(&http, code, verifier).await?;
    ensure!(
        status == 400 && body["error"] == "invalid_grant",
        "{status} {body}"
    );

    let events = sandbox.openai.events();
    for wanted in [
        "DeviceCodeIssued",
        "DeviceApproved",
        "DeviceTokenIssued",
        "CodeRedeemed",
        "CodeReused",
    ] {
        ensure!(
            events.iter().any(|e| format!("{e:?}").starts_with(wanted)),
            "no {wanted}: {events:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn codex_device_auth_refuses_other_clients_and_bad_bodies() -> Result<()> {
    let cfg = SandboxConfig {
        device_poll_interval: Duration::ZERO,
        ..SandboxConfig::default()
    };
    let (_sandbox, http) = sandbox_with(cfg).await?;
    let (_, _, interval) = usercode(&http).await?;
    ensure!(interval == json!("1"), "at least one second: {interval}");
    for client in ["app_someone_else", GOOGLE_GEMINI_CLI] {
        let (status, body) = post_json(&http, USERCODE, &json!({"client_id": client})).await?;
        ensure!(
            status == 400 && body["error"].is_string(),
            "{client}: {status} {body}"
        );
    }
    let r = http
        .post(USERCODE)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    ensure!(r.status() == 400, "bad JSON: {}", r.status());
    let (status, _) = poll(&http, "deviceauth_nope", "BCDF-GHJK").await?;
    ensure!(status == 404, "an unknown id: {status}");
    Ok(())
}

#[tokio::test]
async fn a_denied_codex_device_is_refused_at_the_poll() -> Result<()> {
    let (sandbox, http) = sandbox().await?;
    let (id, user_code, _) = usercode(&http).await?;
    let b = Browser { http: http.clone() };
    let done = approve_on_the_device_page(&b, &user_code, false).await?;
    ensure!(done.contains("id=\"device-denied\""), "{done}");
    let (status, body) = poll(&http, &id, &user_code).await?;
    ensure!(
        status == 400 && body["error"] == "access_denied",
        "{status} {body}"
    );
    let denied = OAuthEvent::DeviceDenied { user_code };
    ensure!(sandbox.openai.events().contains(&denied));
    Ok(())
}

/// Codex's browser login at the sandbox up to the redirect after Allow.
async fn codex_consent_redirect(http: &reqwest::Client) -> Result<String> {
    let pair = pkce::generate();
    let mut url = url::Url::parse("https://auth.openai.com/oauth/authorize")?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", OPENAI_CODEX)
        .append_pair("redirect_uri", "http://127.0.0.1:1455/auth/callback")
        .append_pair("code_challenge", &pair.challenge)
        .append_pair("code_challenge_method", "S256")
        .append_pair("state", "st1");
    Browser { http: http.clone() }
        .authorize(url.as_str(), true)
        .await
}

#[tokio::test]
async fn tamper_state_and_stray_callback_bend_the_consent_redirect() -> Result<()> {
    let (sandbox, http) = sandbox().await?;
    let plain = codex_consent_redirect(&http).await?;
    ensure!(param(&plain, "state").as_deref() == Some("st1"), "{plain}");

    sandbox.openai.tamper_state(true);
    let tampered = codex_consent_redirect(&http).await?;
    ensure!(
        tampered.starts_with("http://127.0.0.1:1455/auth/callback?"),
        "{tampered}"
    );
    ensure!(param(&tampered, "code").is_some(), "{tampered}");
    let state = param(&tampered, "state");
    ensure!(
        state.is_some() && state.as_deref() != Some("st1"),
        "{tampered}"
    );

    sandbox.openai.stray_callback(true);
    let stray = codex_consent_redirect(&http).await?;
    ensure!(stray == "http://127.0.0.1:1455/favicon.ico", "{stray}");
    sandbox.openai.tamper_state(false);
    sandbox.openai.stray_callback(false);
    let again = codex_consent_redirect(&http).await?;
    ensure!(param(&again, "state").as_deref() == Some("st1"), "{again}");

    // The hosted page's redirect is bent alike.
    sandbox.anthropic.stray_callback(true);
    let pair = pkce::generate();
    let mut url = url::Url::parse("https://claude.ai/oauth/authorize")?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", ANTHROPIC_CLAUDE_CODE)
        .append_pair(
            "redirect_uri",
            "https://platform.claude.com/oauth/code/callback",
        )
        .append_pair("code_challenge", &pair.challenge)
        .append_pair("code_challenge_method", "S256")
        .append_pair("state", "st2");
    let hosted = Browser { http: http.clone() }
        .authorize(url.as_str(), true)
        .await?;
    ensure!(
        hosted == "https://platform.claude.com/favicon.ico",
        "{hosted}"
    );
    Ok(())
}
