//! OpenAI's side of the Codex CLI (0.171) login, as the sandbox serves it
//! on auth.openai.com:
//!
//! - `GET /oauth/authorize`: the authorization page (browser login);
//! - `POST /oauth/token`: the OAuth grants, including the token exchange
//!   Codex makes right after a browser login for an API key
//!   (`grant_type=urn:ietf:params:oauth:grant-type:token-exchange`,
//!   `requested_token=openai-api-key`, the id token as subject);
//! - `codex login --device-auth`: `POST /api/accounts/deviceauth/usercode`
//!   (JSON `client_id`; answers `device_auth_id`, `user_code` and
//!   `interval` as a string of seconds), `GET /codex/device` (the fixed
//!   verification URL the CLI prints: a redirect to the fake's device entry
//!   page), and `POST /api/accounts/deviceauth/token` (JSON
//!   `device_auth_id` and `user_code`; 403 while pending, then once an
//!   authorization code with the PKCE pair the server made, which the CLI
//!   redeems at `/oauth/token` with [`DEVICE_REDIRECT_URI`]);
//! - `/airlock/…`: the fake's own sign-in, consent and device pages.
//!
//! Refresh tokens rotate, as OpenAI's do: a refresh answers with a new one
//! and the old one is refused from then on.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use super::json;
use crate::oauth::clients::OPENAI_CODEX;
use crate::oauth::{DeviceCodeError, Endpoint, FakeOAuth};
use crate::pkce::random_urlsafe;

/// Where the sign-in pages live.
pub const OAUTH_BASE: &str = "https://auth.openai.com/airlock";
/// Every host this module answers.
pub const HOSTS: &[&str] = &["auth.openai.com"];

/// The redirect URI Codex redeems a device login's code with: OpenAI's own
/// callback, registered for Codex's client, never visited by a browser.
pub const DEVICE_REDIRECT_URI: &str = "https://auth.openai.com/deviceauth/callback";
/// The scope a device login's tokens get: what Codex's browser login asks
/// for (codex-rs `login/src/server.rs`), as the device API takes none.
pub const DEVICE_SCOPE: &str =
    "openid profile email offline_access api.connectors.read api.connectors.invoke";

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// `device_auth_id` is the fake's device code behind this prefix, so no
/// second table is needed to map one to the other.
const DEVICE_AUTH_PREFIX: &str = "deviceauth_";

/// The routes, by host.
pub(super) fn routes(oauth: &FakeOAuth) -> Vec<(&'static str, Router)> {
    let state = |r: Router<FakeOAuth>| r.with_state(oauth.clone());
    vec![(
        "auth.openai.com",
        state(
            Router::new()
                .route("/oauth/token", post(token))
                .route("/api/accounts/deviceauth/usercode", post(device_usercode))
                .route("/api/accounts/deviceauth/token", post(device_token))
                .route("/codex/device", get(device_page)),
        )
        .route("/oauth/authorize", oauth.endpoint(Endpoint::Authorize))
        .nest("/airlock", oauth.router()),
    )]
}

