//! The HTTP API of airlockd (axum on hyper): routes, shared state, the
//! health endpoint and the Prometheus metrics ([`crate::metrics`]). JSON bodies are camelCase; every error is
//! `{"error": "..."}` (see [`error`]), except on the viewer's HTML pages.
//! Two routers: the operator API's and the viewers' (viewer-token routes
//! only). Built by [`crate::listeners`] and served by [`crate::server`].

pub mod auth;
pub mod error;
pub mod hosts;
pub mod pages;
pub mod tokens;
pub mod vms;
pub mod webrtc;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::vm::backend::BackendInfo;
use crate::vm::VmManager;

/// State every handler sees.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The VMs.
    pub vms: VmManager,
    /// Login sessions.
    pub sessions: crate::session::Sessions,
    /// Their live views.
    pub live: crate::live::Live,
    /// When the daemon started.
    pub started: Instant,
}

/// The operator API's router: every route, the viewers' ones included
/// (an operator may watch too); requests must name one of `hosts`.
pub fn operator_router(
    state: AppState,
    max_body_bytes: usize,
    hosts: hosts::AllowedHosts,
) -> Router {
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/vms", post(vms::create).get(vms::list))
        .route("/api/vms/{id}", get(vms::get).delete(vms::delete))
        .route("/api/vms/{id}/exec", post(vms::exec))
        .route("/api/vms/{id}/files", get(vms::get_file).put(vms::put_file))
        .route("/api/vms/{id}/status", get(vms::status))
        .route("/api/auth/start", post(auth::start))
        .route("/api/auth/providers", get(auth::providers))
        .route("/api/auth/session/{id}", get(auth::get))
        .route("/api/auth/session/{id}/events", get(auth::events))
        .route("/api/auth/session/{id}/cancel", post(auth::cancel))
        .route("/api/auth/session/{id}/input", post(auth::input))
        .route("/api/auth/session/{id}/screenshot", get(auth::screenshot))
        .route(
            "/api/auth/session/{id}/viewer-token",
            post(auth::viewer_token),
        )
        .route("/session/new", get(pages::new_session));
    finish(viewer_routes().merge(routes), state, max_body_bytes, hosts)
}

/// The viewers' router: the routes a viewer token opens, and nothing
/// else (no route here acts without one, but the page's assets).
pub fn viewer_router(state: AppState, max_body_bytes: usize, hosts: hosts::AllowedHosts) -> Router {
    let routes = Router::new().route("/api/auth/session/{id}/events", get(auth::viewer_events));
    finish(viewer_routes().merge(routes), state, max_body_bytes, hosts)
}

/// The routes of the viewer page, on both listeners.
fn viewer_routes() -> Router<AppState> {
    Router::new()
        .route("/api/webrtc/ice-servers", get(webrtc::ice_servers))
        .route("/api/webrtc/session/{id}/ws", get(webrtc::ws))
        .route("/api/webrtc/session/{id}/offer", post(webrtc::offer))
        .route("/api/webrtc/session/{id}/answer", get(webrtc::answer))
        .route("/session/{id}", get(pages::viewer))
        .route("/assets/{name}", get(pages::asset))
}

/// What every listener's router has: JSON errors, a body limit, the
/// `Host`/`Origin` check.
fn finish(
    routes: Router<AppState>,
    state: AppState,
    max_body_bytes: usize,
    hosts: hosts::AllowedHosts,
) -> Router {
    routes
        .fallback(not_found)
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::new(hosts),
            hosts::check,
        ))
}

async fn not_found(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}

/// Body of `GET /health`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    status: &'static str,
    version: &'static str,
    uptime_ms: u64,
    vms: usize,
    #[serde(flatten)]
    backend: BackendInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    browser_backend: Option<BackendInfo>,
    /// Browser VM snapshots and the warm pool, when enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshots: Option<crate::vm::restore::SnapshotStatus>,
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let name = |v: serde_json::Value| v.as_str().unwrap_or("unknown").to_string();
    let mut vms = std::collections::BTreeMap::new();
    for v in app.vms.list() {
        let key = (
            name(serde_json::json!(v.kind)),
            name(serde_json::json!(v.state)),
        );
        *vms.entry(key).or_insert(0u64) += 1;
    }
    let mut sessions = std::collections::BTreeMap::new();
    for s in app.sessions.states() {
        *sessions.entry(name(serde_json::json!(s))).or_insert(0u64) += 1;
    }
    let gauges = crate::metrics::Gauges {
        vms: vms.into_iter().collect(),
        sessions: sessions.into_iter().collect(),
        viewers: app.live.viewers() as u64,
        pool_ready: app.vms.snapshot_status().map_or(0, |s| s.pool_ready as u64),
    };
    let text = crate::metrics::global().render(&gauges);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}

async fn health(State(app): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_ms: app.started.elapsed().as_millis() as u64,
        vms: app.vms.list().len(),
        backend: app.vms.backend_info(),
        browser_backend: app.vms.browser_backend_info(),
        snapshots: app.vms.snapshot_status(),
    })
}
