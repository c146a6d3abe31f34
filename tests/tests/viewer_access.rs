//! Who may watch a session: a real airlockd (browser role as a host
//! process, fake OAuth), two sessions, and every door of the live view on
//! the viewers' listener (the viewer page, the signalling WebSocket
//! upgrade, the HTTP offer and answer, the ICE servers, the viewer's
//! event stream) tried with no token,
//! a wrong token, the other session's token and an expired token: all are
//! refused, with 401 or 403 and a message that says what to do. The right
//! token opens the page and the WebSocket, whose welcome names the viewer;
//! the first viewer controls the input, and when it leaves the next does.
//! No token ever reaches airlockd's log. A peer that does not trickle
//! (webrtc-rs, all its candidates in its offer) gets, through the HTTP
//! signalling API, an answer with the streamer's candidates folded in, and
//! connects with it. A viewer that vanishes without closing (no pongs)
//! frees its place within the idle limit.
//!
//! Tests run one at a time: the fake CLI binds its fixed port.
//!
//! The WebSocket is spoken by hand over TCP (an upgrade request and
//! unmasked server frames), so a refusal is seen as the HTTP status it is.

use std::time::{Duration, Instant};

use airlock_tests::live::LiveSession;
use airlock_tests::login::{with_rig, FAKE};
use airlock_tests::{Daemon, Settings};
use anyhow::{bail, ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const USER: &str = "viewer-access";

fn tune(s: Settings) -> Settings {
    s.set("auth", "prestart_cli_vm", "false")
        .set("live", "ice_addresses", "[\"127.0.0.1\"]")
        .set("live", "stun_urls", "[\"stun:127.0.0.1:3478\"]")
        .set("live", "max_viewers", "2")
}

/// An answer to a plain HTTP request: status, content type, body.
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.status, self.content_type, self.body)
    }
}

/// A request to the viewers' listener, as a viewer makes it (no operator
/// token).
async fn call(d: &Daemon, method: Method, path: &str, body: Option<Value>) -> Result<Answer> {
    let mut req = d
        .viewer_http
        .request(method, format!("{}{path}", d.viewer_base));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok(Answer {
        status: resp.status().as_u16(),
        content_type,
        body: resp.text().await?,
    })
}

