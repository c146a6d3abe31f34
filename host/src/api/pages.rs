//! The viewer's pages: `GET /session/:id?token=` (watch and drive the
//! session's browser; a wrong, missing or expired token gets a plain HTML
//! error page instead), `GET /session/new` (start a session), and their
//! scripts and style under `/assets/`. The pages themselves live in
//! [`crate::live::page`]. Routed by [`super::router`].

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::webrtc::TokenQuery;
use super::AppState;
use crate::live::page;

/// `GET /session/:id?token=`: the viewer page.
pub async fn viewer(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    match app.live.authorize(&id, q.presented(&headers)) {
        Ok(_) => page::html(StatusCode::OK, page::VIEWER_HTML.into()),
        Err(e) => {
            let e = ApiError::from(e);
            page::error_page(e.status(), e.message())
        }
    }
}

/// `GET /session/new`: start a session and open its viewer.
pub async fn new_session() -> Response {
    page::html(StatusCode::OK, page::NEW_HTML.into())
}

/// `GET /assets/:name`: the pages' scripts and style.
pub async fn asset(Path(name): Path<String>) -> Response {
    match page::asset(&name) {
        Some((content_type, body)) => (page::headers(content_type), body).into_response(),
        None => page::error_page(StatusCode::NOT_FOUND, &format!("no asset named {name:?}")),
    }
}
