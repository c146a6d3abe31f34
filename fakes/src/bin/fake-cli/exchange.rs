//! The demo CLI's code exchange: a form-encoded `POST {base}/token` to the
//! fake OAuth server, with its OAuth errors turned into [`ExchangeError`].

use std::time::Duration;

use serde::Deserialize;

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
    /// The server answered with an OAuth error.
    #[error("token endpoint returned status {status}: {description}")]
    Endpoint {
        /// HTTP status.
        status: u16,
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
    let description = match serde_json::from_str::<OAuthErrorBody>(&text) {
        Ok(body) => body.error_description.unwrap_or(body.error),
        Err(_) => text.trim().to_string(),
    };
    Err(ExchangeError::Endpoint {
        status: status.as_u16(),
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
