//! API errors: the one place where failures become HTTP statuses, and the
//! middleware that gives every error response the same JSON shape,
//! `{"error": "..."}`, including axum's own rejections (bad JSON, wrong
//! method, body too large). Used by every handler in [`super`].

use airlock_proto::ErrorCode;
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::agent::AgentError;
use crate::live::token::TokenError;
use crate::live::LiveError;
use crate::vm::VmError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// The status it maps to.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message for people.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The status for a VM error.
fn vm_status(e: &VmError) -> StatusCode {
    match e {
        VmError::NotFound(_) => StatusCode::NOT_FOUND,
        VmError::Invalid(_) => StatusCode::BAD_REQUEST,
        VmError::Capacity(_) | VmError::ShuttingDown | VmError::Image(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        VmError::NotReady { .. } => StatusCode::CONFLICT,
        VmError::Agent { source, .. } => agent_status(source),
    }
}

fn agent_status(e: &AgentError) -> StatusCode {
    match e {
        AgentError::Disconnected => StatusCode::SERVICE_UNAVAILABLE,
        AgentError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        AgentError::Guest(reply) => match reply.code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unsupported => StatusCode::NOT_IMPLEMENTED,
            ErrorCode::Busy | ErrorCode::OutOfMemory => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Io => StatusCode::BAD_GATEWAY,
        },
    }
}

/// The status for a live-view error: a missing or expired viewer token is
/// 401 (get a new link), a token that is not this session's is 403.
fn live_status(e: &LiveError) -> StatusCode {
    match e {
        LiveError::Token(TokenError::Missing | TokenError::Expired(_)) => StatusCode::UNAUTHORIZED,
        LiveError::Token(TokenError::Wrong) | LiveError::NotControlling => StatusCode::FORBIDDEN,
        LiveError::Token(TokenError::Random) => StatusCode::INTERNAL_SERVER_ERROR,
        LiveError::NotFound(_) | LiveError::UnknownViewer(_) => StatusCode::NOT_FOUND,
        LiveError::Ended { .. } => StatusCode::GONE,
        LiveError::Full(_) => StatusCode::CONFLICT,
        LiveError::NotStreaming(_) => StatusCode::SERVICE_UNAVAILABLE,
        LiveError::Invalid(_) => StatusCode::BAD_REQUEST,
        LiveError::Agent(vm) => vm_status(vm),
    }
}

impl From<LiveError> for ApiError {
    fn from(e: LiveError) -> Self {
        Self {
            status: live_status(&e),
            message: e.to_string(),
        }
    }
}

impl From<crate::session::SessionError> for ApiError {
    fn from(e: crate::session::SessionError) -> Self {
        use crate::session::SessionError as E;
        let status = match &e {
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::UnknownProvider { .. } | E::Invalid(_) => StatusCode::BAD_REQUEST,
            E::Capacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::NoBrowser { .. } => StatusCode::CONFLICT,
            E::Vm(vm) => vm_status(vm),
            E::Live(live) => live_status(live),
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        Self {
            status: vm_status(&e),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Rewrites error responses that are not JSON yet (axum's rejections) into
/// `{"error": "..."}`, keeping their status.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    // JSON is already in shape; HTML is a page meant for a browser (the
    // demo OAuth server's error pages).
    let keep = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/html")
        });
    if !(status.is_client_error() || status.is_server_error()) || keep {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_lowercase();
    }
    let body = serde_json::json!({ "error": message }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::ErrorReply;

    #[test]
    fn statuses() {
        assert_eq!(
            ApiError::from(VmError::NotFound("x".into())).status(),
            StatusCode::NOT_FOUND
        );
        let timeout = VmError::Agent {
            id: "x".into(),
            source: AgentError::Timeout(std::time::Duration::from_secs(1)),
        };
        assert_eq!(
            ApiError::from(timeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        let too_large = VmError::Agent {
            id: "x".into(),
            source: AgentError::Guest(ErrorReply::new(ErrorCode::TooLarge, "big")),
        };
        assert_eq!(
            ApiError::from(too_large).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn viewer_token_statuses() {
        let status = |e: TokenError| ApiError::from(LiveError::Token(e)).status();
        assert_eq!(status(TokenError::Missing), StatusCode::UNAUTHORIZED);
        assert_eq!(
            status(TokenError::Expired("t".into())),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(status(TokenError::Wrong), StatusCode::FORBIDDEN);
        let ended = LiveError::Ended {
            id: "s".into(),
            reason: "done".into(),
        };
        assert_eq!(ApiError::from(ended).status(), StatusCode::GONE);
    }
}