/// `POST /oauth/token`: the OAuth grants, and the API-key exchange.
async fn token(State(oauth): State<FakeOAuth>, headers: HeaderMap, body: Bytes) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some(TOKEN_EXCHANGE) {
        return oauth.token(&headers, &body);
    }
    let refuse =
        |error: &str, description: &str| refusal(StatusCode::BAD_REQUEST, error, description);
    if form.get("client_id").map(String::as_str) != Some(OPENAI_CODEX) {
        return refuse("invalid_client", "unknown client");
    }
    if form.get("requested_token").map(String::as_str) != Some("openai-api-key") {
        return refuse("invalid_request", "requested_token must be openai-api-key");
    }
    let subject = form.get("subject_token").map_or("", String::as_str);
    let claims = subject
        .split('.')
        .nth(1)
        .and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
        .and_then(|c| serde_json::from_slice::<Value>(&c).ok());
    let issued_here = claims
        .as_ref()
        .is_some_and(|c| c["iss"] == oauth.base_url() && c["aud"] == OPENAI_CODEX);
    if !issued_here || !subject.contains(&oauth.config().token_marker) {
        return refuse(
            "invalid_grant",
            "subject_token is not an id token of this issuer",
        );
    }
    let key = format!(
        "sk-proj-{}_{}",
        oauth.config().token_marker,
        random_urlsafe(32)
    );
    json(
        StatusCode::OK,
        json!({"access_token": key, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer"}),
    )
}

/// A JSON error answer, in the RFC 6749 shape the other endpoints use.
fn refusal(status: StatusCode, error: &str, description: &str) -> Response {
    json(
        status,
        json!({"error": error, "error_description": description}),
    )
}

/// The string field `name` of a JSON object body.
fn json_field(body: &[u8], name: &str) -> Option<String> {
    let value = serde_json::from_slice::<Value>(body).ok()?;
    value.get(name)?.as_str().map(str::to_string)
}

/// `POST /api/accounts/deviceauth/usercode`: starts a device login.
async fn device_usercode(State(oauth): State<FakeOAuth>, body: Bytes) -> Response {
    let Some(client_id) = json_field(&body, "client_id") else {
        let why = "the body must be a JSON object with a client_id";
        return refusal(StatusCode::BAD_REQUEST, "invalid_request", why);
    };
    // Only Codex's client has device logins at OpenAI.
    if client_id != OPENAI_CODEX {
        return refusal(StatusCode::BAD_REQUEST, "invalid_client", "unknown client");
    }
    let issued = match oauth.issue_device(&client_id, DEVICE_SCOPE) {
        Ok(issued) => issued,
        Err(e) => return refusal(StatusCode::BAD_REQUEST, e.code(), &e.to_string()),
    };
    // A string, as OpenAI sends it; Codex sleeps this long between polls.
    let interval = oauth.config().device_poll_interval.as_secs().max(1);
    json(
        StatusCode::OK,
        json!({
            "device_auth_id": format!("{DEVICE_AUTH_PREFIX}{}", issued.device_code),
            "user_code": issued.user_code,
            "interval": interval.to_string(),
        }),
    )
}

/// `POST /api/accounts/deviceauth/token`: 403 while pending (Codex keeps
/// polling on 403 and 404), the code and its PKCE pair once approved, 400
/// when denied, expired or already answered (Codex gives up).
async fn device_token(State(oauth): State<FakeOAuth>, body: Bytes) -> Response {
    let (Some(id), Some(user_code)) = (
        json_field(&body, "device_auth_id"),
        json_field(&body, "user_code"),
    ) else {
        let why = "the body must be a JSON object with device_auth_id and user_code";
        return refusal(StatusCode::BAD_REQUEST, "invalid_request", why);
    };
    let device_code = id.strip_prefix(DEVICE_AUTH_PREFIX).unwrap_or_default();
    match oauth.device_authorization_code(device_code, &user_code, DEVICE_REDIRECT_URI) {
        Ok(granted) => json(
            StatusCode::OK,
            json!({
                "authorization_code": granted.code,
                "code_challenge": granted.challenge,
                "code_verifier": granted.verifier,
            }),
        ),
        Err(e) => {
            let status = match e {
                DeviceCodeError::Pending => StatusCode::FORBIDDEN,
                DeviceCodeError::Unknown => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_REQUEST,
            };
            refusal(status, e.code(), &e.to_string())
        }
    }
}

/// `GET /codex/device`: the verification URL Codex prints. The person
/// lands on the fake's device entry page (query kept), whose form and
/// sign-in live under `/airlock`.
async fn device_page(State(oauth): State<FakeOAuth>, RawQuery(query): RawQuery) -> Response {
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    let location = format!("{}/device{query}", oauth.base_url());
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, location),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response()
}
