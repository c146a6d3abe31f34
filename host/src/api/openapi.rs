//! The OpenAPI 3.0 document of each listener, produced from the route
//! table ([`super::routes::ROUTES`]) the routers are built from, with the
//! schemas of the request bodies and the main answers. Served as
//! `GET /openapi.json` on each listener (each describes its own routes);
//! built once per router by [`super::operator_router`] and
//! [`super::viewer_router`].

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{json, Map, Value};

use super::routes::{Access, Listener, Route, ROUTES};

/// A listener's document, rendered once.
#[derive(Debug, Clone)]
pub struct Document(pub Arc<str>);

impl Document {
    /// The document of `listener`'s routes.
    pub fn of(listener: Listener) -> Self {
        let text = serde_json::to_string_pretty(&document(listener)).unwrap_or_default();
        Self(text.into())
    }
}

/// `GET /openapi.json`.
pub async fn serve(axum::Extension(doc): axum::Extension<Document>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.to_string(),
    )
}

/// The document of `listener`'s routes.
pub fn document(listener: Listener) -> Value {
    let mut paths = Map::new();
    for r in ROUTES.iter().filter(|r| r.surface.serves(listener)) {
        let item = paths.entry(r.path).or_insert_with(|| json!({}));
        item[r.method.name()] = operation(r);
    }
    let (title, about) = match listener {
        Listener::Operator => (
            "airlockd operator API",
            "VMs, login sessions, metrics. On the Unix socket (server.socket) no token is needed; on TCP (server.listen) every route but the static pages needs `Authorization: Bearer` with an operator token.",
        ),
        Listener::Viewer => (
            "airlockd viewers' API",
            "What a session's viewer token opens: the viewer page, its WebSocket, its events, ICE servers, HTTP offer/answer.",
        ),
    };
    json!({
        "openapi": "3.0.3",
        "info": { "title": title, "version": env!("CARGO_PKG_VERSION"), "description": about },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "operatorToken": { "type": "http", "scheme": "bearer", "description": "A token of server.tokens_file (TCP only)" },
                "viewerToken": { "type": "apiKey", "in": "query", "name": "token", "description": "The session's viewer token (or Authorization: Bearer)" }
            },
            "schemas": schemas(),
        },
    })
}

