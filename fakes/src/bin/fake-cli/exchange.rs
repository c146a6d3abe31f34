//! Talking to the fake server's token endpoints: exchanging a code (form
//! encoded like Codex and google-auth-library, or JSON like Claude Code),
//! and the device authorization grant (request, then poll as RFC 8628 says:
//! wait `interval`, add 5 s on `slow_down`). Used by every profile.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// A token request failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The server could not be reached.
    #[error("error sending request for url ({url}): {source}")]
    Transport {
        /// The endpoint.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an OAuth error (Codex's wording).
    #[error("token endpoint returned status {status}: {description}")]
    Endpoint {
        /// HTTP status.
        status: u16,
        /// The `error` code.
        error: String,
        /// `error_description`, or the code when there is none.
        description: String,
    },
    /// The answer was not the JSON expected.
    #[error("unexpected answer from {url}: {source}")]
    Body {
        /// The endpoint.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
}

/// A successful token response.
#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    /// Access token.
    pub access_token: String,
    /// Refresh token.
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// OpenID Connect id token.
    #[serde(default)]
    pub id_token: Option<String>,
    /// Lifetime of the access token in seconds.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// Granted scope, space separated.
    #[serde(default)]
    pub scope: Option<String>,
    /// Usually `Bearer`.
    #[serde(default)]
    pub token_type: Option<String>,
}

/// An RFC 8628 device authorization response.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceCode {
    /// Secret the device polls with.
    pub device_code: String,
    /// What the user types.
    pub user_code: String,
    /// Where the user types it.
    pub verification_uri: String,
    /// Seconds until the code expires.
    pub expires_in: u64,
    /// Minimum seconds between polls.
    #[serde(default)]
    pub interval: Option<u64>,
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

async fn send(
    request: reqwest::RequestBuilder,
    url: &str,
) -> Result<reqwest::Response, ExchangeError> {
    let response = request
        .send()
        .await
        .map_err(|source| ExchangeError::Transport {
            url: url.to_string(),
            source,
        })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let (error, description) = match serde_json::from_str::<OAuthErrorBody>(&text) {
        Ok(body) => {
            let description = body.error_description.unwrap_or_else(|| body.error.clone());
            (body.error, description)
        }
        Err(_) => (String::new(), text.trim().to_string()),
    };
    Err(ExchangeError::Endpoint {
        status: status.as_u16(),
        error,
        description,
    })
}

async fn json_of<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    url: &str,
) -> Result<T, ExchangeError> {
    response.json().await.map_err(|source| ExchangeError::Body {
        url: url.to_string(),
        source,
    })
}

/// `POST {base}/token` with a form-encoded body.
pub async fn token_form(base: &str, params: &[(&str, &str)]) -> Result<Tokens, ExchangeError> {
    let url = format!("{base}/token");
    let response = send(client().post(&url).form(params), &url).await?;
    json_of(response, &url).await
}

/// `POST {base}/token` with a JSON body.
pub async fn token_json(base: &str, body: &Value) -> Result<Tokens, ExchangeError> {
    let url = format!("{base}/token");
    let response = send(client().post(&url).json(body), &url).await?;
    json_of(response, &url).await
}

/// `POST {base}/device/code`.
pub async fn request_device_code(
    base: &str,
    client_id: &str,
    scope: &str,
) -> Result<DeviceCode, ExchangeError> {
    let url = format!("{base}/device/code");
    let response = send(
        client()
            .post(&url)
            .form(&[("client_id", client_id), ("scope", scope)]),
        &url,
    )
    .await?;
    json_of(response, &url).await
}

/// Polls `{base}/token` until the user approves, denies, or the code
/// expires; callers bound it with their own timeout.
pub async fn poll_device(
    base: &str,
    client_id: &str,
    device: &DeviceCode,
) -> Result<Tokens, ExchangeError> {
    let mut interval = Duration::from_secs(device.interval.unwrap_or(5).max(1));
    let params = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("device_code", device.device_code.as_str()),
        ("client_id", client_id),
    ];
    loop {
        tokio::time::sleep(interval).await;
        match token_form(base, &params).await {
            Ok(tokens) => return Ok(tokens),
            Err(ExchangeError::Endpoint { error, .. }) if error == "authorization_pending" => {}
            Err(ExchangeError::Endpoint { error, .. }) if error == "slow_down" => {
                interval += Duration::from_secs(5)
            }
            Err(other) => return Err(other),
        }
    }
}
