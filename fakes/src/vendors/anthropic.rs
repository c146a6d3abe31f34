//! Anthropic's side of the Claude Code (2.1) login, as the sandbox serves
//! it: the authorization page (claude.com/cai/oauth/authorize for the
//! browser, claude.ai/oauth/authorize for the printed link,
//! platform.claude.com/oauth/authorize for Console logins), the token
//! endpoint (JSON bodies), the hosted page that shows `code#state` for a
//! pasted login, the success page the CLI's callback redirects to, and the
//! account endpoints the CLI calls after the exchange (profile, roles).
//!
//! Refresh tokens rotate, as Anthropic's do.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use super::{bearer, html, json};
use crate::oauth::{account_id, AccessInfo, Endpoint, FakeOAuth};

/// Where the sign-in pages live.
pub const OAUTH_BASE: &str = "https://claude.com/airlock";
/// Every host this module answers.
pub const HOSTS: &[&str] = &[
    "claude.com",
    "claude.ai",
    "platform.claude.com",
    "api.anthropic.com",
];

/// The routes, by host.
pub(super) fn routes(oauth: &FakeOAuth) -> Vec<(&'static str, Router)> {
    let state = |r: Router<FakeOAuth>| r.with_state(oauth.clone());
    vec![
        (
            "claude.com",
            Router::new()
                .route("/cai/oauth/authorize", oauth.endpoint(Endpoint::Authorize))
                .nest("/airlock", oauth.router()),
        ),
        (
            "claude.ai",
            Router::new().route("/oauth/authorize", oauth.endpoint(Endpoint::Authorize)),
        ),
        (
            "platform.claude.com",
            Router::new()
                .route("/oauth/authorize", oauth.endpoint(Endpoint::Authorize))
                .route("/v1/oauth/token", oauth.endpoint(Endpoint::Token))
                .route("/oauth/code/callback", oauth.endpoint(Endpoint::HostedCode))
                .route("/oauth/code/success", get(success_page)),
        ),
        (
            "api.anthropic.com",
            state(
                Router::new()
                    .route("/api/oauth/profile", get(profile))
                    .route("/api/oauth/claude_cli/roles", get(roles))
                    // Telemetry: accepted and dropped.
                    .route(
                        "/api/event_logging/v2/batch",
                        post(|| async { json(StatusCode::OK, json!({})) }),
                    ),
            ),
        ),
    ]
}

fn caller(oauth: &FakeOAuth, headers: &HeaderMap) -> Option<AccessInfo> {
    oauth.access_token_info(bearer(headers)?)
}

fn unauthorized() -> Response {
    json(
        StatusCode::UNAUTHORIZED,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "Invalid bearer token"}}),
    )
}

/// A request id in Anthropic's form: the CLI treats answers that carry
/// one as coming from Anthropic rather than from an intermediary.
fn stamped(body: serde_json::Value) -> Response {
    let id = format!(
        "req_airlock{}",
        crate::pkce::random_urlsafe(12).replace('-', "_")
    );
    ([("request-id", id)], axum::Json(body)).into_response()
}

/// `GET /api/oauth/profile`.
async fn profile(State(oauth): State<FakeOAuth>, headers: HeaderMap) -> Response {
    let Some(info) = caller(&oauth, &headers) else {
        return unauthorized();
    };
    let email = info.user.email();
    stamped(json!({
        "account": {"uuid": account_id(&info.user.username), "email": email, "email_address": email,
            "display_name": info.user.username, "full_name": info.user.username,
            "created_at": "2025-01-01T00:00:00Z"},
        "organization": {"uuid": account_id("org"), "name": "Sandbox Org",
            "organization_type": "claude_max", "rate_limit_tier": "default_claude_max_20x",
            "billing_type": "stripe_subscription", "has_extra_usage_enabled": false},
    }))
}

/// `GET /api/oauth/claude_cli/roles`.
async fn roles(State(oauth): State<FakeOAuth>, headers: HeaderMap) -> Response {
    if caller(&oauth, &headers).is_none() {
        return unauthorized();
    }
    stamped(json!({"organization_role": "admin", "workspace_role": null,
        "organization_name": "Sandbox Org"}))
}

/// `GET /oauth/code/success`.
async fn success_page() -> Response {
    html("<!doctype html><html><head><meta charset=\"utf-8\"><title>Claude Code</title></head>\
          <body><p id=\"result\">Login successful. You can close this window and return to Claude Code.</p></body></html>"
        .into())
}
