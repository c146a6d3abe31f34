//! Behaviour of the fake OAuth server on its own, driven over HTTP the way
//! a browser and a CLI would: sign-in, consent, the code exchange and its
//! PKCE and single-use rules, refresh, the device grant, the hosted code
//! page, and mounting under a path prefix.

mod common;

use std::time::Duration;

use airlock_fakes::oauth::{FakeOAuth, FakeOAuthConfig, OAuthEvent};
use airlock_fakes::pkce;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{location, param, server, server_with, Browser, DEADLINE, MARKER};
use serde_json::Value;

const CODEX_CB: &str = "http://localhost:1455/auth/callback";

fn authorize_url(base: &str, client: &str, redirect: &str, challenge: &str, state: &str) -> String {
    let mut url = url::Url::parse(&format!("{base}/authorize")).expect("base parses");
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client)
        .append_pair("redirect_uri", redirect)
        .append_pair("scope", "openid email")
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256")
        .append_pair("state", state);
    url.to_string()
}

async fn exchange(b: &Browser, base: &str, form: &[(&str, &str)]) -> anyhow::Result<(u16, Value)> {
    let resp = b
        .http
        .post(format!("{base}/token"))
        .form(form)
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

/// Runs sign-in and Allow for codex-cli; returns (code, verifier).
async fn codex_code(b: &Browser, base: &str) -> anyhow::Result<(String, String)> {
    let pair = pkce::generate();
    let loc = b
        .authorize(
            &authorize_url(base, "codex-cli", CODEX_CB, &pair.challenge, "st1"),
            true,
        )
        .await?;
    assert!(loc.starts_with(CODEX_CB), "{loc}");
    assert_eq!(param(&loc, "state").as_deref(), Some("st1"));
    Ok((
        param(&loc, "code").expect("code in redirect"),
        pair.verifier,
    ))
}

fn jwt_payload(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("JWT has three parts");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url"))
        .expect("JSON payload")
}

#[tokio::test]
async fn unknown_client_and_unregistered_redirect_get_an_error_page_not_a_redirect(
) -> anyhow::Result<()> {
    let (fake, srv) = server().await?;
    let b = Browser::new()?;
    let ch = pkce::generate().challenge;
    for url in [
        authorize_url(srv.base_url(), "nobody", CODEX_CB, &ch, "s"),
        authorize_url(
            srv.base_url(),
            "codex-cli",
            "http://localhost:9999/auth/callback",
            &ch,
            "s",
        ),
        authorize_url(
            srv.base_url(),
            "codex-cli",
            "http://evil.example/cb",
            &ch,
            "s",
        ),
    ] {
        let resp = b.get(&url).await?;
        assert_eq!(resp.status(), 400);
        assert!(resp.headers().get("location").is_none());
        assert!(resp.text().await?.contains("id=\"oauth-error\""));
    }
    let rejected = fake
        .events()
        .iter()
        .filter(|e| matches!(e, OAuthEvent::AuthorizeRejected { .. }))
        .count();
    assert_eq!(rejected, 3);
    Ok(())
}

#[tokio::test]
async fn missing_or_plain_pkce_is_sent_back_as_invalid_request() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let b = Browser::new()?;
    let verifier = pkce::generate().verifier;
    let plain = authorize_url(srv.base_url(), "codex-cli", CODEX_CB, &verifier, "s9")
        .replace("S256", "plain");
    let none = format!(
        "{}/authorize?response_type=code&client_id=codex-cli&redirect_uri={}&state=s9",
        srv.base_url(),
        common_encode(CODEX_CB)
    );
    for url in [plain, none] {
        let resp = b.get(&url).await?;
        assert_eq!(resp.status(), 302);
        let loc = location(&resp)?;
        assert_eq!(param(&loc, "error").as_deref(), Some("invalid_request"));
        assert_eq!(param(&loc, "state").as_deref(), Some("s9"));
    }
    Ok(())
}

