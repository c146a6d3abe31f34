//! OpenAI's side of the Codex CLI (0.171) login, as the sandbox serves it:
//! auth.openai.com's authorization page and token endpoint, including the
//! token exchange Codex makes right after login for an API key
//! (`grant_type=urn:ietf:params:oauth:grant-type:token-exchange`,
//! `requested_token=openai-api-key`, the id token as subject).
//!
//! Refresh tokens rotate, as OpenAI's do: a refresh answers with a new one
//! and the old one is refused from then on.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use super::json;
use crate::oauth::clients::OPENAI_CODEX;
use crate::oauth::{Endpoint, FakeOAuth};
use crate::pkce::random_urlsafe;

/// Where the sign-in pages live.
pub const OAUTH_BASE: &str = "https://auth.openai.com/airlock";
/// Every host this module answers.
pub const HOSTS: &[&str] = &["auth.openai.com"];

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// The routes, by host.
pub(super) fn routes(oauth: &FakeOAuth) -> Vec<(&'static str, Router)> {
    vec![(
        "auth.openai.com",
        Router::new()
            .route("/oauth/authorize", oauth.endpoint(Endpoint::Authorize))
            .route("/oauth/token", post(token).with_state(oauth.clone()))
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
    let refuse = |error: &str, description: &str| {
        json(
            StatusCode::BAD_REQUEST,
            json!({"error": error, "error_description": description}),
        )
    };
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
