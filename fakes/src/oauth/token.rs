//! The machine-facing side of the fake server: `POST /token` (authorization
//! code with PKCE, refresh token, device code) and `POST /device/code`
//! (RFC 8628), plus minting of the tokens. Bodies may be form-encoded
//! (RFC 6749) or JSON (Claude Code sends JSON to Anthropic's token
//! endpoint). Errors are RFC 6749 §5.2 JSON.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::clients::{self, Client, TokenStyle};
use super::store::{AccessGrant, DeviceStatus, RefreshGrant, Store};
use super::{FakeOAuth, FakeOAuthConfig, FakeUser, OAuthEvent};
use crate::pkce::{random_urlsafe, verify_s256};

/// `grant_type` of the device authorization grant.
const DEVICE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

type Params = HashMap<String, String>;

/// An RFC 6749 §5.2 error answer.
struct Refusal {
    status: StatusCode,
    error: &'static str,
    description: String,
}

fn refuse(error: &'static str, description: impl Into<String>) -> Refusal {
    let status = if error == "invalid_client" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    Refusal {
        status,
        error,
        description: description.into(),
    }
}

fn no_store_json(status: StatusCode, body: Value) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        axum::Json(body),
    )
        .into_response()
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        no_store_json(
            self.status,
            json!({"error": self.error, "error_description": self.description}),
        )
    }
}

/// Reads a form-encoded or JSON body into string parameters.
fn parse_params(headers: &HeaderMap, body: &[u8]) -> Result<Params, Refusal> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !is_json {
        return Ok(url::form_urlencoded::parse(body).into_owned().collect());
    }
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return Err(refuse("invalid_request", "the body is not a JSON object"));
    };
    Ok(map
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k, s)),
            Value::Number(n) => Some((k, n.to_string())),
            _ => None,
        })
        .collect())
}

fn required<'a>(p: &'a Params, name: &str) -> Result<&'a str, Refusal> {
    p.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| refuse("invalid_request", format!("{name} is required")))
}

fn known_client(p: &Params) -> Result<&'static Client, Refusal> {
    let id = required(p, "client_id")?;
    let client = clients::find(id)
        .ok_or_else(|| refuse("invalid_client", format!("unknown client {id:?}")))?;
    match client.secret {
        Some(secret) if p.get("client_secret").map(String::as_str) != Some(secret) => {
            Err(refuse("invalid_client", "Unauthorized"))
        }
        _ => Ok(client),
    }
}

/// `POST /token`.
pub(super) async fn token(
    State(fake): State<FakeOAuth>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.token(&headers, &body)
}

impl FakeOAuth {
    /// The token endpoint's answer to a request with these headers and
    /// body (for stand-ins that route it themselves).
    pub fn token(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        let result = parse_params(headers, body).and_then(|p| {
            match p.get("grant_type").map(String::as_str) {
                Some("authorization_code") => self.redeem_code(&p),
                Some("refresh_token") => self.refresh(&p),
                Some(DEVICE_GRANT_TYPE) => self.poll_device(&p),
                Some(other) => Err(refuse(
                    "unsupported_grant_type",
                    format!("grant_type {other:?} is not supported"),
                )),
                None => Err(refuse("invalid_request", "grant_type is required")),
            }
        });
        match result {
            Ok(body) => no_store_json(StatusCode::OK, body),
            Err(refusal) => refusal.into_response(),
        }
    }
}

/// `POST /device/code` (RFC 8628 §3.1).
pub(super) async fn device_code(
    State(fake): State<FakeOAuth>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let issue = |p: Params| -> Result<Value, Refusal> {
        let client = known_client(&p)?;
        let scope = p.get("scope").map_or("", String::as_str);
        let issued = fake
            .issue_device(client.id, scope)
            .map_err(|e| refuse("invalid_client", e.to_string()))?;
        let cfg = fake.config();
        let (base, user_code) = (fake.base_url(), &issued.user_code);
        Ok(json!({
            "device_code": issued.device_code,
            "user_code": user_code,
            "verification_uri": format!("{base}/device"),
            "verification_uri_complete": format!("{base}/device?user_code={user_code}"),
            "expires_in": cfg.device_code_ttl.as_secs(),
            "interval": cfg.device_poll_interval.as_secs(),
        }))
    };
    match parse_params(&headers, &body).and_then(issue) {
        Ok(body) => no_store_json(StatusCode::OK, body),
        Err(refusal) => refusal.into_response(),
    }
}

