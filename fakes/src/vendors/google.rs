//! Google's side of the Gemini CLI (0.61) login, as the sandbox serves it:
//! the authorization page at accounts.google.com, the token and tokeninfo
//! endpoints at oauth2.googleapis.com, userinfo at www.googleapis.com, the
//! Code Assist API the CLI calls after login and on every start
//! (cloudcode-pa.googleapis.com), the page of the user-code flow
//! (codeassist.google.com/authcode) and the pages the CLI's callback
//! redirects to (developers.google.com).
//!
//! What the CLI needs of each answer (from the CLI's code and runs against
//! this stand-in): tokeninfo must carry `scope` and `expires_in` or the
//! CLI throws its cached credential away; userinfo's `email`;
//! loadCodeAssist's `currentTier` and `cloudaicompanionProject` mean
//! "already onboarded".

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::{bearer, html, json};
use crate::oauth::{AccessInfo, Endpoint, FakeOAuth};

/// Where the sign-in pages live.
pub const OAUTH_BASE: &str = "https://accounts.google.com/signin/airlock";
/// Every host this module answers.
pub const HOSTS: &[&str] = &[
    "accounts.google.com",
    "oauth2.googleapis.com",
    "www.googleapis.com",
    "cloudcode-pa.googleapis.com",
    "codeassist.google.com",
    "developers.google.com",
    "play.googleapis.com",
];
/// The Code Assist project every sandbox user is onboarded to.
pub const PROJECT: &str = "airlock-sandbox-project";

/// The routes, by host.
pub(super) fn routes(oauth: &FakeOAuth) -> Vec<(&'static str, Router)> {
    let api = |r: Router<FakeOAuth>| r.with_state(oauth.clone());
    vec![
        (
            "accounts.google.com",
            Router::new()
                .route("/o/oauth2/v2/auth", oauth.endpoint(Endpoint::Authorize))
                .route("/o/oauth2/auth", oauth.endpoint(Endpoint::Authorize))
                .nest("/signin/airlock", oauth.router()),
        ),
        (
            "oauth2.googleapis.com",
            api(Router::new()
                .route("/token", post(token))
                .route("/tokeninfo", get(tokeninfo).post(tokeninfo))
                .route("/revoke", post(|| async { StatusCode::OK }))),
        ),
        (
            "www.googleapis.com",
            api(Router::new().route("/oauth2/v2/userinfo", get(userinfo))),
        ),
        (
            "cloudcode-pa.googleapis.com",
            api(Router::new().route("/{call}", post(code_assist))),
        ),
        (
            "codeassist.google.com",
            Router::new().route("/authcode", get(authcode_page)),
        ),
        (
            "developers.google.com",
            Router::new().route("/gemini-code-assist/{page}", get(done_page)),
        ),
        // Usage statistics (Clearcut): accepted and dropped.
        (
            "play.googleapis.com",
            Router::new().route("/log", post(|| async { json(StatusCode::OK, json!({})) })),
        ),
    ]
}

/// Google's error body for a missing or bad bearer token.
fn unauthenticated() -> Response {
    json(
        StatusCode::UNAUTHORIZED,
        json!({"error": {"code": 401, "status": "UNAUTHENTICATED",
            "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential."}}),
    )
}

fn caller(oauth: &FakeOAuth, headers: &HeaderMap) -> Option<AccessInfo> {
    oauth.access_token_info(bearer(headers)?)
}

/// `POST /token`: the OAuth token endpoint.
async fn token(State(oauth): State<FakeOAuth>, headers: HeaderMap, body: Bytes) -> Response {
    oauth.token(&headers, &body)
}

/// `/tokeninfo`: the token from the bearer header, the query or the form.
async fn tokeninfo(
    State(oauth): State<FakeOAuth>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let token = bearer(&headers)
        .or(q.get("access_token").map(String::as_str))
        .or(form.get("access_token").map(String::as_str));
    let Some(info) = token.and_then(|t| oauth.access_token_info(t)) else {
        return json(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_token", "error_description": "Invalid Value"}),
        );
    };
    let secs = info.expires_in.as_secs();
    json(
        StatusCode::OK,
        json!({
            "azp": info.client_id, "aud": info.client_id, "sub": sub(&info),
            "scope": info.scope, "exp": (now_secs() + secs).to_string(),
            "expires_in": secs.to_string(), "email": info.user.email(),
            "email_verified": "true", "access_type": "offline",
        }),
    )
}

