//! Handlers of `/api/auth`: start a login session, follow it (a view, or
//! Server-Sent Events of every change), cancel it, and act on its browser
//! (input events, screenshots). Routed by [`super::router`].

use std::convert::Infallible;

use airlock_proto::InputBatch;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::AppState;
use crate::session::{SessionView, Sessions};

type ApiResult<T> = Result<T, ApiError>;

fn sessions(app: &AppState) -> ApiResult<&Sessions> {
    Ok(&app.sessions)
}

/// Body of `POST /api/auth/start`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StartBody {
    user_id: String,
    provider: String,
}

/// `POST /api/auth/start` → `201` with the session (`sessionId`, `state`).
pub async fn start(
    State(app): State<AppState>,
    Json(body): Json<StartBody>,
) -> ApiResult<Response> {
    let view = sessions(&app)?.start(&body.user_id, &body.provider)?;
    let location = format!("/api/auth/session/{}", view.session_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

/// `GET /api/auth/session/:id`
pub async fn get(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    Ok(Json(sessions(&app)?.get(&id)?))
}

/// `GET /api/auth/session/:id/events`: the session's view now and after
/// every change, as `event: session` messages; the stream ends after a
/// final state (completed, failed, cancelled, expired).
pub async fn events(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let rx = sessions(&app)?.subscribe(&id)?;
    let stream =
        futures_util::stream::unfold((rx, false, true), |(mut rx, done, first)| async move {
            if done || (!first && rx.changed().await.is_err()) {
                return None;
            }
            let view = rx.borrow_and_update().clone();
            let done = view.state.is_final();
            let event = SseEvent::default()
                .event("session")
                .json_data(&view)
                .unwrap_or_default();
            Some((Ok(event), (rx, done, false)))
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `POST /api/auth/session/:id/cancel`: stops the session (its browser VM
/// is destroyed, nothing is stored) and returns its final view.
pub async fn cancel(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    Ok(Json(sessions(&app)?.cancel(&id).await?))
}

/// Answer of the input endpoint.
#[derive(Debug, Serialize)]
pub struct Applied {
    applied: usize,
}

/// `POST /api/auth/session/:id/input` `{"events": [...]}`: mouse, scroll,
/// keys (X keysyms) and text, applied in order to the browser's screen.
pub async fn input(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Json(batch): Json<InputBatch>,
) -> ApiResult<Json<Applied>> {
    let applied = sessions(&app)?.input(&id, batch).await?;
    Ok(Json(Applied { applied }))
}

/// `GET /api/auth/session/:id/screenshot`: a PNG of the browser's screen.
pub async fn screenshot(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let shot = sessions(&app)?.screenshot(&id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        shot.png.into_inner(),
    )
        .into_response())
}

/// Body of `GET /api/auth/providers`.
#[derive(Debug, Serialize)]
pub struct ProviderList {
    providers: Vec<crate::session::ProviderSummary>,
}

/// `GET /api/auth/providers`: the providers a session may connect.
pub async fn providers(State(app): State<AppState>) -> ApiResult<Json<ProviderList>> {
    Ok(Json(ProviderList {
        providers: sessions(&app)?.providers(),
    }))
}