impl FakeOAuth {
    /// Mints tokens for `user` and remembers them; `keep_refresh` keeps an
    /// existing refresh token instead of issuing a new one.
    fn issue(
        &self,
        store: &mut Store,
        client: &Client,
        user: &str,
        scope: &str,
        keep_refresh: Option<&str>,
    ) -> Issued {
        let mut issued = mint(self.config(), client, &self.user(user), scope);
        match keep_refresh {
            Some(token) => issued.refresh = token.to_string(),
            None => {
                store.refresh.insert(
                    issued.refresh.clone(),
                    RefreshGrant {
                        client_id: client.id.to_string(),
                        user: user.to_string(),
                        scope: scope.to_string(),
                        revoked: false,
                    },
                );
            }
        }
        store.access.insert(
            issued.access.clone(),
            AccessGrant {
                client_id: client.id.to_string(),
                user: user.to_string(),
                scope: scope.to_string(),
                expires: Instant::now() + self.config().access_token_ttl,
            },
        );
        issued
    }

    /// Who an access token this server issued belongs to, while it is
    /// valid: what the vendors' profile and API endpoints check.
    pub fn access_token_info(&self, token: &str) -> Option<AccessInfo> {
        let store = self.store();
        let grant = store.access.get(token)?;
        let left = grant.expires.checked_duration_since(Instant::now())?;
        Some(AccessInfo {
            client_id: grant.client_id.clone(),
            user: self.user(&grant.user),
            scope: grant.scope.clone(),
            expires_in: left,
        })
    }

    fn user(&self, username: &str) -> FakeUser {
        self.config()
            .users
            .iter()
            .find(|u| u.username == username)
            .cloned()
            .unwrap_or_else(|| FakeUser::new(username, ""))
    }

    fn code_refused(&self, client_id: &str, reason: &str, description: &str) -> Refusal {
        let mut store = self.store();
        let event = OAuthEvent::CodeRejected {
            client_id: client_id.to_string(),
            reason: reason.to_string(),
        };
        self.record(&mut store, event);
        refuse("invalid_grant", description)
    }

    /// `grant_type=authorization_code`.
    fn redeem_code(&self, p: &Params) -> Result<Value, Refusal> {
        let client = known_client(p)?;
        let (code, redirect_uri) = (required(p, "code")?, required(p, "redirect_uri")?);
        let verifier = p.get("code_verifier").map_or("", String::as_str);
        let mut store = self.store();
        if store.refuse_codes {
            drop(store);
            return Err(self.code_refused(client.id, "refused", "authorization code is invalid"));
        }
        let Some(grant) = store.codes.get_mut(code) else {
            drop(store);
            return Err(self.code_refused(client.id, "unknown_code", "unknown authorization code"));
        };
        if grant.used {
            // RFC 6749 §4.1.2: revoke what the code already produced.
            let revoke = std::mem::take(&mut grant.refresh_tokens);
            for token in revoke {
                if let Some(r) = store.refresh.get_mut(&token) {
                    r.revoked = true;
                }
            }
            self.record(
                &mut store,
                OAuthEvent::CodeReused {
                    client_id: client.id.to_string(),
                },
            );
            return Err(refuse(
                "invalid_grant",
                "authorization code was already used",
            ));
        }
        grant.used = true;
        let (req, user, age) = (
            grant.req.clone(),
            grant.user.clone(),
            grant.issued.elapsed(),
        );
        drop(store);
        let problem = if age >= self.config().code_ttl {
            Some(("expired", "authorization code expired"))
        } else if req.client_id != client.id {
            Some((
                "client_mismatch",
                "authorization code was issued to another client",
            ))
        } else if req.redirect_uri != redirect_uri {
            Some((
                "redirect_uri_mismatch",
                "redirect_uri does not match the authorization request",
            ))
        } else if (req.challenge.is_empty() && !verifier.is_empty())
            || (!req.challenge.is_empty() && !verify_s256(verifier, &req.challenge))
        {
            Some((
                "pkce_mismatch",
                "code_verifier does not match the code_challenge",
            ))
        } else {
            None
        };
        if let Some((reason, description)) = problem {
            return Err(self.code_refused(client.id, reason, description));
        }
        let mut store = self.store();
        let issued = self.issue(&mut store, client, &user, &req.scope, None);
        if let Some(grant) = store.codes.get_mut(code) {
            grant.refresh_tokens.push(issued.refresh.clone());
        }
        self.record(
            &mut store,
            OAuthEvent::CodeRedeemed {
                client_id: client.id.to_string(),
            },
        );
        tracing::info!(
            client_id = client.id,
            access_len = issued.access.len(),
            "tokens issued for a code"
        );
        Ok(issued.into_json(client))
    }

