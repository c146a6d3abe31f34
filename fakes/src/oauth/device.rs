//! Device grants for stand-ins that drive them through a vendor's own
//! device API rather than RFC 8628's token polling: OpenAI's `deviceauth`
//! endpoints, which `codex login --device-auth` uses. The grant is the same
//! record as RFC 8628's, so the `/device` entry page, sign-in and consent
//! approve or deny it; but an approved grant is answered with an
//! authorization code plus the PKCE pair the server made for it, which the
//! client then redeems at the token endpoint like a browser login's code.

use std::time::{Duration, Instant};

use super::clients;
use super::store::{new_user_code, AuthRequest, CodeGrant, DeviceGrant, DeviceStatus, Store};
use super::{FakeOAuth, OAuthEvent};
use crate::pkce::{self, random_urlsafe};

/// Why a device grant could not be issued or gave no authorization code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceCodeError {
    /// The client is not registered.
    #[error("unknown client {0:?}")]
    UnknownClient(String),
    /// The redirect URI is not registered for the grant's client.
    #[error("the redirect URI is not registered for the client")]
    RedirectUri,
    /// No grant has this device code and user code.
    #[error("unknown device code or user code")]
    Unknown,
    /// The user has not decided yet.
    #[error("the user has not approved yet")]
    Pending,
    /// The user pressed Deny.
    #[error("the user denied the request")]
    Denied,
    /// The device code outlived its lifetime.
    #[error("the device code has expired")]
    Expired,
    /// The grant already produced its code.
    #[error("the device code was already redeemed")]
    Redeemed,
}

impl DeviceCodeError {
    /// The RFC 6749 / RFC 8628 error code that names this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownClient(_) => "invalid_client",
            Self::RedirectUri | Self::Unknown | Self::Redeemed => "invalid_grant",
            Self::Pending => "authorization_pending",
            Self::Denied => "access_denied",
            Self::Expired => "expired_token",
        }
    }
}

/// A device grant just issued by [`FakeOAuth::issue_device`].
#[derive(Clone)]
pub struct IssuedDevice {
    /// What the device polls with (a secret of the device).
    pub device_code: String,
    /// What the person types on the entry page, e.g. `WDJB-MJHT`.
    pub user_code: String,
}

impl std::fmt::Debug for IssuedDevice {
    // The device code lets whoever holds it collect the grant: hide it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedDevice")
            .field("user_code", &self.user_code)
            .finish_non_exhaustive()
    }
}

/// What an approved device grant turns into
/// ([`FakeOAuth::device_authorization_code`]): an authorization code and
/// the PKCE pair it is bound to, both made by the server.
#[derive(Clone)]
pub struct DeviceCodeGrant {
    /// The authorization code, redeemable once at the token endpoint.
    pub code: String,
    /// `S256` challenge of `verifier`, recorded with the code.
    pub challenge: String,
    /// The verifier the token endpoint wants with the code.
    pub verifier: String,
}

impl std::fmt::Debug for DeviceCodeGrant {
    // Code and verifier together are a login: show neither.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCodeGrant")
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
}

impl FakeOAuth {
    /// Issues a device grant to `client_id` for `scope`, pending until a
    /// person approves its user code on the `/device` page. Records
    /// [`OAuthEvent::DeviceCodeIssued`]. Client secrets are not checked
    /// here: callers that need them check first.
    pub fn issue_device(
        &self,
        client_id: &str,
        scope: &str,
    ) -> Result<IssuedDevice, DeviceCodeError> {
        let client = clients::find(client_id)
            .ok_or_else(|| DeviceCodeError::UnknownClient(client_id.to_string()))?;
        let issued = IssuedDevice {
            device_code: random_urlsafe(32),
            user_code: new_user_code(),
        };
        let mut store = self.store();
        store.devices.insert(
            issued.device_code.clone(),
            DeviceGrant {
                client_id: client.id.to_string(),
                scope: scope.to_string(),
                user_code: issued.user_code.clone(),
                status: DeviceStatus::Pending,
                issued: Instant::now(),
                interval: self.config().device_poll_interval,
                last_poll: None,
            },
        );
        let event = OAuthEvent::DeviceCodeIssued {
            client_id: client.id.to_string(),
            user_code: issued.user_code.clone(),
        };
        self.record(&mut store, event);
        Ok(issued)
    }

