//! The HTTP API of airlockd (axum on hyper): routes, shared state, the
//! health endpoint and the Prometheus metrics ([`crate::metrics`]). JSON bodies are camelCase; every error is
//! `{"error": "..."}` (see [`error`]), except on the viewer's HTML pages.
//! Two routers: the operator API's and the viewers' (viewer-token routes
//! only). Built by [`crate::listeners`] and served by [`crate::server`].

pub mod auth;
pub mod error;
pub mod hosts;
pub mod openapi;
pub mod pages;
pub mod routes;
pub mod tokens;
pub mod vms;
pub mod webrtc;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::response::IntoResponse;
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

/// The operator API's router: every route of the table served there
/// ([`routes::ROUTES`]), the viewers' ones included (an operator may
/// watch too); requests must name one of `hosts`.
pub fn operator_router(
    state: AppState,
    max_body_bytes: usize,
    hosts: hosts::AllowedHosts,
) -> Router {
    finish(routes::Listener::Operator, state, max_body_bytes, hosts)
}

/// The viewers' router: the routes a viewer token opens and the page's
/// assets, nothing else.
pub fn viewer_router(state: AppState, max_body_bytes: usize, hosts: hosts::AllowedHosts) -> Router {
    finish(routes::Listener::Viewer, state, max_body_bytes, hosts)
}

/// `listener`'s routes from the table, with what every router has: its
/// OpenAPI document, JSON errors, a body limit, the `Host`/`Origin` check.
fn finish(
    listener: routes::Listener,
    state: AppState,
    max_body_bytes: usize,
    hosts: hosts::AllowedHosts,
) -> Router {
    routes::ROUTES
        .iter()
        .filter(|r| r.surface.serves(listener))
        .fold(Router::new(), |router, r| {
            router.route(r.path, routes::endpoint(r))
        })
        .fallback(not_found)
        .layer(axum::Extension(openapi::Document::of(listener)))
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
pub(crate) async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
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

pub(crate) async fn health(State(app): State<AppState>) -> Json<Health> {
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
