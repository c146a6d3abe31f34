//! The browser-facing side of the fake server: `/authorize` and its sign-in
//! and consent forms, the hosted code page, the success and failure pages
//! CLIs redirect to, and the device-code entry page. Routed by
//! [`super::FakeOAuth::router`]. The redirect after consent honours the
//! failure-test knobs [`super::FakeOAuth::tamper_state`] and
//! [`super::FakeOAuth::stray_callback`].

use std::collections::HashMap;

use axum::extract::{Form, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::clients::{self, Client};
use super::store::{AuthRequest, CodeGrant, DeviceStatus, Pending, Store, Target};
use super::{pages, FakeOAuth, OAuthEvent};
use crate::pkce::random_urlsafe;

type Params = HashMap<String, String>;

/// The sign-in form's fields.
#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    request_id: String,
    username: String,
    password: String,
}

/// The consent form's fields.
#[derive(Debug, Deserialize)]
pub(super) struct DecisionForm {
    request_id: String,
    decision: String,
}

fn html(status: StatusCode, body: String) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

fn found(location: &str) -> Response {
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, location),
            (header::CACHE_CONTROL, "no-store"),
        ],
    )
        .into_response()
}

/// `redirect_uri` with these query parameters appended.
fn with_query(redirect_uri: &str, pairs: &[(&str, Option<&str>)]) -> String {
    match url::Url::parse(redirect_uri) {
        Ok(mut url) => {
            {
                let mut query = url.query_pairs_mut();
                for (k, v) in pairs {
                    if let Some(v) = v {
                        query.append_pair(k, v);
                    }
                }
            }
            url.to_string()
        }
        // Registered redirect URIs always parse; keep the raw one otherwise.
        Err(_) => redirect_uri.to_string(),
    }
}

fn redirect_error(
    req_redirect: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> Response {
    found(&with_query(
        req_redirect,
        &[
            ("error", Some(error)),
            ("error_description", Some(description)),
            ("state", state),
        ],
    ))
}

impl FakeOAuth {
    fn reject_authorize(&self, client_id: &str, reason: &str) {
        let mut store = self.store();
        self.record(
            &mut store,
            OAuthEvent::AuthorizeRejected {
                client_id: client_id.to_string(),
                reason: reason.to_string(),
            },
        );
    }

    fn client_name_of(&self, target: &Target) -> &'static str {
        let client_id = match target {
            Target::Code(req) => req.client_id.clone(),
            Target::Device { device_code } => self
                .store()
                .devices
                .get(device_code)
                .map(|g| g.client_id.clone())
                .unwrap_or_default(),
        };
        clients::find(&client_id).map_or("the application", |c| c.name)
    }
}

/// Checks an authorization request once client and redirect URI are known
/// to be good; failures are redirected back (RFC 6749 §4.1.2.1).
fn check_request(
    q: &Params,
    client: &Client,
    redirect_uri: &str,
) -> Result<AuthRequest, (&'static str, &'static str)> {
    if q.get("response_type").map(String::as_str) != Some("code") {
        return Err((
            "unsupported_response_type",
            "only response_type=code is supported",
        ));
    }
    let challenge = q.get("code_challenge").cloned().unwrap_or_default();
    if !client.pkce_required && challenge.is_empty() && !q.contains_key("code_challenge_method") {
        return Ok(AuthRequest {
            client_id: client.id.to_string(),
            redirect_uri: redirect_uri.to_string(),
            state: q.get("state").cloned(),
            challenge,
            scope: q.get("scope").cloned().unwrap_or_default(),
        });
    }
    if q.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return Err((
            "invalid_request",
            "PKCE with code_challenge_method=S256 is required",
        ));
    }
    // An S256 challenge is the base64url of 32 bytes: 43 characters.
    let well_formed = challenge.len() == 43
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(("invalid_request", "code_challenge is not an S256 challenge"));
    }
    Ok(AuthRequest {
        client_id: client.id.to_string(),
        redirect_uri: redirect_uri.to_string(),
        state: q.get("state").cloned(),
        challenge,
        scope: q.get("scope").cloned().unwrap_or_default(),
    })
}

