//! The HTTP API of airlockd (axum on hyper): routes, shared state and the
//! health endpoint. JSON bodies are camelCase; every error is
//! `{"error": "..."}` (see [`error`]). Built by the daemon and served by
//! [`crate::server`].

pub mod error;
pub mod vms;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
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
    /// When the daemon started.
    pub started: Instant,
}

/// Builds the router.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/api/vms", post(vms::create).get(vms::list))
        .route("/api/vms/{id}", get(vms::get).delete(vms::delete))
        .route("/api/vms/{id}/exec", post(vms::exec))
        .route("/api/vms/{id}/files", get(vms::get_file).put(vms::put_file))
        .route("/api/vms/{id}/status", get(vms::status))
        .fallback(not_found)
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
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
}

async fn health(State(app): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_ms: app.started.elapsed().as_millis() as u64,
        vms: app.vms.list().len(),
        backend: app.vms.backend_info(),
    })
}
