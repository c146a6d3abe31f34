//! ICE of a viewer's `webrtcbin`: the spec's STUN/TURN servers in the URI
//! forms `webrtcbin` wants, the local addresses ICE may use, and ICE
//! restarts, which GStreamer 1.22's `webrtcbin` cannot do by itself.
//!
//! `viewer` calls [`configure`] on every new `webrtcbin`, before any
//! description is set (the ICE agent reads both when it starts gathering),
//! and [`restart`] before it applies an offer with new ICE credentials.
//!
//! Why [`restart`] exists, as measured against a webrtc-rs peer that calls
//! `restartIce()`: applying the new offer to the same 1.22 `webrtcbin`
//! answers with the old ICE credentials, and libnice keeps its old selected
//! pair, so media never moves to the viewer's new candidates. Replacing the
//! `webrtcbin` instead (the other option) brings a new DTLS certificate and
//! SCTP association: the peer's existing DTLS session never reconnects and
//! the data channel is gone. So the libnice stream is restarted in place
//! (new checks, media kept on the old pair until a new one is selected) and
//! the answer carries fresh credentials, as RFC 8445 asks of an answerer.

use airlock_proto::stream::{IceServer, StreamSpec};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_webrtc as gst_webrtc;

/// Why the ICE configuration could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum IceError {
    /// `webrtcbin` has no ICE agent (GStreamer too old?).
    #[error("webrtcbin has no ICE agent")]
    NoAgent,
    /// The ICE agent refused a local address.
    #[error("the ICE agent refused local address {0}")]
    Address(String),
    /// The ICE stream could not be restarted.
    #[error("cannot restart ICE: {0}")]
    Restart(&'static str),
    /// The ICE agent is not libnice's, which restarts and the proxy need.
    #[error("the ICE agent is not libnice")]
    NotLibnice,
    /// The HTTP proxy is not `http://<ip>:<port>`.
    #[error("the HTTP proxy {0:?} is not http://<ip>:<port>")]
    Proxy(String),
}

#[link(name = "libnice.so.10", kind = "dylib", modifiers = "+verbatim")]
extern "C" {
    /// libnice: new local credentials, remote candidates and checks
    /// discarded, media kept on the selected pair until a new one is chosen.
    fn nice_agent_restart_stream(
        agent: *mut gst::glib::gobject_ffi::GObject,
        stream_id: std::os::raw::c_uint,
    ) -> gst::glib::ffi::gboolean;
}

/// The libnice `NiceAgent` under `webrtcbin`'s ICE agent.
fn nice_agent(webrtc: &gst::Element) -> Result<gst::glib::Object, IceError> {
    let ice = webrtc
        .property::<Option<gst_webrtc::WebRTCICE>>("ice-agent")
        .ok_or(IceError::NoAgent)?;
    ice.find_property("agent")
        .filter(|p| p.value_type().name() == "NiceAgent")
        .and_then(|_| ice.property::<Option<gst::glib::Object>>("agent"))
        .ok_or(IceError::NotLibnice)
}

/// Restarts ICE on the libnice stream carrying `transceiver` (with
/// max-bundle, the only stream), ahead of an offer with new credentials.
pub fn restart(
    webrtc: &gst::Element,
    transceiver: &gst_webrtc::WebRTCRTPTransceiver,
) -> Result<(), IceError> {
    let agent = nice_agent(webrtc)?;
    let stream = transceiver
        .sender()
        .and_then(|s| s.transport())
        .and_then(|dtls| dtls.transport())
        .filter(|t| t.find_property("stream").is_some())
        .and_then(|t| t.property::<Option<gst_webrtc::WebRTCICEStream>>("stream"))
        .ok_or(IceError::Restart("no ICE stream yet"))?;
    let stream_id = stream.property::<u32>("stream-id");
    // SAFETY: `agent` is a NiceAgent (`nice_agent` checked its type)
    // and our reference keeps it alive for the call; libnice takes the
    // agent's own lock inside, so any thread may call it.
    let ok = unsafe { nice_agent_restart_stream(agent.as_ptr(), stream_id) };
    if ok == gst::glib::ffi::GFALSE {
        return Err(IceError::Restart("libnice refused"));
    }
    Ok(())
}

/// libnice's `NICE_PROXY_TYPE_HTTP` (its `proxy-type` is a plain uint).
const NICE_PROXY_TYPE_HTTP: u32 = 2;