    /// `grant_type=refresh_token`: a new access (and id) token; the refresh
    /// token stays the same, as Google's and OpenAI's usually do.
    fn refresh(&self, p: &Params) -> Result<Value, Refusal> {
        let client = known_client(p)?;
        let token = required(p, "refresh_token")?;
        let mut store = self.store();
        let grant = store.refresh.get(token).map(|g| {
            (
                g.client_id.clone(),
                g.user.clone(),
                g.scope.clone(),
                g.revoked,
            )
        });
        let reason = match &grant {
            None => Some("unknown_refresh_token"),
            Some((_, _, _, true)) => Some("revoked"),
            Some((owner, ..)) if owner != client.id => Some("client_mismatch"),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            self.record(
                &mut store,
                OAuthEvent::RefreshRejected {
                    reason: reason.to_string(),
                },
            );
            return Err(refuse(
                "invalid_grant",
                format!("refresh token refused: {reason}"),
            ));
        }
        let Some((_, user, scope, _)) = grant else {
            return Err(refuse("invalid_grant", "refresh token refused"));
        };
        self.record(
            &mut store,
            OAuthEvent::TokenRefreshed {
                client_id: client.id.to_string(),
            },
        );
        if client.rotates_refresh {
            // The old token is spent: a copy elsewhere is now useless.
            if let Some(old) = store.refresh.get_mut(token) {
                old.revoked = true;
            }
            let issued = self.issue(&mut store, client, &user, &scope, None);
            return Ok(issued.into_json(client));
        }
        let issued = self.issue(&mut store, client, &user, &scope, Some(token));
        Ok(issued.into_json(client))
    }

    /// `grant_type=urn:ietf:params:oauth:grant-type:device_code` (RFC 8628 §3.4-3.5).
    fn poll_device(&self, p: &Params) -> Result<Value, Refusal> {
        let client = known_client(p)?;
        let device_code = required(p, "device_code")?;
        let ttl = self.config().device_code_ttl;
        let mut store = self.store();
        let Some(grant) = store.devices.get_mut(device_code) else {
            return Err(refuse("invalid_grant", "unknown device code"));
        };
        if grant.client_id != client.id {
            return Err(refuse(
                "invalid_grant",
                "device code was issued to another client",
            ));
        }
        let now = Instant::now();
        let too_fast = grant
            .last_poll
            .is_some_and(|last| now.duration_since(last) < grant.interval);
        grant.last_poll = Some(now);
        let outcome: Result<String, (&'static str, &'static str)> = if grant.issued.elapsed() >= ttl
        {
            Err(("expired_token", "the device code has expired"))
        } else if too_fast {
            grant.interval += Duration::from_secs(5);
            Err((
                "slow_down",
                "polling too fast; the interval was raised by 5 seconds",
            ))
        } else {
            match &grant.status {
                DeviceStatus::Pending => {
                    Err(("authorization_pending", "the user has not approved yet"))
                }
                DeviceStatus::Denied => Err(("access_denied", "the user denied the request")),
                DeviceStatus::Redeemed => {
                    Err(("invalid_grant", "the device code was already redeemed"))
                }
                DeviceStatus::Approved(user) => Ok(user.clone()),
            }
        };
        let scope = grant.scope.clone();
        match outcome {
            Err((error, description)) => {
                self.record(
                    &mut store,
                    OAuthEvent::DevicePolled {
                        error: error.to_string(),
                    },
                );
                Err(refuse(error, description))
            }
            Ok(user) => {
                grant.status = DeviceStatus::Redeemed;
                let issued = self.issue(&mut store, client, &user, &scope, None);
                self.record(
                    &mut store,
                    OAuthEvent::DeviceTokenIssued {
                        client_id: client.id.to_string(),
                    },
                );
                Ok(issued.into_json(client))
            }
        }
    }
}

