//! Who may use which listener of a real airlockd (process backend):
//!
//! - The operator API on TCP refuses a request without a bearer token or
//!   with a wrong one (401, JSON, `WWW-Authenticate: Bearer`), and serves
//!   the right one; on its Unix socket (mode 0660) it needs none, and
//!   still refuses a foreign `Host`. No token reaches the log.
//! - The viewers' listener serves none of the operator's routes, even to
//!   a request that carries the operator token: 404 for each.
//! - Each listener's OpenAPI document (`/openapi.json`) lists exactly what
//!   it serves: every documented operation answers (never the fallback's
//!   "no route", never 405), and paths it does not list are not served.
//! - airlockd refuses to start with an operator API anyone could use (TCP
//!   without tokens, off loopback without TLS, a socket others may open),
//!   a viewer listener off loopback in clear or on every interface with
//!   no public URL for its links, and a tokens file others may read;
//!   each time with a message naming what to set.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use airlock_tests::{artifacts, random_hex, toml_path, with_daemon, Daemon, Settings};
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn process() -> Settings {
    Settings::new("process")
}

/// One HTTP/1.1 request over the Unix socket; the status and body.
async fn over_socket(socket: &Path, method: &str, path: &str, host: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .context("no answer on the socket within 10 s")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_api_needs_a_token_on_tcp_and_none_on_its_socket() -> Result<()> {
    with_daemon(process(), async |d| {
        let url = format!("{}/api/vms", d.base);
        let wrong = random_hex(32)?;
        for (what, token, says) in [
            ("no token", None, "Authorization: Bearer"),
            ("a wrong token", Some(wrong.as_str()), "not one of"),
        ] {
            let mut req = d.viewer_http.get(&url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await?;
            let status = r.status().as_u16();
            let challenge = r
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body: Value = r.json().await?;
            let message = body["error"].as_str().unwrap_or_default();
            ensure!(status == 401, "{what}: {status} {body}");
            ensure!(challenge == "Bearer", "{what}: challenge {challenge:?}");
            ensure!(
                message.contains(says) && message.contains("server.tokens_file"),
                "{what}: {message}"
            );
        }
        let (status, v) = d.request(Method::GET, "/api/vms", None).await?;
        ensure!(
            status == 200 && v["vms"].is_array(),
            "the right token: {status} {v}"
        );
        let mode = std::fs::metadata(&d.socket)?.permissions().mode() & 0o777;
        ensure!(mode == 0o660, "socket mode {mode:o}");
        let (status, body) = over_socket(&d.socket, "GET", "/api/vms", "localhost").await?;
        ensure!(status == 200, "on the socket, no token: {status} {body}");
        ensure!(
            serde_json::from_str::<Value>(&body)?["vms"].is_array(),
            "{body}"
        );
        let (status, body) = over_socket(&d.socket, "GET", "/health", "rebound.example").await?;
        ensure!(
            status == 421 && body.contains("allowed_hosts"),
            "a foreign Host on the socket: {status} {body}"
        );
        let (status, body) = over_socket(&d.socket, "GET", "/session/new", "localhost").await?;
        ensure!(
            status == 200 && body.contains("/assets/new.js"),
            "the operator's page to start a session: {status}"
        );
        // The page itself needs no token (it asks for one).
        let page = d
            .viewer_http
            .get(format!("{}/session/new", d.base))
            .send()
            .await?;
        ensure!(
            page.status() == 200,
            "/session/new on TCP: {}",
            page.status()
        );
        let log = std::fs::read_to_string(d.dir.path().join("airlockd.log"))?;
        for t in [&d.token, &wrong] {
            ensure!(!log.contains(t.as_str()), "a token is in airlockd's log");
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_viewers_listener_serves_nothing_of_the_operators() -> Result<()> {
    with_daemon(process(), async |d| {
        ensure!(!d.viewer_base.is_empty(), "no viewers' listener announced");
        let operator_routes = [
            (Method::GET, "/health"),
            (Method::GET, "/metrics"),
            (Method::GET, "/api/vms"),
            (Method::POST, "/api/vms"),
            (Method::GET, "/api/vms/vm-x"),
            (Method::POST, "/api/vms/vm-x/exec"),
            (Method::GET, "/api/vms/vm-x/files?path=/etc/passwd"),
            (Method::GET, "/api/auth/providers"),
            (Method::POST, "/api/auth/start"),
            (Method::GET, "/api/auth/session/ses-x"),
            (Method::POST, "/api/auth/session/ses-x/cancel"),
            (Method::POST, "/api/auth/session/ses-x/input"),
            (Method::GET, "/api/auth/session/ses-x/screenshot"),
            (Method::POST, "/api/auth/session/ses-x/viewer-token"),
            (Method::GET, "/session/new"),
        ];
        // (`/session/new` is taken there for a session's id, which no
        // session has.)
        for (method, path) in operator_routes {
            // With the operator's token too: it opens nothing here.
            let r = d
                .http
                .request(method.clone(), format!("{}{path}", d.viewer_base))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await?;
            let status = r.status().as_u16();
            let body = r.text().await?;
            ensure!(
                status == 404 && (body.contains("no route") || path == "/session/new"),
                "{method} {path} on the viewers' listener: {status} {body}"
            );
        }
        let js = d
            .viewer_http
            .get(format!("{}/assets/viewer.js", d.viewer_base))
            .send()
            .await?;
        ensure!(js.status() == 200, "the viewer's script: {}", js.status());
        Ok(())
    })
    .await
}

/// `airlockd --print-config` with `extra` TOML: it must refuse, saying
/// `says`.
fn refused(dir: &Path, extra: &str, says: &str) -> Result<()> {
    let config = dir.join("airlockd.toml");
    std::fs::write(&config, extra)?;
    let out = Command::new(&artifacts()?.airlockd_bin)
        .arg("--config")
        .arg(&config)
        .arg("--print-config")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "accepted:\n{extra}");
    ensure!(stderr.contains(says), "for\n{extra}\nit says: {stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn airlockd_refuses_listeners_anyone_could_use() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("ops {}\n", random_hex(32)?))?;
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600))?;
    let tokens = toml_path(&tokens);
    refused(
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:4000\"\n",
        "set server.tokens_file",
    )?;
    refused(
        dir.path(),
        &format!("[server]\nlisten = \"0.0.0.0:4000\"\ntokens_file = {tokens}\n"),
        "set server.tls_cert and server.tls_key",
    )?;
    refused(
        dir.path(),
        "[server]\nsocket_mode = 0o666\n",
        "server.socket_mode",
    )?;
    refused(
        dir.path(),
        "[viewer]\nlisten = \"192.0.2.7:4001\"\n",
        "set viewer.tls_cert and viewer.tls_key",
    )?;
    refused(
        dir.path(),
        "[viewer]\nlisten = \"0.0.0.0:4001\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        "set viewer.public_url",
    )?;
    // A tokens file others may read is refused when airlockd starts.
    let exposed = dir.path().join("exposed.tokens");
    std::fs::write(&exposed, format!("ops {}\n", random_hex(32)?))?;
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644))?;
    let start = Daemon::start(process().set("server", "tokens_file", &toml_path(&exposed))).await;
    let err = format!(
        "{:#}",
        start.err().context("started with a readable tokens file")?
    );
    ensure!(err.contains("chmod 600"), "{err}");
    Ok(())
}

/// `path` with its `{parameters}` and required query filled with values
/// that name nothing (so no request here changes anything).
fn sample_url(base: &str, path: &str, op: &Value) -> String {
    let mut url = base.to_string();
    for seg in path.split('/').skip(1) {
        url.push('/');
        url.push_str(match seg {
            "{name}" => "viewer.css",
            s if s.starts_with('{') => "none-such",
            s => s,
        });
    }
    let query: Vec<String> = op["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["in"] == "query" && p["required"] == true)
        .filter_map(|p| p["name"].as_str())
        .map(|n| {
            format!(
                "{n}={}",
                if n == "path" {
                    "/none-such"
                } else {
                    "none-such"
                }
            )
        })
        .collect();
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query.join("&"));
    }
    url
}

/// Every operation of `doc` is served at `base` by `client`.
async fn all_served(client: &reqwest::Client, base: &str, doc: &Value) -> Result<usize> {
    let mut count = 0;
    for (path, item) in doc["paths"].as_object().context("paths")? {
        for (method, op) in item.as_object().context("path item")? {
            let url = sample_url(base, path, op);
            let method = Method::from_bytes(method.to_uppercase().as_bytes())?;
            let r = client
                .request(method.clone(), &url)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await?;
            let status = r.status().as_u16();
            let body = r.text().await?;
            ensure!(
                status != 405 && !(status == 404 && body.contains("no route for")),
                "documented {method} {path} is not served: {status} {body}"
            );
            ensure!(
                op["responses"].is_object() && op["operationId"].is_string(),
                "{method} {path}: {op}"
            );
            count += 1;
        }
    }
    Ok(count)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_documents_match_the_routes_served() -> Result<()> {
    with_daemon(process(), async |d| {
        let operator: Value = d
            .http
            .get(format!("{}/openapi.json", d.base))
            .send()
            .await?
            .json()
            .await?;
        let viewer: Value = d
            .viewer_http
            .get(format!("{}/openapi.json", d.viewer_base))
            .send()
            .await?
            .json()
            .await?;
        for doc in [&operator, &viewer] {
            ensure!(
                doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
                "not OpenAPI 3: {}",
                doc["openapi"]
            );
        }
        let ops = all_served(&d.http, &d.base, &operator).await?;
        let views = all_served(&d.viewer_http, &d.viewer_base, &viewer).await?;
        ensure!(
            ops >= 25 && views >= 8,
            "{ops} operator and {views} viewer operations"
        );
        let viewer_paths = viewer["paths"].as_object().context("paths")?;
        for path in viewer_paths.keys() {
            ensure!(
                !path.starts_with("/api/vms") && path != "/health" && path != "/metrics",
                "the viewers' document lists {path}"
            );
        }
        // Paths neither document lists are not served.
        for path in [
            "/api",
            "/api/vms/none-such/console",
            "/admin",
            "/debug/pprof",
            "/api/auth",
        ] {
            let r = d.http.get(format!("{}{path}", d.base)).send().await?;
            let status = r.status().as_u16();
            let body = r.text().await?;
            ensure!(
                status == 404 && body.contains("no route for"),
                "{path}: {status} {body}"
            );
        }
        Ok(())
    })
    .await
}