/// A WebSocket client just big enough for these tests: the upgrade, then
/// text frames from the server (which never masks them).
struct RawSocket {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// Sends the upgrade request; the socket on `101`, else the refusal.
async fn upgrade(d: &Daemon, path: &str) -> Result<std::result::Result<RawSocket, Answer>> {
    upgrade_with(d, path, "").await
}

/// As [`upgrade`], with `extra` header lines (each ending in CRLF).
async fn upgrade_with(
    d: &Daemon,
    path: &str,
    extra: &str,
) -> Result<std::result::Result<RawSocket, Answer>> {
    let host = d
        .viewer_base
        .strip_prefix("http://")
        .context("plain http")?;
    let mut tcp = TcpStream::connect(host).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        read_some(&mut tcp, &mut buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let rest = buf.split_off(head_end);
    if status == 101 {
        return Ok(Ok(RawSocket { tcp, buf: rest }));
    }
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let length: usize = header("content-length").parse().unwrap_or(0);
    let mut body = rest;
    while body.len() < length {
        read_some(&mut tcp, &mut body).await?;
    }
    Ok(Err(Answer {
        status,
        content_type: header("content-type"),
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

async fn read_some(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
        .await
        .context("airlockd did not answer within 10 s")??;
    if n == 0 {
        bail!("airlockd closed the connection");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

impl RawSocket {
    /// The next text message that is JSON with `"type": kind`; other
    /// messages (streamer states, stats, pings) are skipped.
    async fn next_of(&mut self, kind: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (opcode, payload) = tokio::time::timeout(left, self.frame())
                .await
                .with_context(|| format!("no {kind:?} message within {timeout:?}"))??;
            match opcode {
                1 => {
                    let v: Value = serde_json::from_slice(&payload)?;
                    if v["type"] == kind {
                        return Ok(v);
                    }
                }
                8 => bail!("closed: {}", String::from_utf8_lossy(&payload)),
                _ => {}
            }
        }
    }

    async fn frame(&mut self) -> Result<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok((opcode, payload));
            }
            read_some(&mut self.tcp, &mut self.buf).await?;
        }
    }
}

/// One unmasked frame at the start of `buf`: opcode, payload, bytes used.
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let (len, at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some((b0 & 0x0f, payload, at + len))
}

/// The doors of the live view for session `id`, each with `token`
/// appended (or none).
fn doors(id: &str, token: Option<&str>) -> Vec<(&'static str, Method, String)> {
    let t = token.map(|t| format!("token={t}")).unwrap_or_default();
    vec![
        ("page", Method::GET, format!("/session/{id}?{t}")),
        (
            "ws",
            Method::GET,
            format!("/api/webrtc/session/{id}/ws?{t}"),
        ),
        (
            "offer",
            Method::POST,
            format!("/api/webrtc/session/{id}/offer?{t}"),
        ),
        (
            "answer",
            Method::GET,
            format!("/api/webrtc/session/{id}/answer?viewerId=v-abcdefghij&{t}"),
        ),
        (
            "ice",
            Method::GET,
            format!("/api/webrtc/ice-servers?session={id}&{t}"),
        ),
        (
            "events",
            Method::GET,
            format!("/api/auth/session/{id}/events?{t}"),
        ),
    ]
}

/// Tries every door with `token`; each must answer `status`, as an HTML
/// page for the page and JSON (with an error that mentions the token)
/// everywhere else.
async fn all_refused(
    d: &Daemon,
    id: &str,
    token: Option<&str>,
    status: u16,
    what: &str,
) -> Result<()> {
    for (door, method, path) in doors(id, token) {
        let answer = match door {
            "ws" => match upgrade(d, &path).await? {
                Ok(_) => bail!("{what}: the WebSocket upgrade was accepted"),
                Err(refusal) => refusal,
            },
            "offer" => call(d, method, &path, Some(json!({ "sdp": "v=0\r\n" }))).await?,
            _ => call(d, method, &path, None).await?,
        };
        ensure!(answer.status == status, "{what} at {door}: {answer}");
        let wants = if door == "page" {
            "text/html"
        } else {
            "application/json"
        };
        ensure!(
            answer.content_type.starts_with(wants),
            "{what} at {door}: {answer}"
        );
        ensure!(
            answer.body.contains("token"),
            "{what} at {door} says why: {answer}"
        );
        if let Some(t) = token {
            ensure!(
                !answer.body.contains(t),
                "{what} at {door} echoes the token"
            );
        }
    }
    Ok(())
}

/// Mints a link that expires at once, and waits (with a deadline) until
/// airlockd sees it as expired.
async fn expired_token(d: &Daemon, id: &str) -> Result<String> {
    let path = format!("/api/auth/session/{id}/viewer-token");
    let (status, v) = d
        .request(Method::POST, &path, Some(json!({ "ttlMs": 1 })))
        .await?;
    ensure!(status == 201, "mint: {status} {v}");
    let token = v["viewerToken"]
        .as_str()
        .context("viewerToken")?
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = format!("/api/webrtc/ice-servers?session={id}&token={token}");
    loop {
        let answer = call(d, Method::GET, &probe, None).await?;
        if answer.status == 401 && answer.body.contains("expired") {
            return Ok(token);
        }
        ensure!(
            Instant::now() < deadline,
            "the 1 ms link never expired: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn check_the_link_in_the_views(d: &Daemon, a: &LiveSession) -> Result<()> {
    ensure!(a.token.len() >= 22, "at least 128 bits: {}", a.token.len());
    ensure!(
        a.page_url == format!("{}/session/{}?token={}", d.viewer_base, a.id, a.token),
        "viewerUrl is <viewers' listener>/session/<id>?token=<viewerToken>: {}",
        a.page_url
    );
    let (status, v) = d
        .request(Method::GET, &format!("/api/auth/session/{}", a.id), None)
        .await?;
    ensure!(status == 200, "{status} {}", v["error"]);
    ensure!(
        v["viewerToken"] == a.token.as_str(),
        "GET shows the same token"
    );
    ensure!(
        v["viewerUrl"] == a.page_url.as_str(),
        "GET shows the same link"
    );
    ensure!(
        v["viewerTokenExpiresAt"].is_string(),
        "expiry: {}",
        v["viewerTokenExpiresAt"]
    );
    Ok(())
}

async fn the_right_token_opens_the_page(d: &Daemon, a: &LiveSession) -> Result<()> {
    let resp = d.viewer_http.get(&a.page_url).send().await?;
    ensure!(resp.status() == 200, "page: {}", resp.status());
    let h = resp.headers().clone();
    let header = |n: &str| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    ensure!(
        header("content-security-policy").contains("script-src 'self'"),
        "{h:?}"
    );
    ensure!(header("cache-control") == "no-store", "{h:?}");
    ensure!(header("referrer-policy") == "no-referrer", "{h:?}");
    let html = resp.text().await?;
    ensure!(
        html.contains("id=\"screen\"") && html.contains("/assets/viewer.js"),
        "{html}"
    );
    let js = call(d, Method::GET, "/assets/viewer.js", None).await?;
    ensure!(
        js.status == 200 && js.content_type.starts_with("text/javascript"),
        "{js}"
    );
    ensure!(js.body.contains("airlockViewer"), "the test hook is there");
    // Starting a session is the operator's.
    let new = call(d, Method::GET, "/session/new", None).await?;
    ensure!(new.status == 404, "/session/new for viewers: {new}");
    let ice = call(
        d,
        Method::GET,
        &format!("/api/webrtc/ice-servers?session={}&token={}", a.id, a.token),
        None,
    )
    .await?;
    ensure!(ice.status == 200, "{ice}");
    let ice: Value = serde_json::from_str(&ice.body)?;
    ensure!(
        ice["iceServers"][0]["urls"][0] == "stun:127.0.0.1:3478",
        "{ice}"
    );
    ensure!(ice["ttl"].as_u64().is_some(), "{ice}");
    Ok(())
}

/// Two viewers over the WebSocket: the first controls; when it goes, the
/// second is told it does. A third finds the session full (max 2).
async fn sockets_welcome_and_hand_over_control(d: &Daemon, a: &LiveSession) -> Result<()> {
    let path = format!("/api/webrtc/session/{}/ws?token={}", a.id, a.token);
    let Ok(mut first) = upgrade(d, &path).await? else {
        bail!("the right token was refused at the WebSocket");
    };
    let welcome = first.next_of("welcome", Duration::from_secs(10)).await?;
    ensure!(welcome["controlling"] == true, "{welcome}");
    ensure!(welcome["sessionId"] == a.id.as_str(), "{welcome}");
    ensure!(welcome["streamer"].is_string(), "{welcome}");
    ensure!(welcome["iceServers"].is_array(), "{welcome}");
    let id = welcome["viewerId"]
        .as_str()
        .context("viewerId")?
        .to_string();
    ensure!(id.starts_with("v-") && id.len() > 4, "{welcome}");
    let Ok(mut second) = upgrade(d, &path).await? else {
        bail!("the second viewer was refused");
    };
    let welcome2 = second.next_of("welcome", Duration::from_secs(10)).await?;
    ensure!(welcome2["controlling"] == false, "{welcome2}");
    ensure!(welcome2["viewerId"] != id.as_str(), "{welcome2}");
    match upgrade(d, &path).await? {
        Ok(_) => bail!("a third viewer got in; max_viewers is 2"),
        Err(full) => ensure!(
            full.status == 409 && full.body.contains("2 viewers"),
            "{full}"
        ),
    }
    drop(first);
    let control = second.next_of("control", Duration::from_secs(10)).await?;
    ensure!(control["controlling"] == true, "{control}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn viewer_links_open_their_own_session_and_nothing_else() -> Result<()> {
    with_rig(tune, async |rig| {
        let d = &rig.daemon;
        let a = d.start_live(USER, FAKE).await?;
        let b = d.start_live(USER, FAKE).await?;
        ensure!(a.token != b.token, "each session has its own token");
        check_the_link_in_the_views(d, &a).await?;
        let expired = expired_token(d, &a.id).await?;
        let id = &a.id;
        all_refused(d, id, None, 401, "no token").await?;
        let wrong = "A".repeat(a.token.len());
        all_refused(d, id, Some(&wrong), 403, "a wrong token").await?;
        all_refused(d, id, Some(&b.token), 403, "the other session's token").await?;
        all_refused(d, id, Some(&expired), 401, "an expired token").await?;
        // The header form is checked the same way.
        let bearer = d
            .viewer_http
            .get(format!(
                "{}/api/webrtc/ice-servers?session={id}",
                d.viewer_base
            ))
            .bearer_auth(&b.token)
            .send()
            .await?;
        ensure!(bearer.status() == 403, "bearer: {}", bearer.status());
        the_right_token_opens_the_page(d, &a).await?;
        sockets_welcome_and_hand_over_control(d, &a).await?;
        // Minting needs a session that exists.
        let (status, v) = d
            .request(
                Method::POST,
                "/api/auth/session/ses-nope/viewer-token",
                None,
            )
            .await?;
        ensure!(status == 404, "{status} {v}");
        let log = std::fs::read_to_string(d.dir.path().join("airlockd.log"))?;
        for t in [&a.token, &b.token, &expired] {
            ensure!(
                !log.contains(t.as_str()),
                "a viewer token is in airlockd's log"
            );
        }
        Ok(())
    })
    .await
}

/// Viewers connected, from `/metrics`.
async fn viewers(d: &Daemon) -> Result<u64> {
    let text = d.metrics().await?;
    text.lines()
        .find_map(|l| l.strip_prefix("airlock_viewers "))
        .and_then(|n| n.parse().ok())
        .context("no airlock_viewers in /metrics")
}

/// Two viewers whose sockets stay open but never answer again (not even
/// the server's pings, as a phone that lost its network): the session is
/// full until the idle limit drops them, then a new viewer gets in.
#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_that_vanishes_without_closing_frees_its_place() -> Result<()> {
    let tune = |s: Settings| tune(s).set("live", "viewer_idle_ms", "2000");
    with_rig(tune, async |rig| {
        let d = &rig.daemon;
        let a = d.start_live(USER, FAKE).await?;
        let path = format!("/api/webrtc/session/{}/ws?token={}", a.id, a.token);
        let mut vanished = Vec::new();
        for _ in 0..2 {
            let Ok(mut socket) = upgrade(d, &path).await? else {
                bail!("a viewer was refused");
            };
            socket.next_of("welcome", Duration::from_secs(10)).await?;
            vanished.push(socket);
        }
        let since = Instant::now();
        match upgrade(d, &path).await? {
            Ok(_) => bail!("a third viewer got in; max_viewers is 2"),
            Err(full) => ensure!(full.status == 409, "{full}"),
        }
        // Nothing announces the drop: look again shortly.
        while viewers(d).await? > 0 {
            ensure!(
                since.elapsed() < Duration::from_secs(10),
                "vanished viewers still held their places after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let freed = since.elapsed();
        eprintln!("vanished viewers dropped {freed:?} after joining (idle limit 2 s)");
        ensure!(
            freed >= Duration::from_millis(1500),
            "dropped before the idle limit: {freed:?}"
        );
        let Ok(mut again) = upgrade(d, &path).await? else {
            bail!("the session stayed full after its viewers vanished");
        };
        again.next_of("welcome", Duration::from_secs(10)).await?;
        drop(vanished);
        Ok(())
    })
    .await
}

/// DNS rebinding and other sites' pages: a request naming another host is
/// refused whatever the route; a POST and a WebSocket upgrade from another
/// site's page are refused even with the right token, and work from the
/// server's own origin; a connection that never finishes its headers is
/// closed after `header_read_timeout_ms`.
#[tokio::test(flavor = "multi_thread")]
async fn other_hosts_other_sites_and_silent_connections_are_refused() -> Result<()> {
    let tune = |s: Settings| tune(s).set("server", "header_read_timeout_ms", "1500");
    with_rig(tune, async |rig| {
        let d = &rig.daemon;
        let a = d.start_live(USER, FAKE).await?;
        let page = format!("/session/{}?token={}", a.id, a.token);
        let urls = [
            format!("{}/health", d.base),
            format!("{}/api/vms", d.base),
            format!("{}{page}", d.viewer_base),
        ];
        for path in urls {
            let r = d
                .http
                .get(&path)
                .header("host", "rebound.example")
                .send()
                .await?;
            let status = r.status();
            let body = r.text().await?;
            ensure!(
                status == 421 && body.contains("allowed_hosts"),
                "{path} with a foreign Host: {status} {body}"
            );
        }
        let start = json!({ "userId": USER, "provider": FAKE });
        let cross = d
            .http
            .post(format!("{}/api/auth/start", d.base))
            .header("origin", "http://evil.example")
            .json(&start)
            .send()
            .await?;
        ensure!(cross.status() == 403, "cross-site POST: {}", cross.status());
        let own = d
            .http
            .post(format!("{}/api/auth/session/{}/cancel", d.base, a.id))
            .header("origin", &d.base)
            .send()
            .await?;
        ensure!(own.status() == 200, "same-origin POST: {}", own.status());
        let b = d.start_live(USER, FAKE).await?;
        let ws = format!("/api/webrtc/session/{}/ws?token={}", b.id, b.token);
        match upgrade_with(d, &ws, "Origin: http://evil.example\r\n").await? {
            Ok(_) => bail!("a cross-site WebSocket was upgraded"),
            Err(ans) => ensure!(ans.status == 403, "cross-site WebSocket: {ans}"),
        }
        if let Err(ans) = upgrade_with(d, &ws, &format!("Origin: {}\r\n", d.viewer_base)).await? {
            bail!("a same-origin WebSocket was refused: {ans}");
        }
        // Headers started and never finished.
        let host = d.base.strip_prefix("http://").context("plain http")?;
        let mut tcp = TcpStream::connect(host).await?;
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: ").await?;
        let opened = Instant::now();
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .context("a connection without complete headers stayed open for 10 s")?;
        let held = opened.elapsed();
        ensure!(
            !matches!(read, Ok(n) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 200")),
            "the unfinished request was answered"
        );
        ensure!(
            held >= Duration::from_millis(1000),
            "closed after {held:?}, before the timeout"
        );
        Ok(())
    })
    .await
}

/// An offer with every candidate in it (gathering waited for).
async fn full_offer(pc: &webrtc::peer_connection::RTCPeerConnection) -> Result<String> {
    use webrtc::rtp_transceiver::rtp_codec::RTPCodecType;
    use webrtc::rtp_transceiver::rtp_transceiver_direction::RTCRtpTransceiverDirection;
    use webrtc::rtp_transceiver::RTCRtpTransceiverInit;
    let init = RTCRtpTransceiverInit {
        direction: RTCRtpTransceiverDirection::Recvonly,
        send_encodings: vec![],
    };
    pc.add_transceiver_from_kind(RTPCodecType::Video, Some(init))
        .await?;
    pc.create_data_channel("input", None).await?;
    let offer = pc.create_offer(None).await?;
    let mut gathered = pc.gathering_complete_promise().await;
    pc.set_local_description(offer).await?;
    tokio::time::timeout(Duration::from_secs(10), gathered.recv())
        .await
        .context("ICE gathering did not complete")?;
    Ok(pc
        .local_description()
        .await
        .context("local description")?
        .sdp)
}

/// `POST .../offer`, then `GET .../answer` while it answers 202.
async fn http_answer(d: &Daemon, link: &LiveSession, sdp: &str) -> Result<(String, String)> {
    let id = &link.id;
    let path = format!("/api/webrtc/session/{id}/offer?token={}", link.token);
    let offered = call(
        d,
        Method::POST,
        &path,
        Some(json!({ "sdp": sdp, "codec": "vp8" })),
    )
    .await?;
    ensure!([200, 202].contains(&offered.status), "offer: {offered}");
    let v: Value = serde_json::from_str(&offered.body)?;
    let viewer = v["viewerId"].as_str().context("viewerId")?.to_string();
    if offered.status == 200 {
        return Ok((viewer, v["sdp"].as_str().context("sdp")?.into()));
    }
    let path = format!(
        "/api/webrtc/session/{id}/answer?viewerId={viewer}&token={}",
        link.token
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = call(d, Method::GET, &path, None).await?;
        ensure!([200, 202].contains(&answer.status), "answer: {answer}");
        if answer.status == 200 {
            let v: Value = serde_json::from_str(&answer.body)?;
            return Ok((viewer, v["sdp"].as_str().context("sdp")?.into()));
        }
        ensure!(Instant::now() < deadline, "no answer within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_does_not_trickle_connects_through_the_http_api() -> Result<()> {
    use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState as State;
    use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
    with_rig(tune, async |rig| {
        let d = &rig.daemon;
        let link = d.start_live(USER, FAKE).await?;
        d.wait_session(&link.id, Duration::from_secs(120), |v| {
            airlock_tests::login::step_events(v)
                .iter()
                .any(|e| e == "streamerRunning")
        })
        .await?;
        let pc = airlock_tests::peer::loopback_pc().await?;
        let (state_tx, mut state) = tokio::sync::watch::channel(State::New);
        pc.on_peer_connection_state_change(Box::new(move |s| {
            let _ = state_tx.send(s);
            Box::pin(async {})
        }));
        let offer = full_offer(&pc).await?;
        let (viewer, answer) = http_answer(d, &link, &offer).await?;
        ensure!(viewer.starts_with("v-"), "{viewer}");
        ensure!(
            answer.contains("\r\na=candidate:"),
            "candidates folded in:\n{answer}"
        );
        ensure!(answer.contains("a=end-of-candidates"), "{answer}");
        pc.set_remote_description(RTCSessionDescription::answer(answer)?)
            .await?;
        tokio::time::timeout(
            Duration::from_secs(20),
            state.wait_for(|s| *s == State::Connected),
        )
        .await
        .context("the peer did not connect with the folded answer")??;
        let unknown = format!(
            "/api/webrtc/session/{}/answer?viewerId=v-nobody&token={}",
            link.id, link.token
        );
        let gone = call(d, Method::GET, &unknown, None).await?;
        ensure!(gone.status == 404, "{gone}");
        pc.close().await?;
        Ok(())
    })
    .await
}