/// Points libnice's TURN-over-TCP connections at the HTTP proxy
/// `http://<ip>:<port>`. Set on the agent directly: webrtcbin's own
/// `http-proxy` (GStreamer 1.22) resolves the proxy's host asynchronously
/// and, measured here, gathering had started without it, so TURN went
/// around the proxy.
fn set_proxy(webrtc: &gst::Element, proxy: &str) -> Result<(), IceError> {
    let bad = || IceError::Proxy(proxy.to_string());
    let authority = proxy.strip_prefix("http://").ok_or_else(bad)?;
    let authority = authority.trim_end_matches('/');
    let (ip, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    let port: u32 = port.parse().map_err(|_| bad())?;
    let agent = nice_agent(webrtc)?;
    agent.set_property("proxy-ip", ip.to_string());
    agent.set_property("proxy-port", port);
    agent.set_property("proxy-type", NICE_PROXY_TYPE_HTTP);
    Ok(())
}

/// Fresh ICE credentials for an answer (RFC 8839 `ice-char`s: 24 for the
/// ufrag, 32 for the password; at least 4 and 22 are required).
pub fn credentials() -> (String, String) {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let random = |n: usize| -> String {
        (0..n)
            .map(|_| CHARS[gst::glib::random_int_range(0, CHARS.len() as i32) as usize] as char)
            .collect()
    };
    (random(24), random(32))
}

/// Applies STUN/TURN servers and the local address restriction. Servers
/// with URLs `webrtcbin` cannot use are skipped with a warning.
pub fn configure(webrtc: &gst::Element, spec: &StreamSpec) -> Result<(), IceError> {
    if let Some(proxy) = &spec.http_proxy {
        // A VM without a network: its only way out is TURN over TCP
        // through the agent's proxy, from a loopback base (libnice needs a
        // local address to relay from); its loopback host candidates
        // would only mislead the viewer.
        set_proxy(webrtc, proxy)?;
        webrtc.set_property_from_str("ice-transport-policy", "relay");
    }
    let mut stun_set = false;
    for server in &spec.ice_servers {
        for url in &server.urls {
            add_server(webrtc, server, url, &mut stun_set);
        }
    }
    if spec.ice_addresses.is_empty() {
        return Ok(());
    }
    let agent = webrtc
        .property::<Option<gst_webrtc::WebRTCICE>>("ice-agent")
        .ok_or(IceError::NoAgent)?;
    for address in &spec.ice_addresses {
        // Once one address is added, libnice gathers on the added ones only.
        if !agent.emit_by_name::<bool>("add-local-ip-address", &[address]) {
            return Err(IceError::Address(address.clone()));
        }
    }
    Ok(())
}

fn add_server(webrtc: &gst::Element, server: &IceServer, url: &str, stun_set: &mut bool) {
    if let Some(uri) = stun_uri(url) {
        // webrtcbin takes a single STUN server; TURN servers also answer
        // STUN binding requests, so more would add little.
        if !*stun_set {
            webrtc.set_property("stun-server", uri);
            *stun_set = true;
        }
        return;
    }
    let credential = server.credential.as_ref().map(|c| c.0.as_str());
    match turn_uri(url, server.username.as_deref(), credential) {
        Some(uri) => {
            if !webrtc.emit_by_name::<bool>("add-turn-server", &[&uri]) {
                // Never log `uri`: it carries the TURN password.
                tracing::warn!(url, "webrtcbin refused a TURN server");
            }
        }
        None => tracing::warn!(url, "skipping an ICE server URL webrtcbin cannot use"),
    }
}

/// `stun:host:port` → `stun://host:port`.
fn stun_uri(url: &str) -> Option<String> {
    let rest = url.strip_prefix("stun:")?;
    let host_port = rest.split('?').next()?;
    (!host_port.is_empty()).then(|| format!("stun://{host_port}"))
}

/// `turn:host:port?transport=udp` + credentials →
/// `turn://user:pass@host:port?transport=udp`. User and password are
/// percent-encoded: TURN REST usernames contain `:` (`expiry:user`), and
/// webrtcbin unescapes both after splitting at the first `:`.
fn turn_uri(url: &str, username: Option<&str>, credential: Option<&str>) -> Option<String> {
    let (scheme, rest) = url.split_once(':')?;
    if scheme != "turn" && scheme != "turns" {
        return None;
    }
    let rest = rest.trim_start_matches("//");
    if rest.is_empty() || rest.contains('@') {
        return None;
    }
    let userinfo = match (username, credential) {
        (Some(user), Some(pass)) => format!("{}:{}@", escape(user), escape(pass)),
        (Some(user), None) => format!("{}@", escape(user)),
        _ => String::new(),
    };
    Some(format!("{scheme}://{userinfo}{rest}"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_urls_gain_slashes() {
        assert_eq!(
            stun_uri("stun:10.0.0.1:3478").as_deref(),
            Some("stun://10.0.0.1:3478")
        );
        assert_eq!(stun_uri("turn:10.0.0.1:3478"), None);
        assert_eq!(stun_uri("stun:"), None);
    }

    #[test]
    fn turn_urls_carry_escaped_rest_credentials() {
        let uri = turn_uri(
            "turn:10.0.0.1:3478?transport=udp",
            Some("1700000000:alice"),
            Some("a+b/c="),
        );
        assert_eq!(
            uri.as_deref(),
            Some("turn://1700000000%3Aalice:a%2Bb%2Fc%3D@10.0.0.1:3478?transport=udp")
        );
        assert_eq!(
            turn_uri("turns:h:5349", None, None).as_deref(),
            Some("turns://h:5349")
        );
        assert_eq!(turn_uri("http://x", None, None), None);
        assert_eq!(turn_uri("turn:evil@h", Some("u"), Some("p")), None);
    }
}