fn common_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn wrong_password_shows_the_form_again_with_401() -> anyhow::Result<()> {
    let (fake, srv) = server().await?;
    let b = Browser::new()?;
    let url = authorize_url(
        srv.base_url(),
        "codex-cli",
        CODEX_CB,
        &pkce::generate().challenge,
        "s",
    );
    let (status, page) = b.sign_in(&url, "alice", "wrong").await?;
    assert_eq!(status, 401);
    assert!(page.contains("Invalid username or password"));
    assert!(page.contains("id=\"username\" autocomplete=\"username\" autofocus"));
    // The same request can still succeed.
    let (status, consent) = b.submit_login(&page, "alice", "correct horse").await?;
    assert_eq!(status, 200);
    assert!(consent.contains("Allow Codex CLI to access your account?"));
    let allow = consent
        .find("id=\"allow\" autofocus")
        .expect("Allow is focused");
    let deny = consent.find("id=\"deny\"").expect("Deny exists");
    assert!(allow < deny && !consent[allow..deny].contains("<input"));
    assert!(fake.events().contains(&OAuthEvent::LoginFailed {
        username: "alice".into()
    }));
    Ok(())
}

#[tokio::test]
async fn allow_then_exchange_returns_tokens_carrying_the_marker() -> anyhow::Result<()> {
    let (fake, srv) = server().await?;
    let b = Browser::new()?;
    let (code, verifier) = codex_code(&b, srv.base_url()).await?;
    let (status, body) = exchange(
        &b,
        srv.base_url(),
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", CODEX_CB),
            ("client_id", "codex-cli"),
            ("code_verifier", &verifier),
        ],
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "openid email");
    for field in ["access_token", "refresh_token", "id_token"] {
        assert!(
            body[field].as_str().expect(field).contains(MARKER),
            "{field} lacks the marker"
        );
    }
    let claims = jwt_payload(body["id_token"].as_str().unwrap_or_default());
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["iss"], srv.base_url());
    assert!(claims["sub"].is_string() && claims["exp"].is_u64());
    assert!(claims["https://api.openai.com/auth"]["chatgpt_account_id"].is_string());
    assert!(fake.events().contains(&OAuthEvent::CodeRedeemed {
        client_id: "codex-cli".into()
    }));
    Ok(())
}

#[tokio::test]
async fn deny_redirects_with_access_denied_and_the_state() -> anyhow::Result<()> {
    let (fake, srv) = server().await?;
    let b = Browser::new()?;
    let url = authorize_url(
        srv.base_url(),
        "codex-cli",
        CODEX_CB,
        &pkce::generate().challenge,
        "keep-me",
    );
    let loc = b.authorize(&url, false).await?;
    assert!(loc.starts_with(CODEX_CB));
    assert_eq!(param(&loc, "error").as_deref(), Some("access_denied"));
    assert_eq!(param(&loc, "state").as_deref(), Some("keep-me"));
    assert!(param(&loc, "code").is_none());
    assert!(fake
        .events()
        .iter()
        .any(|e| matches!(e, OAuthEvent::ConsentDenied { .. })));
    Ok(())
}

#[tokio::test]
async fn a_wrong_verifier_is_rejected() -> anyhow::Result<()> {
    let (fake, srv) = server().await?;
    let b = Browser::new()?;
    let (code, _verifier) = codex_code(&b, srv.base_url()).await?;
    let other = pkce::generate().verifier;
    let (status, body) = exchange(
        &b,
        srv.base_url(),
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", CODEX_CB),
            ("client_id", "codex-cli"),
            ("code_verifier", &other),
        ],
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(fake.events().contains(&OAuthEvent::CodeRejected {
        client_id: "codex-cli".into(),
        reason: "pkce_mismatch".into()
    }));
    Ok(())
}

#[tokio::test]
async fn a_code_works_once_and_its_reuse_revokes_the_refresh_token() -> anyhow::Result<()> {
    let (fake, srv) = server().await?;
    let b = Browser::new()?;
    let (code, verifier) = codex_code(&b, srv.base_url()).await?;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", CODEX_CB),
        ("client_id", "codex-cli"),
        ("code_verifier", verifier.as_str()),
    ];
    let (first, tokens) = exchange(&b, srv.base_url(), &form).await?;
    assert_eq!(first, 200);
    let (second, body) = exchange(&b, srv.base_url(), &form).await?;
    assert_eq!(
        (second, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(fake.events().contains(&OAuthEvent::CodeReused {
        client_id: "codex-cli".into()
    }));
    let refresh = tokens["refresh_token"].as_str().unwrap_or_default();
    let (status, body) = exchange(
        &b,
        srv.base_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("client_id", "codex-cli"),
        ],
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    Ok(())
}

#[tokio::test]
async fn redirect_uri_must_match_and_expired_codes_fail() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let b = Browser::new()?;
    let (code, verifier) = codex_code(&b, srv.base_url()).await?;
    let (status, body) = exchange(
        &b,
        srv.base_url(),
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://localhost:1457/auth/callback"),
            ("client_id", "codex-cli"),
            ("code_verifier", &verifier),
        ],
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    let (fake, srv) = server_with(|c| c.code_ttl = Duration::ZERO).await?;
    let (code, verifier) = codex_code(&b, srv.base_url()).await?;
    let (status, _) = exchange(
        &b,
        srv.base_url(),
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", CODEX_CB),
            ("client_id", "codex-cli"),
            ("code_verifier", &verifier),
        ],
    )
    .await?;
    assert_eq!(status, 400);
    assert!(fake.events().contains(&OAuthEvent::CodeRejected {
        client_id: "codex-cli".into(),
        reason: "expired".into()
    }));
    Ok(())
}

