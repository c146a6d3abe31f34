//! A minimal HTTP/1.1 client of Firecracker's API socket: sends a plan's
//! requests ([`super::plan`]) in order on one connection and stops at the
//! first refusal, quoting Firecracker's `fault_message`. Used by
//! [`super::FirecrackerBackend`] and [`super::FirecrackerVm`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::plan::ApiRequest;

/// Longest reply body read (Firecracker's errors are one line).
const MAX_REPLY_BYTES: usize = 64 << 10;

/// A plan could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API socket does not answer.
    #[error("cannot connect to the Firecracker API at {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{method} {path}: {source}")]
    Http {
        /// The request's method.
        method: &'static str,
        /// Its path.
        path: String,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// A request could not be built (a body that is not JSON).
    #[error("{method} {path}: cannot encode the request: {detail}")]
    Encode {
        /// The request's method.
        method: &'static str,
        /// Its path.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Firecracker refused a request.
    #[error("Firecracker refused {method} {path} ({status}): {fault}")]
    Refused {
        /// The request's method.
        method: &'static str,
        /// Its path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// Its `fault_message`, or the raw reply.
        fault: String,
    },
    /// No answer in time.
    #[error("{method} {path}: no answer within {waited:?}")]
    Timeout {
        /// The request's method.
        method: &'static str,
        /// Its path.
        path: String,
        /// How long airlockd waited.
        waited: Duration,
    },
}

/// A client of one Firecracker's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client of `socket`; each request gets `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// The same client with another per-request deadline (snapshots of
    /// large guests take longer than configuration requests).
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            socket: self.socket.clone(),
            timeout,
        }
    }

    /// Sends `plan` in order; the first refusal or failure ends it.
    pub async fn send_all(&self, plan: &[ApiRequest]) -> Result<(), ApiError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let http_err = |r: &ApiRequest| {
            let (method, path) = (r.method.as_str(), r.path.clone());
            move |source| ApiError::Http {
                method,
                path,
                source,
            }
        };
        let Some(first) = plan.first() else {
            return Ok(());
        };
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err(first))?;
        // The connection task ends when `sender` is dropped.
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            for req in plan {
                self.send_one(&mut sender, req).await?;
            }
            Ok(())
        }
        .await;
        drop(sender);
        let _ = conn.await;
        result
    }

    async fn send_one(
        &self,
        sender: &mut http1::SendRequest<Full<Bytes>>,
        req: &ApiRequest,
    ) -> Result<(), ApiError> {
        let (method, path) = (req.method.as_str(), req.path.clone());
        let encode = |detail: String| ApiError::Encode {
            method,
            path: path.clone(),
            detail,
        };
        let body = serde_json::to_vec(&req.body).map_err(|e| encode(e.to_string()))?;
        let request = Request::builder()
            .method(method)
            .uri(&req.path)
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| encode(e.to_string()))?;
        let exchange = async {
            let reply = sender.send_request(request).await?;
            let status = reply.status();
            let body = reply.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                method,
                path: path.clone(),
                waited: self.timeout,
            })?
            .map_err(|source| ApiError::Http {
                method,
                path: path.clone(),
                source,
            })?;
        tracing::debug!(method, path = %req.path, status = status.as_u16(), "Firecracker API");
        if status.is_success() {
            return Ok(());
        }
        Err(ApiError::Refused {
            method,
            path,
            status: status.as_u16(),
            fault: fault_message(&body),
        })
    }
}

/// The `fault_message` of Firecracker's error body, else the body itself
/// (bounded, control characters dropped: it ends up in API errors).
fn fault_message(body: &[u8]) -> String {
    let body = &body[..body.len().min(MAX_REPLY_BYTES)];
    #[derive(serde::Deserialize)]
    struct Fault {
        fault_message: String,
    }
    let text = match serde_json::from_slice::<Fault>(body) {
        Ok(f) => f.fault_message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(2000)
        .collect();
    if text.trim().is_empty() {
        "(no fault message)".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_fault_message_is_extracted_or_the_body_quoted() {
        assert_eq!(
            fault_message(br#"{"fault_message": "Invalid kernel path"}"#),
            "Invalid kernel path"
        );
        assert_eq!(fault_message(b"plain\x1b text"), "plain text");
        assert_eq!(fault_message(b""), "(no fault message)");
    }
}