    /// Turns the approved grant with this device code and user code into
    /// an authorization code for `redirect_uri` (which must be registered
    /// for the grant's client), with a fresh PKCE pair and no `state`.
    /// Answers once: the grant is redeemed from then on. There is no
    /// `slow_down`, as OpenAI's device API has none. Records
    /// [`OAuthEvent::DevicePolled`] for a refusal of a known grant and
    /// [`OAuthEvent::DeviceTokenIssued`] for the code.
    pub fn device_authorization_code(
        &self,
        device_code: &str,
        user_code: &str,
        redirect_uri: &str,
    ) -> Result<DeviceCodeGrant, DeviceCodeError> {
        let ttl = self.config().device_code_ttl;
        let mut store = self.store();
        let grant = store
            .devices
            .get_mut(device_code)
            .filter(|g| g.user_code == user_code)
            .ok_or(DeviceCodeError::Unknown)?;
        let client = clients::find(&grant.client_id).ok_or(DeviceCodeError::Unknown)?;
        if !client.allows(self.base_url(), redirect_uri) {
            return Err(DeviceCodeError::RedirectUri);
        }
        let user = match standing(grant, ttl) {
            Ok(user) => user,
            Err(refusal) => {
                let error = refusal.code().to_string();
                self.record(&mut store, OAuthEvent::DevicePolled { error });
                return Err(refusal);
            }
        };
        grant.status = DeviceStatus::Redeemed;
        let req = AuthRequest {
            client_id: client.id.to_string(),
            redirect_uri: redirect_uri.to_string(),
            state: None,
            challenge: String::new(),
            scope: grant.scope.clone(),
        };
        let granted = self.code_for_device(&mut store, req, user);
        let event = OAuthEvent::DeviceTokenIssued {
            client_id: client.id.to_string(),
        };
        self.record(&mut store, event);
        Ok(granted)
    }

    /// Stores a fresh code for `req` (whose challenge it fills in) and user.
    fn code_for_device(
        &self,
        store: &mut Store,
        mut req: AuthRequest,
        user: String,
    ) -> DeviceCodeGrant {
        let pair = pkce::generate();
        req.challenge = pair.challenge.clone();
        let code = random_urlsafe(32);
        store.codes.insert(
            code.clone(),
            CodeGrant {
                req,
                user,
                issued: Instant::now(),
                used: false,
                refresh_tokens: Vec::new(),
            },
        );
        DeviceCodeGrant {
            code,
            challenge: pair.challenge,
            verifier: pair.verifier,
        }
    }
}

/// Whom a grant was approved by, or why it gives nothing (yet).
fn standing(grant: &DeviceGrant, ttl: Duration) -> Result<String, DeviceCodeError> {
    if grant.issued.elapsed() >= ttl {
        return Err(DeviceCodeError::Expired);
    }
    match &grant.status {
        DeviceStatus::Pending => Err(DeviceCodeError::Pending),
        DeviceStatus::Denied => Err(DeviceCodeError::Denied),
        DeviceStatus::Redeemed => Err(DeviceCodeError::Redeemed),
        DeviceStatus::Approved(user) => Ok(user.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::clients::OPENAI_CODEX;
    use crate::oauth::FakeOAuthConfig;

    const CALLBACK: &str = "https://auth.openai.com/deviceauth/callback";

    fn fake() -> FakeOAuth {
        let cfg = FakeOAuthConfig {
            base_url: "https://auth.openai.com/airlock".into(),
            ..FakeOAuthConfig::default()
        };
        FakeOAuth::new(cfg).expect("valid config")
    }

    fn approve(fake: &FakeOAuth, device_code: &str) {
        let mut store = fake.store();
        let grant = store.devices.get_mut(device_code).expect("issued");
        grant.status = DeviceStatus::Approved("alice".into());
    }

    #[test]
    fn an_approved_grant_gives_one_code_bound_to_a_fresh_pkce_pair() {
        let fake = fake();
        let dev = fake.issue_device(OPENAI_CODEX, "openid").expect("issued");
        let poll = || fake.device_authorization_code(&dev.device_code, &dev.user_code, CALLBACK);
        assert_eq!(poll().map(|_| ()), Err(DeviceCodeError::Pending));
        approve(&fake, &dev.device_code);
        let granted = poll().expect("approved");
        assert!(pkce::verify_s256(&granted.verifier, &granted.challenge));
        let store = fake.store();
        let code = store.codes.get(&granted.code).expect("stored");
        assert_eq!(code.req.redirect_uri, CALLBACK);
        assert_eq!(code.req.challenge, granted.challenge);
        assert_eq!(
            (code.req.state.as_deref(), code.user.as_str()),
            (None, "alice")
        );
        drop(store);
        assert_eq!(poll().map(|_| ()), Err(DeviceCodeError::Redeemed));
    }

    #[test]
    fn the_user_code_must_match_and_the_redirect_be_registered() {
        let fake = fake();
        let dev = fake.issue_device(OPENAI_CODEX, "").expect("issued");
        approve(&fake, &dev.device_code);
        let wrong = fake.device_authorization_code(&dev.device_code, "BCDF-GHJK", CALLBACK);
        assert_eq!(wrong.map(|_| ()), Err(DeviceCodeError::Unknown));
        let elsewhere =
            fake.device_authorization_code(&dev.device_code, &dev.user_code, "https://evil/cb");
        assert_eq!(elsewhere.map(|_| ()), Err(DeviceCodeError::RedirectUri));
        assert_eq!(
            fake.issue_device("nope", "").map(|_| ()),
            Err(DeviceCodeError::UnknownClient("nope".into()))
        );
    }
}