/// `GET /oauth2/v2/userinfo`.
async fn userinfo(State(oauth): State<FakeOAuth>, headers: HeaderMap) -> Response {
    let Some(info) = caller(&oauth, &headers) else {
        return unauthenticated();
    };
    json(
        StatusCode::OK,
        json!({"id": sub(&info), "email": info.user.email(), "verified_email": true,
            "name": info.user.username, "given_name": info.user.username}),
    )
}

/// `POST /v1internal:{method}`: the Code Assist calls the CLI makes.
async fn code_assist(
    State(oauth): State<FakeOAuth>,
    Path(call): Path<String>,
    headers: HeaderMap,
) -> Response {
    if caller(&oauth, &headers).is_none() {
        return unauthenticated();
    }
    let tier = json!({"id": "free-tier", "name": "Gemini Code Assist for individuals",
        "description": "Sandbox tier", "userDefinedCloudaicompanionProject": false});
    let answer: Value = match call.strip_prefix("v1internal:").unwrap_or("") {
        "loadCodeAssist" => json!({
            "currentTier": tier,
            "allowedTiers": [{"id": "free-tier", "name": "Gemini Code Assist for individuals", "isDefault": true}],
            "cloudaicompanionProject": PROJECT,
        }),
        "onboardUser" => json!({"name": "operations/airlock-onboard", "done": true,
            "response": {"cloudaicompanionProject": {"id": PROJECT, "name": PROJECT}}}),
        "retrieveUserQuota" => json!({"buckets": []}),
        "listExperiments" => json!({"experimentIds": [], "flags": []}),
        "fetchAdminControls" => json!({}),
        "countTokens" => json!({"totalTokens": 1}),
        "generateContent" => generated(),
        "streamGenerateContent" => {
            let event = format!("data: {}\r\n\r\n", generated());
            return ([("content-type", "text/event-stream")], event).into_response();
        }
        _ => {
            return json(
                StatusCode::NOT_FOUND,
                json!({"error": {"code": 404, "status": "NOT_FOUND",
                    "message": format!("Method not found: {call}")}}),
            )
        }
    };
    json(StatusCode::OK, answer)
}

/// A model answer: the sandbox's model always says "pong".
fn generated() -> Value {
    json!({
        "response": {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "pong"}]},
                "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
            "modelVersion": "gemini-2.5-flash",
        },
        "traceId": "airlock-sandbox",
    })
}

/// `GET /authcode`: the page of the user-code flow, showing the code to
/// paste into the CLI (the user pastes the bare code).
async fn authcode_page(Query(q): Query<HashMap<String, String>>) -> Response {
    let body = match (q.get("code"), q.get("error")) {
        (Some(code), _) if !code.is_empty() => format!(
            "<h1>Sign in to Gemini Code Assist</h1><p>Copy this code and paste it into the CLI:</p>\
             <p><code id=\"auth-code\">{}</code></p>",
            escape(code)
        ),
        (_, Some(error)) => format!(
            "<h1>Sign-in failed</h1><p id=\"auth-error\">{}</p>",
            escape(error)
        ),
        _ => "<h1>Sign-in failed</h1><p id=\"auth-error\">No code was received.</p>".into(),
    };
    html(page("Gemini Code Assist", &body))
}

/// `GET /gemini-code-assist/auth_success_gemini` and `.../auth_failure_gemini`.
async fn done_page(Path(page_name): Path<String>) -> Response {
    let text = if page_name.contains("success") {
        "You have signed in to Gemini Code Assist. You can close this window."
    } else {
        "Sign-in to Gemini Code Assist failed. Return to the CLI."
    };
    html(page(
        "Gemini Code Assist",
        &format!("<p id=\"result\">{text}</p>"),
    ))
}

fn page(title: &str, body: &str) -> String {
    format!("<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body>{body}</body></html>")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn sub(info: &AccessInfo) -> String {
    let digits: String = info
        .user
        .username
        .bytes()
        .map(|b| char::from(b'0' + b % 10))
        .collect();
    format!("1{digits:0<20}")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