#[tokio::test]
async fn refresh_issues_a_new_access_token_and_json_bodies_are_accepted() -> anyhow::Result<()> {
    let (fake, srv) = server().await?;
    let b = Browser::new()?;
    let pair = pkce::generate();
    let manual = format!("{}/code/callback", srv.base_url());
    let loc = b
        .authorize(
            &authorize_url(srv.base_url(), "claude-code", &manual, &pair.challenge, "s"),
            true,
        )
        .await?;
    let code = param(&loc, "code").expect("code");
    let body = serde_json::json!({"grant_type": "authorization_code", "code": code, "state": "s",
        "client_id": "claude-code", "redirect_uri": manual, "code_verifier": pair.verifier});
    let tokens: Value = b
        .http
        .post(format!("{}/token", srv.base_url()))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let access = tokens["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        access.starts_with("sk-ant-oat01-") && access.contains(MARKER),
        "{access}"
    );
    let refresh = tokens["refresh_token"].as_str().unwrap_or_default();
    let (status, again) = exchange(
        &b,
        srv.base_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("client_id", "claude-code"),
        ],
    )
    .await?;
    assert_eq!(status, 200);
    assert_ne!(again["access_token"].as_str(), Some(access.as_str()));
    assert!(fake.events().contains(&OAuthEvent::TokenRefreshed {
        client_id: "claude-code".into()
    }));
    Ok(())
}

#[tokio::test]
async fn the_hosted_page_shows_code_hash_state_or_the_error() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let b = Browser::new()?;
    let page = b
        .get(&format!(
            "{}/code/callback?code=abc&state=xyz",
            srv.base_url()
        ))
        .await?
        .text()
        .await?;
    assert!(
        page.contains("<code id=\"oauth-code\">abc#xyz</code>"),
        "{page}"
    );
    let page = b
        .get(&format!(
            "{}/code/callback?error=access_denied&error_description=nope",
            srv.base_url()
        ))
        .await?
        .text()
        .await?;
    assert!(
        page.contains("id=\"oauth-error\">access_denied: nope"),
        "{page}"
    );
    Ok(())
}

async fn poll(b: &Browser, base: &str, device_code: &str) -> anyhow::Result<(u16, Value)> {
    exchange(
        b,
        base,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
            ("client_id", "codex-cli"),
        ],
    )
    .await
}

async fn device_code(b: &Browser, base: &str) -> anyhow::Result<Value> {
    let resp = b
        .http
        .post(format!("{base}/device/code"))
        .form(&[("client_id", "codex-cli"), ("scope", "openid")])
        .send()
        .await?;
    Ok(resp.json().await?)
}