/// `GET /authorize`: validates the request and shows the sign-in page.
pub(super) async fn authorize(State(fake): State<FakeOAuth>, Query(q): Query<Params>) -> Response {
    let client_id = q.get("client_id").cloned().unwrap_or_default();
    let redirect_uri = q.get("redirect_uri").cloned().unwrap_or_default();
    // Until client and redirect URI are trusted, never redirect anywhere.
    let Some(client) = clients::find(&client_id) else {
        fake.reject_authorize(&client_id, "unknown_client");
        return html(
            StatusCode::BAD_REQUEST,
            pages::error(&format!("Unknown client {client_id:?}.")),
        );
    };
    if !client.allows(fake.base_url(), &redirect_uri) {
        fake.reject_authorize(&client_id, "redirect_uri_not_allowed");
        let msg = format!(
            "The redirect URI {redirect_uri:?} is not registered for {}.",
            client.name
        );
        return html(StatusCode::BAD_REQUEST, pages::error(&msg));
    }
    let req = match check_request(&q, client, &redirect_uri) {
        Ok(req) => req,
        Err((error, description)) => {
            fake.reject_authorize(&client_id, error);
            return redirect_error(
                &redirect_uri,
                error,
                description,
                q.get("state").map(String::as_str),
            );
        }
    };
    let request_id = random_urlsafe(24);
    {
        let mut store = fake.store();
        store.pending.insert(
            request_id.clone(),
            Pending {
                target: Target::Code(req),
                user: None,
            },
        );
        fake.record(&mut store, OAuthEvent::AuthorizeStarted { client_id });
    }
    html(
        StatusCode::OK,
        pages::sign_in(fake.base_url(), &request_id, client.name, None, None),
    )
}

/// `POST /authorize/login`: checks the password, then asks for consent.
pub(super) async fn login(State(fake): State<FakeOAuth>, Form(form): Form<LoginForm>) -> Response {
    let Some(pending) = fake.store().pending.get(&form.request_id).cloned() else {
        return html(StatusCode::BAD_REQUEST, pages::error(UNKNOWN_REQUEST));
    };
    let client_name = fake.client_name_of(&pending.target);
    let device_code = user_code_of(&fake, &pending.target);
    let valid = fake
        .config()
        .users
        .iter()
        .any(|u| u.username == form.username && u.password == form.password);
    let mut store = fake.store();
    if !valid {
        fake.record(
            &mut store,
            OAuthEvent::LoginFailed {
                username: form.username,
            },
        );
        let page = pages::sign_in(
            fake.base_url(),
            &form.request_id,
            client_name,
            Some("Invalid username or password"),
            device_code.as_deref(),
        );
        return html(StatusCode::UNAUTHORIZED, page);
    }
    if let Some(p) = store.pending.get_mut(&form.request_id) {
        p.user = Some(form.username.clone());
    }
    fake.record(
        &mut store,
        OAuthEvent::LoginSucceeded {
            username: form.username.clone(),
        },
    );
    html(
        StatusCode::OK,
        pages::consent(
            fake.base_url(),
            &form.request_id,
            client_name,
            &form.username,
        ),
    )
}

const UNKNOWN_REQUEST: &str =
    "This sign-in request is unknown or was already used. Start again from the application.";

fn user_code_of(fake: &FakeOAuth, target: &Target) -> Option<String> {
    match target {
        Target::Device { device_code } => fake
            .store()
            .devices
            .get(device_code)
            .map(|g| g.user_code.clone()),
        Target::Code(_) => None,
    }
}

/// `POST /authorize/decision`: Allow issues a code (or approves the
/// device), Deny sends `access_denied`.
pub(super) async fn decision(
    State(fake): State<FakeOAuth>,
    Form(form): Form<DecisionForm>,
) -> Response {
    let allow = match form.decision.as_str() {
        "allow" => true,
        "deny" => false,
        _ => return html(StatusCode::BAD_REQUEST, pages::error("Unknown decision.")),
    };
    let mut store = fake.store();
    // Single use: a second click, or a replayed form, finds nothing.
    let Some(Pending {
        target,
        user: Some(user),
    }) = store.pending.remove(&form.request_id)
    else {
        return html(StatusCode::BAD_REQUEST, pages::error(UNKNOWN_REQUEST));
    };
    match target {
        Target::Code(req) => fake.decide_code(&mut store, req, user, allow),
        Target::Device { device_code } => fake.decide_device(&mut store, &device_code, user, allow),
    }
}

/// How the redirect after consent is bent, for failure tests
/// ([`FakeOAuth::tamper_state`], [`FakeOAuth::stray_callback`]).
struct Misdirect {
    tamper_state: bool,
    stray_callback: bool,
}

impl Misdirect {
    fn of(store: &Store) -> Self {
        Self {
            tamper_state: store.tamper_state,
            stray_callback: store.stray_callback,
        }
    }

    /// The `state` to send back instead of `sent`.
    fn state(&self, sent: Option<&str>) -> Option<String> {
        match (self.tamper_state, sent) {
            (false, sent) => sent.map(str::to_string),
            // A suffix keeps it recognisable in logs yet fails any comparison.
            (true, Some(sent)) => Some(format!("{sent}-tampered")),
            (true, None) => Some("tampered".to_string()),
        }
    }

    /// Where to send the browser: `redirect_uri` with `pairs`, or the
    /// stray request.
    fn location(&self, redirect_uri: &str, pairs: &[(&str, Option<&str>)]) -> String {
        if !self.stray_callback {
            return with_query(redirect_uri, pairs);
        }
        match url::Url::parse(redirect_uri) {
            Ok(mut url) => {
                url.set_path("/favicon.ico");
                url.set_query(None);
                url.set_fragment(None);
                url.to_string()
            }
            Err(_) => redirect_uri.to_string(),
        }
    }
}

