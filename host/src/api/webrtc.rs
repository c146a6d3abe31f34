//! Handlers of `/api/webrtc`, the signalling of the live view. Every one
//! needs the session's viewer token (`?token=` or `Authorization: Bearer`),
//! checked before anything else:
//!
//! - `GET /api/webrtc/session/:id/ws`: the viewer's WebSocket
//!   ([`crate::live::socket`]);
//! - `POST /api/webrtc/session/:id/offer` and `GET .../answer`: signalling
//!   for clients that do not trickle (the answer comes with the streamer's
//!   candidates folded in);
//! - `GET /api/webrtc/ice-servers?session=`: STUN and short-lived TURN
//!   credentials.
//!
//! Routed by [`super::router`]; tokens are never logged.

use std::time::Duration;

use airlock_proto::stream::{Codec, MAX_SDP_BYTES};
use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::live::hub::HttpAnswer;
use crate::live::sdp::fold_candidates;
use crate::live::LiveError;

type ApiResult<T> = Result<T, ApiError>;

/// `?token=`: a viewer token (redacted in `Debug`).
#[derive(Deserialize, Default)]
pub struct TokenQuery {
    token: Option<String>,
}

impl std::fmt::Debug for TokenQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenQuery(<redacted>)")
    }
}

impl TokenQuery {
    /// The token from the query, else from `Authorization: Bearer`.
    pub fn presented<'a>(&'a self, headers: &'a HeaderMap) -> Option<&'a str> {
        self.token.as_deref().or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
        })
    }
}

/// `GET /api/webrtc/session/:id/ws?token=`: refused with a JSON error
/// before the upgrade when the token is wrong, the session has ended or it
/// has all the viewers it may have.
pub async fn ws(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let (hub, expires) = app.live.authorize(&id, q.presented(&headers))?;
    hub.has_room()?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("this endpoint takes a WebSocket: {}", e.body_text()),
        )
    })?;
    let max = app.live.config().max_message_bytes;
    Ok(upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| crate::live::socket::serve(hub, socket, expires)))
}

/// Body of `POST /api/webrtc/session/:id/offer`. An `RTCSessionDescription`
/// as JSON works too (its `type` is ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfferBody {
    sdp: String,
    #[serde(default)]
    codec: Option<Codec>,
    /// A new offer (ICE restart) of a viewer this API created.
    #[serde(default)]
    viewer_id: Option<String>,
}

/// `POST /api/webrtc/session/:id/offer` `{"sdp", "codec"?, "viewerId"?}` →
/// `200 {"viewerId", "type": "answer", "sdp"}` when the complete answer is
/// there within `live.legacy_answer_wait_ms`, else `202 {"viewerId",
/// "status": "pending"}` (then poll `GET .../answer`).
pub async fn offer(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let (hub, _) = app.live.authorize(&id, q.presented(&headers))?;
    let body: OfferBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be {{\"sdp\": \"<offer>\", \"codec\"?: \"vp8\"|\"h264\"}}: {e}"
        ))
    })?;
    if body.sdp.len() > MAX_SDP_BYTES {
        return Err(ApiError::bad_request(format!(
            "the offer is {} bytes; at most {MAX_SDP_BYTES}",
            body.sdp.len()
        )));
    }
    let (viewer_id, mut rx) = hub
        .http_offer(body.viewer_id.as_deref(), body.sdp, body.codec)
        .await?;
    let wait = Duration::from_millis(app.live.config().legacy_answer_wait_ms);
    let settled = tokio::time::timeout(wait, async {
        rx.wait_for(HttpAnswer::settled).await.map(|a| a.clone())
    })
    .await;
    match settled {
        Ok(Ok(answer)) => answer_response(&viewer_id, answer),
        Ok(Err(_)) => Err(ended(&hub).into()),
        Err(_) => answer_response(&viewer_id, HttpAnswer::default()),
    }
}

fn ended(hub: &crate::live::hub::Hub) -> LiveError {
    LiveError::Ended {
        id: hub.session_id().into(),
        reason: hub.end_reason().unwrap_or_else(|| "it ended".into()),
    }
}

/// The answer as far as it is: 200 with the SDP, 202 while pending, 502
/// when the streamer refused the offer.
fn answer_response(viewer_id: &str, a: HttpAnswer) -> ApiResult<Response> {
    if let Some(error) = a.error {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("the streamer refused the offer: {error}"),
        ));
    }
    match (&a.sdp, a.complete) {
        (Some(sdp), true) => {
            let sdp = fold_candidates(sdp, &a.candidates);
            let body = json!({ "viewerId": viewer_id, "type": "answer", "sdp": sdp });
            Ok((StatusCode::OK, Json(body)).into_response())
        }
        _ => {
            let body = json!({ "viewerId": viewer_id, "status": "pending" });
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

/// Query of `GET /api/webrtc/session/:id/answer`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnswerQuery {
    viewer_id: Option<String>,
    #[serde(flatten)]
    token: TokenQuery,
}

impl std::fmt::Debug for AnswerQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerQuery")
            .field("viewer_id", &self.viewer_id)
            .finish_non_exhaustive()
    }
}

/// `GET /api/webrtc/session/:id/answer?viewerId=` → `200 {"viewerId",
/// "type": "answer", "sdp"}`, `202` while pending, `404` for an unknown
/// viewer.
pub async fn answer(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<AnswerQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (hub, _) = app.live.authorize(&id, q.token.presented(&headers))?;
    let viewer_id = q
        .viewer_id
        .ok_or_else(|| ApiError::bad_request("add ?viewerId=<the viewerId the offer returned>"))?;
    answer_response(&viewer_id, hub.http_answer(&viewer_id)?)
}

/// Query of `GET /api/webrtc/ice-servers`.
#[derive(Deserialize)]
pub struct IceQuery {
    session: Option<String>,
    #[serde(flatten)]
    token: TokenQuery,
}

impl std::fmt::Debug for IceQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceQuery")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// `GET /api/webrtc/ice-servers?session=<id>&token=` → `{"iceServers":
/// [{"urls"}, {"urls", "username", "credential"}], "ttl": <seconds>}`.
/// TURN credentials are per session user, so a session's token is needed.
pub async fn ice_servers(
    State(app): State<AppState>,
    Query(q): Query<IceQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let session = q.session.as_deref().ok_or_else(|| {
        ApiError::bad_request(
            "add ?session=<sessionId>&token=<viewerToken>: the servers carry TURN credentials for that session's viewers",
        )
    })?;
    let (hub, _) = app.live.authorize(session, q.token.presented(&headers))?;
    let body = json!({ "iceServers": hub.ice_servers(), "ttl": app.live.config().turn_ttl_secs });
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}