#[tokio::test]
async fn device_grant_goes_from_pending_to_tokens_once_approved() -> anyhow::Result<()> {
    let (fake, srv) = server().await?;
    let b = Browser::new()?;
    let dc = device_code(&b, srv.base_url()).await?;
    let device_code = dc["device_code"].as_str().unwrap_or_default().to_string();
    let user_code = dc["user_code"].as_str().unwrap_or_default().to_string();
    assert_eq!(dc["verification_uri"], format!("{}/device", srv.base_url()));
    assert_eq!(user_code.len(), 9);

    let (status, body) = poll(&b, srv.base_url(), &device_code).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("authorization_pending"))
    );

    // The user enters the code (lower case, no dash), signs in and allows.
    let entry = b
        .get(&format!("{}/device", srv.base_url()))
        .await?
        .text()
        .await?;
    assert!(entry.contains("name=\"user_code\""));
    let typed = user_code.replace('-', "").to_lowercase();
    let page = b
        .get(&format!("{}/device?user_code={typed}", srv.base_url()))
        .await?
        .text()
        .await?;
    assert!(page.contains(&user_code), "{page}");
    let (status, consent) = b.submit_login(&page, "alice", "correct horse").await?;
    assert_eq!(status, 200);
    let done = b.decide(&consent, true).await?.text().await?;
    assert!(done.contains("id=\"device-approved\""));
    fake.wait_for_event(|e| matches!(e, OAuthEvent::DeviceApproved { .. }), DEADLINE)
        .await
        .expect("approved");

    let (status, tokens) = poll(&b, srv.base_url(), &device_code).await?;
    assert_eq!(status, 200, "{tokens}");
    assert!(tokens["access_token"]
        .as_str()
        .unwrap_or_default()
        .contains(MARKER));
    let (_, body) = poll(&b, srv.base_url(), &device_code).await?;
    assert_eq!(
        body["error"], "invalid_grant",
        "a device code is redeemed once"
    );
    Ok(())
}

#[tokio::test]
async fn polling_faster_than_the_interval_gets_slow_down() -> anyhow::Result<()> {
    let (_fake, srv) = server_with(|c| c.device_poll_interval = Duration::from_secs(60)).await?;
    let b = Browser::new()?;
    let dc = device_code(&b, srv.base_url()).await?;
    assert_eq!(dc["interval"], 60);
    let device_code = dc["device_code"].as_str().unwrap_or_default();
    let (_, first) = poll(&b, srv.base_url(), device_code).await?;
    assert_eq!(first["error"], "authorization_pending");
    let (_, second) = poll(&b, srv.base_url(), device_code).await?;
    assert_eq!(second["error"], "slow_down");
    Ok(())
}

#[tokio::test]
async fn device_grant_denied_and_expired() -> anyhow::Result<()> {
    let (_fake, srv) = server().await?;
    let b = Browser::new()?;
    let dc: Value = b
        .http
        .post(format!("{}/device/code", srv.base_url()))
        .form(&[("client_id", "codex-cli")])
        .send()
        .await?
        .json()
        .await?;
    let page = b
        .get(dc["verification_uri_complete"].as_str().unwrap_or_default())
        .await?
        .text()
        .await?;
    let (_, consent) = b.submit_login(&page, "alice", "correct horse").await?;
    let done = b.decide(&consent, false).await?.text().await?;
    assert!(done.contains("id=\"device-denied\""));
    let (_, body) = poll(
        &b,
        srv.base_url(),
        dc["device_code"].as_str().unwrap_or_default(),
    )
    .await?;
    assert_eq!(body["error"], "access_denied");

    let (_fake, srv) = server_with(|c| c.device_code_ttl = Duration::ZERO).await?;
    let dc: Value = b
        .http
        .post(format!("{}/device/code", srv.base_url()))
        .form(&[("client_id", "codex-cli")])
        .send()
        .await?
        .json()
        .await?;
    let (_, body) = poll(
        &b,
        srv.base_url(),
        dc["device_code"].as_str().unwrap_or_default(),
    )
    .await?;
    assert_eq!(body["error"], "expired_token");
    Ok(())
}

#[tokio::test]
async fn mounted_under_a_prefix_every_link_keeps_the_prefix() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/demo/oauth", listener.local_addr()?);
    let fake = FakeOAuth::new(FakeOAuthConfig {
        base_url: format!("{base}/"),
        ..FakeOAuthConfig::default()
    })?;
    assert_eq!(fake.base_url(), base);
    let app = axum::Router::new().nest("/demo/oauth", fake.router());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let b = Browser::new()?;
    let pair = pkce::generate();
    let url = authorize_url(
        &base,
        "airlock-demo",
        "http://localhost:1460/auth/callback",
        &pair.challenge,
        "s",
    );
    let page = b.get(&url).await?.text().await?;
    assert!(
        page.contains(&format!("action=\"{base}/authorize/login\"")),
        "{page}"
    );
    let loc = b.authorize(&url, true).await?;
    let code = param(&loc, "code").expect("code");
    let (status, body) = exchange(
        &b,
        &base,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://localhost:1460/auth/callback"),
            ("client_id", "airlock-demo"),
            ("code_verifier", &pair.verifier),
        ],
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"]
        .as_str()
        .unwrap_or_default()
        .starts_with("demo_at_AIRLOCKCANARY_"));
    server.abort();
    Ok(())
}