impl FakeOAuth {
    /// The consent decision on an authorization-code request.
    fn decide_code(
        &self,
        store: &mut Store,
        req: AuthRequest,
        user: String,
        allow: bool,
    ) -> Response {
        let (username, client_id) = (user.clone(), req.client_id.clone());
        let consent = if allow {
            OAuthEvent::ConsentAllowed {
                username,
                client_id,
            }
        } else {
            OAuthEvent::ConsentDenied {
                username,
                client_id,
            }
        };
        self.record(store, consent);
        let bend = Misdirect::of(store);
        let state = bend.state(req.state.as_deref());
        if !allow {
            let desc = "The user denied the request";
            return found(&bend.location(
                &req.redirect_uri,
                &[
                    ("error", Some("access_denied")),
                    ("error_description", Some(desc)),
                    ("state", state.as_deref()),
                ],
            ));
        }
        let code = random_urlsafe(32);
        let location = bend.location(
            &req.redirect_uri,
            &[("code", Some(&code)), ("state", state.as_deref())],
        );
        let issued = OAuthEvent::CodeIssued {
            client_id: req.client_id.clone(),
            redirect_uri: req.redirect_uri.clone(),
        };
        let grant = CodeGrant {
            req,
            user,
            issued: std::time::Instant::now(),
            used: false,
            refresh_tokens: Vec::new(),
        };
        store.codes.insert(code, grant);
        self.record(store, issued);
        found(&location)
    }

    /// The consent decision on a device: marks the grant, shows a page.
    fn decide_device(
        &self,
        store: &mut Store,
        device_code: &str,
        user: String,
        allow: bool,
    ) -> Response {
        let Some(grant) = store.devices.get_mut(device_code) else {
            return html(StatusCode::BAD_REQUEST, pages::error(UNKNOWN_REQUEST));
        };
        let user_code = grant.user_code.clone();
        let event = if allow {
            grant.status = DeviceStatus::Approved(user.clone());
            OAuthEvent::DeviceApproved {
                user_code,
                username: user,
            }
        } else {
            grant.status = DeviceStatus::Denied;
            OAuthEvent::DeviceDenied { user_code }
        };
        self.record(store, event);
        html(StatusCode::OK, pages::device_done(allow))
    }
}

/// `GET /code/callback`: the hosted page that shows `code#state` to copy.
pub(super) async fn code_callback(Query(q): Query<Params>) -> Response {
    if let Some(error) = q.get("error") {
        let msg = q
            .get("error_description")
            .map_or(error.clone(), |d| format!("{error}: {d}"));
        return html(StatusCode::OK, pages::code_error(&msg));
    }
    match q.get("code") {
        Some(code) if !code.is_empty() => {
            let shown = format!("{code}#{}", q.get("state").map_or("", String::as_str));
            html(StatusCode::OK, pages::code(&shown))
        }
        _ => html(
            StatusCode::BAD_REQUEST,
            pages::code_error("No authorization code was received."),
        ),
    }
}

/// `GET /code/success?app=`: where CLIs send the browser after success.
pub(super) async fn code_success(Query(q): Query<Params>) -> Response {
    html(StatusCode::OK, pages::success(app_name(&q)))
}

/// `GET /code/failure?app=`: where CLIs send the browser after failure.
pub(super) async fn code_failure(Query(q): Query<Params>) -> Response {
    html(StatusCode::OK, pages::failure(app_name(&q)))
}

fn app_name(q: &Params) -> &'static str {
    q.get("app")
        .and_then(|app| clients::find(app))
        .map_or("the application", |c| c.name)
}

/// `GET /device[?user_code=]`: asks for the user code, then signs in.
pub(super) async fn device_page(
    State(fake): State<FakeOAuth>,
    Query(q): Query<Params>,
) -> Response {
    let typed = q.get("user_code").map(|c| c.trim()).unwrap_or_default();
    if typed.is_empty() {
        return html(StatusCode::OK, pages::device_entry(fake.base_url(), None));
    }
    let ttl = fake.config().device_code_ttl;
    let found_code = fake.store().device_by_user_code(typed, ttl);
    let Some(device_code) = found_code else {
        let page = pages::device_entry(
            fake.base_url(),
            Some("That code is not valid or has expired."),
        );
        return html(StatusCode::BAD_REQUEST, page);
    };
    let target = Target::Device { device_code };
    let client_name = fake.client_name_of(&target);
    let user_code = user_code_of(&fake, &target);
    let request_id = random_urlsafe(24);
    fake.store()
        .pending
        .insert(request_id.clone(), Pending { target, user: None });
    let page = pages::sign_in(
        fake.base_url(),
        &request_id,
        client_name,
        None,
        user_code.as_deref(),
    );
    html(StatusCode::OK, page)
}