/// What [`FakeOAuth::access_token_info`] tells about a valid access token.
#[derive(Debug, Clone)]
pub struct AccessInfo {
    /// The client it was issued to.
    pub client_id: String,
    /// Its user.
    pub user: FakeUser,
    /// Its scope, as requested.
    pub scope: String,
    /// How long it stays valid.
    pub expires_in: Duration,
}

/// A set of freshly minted tokens.
struct Issued {
    access: String,
    refresh: String,
    id_token: String,
    scope: String,
    expires_in: u64,
    user: FakeUser,
}

impl Issued {
    fn into_json(self, client: &Client) -> Value {
        let mut body = json!({
            "access_token": self.access,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "id_token": self.id_token,
            "scope": self.scope,
            "refresh_token": self.refresh,
        });
        if client.style == TokenStyle::Anthropic {
            // Anthropic's token response also names the account.
            body["account"] = json!({"uuid": account_id(&self.user.username), "email_address": self.user.email()});
            body["organization"] = json!({"uuid": account_id("org"), "name": "Fake Org"});
        }
        body
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A stable, UUID-shaped id derived from `seed` (accounts and
/// organisations; the vendor sandbox names the same ones).
pub(crate) fn account_id(seed: &str) -> String {
    let h: String = Sha256::digest(seed.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A JWT-shaped token. It is not signed: the signature segment is the
/// marker plus random text, which keeps the marker visible verbatim.
fn jwt(marker: &str, claims: &Value) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": "airlock-fake"});
    format!(
        "{}.{}.{}_{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        marker,
        random_urlsafe(24)
    )
}

fn mint(cfg: &FakeOAuthConfig, client: &Client, user: &FakeUser, scope: &str) -> Issued {
    let marker = &cfg.token_marker;
    let (iat, ttl) = (now_secs(), cfg.access_token_ttl.as_secs());
    let sub = format!("user-{}", &account_id(&user.username)[..8]);
    let mut id_claims = json!({
        "iss": cfg.base_url, "aud": client.id, "sub": sub, "email": user.email(),
        "email_verified": true, "name": user.username, "iat": iat, "exp": iat + ttl,
    });
    let openai_auth = json!({
        "chatgpt_account_id": account_id(&user.username),
        "chatgpt_plan_type": "plus",
        "chatgpt_user_id": sub,
    });
    if client.style == TokenStyle::OpenAi {
        id_claims["https://api.openai.com/auth"] = openai_auth.clone();
    }
    let opaque = |prefix: &str| format!("{prefix}{marker}_{}", random_urlsafe(32));
    let (access, refresh) = match client.style {
        TokenStyle::OpenAi => {
            let claims = json!({
                "iss": cfg.base_url, "aud": [client.id], "sub": sub, "scp": scope,
                "iat": iat, "exp": iat + ttl, "https://api.openai.com/auth": openai_auth,
            });
            (jwt(marker, &claims), opaque("rt_"))
        }
        TokenStyle::Anthropic => (opaque("sk-ant-oat01-"), opaque("sk-ant-ort01-")),
        TokenStyle::Google => (opaque("ya29."), opaque("1//")),
        TokenStyle::Demo => (opaque("demo_at_"), opaque("demo_rt_")),
    };
    Issued {
        access,
        refresh,
        id_token: jwt(marker, &id_claims),
        scope: scope.to_string(),
        expires_in: ttl,
        user: user.clone(),
    }
}