fn operation(r: &Route) -> Value {
    let mut params: Vec<Value> = path_params(r.path)
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
        .collect();
    params.extend(r.query.iter().map(|p| {
        json!({ "name": p.name, "in": "query", "required": p.required, "description": p.about, "schema": { "type": "string" } })
    }));
    let mut answers = Map::new();
    for (status, about, schema) in r.answers {
        let mut a = json!({ "description": about });
        if let Some(s) = schema {
            a["content"] = json!({ "application/json": { "schema": { "$ref": format!("#/components/schemas/{s}") } } });
        }
        answers.insert(status.to_string(), a);
    }
    if r.body.is_some_and(|b| b != "RawBytes") {
        answers.insert(
            "422".into(),
            error_answer("The body is not valid JSON for its schema"),
        );
    }
    if r.access == Access::Operator {
        answers.insert(
            "401".into(),
            error_answer("On TCP: no operator token, or a wrong one"),
        );
    }
    let mut op = json!({
        "operationId": operation_id(r),
        "summary": r.summary,
        "parameters": params,
        "responses": answers,
    });
    match r.access {
        Access::Operator => op["security"] = json!([{}, { "operatorToken": [] }]),
        Access::ViewerToken => op["security"] = json!([{ "viewerToken": [] }]),
        Access::Public => {}
    }
    if let Some(body) = r.body {
        let content = match body {
            "RawBytes" => {
                json!({ "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } })
            }
            s => {
                json!({ "application/json": { "schema": { "$ref": format!("#/components/schemas/{s}") } } })
            }
        };
        op["requestBody"] = json!({ "required": body != "ViewerTokenRequest", "content": content });
    }
    op
}

fn error_answer(about: &str) -> Value {
    json!({ "description": about, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// `{name}` segments of a path.
fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
}

/// `get_api_vms_id_exec`-style ids, unique per method and path.
fn operation_id(r: &Route) -> String {
    let path: String = r
        .path
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = path
        .split('_')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("_");
    format!("{}_{path}", r.method.name())
}

fn string(about: &str) -> Value {
    json!({ "type": "string", "description": about })
}

fn integer(about: &str) -> Value {
    json!({ "type": "integer", "description": about })
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "required": required, "properties": properties })
}

fn schemas() -> Value {
    json!({
        "Error": object(&["error"], json!({ "error": string("What went wrong and what to do") })),
        "Object": { "type": "object", "description": "A JSON object (see the README for its fields)" },
        "Health": object(&["status", "version", "uptimeMs", "vms"], json!({
            "status": string("ok"), "version": string("airlockd's version"),
            "uptimeMs": integer("Since start"), "vms": integer("VMs known"),
            "backend": string("qemu, firecracker or process"), "accel": string("kvm or tcg"),
            "snapshots": { "type": "object", "description": "Browser VM snapshots and the warm pool" },
        })),
        "CreateVm": object(&["kind"], json!({
            "kind": { "type": "string", "enum": ["cli", "browser"] },
            "userId": string("The owner; a CLI VM gets this user's home disk"),
            "memoryMib": integer("Memory (MiB)"), "vcpus": integer("vCPUs"),
        })),
        "Vm": object(&["id", "kind", "state"], json!({
            "id": string("vm-..."), "kind": { "type": "string", "enum": ["cli", "browser"] },
            "state": { "type": "string", "enum": ["booting", "ready", "failed", "stopped"] },
            "error": string("Why it failed"), "owner": string("Its user"),
            "timings": { "type": "object", "description": "Boot and restore stages (ms), clock offset" },
        })),
        "VmList": object(&["vms"], json!({ "vms": { "type": "array", "items": { "$ref": "#/components/schemas/Vm" } } })),
        "ExecRequest": object(&["argv"], json!({
            "argv": { "type": "array", "items": { "type": "string" }, "minItems": 1 },
            "env": { "type": "array", "items": { "type": "string" }, "description": "NAME=value" },
            "cwd": string("Working directory"), "timeoutMs": integer("Deadline"),
            "maxOutputBytes": integer("Bytes kept of stdout and of stderr"),
        })),
        "ExecResult": object(&["stdout", "stderr", "timedOut"], json!({
            "exitCode": integer("Exit status, unless killed"), "signal": integer("The killing signal"),
            "timedOut": { "type": "boolean" }, "stdout": string("UTF-8 (lossy)"), "stderr": string("UTF-8 (lossy)"),
            "stdoutDroppedBytes": integer("Beyond the cap"), "stderrDroppedBytes": integer("Beyond the cap"),
            "durationMs": integer("How long it ran"),
        })),
        "FileWritten": object(&["bytes", "sha256"], json!({ "bytes": integer("Bytes written"), "sha256": string("Hex digest of what was written") })),
        "StartSession": object(&["userId", "provider"], json!({ "userId": string("Whose CLI to log in"), "provider": string("A provider's name") })),
        "Session": object(&["sessionId", "state"], json!({
            "sessionId": string("ses-..."), "userId": string("Its user"), "provider": string("Its provider"),
            "state": string("created, booting, browser_ready, awaiting_user, captured, stored, delivered, completed, failed, cancelled, expired"),
            "error": string("Why it failed"), "steps": { "type": "array", "items": { "type": "object" } },
            "viewerToken": string("The viewer link's secret"), "viewerUrl": string("The viewer page, on the viewers' listener"),
        })),
        "Input": object(&["events"], json!({ "events": { "type": "array", "items": { "type": "object", "required": ["type"], "properties": {
            "type": { "type": "string", "enum": ["mouseMove", "mouseDown", "mouseUp", "scroll", "keyDown", "keyUp", "text"] } } } } })),
        "ViewerTokenRequest": object(&[], json!({ "ttlMs": integer("Lifetime (at most live.viewer_token_ttl_ms)") })),
        "ViewerLink": object(&["sessionId", "viewerToken", "viewerUrl"], json!({
            "sessionId": string("The session"), "viewerToken": string("The secret"),
            "viewerTokenExpiresAt": string("RFC 3339"), "viewerUrl": string("The page to open"),
        })),
        "IceServers": object(&["iceServers"], json!({ "iceServers": { "type": "array", "items": { "type": "object" } }, "ttl": integer("Seconds the TURN credentials last") })),
        "Offer": object(&["sdp"], json!({ "sdp": string("The offer, candidates included"), "codec": { "type": "string", "enum": ["vp8", "h264"] }, "viewerId": string("To renegotiate") })),
        "Answer": object(&["sdp"], json!({ "viewerId": string("The viewer"), "type": string("answer"), "sdp": string("The answer, candidates included") })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_route_is_in_its_listeners_document_with_its_path_parameters() {
        for listener in [Listener::Operator, Listener::Viewer] {
            let doc = document(listener);
            let served = ROUTES.iter().filter(|r| r.surface.serves(listener));
            let mut count = 0;
            for r in served {
                let op = &doc["paths"][r.path][r.method.name()];
                assert!(
                    op.is_object(),
                    "{listener:?} {} {}",
                    r.method.name(),
                    r.path
                );
                let declared: Vec<&str> = op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["in"] == "path")
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                assert_eq!(declared, path_params(r.path).collect::<Vec<_>>());
                count += 1;
            }
            let documented: usize = doc["paths"]
                .as_object()
                .unwrap()
                .values()
                .map(|item| item.as_object().unwrap().len())
                .sum();
            assert_eq!(
                documented, count,
                "{listener:?}: nothing documented that is not served"
            );
        }
    }

    #[test]
    fn every_schema_referred_to_is_defined() {
        for listener in [Listener::Operator, Listener::Viewer] {
            let doc = document(listener);
            let text = doc.to_string();
            for part in text.split("#/components/schemas/").skip(1) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                assert!(doc["components"]["schemas"][&name].is_object(), "{name}");
            }
        }
    }
}
