//! Handlers of `/api/auth`: start a login session, follow it (a view, or
//! Server-Sent Events of every change), cancel it, act on its browser
//! (input events, screenshots), and mint viewer links for its live view.
//! The session's view carries its current viewer link (`viewerToken`,
//! `viewerTokenExpiresAt`, `viewerUrl`) while it runs. Routed by
//! [`super::router`].

use std::convert::Infallible;
use std::time::Duration;

use airlock_proto::InputBatch;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::webrtc::TokenQuery;
use super::AppState;
use crate::live::ViewerLink;
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

/// A session's view with its current viewer link (while it runs).
#[derive(Debug, Serialize)]
pub struct SessionWithLink {
    #[serde(flatten)]
    view: SessionView,
    #[serde(flatten)]
    link: Option<ViewerLink>,
}

fn with_link(app: &AppState, view: SessionView) -> SessionWithLink {
    SessionWithLink {
        link: app.live.link(&view.session_id),
        view,
    }
}

/// `POST /api/auth/start` → `201` with the session (`sessionId`, `state`,
/// `viewerToken`, `viewerTokenExpiresAt`, `viewerUrl`, ...).
pub async fn start(
    State(app): State<AppState>,
    Json(body): Json<StartBody>,
) -> ApiResult<Response> {
    let view = sessions(&app)?.start(&body.user_id, &body.provider)?;
    let location = format!("/api/auth/session/{}", view.session_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(with_link(&app, view)),
    )
        .into_response())
}

/// `GET /api/auth/session/:id`
pub async fn get(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionWithLink>> {
    let view = sessions(&app)?.get(&id)?;
    Ok(Json(with_link(&app, view)))
}

/// Body of `POST /api/auth/session/:id/viewer-token` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MintBody {
    /// Lifetime of the link; at most (and by default)
    /// `live.viewer_token_ttl_ms`.
    ttl_ms: Option<u64>,
}

/// `POST /api/auth/session/:id/viewer-token` `{"ttlMs"?}` → `201
/// {"sessionId", "viewerToken", "viewerTokenExpiresAt", "viewerUrl"}`: a
/// new viewer link for a running session; earlier links keep working until
/// they expire.
pub async fn viewer_token(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let body: MintBody = if body.iter().all(u8::is_ascii_whitespace) {
        MintBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("the body must be {{\"ttlMs\"?: N}}: {e}"))
        })?
    };
    let link = app.live.mint(&id, body.ttl_ms.map(Duration::from_millis))?;
    // Saved with the session: the link outlives a restart of airlockd.
    app.sessions.touch(&id);
    let mut value = serde_json::to_value(&link).unwrap_or_default();
    value["sessionId"] = id.into();
    Ok((StatusCode::CREATED, Json(value)).into_response())
}

/// `GET /api/auth/session/:id/events[?token=]`: the session's view now and
/// after every change, as `event: session` messages; the stream ends after
/// a final state (completed, failed, cancelled, expired). The operator API
/// needs no token; a viewer page passes its viewer token, which must then
/// be this session's.
pub async fn events(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    if let Some(token) = q.presented(&headers) {
        app.live.authorize(&id, Some(token))?;
    }
    session_stream(&app, &id)
}

/// The same stream on the viewers' listener, where the session's viewer
/// token is required.
pub async fn viewer_events(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    app.live.authorize(&id, q.presented(&headers))?;
    session_stream(&app, &id)
}

fn session_stream(
    app: &AppState,
    id: &str,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let rx = sessions(app)?.subscribe(id)?;
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
